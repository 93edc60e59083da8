"""Summary of several seeds of `benchmarks/lm_study.py`: table and curves.

Reads the `results.json` of runs that differ only in `--seed` and prints a
Markdown table of validation loss, perplexity and bits/byte per variant
(mean and sample standard deviation over seeds, each seed's loss beside
them), and draws the seed-averaged training curves and validation losses.

    python benchmarks/lm_study_seeds.py RUN0/results.json RUN1/results.json \
        RUN2/results.json --plot docs/images/lm_training_curves.png
"""

import math

import common
import numpy as np


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--plot", default=None, help="curves PNG")
    return parser.parse_args(argv)


def load(paths):
    """`(runs, variants)`: each run's `{variant: record}`, variant order."""
    runs, variants = [], []
    for path in paths:
        saved = common.read_json(path)
        records = {r["variant"]: r for r in saved["records"]}
        runs.append(dict(seed=saved["args"]["seed"], title=saved["title"],
                         records=records))
        variants += [v for v in records if v not in variants]
    return runs, variants


def _mean_sd(values):
    values = np.asarray(values, float)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return values.mean(), sd


def table(runs, variants):
    seeds = [run["seed"] for run in runs]
    lines = ["| variant | params | val loss (nats/byte) | perplexity | "
             "bits/byte | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|---|---|" + "---|" * len(seeds)]
    for variant in variants:
        records = [run["records"].get(variant) for run in runs]
        done = [r for r in records if r is not None]
        loss, sd = _mean_sd([r["valid_loss"] for r in done])
        lines.append(
            f"| {done[0]['label']} | {done[0]['parameters']:,} | "
            f"{loss:.4f} ± {sd:.4f} | {math.exp(loss):.3f} | "
            f"{loss / math.log(2):.3f} | " + " | ".join(
                "-" if r is None else f"{r['valid_loss']:.4f}"
                for r in records) + " |")
    return "\n".join(lines)


def plot(path, runs, variants):
    plt = common.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, variant in enumerate(variants):
        records = [run["records"][variant] for run in runs
                   if variant in run["records"]]
        label = f"{records[0]['label']}"
        losses = np.mean([r["train_losses"] for r in records], axis=0)
        width = min(25, len(losses))
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        left.plot(np.arange(width, len(losses) + 1), smooth, color=f"C{i}",
                  lw=1.2, label=label)
        steps = np.asarray(records[0]["valid_steps"])
        curves = np.asarray([r["valid_curve"] for r in records])
        right.errorbar(steps + 4 * (i - 1.5), curves.mean(axis=0),
                       yerr=[curves.mean(axis=0) - curves.min(axis=0),
                             curves.max(axis=0) - curves.mean(axis=0)],
                       color=f"C{i}", marker="o", ms=4, capsize=3,
                       label=label)
    baseline = runs[0]["records"][variants[0]]["unigram_baseline"]
    left.axhline(baseline, color="gray", ls=":", label="unigram baseline")
    left.set_ylim(top=min(3.3, left.get_ylim()[1]))
    left.set_title(f"training loss, mean of {len(runs)} seeds, "
                   f"{width}-step moving average", fontsize=10)
    right.set_title(f"validation loss, mean and min..max of {len(runs)} "
                    "seeds", fontsize=10)
    for axis in (left, right):
        axis.set_xlabel("training step")
        axis.set_ylabel("loss (nats / byte)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(runs[0]["title"].replace(
        f"seed {runs[0]['seed']}", "seeds " + ", ".join(
            str(run["seed"]) for run in runs)), fontsize=10)
    common.save_figure(figure, path, announce=False)


def main(argv=None):
    args = parse_args(argv)
    runs, variants = load(args.results)
    print(table(runs, variants))
    if args.plot:
        plot(args.plot, runs, variants)


if __name__ == "__main__":
    main()
