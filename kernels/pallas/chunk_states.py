"""Slot memory at every chunk boundary, chunk writes fused into the scan.

The slot memory follows x <- x * exp(total_n) + local_n over the chunks n
(`total_n`: chunk n's gate cumsum at its last row), forwards for the memory
(Sk [K, M], Sv [M, V]) and backwards for its adjoints (dL/dSk, dL/dSv).
`slots._scan` takes every chunk's `local_n` from XLA's batched products,
which write them to memory and read them back twice. Here each segment
program computes them itself from the chunk's rows (a few small
tensor-core products) while it walks:

1. every segment of chunks walks from zero at once, keeping its total only;
2. `walk` over the segment totals gives each segment's start;
3. every segment walks again from its start, storing the carry at each
   chunk boundary (in the input dtype: the readers feed it to the tensor
   cores in that dtype anyway).

Keys and values share a program (tile j of Sk's rows, tile j of Sv's
columns): they share the gate factors and their two walks overlap.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import dot_ta
from keras_nha.kernels.pallas.common import loop

_F32 = jnp.float32


def _walk_kernel(decay_ref, local_ref, init_ref, out_ref, final_ref, *,
                 chunks, decay_rows, reverse):
    """out[n] = x before chunk n; x <- x * decay[n] + local[n]; final = x.

    Only the scale-and-add is sequential: every load is independent of the
    carry, so the walk is bound by memory, not by dependent latency. The
    carry stays float32; `out` may be stored narrower.
    """
    def body(r, x):
        n = chunks - 1 - r if reverse else r
        out_ref[n] = x.astype(out_ref.dtype)
        decay = decay_ref[n, :]
        decay = decay[:, None] if decay_rows else decay[None, :]
        return x * decay + local_ref[n]

    final = loop(0, chunks, body, init_ref[...])
    out_ref[chunks] = final.astype(out_ref.dtype)
    final_ref[...] = final


def walk(decay, local, init, config, *, decay_rows, dtype, reverse=False):
    """The linear recurrence of `_walk_kernel` over `local [B, Hkv, N, X, Y]`.

    `decay [B, Hkv, N, M]` scales the rows (`decay_rows`, X = M) or the
    columns (Y = M). Returns `[B, Hkv, N + 1, X, Y]` in `dtype`: the carry
    before each chunk (after it, walking in `reverse`) and the final one
    last; and the final carry `[B, Hkv, X, Y]` in float32.
    """
    batch, kv_heads, chunks, rows, cols = local.shape
    slots = decay.shape[-1]
    # Tiles along the axis the decay does not touch: more programs.
    if decay_rows:
        tile = min(16, cols)
        block, index = (rows, tile), (lambda b, c, j: (b, c, 0, 0, j))
        init_index = lambda b, c, j: (b, c, 0, j)
        grid = (batch, kv_heads, cols // tile)
    else:
        tile = min(16, rows)
        block, index = (tile, cols), (lambda b, c, j: (b, c, 0, j, 0))
        init_index = lambda b, c, j: (b, c, j, 0)
        grid = (batch, kv_heads, rows // tile)
    return pl.pallas_call(
        functools.partial(_walk_kernel, chunks=chunks, decay_rows=decay_rows,
                          reverse=reverse),
        grid=grid,
        in_specs=[pl.BlockSpec((None, None, chunks, slots),
                               lambda b, c, j: (b, c, 0, 0)),
                  pl.BlockSpec((None, None, chunks) + block, index),
                  pl.BlockSpec((None, None) + block, init_index)],
        out_specs=[pl.BlockSpec((None, None, chunks + 1) + block, index),
                   pl.BlockSpec((None, None) + block, init_index)],
        out_shape=[jax.ShapeDtypeStruct(
            (batch, kv_heads, chunks + 1, rows, cols), dtype),
                   jax.ShapeDtypeStruct(init.shape, _F32)],
        compiler_params=compiler_params(2, config.sequential_stages + 1),
        interpret=config.interpret,
        name="nha_slot_scan",
    )(decay, local, init)


def _segment_walk(gc_ref, local, starts, outs, *, chunk, chunks, length,
                  reverse):
    """Walks this program's segment of `length` chunks.

    `local(rows, total)` gives chunk `rows`' `(key part [tk, M], value part
    [M, tv])`; `starts` is `()` (walk from zero) or the two start refs;
    `outs` the two output refs: `[length, ...]` blocks store the carry at
    every chunk boundary, else only the segment's total is stored.
    """
    segment = pl.program_id(3)
    out_k, out_v = outs
    store = len(out_k.shape) == 3
    if starts:
        carry = (starts[0][...], starts[1][...])
    else:
        carry = (jnp.zeros(out_k.shape[-2:], _F32),
                 jnp.zeros(out_v.shape[-2:], _F32))

    def body(r, carry):
        xk, xv = carry
        i = length - 1 - r if reverse else r
        n = segment * length + i
        valid = n < chunks  # the last segment may hold no-op chunks
        first = jnp.minimum(n, chunks - 1) * chunk
        if store:
            out_k[i] = xk.astype(out_k.dtype)
            out_v[i] = xv.astype(out_v.dtype)
        total = gc_ref[first + chunk - 1, :]
        lk, lv = local(pl.ds(first, chunk), total)
        decay = jnp.where(valid, jnp.exp(total), 1.0)
        return (xk * decay[None, :] + jnp.where(valid, lk, 0.0),
                xv * decay[:, None] + jnp.where(valid, lv, 0.0))

    xk, xv = loop(0, length, body, carry)
    if not store:
        out_k[...] = xk
        out_v[...] = xv


def _states_kernel(k_ref, v_ref, writes_ref, gc_ref, *refs, lag,
                   **walk_options):
    """The memory's chunk writes: k^T w and w^T v, w = s exp(total - G).

    Keys and values lag the fed stream by `lag` rows (chunks before it
    have no writes, w = 0: any rows do)."""
    dtype = k_ref.dtype

    def local(rows, total):
        del total
        weights = writes_ref[rows, :]
        fed = (pl.ds(jnp.maximum(rows.start - lag, 0), rows.size) if lag
               else rows)
        return (dot_ta(k_ref[fed, :], weights),
                dot_ta(weights, v_ref[fed, :].astype(dtype)))

    _segment_walk(gc_ref, local, refs[:-2], refs[-2:], **walk_options)


def _adjoints_kernel(q_ref, do_ref, dz_ref, p_ref, gc_ref, *refs, scale,
                     groups, **walk_options):
    """The adjoints' chunk reads, summed over the query group:
    q^T (scale dz e^G) and (p e^G)^T do."""
    dtype = q_ref.dtype

    def local(rows, total):
        del total
        reach = jnp.exp(gc_ref[rows, :])
        lk = lv = 0.0
        for g in range(groups):
            lk = lk + dot_ta(q_ref[rows, g, :], (dz_ref[rows, g, :] * reach
                                                 * scale).astype(dtype))
            lv = lv + dot_ta((p_ref[rows, g, :] * reach).astype(dtype),
                             do_ref[rows, g, :].astype(dtype))
        return lk, lv

    _segment_walk(gc_ref, local, refs[:-2], refs[-2:], **walk_options)


def _tiles(key_dim, value_dim, config):
    """Programs per (batch, kv head, segment): Sk row tiles = Sv column
    tiles, at least 16 wide."""
    return max(1, min(config.state_tiles, key_dim // 16, value_dim // 16))


def _fused_scan(kernel, inputs, in_specs, gc, sk0, sv0, config, *, segment,
                dtype, reverse):
    """The three steps of the module docstring for one of the kernels.

    Returns `(sk [B, Hkv, N, K, M], sv [B, Hkv, N, M, V])` in `dtype`
    (entry n: the carry at chunk n's start, or its end with `reverse`) and
    the final carries in float32.
    """
    batch, length, kv_heads, slots = gc.shape
    key_dim, value_dim = sk0.shape[2], sv0.shape[3]
    chunk = config.chunk
    chunks = length // chunk
    segments = -(-chunks // segment)
    padded = segments * segment
    tiles = _tiles(key_dim, value_dim, config)
    tk, tv = key_dim // tiles, value_dim // tiles
    grid = (batch, kv_heads, tiles, segments)
    keys_at = lambda shape: pl.BlockSpec(
        (None, None) + shape + (tk, slots), lambda b, c, j, g: (
            (b, c) + (g,) * len(shape) + (j, 0)))
    values_at = lambda shape: pl.BlockSpec(
        (None, None) + shape + (slots, tv), lambda b, c, j, g: (
            (b, c) + (g,) * len(shape) + (0, j)))
    state = lambda n, dtype: [
        jax.ShapeDtypeStruct((batch, kv_heads, n, key_dim, slots), dtype),
        jax.ShapeDtypeStruct((batch, kv_heads, n, slots, value_dim), dtype)]
    options = dict(chunk=chunk, chunks=chunks, length=segment,
                   reverse=reverse)

    def segment_pass(starts, out_specs, out_shape):
        return pl.pallas_call(
            functools.partial(kernel, **options),
            grid=grid,
            in_specs=in_specs(tk, tv)
            + ([keys_at((None,)), values_at((None,))] if starts else []),
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=compiler_params(config.num_warps,
                                            config.num_stages),
            interpret=config.interpret,
            name="nha_slot_fused_scan",
        )(*inputs, *starts)

    totals = segment_pass((), [keys_at((None,)), values_at((None,))],
                          state(segments, _F32))
    log_decay = jnp.transpose(gc[:, chunk - 1::chunk], (0, 2, 1, 3))
    log_decay = jnp.pad(log_decay, [(0, 0), (0, 0), (0, padded - chunks),
                                    (0, 0)])
    decays = jnp.exp(log_decay.reshape(batch, kv_heads, segments, segment,
                                       slots).sum(3))
    ends = []
    for total, init, rows in zip(totals, (sk0, sv0), (False, True)):
        ends.append(walk(decays, total, init, config, decay_rows=rows,
                         dtype=_F32, reverse=reverse))
    carries = segment_pass(
        tuple(starts[:, :, :segments] for starts, _ in ends),
        [keys_at((segment,)), values_at((segment,))],
        state(padded, dtype))
    carries = [x[:, :, :chunks] for x in carries]
    return carries[0], carries[1], ends[0][1], ends[1][1]


def fused_states(k, v, gc, writes, sk0, sv0, config, segment):
    """Memory at every chunk start, `([B, Hkv, N, K, M], [B, Hkv, N, M,
    V])` in the input dtype, and after the last chunk (float32).

    `writes [B, T, Hkv, M]` (k's dtype): each write's weight at its chunk's
    end, s_i exp(G_end - G_i).
    """
    length, slots = k.shape[1], gc.shape[-1]
    tiled = lambda width: pl.BlockSpec(
        (None, length, None, width), lambda b, c, j, g: (b, 0, c, j))
    gates = pl.BlockSpec((None, length, None, slots),
                         lambda b, c, j, g: (b, 0, c, 0))
    return _fused_scan(
        functools.partial(_states_kernel, lag=config.fed_lag),
        (k, v, writes, gc),
        lambda tk, tv: [tiled(tk), tiled(tv), gates, gates],
        gc, sk0, sv0, config, segment=segment, dtype=k.dtype, reverse=False)


def fused_adjoints(q, dz, p, dout, gc, dsk_end, dsv_end, scale, config,
                   segment):
    """Adjoints at every chunk end, `([B, Hkv, N, K, M], [B, Hkv, N, M,
    V])` in the query dtype, and of the start memory (float32)."""
    batch, length, heads, _ = q.shape
    kv_heads, slots = gc.shape[2], gc.shape[-1]
    groups = heads // kv_heads
    tiled = lambda width: pl.BlockSpec(
        (None, length, groups, width), lambda b, c, j, g: (b, 0, c, j))
    grouped = pl.BlockSpec((None, length, groups, slots),
                           lambda b, c, j, g: (b, 0, c, 0))
    gates = pl.BlockSpec((None, length, None, slots),
                         lambda b, c, j, g: (b, 0, c, 0))
    return _fused_scan(
        functools.partial(_adjoints_kernel, scale=scale, groups=groups),
        (q, dout, dz, p, gc),
        lambda tk, tv: [tiled(tk), tiled(tv), grouped, grouped, gates],
        gc, dsk_end, dsv_end, config, segment=segment, dtype=q.dtype,
        reverse=True)
