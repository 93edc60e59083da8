"""Shrinks a GPU round's MQAR checkpoints to what the next round needs.

A round returns at most about 10 MB, and a T = 256 run's int8 checkpoint is
about 0.4 MB. A checkpoint whose runs finished their schedule keeps only
its best runs (final test accuracy at `--pairs`; they are the ones worth
fine-tuning at a longer T); one that did not finish keeps every run (the
next round resumes them), as long as the byte budget allows, in the order
the files are given.

    python3 benchmarks/mqar_keep.py --results runs.jsonl --keep 1 \
        --budget-mb 8 resume/lever_a.npz:nha-M16-W16+woff3000 ...
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mqar_checkpoint import best_seeds  # noqa: E402
from mqar_checkpoint import keep_runs  # noqa: E402


def _progress(path):
    """`(step, steps, seeds)` stored in a checkpoint."""
    import numpy as np

    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
    return meta["step"], meta["steps"], [seed for _, seed, _ in meta["runs"]]


def shrink(entries, results, keep, pairs, budget_bytes):
    """Shrinks each `(path, result label)` in place (see the module
    docstring); returns one line per file saying what it kept."""
    lines, used = [], 0
    for path, label in entries:
        if not os.path.exists(path):
            lines.append(f"{path}: missing")
            continue
        step, steps, seeds = _progress(path)
        size = os.path.getsize(path)
        finished = step >= steps
        if finished or used + size > budget_bytes:
            best = best_seeds(results, label, keep, pairs) if os.path.exists(
                results) else []
            chosen = [seed for seed in best if seed in seeds] or seeds[:keep]
            keep_runs(path, chosen)
            why = "finished" if finished else "over the budget"
        else:
            chosen, why = seeds, "unfinished: all runs"
        used += os.path.getsize(path)
        lines.append(f"{path}: step {step}/{steps}, kept seeds {chosen} "
                     f"({why}), {os.path.getsize(path) / 1e6:.2f} MB")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True,
                        help="mqar.py result file of the round")
    parser.add_argument("--keep", type=int, default=1,
                        help="best runs a finished checkpoint keeps")
    parser.add_argument("--pairs", type=int, default=16,
                        help="pair count whose accuracy ranks the runs")
    parser.add_argument("--budget-mb", type=float, default=8.0)
    parser.add_argument("checkpoints", nargs="+",
                        help="PATH:LABEL, LABEL the result files' setting")
    args = parser.parse_args(argv)
    entries = [tuple(item.rsplit(":", 1)) for item in args.checkpoints]
    for line in shrink(entries, args.results, args.keep, args.pairs,
                       args.budget_mb * 1e6):
        print(line)


if __name__ == "__main__":
    main()
