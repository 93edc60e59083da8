"""Sliding-window flash attention over NHA's history stream, in Pallas.

Query row t (of T) sees history rows t+1 .. t+C (C = the ring capacity, the
window) whose mask is set. The history is the state's ring, oldest first,
followed by the new tokens, so row t+C is token t itself. The slot pass's
normalised output and log-sum-exp seed the online softmax, so the pass
returns NHA's joint output and lse directly (no merge pass); its VJP is
flash attention's over the joint softmax (`delta = rowsum(o * do) - dlse`)
plus the cotangents of the seed.

The history may come in two parts (`kw`, `v` and `mask` as `(ring, new)`
tuples, `KernelConfig.split_history`): the ring, front-padded to a whole
number of blocks, and the new tokens themselves, so that no copy of the
new keys and values is ever made. Query t then sees history rows t+s+1 ..
t+s+C with s the ring part's front padding; the kernels walk each part's
blocks with that part's refs. A one-part tuple `(new,)` is a fresh
sequence's history (an empty ring): s = -C, query t sees new rows
t-C+1 .. t.

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


def _part_blocks(parts, block_k):
    """`(first history block, block count)` of each history part."""
    spans, first = [], 0
    for rows in parts:
        spans.append((first, rows // block_k))
        first += rows // block_k
    return tuple(spans)


class _QueryBlock:
    """A program's query rows and the history blocks inside their windows.

    `refs` holds `(k_ref, v_ref, mask_ref)` per history part, `spans` each
    part's `(first block, block count)`, `shift` the rows by which query t's
    window starts after history row t.
    """

    def __init__(self, refs, spans, *, scale, capacity, shift, block_q,
                 block_k, interior=False):
        start = pl.program_id(0) * block_q + shift
        self.refs, self.spans, self.interior = refs, spans, interior
        self.rows = start + irange(block_q)
        self.scale, self.capacity, self.block_k = scale, capacity, block_k
        self.first = idiv(start + 1, block_k)
        self.last = jnp.minimum(
            idiv(start + block_q + capacity + block_k - 1, block_k),
            spans[-1][0] + spans[-1][1])
        if interior:
            # Blocks inside every row's window: start + block_q <= j *
            # block_k and (j + 1) * block_k - 1 <= start + capacity.
            self.inner = _interior_range(
                start + block_q + block_k - 1, start + capacity - block_k + 1,
                block_k, self.first, self.last)

    def scores(self, q, j, part, inner=False):
        """History block j (of part `part`): keys, values, base-2 logits,
        visibility (`inner`: a block inside every row's window, where only
        the key mask applies)."""
        k_ref, v_ref, mask_ref = self.refs[part]
        keys = pl.ds((j - self.spans[part][0]) * self.block_k, self.block_k)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        logits = dot(q, k, trans_b=True) * (self.scale * LOG2E)
        if inner:
            return k, v, logits, mask_ref[keys][None, :] > 0
        visible = _visible(self.rows, j * self.block_k + irange(self.block_k),
                           self.capacity, mask_ref[keys])
        return k, v, logits, visible

    def loop(self, body, carry):
        """`body(j, carry, part=, inner=)` over the visible blocks, part by
        part; with `interior`, the inner blocks in a loop of their own."""
        if self.interior:
            low, high = self.inner
            ranges = ((self.first, low, False), (low, high, True),
                      (high, self.last, False))
        else:
            ranges = ((self.first, self.last, False),)
        for part, (first, count) in enumerate(self.spans):
            for lower, upper, inner in ranges:
                carry = loop(jnp.maximum(lower, first),
                             jnp.minimum(upper, first + count),
                             functools.partial(body, part=part, inner=inner),
                             carry)
        return carry


def _interior_range(lowest, highest, block, first, last):
    """Blocks `[low, high)` with `lowest // block <= j <= highest // block`
    (callers round `lowest` up), clipped to `[first, last)`; empty when
    `highest` < 0."""
    low = jnp.minimum(jnp.maximum(idiv(lowest, block), first), last)
    high = jnp.where(highest >= 0, idiv(jnp.maximum(highest, 0), block) + 1,
                     low)
    return low, jnp.minimum(jnp.maximum(high, low), last)


def _split_refs(refs, parts):
    """`((k_ref, v_ref, mask_ref) per part, the other refs)`."""
    grouped = tuple(tuple(refs[3 * i:3 * i + 3]) for i in range(parts))
    return grouped, refs[3 * parts:]


def _forward_kernel(q_ref, *refs, scale, capacity, shift, block_q, block_k,
                    spans, seeded, interior):
    history, refs = _split_refs(refs, len(spans))
    if seeded:
        prior_o_ref, prior_lse_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    q = q_ref[...]
    block = _QueryBlock(history, spans, scale=scale, capacity=capacity,
                        shift=shift, block_q=block_q, block_k=block_k,
                        interior=interior)

    def body(j, carry, part, inner):
        acc, top, total = carry
        _, v, logits, visible = block.scores(q, j, part, inner)
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
        acc = jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32)
        top = jnp.full((block_q,), -jnp.inf, jnp.float32)
        total = jnp.zeros((block_q,), jnp.float32)
    acc, top, total = block.loop(body, (acc, top, total))
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (top + jnp.log2(total)) * LN2


def _dq_kernel(q_ref, *refs, scale, capacity, shift, block_q, block_k,
               spans, interior):
    # After do, lse and delta: the slots' dq of the same queries, if given.
    history, (do_ref, lse_ref, delta_ref, *slot_dq, dq_ref) = _split_refs(
        refs, len(spans))
    q = q_ref[...]
    do = do_ref[...].astype(q.dtype)
    lse = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    block = _QueryBlock(history, spans, scale=scale, capacity=capacity,
                        shift=shift, block_q=block_q, block_k=block_k,
                        interior=interior)

    def body(j, dq, part, inner):
        k, v, logits, visible = block.scores(q, j, part, inner)
        probs = jnp.where(visible, jnp.exp2(logits - lse[:, None]), 0.0)
        dprobs = dot(do, v.astype(do.dtype), trans_b=True)
        dlogits = probs * (dprobs - delta[:, None])
        return dq + dot(dlogits.astype(k.dtype), k)

    dq = block.loop(body, jnp.zeros(q.shape, jnp.float32)) * scale
    if slot_dq:
        dq = dq + slot_dq[0][...].astype(jnp.float32)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
                *refs, scale, capacity, shift, block_q, block_k,
                first_block, query_blocks, groups, interior, fed):
    # With `fed` = (lag in blocks, blocks, names), refs start with the
    # slots' gradients (fed coordinates: "dk", "dv" as named) of this
    # block's keys / values: add them (none where they were never fed).
    *fed_refs, dk_ref, dv_ref = refs
    # The program's history rows, counted from the first part's first row.
    start = (pl.program_id(0) + first_block) * block_k
    k = k_ref[...]
    v = v_ref[...]
    cols = start + irange(block_k)
    key_mask = mask_ref[...]
    # Queries t with t + shift + 1 <= col <= t + shift + capacity (none
    # for the ring's front padding: the last bound's division truncates).
    first = idiv(jnp.maximum(start - shift - capacity, 0), block_q)
    last = jnp.minimum(idiv(start - shift + block_k - 1 + block_q - 1,
                            block_q), query_blocks)
    if interior:  # query blocks whose every row sees every column
        low, high = _interior_range(
            start + block_k - 1 - capacity - shift + block_q - 1,
            start - shift - block_q, block_q, first, last)
        ranges = ((first, low, False), (low, high, True), (high, last, False))
    else:
        ranges = ((first, last, False),)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):
        def body(i, carry, g, inner):
            dk, dv = carry
            queries = pl.ds(i * block_q, block_q)
            q = q_ref[queries, g, :]
            do = do_ref[queries, g, :].astype(q.dtype)
            lse = lse_ref[g, queries] * LOG2E
            delta = delta_ref[g, queries]
            rows = i * block_q + shift + irange(block_q)
            logits = dot(k, q, trans_b=True) * (scale * LOG2E)  # [keys, q]
            visible = key_mask[:, None] > 0
            if not inner:
                visible = (visible & (cols[:, None] > rows[None, :])
                           & (cols[:, None] <= rows[None, :] + capacity))
            probs = jnp.where(visible, jnp.exp2(logits - lse[None, :]), 0.0)
            dv = dv + dot(probs.astype(do.dtype), do)
            dprobs = dot(v.astype(do.dtype), do, trans_b=True)
            dlogits = probs * (dprobs - delta[None, :])
            dk = dk + dot(dlogits.astype(q.dtype), q)
            return dk, dv
        for lower, upper, inner in ranges:
            dk, dv = loop(lower, upper, functools.partial(
                body, g=g, inner=inner), (dk, dv))
    dk = dk * scale
    if fed_refs:
        was_fed = pl.program_id(0) + fed[0] < fed[1]
        slot = {name: jnp.where(was_fed, ref[...].astype(jnp.float32), 0.0)
                for name, ref in zip(fed[2], fed_refs)}
        dk = dk + slot.get("dk", 0.0)
        dv = dv + slot.get("dv", 0.0)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(config):
    return compiler_params(config.window_warps or config.num_warps,
                           config.num_stages)


def _parts(x):
    """The history parts of `x`: a `(ring, new)` tuple or one array."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _shift(kw, capacity):
    """Rows between query t's own history row and t + capacity: the ring
    part's front padding (0 for one array; -capacity for a one-part tuple,
    the new tokens of a fresh sequence, whose ring is empty)."""
    if not isinstance(kw, (tuple, list)):
        return 0
    ring_rows = kw[0].shape[1] if len(kw) > 1 else 0
    return ring_rows - capacity


def _history_inputs(kw, v, mask):
    """`(k, v, mask)` per part, flat, and each part's row count."""
    parts = list(zip(_parts(kw), _parts(v), _parts(mask)))
    return [x for part in parts for x in part], [k.shape[1] for k, _, _ in
                                                 parts]


def _query_block_specs(block_q, rows_per_part, key_dim, value_dim, groups):
    """Specs for programs (query block, batch, head): `rows(dim)` (the
    block's rows of a `[B, T, H, dim]` array), `per_row` (its entries of a
    `[B, H, T]` array) and the inputs `[q, (k, v, mask) per part]` (each
    part's whole history of the head's kv head)."""
    rows = lambda dim: pl.BlockSpec((None, block_q, None, dim),
                                    lambda i, b, h: (b, i, h, 0))
    history_rows = lambda history, dim: pl.BlockSpec(
        (None, history, None, dim), lambda i, b, h: (b, 0, h // groups, 0))
    per_row = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    inputs = [rows(key_dim)]
    for history in rows_per_part:
        inputs += [history_rows(history, key_dim),
                   history_rows(history, value_dim),
                   pl.BlockSpec((None, history), lambda i, b, h: (b, 0))]
    return rows, per_row, inputs


def window_forward(qw, kw, v, mask, prior, scale, capacity, config):
    """The forward kernel: `(out in qw's dtype, lse f32)`; `prior`, if given,
    is `(out_s f32, lse_s f32)` seeding the online softmax. `kw`, `v` and
    `mask` are arrays or `(ring, new)` tuples (module docstring)."""
    batch, length, heads, key_dim = qw.shape
    history, rows_per_part = _history_inputs(kw, v, mask)
    kv_heads, value_dim = history[0].shape[2], history[1].shape[-1]
    groups = heads // kv_heads
    block_q, block_k = config.block_q, config.block_k
    kernel = functools.partial(
        _forward_kernel, scale=scale, capacity=capacity,
        shift=_shift(kw, capacity), block_q=block_q, block_k=block_k,
        spans=_part_blocks(rows_per_part, block_k), seeded=prior is not None,
        interior=config.window_interior)
    rows, per_row, inputs = _query_block_specs(block_q, rows_per_part,
                                               key_dim, value_dim, groups)
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
        compiler_params=_params(config),
        interpret=config.interpret,
        name="nha_window_forward",
    )(qw, *history, *(() if prior is None else prior))


def accepts_slot_grads(kw, lag, config):
    """Whether `window_gradients` can add the slots' gradients
    (`slot_grads`): a fresh sequence's history (one part), fed `lag` rows
    later, whole dk/dv blocks."""
    return (isinstance(kw, (tuple, list)) and len(kw) == 1 and lag > 0
            and lag % window_blocks(config)[2][1] == 0)


def window_gradients(qw, kw, v, mask, do, lse, delta, scale, capacity,
                     config, slot_grads=None, lag=0):
    """dq, dk, dv in the inputs' dtypes (accumulated in f32 inside; storing
    them narrow saves a float32 round trip through memory); dk and dv are
    `(ring, new)` tuples when the history is.

    `slot_grads`: the slots' gradients of the same arrays, added here (one
    pass instead of an add after): {"dq": in the queries' rows, "dk",
    "dv": in the fed stream's, `lag` rows later (`accepts_slot_grads`)}.

    Probabilities are exp(logit - lse) and logit gradients p * (dp - delta)
    with dp from `do` (in the inputs' dtype): with the joint NHA lse, delta
    and output cotangent, this is the joint softmax's gradient.
    """
    slot_grads = slot_grads or {}
    batch, length, heads, key_dim = qw.shape
    history, rows_per_part = _history_inputs(kw, v, mask)
    kv_heads, value_dim = history[0].shape[2], history[1].shape[-1]
    groups = heads // kv_heads
    shift = _shift(kw, capacity)
    _, (block_q, block_k), (dkv_block_q, dkv_block_k) = window_blocks(config)
    params = _params(config)
    rows, per_row, inputs = _query_block_specs(block_q, rows_per_part,
                                               key_dim, value_dim, groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, capacity=capacity,
                          shift=shift, block_q=block_q, block_k=block_k,
                          spans=_part_blocks(rows_per_part, block_k),
                          interior=config.window_interior),
        grid=(length // block_q, batch, heads),
        in_specs=inputs + [rows(value_dim), per_row, per_row]
        + [rows(key_dim)] * ("dq" in slot_grads),
        out_specs=rows(key_dim),
        out_shape=jax.ShapeDtypeStruct(qw.shape, qw.dtype),
        compiler_params=params,
        interpret=config.interpret,
        name="nha_window_dq",
    )(qw, *history, do, lse, delta, *([slot_grads["dq"]]
                                      if "dq" in slot_grads else []))
    block_q, block_k = dkv_block_q, dkv_block_k
    by_group = lambda dim: pl.BlockSpec((None, length, groups, dim),
                                        lambda j, b, c: (b, 0, c, 0))
    per_group = pl.BlockSpec((None, groups, length), lambda j, b, c: (b, c, 0))
    by_block = lambda dim: pl.BlockSpec((None, block_k, None, dim),
                                        lambda j, b, c: (b, j, c, 0))
    names = tuple(n for n in ("dk", "dv") if n in slot_grads)
    fed = (lag // block_k, length // block_k, names) if names else None
    fed_specs = [pl.BlockSpec(
        (None, block_k, None, slot_grads[n].shape[-1]),
        lambda j, b, c: (b, jnp.minimum(j + fed[0], fed[1] - 1), c, 0))
        for n in names]
    fed_args = [slot_grads[n] for n in names]
    grads = []
    for (first, count), (part_k, part_v, part_mask) in zip(
            _part_blocks(rows_per_part, block_k),
            zip(history[0::3], history[1::3], history[2::3])):
        grads.append(pl.pallas_call(
            functools.partial(_dkv_kernel, scale=scale, capacity=capacity,
                              shift=shift, block_q=block_q, block_k=block_k,
                              first_block=first,
                              query_blocks=length // block_q, groups=groups,
                              interior=config.window_interior,
                              fed=fed),
            grid=(count, batch, kv_heads),
            in_specs=[by_group(key_dim), by_block(key_dim),
                      by_block(value_dim),
                      pl.BlockSpec((None, block_k), lambda j, b, c: (b, j)),
                      by_group(value_dim), per_group, per_group]
            + fed_specs,
            out_specs=[by_block(key_dim), by_block(value_dim)],
            out_shape=[jax.ShapeDtypeStruct(part_k.shape, part_k.dtype),
                       jax.ShapeDtypeStruct(part_v.shape, part_v.dtype)],
            compiler_params=params,
            interpret=config.interpret,
            name="nha_window_dkv",
        )(qw, part_k, part_v, part_mask, do, lse, delta, *fed_args))
    if not isinstance(kw, (tuple, list)):
        return (dq,) + tuple(grads[0])
    return dq, tuple(dk for dk, _ in grads), tuple(dv for _, dv in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def window_attention(qw, kw, v, mask, scale, capacity, config):
    """Windowed attention over the history alone (NHA without slots).

    Args:
        qw: `[B, T, H, K]` window queries.
        kw: `[B, L, Hkv, K]` history window keys (L >= T + capacity), or
            `(ring, new)` parts (module docstring).
        v: `[B, L, Hkv, V]` history values, parted as `kw`.
        mask: `[B, L]` float, 1 where the history row is a real token,
            parted as `kw`.
        scale: logit scale.
        capacity: the window C (query t sees rows t+1 .. t+C, after the
            ring part's front padding with parts).
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
    dq, dk, dv = window_gradients(qw, kw, v, mask,
                                  dout.astype(_parts(v)[0].dtype), lse,
                                  delta, scale, capacity, config)
    return dq, dk, dv, jax.tree.map(jnp.zeros_like, mask)


window_attention.defvjp(_window_fwd, _window_bwd)
