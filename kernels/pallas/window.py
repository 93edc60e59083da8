"""Sliding-window flash attention over NHA's history stream, in Pallas.

Query row t (of T) sees history rows t+1 .. t+C (C = the ring capacity, the
window) whose mask is set. The history is the state's ring, oldest first,
followed by the new tokens, so row t+C is token t itself. The pass returns
the window-normalised output and its log-sum-exp, so the caller can merge it
with the slot pass; its VJP accepts a cotangent for the lse too
(`delta = rowsum(o * do) - dlse`), which makes the merged gradient exact.

Layouts stay Keras' `[B, T, H, D]`; the kv head of query head h is
`h // groups` through the index maps (no repeated keys or values). Inputs
must already be padded: T to a multiple of `block_q`, the history length to
a multiple of `block_k`, head dims to powers of two.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from keras_nha.kernels.pallas.common import LN2
from keras_nha.kernels.pallas.common import LOG2E
from keras_nha.kernels.pallas.common import MASKED
from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import dot
from keras_nha.kernels.pallas.common import idiv
from keras_nha.kernels.pallas.common import irange
from keras_nha.kernels.pallas.common import loop


def _visible(rows, cols, capacity, key_mask):
    """`[rows, cols]`: history row `col` is inside query `row`'s window."""
    return ((cols[None, :] > rows[:, None])
            & (cols[None, :] <= rows[:, None] + capacity)
            & (key_mask[None, :] > 0))


def _forward_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, scale,
                    capacity, block_q, block_k, key_blocks):
    start = pl.program_id(0) * block_q
    q = q_ref[...]
    rows = start + irange(block_q)
    first = idiv(start + 1, block_k)
    last = jnp.minimum(idiv(start + block_q + capacity + block_k - 1,
                               block_k), key_blocks)

    def body(j, carry):
        acc, top, total = carry
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = dot(q, k, trans_b=True) * (scale * LOG2E)
        visible = _visible(rows, j * block_k + irange(block_k), capacity,
                           mask_ref[keys])
        logits = jnp.where(visible, logits, MASKED)
        new_top = jnp.maximum(top, jnp.max(logits, axis=1))
        correction = jnp.exp2(top - new_top)
        weights = jnp.exp2(logits - new_top[:, None])
        total = total * correction + jnp.sum(weights, axis=1)
        acc = acc * correction[:, None] + dot(weights.astype(v.dtype), v)
        return acc, new_top, total

    acc = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)
    top = jnp.full((block_q,), -jnp.inf, jnp.float32)
    total = jnp.zeros((block_q,), jnp.float32)
    acc, top, total = loop(first, last, body, (acc, top, total))
    o_ref[...] = acc / total[:, None]
    lse_ref[...] = (top + jnp.log2(total)) * LN2


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, capacity, block_q, block_k, key_blocks):
    start = pl.program_id(0) * block_q
    q = q_ref[...]
    do = do_ref[...].astype(q.dtype)
    lse = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    rows = start + irange(block_q)
    first = idiv(start + 1, block_k)
    last = jnp.minimum(idiv(start + block_q + capacity + block_k - 1,
                               block_k), key_blocks)

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = dot(q, k, trans_b=True) * (scale * LOG2E)
        visible = _visible(rows, j * block_k + irange(block_k), capacity,
                           mask_ref[keys])
        probs = jnp.where(visible, jnp.exp2(logits - lse[:, None]), 0.0)
        dprobs = dot(do, v.astype(do.dtype), trans_b=True)
        dlogits = probs * (dprobs - delta[:, None])
        return dq + dot(dlogits.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = loop(first, last, body, dq)
    dq_ref[...] = dq * scale


def _dkv_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, capacity, block_q, block_k,
                query_blocks, groups):
    start = pl.program_id(0) * block_k
    k = k_ref[...]
    v = v_ref[...]
    cols = start + irange(block_k)
    key_mask = mask_ref[...]
    # Queries t with t + 1 <= col <= t + capacity.
    first = idiv(jnp.maximum(start - capacity, 0), block_q)
    last = jnp.minimum(idiv(start + block_k - 1 + block_q - 1, block_q),
                       query_blocks)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):
        def body(i, carry, g=g):
            dk, dv = carry
            queries = pl.ds(i * block_q, block_q)
            q = q_ref[queries, g, :]
            do = do_ref[queries, g, :].astype(q.dtype)
            lse = lse_ref[g, queries] * LOG2E
            delta = delta_ref[g, queries]
            rows = i * block_q + irange(block_q)
            logits = dot(k, q, trans_b=True) * (scale * LOG2E)  # [keys, q]
            visible = ((cols[:, None] > rows[None, :])
                       & (cols[:, None] <= rows[None, :] + capacity)
                       & (key_mask[:, None] > 0))
            probs = jnp.where(visible, jnp.exp2(logits - lse[None, :]), 0.0)
            dv = dv + dot(probs.astype(do.dtype), do)
            dprobs = dot(v.astype(do.dtype), do, trans_b=True)
            dlogits = probs * (dprobs - delta[None, :])
            dk = dk + dot(dlogits.astype(q.dtype), q)
            return dk, dv
        dk, dv = loop(first, last, body, (dk, dv))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _forward(qw, kw, v, mask, scale, capacity, config):
    batch, length, heads, key_dim = qw.shape
    history, kv_heads, value_dim = kw.shape[1], kw.shape[2], v.shape[-1]
    groups = heads // kv_heads
    block_q, block_k = config.block_q, config.block_k
    kernel = functools.partial(
        _forward_kernel, scale=scale, capacity=capacity, block_q=block_q,
        block_k=block_k, key_blocks=history // block_k)
    return pl.pallas_call(
        kernel,
        grid=(length // block_q, batch, heads),
        in_specs=[
            pl.BlockSpec((None, block_q, None, key_dim),
                         lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, history, None, key_dim),
                         lambda i, b, h: (b, 0, h // groups, 0)),
            pl.BlockSpec((None, history, None, value_dim),
                         lambda i, b, h: (b, 0, h // groups, 0)),
            pl.BlockSpec((None, history), lambda i, b, h: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, value_dim),
                         lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, value_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
        ],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=config.interpret,
        name="nha_window_forward",
    )(qw, kw, v, mask)


def _backward(qw, kw, v, mask, do, lse, delta, scale, capacity, config):
    batch, length, heads, key_dim = qw.shape
    history, kv_heads, value_dim = kw.shape[1], kw.shape[2], v.shape[-1]
    groups = heads // kv_heads
    block_q, block_k = config.block_q, config.block_k
    params = compiler_params(config.num_warps, config.num_stages)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, capacity=capacity,
                          block_q=block_q, block_k=block_k,
                          key_blocks=history // block_k),
        grid=(length // block_q, batch, heads),
        in_specs=[
            pl.BlockSpec((None, block_q, None, key_dim),
                         lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, history, None, key_dim),
                         lambda i, b, h: (b, 0, h // groups, 0)),
            pl.BlockSpec((None, history, None, value_dim),
                         lambda i, b, h: (b, 0, h // groups, 0)),
            pl.BlockSpec((None, history), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, block_q, None, value_dim),
                         lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, key_dim),
                               lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(qw.shape, jnp.float32),
        compiler_params=params,
        interpret=config.interpret,
        name="nha_window_dq",
    )(qw, kw, v, mask, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, capacity=capacity,
                          block_q=block_q, block_k=block_k,
                          query_blocks=length // block_q, groups=groups),
        grid=(history // block_k, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, length, groups, key_dim),
                         lambda j, b, c: (b, 0, c, 0)),
            pl.BlockSpec((None, block_k, None, key_dim),
                         lambda j, b, c: (b, j, c, 0)),
            pl.BlockSpec((None, block_k, None, value_dim),
                         lambda j, b, c: (b, j, c, 0)),
            pl.BlockSpec((None, block_k), lambda j, b, c: (b, j)),
            pl.BlockSpec((None, length, groups, value_dim),
                         lambda j, b, c: (b, 0, c, 0)),
            pl.BlockSpec((None, groups, length), lambda j, b, c: (b, c, 0)),
            pl.BlockSpec((None, groups, length), lambda j, b, c: (b, c, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_k, None, key_dim),
                         lambda j, b, c: (b, j, c, 0)),
            pl.BlockSpec((None, block_k, None, value_dim),
                         lambda j, b, c: (b, j, c, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(kw.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_window_dkv",
    )(qw, kw, v, mask, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def window_attention(qw, kw, v, mask, scale, capacity, config):
    """Windowed attention over the history: `(out f32, lse f32 [B, H, T])`.

    Args:
        qw: `[B, T, H, K]` window queries.
        kw: `[B, L, Hkv, K]` history window keys (L >= T + capacity).
        v: `[B, L, Hkv, V]` history values.
        mask: `[B, L]` float, 1 where the history row is a real token.
        scale: logit scale.
        capacity: the window C (query t sees rows t+1 .. t+C).
        config: a `KernelConfig` (block sizes, warps, interpret).

    Returns:
        `(out [B, T, H, V] float32, lse [B, H, T] float32)`.
    """
    return _forward(qw, kw, v, mask, scale, capacity, config)


def _window_fwd(qw, kw, v, mask, scale, capacity, config):
    out, lse = _forward(qw, kw, v, mask, scale, capacity, config)
    return (out, lse), (qw, kw, v, mask, out, lse)


def _window_bwd(scale, capacity, config, residuals, cotangents):
    qw, kw, v, mask, out, lse = residuals
    dout, dlse = cotangents
    delta = jnp.einsum("bthv,bthv->bht", out, dout) - dlse
    # The kernels feed dout to the tensor cores in the input dtype: casting
    # once here halves what every program that re-reads it loads.
    dout = dout.astype(v.dtype)
    dq, dk, dv = _backward(qw, kw, v, mask, dout, lse, delta, scale, capacity,
                           config)
    return (dq.astype(qw.dtype), dk.astype(kw.dtype), dv.astype(v.dtype),
            jnp.zeros_like(mask))


window_attention.defvjp(_window_fwd, _window_bwd)
