"""Benchmark: NHA Pallas kernels vs cuDNN causal attention and NHA Triton.

B=1, H=16, K=V=128, M=64, W=512, bf16 (gates float32), T in {4096, 16384,
65536}; forward and forward+backward (gradients of q, k, v, gates). Every
row of one run is measured on the same card. Also the decode step at B=8
over a 65536-token context (the state holds the last W tokens).

Each backend runs in its own process (JAX and torch each want the GPU's
memory); the driver collects their JSON rows, prints a table, and with
`--plot PATH` draws it.

Usage:
    python benchmarks/pallas_benchmark.py [--lengths 4096 16384 65536]
        [--json PATH] [--plot PATH] [--no-triton]
    # JAX rows only, in a chosen order, each appended to a file as measured
    # (what benchmarks/gpu/pallas.sh runs):
    python benchmarks/pallas_benchmark.py --part jax --steps main:65536 \
        breakdown:65536 variants:65536 decode --jsonl rows.jsonl
    python benchmarks/pallas_benchmark.py --from-jsonl rows.jsonl \
        [--triton-json triton_benchmark.json] --plot p.png

TFLOP/s are against counted FLOPs (one multiply-add = 2 FLOPs), forward:
NHA 4*W*d (window logits + readout) + 8*M*d (slot logits + readout)
+ 4*c*(d + M) (in-chunk slot terms, chunk c=64) per token and head;
causal attention 2*T*d per token and head (half of T^2 pairs). A backward
counts as 2.5 forwards (the flash-attention convention).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, HEADS, DIM, SLOTS, WINDOW, CHUNK = 1, 16, 128, 64, 512, 64
_SAME_JOB_TRITON = "triton (same job)"
DECODE_BATCH, DECODE_CONTEXT = 8, 65536


def nha_flops(length, backward):
    per_token = (4 * WINDOW * DIM + 8 * SLOTS * DIM
                 + 4 * CHUNK * (DIM + SLOTS))
    flops = BATCH * HEADS * length * per_token
    return flops * (3.5 if backward else 1.0)


def causal_flops(length, backward):
    flops = BATCH * HEADS * 2 * length * length * DIM
    return flops * (3.5 if backward else 1.0)


def _median_ms(fn, sync, warmup=2, reps=int(os.environ.get("NHA_BENCH_REPS",
                                                             10)),
               budget_s=20.0, back_to_back=1):
    """Median ms per call; with `back_to_back` > 1 each sample issues that
    many calls before one sync (the GPU runs them without waiting for
    Python, as `triton.testing.do_bench` measures), else every call syncs.
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    began = time.perf_counter()
    while len(times) < reps and (time.perf_counter() - began < budget_s
                                 or len(times) < 3):
        start = time.perf_counter()
        for _ in range(back_to_back):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - start) * 1e3 / back_to_back)
    return statistics.median(times)


_JSONL = None


def _emit(rows, row):
    """Keeps `row` and reports it at once (stderr, and `--jsonl` if set)."""
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    if _JSONL:
        with open(_JSONL, "a") as f:
            f.write(json.dumps(row) + "\n")


def _timed(rows, impl, mode, length, call, card, sync, flops=None):
    """One row: `ms` with 5 calls back to back per sample, `ms_synced` with
    a sync after every call (what rounds before s3r2 reported as `ms`)."""
    try:
        synced = _median_ms(call, sync, reps=7)
        ms, error = _median_ms(call, sync, warmup=0, reps=7,
                               back_to_back=5), None
    except Exception as exc:  # noqa: BLE001 (report, go on)
        ms, synced, error = None, None, f"{type(exc).__name__}: {exc}"[:300]
    _emit(rows, dict(impl=impl, mode=mode, T=length, ms=ms, ms_synced=synced,
                     flops=flops,
                     card=card, error=error))


def run_jax(lengths, steps=None):
    """JAX rows: `steps` in order; by default the main rows for `lengths`,
    the breakdown at the largest, then decode.

    Steps: "main:T" (NHA and cuDNN, fwd and fwd+bwd), "nha:T" (NHA
    only), "given:T" (NHA from an explicit zero state: the kernels join
    its empty ring to the new tokens), "candidates:T[:N]" (NHA under each of the first N
    `_CANDIDATES`, default all), "breakdown:T" (passes and kernels alone),
    "variants:T[:N]" / "tuning:T[:N]" (passes alone under `_VARIANTS` and
    `_WINDOW_VARIANTS` / `_TUNING` and `_WINDOW_TUNING`; with N only the
    first N of each, at least one window tiling), "decode",
    "triton:T" (the NHA Triton kernel under torch, in a subprocess on the
    same card).
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp

    import keras_nha

    card = jax.devices()[0].device_kind
    rows = []
    sync = jax.block_until_ready
    if steps is None:
        steps = [f"main:{t}" for t in lengths] + [
            f"breakdown:{max(lengths)}", "decode"]

    def inputs(length, seed):
        keys = jax.random.split(jax.random.PRNGKey(seed), 5)
        shape = (BATCH, length, HEADS, DIM)
        q, k, v, ct = (jax.random.normal(keys[i], shape, jnp.bfloat16)
                       for i in range(4))
        gate = jax.nn.log_sigmoid(jax.random.normal(
            keys[4], (BATCH, length, HEADS, SLOTS), jnp.float32)) / 8
        return q, k, v, gate, ct

    def nha(q, k, v, gate):
        return keras_nha.ops.native_hybrid_attention(
            q, k, v, gate, WINDOW, implementation="pallas")

    def nha_given_state(q, k, v, gate):
        # An explicit zero state: the kernels join its (empty) ring to the
        # new tokens, as every fresh call did before session 6.
        state = keras_nha.ops.initial_state(
            q.shape[0], k.shape[2], DIM, DIM, SLOTS, WINDOW,
            max_length=q.shape[1], dtype=q.dtype)
        return keras_nha.ops.native_hybrid_attention(
            q, k, v, gate, WINDOW, initial_state=state,
            implementation="pallas")

    def cudnn(q, k, v, gate):
        del gate
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            implementation="cudnn")

    def main_rows(length, candidates=False, with_cudnn=True,
                  given_state=False):
        q, k, v, gate, ct = inputs(length, length)
        impls = (("pallas", nha, nha_flops),
                 ("cudnn causal", cudnn, causal_flops))[:2 if with_cudnn
                                                         else 1]
        if given_state:
            impls = (("pallas, zero state given", nha_given_state,
                      nha_flops),)
        if candidates:
            for name, changes in _CANDIDATES[:candidates]:
                with _tiling(changes):
                    timed_rows(length, q, k, v, gate, ct,
                               [(f"pallas {name}", nha, nha_flops)])
            return
        timed_rows(length, q, k, v, gate, ct, impls)

    def timed_rows(length, q, k, v, gate, ct, impls):
        for name, fn, flops in impls:
            forward = jax.jit(fn)

            # The cotangent is an argument: as a closed-over constant XLA
            # spends seconds folding it into every compile.
            def loss(q, k, v, gate, ct, fn=fn):
                out = fn(q, k, v, gate)
                return jnp.sum(out.astype(jnp.float32) * ct)

            both = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            for mode, call in (("fwd", lambda *a: forward(*a[:4])),
                               ("fwd+bwd", both)):
                _timed(rows, name, mode, length,
                       lambda call=call: call(q, k, v, gate, ct), card, sync,
                       flops(length, mode == "fwd+bwd"))

    for step in steps:
        kind, _, length = step.partition(":")
        length, _, count = length.partition(":")
        if kind in ("main", "candidates", "nha", "given"):
            main_rows(int(length), kind == "candidates" and int(count or
                                                              99),
                      kind == "main", kind == "given")
        elif kind in ("breakdown", "variants", "tuning"):
            _breakdown(rows, int(length), card, sync, kind,
                       int(count) if count else None)
        elif kind == "decode":
            _decode(rows, card, sync)
        elif kind == "triton":
            # Its own process (torch wants the GPU's memory too), on the
            # card this job's rows run on: the ratio of record.
            for row in _in_subprocess("torch", [int(length)]):
                _emit(rows, dict(row, impl=row["impl"].replace(
                    "triton (torch)", _SAME_JOB_TRITON)))
        else:
            raise ValueError(f"Unknown step {step!r}")
    return rows


def _decode(rows, card, sync):
    """Decode: one token over a full state (context 65536, ring of W)."""
    import jax
    import jax.numpy as jnp

    import keras_nha

    state = keras_nha.ops.initial_state(DECODE_BATCH, HEADS, DIM, DIM, SLOTS,
                                        WINDOW, dtype="bfloat16")
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    state = dict(
        state,
        slot_keys=jax.random.normal(keys[0], state["slot_keys"].shape) * 0.1,
        slot_values=jax.random.normal(keys[1], state["slot_values"].shape),
        keys=jax.random.normal(keys[2], state["keys"].shape, jnp.bfloat16),
        window_keys=jax.random.normal(keys[3], state["keys"].shape,
                                      jnp.bfloat16),
        values=jax.random.normal(keys[4], state["values"].shape,
                                 jnp.bfloat16),
        log_forget_gates=-jax.random.uniform(
            keys[5], state["log_forget_gates"].shape) * 0.1,
        mask=jnp.ones_like(state["mask"]),
        position=jnp.asarray(DECODE_CONTEXT, jnp.int32))
    token = [jax.random.normal(keys[6], (DECODE_BATCH, HEADS, DIM),
                               jnp.bfloat16)] * 3 + [
        -jax.random.uniform(keys[7], (DECODE_BATCH, HEADS, SLOTS)) * 0.1]

    def step(state, token, implementation):
        return keras_nha.ops.native_hybrid_attention_step(
            *token, state, WINDOW, implementation=implementation)

    decode = () if os.environ.get("NHA_BENCH_DECODE") == "0" else (
        "pallas", "chunked")
    for implementation in decode:
        # The token is an argument: closed-over constants would look
        # concrete to the op's eager-only checks while being traced.
        one = jax.jit(lambda s, t, i=implementation: step(s, t, i),
                      donate_argnums=0)

        def many(s, t, i=implementation, n=100):
            def body(_, carry):
                out, s = carry
                return step(s, t, i)
            out = jnp.zeros((DECODE_BATCH, HEADS, DIM), jnp.bfloat16)
            return jax.lax.fori_loop(0, n, body, (out, s))
        looped = jax.jit(many, donate_argnums=0)
        holder = {"s": jax.tree.map(jnp.copy, state)}

        def call_one():
            out, holder["s"] = one(holder["s"], token)
            return out

        def call_many():
            out, holder["s"] = looped(holder["s"], token)
            return out
        _emit(rows, dict(impl=f"decode {implementation}", mode="1 call",
                         T=DECODE_CONTEXT,
                         ms=_median_ms(call_one, sync, reps=50), flops=None,
                         card=card, error=None))
        _emit(rows, dict(impl=f"decode {implementation}",
                         mode="per step, 100-step device loop",
                         T=DECODE_CONTEXT,
                         ms=_median_ms(call_many, sync) / 100, flops=None,
                         card=card, error=None))


@contextlib.contextmanager
def _tiling(changes):
    """The Pallas kernels' default tiling changed by `changes` for a while.

    JAX's trace caches are cleared on entry and exit: a trace made under
    the other tiling would otherwise be reused.
    """
    import dataclasses

    import jax

    from keras_nha.kernels.pallas import sequence

    default = sequence.default_config
    sequence.default_config = lambda *a, **k: dataclasses.replace(
        default(*a, **k), **changes)
    jax.clear_caches()
    try:
        yield
    finally:
        sequence.default_config = default
        jax.clear_caches()


def _breakdown(rows, length, card, sync, kind="breakdown", count=None):
    """The two Pallas passes alone (no history assembly, no merge), and the
    slot pass's kernels one by one (chunk walks, readers, XLA cumsums).

    `kind` "variants" / "tuning": the passes under other tilings instead
    (with `count`, only the first `count` slot-pass and window tilings,
    at least one window tiling).
    """
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp

    from keras_nha.kernels.pallas import gates
    from keras_nha.kernels.pallas import slots as slots_lib
    from keras_nha.kernels.pallas.sequence import default_config
    from keras_nha.kernels.pallas.slots import slot_attention
    from keras_nha.kernels.pallas.window import window_attention

    base = default_config(length, DIM, jax.default_backend() != "gpu",
                          SLOTS, 2, bfloat16=True)
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    shape = (BATCH, length, HEADS, DIM)
    history = (BATCH, length + WINDOW, HEADS, DIM)
    q = jax.random.normal(keys[0], shape, jnp.bfloat16)
    k = jax.random.normal(keys[1], history, jnp.bfloat16)
    v = jax.random.normal(keys[2], history, jnp.bfloat16)
    dout = jax.random.normal(keys[4], shape, jnp.float32)
    mask = jnp.ones(history[:2], jnp.float32)
    gate = jax.nn.log_sigmoid(jax.random.normal(
        keys[3], (BATCH, length, HEADS, SLOTS))) / 8
    sk0 = jnp.zeros((BATCH, HEADS, DIM, SLOTS), jnp.float32)
    sv0 = jnp.zeros((BATCH, HEADS, SLOTS, DIM), jnp.float32)
    scale = DIM ** -0.5
    kf, vf = k[:, :length], v[:, :length]

    def window_with(config):
        def window(q, k, v, mask):
            return window_attention(q, k, v, mask, scale, WINDOW, config)[0]
        return window, (mask,)
    window = window_with(base)

    def slots_with(config):
        def slots(q, k, v, gate, sk0, sv0):
            return slot_attention(q, k[:, :length], v[:, :length], gate, sk0,
                                  sv0, scale, SLOTS, config)[0]
        return slots, (gate, sk0, sv0)

    def passes(name, fn_and_extra):
        """Forward and forward+backward (q, k, v) of one pass alone; the
        other arrays are arguments too (as closed-over constants XLA would
        try to fold them)."""
        fn, extra = fn_and_extra
        forward = jax.jit(fn)
        both = jax.jit(jax.grad(lambda q, k, v, *e: jnp.sum(fn(q, k, v, *e)),
                                argnums=(0, 1, 2)))
        # Counted FLOPs of the pass (module docstring), for its TFLOP/s.
        per_token = (4 * WINDOW * DIM if "window" in name
                     else 8 * SLOTS * DIM + 4 * CHUNK * (DIM + SLOTS))
        flops = BATCH * HEADS * length * per_token
        _timed(rows, name, "fwd (pass alone)", length,
               lambda: forward(q, k, v, *extra), card, sync, flops)
        _timed(rows, name, "fwd+bwd (pass alone)", length,
               lambda: both(q, k, v, *extra), card, sync, 3.5 * flops)

    def bound(fn, *args):
        """`fn(*args)` jitted with the arrays as arguments (closed-over
        arrays would be constants, which XLA tries to fold)."""
        call = jax.jit(fn)
        return lambda: call(*args)

    def kernels(tag, config):
        """The slot pass's pieces one at a time, on real intermediates (a
        piece that fails ends them: its row reports the error)."""
        try:
            _kernels(tag, config)
        except Exception as exc:  # noqa: BLE001 (report, go on)
            _emit(rows, dict(impl=f"{tag}slot kernels", mode="-", T=length,
                             ms=None, flops=None, card=card,
                             error=f"{type(exc).__name__}: {exc}"[:300]))

    def _kernels(tag, config):
        gc = jax.jit(functools.partial(slots_lib._chunk_cumsum,
                                       chunk=config.chunk))(gate)
        s = -jnp.expm1(gate)
        states = bound(lambda *a: slots_lib.chunk_states(*a, config), kf, vf,
                       gc, s, sk0, sv0)
        _timed(rows, f"{tag}chunk walks", "fwd (states)", length, states,
               card, sync)
        sk, sv = states()[:2]
        zeros = (jnp.zeros_like(sk0), jnp.zeros_like(sv0))
        read = bound(lambda *a: slots_lib._read(*a, scale, SLOTS, config),
                     q, kf, vf, gc, s, sk, sv)
        _timed(rows, f"{tag}slot reader", "fwd", length, read, card, sync)
        out, lse = read()
        delta = jnp.einsum("bthv,bthv->bht", out, dout)
        dq = bound(lambda *a: slots_lib._dq(*a, scale, SLOTS, config),
                   q, kf, vf, gc, s, sk, sv, dout, lse, delta)
        _timed(rows, f"{tag}slot dq", "bwd", length, dq, card, sync)
        _, dz, p, _ = dq()
        adjoints = bound(lambda *a: slots_lib.chunk_adjoints(*a, scale,
                                                             config),
                         q, dz, p, dout, gc, *zeros)
        _timed(rows, f"{tag}chunk walks", "bwd (adjoints)", length, adjoints,
               card, sync)
        lk, lv, _, _ = adjoints()
        dkv = bound(lambda *a: slots_lib._dkv(*a, scale, config),
                    kf, vf, gc, s, lk, lv, q, dz, p, dout)
        _timed(rows, f"{tag}slot dkv", "bwd", length, dkv, card, sync)

    if kind == "breakdown":
        passes("pallas window", window)
        passes("pallas slots", slots_with(base))
        kernels("", base)

        def gate_sums(gate):  # in-chunk cumsums, forward and reverse
            return (slots_lib._chunk_cumsum(gate, base.chunk)
                    + slots_lib._in_chunk_sums(gate, base.chunk,
                                               reverse=True))
        _timed(rows, "in-chunk sums", "fwd+bwd ones", length,
               bound(gate_sums, gate), card, sync)
        _timed(rows, "gate kernel", "fwd (G and s)", length,
               bound(lambda g: gates.gate_sums(g, base), gate), card, sync)
        return
    slot_variants, window_variants = (
        (_VARIANTS, _WINDOW_VARIANTS) if kind == "variants"
        else (_TUNING, _WINDOW_TUNING))
    if count is not None:
        slot_variants = slot_variants[:count]
        window_variants = window_variants[:max(count, 1)]
    for name, changes, by_kernel in slot_variants:
        config = dataclasses.replace(base, **changes)
        if by_kernel:
            kernels(f"{name}: ", config)
        passes(f"slots {name}", slots_with(config))
    for name, changes in window_variants:
        passes(f"window {name}", window_with(dataclasses.replace(base,
                                                                 **changes)))


# Candidate tilings timed end to end by the "candidates" step.
# Session 3's defaults (segmented scans fed by XLA's batched chunk writes,
# XLA gate sums, float32 slot output / dz / p, one dk/dv/ds kernel).
_S3 = dict(walk="scan", gate_kernels=False, narrow_slot_out=False,
           narrow_probs=False, split_dkv=False)
# Session 4's defaults (the window over one concatenated history copy, the
# slot programs' factored and exact sides in one call).
_S4 = dict(split_history=False, exact_pass=False)
_CANDIDATES = (
    # XLA adds the slots' dq, dk, dv to the window's (session 6's default
    # has the window's kernels add them: this benchmark's window reads the
    # slot queries and keys).
    ("grads added after", dict(grads_into_window=False)),
    # A fresh sequence's log gates as a delayed copy (session 6 reads them
    # in place, like the keys and values).
    ("gates copied", dict(gates_in_place=False)),
    # Segments of the chunk walks: 32 chunks at T=65536 by default.
    ("walk segments of 16 chunks", dict(segment=16)),
    ("walk segments of 64 chunks", dict(segment=64)),
    ("dk/dv 4 warps", dict(dkv_warps=4)),
    ("reader/dq 8 warps", dict(reader_warps=8)),
    ("dk/dv 4 warps, reader/dq 8 warps", dict(dkv_warps=4, reader_warps=8)),
    ("session 4 defaults", _S4),
    ("window interior", dict(window_interior=True)),
    ("4 chunks per factored program", dict(fast_chunks=4)),
    ("session 3 defaults", dict(_S3, **_S4)),
)
# Slot-pass tilings timed by the "variants" step: (name, config changes,
# whether to time its kernels one by one too).
_VARIANTS = (
    ("dk/dv 4 warps", dict(dkv_warps=4), True),
    ("reader/dq 8 warps", dict(reader_warps=8), True),
    ("session 3 defaults", dict(_S3, **_S4), True),
)
# The backward tiles stay (64, 64) in the forward-only variants.
_WINDOW_VARIANTS = (
    ("interior", dict(window_interior=True)),
    ("fwd 128x64", dict(block_q=128, dq_blocks=(64, 64),
                        dkv_blocks=(64, 64))),
    ("dq 128x32 dkv 32x128", dict(dq_blocks=(128, 32),
                                  dkv_blocks=(32, 128))),
    ("dkv 64x128", dict(dkv_blocks=(64, 128))),
    ("stages=3", dict(num_stages=3)),
)
# Further slot- and window-pass tilings, timed by the "tuning" step.
_TUNING = ()
_WINDOW_TUNING = (
    ("fwd 128x64, dq 128x64, dkv 64x128, 8 warps",
     dict(block_q=128, dq_blocks=(128, 64), dkv_blocks=(64, 128),
          window_warps=8)),
    ("fwd 128x64, 8 warps", dict(block_q=128, dq_blocks=(64, 64),
                                 dkv_blocks=(64, 64), window_warps=8)),
    ("dkv 64x128, 8 warps", dict(dkv_blocks=(64, 128), window_warps=8)),
    ("fwd 128x128", dict(block_q=128, block_k=128, dq_blocks=(64, 64),
                         dkv_blocks=(64, 64))),
    ("dq 128x64", dict(dq_blocks=(128, 64))),
    ("dkv 32x128", dict(dkv_blocks=(32, 128))),
    ("warps=8", dict(num_warps=8)),
)


def run_torch(lengths):
    os.environ["KERAS_BACKEND"] = "torch"
    import torch
    import triton.testing

    import keras_nha

    card = torch.cuda.get_device_name()
    rows = []
    for length in lengths:
        g = torch.Generator(device="cuda").manual_seed(length)
        shape = (BATCH, length, HEADS, DIM)
        make = lambda: torch.randn(shape, device="cuda", dtype=torch.bfloat16,
                                   generator=g)
        q, k, v, ct = make(), make(), make(), make()
        gate = torch.nn.functional.logsigmoid(torch.randn(
            (BATCH, length, HEADS, SLOTS), device="cuda",
            generator=g)) / 8
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, gate)]

        def forward():
            with torch.no_grad():
                return keras_nha.ops.native_hybrid_attention(
                    q, k, v, gate, WINDOW, implementation="triton")

        def both():
            out = keras_nha.ops.native_hybrid_attention(
                *leaves, WINDOW, implementation="triton")
            return torch.autograd.grad(out, leaves, ct)

        for mode, fn in (("fwd", forward), ("fwd+bwd", both)):
            try:
                ms = triton.testing.do_bench(fn, warmup=25, rep=200,
                                             return_mode="median")
                error = None
            except Exception as exc:  # noqa: BLE001 (report, go on)
                ms, error = None, f"{type(exc).__name__}: {exc}"[:300]
            _emit(rows, dict(impl="triton (torch)", mode=mode, T=length,
                             ms=ms, flops=nha_flops(length, mode != "fwd"),
                             card=card, error=error))
        del q, k, v, ct, gate, leaves
        torch.cuda.empty_cache()
    return rows


def _in_subprocess(part, lengths):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "torch" if part == "torch" else "jax"
    result = subprocess.run(
        [sys.executable, __file__, "--part", part, "--lengths",
         *map(str, lengths)], env=env, capture_output=True, text=True)
    sys.stderr.write(result.stderr[-4000:])
    if result.returncode:
        return [dict(impl=part, mode="-", T=0, ms=None, flops=None,
                     card=None, error=f"exit {result.returncode}")]
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows):
    width = max([16] + [len(r["impl"]) for r in rows])
    lines = [f"{'impl':<{width}} {'mode':<32} {'T':>6} {'ms':>9} "
             f"{'synced':>9} {'TFLOP/s':>8}  card"]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        rate = ("-" if r["ms"] is None or not r["flops"]
                else f"{r['flops'] / r['ms'] / 1e9:.1f}")
        note = f"  ({r['error']})" if r.get("error") else ""
        synced = ("-" if r.get("ms_synced") is None
                  else f"{r['ms_synced']:.3f}")
        lines.append(f"{r['impl']:<{width}} {r['mode']:<32} {r['T']:>6} {ms:>9} "
                     f"{synced:>9} "
                     f"{rate:>8}  {r['card']}{note}")
    return "\n".join(lines)


def triton_rows(path):
    """Rows of the Triton engineer's benchmark JSON ("NHA Triton" entries:
    T -> [fwd ms, fwd+bwd ms, fwd FLOPs]) in this script's row format:
    "triton (torch)" (eager launches) and "triton (CUDA graph)" (replayed
    as one graph: no Python launch overhead, like a jitted JAX call)."""
    with open(path) as f:
        result = json.load(f)
    rows = []
    for name, by_length in result.get("rows", {}).items():
        if not name.startswith("NHA Triton"):
            continue
        # Other variants ("no returned state") get their own label: as
        # "triton (torch)" they overwrote the eager rows in the ratios.
        variant = name.split(" (")[0].partition(",")[2].strip()
        impl = ("triton (CUDA graph)" if variant == "CUDA graph"
                else f"triton ({variant})" if variant else "triton (torch)")
        for length, (fwd, both, _) in by_length.items():
            for mode, ms in (("fwd", fwd), ("fwd+bwd", both)):
                rows.append(dict(impl=impl, mode=mode,
                                 T=int(length), ms=ms,
                                 flops=nha_flops(int(length),
                                                 mode == "fwd+bwd"),
                                 card=result.get("device"), error=None))
    return rows


def ratios(rows):
    """Per T and mode: Pallas ms, cuDNN / Pallas, Pallas / Triton (eager
    and CUDA-graph launches)."""
    ms = {(r["impl"], r["mode"], r["T"]): r["ms"] for r in rows
          if r["ms"] is not None}
    lines = [f"{'T':>6} {'mode':<8} {'pallas':>8} {'cudnn':>8} {'triton':>8}"
             f" {'graph':>8} {'cudnn/pallas':>12} {'pallas/triton':>13}"
             f" {'pallas/graph':>12}"]
    for length in sorted({r["T"] for r in rows if r["impl"] == "pallas"}):
        for mode in ("fwd", "fwd+bwd"):
            mine = ms.get(("pallas", mode, length))
            cudnn = ms.get(("cudnn causal", mode, length))
            # The Triton rows timed by this job (same card, same call)
            # when present, else the Triton job's.
            triton = ms.get((_SAME_JOB_TRITON, mode, length), ms.get(
                ("triton (torch)", mode, length)))
            graph = ms.get(("triton (CUDA graph)", mode, length))
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            over = lambda a, b: "-" if None in (a, b) else f"{a / b:.2f}x"
            lines.append(f"{length:>6} {mode:<8} {fmt(mine):>8} "
                         f"{fmt(cudnn):>8} {fmt(triton):>8} {fmt(graph):>8} "
                         f"{over(cudnn, mine):>12} {over(mine, triton):>13} "
                         f"{over(mine, graph):>12}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Whole-attention rows only (not the breakdown's pieces), one colour
    # per implementation in both panels.
    impls = sorted({r["impl"] for r in rows
                    if r["impl"].startswith(("pallas", "triton", "cudnn"))
                    and r["mode"] in ("fwd", "fwd+bwd")})
    colours = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()[
        "color"] * 3))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, mode in zip(axes, ("fwd", "fwd+bwd")):
        for impl in impls:
            points = sorted((r["T"], r["ms"]) for r in rows
                            if r["impl"] == impl and r["mode"] == mode
                            and r["ms"] is not None)
            if points:
                axis.plot(*zip(*points), marker="o", label=impl,
                          color=colours[impl])
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("ms (median)")
        axis.set_title(f"{mode}: B=1 H=16 d=128 M=64 W=512 bf16")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    card = next((r["card"] for r in rows if r.get("card")), "")
    fig.suptitle(f"NHA kernels vs cuDNN causal attention ({card})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_variants(rows, path, length=65536):
    """Horizontal bars: every whole-attention row at `length` (fwd and
    fwd+bwd), with the 10x-cuDNN line when cuDNN was timed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ("fwd", "fwd+bwd")
    found = {(r["impl"], r["mode"]): r["ms"] for r in rows
             if r["T"] == length and r["mode"] in modes
             and r["ms"] is not None and not r["impl"].startswith("cudnn")
             and r["impl"].startswith(("pallas", "triton"))}
    impls = sorted({impl for impl, _ in found},
                   key=lambda i: -found.get((i, "fwd+bwd"), 0))
    cudnn = {r["mode"]: r["ms"] for r in rows if r["T"] == length
             and r["impl"] == "cudnn causal" and r["ms"] is not None}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(impls) + 1.5),
                             sharey=True)
    for axis, mode in zip(axes, modes):
        values = [found.get((impl, mode), 0) for impl in impls]
        axis.barh(impls, values, color=["tab:orange" if i.startswith(
            "pallas") else "tab:gray" for i in impls])
        for y, value in enumerate(values):
            if value:
                axis.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        if mode in cudnn:
            axis.axvline(cudnn[mode] / 10, color="tab:red", linestyle="--",
                         label=f"cuDNN causal / 10 ({cudnn[mode] / 10:.2f})")
            axis.legend(loc="lower right", fontsize=8)
        axis.set_xlabel("ms (median)")
        axis.set_title(f"{mode}, T={length}")
        axis.grid(True, axis="x", alpha=0.3)
    card = next((r["card"] for r in rows if r.get("card")), "")
    fig.suptitle(f"NHA variants at T={length}, B=1 H=16 d=128 M=64 W=512 "
                 f"bf16 ({card})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[4096, 16384, 65536])
    parser.add_argument("--part", choices=("all", "jax", "torch"),
                        default="all")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--steps", nargs="+",
                        help="JAX steps in order, e.g. main:65536 "
                        "breakdown:65536 variants:65536 decode")
    parser.add_argument("--jsonl", help="append each row here as measured")
    parser.add_argument("--triton-json",
                        help="with --from-jsonl: add the NHA Triton rows of "
                        "benchmarks/triton_benchmark.py's JSON")
    parser.add_argument("--from-jsonl",
                        help="only print/plot the rows of this file")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--plot-variants",
                        help="with --from-jsonl: bars of every row at "
                        "T=65536 (variants, Triton, the 10x-cuDNN line)")
    args = parser.parse_args()
    global _JSONL
    _JSONL = args.jsonl
    if args.from_jsonl:
        with open(args.from_jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if args.triton_json:
            rows += triton_rows(args.triton_json)
        print(table(rows))
        print()
        print(ratios(rows))
        if args.plot:
            plot(rows, args.plot)
        if args.plot_variants:
            plot_variants(rows, args.plot_variants)
        return
    if args.part == "jax":
        print(json.dumps(run_jax(args.lengths, args.steps)))
        return
    if args.part == "torch":
        print(json.dumps(run_torch(args.lengths)))
        return
    rows = [] if args.no_triton else _in_subprocess("torch", args.lengths)
    rows = _in_subprocess("jax", args.lengths) + rows
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
