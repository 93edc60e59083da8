"""GPU check of the Pallas kernels (not collected by pytest; run by hand).

Every case compares outputs and every gradient with float64 autodiff of the
portable chunked path on the same GPU, fed exactly the rounded inputs the
kernels see (the error a bf16 kernel can be held to; the Triton check does
the same). The strong-gates case also reports what rounding the inputs
alone changes, and the chunked path run in the same low precision.
Then streaming (prefill in pieces, decode steps) and a few `model.fit`
steps of a small NHALayer model with implementation="auto", which must pick
the Pallas kernels on a GPU.

Usage: KERAS_BACKEND=jax python tests/pallas_gpu_check.py [--quick]
"""

import argparse
import os
import subprocess
import sys
import time

# --triton-case: the strong-gates case under the Triton kernel (torch), so
# both kernels' errors on the same inputs sit side by side.
_TRITON = "--triton-case" in sys.argv
os.environ["KERAS_BACKEND"] = "torch" if _TRITON else os.environ.get(
    "KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from nha_testing import INPUT_NAMES  # noqa: E402
from nha_testing import random_inputs  # noqa: E402
from nha_testing import value_and_grads  # noqa: E402

import keras_nha  # noqa: E402

if not _TRITON:
    import jax  # noqa: E402
    import jax.numpy as jnp  # noqa: E402

# random_inputs' gate scale: 0.25 as in the Triton check; 0.43 puts a
# chunk's lowest in-chunk gate cumsum (M=64, 64-token chunks) below -40 in
# about one chunk of five, mixing chunks where the slot kernels take
# factored products with chunks where they take the exact terms.
GATES = 0.25
STRONG_GATES = 0.43
STRONG_CASE = (10, 1, 1000, 4, 2, 128, 64, 200, False)


def _attention(implementation, window, mask, shared=False):
    """NHA; `shared`: the window reads query and key themselves."""
    def fn(query, key, value, log_forget_gate, window_query, window_key):
        return keras_nha.ops.native_hybrid_attention(
            query, key, value, log_forget_gate, window,
            window_query=None if shared else window_query,
            window_key=None if shared else window_key,
            padding_mask=mask, implementation=implementation)
    return fn


def _grads(implementation, x, dtype, mask, window, cotangent, shared=False):
    """Output and every input's gradient for float64 arrays `x` cast to
    `dtype` (gates stay float32 below float64, as NHALayer feeds them)."""
    wide = dtype == "float64"
    arrays = {n: keras.ops.convert_to_tensor(
        v, "float32" if n == "log_forget_gate" and not wide else dtype)
        for n, v in x.items()}
    if mask is not None:
        mask = keras.ops.convert_to_tensor(mask, dtype if wide
                                           else "float32")
    return value_and_grads(_attention(implementation, window, mask, shared),
                           arrays, INPUT_NAMES, cotangent)


def _rounded(x, dtype):
    """`x` rounded to `dtype` (gates to float32), back in float64."""
    return {n: np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(
        keras.ops.convert_to_tensor(v, "float32" if n == "log_forget_gate"
                                    else dtype), "float32")), np.float64)
            for n, v in x.items()}


def _error(got, want, rows=None):
    """Relative Frobenius error (masked rows ignored)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if rows is not None:
        got, want = got * rows, want * rows
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want),
                                                  1e-30))


def _errors(result, reference, rows):
    (out, grads), (ref_out, ref_grads) = result, reference
    errors = {"output": _error(out, ref_out, rows)}
    errors.update({n: _error(grads[n], ref_grads[n]) for n in INPUT_NAMES})
    return errors


def _line(errors):
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items())


def check_case(seed, batch, length, heads, kv_heads, dim, slots, window,
               padding, dtype="bfloat16", tolerance=2e-2, gate_scale=GATES,
               diagnose=False, implementation="pallas", shared=False):
    x = random_inputs(seed, batch=batch, length=length, heads=heads,
                      kv_heads=kv_heads, key_dim=dim, value_dim=dim,
                      num_slots=slots, padding=padding,
                      gate_scale=gate_scale)
    mask = x.pop("padding_mask", None)
    rng = np.random.default_rng(seed + 1)
    cotangent = rng.normal(size=(batch, length, heads, dim))
    rows = None if mask is None else mask[..., None, None]
    if rows is not None:
        cotangent = cotangent * rows
    # value_and_grads rounds the cotangent to the output dtype: the
    # references get the same one.
    cotangent = _rounded({"cotangent": cotangent}, dtype)["cotangent"]
    start = time.perf_counter()
    result = _grads(implementation, x, dtype, mask, window, cotangent,
                    shared)
    seconds = time.perf_counter() - start
    rounded = _rounded(x, dtype)
    reference = _grads("chunked", rounded, "float64", mask, window,
                       cotangent, shared)
    errors = _errors(result, reference, rows)
    if shared:  # window_query / window_key are unused: no gradient
        errors = {n: e for n, e in errors.items()
                  if n not in ("window_query", "window_key")}
    ok = max(errors.values()) < tolerance
    print(f"{'ok  ' if ok else 'FAIL'} {implementation} B={batch} "
          f"T={length} H={heads} Hkv={kv_heads} d={dim} M={slots} W={window}"
          f" pad={padding} {dtype} gates x{gate_scale:g}"
          f"{' shared q/k' if shared else ''}: " + _line(errors)
          + f" ({seconds:.1f}s incl. compile)", flush=True)
    if diagnose:
        # How much rounding the inputs alone changes, and what the portable
        # chunked path makes of the same rounded inputs.
        exact = _grads("chunked", x, "float64", mask, window, cotangent)
        print(f"     input rounding alone (float64 on rounded vs float64 "
              f"inputs): {_line(_errors(reference, exact, rows))}",
              flush=True)
        chunked = _grads("chunked", x, dtype, mask, window, cotangent)
        print(f"     chunked path in {dtype} vs float64 on rounded inputs: "
              f"{_line(_errors(chunked, reference, rows))}", flush=True)
    return ok


def _triton_strong_case():
    """The strong-gates case under the Triton kernel, in a torch process
    (reported for comparison; it never fails the check)."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--triton-case"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, KERAS_BACKEND="torch"))
    lines = [line for line in result.stdout.splitlines()
             if "triton" in line]
    print("     " + (lines[-1] if lines else
                     f"Triton run failed: {result.stderr[-600:]}"),
          flush=True)
    return True


def check_streaming(dtype="bfloat16", window=256):
    """Prefill in two pieces then decode; compare with one call (chunked).
    The second piece reads the first's ring (a given state)."""
    batch, length, heads, kv, dim, slots = 2, 1100, 8, 4, 128, 64
    x = random_inputs(7, batch=batch, length=length, heads=heads,
                      kv_heads=kv, key_dim=dim, value_dim=dim,
                      num_slots=slots, gate_scale=GATES)
    low = {n: jnp.asarray(v, "float32" if n == "log_forget_gate" else dtype)
           for n, v in x.items()}
    wide = {n: jnp.asarray(v, jnp.float64) for n, v in low.items()}
    want = keras_nha.ops.native_hybrid_attention(
        *[wide[n] for n in INPUT_NAMES[:4]], window,
        window_query=wide["window_query"], window_key=wide["window_key"],
        implementation="chunked")
    state = keras_nha.ops.initial_state(batch, kv, dim, dim, slots, window,
                                        dtype=dtype)
    pieces, cuts = [], [0, 700, 1090]
    for a, b in zip(cuts, cuts[1:]):
        out, state = keras_nha.ops.native_hybrid_attention(
            *[low[n][:, a:b] for n in INPUT_NAMES[:4]], window,
            window_query=low["window_query"][:, a:b],
            window_key=low["window_key"][:, a:b], initial_state=state,
            return_state=True, implementation="pallas")
        pieces.append(out)
    step = jax.jit(lambda *a, **k: keras_nha.ops.native_hybrid_attention_step(
        *a, **k, implementation="pallas"), static_argnums=(5,))
    for t in range(cuts[-1], length):
        out, state = step(*[low[n][:, t] for n in INPUT_NAMES[:4]], state,
                          window, window_query=low["window_query"][:, t],
                          window_key=low["window_key"][:, t])
        pieces.append(out[:, None])
    error = _error(jnp.concatenate(pieces, axis=1), want)
    ok = error < 2e-2
    print(f"{'ok  ' if ok else 'FAIL'} streaming prefill 700+390 then "
          f"10 decode steps, W={window}, {dtype}: output={error:.1e}",
          flush=True)
    return ok


def _auto_picks_pallas():
    from keras_nha import backends
    from keras_nha.kernels.pallas.sequence import pallas_nha

    x = {n: jnp.asarray(v, jnp.float32) for n, v in random_inputs(
        0, length=64).items()}
    call = dict(x, window_size=8, scale=0.25, padding_mask=None,
                state=keras_nha.ops.initial_state(2, 2, 16, 16, 8, 8))
    return backends.select("auto", call).__wrapped__ is pallas_nha


def check_fit(steps=5):
    picks = _auto_picks_pallas()
    inputs = keras.Input((256, 128))
    hidden = keras_nha.NHALayer(num_heads=4, head_dim=64, num_kv_heads=2,
                                num_slots=32, window_size=64,
                                implementation="auto")(inputs)
    outputs = keras.layers.Dense(8)(hidden[:, -1])
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 256, 128)).astype("float32")
    y = rng.integers(0, 8, size=(16,))
    history = model.fit(x, y, batch_size=4, epochs=steps, verbose=0)
    losses = history.history["loss"]
    ok = picks and all(np.isfinite(losses)) and losses[-1] < losses[0]
    print(f"{'ok  ' if ok else 'FAIL'} model.fit {steps} epochs, "
          f"implementation='auto' (picks pallas: {picks}): loss "
          + " ".join(f"{v:.4f}" for v in losses), flush=True)
    return ok


def _guarded(check, *args, **kwargs):
    """One check; an exception fails it without stopping the others."""
    try:
        return check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (report, go on)
        print(f"FAIL {check.__name__}{args}: {type(exc).__name__}: "
              f"{str(exc)[:400]}", flush=True)
        return False


# Default order: bf16 at real sizes with GQA first (the default tiling), the
# strong-gates precision case, float32, fit and streaming, the other shapes,
# fp16 and the Triton comparison (last: its Triton compiles take a while).
CHECKS = {
    # seed, B, T, H, Hkv, d, M, W, padding
    "gqa": (check_case, (1, 2, 2048, 8, 4, 128, 64, 512, False), {}),
    # A fresh sequence with W a multiple of the chunk (the slot kernels
    # read the new keys and values in place, W rows behind), padding,
    # GQA 4:1, T not a multiple of the chunk.
    "lag": (check_case, (12, 2, 1500, 8, 2, 128, 64, 256, True), {}),
    # The same with the window reading the slot queries and keys (their
    # gradients added inside with `grads_into_window`).
    "shared": (check_case, (13, 2, 1500, 8, 2, 128, 64, 256, True),
               dict(shared=True)),
    "padded": (check_case, (3, 2, 1500, 8, 2, 128, 64, 100, True), {}),
    "strong": (check_case, STRONG_CASE,
               dict(gate_scale=STRONG_GATES, diagnose=True)),
    "fp32": (check_case, (9, 1, 1000, 4, 2, 128, 64, 200, False),
             dict(dtype="float32", tolerance=2e-3)),
    "fit": (check_fit, (), {}),
    "streaming": (check_streaming, (), {}),
    # A ring front-padded to whole window blocks (W=100): what
    # `split_history` reads apart (not in the default list).
    "stream100": (check_streaming, (), dict(window=100)),
    "w0": (check_case, (2, 1, 1999, 4, 4, 64, 32, 0, False), {}),
    "d256": (check_case, (4, 1, 1024, 4, 4, 256, 128, 3000, False), {}),
    "d96": (check_case, (5, 1, 777, 4, 1, 96, 17, 64, False), {}),
    "m0": (check_case, (6, 1, 2048, 4, 2, 128, 0, 333, False), {}),
    "fp16": (check_case, (8, 1, 1000, 4, 2, 128, 64, 200, False),
             dict(dtype="float16")),
    "triton": (_triton_strong_case, (), {}),
}


def _use_config(changes):
    """Every later Pallas call gets the default config changed by
    `changes`."""
    import dataclasses

    from keras_nha.kernels.pallas import sequence
    default = sequence.default_config
    sequence.default_config = lambda *a, **k: dataclasses.replace(
        default(*a, **k), **changes)
    print(f"KernelConfig changes: {changes}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the first four checks only")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="checks to run, in this order (default: all "
                        f"of {list(CHECKS)})")
    parser.add_argument("--no-diagnose", action="store_true",
                        help="skip the strong-gates case's extra reference "
                        "runs (input rounding alone, chunked in bf16)")
    parser.add_argument("--triton-case", action="store_true",
                        help="only the strong-gates case, Triton kernel "
                        "(KERAS_BACKEND=torch, used by the main run)")
    parser.add_argument("--config", default=None,
                        help="KernelConfig changes for every Pallas call, "
                        "e.g. \"dict(walk='fused')\" (checks a candidate "
                        "tiling before it becomes the default)")
    args = parser.parse_args()
    if args.config:
        _use_config(eval(args.config, {"__builtins__": {}},  # noqa: S307
                         {"dict": dict}))
    if args.triton_case:
        check_case(*STRONG_CASE, gate_scale=STRONG_GATES,
                   implementation="triton")
        return 0
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}",
          flush=True)
    names = args.cases or [n for n in CHECKS if n != "stream100"]
    if args.quick:
        names = names[:4]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown --cases {unknown}; known: {list(CHECKS)}")
    checks = [CHECKS[name] for name in names]
    if args.no_diagnose:
        checks = [(check, a, dict(k, diagnose=False) if "diagnose" in k
                   else k) for check, a, k in checks]
    results = [_guarded(check, *a, **k) for check, a, k in checks]
    print(f"{sum(results)}/{len(results)} GPU checks passed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
