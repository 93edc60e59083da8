r"""The MQAR study's final tables and figures (session 6).

Reads `mqar.py` result files (final tests, length-transfer tests and test
checkpoints; `.gz` is fine) and writes:

- the lever table: NHA at T = 256 with the window closed for the first
  steps, without it, and GSA at the same state, per seed at the end;
- accuracy against pairs at every sequence length (trained there, or
  trained at a shorter T and only tested, or fine-tuned), one table per T;
- accuracy against state size at a pair count per T;
- figures: `<prefix>_lever.png`, `<prefix>_pairs.png`, `<prefix>_state.png`.

    python benchmarks/mqar_summary.py \
        --results benchmarks/results/mqar_s6m*_h200_runs.jsonl \
            benchmarks/results/mqar_s6m*_h200_transfer.jsonl \
        --progress benchmarks/results/mqar_s6m*_h200_progress.jsonl.gz \
        --tables tables.md --figures docs/images/mqar_s6
"""

import argparse
import collections
import gzip
import json

import numpy as np

LEARNED = 0.35   # accuracy at 16 pairs that marks a run off the plateau
_KINDS = ("nha", "gsa", "swa", "full", "hybrid")
_COLORS = {"nha": "tab:red", "gsa": "tab:blue", "swa": "tab:green",
           "full": "black", "hybrid": "tab:purple"}


def load_lines(paths):
    """Every JSON line of `paths` (plain or gzip), in order."""
    records = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt") as handle:
            records.extend(json.loads(line) for line in handle
                           if line.strip())
    return records


def model_name(record):
    """How a result names the trained model: its setting (with the lever
    and tags) and the length it was trained at, e.g.
    `nha-M16-W16+woff3000 @256`."""
    trained = record.get("trained_seq_len") or record["seq_len"]
    return f"{record['setting']} @{trained}"


def finished(record, share=0.9):
    """Whether a run got through (nearly) its whole schedule. Fine-tuning
    runs (`ft` in the setting) count as they are: their schedule was sized
    from the time left, and a rate that dropped later cut them short."""
    return (record["step"] >= share * record["steps"]
            or "ft" in record["setting"])


def final_results(records):
    """Final and length-transfer tests of finished runs (`finished`), one
    per (model, T, pairs, seed): the latest step wins (a resumed run
    replaces its cut-short result)."""
    latest = {}
    for record in records:
        key = (model_name(record), record["seq_len"], record["pairs"],
               record["seed"], record["lr"])
        if key not in latest or record["step"] >= latest[key]["step"]:
            latest[key] = record
    return [record for record in latest.values() if finished(record)]


def unfinished_runs(records):
    """`{model: (seeds, steps reached, schedule)}` of the runs that
    `final_results` leaves out."""
    latest = {}
    for record in records:
        key = (model_name(record), record["seed"])
        if key not in latest or record["step"] > latest[key]["step"]:
            latest[key] = record
    left = collections.defaultdict(list)
    for (model, seed), record in sorted(latest.items()):
        if not finished(record):
            left[model].append((seed, record["step"], record["steps"]))
    return dict(left)


def accuracy_grid(results):
    """`{(model, T): {pairs: {seed: accuracy}}}`, each seed at its best
    learning rate where it ran several."""
    grid = collections.defaultdict(lambda: collections.defaultdict(dict))
    for record in results:
        seeds = grid[(model_name(record), record["seq_len"])][
            record["pairs"]]
        seeds[record["seed"]] = max(record["test_accuracy"],
                                    seeds.get(record["seed"], 0.0))
    return grid


def lever_table(results, settings, seq_len=256, pairs=(8, 16, 32, 64)):
    """Markdown: one row per seed, a column per setting (its accuracy at
    each pair count, and the step reached), then the count of runs that
    reached `LEARNED` at 16 pairs."""
    by_key = {}
    for record in results:
        if record["seq_len"] == seq_len and not record.get("transfer"):
            by_key[(record["setting"], record["seed"], record["pairs"])] = (
                record)
    seeds = sorted({seed for setting, seed, _ in by_key if setting in
                    settings})
    head = "| seed | " + " | ".join(f"`{s}`" for s in settings) + " |"
    lines = [head, "|---" * (len(settings) + 1) + "|"]
    learned = collections.Counter()
    counted = collections.Counter()
    for seed in seeds:
        cells = []
        for setting in settings:
            values = [by_key.get((setting, seed, p)) for p in pairs]
            if not all(values):
                cells.append("-")
                continue
            text = " / ".join(f"{v['test_accuracy']:.2f}" for v in values)
            counted[setting] += 1
            if by_key[(setting, seed, 16)]["test_accuracy"] >= LEARNED:
                learned[setting] += 1
                text = f"**{text}**"
            cells.append(f"{text} ({values[0]['step']})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("| learned | " + " | ".join(
        f"{learned[s]} of {counted[s]}" for s in settings) + " |")
    return "\n".join(lines)


def pairs_tables(results, pair_columns=(8, 16, 32, 64, 128, 255, 256)):
    """Markdown, one table per sequence length: a row per model, each pair
    count's best seed and mean over seeds (n seeds)."""
    grid = accuracy_grid(results)
    out = []
    for seq_len in sorted({t for _, t in grid}):
        models = sorted((m for m, t in grid if t == seq_len),
                        key=_model_order)
        columns = [p for p in pair_columns
                   if any(p in grid[(m, seq_len)] for m in models)]
        out.append(f"T = {seq_len} (best seed / mean over seeds):\n")
        out.append("| model (trained at T) | seeds | " + " | ".join(
            f"{p} pairs" for p in columns) + " |")
        out.append("|---" * (len(columns) + 2) + "|")
        for model in models:
            cells = grid[(model, seq_len)]
            seeds = max(len(v) for v in cells.values())
            row = [f"{max(cells[p].values()):.2f} / "
                   f"{np.mean(list(cells[p].values())):.2f}"
                   if p in cells else "-" for p in columns]
            out.append(f"| `{model}` | {seeds} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _model_order(model):
    setting = model.split(" ")[0]
    kind = setting.split("-")[0].split("+")[0]
    return (_KINDS.index(kind) if kind in _KINDS else len(_KINDS),
            int(model.split("@")[1]), model)


def state_points(results, seq_len, pairs):
    """`[(kind, model, state floats, best accuracy, mean accuracy)]` at
    one length and pair count."""
    floats = {}
    for record in results:
        floats[(model_name(record), record["seq_len"])] = (
            record["kind"], record["state_floats"])
    points = []
    for (model, length), cells in accuracy_grid(results).items():
        if length == seq_len and pairs in cells:
            values = list(cells[pairs].values())
            kind, state = floats[(model, length)]
            points.append((kind, model, state, max(values),
                           float(np.mean(values))))
    return sorted(points)


def state_table(results, cells):
    """Markdown: accuracy (best seed / mean) against state size, a section
    per (T, pairs) in `cells`."""
    lines = ["| T | pairs | model | state (floats) | best seed | mean |",
             "|---|---|---|---|---|---|"]
    for seq_len, pairs in cells:
        for kind, model, floats, best, mean in sorted(
                state_points(results, seq_len, pairs),
                key=lambda point: (point[2], point[1])):
            lines.append(f"| {seq_len} | {pairs} | `{model}` | {floats:,} | "
                         f"{best:.2f} | {mean:.2f} |")
    return "\n".join(lines)


def plot_lever(progress, results, settings, path, pairs=16):
    """Test accuracy at `pairs` pairs against the step, a line per seed, a
    panel per setting (the lever's window opening marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = collections.defaultdict(dict)
    for record in list(progress) + list(results):
        if (record["setting"] in settings and record["pairs"] == pairs
                and record["seq_len"] == 256 and not record.get("transfer")):
            curves[(record["setting"], record["seed"])][record["step"]] = (
                record["test_accuracy"])
    figure, axes = plt.subplots(1, len(settings), sharey=True,
                                figsize=(4.4 * len(settings), 3.8))
    for axis, setting in zip(np.atleast_1d(axes), settings):
        for (name, seed), points in sorted(curves.items()):
            if name == setting:
                steps = sorted(points)
                axis.plot(steps, [points[s] for s in steps], marker=".",
                          label=f"seed {seed}",
                          color=plt.get_cmap("tab20")(seed % 20))
        if "woff" in setting:
            axis.axvline(int(setting.split("woff")[1].split("+")[0]),
                         color="gray", linestyle=":")
        axis.set_title(setting, fontsize=9)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"test accuracy, {pairs} pairs")
    np.atleast_1d(axes)[-1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pairs(results, path, models=None):
    """Accuracy (best seed) against pairs, a panel per sequence length, a
    line per model (one colour per kind, one line style per model of a
    kind, the same in every panel; one legend below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = accuracy_grid(results)
    lengths = sorted({t for _, t in grid})
    chosen = sorted({m for m, _ in grid if models is None or m in models},
                    key=_model_order)
    styles = ["-", "--", ":", "-.", (0, (3, 1, 1, 1))]
    seen, looks = collections.Counter(), {}
    for model in chosen:
        kind = model.split("-")[0].split(" ")[0]
        looks[model] = (_COLORS.get(kind, "gray"),
                        styles[seen[kind] % len(styles)])
        seen[kind] += 1
    figure, axes = plt.subplots(1, len(lengths), sharey=True,
                                figsize=(4.2 * len(lengths), 4.6))
    for axis, seq_len in zip(np.atleast_1d(axes), lengths):
        for model in chosen:
            cells = grid.get((model, seq_len))
            if not cells:
                continue
            counts = sorted(cells)
            color, style = looks[model]
            axis.plot(counts, [max(cells[p].values()) for p in counts],
                      marker="o", markersize=4, linestyle=style, color=color,
                      label=model)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("key-value pairs")
        axis.set_title(f"T = {seq_len} (best seed)")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    handles = [plt.Line2D([], [], color=looks[m][0], linestyle=looks[m][1],
                          marker="o", markersize=4) for m in chosen]
    figure.legend(handles, chosen, loc="lower center", fontsize=7,
                  ncol=min(5, len(chosen)))
    figure.tight_layout(rect=(0, 0.06 * (1 + len(chosen) // 5), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_state(results, cells, path):
    """Accuracy (best seed) against state floats, a panel per (T, pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(cells), sharey=True,
                                figsize=(4.6 * len(cells), 4.2))
    for axis, (seq_len, pairs) in zip(np.atleast_1d(axes), cells):
        for kind, model, floats, best, mean in state_points(
                results, seq_len, pairs):
            axis.scatter(floats, best, color=_COLORS.get(kind, "gray"),
                         marker="*" if "woff" in model else "o")
            axis.annotate(model.replace(" ", "\n"), (floats, best),
                          fontsize=5, xytext=(3, 3),
                          textcoords="offset points")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("recurrent state (floats per sequence)")
        axis.set_title(f"T = {seq_len}, {pairs} pairs (best seed)")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _runs_text(runs):
    """"seeds 6, 7 at 1200 of 8000; seed 9 at 900 of 8000"."""
    groups = collections.defaultdict(list)
    for seed, step, steps in runs:
        groups[(step, steps)].append(str(seed))
    return "; ".join(f"seed{'s' if len(seeds) > 1 else ''} "
                     f"{', '.join(seeds)} at {step} of {steps}"
                     for (step, steps), seeds in sorted(groups.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True,
                        help="final and transfer result files")
    parser.add_argument("--progress", nargs="*", default=[],
                        help="test-checkpoint files (the lever curves)")
    parser.add_argument("--lever-settings", nargs="+",
                        default=["nha-M16-W16+woff3000", "nha-M16-W16",
                                 "gsa-M32"])
    parser.add_argument("--state-cells", nargs="+",
                        default=["256:64", "1024:64", "2048:128"],
                        help="T:pairs of the state table and figure")
    parser.add_argument("--pair-models", nargs="+",
                        help="only these models in the pairs figure (as the "
                             "tables name them, e.g. 'full @256')")
    parser.add_argument("--tables", help="markdown file to write")
    parser.add_argument("--figures", help="path prefix of the PNG files")
    args = parser.parse_args(argv)
    lines = load_lines(args.results)
    results = final_results(lines)
    progress = load_lines(args.progress)
    cells = [tuple(int(n) for n in cell.split(":"))
             for cell in args.state_cells]
    text = "\n\n".join([
        "Lever (T = 256, final tests):\n\n" + lever_table(
            results, args.lever_settings),
        "Accuracy against pairs:\n\n" + pairs_tables(results),
        "Accuracy against state:\n\n" + state_table(results, cells),
        "Left out (not run to the end of their schedule):\n\n" + "\n".join(
            f"- `{model}`: " + _runs_text(runs)
            for model, runs in unfinished_runs(lines).items())])
    print(text)
    if args.tables:
        with open(args.tables, "w") as handle:
            handle.write(text + "\n")
    if args.figures:
        plot_lever(progress, results, args.lever_settings,
                   args.figures + "_lever.png")
        plot_pairs(results, args.figures + "_pairs.png", args.pair_models)
        plot_state(results, cells, args.figures + "_state.png")
        print(f"wrote {args.figures}_{{lever,pairs,state}}.png")


if __name__ == "__main__":
    main()
