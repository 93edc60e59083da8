"""CPU timing of the portable NHA paths against full causal attention.

Forward and forward+backward (gradients for every input) of `reference`,
`chunked` and `keras.ops.dot_product_attention(is_causal=True)`; median of
several runs after a warm-up. JAX runs jitted, TensorFlow inside
`tf.function`, torch eagerly (how each backend trains by default).

    KERAS_BACKEND=torch python benchmarks/core_benchmark.py
    python benchmarks/core_benchmark.py --backends jax tensorflow torch \\
        --plot benchmarks/results/core_cpu.png

Prints one table; `--json` writes the rows, `--from-json` reports saved ones.
"""

import json
import os
import sys

import common
import numpy as np

SHAPE = dict(batch=1, heads=4, key_dim=64, num_slots=32, window_size=256)


def random_inputs(length, window_path=False):
    """Float32 NHA inputs of the benchmark shape, seeded by `length`.

    Args:
        length: sequence length T.
        window_path: add separate `window_query` and `window_key`.

    Returns:
        A dict of NumPy arrays `[1, T, H, ...]`.
    """
    rng = np.random.default_rng(length)
    b, h, d, m = (SHAPE[k] for k in ("batch", "heads", "key_dim",
                                     "num_slots"))
    normal = lambda *s: rng.normal(size=s).astype("float32")
    inputs = {
        "query": normal(b, length, h, d), "key": normal(b, length, h, d),
        "value": normal(b, length, h, d),
        "log_forget_gate": (-np.logaddexp(0, -normal(b, length, h, m))
                            / 8).astype("float32"),
    }
    if window_path:
        inputs["window_query"] = normal(b, length, h, d)
        inputs["window_key"] = normal(b, length, h, d)
    return inputs


def _compiled(fn, names, compile=True):
    """(forward, forward+backward) callables for the active backend.

    `compile=False` keeps the step-by-step reference eager: compiling its
    unrolled loop (and gradient) takes far more time and memory than running.
    """
    import keras
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def loss(*args):
            return jax.numpy.sum(fn(*args))
        both = jax.value_and_grad(loss, argnums=tuple(range(len(names))))
        return (jax.jit(fn), jax.jit(both)) if compile else (fn, both)
    if backend == "tensorflow":
        import tensorflow as tf

        def both(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                out = tf.reduce_sum(fn(*args))
            return out, tape.gradient(out, args)
        return ((tf.function(fn), tf.function(both)) if compile
                else (fn, both))
    import torch

    def torch_both(*args):
        leaves = [a.detach().requires_grad_(True) for a in args]
        out = fn(*leaves).sum()
        return torch.autograd.grad(out, leaves, allow_unused=True)
    return fn, torch_both


def run_backend(lengths, repeats, reference_limit):
    import keras
    from keras import ops

    from keras_nha.ops import initial_state
    from keras_nha.ops import native_hybrid_attention

    rows = []
    for length in lengths:
        tensors = {n: ops.convert_to_tensor(x)
                   for n, x in random_inputs(length).items()}
        names = list(tensors)
        variants = {
            "reference": lambda q, k, v, g: native_hybrid_attention(
                q, k, v, g, SHAPE["window_size"], implementation="reference"),
            "chunked": lambda q, k, v, g: native_hybrid_attention(
                q, k, v, g, SHAPE["window_size"], implementation="chunked"),
            "full causal attention": lambda q, k, v, g:
                ops.dot_product_attention(q, k, v, is_causal=True),
            # A global layer (W >= T) on a fresh sequence, and the same call
            # handed an explicit zero state (its empty ring is then attended
            # as masked rows: what every fresh call cost before).
            "chunked W=T": lambda q, k, v, g: native_hybrid_attention(
                q, k, v, g, length, implementation="chunked"),
            "chunked W=T, zero state": lambda q, k, v, g:
                native_hybrid_attention(
                    q, k, v, g, length, implementation="chunked",
                    initial_state=initial_state(
                        SHAPE["batch"], SHAPE["heads"], SHAPE["key_dim"],
                        SHAPE["key_dim"], SHAPE["num_slots"], length,
                        max_length=length)),
        }
        for name, fn in variants.items():
            if name == "reference" and length > reference_limit:
                continue
            forward, both = _compiled(fn, names,
                                      compile=name != "reference")
            args = [tensors[n] for n in names]
            print(f"[{keras.config.backend()}] T={length} {name} ...",
                  file=sys.stderr, flush=True)
            rows.append(dict(
                backend=keras.config.backend(), length=length, path=name,
                forward_ms=common.time_calls(forward, args, repeats,
                                             budget_s=20).wall_ms,
                train_ms=common.time_calls(both, args, repeats,
                                           budget_s=20).wall_ms))
            print(f"  fwd {rows[-1]['forward_ms']:.1f} ms, fwd+bwd "
                  f"{rows[-1]['train_ms']:.1f} ms", file=sys.stderr,
                  flush=True)
    return rows


def print_table(rows):
    print(f"{'backend':<11} {'T':>6} {'path':<24} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>11} {'fwd+bwd us/token':>17}")
    for r in rows:
        print(f"{r['backend']:<11} {r['length']:>6} {r['path']:<24} "
              f"{r['forward_ms']:>9.1f} {r['train_ms']:>11.1f} "
              f"{1e3 * r['train_ms'] / r['length']:>17.1f}")


def plot(rows, path):
    plt = common.pyplot()
    backends = sorted({r["backend"] for r in rows})
    figure, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends),
                                                           4), squeeze=False)
    for axis, backend in zip(axes[0], backends):
        for name in ("reference", "chunked", "full causal attention",
                     "chunked W=T", "chunked W=T, zero state"):
            points = [(r["length"], r["train_ms"]) for r in rows
                      if r["backend"] == backend and r["path"] == name]
            if points:
                axis.loglog(*zip(*points), marker="o", label=name)
        axis.set_title(f"{backend} (CPU), forward+backward")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("ms")
        axis.legend()
    common.save_figure(figure, path)


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-limit", type=int, default=2048,
                        help="skip the step-by-step reference above this T")
    parser.add_argument("--backends", nargs="+",
                        help="run each backend in its own process")
    parser.add_argument("--json", help="write the rows here")
    common.add_report_arguments(parser)
    args = parser.parse_args()
    if args.from_json:
        rows = common.read_json(args.from_json)
    elif args.backends:
        rows = []
        for backend in args.backends:
            command = [sys.executable, __file__, "--json", "/dev/stdout",
                       "--repeats", str(args.repeats), "--reference-limit",
                       str(args.reference_limit), "--lengths",
                       *map(str, args.lengths)]
            rows += common.run_json_child(
                command, dict(os.environ, KERAS_BACKEND=backend),
                check=True)[1]
    else:
        rows = run_backend(args.lengths, args.repeats, args.reference_limit)
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(rows) + "\n")
            if args.json == "/dev/stdout":
                return
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
