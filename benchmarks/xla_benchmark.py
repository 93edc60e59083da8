"""Speed and memory of the XLA NHA kernel on TensorFlow (issue 5).

B=1, H=4, K=V=64, M=32, W=256, float32 and T in {2048, 8192, 32768}:
forward and forward+backward (gradients for every input) of

- `xla`: `native_hybrid_attention(implementation="xla")` called eagerly
  (the kernel and its gradient are XLA programs),
- `chunked`: the portable chunked path inside `tf.function` (how TF runs it,
  and how `model.fit(jit_compile=False)` would),
- `chunked+xla`: the same under `tf.function(jit_compile=True)`, to show what
  XLA alone makes of the portable path,
- `mha`: `keras.layers.MultiHeadAttention(num_heads=4, key_dim=64)` with
  `use_causal_mask=True` inside `tf.function` (input `[1, T, 256]`,
  gradients for the input and the weights).

Every (path, T) runs in its own process: time is the median wall clock of a
few runs after one warm-up call (which compiles), peak memory is the
process's peak RSS minus its RSS before the first call. A run whose memory,
extrapolated from the shorter runs, would not fit is skipped and reported as
such. For `xla` the script also lists the largest tensor in the optimized
HLO of the XLA-compiled forward+backward, the check that nothing is
quadratic in T.

    KERAS_BACKEND=tensorflow python benchmarks/xla_benchmark.py \\
        --machine cpu2-AMD-EPYC --out benchmarks/results/xla_benchmark_cpu2 \\
        --plot benchmarks/results/xla_benchmark_cpu2.png
"""

import argparse
import json
import os
import re
import resource
import sys

import common
import numpy as np
from core_benchmark import SHAPE
from core_benchmark import random_inputs

PATHS = ("xla", "chunked", "chunked+xla", "mha")
# Peak memory grows like T for the NHA paths and like T^2 for attention.
GROWTH = {"xla": 1, "chunked": 1, "chunked+xla": 1, "mha": 2}


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _largest_hlo_tensor(function, args):
    """(elements, shape) of the largest array the compiled program stores.

    Scans the optimized HLO outside fused computations (values inside a
    fusion live in registers, not in memory).
    """
    text = function.experimental_get_compiler_ir(*args)(
        stage="optimized_hlo")
    best, fused = (0, ""), False
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) ", line)
        if header and line.rstrip().endswith("{"):
            fused = "fused" in header.group(2) or "wrapped" in header.group(2)
            continue
        if fused or " = " not in line:
            continue
        result = line.split(" = ", 1)[1]
        for dims in re.findall(r"^\(?[a-z]+\d*\[([\d,]+)\]", result):
            count = int(np.prod([int(d) for d in dims.split(",")]))
            best = max(best, (count, f"[{dims}]"))
    return best


def _nha_functions(path, tensors):
    import tensorflow as tf

    from keras_nha.ops import native_hybrid_attention

    implementation = "xla" if path == "xla" else "chunked"

    def forward(*args):
        return native_hybrid_attention(
            *args[:4], SHAPE["window_size"], window_query=args[4],
            window_key=args[5], implementation=implementation)

    def both(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            loss = tf.reduce_sum(forward(*args))
        return loss, tape.gradient(loss, args)

    if path == "xla":  # already XLA programs: called eagerly
        return forward, both, tf.function(both, jit_compile=True)
    jit = path == "chunked+xla"
    return (tf.function(forward, jit_compile=jit),
            tf.function(both, jit_compile=jit), None)


def _mha_functions(length):
    import keras
    import tensorflow as tf

    heads, dim = SHAPE["heads"], SHAPE["key_dim"]
    layer = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=dim)
    x = tf.constant(np.random.default_rng(0).normal(
        size=(1, length, heads * dim)).astype("float32"))
    layer(x[:, :8], x[:, :8], use_causal_mask=True)

    @tf.function
    def forward(x):
        return layer(x, x, use_causal_mask=True)

    @tf.function
    def both(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(forward(x))
        return loss, tape.gradient(loss, [x] + layer.trainable_variables)

    return forward, both, [x]


def run_one(path, length, repeats):
    """Measures one (path, T) in this process; returns a result dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if path == "mha":
        forward, both, args = _mha_functions(length)
        jitted = None
    else:
        args = [tf.constant(x) for x in random_inputs(
            length, window_path=True).values()]
        forward, both, jitted = _nha_functions(path, args)
    baseline = _rss_mb()
    row = dict(path=path, length=length)
    # Forward+backward first: the peak RSS below is its peak.
    train = common.time_calls(both, args, repeats)
    row.update(train_compile_s=train.first_s, train_ms=train.wall_ms,
               train_cpu_ms=train.cpu_ms)
    row["peak_mb"] = _peak_rss_mb() - baseline
    forward_timing = common.time_calls(forward, args, repeats)
    row.update(forward_ms=forward_timing.wall_ms,
               forward_cpu_ms=forward_timing.cpu_ms)
    if jitted is not None:
        row["largest_elements"], row["largest_shape"] = _largest_hlo_tensor(
            jitted, args)
    return row


def _available_mb():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024


def _predicted_mb(rows, path, length):
    done = [r for r in rows if r["path"] == path and "peak_mb" in r]
    if not done:
        return 0.0
    last = max(done, key=lambda r: r["length"])
    return max(last["peak_mb"], 1.0) * (length / last["length"]) ** GROWTH[
        path]


def run_all(paths, lengths, repeats, memory_fraction, chunked_xla_max):
    rows = []
    for length in sorted(lengths):
        for path in paths:
            if path == "chunked+xla" and length > chunked_xla_max:
                rows.append(dict(path=path, length=length, skipped=(
                    f"not run above T={chunked_xla_max} (compiling it takes "
                    "minutes; --chunked-xla-max)")))
                continue
            need = _predicted_mb(rows, path, length)
            free = _available_mb()
            if need > memory_fraction * free:
                rows.append(dict(path=path, length=length, skipped=(
                    f"needs ~{need / 1024:.1f} GB (extrapolated), "
                    f"{free / 1024:.1f} GB available")))
                print(f"T={length} {path}: skipped, {rows[-1]['skipped']}",
                      file=sys.stderr, flush=True)
                continue
            print(f"T={length} {path} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--one", path, str(length),
                       "--repeats", str(repeats)]
            status, row = common.run_json_child(
                command, dict(os.environ, KERAS_BACKEND="tensorflow"))
            rows.append(row or dict(path=path, length=length,
                                    skipped=f"failed (exit {status})"))
    return rows


def _row(rows, path, length):
    for r in rows:
        if r["path"] == path and r["length"] == length and "skipped" not in r:
            return r
    return None


def report(rows, machine):
    lines = [f"NHA fwd+bwd on {machine}: B=1 H=4 K=V=64 M=32 W=256 float32",
             "", f"{'T':>6} {'path':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} "
             f"{'(cpu ms)':>10} {'compile s':>10} {'peak MB':>9} "
             f"{'KB/token':>9}"]
    for r in sorted(rows, key=lambda r: (r["length"], PATHS.index(r["path"]))):
        if "skipped" in r:
            lines.append(f"{r['length']:>6} {r['path']:<12} {r['skipped']}")
            continue
        lines.append(
            f"{r['length']:>6} {r['path']:<12} {r['forward_ms']:>9.0f} "
            f"{r['train_ms']:>11.0f} {r['train_cpu_ms']:>10.0f} "
            f"{r['train_compile_s']:>10.1f} {r['peak_mb']:>9.0f} "
            f"{1024 * r['peak_mb'] / r['length']:>9.1f}")
    lines.append("")
    lengths = sorted({r["length"] for r in rows})
    for length in lengths:
        xla = _row(rows, "xla", length)
        if xla is None:
            continue
        parts = []
        for other in ("chunked", "chunked+xla", "mha"):
            r = _row(rows, other, length)
            if r is not None:
                parts.append(f"{r['train_ms'] / xla['train_ms']:.1f}x "
                             f"faster than {other}")
            elif other == "mha":
                estimate = _extrapolated_mha_ms(rows, length)
                if estimate:
                    parts.append(f"~{estimate / xla['train_ms']:.0f}x faster "
                                 "than mha (mha time extrapolated as T^2 "
                                 "from the longest run; not measured)")
        lines.append(f"T={length}: xla fwd+bwd " + ", ".join(parts))
    xla_rows = [r for r in rows if r["path"] == "xla" and "skipped" not in r]
    if len(xla_rows) > 1:
        first, last = xla_rows[0], xla_rows[-1]
        growth = last["peak_mb"] / first["peak_mb"]
        ratio = last["length"] / first["length"]
        lines.append(
            f"xla peak memory: x{growth:.1f} from T={first['length']} to "
            f"T={last['length']} (x{ratio:.0f} tokens): "
            + ("linear or better" if growth <= 1.25 * ratio else
               "GROWS FASTER THAN LINEAR"))
    for r in xla_rows:
        lines.append(
            f"xla T={r['length']}: largest array stored by the compiled "
            f"fwd+bwd {r['largest_shape']} = {r['largest_elements']:,} "
            f"elements ({r['largest_elements'] / r['length']:.0f} per token; "
            f"one [T, T] array would be {r['length'] ** 2:,})")
    return "\n".join(lines)


def _extrapolated_mha_ms(rows, length):
    done = [r for r in rows if r["path"] == "mha" and "skipped" not in r]
    if not done:
        return None
    last = max(done, key=lambda r: r["length"])
    return last["train_ms"] * (length / last["length"]) ** 2


def plot(rows, path, machine):
    import matplotlib.ticker

    plt = common.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PATHS:
        done = sorted((r["length"], r["train_ms"], r["peak_mb"]) for r in rows
                      if r["path"] == name and "skipped" not in r)
        if not done:
            continue
        lengths, times, memory = zip(*done)
        left.loglog(lengths, times, marker="o", label=name)
        right.loglog(lengths, memory, marker="o", label=name)
        if name == "mha":
            extra = [(r["length"], _extrapolated_mha_ms(rows, r["length"]))
                     for r in rows if r["path"] == "mha" and "skipped" in r]
            if extra:
                left.loglog([lengths[-1]] + [e[0] for e in extra],
                            [times[-1]] + [e[1] for e in extra], ls=":",
                            color=left.lines[-1].get_color(),
                            label="mha (T^2 extrapolation)")
    left.set_title(f"forward+backward time ({machine})")
    left.set_ylabel("ms (median)")
    right.set_title("peak memory (RSS growth)")
    right.set_ylabel("MB")
    for axis in (left, right):
        axis.set_xticks(sorted({r["length"] for r in rows}))
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("sequence length T")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    common.save_figure(figure, path)


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[2048, 8192, 32768])
    parser.add_argument("--paths", nargs="+", default=list(PATHS),
                        choices=PATHS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="skip a run predicted to need more than this "
                        "fraction of the available memory")
    parser.add_argument("--chunked-xla-max", type=int, default=8192,
                        help="longest T for the chunked+xla row")
    parser.add_argument("--machine", default=f"cpu{os.cpu_count()}",
                        help="machine name for titles")
    parser.add_argument("--out", help="write PREFIX.txt and PREFIX.json")
    common.add_report_arguments(
        parser, from_json_help="report and plot saved rows (a PREFIX.json "
                               "of --out) instead of running")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "T"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = run_one(args.one[0], int(args.one[1]), args.repeats)
        print(json.dumps(row))
        return
    if args.from_json:
        rows = common.read_json(args.from_json)
    else:
        rows = run_all(args.paths, args.lengths, args.repeats,
                       args.memory_fraction, args.chunked_xla_max)
    text = report(rows, args.machine)
    print(text)
    if args.out and not args.from_json:
        with open(args.out + ".txt", "w") as f:
            f.write(text + "\n")
        common.write_json(args.out + ".json", rows)
    if args.plot:
        plot(rows, args.plot, args.machine)


if __name__ == "__main__":
    main()
