"""Table and figure of MQAR results (JSON lines written by `mqar.py`)."""

import collections
import json
import os
import re

import numpy as np

_ORDER = ("nha", "gsa", "swa", "full", "hybrid")
_COLORS = {"nha": "tab:red", "gsa": "tab:blue", "swa": "tab:green",
           "full": "black", "hybrid": "tab:purple"}


def load_results(paths):
    """Every JSON line of `paths`; a later line replaces an earlier one for
    the same (setting, T, pairs, seed, learning rate)."""
    records = {}
    for path in paths:
        with open(path) as handle:
            for line in handle:
                line = line.strip()
                if line:
                    record = json.loads(line)
                    records[(record["setting"], record["seq_len"],
                             record["pairs"], record["seed"],
                             record["lr"])] = record
    return list(records.values())


def _sort_key(setting):
    kind = setting.split("-")[0]
    numbers = tuple(-int(n) for n in re.findall(r"\d+", setting))
    return (_ORDER.index(kind) if kind in _ORDER else len(_ORDER), numbers)


def best_learning_rate(records):
    """Per (setting, T, pairs, seed), the run of the best learning rate (as
    Zoology reports MQAR: the best of a learning-rate sweep)."""
    best = {}
    for record in records:
        key = (record["setting"], record["seq_len"], record["pairs"],
               record["seed"])
        if key not in best or (record["test_accuracy"]
                               > best[key]["test_accuracy"]):
            best[key] = record
    return list(best.values())


def summarize(records):
    """Mean/min/max test accuracy per (setting, T, pairs) over seeds, each
    seed at its best learning rate.

    Returns:
        A list of dicts sorted by T, setting and pairs.
    """
    groups = collections.defaultdict(list)
    for record in best_learning_rate(records):
        groups[(record["setting"], record["seq_len"], record["pairs"])].append(
            record)
    rows = []
    for (setting, seq_len, pairs), runs in groups.items():
        accuracy = np.array([r["test_accuracy"] for r in runs])
        rows.append(dict(
            setting=setting, kind=setting.split("-")[0], seq_len=seq_len,
            pairs=pairs, state_floats=runs[0]["state_floats"],
            mean=float(accuracy.mean()), low=float(accuracy.min()),
            high=float(accuracy.max()), seeds=sorted(r["seed"] for r in runs),
            steps=min(r.get("step", r["steps"]) for r in runs),
            train_s=float(np.mean(
                [r["train_s"] for r in runs]))))
    rows.sort(key=lambda r: (r["seq_len"], _sort_key(r["setting"]),
                             r["pairs"]))
    return rows


def markdown_table(rows):
    """Accuracy (mean over seeds, min..max) per setting and pair count."""
    lines = []
    for seq_len in sorted({r["seq_len"] for r in rows}):
        subset = [r for r in rows if r["seq_len"] == seq_len]
        pair_counts = sorted({r["pairs"] for r in subset})
        settings = sorted({r["setting"] for r in subset}, key=_sort_key)
        lines.append(f"T = {seq_len}: test accuracy on the answers, mean over "
                     f"seeds (min..max)\n")
        lines.append("| setting | state (floats) | steps | " + " | ".join(
            f"{p} pairs" for p in pair_counts) + " |")
        lines.append("|---|---|---|" + "---|" * len(pair_counts))
        for setting in settings:
            cells = {r["pairs"]: r for r in subset if r["setting"] == setting}
            state = next(iter(cells.values()))["state_floats"]
            steps = min(r["steps"] for r in cells.values())
            row = [setting, f"{state:,}", str(steps)]
            for pairs in pair_counts:
                r = cells.get(pairs)
                row.append("-" if r is None else (
                    f"{r['mean']:.3f} ({r['low']:.2f}..{r['high']:.2f}, "
                    f"n={len(r['seeds'])})"))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    """One accuracy-vs-pairs panel per sequence length, then accuracy vs
    state at the largest pair counts of the most tested length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    seq_len = max(lengths, key=lambda t: sum(r["seq_len"] == t for r in rows))
    subset = [r for r in rows if r["seq_len"] == seq_len]
    state_pairs = sorted({r["pairs"] for r in subset})[-3:]
    figure, axes = plt.subplots(
        1, len(lengths) + len(state_pairs),
        figsize=(4.6 * (len(lengths) + len(state_pairs)), 4.4))
    for left, length in zip(axes, lengths):
        _pairs_panel(left, [r for r in rows if r["seq_len"] == length])
        left.set_title(f"MQAR, T={length}: accuracy vs pairs")
    for right, pairs in zip(axes[len(lengths):], state_pairs):
        for kind in _ORDER:
            points = sorted((r["state_floats"], r["mean"], r["low"],
                             r["high"]) for r in subset
                            if r["kind"] == kind and r["pairs"] == pairs
                            and "+" not in r["setting"])
            if not points:
                continue
            x, mean, low, high = map(np.array, zip(*points))
            right.errorbar(x, mean, yerr=[mean - low, high - mean],
                           marker="o", capsize=3, label=kind,
                           color=_COLORS[kind],
                           linestyle="-" if len(x) > 1 else "none")
        right.set_xscale("log", base=2)
        right.set_xlabel("recurrent state (floats per sequence)")
        right.set_title(f"T={seq_len}: accuracy vs state, {pairs} pairs")
        right.legend(fontsize=8)
    for axis in axes:
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _pairs_panel(axis, subset):
    """Accuracy (mean over seeds, min..max bars) against pairs, a line per
    setting (at most the eight of the main comparison)."""
    settings = sorted({r["setting"] for r in subset}, key=_sort_key)
    if len(settings) > 8:   # a state sweep: the settings of the issue
        settings = [s for s in settings if s in {
            "nha-M64-W64", "nha-M16-W16", "gsa-M64", "gsa-M32", "swa-W64",
            "full", "hybrid-M64"}]
    for setting in settings:
        points = sorted((r["pairs"], r["mean"], r["low"], r["high"])
                        for r in subset if r["setting"] == setting)
        x, mean, low, high = map(np.array, zip(*points))
        axis.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o",
                      capsize=3, label=setting,
                      color=_COLORS.get(setting.split("-")[0], "gray"),
                      linestyle=":" if "+" in setting else "-")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("key-value pairs")
    axis.set_ylabel("test accuracy (answers)")
    axis.legend(fontsize=7)


def write_report(paths, table_path=None, plot_path=None):
    """Prints the markdown table; optionally writes it and the figure."""
    rows = summarize(load_results(paths))
    if not rows:
        print(f"no finished runs in {paths}")
        return
    table = markdown_table(rows)
    print(table)
    if table_path:
        with open(table_path, "w") as handle:
            handle.write(table + "\n")
    if plot_path:
        plot(rows, plot_path)
        print(f"wrote {plot_path}")


def plot_curves(paths, path):
    """Test accuracy against training step (checkpoints and final runs), one
    panel per pair count, one line per setting (mean over seeds) at the
    learning rate that did best."""
    points = collections.defaultdict(list)
    for record in load_all_lines(p for p in paths if os.path.exists(p)):
        points[(record["seq_len"], record["pairs"], record["setting"],
                record["lr"], record["step"])].append(record["test_accuracy"])
    # One curve per setting: its learning rate with the best mean accuracy
    # at the last step it reached (the other rates would hide the plot).
    best = {}
    for (seq_len, pairs, setting, lr, step), values in points.items():
        key = (seq_len, setting)
        score = (step, np.mean(values))
        if lr not in best.setdefault(key, {}) or score > best[key][lr]:
            best[key][lr] = score
    chosen = {}
    for key, by_lr in best.items():
        last = max(step for step, _ in by_lr.values())
        chosen[key] = max((score for score in by_lr.items()
                           if score[1][0] == last), key=lambda s: s[1][1])[0]
    points = {key: value for key, value in points.items()
              if chosen[(key[0], key[2])] == key[3]}
    panels = sorted({key[:2] for key in points})
    if not panels:
        print("no checkpoints to plot")
        return
    figure, axes = _panel_figure(len(panels))
    for axis, (seq_len, pairs) in zip(axes[0], panels):
        lines = sorted({key[2:4] for key in points if key[:2] == (seq_len,
                                                                    pairs)},
                       key=lambda k: (_sort_key(k[0]), k[1]))
        for setting, lr in lines:
            curve = sorted((key[4], np.mean(value))
                           for key, value in points.items()
                           if key[:4] == (seq_len, pairs, setting, lr))
            x, y = zip(*curve)
            axis.plot(x, y, marker=".", label=f"{setting} lr={lr:g}",
                      linestyle="-" if setting.startswith(("nha", "full"))
                      else "--",
                      color=_COLORS.get(setting.split("-")[0], "gray"),
                      alpha=1.0 if setting.endswith(("M64-W64", "-M64",
                                                     "-W64", "full")) else 0.5)
        axis.set_title(f"T={seq_len}, {pairs} pairs")
    _finish_curves(figure, axes, path)


def _panel_figure(count):
    """A row of `count` accuracy-vs-step panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, count, squeeze=False, figsize=(4.4 * count, 4.0))


def _finish_curves(figure, axes, path):
    """Shared axes, legend and file of the accuracy-vs-step figures."""
    import matplotlib.pyplot as plt

    for axis in axes[0]:
        axis.set_xlabel("training step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (answers)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def load_all_lines(paths):
    """Every JSON line of `paths`, duplicates included (for curves)."""
    for path in paths:
        with open(path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def equal_step_table(paths):
    """Accuracy of every setting at the last checkpoint that all settings of
    a sequence length reached (a fair comparison when some runs were cut
    short), as markdown."""
    records = list(load_all_lines(p for p in paths if os.path.exists(p)))
    lines = []
    for seq_len in sorted({r["seq_len"] for r in records}):
        subset = [r for r in records if r["seq_len"] == seq_len]
        # Per setting, its most used learning rate.
        usual_lr = {
            setting: collections.Counter(
                r["lr"] for r in subset if r["setting"] == setting
            ).most_common(1)[0][0]
            for setting in {r["setting"] for r in subset}}
        subset = [r for r in subset if r["lr"] == usual_lr[r["setting"]]]
        reached = collections.defaultdict(set)
        for r in subset:
            reached[r["setting"]].add(r["step"])
        common = set.intersection(*reached.values())
        if not common:
            continue
        step = max(common)
        at_step = [r for r in subset if r["step"] == step]
        rows = summarize(at_step)
        rates = ", ".join(f"{name} {rate:g}" for name, rate in sorted(
            usual_lr.items(), key=lambda item: _sort_key(item[0])))
        lines.append(f"At step {step} (the last checkpoint every setting "
                     f"reached; learning rates: {rates}):\n")
        lines.append(markdown_table(rows))
    table = "\n".join(lines)
    print(table)
    return table


def throughput_table(paths):
    """Per finished process (setting, kernel, chunk size): runs vmapped,
    compile seconds, training steps per second and the steps reached, as
    markdown."""
    rows = {}
    for record in load_all_lines(p for p in paths if os.path.exists(p)):
        kernel = " ".join([record["implementation"]] + [
            tag for tag in (record.get("dtype_policy", "float32"),
                            record.get("xla_flags", ""))
            if tag and tag != "float32"])
        key = (record["setting"], kernel, record.get("chunk_size"),
               record.get("resumed_from", 0))
        rows[key] = record
    if not rows:
        return ""
    lines = ["| setting | kernel | chunk | runs | from step | steps reached "
             "| compile s | steps/s |", "|---|---|---|---|---|---|---|---|"]
    for (setting, kernel, chunk, start), record in sorted(
            rows.items(), key=lambda item: (_sort_key(item[0][0]),
                                            str(item[0][1:]))):
        lines.append(
            f"| {setting} | {kernel} | {chunk or '-'} | "
            f"{record['runs_vmapped']} | {start} | {record['step']} | "
            f"{record['compile_s']:.0f} | {record['steps_per_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    return table


def plot_seed_curves(paths, path, panels=None, settings=None):
    """Test accuracy against training step, one line per setting, seed and
    learning rate (checkpoints and final tests; runs that stalled on the
    starting plateau and runs that learned stay apart, which a mean over
    seeds would hide). One panel per (T, pair count): every one, or the
    `panels` given as a list of `(T, pairs)`; every setting, or those named
    in `settings`."""
    points = collections.defaultdict(dict)
    for record in load_all_lines(p for p in paths if os.path.exists(p)):
        if settings and record["setting"] not in settings:
            continue
        points[(record["seq_len"], record["pairs"], record["setting"],
                record["seed"], record["lr"])][record["step"]] = (
                    record["test_accuracy"])
    panels = [tuple(p) for p in panels] if panels else sorted(
        {key[:2] for key in points})
    if not panels:
        print("no checkpoints to plot")
        return
    figure, axes = _panel_figure(len(panels))
    styles = ("-", "--", ":", "-.")
    variants = sorted({key[2] for key in points if "+" in key[2]})
    colors = {name: ("black", "tab:orange", "tab:purple", "tab:brown")[
        i % 4] for i, name in enumerate(variants)}
    for axis, panel in zip(axes[0], panels):
        labelled = set()
        for key in sorted((k for k in points if k[:2] == panel),
                          key=lambda k: (_sort_key(k[2]), k[3], k[4])):
            setting, seed, lr = key[2:]
            x, y = zip(*sorted(points[key].items()))
            label = None if setting in labelled else f"{setting} lr={lr:g}"
            labelled.add(setting)
            # A variant of a setting (name with "+") is drawn thicker, in
            # a colour of its own.
            axis.plot(x, y, label=label, linestyle=styles[seed % 4],
                      color=colors.get(setting, _COLORS.get(
                          setting.split("-")[0], "gray")),
                      linewidth=2.2 if "+" in setting else 1.0,
                      alpha=1.0 if "+" in setting else 0.6)
        axis.set_title(f"T={panel[0]}, {panel[1]} pairs (line style: seed)")
    _finish_curves(figure, axes, path)


def seed_table(paths):
    """Final test accuracy of every run (setting, seed, learning rate) at
    each pair count, as markdown: with outcomes that split by seed (a run
    jumps off the starting plateau or not) the runs say more than means."""
    records = load_results(p for p in paths if os.path.exists(p))
    runs = collections.defaultdict(dict)
    for record in records:
        runs[(record["seq_len"], record["setting"], record["seed"],
              record["lr"], record["step"], record["steps"])][
                  record["pairs"]] = record["test_accuracy"]
    pair_counts = sorted({r["pairs"] for r in records})
    lines = ["| T | setting | seed | lr | steps (schedule) | " + " | ".join(
        f"{p} pairs" for p in pair_counts) + " |",
        "|---|---|---|---|---|" + "---|" * len(pair_counts)]
    for key in sorted(runs, key=lambda k: (k[0], _sort_key(k[1]), k[2:])):
        seq_len, setting, seed, lr, step, steps = key
        lines.append(f"| {seq_len} | {setting} | {seed} | {lr:g} | {step} "
                     f"({steps}) | " + " | ".join(
                         f"{runs[key].get(p, float('nan')):.2f}"
                         for p in pair_counts) + " |")
    table = "\n".join(lines)
    print(table)
    return table
