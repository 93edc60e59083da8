"""Helpers shared by the benchmark scripts: argparse, timing, JSON, plots.

Imports nothing heavy at module level (the GPU machines have no TensorFlow;
Keras is imported inside `sync`), so every script can use it.

    import common  # from a script in benchmarks/, run from the repo root
    parser = common.make_parser(__doc__)
    common.add_report_arguments(parser)
"""

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass


def make_parser(doc):
    """An `ArgumentParser` described by the first paragraph of `doc`.

    Args:
        doc: the script's module docstring.

    Returns:
        An `argparse.ArgumentParser`.
    """
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_report_arguments(parser, plot_help="write a PNG here",
                         from_json_help="skip running; report and plot the "
                                        "rows saved in this JSON file"):
    """Adds `--plot PATH` and `--from-json PATH` to `parser`.

    Args:
        parser: an `argparse.ArgumentParser`.
        plot_help: help text of `--plot`.
        from_json_help: help text of `--from-json`.

    Returns:
        `parser`.
    """
    parser.add_argument("--plot", default=None, help=plot_help)
    parser.add_argument("--from-json", default=None, help=from_json_help)
    return parser


def add_options(parser, **defaults):
    """Adds `--name-with-dashes` options typed and defaulted by `defaults`.

    For plain options that need no help text beyond their name.

    Args:
        parser: an `argparse.ArgumentParser`.
        **defaults: option name (underscores) -> default (int, float, str).

    Returns:
        `parser`.

    Example:

    >>> add_options(parser, num_layers=2, learning_rate=3e-3)
    """
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"),
                            type=type(default), default=default)
    return parser


def report_saved(path, table, plot=None, plot_path=None):
    """Prints `table(saved)` and draws `plot(plot_path, saved)` for the JSON
    results in `path` (the `--from-json` mode of a script).

    Args:
        path: the JSON file a run wrote.
        table: `saved -> str`.
        plot: `(path, saved) -> None`, or None.
        plot_path: where to draw, or None for no plot.

    Returns:
        The saved results.
    """
    saved = read_json(path)
    print(table(saved))
    if plot is not None and plot_path:
        plot(plot_path, saved)
    return saved


def read_json(path):
    """The object in a JSON file."""
    with open(path) as handle:
        return json.load(handle)


def read_json_lines(path):
    """The rows of a file of one JSON object per line (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def append_json_line(path, row):
    """Appends `row` to a JSON-lines file as one line."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def write_json(path, value):
    """Writes `value` to `path` as indented JSON (overwrites)."""
    with open(path, "w") as handle:
        json.dump(value, handle, indent=1)


def sync(result):
    """Waits for every tensor in `result` (copies it to the host)."""
    import keras

    for leaf in keras.tree.flatten(result):
        keras.ops.convert_to_numpy(leaf)


@dataclass
class Timing:
    """Medians of repeated calls, and the first call's time.

    Attributes:
        first_s: seconds of the first (warm-up, compiling) call.
        wall_ms: median wall-clock milliseconds of the timed calls.
        cpu_ms: median process CPU milliseconds of the timed calls.
        runs: how many calls were timed.
    """

    first_s: float
    wall_ms: float
    cpu_ms: float
    runs: int


def time_calls(fn, args, repeats, budget_s=None):
    """Times `fn(*args)` (waiting for its outputs) after one warm-up call.

    Args:
        fn: the callable.
        args: its positional arguments.
        repeats: timed calls at most.
        budget_s: stop after the call that passes this many seconds of
            timed calls (at least one call is timed); None for no limit.

    Returns:
        A `Timing`.

    Example:

    >>> time_calls(lambda x: x + 1, [np.ones(3)], repeats=5).wall_ms
    """
    start = time.perf_counter()
    sync(fn(*args))
    first_s = time.perf_counter() - start
    wall, cpu = [], []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        sync(fn(*args))
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - cpu_start) * 1e3)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return Timing(first_s, statistics.median(wall), statistics.median(cpu),
                  len(wall))


def run_json_child(command, env, check=False):
    """Runs `command`, whose last stdout line is one JSON value.

    Each measurement runs in its own process (a fresh backend, its own peak
    memory); stderr passes through for progress lines.

    Args:
        command: the argument list.
        env: the child's environment.
        check: raise `subprocess.CalledProcessError` if the child fails.

    Returns:
        `(exit status, parsed value or None when it failed)`.
    """
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE,
                            env=env, check=check)
    if result.returncode:
        return result.returncode, None
    return 0, json.loads(result.stdout.strip().splitlines()[-1])


def pyplot():
    """`matplotlib.pyplot` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path, announce=True):
    """Lays out, writes (120 dpi) and closes `figure`.

    Args:
        figure: a matplotlib figure.
        path: the PNG to write.
        announce: print "wrote PATH".
    """
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    if announce:
        print(f"wrote {path}")
