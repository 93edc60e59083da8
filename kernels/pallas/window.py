"""Sliding-window flash attention over NHA's history stream, in Pallas.

Query row t (of T) sees history rows t+1 .. t+C (C = the ring capacity, the
window) whose mask is set. The history is the state's ring, oldest first,
followed by the new tokens, so row t+C is token t itself. The slot pass's
normalised output and log-sum-exp seed the online softmax, so the pass
returns NHA's joint output and lse directly (no merge pass); its VJP is
flash attention's over the joint softmax (`delta = rowsum(o * do) - dlse`)
plus the cotangents of the seed.

Layouts stay Keras' `[B, T, H, D]`; the kv head of query head h is
`h // groups` through the index maps (no repeated keys or values). Inputs
must already be padded: T to a multiple of every query block size of
`window_blocks(config)`, the history length to a multiple of every history
block size, head dims to powers of two.
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
from keras_nha.kernels.pallas.common import window_blocks


def _visible(rows, cols, capacity, key_mask):
    """`[rows, cols]`: history row `col` is inside query `row`'s window."""
    return ((cols[None, :] > rows[:, None])
            & (cols[None, :] <= rows[:, None] + capacity)
            & (key_mask[None, :] > 0))


class _QueryBlock:
    """A program's query rows and the history blocks inside their windows.
    """

    def __init__(self, k_ref, v_ref, mask_ref, *, scale, capacity, block_q,
                 block_k, key_blocks):
        start = pl.program_id(0) * block_q
        self.refs = (k_ref, v_ref, mask_ref)
        self.rows = start + irange(block_q)
        self.scale, self.capacity, self.block_k = scale, capacity, block_k
        self.first = idiv(start + 1, block_k)
        self.last = jnp.minimum(idiv(start + block_q + capacity + block_k - 1,
                                     block_k), key_blocks)

    def scores(self, q, j):
        """History block j: keys, values, base-2 logits, visibility."""
        k_ref, v_ref, mask_ref = self.refs
        keys = pl.ds(j * self.block_k, self.block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = dot(q, k, trans_b=True) * (self.scale * LOG2E)
        visible = _visible(self.rows, j * self.block_k + irange(self.block_k),
                           self.capacity, mask_ref[keys])
        return k, v, logits, visible


def _forward_kernel(q_ref, k_ref, v_ref, mask_ref, *refs, scale, capacity,
                    block_q, block_k, key_blocks, seeded):
    if seeded:
        prior_o_ref, prior_lse_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    q = q_ref[...]
    block = _QueryBlock(k_ref, v_ref, mask_ref, scale=scale,
                        capacity=capacity, block_q=block_q, block_k=block_k,
                        key_blocks=key_blocks)

    def body(j, carry):
        acc, top, total = carry
        _, v, logits, visible = block.scores(q, j)
        logits = jnp.where(visible, logits, MASKED)
        new_top = jnp.maximum(top, jnp.max(logits, axis=1))
        correction = jnp.exp2(top - new_top)
        weights = jnp.exp2(logits - new_top[:, None])
        total = total * correction + jnp.sum(weights, axis=1)
        acc = acc * correction[:, None] + dot(weights.astype(v.dtype), v)
        return acc, new_top, total

    if seeded:  # the prior (normalised output, lse) counts as one entry
        acc = prior_o_ref[...].astype(jnp.float32)
        top = prior_lse_ref[...] * LOG2E
        total = jnp.ones((block_q,), jnp.float32)
    else:
        acc = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)
        top = jnp.full((block_q,), -jnp.inf, jnp.float32)
        total = jnp.zeros((block_q,), jnp.float32)
    acc, top, total = loop(block.first, block.last, body, (acc, top, total))
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (top + jnp.log2(total)) * LN2


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, capacity, block_q, block_k, key_blocks):
    q = q_ref[...]
    do = do_ref[...].astype(q.dtype)
    lse = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    block = _QueryBlock(k_ref, v_ref, mask_ref, scale=scale,
                        capacity=capacity, block_q=block_q, block_k=block_k,
                        key_blocks=key_blocks)

    def body(j, dq):
        k, v, logits, visible = block.scores(q, j)
        probs = jnp.where(visible, jnp.exp2(logits - lse[:, None]), 0.0)
        dprobs = dot(do, v.astype(do.dtype), trans_b=True)
        dlogits = probs * (dprobs - delta[:, None])
        return dq + dot(dlogits.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = loop(block.first, block.last, body, dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_block_specs(block_q, history, key_dim, value_dim, groups):
    """Specs for programs (query block, batch, head): `rows(dim)` (the
    block's rows of a `[B, T, H, dim]` array), `per_row` (its entries of a
    `[B, H, T]` array) and the inputs `[q, k, v, mask]` (the whole history
    of the head's kv head)."""
    rows = lambda dim: pl.BlockSpec((None, block_q, None, dim),
                                    lambda i, b, h: (b, i, h, 0))
    history_rows = lambda dim: pl.BlockSpec(
        (None, history, None, dim), lambda i, b, h: (b, 0, h // groups, 0))
    per_row = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    inputs = [rows(key_dim), history_rows(key_dim), history_rows(value_dim),
              pl.BlockSpec((None, history), lambda i, b, h: (b, 0))]
    return rows, per_row, inputs


def window_forward(qw, kw, v, mask, prior, scale, capacity, config):
    """The forward kernel: `(out in qw's dtype, lse f32)`; `prior`, if given,
    is `(out_s f32, lse_s f32)` seeding the online softmax."""
    batch, length, heads, key_dim = qw.shape
    history, kv_heads, value_dim = kw.shape[1], kw.shape[2], v.shape[-1]
    groups = heads // kv_heads
    block_q, block_k = config.block_q, config.block_k
    kernel = functools.partial(
        _forward_kernel, scale=scale, capacity=capacity, block_q=block_q,
        block_k=block_k, key_blocks=history // block_k,
        seeded=prior is not None)
    rows, per_row, inputs = _query_block_specs(block_q, history, key_dim,
                                               value_dim, groups)
    return pl.pallas_call(
        kernel,
        grid=(length // block_q, batch, heads),
        in_specs=inputs + ([] if prior is None
                           else [rows(value_dim), per_row]),
        out_specs=[rows(value_dim), per_row],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, value_dim),
                                 qw.dtype),
            jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
        ],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=config.interpret,
        name="nha_window_forward",
    )(qw, kw, v, mask, *(() if prior is None else prior))


def window_gradients(qw, kw, v, mask, do, lse, delta, scale, capacity,
                     config):
    """dq, dk, dv in the inputs' dtypes (accumulated in float32; storing
    them narrow saves a float32 round trip through memory).

    Probabilities are exp(logit - lse) and logit gradients p * (dp - delta)
    with dp from `do` (in the inputs' dtype): with the joint NHA lse, delta
    and output cotangent, this is the joint softmax's gradient.
    """
    batch, length, heads, key_dim = qw.shape
    history, kv_heads, value_dim = kw.shape[1], kw.shape[2], v.shape[-1]
    groups = heads // kv_heads
    _, (block_q, block_k), (dkv_block_q, dkv_block_k) = window_blocks(config)
    params = compiler_params(config.num_warps, config.num_stages)
    rows, per_row, inputs = _query_block_specs(block_q, history, key_dim,
                                               value_dim, groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, capacity=capacity,
                          block_q=block_q, block_k=block_k,
                          key_blocks=history // block_k),
        grid=(length // block_q, batch, heads),
        in_specs=inputs + [rows(value_dim), per_row, per_row],
        out_specs=rows(key_dim),
        out_shape=jax.ShapeDtypeStruct(qw.shape, qw.dtype),
        compiler_params=params,
        interpret=config.interpret,
        name="nha_window_dq",
    )(qw, kw, v, mask, do, lse, delta)
    block_q, block_k = dkv_block_q, dkv_block_k
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
        out_shape=[jax.ShapeDtypeStruct(kw.shape, kw.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_window_dkv",
    )(qw, kw, v, mask, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def window_attention(qw, kw, v, mask, scale, capacity, config):
    """Windowed attention over the history alone (NHA without slots).

    Args:
        qw: `[B, T, H, K]` window queries.
        kw: `[B, L, Hkv, K]` history window keys (L >= T + capacity).
        v: `[B, L, Hkv, V]` history values.
        mask: `[B, L]` float, 1 where the history row is a real token.
        scale: logit scale.
        capacity: the window C (query t sees rows t+1 .. t+C).
        config: a `KernelConfig` (block sizes, warps, interpret).

    Returns:
        `(out [B, T, H, V] in qw's dtype, lse [B, H, T] float32)`.
    """
    return window_forward(qw, kw, v, mask, None, scale, capacity, config)


def _window_fwd(qw, kw, v, mask, scale, capacity, config):
    out, lse = window_forward(qw, kw, v, mask, None, scale, capacity, config)
    return (out, lse), (qw, kw, v, mask, out, lse)


def _window_bwd(scale, capacity, config, residuals, cotangents):
    qw, kw, v, mask, out, lse = residuals
    dout, dlse = cotangents
    delta = jnp.einsum("bthv,bthv->bht", out.astype(jnp.float32),
                       dout.astype(jnp.float32)) - dlse
    # The kernels feed dout to the tensor cores in the input dtype: casting
    # once here halves what every program that re-reads it loads.
    dq, dk, dv = window_gradients(qw, kw, v, mask, dout.astype(v.dtype), lse,
                                  delta, scale, capacity, config)
    return dq, dk, dv, jnp.zeros_like(mask)


window_attention.defvjp(_window_fwd, _window_bwd)
