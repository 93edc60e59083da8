"""The slot pass's gate sums as Pallas kernels (one program per chunk).

Forward: G, the in-chunk inclusive cumsum of the log gates, and the write
strengths s = 1 - exp(g). Backward: the gate gradient from the per-step
terms x (readers, summed over the query group, minus writers), the sum over
later chunks and the writers' own term,

    dL/dg_t = sum_{tau >= t in t's chunk} x_tau + after[chunk] - ds_t e^g_t,

after[chunk] = <dL/dS, S> at the chunk's end per slot (`slots._after_chunks`
explains why; here without its shifted copy of the memory).

XLA computed these as triangular matrix products (three bfloat16 parts of
each float32 operand) plus several elementwise passes: about 0.2 ms per
direction at T=16384 on an H200 for what is one read and one write of the
gates. Here each chunk's sums stay in registers (Triton's scan).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import irange

_F32 = jnp.float32


def _forward_kernel(g_ref, gc_ref, s_ref, *writes_ref, lag, end):
    g = g_ref[...]
    if end:  # new tokens' gates, `lag` rows behind: rows outside feed nothing
        rows = pl.program_id(0) * g.shape[0] + irange(g.shape[0])
        g = jnp.where(((rows >= lag) & (rows < end))[:, None], g, 0.0)
    gc = jnp.cumsum(g, axis=0)
    s = -jnp.expm1(g)
    gc_ref[...] = gc
    s_ref[...] = s
    if writes_ref:  # each write's weight at the chunk's end
        total = jnp.sum(g, axis=0)
        writes_ref[0][...] = (s * jnp.exp(total[None, :] - gc)).astype(
            writes_ref[0].dtype)


def _gradient_kernel(x_ref, *refs, groups, chunks, parts):
    ds_refs, refs = refs[:parts], refs[parts:]
    (s_ref, g_ref, lk_ref, lv_ref, sk_ref, sv_ref, sk_end_ref, sv_end_ref,
     dg_ref) = refs
    ds = ds_refs[0][...]
    for ds_ref in ds_refs[1:]:
        ds = ds + ds_ref[...]
    x = x_ref[:, 0, :]
    for h in range(1, groups):
        x = x + x_ref[:, h, :]
    x = x - ds * s_ref[...]
    # Reverse inclusive sum: the chunk's total minus the exclusive prefix
    # (Triton's scan runs forward only).
    reverse = jnp.sum(x, axis=0)[None, :] - jnp.cumsum(x, axis=0) + x
    # Every later step: <adjoint, memory> at the chunk's end, per slot (the
    # memory blocks hold the next chunk's start, or the final memory).
    last = pl.program_id(0) == chunks - 1
    sk = jnp.where(last, sk_end_ref[...], sk_ref[...].astype(_F32))
    sv = jnp.where(last, sv_end_ref[...], sv_ref[...].astype(_F32))
    after = (jnp.sum(lk_ref[...].astype(_F32) * sk, axis=0)
             + jnp.sum(lv_ref[...].astype(_F32) * sv, axis=1))
    dg_ref[...] = reverse + after[None, :] - ds * jnp.exp(g_ref[...])


def _chunk_rows(chunk, slots, lag=0):
    """Chunk n's rows; with `lag`, those `lag` rows earlier (the first
    chunk's for chunks before it)."""
    return pl.BlockSpec((None, chunk, None, slots), lambda n, b, c: (
        b, jnp.maximum(n - lag // chunk, 0) if lag else n, c, 0))


def _gates_lag(config):
    """Rows by which the log gates lag the fed stream (`fed_length`)."""
    return config.fed_lag if config.fed_length else 0


def gate_sums(g, config, writes_dtype=None):
    """`(G, s)` for float32 log gates `g [B, T, Hkv, M]` (T % chunk == 0),
    and with `writes_dtype` also `s_i exp(G_end - G_i)` in that dtype (the
    weights of the chunk writes, `chunk_states.fused_states`)."""
    batch, length, kv_heads, slots = g.shape
    chunk = config.chunk
    rows = _chunk_rows(chunk, slots)
    outs = [jax.ShapeDtypeStruct(g.shape, _F32)] * 2
    if writes_dtype is not None:
        outs.append(jax.ShapeDtypeStruct(g.shape, writes_dtype))
    return pl.pallas_call(
        functools.partial(_forward_kernel, lag=config.fed_lag,
                          end=config.fed_length),
        grid=(length // chunk, batch, kv_heads),
        in_specs=[_chunk_rows(chunk, slots, _gates_lag(config))],
        out_specs=[rows] * len(outs),
        out_shape=outs,
        compiler_params=compiler_params(config.num_warps, 1),
        interpret=config.interpret,
        name="nha_gate_sums",
    )(g)


def gate_gradient(x, ds, s, g, adjoints, memory, config):
    """dL/dg `[B, T, Hkv, M]` float32.

    Args:
        x: `[B, T, H, M]` the readers' dL/dG terms per query head.
        ds: `[B, T, Hkv, M]` dL/ds per writer, or a tuple of parts of it
            (summed here).
        s, g: the write strengths and log gates.
        adjoints: `(lk [B, Hkv, N, K, M], lv [B, Hkv, N, M, V])`, dL/dS at
            every chunk end.
        memory: `(sk, sv, sk_end, sv_end)`: the memory at every chunk start
            (same layouts) and after the last chunk (float32).
        config: a `KernelConfig`.
    """
    batch, length, kv_heads, slots = g.shape
    groups, chunk = x.shape[2] // kv_heads, config.chunk
    chunks = length // chunk
    ds = ds if isinstance(ds, tuple) else (ds,)
    key_dim, value_dim = memory[2].shape[2], memory[3].shape[3]
    rows = _chunk_rows(chunk, slots)
    at = lambda shape, step: pl.BlockSpec(
        (None, None, None) + shape,
        lambda n, b, c: (b, c, jnp.minimum(n + step, chunks - 1), 0, 0))
    final = lambda shape: pl.BlockSpec((None, None) + shape,
                                       lambda n, b, c: (b, c, 0, 0))
    return pl.pallas_call(
        functools.partial(_gradient_kernel, groups=groups, chunks=chunks,
                          parts=len(ds)),
        grid=(chunks, batch, kv_heads),
        in_specs=[pl.BlockSpec((None, chunk, groups, slots),
                               lambda n, b, c: (b, n, c, 0))]
        + [rows] * (len(ds) + 1)
        # (Rows of g outside the fed stream give rows of dg the caller
        # drops.)
        + [_chunk_rows(chunk, slots, _gates_lag(config))]
        + [at((key_dim, slots), 0), at((slots, value_dim), 0),
           at((key_dim, slots), 1), at((slots, value_dim), 1),
           final((key_dim, slots)), final((slots, value_dim))],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(g.shape, _F32),
        # Four [K, M] / [M, V] memory blocks per program: 8 warps keep
        # them in registers.
        compiler_params=compiler_params(8, 1),
        interpret=config.interpret,
        name="nha_gate_gradient",
    )(x, *ds, s, g, *adjoints, *memory)
