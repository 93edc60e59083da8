"""NHA slot memory (GSA over the token-shifted stream) in Pallas.

Per kv head, with fed keys k_i, values v_i, log gates g_i (0 where nothing
enters), s_i = 1 - exp(g_i) and start memory (Sk0, Sv0):

    Sk_t = exp(g_t) * Sk_{t-1} + outer(k_t, s_t)     [K, M]
    Sv_t = exp(g_t) * Sv_{t-1} + outer(s_t, v_t)     [M, V]
    z_t  = scale * q_t @ Sk_t,  p_t = softmax(z_t),  o_t = p_t @ Sv_t

The pass returns the slot-normalised `o` and `lse = logsumexp(z)`; the caller
merges it with the window pass. With G the chunk-local inclusive cumsum of g,
the write of token i reaches the reader at t >= i with weight
exp(G_t - G_i) s_i per slot. Every exponent the exact terms take is <= 0,
so no gate magnitude can overflow:

- chunk start memory, read at t through exp(G_t);
- writes from earlier 16-row sub-blocks, factored around the last row r of
  the earlier part: exp(G_t - G_r) * exp(G_r - G_i) with i <= r < t, two
  matrix products on the tensor cores;
- writes inside the reader's own sub-block, exact, one token at a time.

Two ways to carry the memory from chunk to chunk (`KernelConfig.walk`):
"loop": `_keys_states` / `_values_states` walk the chunks (one program per
state column tile), each step computing the chunk's writes; "scan": every
chunk's writes at once as batched matrix products (XLA), then `_scan`, a
walk that only scales and adds (its loads do not depend on the carry), and
stores the memory at chunk starts in the input dtype. The reader programs
(`_forward_kernel`, per `KernelConfig.rows` query rows and query head; a
whole chunk loads the chunk's state once) give o and lse. With a whole
chunk per program and `KernelConfig.factor`, a chunk whose cumsums stay
above -40 takes factored products exp(G_t - G_i) = exp(G_t) * exp(-G_i)
(a handful of [c, c] / [c, M] matrix products per chunk, `_Chunk`); other
chunks take the exact sub-block terms above (`lax.cond` per chunk).

Backward: `_dq_kernel` recomputes p and gives dz, dq and the readers' part
of dL/dG; `_keys_adjoint` / `_values_adjoint` (or the reverse `_scan`) walk
the chunks backwards storing dL/dS at every chunk end; `_dkv_kernel` gives
dk, dv and dL/ds. The gate gradient then is a reverse cumsum (readers at t
carry exp(G_t), writers at i carry exp(-G_i)):

    dL/dg_t = sum_{tau >= t} (dz*z + p*p_grad - ds*s)_tau - ds_t * exp(g_t)

with p_grad = dL/dp. The sum inside a chunk is a triangular matrix product
(XLA's GPU cumsum is a log-depth scan); the sum over later chunks is
<adjoint, memory> at the chunk's end (`_after_chunks`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from keras_nha.kernels.pallas import gates
from keras_nha.kernels.pallas.chunk_states import fused_adjoints
from keras_nha.kernels.pallas.chunk_states import fused_states
from keras_nha.kernels.pallas.chunk_states import walk as _walk
from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import dot
from keras_nha.kernels.pallas.common import dot_ta
from keras_nha.kernels.pallas.common import irange
from keras_nha.kernels.pallas.common import loop
from keras_nha.kernels.pallas.common import pad_axis

_F32 = jnp.float32


def _mm(a, b, dtype, trans_b=False):
    """Product of float32 factors, fed to the tensor cores in `dtype`."""
    return dot(a.astype(dtype), b.astype(dtype), trans_b=trans_b)


def _own_block(gc_rows, gc_i, i):
    """exp(G_t - G_i) for the block's rows t >= i, else 0."""
    rows = irange(gc_rows.shape[0])
    return jnp.exp(jnp.where(rows[:, None] >= i, gc_rows - gc_i[None, :],
                             -jnp.inf))


class _SubBlock:
    """Gate factors of one `sub`-row block of readers inside its chunk."""

    def __init__(self, gc_ref, s_ref, start, sub, chunk):
        self.start = start
        self.rows = pl.ds(self.start, sub)
        self.gc = gc_ref[self.rows, :]
        self.s = s_ref[self.rows, :]
        ref = gc_ref[jnp.maximum(self.start - 1, 0), :]
        earlier = (irange(chunk) < self.start)[:, None]
        # Earlier writers, brought to the reference row r = start - 1.
        self.writers = jnp.where(earlier, s_ref[...] * jnp.exp(
            jnp.where(earlier, ref[None, :] - gc_ref[...], 0.0)), 0.0)
        self.from_ref = jnp.exp(self.gc - ref[None, :])
        self.from_start = jnp.exp(self.gc)


def _block_start(program, b, blocks, sub, chunk):
    """First in-chunk row of sub-block `b` of program `program`'s `blocks`.

    The program id is read at the kernel's top level: the interpreter cannot
    read it inside a `lax.cond` branch.
    """
    return lax.rem(program * blocks + b, jnp.int32(chunk // sub)) * sub


def _own_block_weights(gc, s):
    """`[t, i, m]`: exp(G_t - G_i) * s_i for writers i <= t of one block."""
    size = gc.shape[0]
    causal = (irange(size)[:, None, None] >= irange(size)[None, :, None])
    return jnp.exp(jnp.where(causal, gc[:, None, :] - gc[None, :, :],
                             -jnp.inf)) * s[None, :, :]


def _readout_terms(q, do, k_ref, v_ref, gc_ref, s_ref, sk, sv, block, sub,
                   diag):
    """Slot logits before `scale` and, if `do` is given, dL/dp, for a block.

    `diag` picks how the block's own writers are added: "tensor" (one
    `[rows, rows, M]` tensor) or "loop" (one writer at a time).
    """
    dtype = q.dtype
    z = (_mm(q, sk, dtype) * block.from_start
         + block.from_ref * _mm(_mm(q, k_ref[...], dtype, trans_b=True),
                                block.writers, dtype))
    if do is None:
        dp = jnp.zeros_like(z)
    else:
        dp = (_mm(do, sv, dtype, trans_b=True) * block.from_start
              + block.from_ref * _mm(_mm(do, v_ref[...], dtype, trans_b=True),
                                     block.writers, dtype))
    if diag == "tensor":
        own = _own_block_weights(block.gc, block.s)
        qk = dot(q, k_ref[block.rows, :].astype(dtype), trans_b=True)
        z = z + jnp.sum(qk[:, :, None] * own, axis=1)
        if do is not None:
            dov = dot(do.astype(dtype), v_ref[block.rows, :].astype(dtype),
                      trans_b=True)
            dp = dp + jnp.sum(dov[:, :, None] * own, axis=1)
        return z, dp
    qf = q.astype(_F32)
    dof = None if do is None else do.astype(_F32)

    def body(i, carry):
        z, dp = carry
        row = block.start + i
        weight = _own_block(block.gc, gc_ref[row, :], i) * s_ref[row, :][
            None, :]
        z = z + jnp.sum(qf * k_ref[row, :].astype(_F32)[None, :], axis=1)[
            :, None] * weight
        if do is not None:
            dp = dp + jnp.sum(dof * v_ref[row, :].astype(_F32)[None, :],
                              axis=1)[:, None] * weight
        return z, dp

    return loop(0, sub, body, (z, dp))


def _spread(weights, rows_ref, gc_ref, s_ref, block, sub, dtype, diag):
    """sum_i (sum_m weights[t, m] * reach[t, i, m]) * rows[i], reach as above.

    The transpose of `_readout_terms`: slot readout (weights = p, rows = v)
    and dq (weights = dz, rows = k).
    """
    out = _mm(_mm(weights * block.from_ref, block.writers, dtype,
                  trans_b=True), rows_ref[...], dtype)
    if diag == "tensor":
        own = _own_block_weights(block.gc, block.s)
        mix = jnp.sum(weights[:, None, :] * own, axis=2)
        return out + _mm(mix, rows_ref[block.rows, :], dtype)

    def body(i, out):
        row = block.start + i
        weight = _own_block(block.gc, gc_ref[row, :], i) * s_ref[row, :][
            None, :]
        mix = jnp.sum(weights * weight, axis=1)
        return out + mix[:, None] * rows_ref[row, :].astype(_F32)[None, :]

    return loop(0, sub, body, out)


def _slot_mask(z, num_slots):
    return (irange(z.shape[1]) < num_slots)[None, :]


# Chunks whose gates decay by less than exp(-_FACTOR_LIMIT) use factored
# products exp(G_t - G_i) = exp(G_t) * exp(-G_i): every factor lies within
# exp(+-40) ~ 1e+-17, far inside the float32 / bfloat16 range (not
# float16's), leaving room for small gradients times exp(-40).
_FACTOR_LIMIT = 40.0


def _factored_ok(gc_ref, chunk):
    """Whether the chunk's gate cumsums allow factored products.

    G is a running sum of log gates <= 0, so its last row is its minimum.
    """
    return jnp.min(gc_ref[chunk - 1, :]) > -_FACTOR_LIMIT


class _Chunk:
    """Gate factors of a whole chunk, around its start (see `_factored_ok`).

    A write of token i reaches reader t >= i with exp(G_t) * writers[i].
    """

    def __init__(self, gc_ref, s_ref):
        gc = gc_ref[...]
        self.from_start = jnp.exp(gc)
        self.writers = s_ref[...] * jnp.exp(-gc)
        self.causal = irange(gc.shape[0])[:, None] >= irange(gc.shape[0])[
            None, :]

    def pairs(self, a, b, dtype):
        """`[t, i]`: a_t . b_i for readers t >= writers i, else 0."""
        return jnp.where(self.causal, dot(a.astype(dtype), b.astype(dtype),
                                          trans_b=True), 0.0)


def _slot_softmax(z, num_slots, scale):
    z = jnp.where(_slot_mask(z, num_slots), z * scale, -jnp.inf)
    top = jnp.max(z, axis=1)
    weights = jnp.exp(z - top[:, None])
    total = jnp.sum(weights, axis=1)
    return weights / total[:, None], top + jnp.log(total)


def _branch(factored, ok, fast, exact, branch="both"):
    """`fast()` where `ok` allows it (a traced scalar), else `exact()`.

    `branch` "fast" runs the factored side everywhere, "exact" the exact
    side where `ok` is False: the two calls of `KernelConfig.exact_pass`.
    """
    if not factored:
        exact()
    elif branch == "both":
        lax.cond(ok, fast, exact)
    elif branch == "fast":  # the exact call overwrites the other chunks
        fast()
    else:
        pl.when(jnp.logical_not(ok))(exact)


def _forward_kernel(q_ref, k_ref, v_ref, gc_ref, s_ref, sk_ref, sv_ref, o_ref,
                    lse_ref, *, scale, num_slots, chunk, sub, diag, factored,
                    branch="both", program=None):
    program = pl.program_id(0) if program is None else program
    blocks = q_ref.shape[0] // sub
    dtype = v_ref.dtype

    def exact():
        sk = sk_ref[...]
        sv = sv_ref[...]

        def sub_block(b, carry):  # the chunk's state is loaded once for all
            mine = pl.ds(b * sub, sub)
            start = _block_start(program, b, blocks, sub, chunk)
            block = _SubBlock(gc_ref, s_ref, start, sub, chunk)
            z, _ = _readout_terms(q_ref[mine, :], None, k_ref, v_ref, gc_ref,
                                  s_ref, sk, sv, block, sub, diag)
            p, lse_ref[mine] = _slot_softmax(z, num_slots, scale)
            o_ref[mine, :] = (_mm(p * block.from_start, sv, dtype)
                              + _spread(p, v_ref, gc_ref, s_ref, block, sub,
                                        dtype, diag)).astype(o_ref.dtype)
            return carry

        loop(0, blocks, sub_block, 0)

    def fast():
        f = _Chunk(gc_ref, s_ref)
        q = q_ref[...]
        z = f.from_start * (_mm(q, sk_ref[...], dtype) + _mm(
            f.pairs(q, k_ref[...], dtype), f.writers, dtype))
        p, lse_ref[...] = _slot_softmax(z, num_slots, scale)
        reach = p * f.from_start
        o_ref[...] = (_mm(reach, sv_ref[...], dtype)
                      + _mm(f.pairs(reach, f.writers, dtype), v_ref[...],
                            dtype)).astype(o_ref.dtype)

    _branch(factored, _factored_ok(gc_ref, chunk) if factored else None,
            fast, exact, branch)


def _dq_kernel(q_ref, k_ref, v_ref, gc_ref, s_ref, sk_ref, sv_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dz_ref, p_ref, x_ref, *, scale,
               num_slots, chunk, sub, diag, factored, branch="both",
               program=None):
    program = pl.program_id(0) if program is None else program
    blocks = q_ref.shape[0] // sub
    dtype = q_ref.dtype

    def finish(mine, z, dp):
        """p, dz and the readers' dL/dG from the unscaled logits."""
        real = _slot_mask(z, num_slots)
        z = jnp.where(real, z * scale, 0.0)
        p = jnp.where(real, jnp.exp(z - lse_ref[mine][:, None]), 0.0)
        dz = p * (dp - delta_ref[mine][:, None])
        dz_ref[mine, :] = dz.astype(dz_ref.dtype)
        p_ref[mine, :] = p.astype(p_ref.dtype)
        # dL/dG_t from the readers at t (each carries the factor exp(G_t)).
        x_ref[mine, :] = dz * z + p * dp
        return dz

    def exact():
        sk = sk_ref[...]
        sv = sv_ref[...]

        def sub_block(b, carry):
            mine = pl.ds(b * sub, sub)
            start = _block_start(program, b, blocks, sub, chunk)
            block = _SubBlock(gc_ref, s_ref, start, sub, chunk)
            z, dp = _readout_terms(q_ref[mine, :], do_ref[mine, :], k_ref,
                                   v_ref, gc_ref, s_ref, sk, sv, block, sub,
                                   diag)
            dz = finish(mine, z, dp)
            dq = (_mm(dz * block.from_start, sk, dtype, trans_b=True)
                  + _spread(dz, k_ref, gc_ref, s_ref, block, sub, dtype,
                            diag))
            dq_ref[mine, :] = (dq * scale).astype(dq_ref.dtype)
            return carry

        loop(0, blocks, sub_block, 0)

    def fast():
        f = _Chunk(gc_ref, s_ref)
        q, do, k, sk = q_ref[...], do_ref[...], k_ref[...], sk_ref[...]
        z = f.from_start * (_mm(q, sk, dtype) + _mm(f.pairs(q, k, dtype),
                                                    f.writers, dtype))
        dp = f.from_start * (
            _mm(do, sv_ref[...], dtype, trans_b=True)
            + _mm(f.pairs(do, v_ref[...], dtype), f.writers, dtype))
        reach = finish(pl.ds(0, q.shape[0]), z, dp) * f.from_start
        dq = (_mm(reach, sk, dtype, trans_b=True)
              + _mm(f.pairs(reach, f.writers, dtype), k, dtype))
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

    _branch(factored, _factored_ok(gc_ref, chunk) if factored else None,
            fast, exact, branch)


def _dkv_kernel(k_ref, v_ref, gcb_ref, s_ref, gc_ref, lk_ref, lv_ref, q_ref,
                dz_ref, p_ref, do_ref, dk_ref, dv_ref, ds_ref, *, scale, chunk,
                sub, groups, diag, factored, branch="both", program=None):
    program = pl.program_id(0) if program is None else program
    blocks = k_ref.shape[0] // sub

    def exact():
        lk = lk_ref[...]
        lv = lv_ref[...]

        def sub_block(b, carry):  # the chunk's adjoints are loaded once
            mine = pl.ds(b * sub, sub)
            start = _block_start(program, b, blocks, sub, chunk)
            dk, dv, ds = _dkv_block(
                k_ref[mine, :], v_ref[mine, :], gcb_ref[mine, :],
                s_ref[mine, :], start, gc_ref, lk, lv, q_ref, dz_ref, p_ref,
                do_ref, scale=scale, chunk=chunk, sub=sub, groups=groups,
                diag=diag)
            dk_ref[mine, :] = dk.astype(dk_ref.dtype)
            dv_ref[mine, :] = dv.astype(dv_ref.dtype)
            ds_ref[mine, :] = ds
            return carry

        loop(0, blocks, sub_block, 0)

    def fast():
        # The program holds the whole chunk: gcb_ref is gc_ref's block.
        f = _Chunk(gc_ref, s_ref)
        k, v, s = k_ref[...], v_ref[...], s_ref[...]
        dtype = k.dtype
        gc = gc_ref[...]
        lk, lv = lk_ref[...], lv_ref[...]
        # Readers after the chunk, through the stored adjoint at its end.
        to_end = jnp.exp(gc_ref[chunk - 1, :][None, :] - gc)
        dk = _mm(s * to_end, lk, dtype, trans_b=True)
        dv = _mm(s * to_end, lv, dtype)
        ds = to_end * (_mm(k, lk, dtype) + _mm(v, lv, dtype, trans_b=True))
        inside = jnp.zeros_like(ds)
        for g in range(groups):
            q, do = q_ref[:, g, :], do_ref[:, g, :]
            by_key = dz_ref[:, g, :] * f.from_start * scale
            by_value = p_ref[:, g, :] * f.from_start
            inside = (inside
                      + dot_ta(f.pairs(q, k, dtype).astype(dtype),
                               by_key.astype(dtype))
                      + dot_ta(f.pairs(do, v, dtype).astype(dtype),
                               by_value.astype(dtype)))
            dk = dk + dot_ta(f.pairs(by_key, f.writers, dtype).astype(dtype),
                             q.astype(dtype))
            dv = dv + dot_ta(f.pairs(by_value, f.writers, dtype).astype(
                dtype), do.astype(dtype))
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)
        ds_ref[...] = ds + inside * jnp.exp(-gc)

    _branch(factored, _factored_ok(gc_ref, chunk) if factored else None,
            fast, exact, branch)


def _dkv_block(k, v, gcb, s, start, gc_ref, lk, lv, q_ref, dz_ref, p_ref,
               do_ref, *, scale, chunk, sub, groups, diag):
    """dk, dv, dL/ds for the `sub` writers from in-chunk row `start`."""
    dtype = k.dtype
    last = start + sub - 1
    # Readers after this block, through the reference row `last`.
    ref = gc_ref[last, :]
    later = (irange(chunk) > last)[:, None]
    up = jnp.exp(jnp.where(later, gc_ref[...] - ref[None, :], -jnp.inf))
    down = jnp.exp(ref[None, :] - gcb)
    # Readers after the chunk, through the stored adjoint at its end.
    to_end = jnp.exp(gc_ref[chunk - 1, :][None, :] - gcb)
    dk = _mm(s * to_end, lk, dtype, trans_b=True)
    dv = _mm(s * to_end, lv, dtype)
    ds = to_end * (_mm(k, lk, dtype) + _mm(v, lv, dtype, trans_b=True))
    for g in range(groups):
        q = q_ref[:, g, :]
        do = do_ref[:, g, :]
        dz_up = dz_ref[:, g, :] * up
        p_up = p_ref[:, g, :] * up
        ds = ds + down * (scale * _mm(dot(k, q.astype(dtype), trans_b=True),
                                      dz_up, dtype)
                          + _mm(dot(v, do.astype(dtype), trans_b=True), p_up,
                                dtype))
        dk = dk + scale * _mm(_mm(s * down, dz_up, dtype, trans_b=True), q,
                              dtype)
        dv = dv + _mm(_mm(s * down, p_up, dtype, trans_b=True), do, dtype)
    if diag == "tensor":
        # [t, i, m]: exp(G_t - G_i) for readers t >= writers i of the block.
        reach = _own_block_weights(gcb, jnp.ones_like(s))
        own = pl.ds(start, sub)
        for g in range(groups):
            q = q_ref[own, g, :]
            do = do_ref[own, g, :]
            dz = dz_ref[own, g, :] * scale
            p = p_ref[own, g, :]
            qk = dot(q.astype(dtype), k, trans_b=True)            # [t, i]
            dov = dot(do.astype(dtype), v.astype(dtype), trans_b=True)
            ds = ds + jnp.sum(reach * (dz[:, None, :] * qk[:, :, None]
                                       + p[:, None, :] * dov[:, :, None]),
                              axis=0)
            by_key = jnp.sum(dz[:, None, :] * reach * s[None, :, :], axis=2)
            by_value = jnp.sum(p[:, None, :] * reach * s[None, :, :], axis=2)
            dk = dk + dot_ta(by_key.astype(dtype), q.astype(dtype))
            dv = dv + dot_ta(by_value.astype(dtype), do.astype(dtype))
        return dk, dv, ds
    kf, vf = k.astype(_F32), v.astype(_F32)
    rows = irange(sub)

    def body(t, carry):
        dk, dv, ds = carry
        row = start + t
        reach = jnp.exp(jnp.where(rows[:, None] <= t,
                                  gc_ref[row, :][None, :] - gcb, -jnp.inf))
        for g in range(groups):
            q_t = q_ref[row, g, :].astype(_F32)
            do_t = do_ref[row, g, :].astype(_F32)
            by_key = scale * dz_ref[row, g, :][None, :] * reach
            by_value = p_ref[row, g, :][None, :] * reach
            ds = ds + by_key * jnp.sum(kf * q_t[None, :], axis=1)[:, None]
            ds = ds + by_value * jnp.sum(vf * do_t[None, :], axis=1)[:, None]
            dk = dk + jnp.sum(by_key * s, axis=1)[:, None] * q_t[None, :]
            dv = dv + jnp.sum(by_value * s, axis=1)[:, None] * do_t[None, :]
        return dk, dv, ds

    return loop(0, sub, body, (dk, dv, ds))


def _side_kernel(x_ref, gcb_ref, s_ref, gc_ref, l_ref, r_ref, w_ref, dx_ref,
                 ds_ref, *, scale, chunk, sub, groups, diag, factored, keys,
                 branch="both", program=None):
    """One side of `_dkv_kernel` (`split_dkv`): the keys (x = k, l = dL/dSk
    `[K, M]`, readers q, weights scale * dz) or the values (x = v, l =
    dL/dSv `[M, V]`, readers dout, weights p). Gives dx and that side's
    part of dL/ds. Half the products per program of the joint kernel."""
    program = pl.program_id(0) if program is None else program
    blocks = x_ref.shape[0] // sub
    dtype = x_ref.dtype
    weight_scale = scale if keys else 1.0
    # Writers reaching the adjoint: [rows, M] @ l, and x's projection on it.
    after = lambda w, l: _mm(w, l, dtype, trans_b=keys)
    project = lambda x, l: _mm(x, l, dtype, trans_b=not keys)

    def exact():
        l = l_ref[...]

        def sub_block(b, carry):
            mine = pl.ds(b * sub, sub)
            start = _block_start(program, b, blocks, sub, chunk)
            x, gcb, s = x_ref[mine, :], gcb_ref[mine, :], s_ref[mine, :]
            last = start + sub - 1
            ref = gc_ref[last, :]
            later = (irange(chunk) > last)[:, None]
            up = jnp.exp(jnp.where(later, gc_ref[...] - ref[None, :],
                                   -jnp.inf))
            down = jnp.exp(ref[None, :] - gcb)
            to_end = jnp.exp(gc_ref[chunk - 1, :][None, :] - gcb)
            dx = after(s * to_end, l)
            ds = to_end * project(x, l)
            for g in range(groups):
                r = r_ref[:, g, :]
                w_up = w_ref[:, g, :] * up * weight_scale
                ds = ds + down * _mm(dot(x, r.astype(dtype), trans_b=True),
                                     w_up, dtype)
                dx = dx + _mm(_mm(s * down, w_up, dtype, trans_b=True), r,
                              dtype)
            own = pl.ds(start, sub)
            if diag == "tensor":
                reach = _own_block_weights(gcb, jnp.ones_like(s))
                for g in range(groups):
                    r = r_ref[own, g, :]
                    w = w_ref[own, g, :] * weight_scale
                    rx = dot(r.astype(dtype), x, trans_b=True)      # [t, i]
                    ds = ds + jnp.sum(reach * (w[:, None, :]
                                               * rx[:, :, None]), axis=0)
                    by = jnp.sum(w[:, None, :] * reach * s[None, :, :],
                                 axis=2)
                    dx = dx + dot_ta(by.astype(dtype), r.astype(dtype))
            else:
                xf, rows = x.astype(_F32), irange(sub)

                def body(t, carry):
                    dx, ds = carry
                    row = start + t
                    reach = jnp.exp(jnp.where(
                        rows[:, None] <= t, gc_ref[row, :][None, :] - gcb,
                        -jnp.inf))
                    for g in range(groups):
                        r_t = r_ref[row, g, :].astype(_F32)
                        by = weight_scale * w_ref[row, g, :][None, :] * reach
                        ds = ds + by * jnp.sum(xf * r_t[None, :], axis=1)[
                            :, None]
                        dx = dx + jnp.sum(by * s, axis=1)[:, None] * r_t[
                            None, :]
                    return dx, ds

                dx, ds = loop(0, sub, body, (dx, ds))
            dx_ref[mine, :] = dx.astype(dx_ref.dtype)
            ds_ref[mine, :] = ds
            return carry

        loop(0, blocks, sub_block, 0)

    def fast():
        f = _Chunk(gc_ref, s_ref)
        x, s, gc, l = x_ref[...], s_ref[...], gc_ref[...], l_ref[...]
        to_end = jnp.exp(gc_ref[chunk - 1, :][None, :] - gc)
        dx = after(s * to_end, l)
        ds = to_end * project(x, l)
        inside = jnp.zeros_like(ds)
        for g in range(groups):
            r = r_ref[:, g, :]
            w = w_ref[:, g, :] * f.from_start * weight_scale
            inside = inside + dot_ta(f.pairs(r, x, dtype).astype(dtype),
                                     w.astype(dtype))
            dx = dx + dot_ta(f.pairs(w, f.writers, dtype).astype(dtype),
                             r.astype(dtype))
        dx_ref[...] = dx.astype(dx_ref.dtype)
        ds_ref[...] = ds + inside * jnp.exp(-gc)

    _branch(factored, _factored_ok(gc_ref, chunk) if factored else None,
            fast, exact, branch)


def _chunk_gates(gc_ref, s_ref, n, chunk):
    """exp(G_end) and the writes' weights to the chunk end for chunk n."""
    rows = pl.ds(n * chunk, chunk)
    total = gc_ref[n * chunk + chunk - 1, :]
    to_end = s_ref[rows, :] * jnp.exp(total[None, :] - gc_ref[rows, :])
    return jnp.exp(total), to_end


def _keys_states(k_ref, gc_ref, s_ref, sk0_ref, sk_ref, *, chunk, chunks):
    def body(n, sk):
        sk_ref[n] = sk
        decay, to_end = _chunk_gates(gc_ref, s_ref, n, chunk)
        k = k_ref[pl.ds(n * chunk, chunk), :]
        return sk * decay[None, :] + dot_ta(k, to_end.astype(k.dtype))

    sk_ref[chunks] = loop(0, chunks, body, sk0_ref[...])


def _values_states(v_ref, gc_ref, s_ref, sv0_ref, sv_ref, *, chunk, chunks):
    def body(n, sv):
        sv_ref[n] = sv
        decay, to_end = _chunk_gates(gc_ref, s_ref, n, chunk)
        v = v_ref[pl.ds(n * chunk, chunk), :]
        return sv * decay[:, None] + dot_ta(to_end.astype(v.dtype), v)

    sv_ref[chunks] = loop(0, chunks, body, sv0_ref[...])


def _keys_adjoint(q_ref, dz_ref, gc_ref, dsk_ref, lk_ref, dsk0_ref, *, scale,
                  chunk, chunks, groups):
    dtype = q_ref.dtype

    def body(r, lk):
        n = chunks - 1 - r
        lk_ref[n] = lk
        rows = pl.ds(n * chunk, chunk)
        eg = jnp.exp(gc_ref[rows, :])
        lk = lk * jnp.exp(gc_ref[n * chunk + chunk - 1, :])[None, :]
        for g in range(groups):
            lk = lk + scale * dot_ta(q_ref[rows, g, :],
                                     (dz_ref[rows, g, :] * eg).astype(dtype))
        return lk

    dsk0_ref[...] = loop(0, chunks, body, dsk_ref[...])


def _values_adjoint(p_ref, do_ref, gc_ref, dsv_ref, lv_ref, dsv0_ref, *,
                    chunk, chunks, groups, dtype):
    def body(r, lv):
        n = chunks - 1 - r
        lv_ref[n] = lv
        rows = pl.ds(n * chunk, chunk)
        eg = jnp.exp(gc_ref[rows, :])
        lv = lv * jnp.exp(gc_ref[n * chunk + chunk - 1, :])[:, None]
        for g in range(groups):
            lv = lv + dot_ta((p_ref[rows, g, :] * eg).astype(dtype),
                             do_ref[rows, g, :].astype(dtype))
        return lv

    dsv0_ref[...] = loop(0, chunks, body, dsv_ref[...])


def _in_chunk_sums(x, chunk, reverse=False):
    """Inclusive cumsum of `x [B, T, ...]` inside each chunk of `chunk` rows
    (from the chunk's end with `reverse`), as triangular matrix products:
    XLA lowers a cumsum on GPU to a log-depth scan, one pass per level.

    float32 `x` is split into three bfloat16 parts (x = hi + mid + lo to
    within 2^-21 |x|) multiplied separately: the triangle's ones are exact
    in bfloat16 and the products accumulate in float32, so this keeps
    float32 accuracy at bfloat16 tensor-core speed (a float32 product at
    HIGHEST precision took ~0.6 ms per call at T=65536 on an H200). The
    parts are cut by masking the low mantissa bits: a float32 -> bfloat16
    -> float32 round trip would be dropped by XLA's GPU simplifier (excess
    precision allowed), leaving one bfloat16 part (GPU check, round s3r2).
    """
    batch, length = x.shape[:2]
    shaped = x.reshape((batch, length // chunk, chunk) + x.shape[2:])
    rows = jnp.arange(chunk)
    keep = (rows[None, :] >= rows[:, None]) if reverse else (
        rows[:, None] >= rows[None, :])
    parts = [shaped]
    if x.dtype == _F32:
        parts = []
        rest = shaped
        for _ in range(3):
            top = lax.bitcast_convert_type(
                lax.bitcast_convert_type(rest, jnp.uint32)
                & jnp.uint32(0xFFFF0000), _F32)  # exact in bfloat16
            parts.append(top.astype(jnp.bfloat16))
            rest = rest - top
    sums = sum(jnp.einsum("ij,bnj...->bni...", keep.astype(part.dtype), part,
                          preferred_element_type=_F32) for part in parts)
    return sums.reshape(x.shape).astype(x.dtype)


def _chunk_cumsum(g, chunk):
    """In-chunk inclusive cumsum of `g [B, T, Hkv, M]` (T % chunk == 0)."""
    return _in_chunk_sums(g, chunk)


def _tile(dim, config):
    return min(config.tile, dim)


def _sequential(kernel, name, config, grid, in_specs, out_specs, out_shape,
                *args):
    """A chunk-by-chunk kernel: one program per (batch, kv head, tile)."""
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config.num_warps,
                                        config.sequential_stages),
        interpret=config.interpret, name=name)(*args)


def _states(k, v, gc, s, sk0, sv0, config):
    batch, length, kv_heads, key_dim = k.shape
    value_dim, slots = v.shape[-1], gc.shape[-1]
    chunk = config.chunk
    chunks = length // chunk
    kt, vt = _tile(key_dim, config), _tile(value_dim, config)
    gates = pl.BlockSpec((None, length, None, slots),
                         lambda b, c, j: (b, 0, c, 0))
    sk = _sequential(
        functools.partial(_keys_states, chunk=chunk, chunks=chunks),
        "nha_slot_key_states", config, (batch, kv_heads, key_dim // kt),
        [pl.BlockSpec((None, length, None, kt), lambda b, c, j: (b, 0, c, j)),
         gates, gates,
         pl.BlockSpec((None, None, kt, slots), lambda b, c, j: (b, c, j, 0))],
        pl.BlockSpec((None, None, chunks + 1, kt, slots),
                     lambda b, c, j: (b, c, 0, j, 0)),
        jax.ShapeDtypeStruct((batch, kv_heads, chunks + 1, key_dim, slots),
                             _F32),
        k, gc, s, sk0)
    sv = _sequential(
        functools.partial(_values_states, chunk=chunk, chunks=chunks),
        "nha_slot_value_states", config, (batch, kv_heads, value_dim // vt),
        [pl.BlockSpec((None, length, None, vt), lambda b, c, j: (b, 0, c, j)),
         gates, gates,
         pl.BlockSpec((None, None, slots, vt), lambda b, c, j: (b, c, 0, j))],
        pl.BlockSpec((None, None, chunks + 1, slots, vt),
                     lambda b, c, j: (b, c, 0, 0, j)),
        jax.ShapeDtypeStruct((batch, kv_heads, chunks + 1, slots, value_dim),
                             _F32),
        v, gc, s, sv0)
    return sk, sv


def _adjoints(q, dz, p, dout, gc, dsk_end, dsv_end, scale, config):
    batch, length, heads, key_dim = q.shape
    kv_heads, slots, value_dim = gc.shape[2], gc.shape[-1], dout.shape[-1]
    groups, chunk = heads // kv_heads, config.chunk
    chunks = length // chunk
    kt, vt = _tile(key_dim, config), _tile(value_dim, config)
    gates = pl.BlockSpec((None, length, None, slots),
                         lambda b, c, j: (b, 0, c, 0))
    grouped = pl.BlockSpec((None, length, groups, slots),
                           lambda b, c, j: (b, 0, c, 0))
    lk, dsk0 = _sequential(
        functools.partial(_keys_adjoint, scale=scale, chunk=chunk,
                          chunks=chunks, groups=groups),
        "nha_slot_key_adjoint", config, (batch, kv_heads, key_dim // kt),
        [pl.BlockSpec((None, length, groups, kt),
                      lambda b, c, j: (b, 0, c, j)),
         grouped, gates,
         pl.BlockSpec((None, None, kt, slots), lambda b, c, j: (b, c, j, 0))],
        [pl.BlockSpec((None, None, chunks, kt, slots),
                      lambda b, c, j: (b, c, 0, j, 0)),
         pl.BlockSpec((None, None, kt, slots), lambda b, c, j: (b, c, j, 0))],
        [jax.ShapeDtypeStruct((batch, kv_heads, chunks, key_dim, slots), _F32),
         jax.ShapeDtypeStruct(dsk_end.shape, _F32)],
        q, dz, gc, dsk_end)
    lv, dsv0 = _sequential(
        functools.partial(_values_adjoint, chunk=chunk, chunks=chunks,
                          groups=groups, dtype=q.dtype),
        "nha_slot_value_adjoint", config, (batch, kv_heads, value_dim // vt),
        [grouped,
         pl.BlockSpec((None, length, groups, vt),
                      lambda b, c, j: (b, 0, c, j)),
         gates,
         pl.BlockSpec((None, None, slots, vt), lambda b, c, j: (b, c, 0, j))],
        [pl.BlockSpec((None, None, chunks, slots, vt),
                      lambda b, c, j: (b, c, 0, 0, j)),
         pl.BlockSpec((None, None, slots, vt), lambda b, c, j: (b, c, 0, j))],
        [jax.ShapeDtypeStruct((batch, kv_heads, chunks, slots, value_dim),
                              _F32),
         jax.ShapeDtypeStruct(dsv_end.shape, _F32)],
        p, dout, gc, dsv_end)
    return lk, lv, dsk0, dsv0


# Chunks per segment of `_scan`: each program walks this many steps.
_SEGMENT = 32


def _segment_length(chunks, config):
    """Chunks per segment of `_scan` (`config.segment` if set).

    Two segment walks of L steps and one walk of chunks / L steps run one
    after the other: L near sqrt(chunks / 2) (a power of two, at least 4,
    at most `_SEGMENT`) keeps their sum short also when few chunks leave
    the GPU idle (24 dependent steps instead of 66 at 64 chunks).
    """
    length = 4
    while 2 * length * length < chunks:
        length *= 2
    return min(config.segment or min(_SEGMENT, length), chunks)


def _segment_kernel(log_decay_ref, local_ref, init_ref, *out_refs, length,
                    decay_rows, reverse):
    """`_scan_kernel` over one segment of chunks.

    `out_refs` is `(total_ref,)` (only the carry after the segment) or
    `(out_ref,)` (the carry before each chunk, in `out_ref`'s dtype).
    """
    out_ref = out_refs[0]
    store = len(out_ref.shape) == len(local_ref.shape)

    def body(r, x):
        n = length - 1 - r if reverse else r
        if store:
            out_ref[n] = x.astype(out_ref.dtype)
        decay = jnp.exp(log_decay_ref[n, :])
        decay = decay[:, None] if decay_rows else decay[None, :]
        return x * decay + local_ref[n]

    x = loop(0, length, body, init_ref[...])
    if not store:
        out_ref[...] = x


def _scan(log_decay, local, init, config, *, decay_rows, dtype,
          reverse=False):
    """The recurrence x <- x * exp(log_decay[n]) + local[n] over the chunks.

    Args:
        log_decay: `[B, Hkv, N, M]` float32, each chunk's gate total (<= 0).
        local: `[B, N, Hkv, X, Y]`, each chunk's writes (the
            layout batched products give without a transpose).
        init: `[B, Hkv, X, Y]` float32 carry before the first step (before
            the last chunk with `reverse`).
        config: a `KernelConfig`.
        decay_rows: the decay scales the rows (X = M), else the columns.
        dtype: storage dtype of the carries.
        reverse: walk from the last chunk to the first.

    Returns:
        `([B, Hkv, N, X, Y] in dtype, [B, Hkv, X, Y] float32)`: the carry
        before each step, and after the last step.

    A single walk over N chunks is bound by its N dependent steps (few
    programs, one per state tile). So the chunks are cut into segments of
    `_SEGMENT`: every segment walks from zero at once keeping only its
    total; a walk over the (32x fewer) totals gives each segment's start;
    every segment walks again from its start, storing the carries.
    """
    batch, chunks, kv_heads, rows, cols = local.shape
    slots = log_decay.shape[-1]
    length = _segment_length(chunks, config)
    padded = -(-chunks // length) * length
    segments = padded // length
    if padded != chunks:  # no-op chunks: no decay, no writes
        local = jnp.pad(local, [(0, 0), (0, padded - chunks), (0, 0), (0, 0),
                                (0, 0)])
        log_decay = jnp.pad(log_decay, [(0, 0), (0, 0),
                                        (0, padded - chunks), (0, 0)])
    if decay_rows:
        tile = min(16, cols)
        block = (rows, tile)
        index = lambda b, c, j, g: (b, c, g, 0, j)
        by_time = lambda b, c, j, g: (b, g, c, 0, j)
        grid = (batch, kv_heads, cols // tile, segments)
    else:
        tile = min(16, rows)
        block = (tile, cols)
        index = lambda b, c, j, g: (b, c, g, j, 0)
        by_time = lambda b, c, j, g: (b, g, c, j, 0)
        grid = (batch, kv_heads, rows // tile, segments)
    one = pl.BlockSpec((None, None, None) + block, index)

    def segment_pass(init, out_spec, out_shape):
        return pl.pallas_call(
            functools.partial(_segment_kernel, length=length,
                              decay_rows=decay_rows, reverse=reverse),
            grid=grid,
            in_specs=[pl.BlockSpec((None, None, length, slots),
                                   lambda b, c, j, g: (b, c, g, 0)),
                      pl.BlockSpec((None, length, None) + block, by_time),
                      one],
            out_specs=out_spec,
            out_shape=out_shape,
            compiler_params=compiler_params(2, config.sequential_stages + 1),
            interpret=config.interpret,
            name="nha_slot_segment_scan",
        )(log_decay, local, init)

    state = (batch, kv_heads, segments, rows, cols)
    totals = segment_pass(jnp.zeros(state, _F32), one,
                          jax.ShapeDtypeStruct(state, _F32))
    decays = jnp.exp(log_decay.reshape(batch, kv_heads, segments, length,
                                       slots).sum(3))
    starts, final = _walk(decays, totals, init, config,
                          decay_rows=decay_rows, dtype=_F32, reverse=reverse)
    carries = segment_pass(
        starts[:, :, :segments],
        pl.BlockSpec((None, None, length) + block, index),
        jax.ShapeDtypeStruct((batch, kv_heads, padded, rows, cols), dtype))
    return carries[:, :, :chunks], final


def _by_chunk(x, chunk):
    """`[B, T, ...]` -> `[B, N, chunk, ...]`."""
    return x.reshape((x.shape[0], x.shape[1] // chunk, chunk) + x.shape[2:])


def _einsum(spec, a, b, dtype=_F32):
    """Batched product accumulated in float32, returned in `dtype`."""
    precision = (lax.Precision.HIGHEST if a.dtype == _F32 and b.dtype == _F32
                 else None)
    return jnp.einsum(spec, a, b, precision=precision,
                      preferred_element_type=_F32).astype(dtype)


def _writes_dtype(x, config):
    """Storage dtype of the chunk writes `_scan` walks over."""
    return x.dtype if config.narrow_writes else _F32


def _chunk_log_decay(gc, chunk):
    """G at each chunk's last row (the chunk's gate total): `[B, Hkv, N, M]`.
    """
    return jnp.transpose(_by_chunk(gc, chunk)[:, :, -1], (0, 2, 1, 3))


def _states_scan(k, v, gc, s, sk0, sv0, config):
    """`_states` as batched per-chunk writes plus `_scan`.

    Returns the memory at every chunk start in the input dtype (`[B, Hkv,
    N, ...]`) and the memory after the last chunk in float32.
    """
    chunk = config.chunk
    end = _by_chunk(gc, chunk)[:, :, -1:]
    to_end = _by_chunk(s, chunk) * jnp.exp(end - _by_chunk(gc, chunk))
    local_k = _einsum("bnchk,bnchm->bnhkm", _by_chunk(k, chunk),
                      to_end.astype(k.dtype), _writes_dtype(k, config))
    local_v = _einsum("bnchm,bnchv->bnhmv", to_end.astype(v.dtype),
                      _by_chunk(v, chunk), _writes_dtype(v, config))
    decay = _chunk_log_decay(gc, chunk)
    sk, sk_end = _scan(decay, local_k, sk0, config, decay_rows=False,
                       dtype=k.dtype)
    sv, sv_end = _scan(decay, local_v, sv0, config, decay_rows=True,
                       dtype=v.dtype)
    return sk, sv, sk_end, sv_end


def _adjoints_scan(q, dz, p, dout, gc, dsk_end, dsv_end, scale, config):
    """`_adjoints` as batched per-chunk reads plus a reverse `_scan`.

    Returns lk, lv `[B, Hkv, N, ...]` (entry n: the adjoint at chunk n's
    end) in the query dtype and the adjoints of the start memory in float32.

    """
    batch, length, heads, key_dim = q.shape
    kv_heads, chunk = gc.shape[2], config.chunk
    groups = heads // kv_heads
    grouped = lambda x: _by_chunk(x.reshape(
        (batch, length, kv_heads, groups, x.shape[-1])), chunk)
    eg = _by_chunk(jnp.exp(gc), chunk)[:, :, :, :, None, :]
    local_k = _einsum("bnchgk,bnchgm->bnhkm", grouped(q),
                      (grouped(dz) * (eg * scale)).astype(q.dtype),
                      _writes_dtype(q, config))
    local_v = _einsum("bnchgm,bnchgv->bnhmv",
                      (grouped(p) * eg).astype(q.dtype),
                      grouped(dout).astype(q.dtype), _writes_dtype(q, config))
    decay = _chunk_log_decay(gc, chunk)
    lk, dsk0 = _scan(decay, local_k, dsk_end, config, decay_rows=False,
                     dtype=q.dtype, reverse=True)
    lv, dsv0 = _scan(decay, local_v, dsv_end, config, decay_rows=True,
                     dtype=q.dtype, reverse=True)
    return lk, lv, dsk0, dsv0


def chunk_states(k, v, gc, s, sk0, sv0, config, writes=None):
    """Slot memory at every chunk start (input dtype with `walk` "scan" or
    "fused", else float32) and after the last chunk (float32), by
    `config.walk`: `(sk, sv, sk_end, sv_end)`. `writes`: the chunk writes'
    weights for "fused" if already at hand."""
    if config.walk == "fused":
        if writes is None:
            end = _by_chunk(gc, config.chunk)[:, :, -1:]
            writes = (_by_chunk(s, config.chunk) * jnp.exp(
                end - _by_chunk(gc, config.chunk))).reshape(s.shape).astype(
                    k.dtype)
        return fused_states(k, v, gc, writes, sk0, sv0, config,
                            _segment_length(gc.shape[1] // config.chunk,
                                            config))
    # Only the fused walks read lagging keys and values (`sequence.py`).
    assert not config.fed_lag, config.walk
    if config.walk == "scan":
        return _states_scan(k, v, gc, s, sk0, sv0, config)
    sk, sv = _states(k, v, gc, s, sk0, sv0, config)
    return sk, sv, sk[:, :, -1], sv[:, :, -1]


def chunk_adjoints(q, dz, p, dout, gc, dsk_end, dsv_end, scale, config):
    """dL/dS at every chunk end and of the start memory, by `config.walk`:
    `(lk, lv, dsk0, dsv0)`."""
    if config.walk == "fused":
        return fused_adjoints(q, dz, p, dout, gc, dsk_end, dsv_end, scale,
                              config, _segment_length(
                                  gc.shape[1] // config.chunk, config))
    adjoints = _adjoints_scan if config.walk == "scan" else _adjoints
    return adjoints(q, dz, p, dout, gc, dsk_end, dsv_end, scale, config)


def _rows(size, dim, groups=None, per=1, lag=0):
    """`size` rows of `[B, T, H, dim]` for programs (block, b, head).

    With `groups`, the head is the query head's kv head; with `per`, the
    block is the chunk holding `per` consecutive program blocks; with
    `lag` (rows, a multiple of `size`), the block that many rows earlier
    (the first block for blocks before it, whose rows carry no writes).
    """
    head = (lambda h: h) if groups is None else (lambda h: h // groups)
    if not lag:
        return pl.BlockSpec((None, size, None, dim),
                            lambda j, b, h: (b, j // per, head(h), 0))
    assert lag % size == 0, (lag, size)
    return pl.BlockSpec((None, size, None, dim), lambda j, b, h: (
        b, jnp.maximum(j // per - lag // size, 0), head(h), 0))


class _Programs:
    """How slot programs tile the sequence: `rows` query (or fed) rows per
    program, `span` rows of the whole chunk(s) it reads, `per` programs per
    chunk, `chunks` chunks per program (more than one: `fast_chunks`)."""

    def __init__(self, config, chunks=1):
        self.chunks = chunks
        self.rows = _program_rows(config) * chunks
        self.span = max(self.rows, config.chunk)
        self.per = max(config.chunk // self.rows, 1)
        self.lag = config.fed_lag

    def own(self, dim, groups=None, fed=False):
        """The program's rows of a `[B, T, H, dim]` array (`fed`: of the
        fed keys or values, `config.fed_lag` rows earlier)."""
        return _rows(self.rows, dim, groups, lag=self.lag if fed else 0)

    def whole(self, dim, groups=None, fed=False):
        """Its whole chunks' rows (of the kv head with `groups`)."""
        return _rows(self.span, dim, groups, self.per,
                     self.lag if fed else 0)

    def group(self, dim, groups):
        """Its whole chunks' rows for every query head of a kv head."""
        return pl.BlockSpec((None, self.span, groups, dim),
                            lambda j, b, c: (b, j // self.per, c, 0))

    def per_row(self):
        """Its entries of a `[B, H, T]` array."""
        return pl.BlockSpec((None, None, self.rows),
                            lambda j, b, h: (b, h, j))

    def memory(self, shape, groups=1):
        """The stored memory (or adjoint) of its chunk(s), `[B, Hkv, N,
        ...]`; several chunks keep a leading chunk axis."""
        chunks = self.chunks if self.chunks > 1 else None
        return pl.BlockSpec((None, None, chunks) + tuple(shape),
                            lambda j, b, h: (b, h // groups, j // self.per,
                                             0, 0))


def _reader_specs(programs, key_dim, value_dim, slots, groups):
    return [programs.own(key_dim)] + [
        programs.whole(dim, groups, fed=True) for dim in (key_dim, value_dim)
    ] + [programs.whole(slots, groups)] * 2 + [
        programs.memory((key_dim, slots), groups),
        programs.memory((slots, value_dim), groups)]


class _ChunkView:
    """Chunk `c` of a ref holding several chunks, indexed as a one-chunk
    ref: rows along the first axis (`rows` per chunk), or with `rows`
    None a leading chunk axis (the stored memories)."""

    def __init__(self, ref, c, rows):
        self.ref, self.c, self.rows = ref, c, rows
        self.dtype = ref.dtype
        self.shape = (tuple(ref.shape[1:]) if rows is None
                      else (rows,) + tuple(ref.shape[1:]))

    def _index(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if self.rows is None:
            return (self.c,) + index
        first, rest = index[0], index[1:]
        start = self.c * self.rows
        if first is Ellipsis:
            return (pl.ds(start, self.rows), Ellipsis) + rest
        if isinstance(first, slice):
            assert first == slice(None), first
            return (pl.ds(start, self.rows),) + rest
        if isinstance(first, type(pl.ds(0, 1))):
            return (pl.ds(start + first.start, first.size),) + rest
        return (start + first,) + rest

    def __getitem__(self, index):
        return self.ref[self._index(index)]

    def __setitem__(self, index, value):
        self.ref[self._index(index)] = value


def _over_chunks(kernel, chunks, chunk, memory_args):
    """`kernel` (for one chunk) run on each of a program's `chunks` chunks
    in turn; refs at `memory_args` have a leading chunk axis."""
    def run(*refs):
        # Read here: the interpreter cannot read it inside the loop.
        program = pl.program_id(0)

        def body(c, carry):
            kernel(*[_ChunkView(ref, c, None if i in memory_args else chunk)
                     for i, ref in enumerate(refs)],
                   program=program * chunks + c)
            return carry
        loop(0, chunks, body, 0)
    return run


def _program_rows(config):
    """Query rows per slot program: `config.rows`, at most a chunk."""
    return min(config.rows, config.chunk)


def _factored(config, dtype):
    """Whether the slot programs may take the factored in-chunk products.

    They need a whole chunk per program, and float16 cannot hold exp(40).
    """
    return (config.factor and _program_rows(config) == config.chunk
            and dtype != jnp.float16)


def _reader_params(config):
    return compiler_params(config.reader_warps or config.num_warps,
                           config.num_stages)


def _reader_kernel(kernel, scale, num_slots, config):
    """A reader-side kernel (forward or dq) bound to its static options
    (but `factored`, which `_slot_call` passes)."""
    return functools.partial(kernel, scale=scale, num_slots=num_slots,
                             chunk=config.chunk, sub=config.sub,
                             diag=config.diag)


def _slot_call(kernel, args, specs, *, factored, config, memory_args,
               **options):
    """`pl.pallas_call` of a chunk-program kernel (its `branch` option free).

    `specs(programs)` gives `(grid, in_specs, out_specs)` for a
    `_Programs` tiling; `memory_args` are the positions of the stored
    memories among `args`. With `config.exact_pass` and factored products,
    two calls: one runs the factored products everywhere (over
    `config.fast_chunks` chunks per program, when they divide the chunk
    count), a second (which takes the first's outputs as its own, aliased)
    overwrites the chunks whose gates do not allow them with the exact
    terms. Each kernel then holds one side's registers and shared memory
    instead of both, the first has no branch, and the second's programs
    mostly return at once.
    """
    kernel = functools.partial(kernel, factored=factored)
    grid, in_specs, out_specs = specs(_Programs(config))
    if not (factored and config.exact_pass):
        return pl.pallas_call(
            functools.partial(kernel, branch="both"), grid=grid,
            in_specs=in_specs, out_specs=out_specs, **options)(*args)
    chunks = config.fast_chunks
    if grid[0] % chunks:
        chunks = 1
    fast = functools.partial(kernel, branch="fast")
    if chunks > 1:
        fast = _over_chunks(fast, chunks, config.chunk, memory_args)
    fast_grid, fast_in, fast_out = specs(_Programs(config, chunks))
    first = pl.pallas_call(fast, grid=fast_grid, in_specs=fast_in,
                           out_specs=fast_out, **options)(*args)
    count = len(args)

    def exact(*refs):  # refs: args, the aliased outputs as inputs, outputs
        kernel(*refs[:count], *refs[count + len(first):], branch="exact")

    return pl.pallas_call(
        exact, grid=grid, in_specs=list(in_specs) + list(out_specs),
        out_specs=out_specs,
        input_output_aliases={count + i: i for i in range(len(first))},
        **options)(*args, *first)


def _read(q, k, v, gc, s, sk, sv, scale, num_slots, config):
    """Reader forward: slot-normalised output (float32, or the input
    dtype with `config.narrow_slot_out`) and lse per query row."""
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim, slots = k.shape[2], v.shape[-1], gc.shape[-1]
    groups = heads // kv_heads

    def specs(programs):
        return ((length // programs.rows, batch, heads),
                _reader_specs(programs, key_dim, value_dim, slots, groups),
                [programs.own(value_dim), programs.per_row()])

    return _slot_call(
        _reader_kernel(_forward_kernel, scale, num_slots, config),
        (q, k, v, gc, s, sk, sv), specs, factored=_factored(config, q.dtype),
        config=config, memory_args=(5, 6),
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, value_dim),
                                 q.dtype if config.narrow_slot_out
                                 else _F32),
            jax.ShapeDtypeStruct((batch, heads, length), _F32)],
        compiler_params=_reader_params(config),
        interpret=config.interpret,
        name="nha_slot_forward")


def _forward(q, k, v, g, sk0, sv0, scale, num_slots, config):
    writes = None
    if config.gate_kernels:
        gc, s, *writes = gates.gate_sums(
            g, config, k.dtype if config.walk == "fused" else None)
        writes = writes[0] if writes else None
    else:
        assert not config.fed_length  # gates in place need the kernels
        gc = _chunk_cumsum(g, config.chunk)
        s = -jnp.expm1(g)
    sk, sv, sk_end, sv_end = chunk_states(k, v, gc, s, sk0, sv0, config,
                                          writes)
    out, lse = _read(q, k, v, gc, s, sk, sv, scale, num_slots, config)
    return out, lse, sk, sv, sk_end, sv_end, gc, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def slot_attention(q, k, v, g, sk0, sv0, scale, num_slots, config):
    """The slot half of NHA over a fed stream.

    Args:
        q: `[B, T, H, K]` queries.
        k: `[B, T, Hkv, K]` keys fed at each step.
        v: `[B, T, Hkv, V]` values fed at each step.
        g: `[B, T, Hkv, M]` float32 log gates, 0 where nothing is fed.
        sk0: `[B, Hkv, K, M]` float32 slot keys before the first step.
        sv0: `[B, Hkv, M, V]` float32 slot values before the first step.
        scale: logit scale.
        num_slots: the real slot count (columns past it are padding).
        config: a `KernelConfig`; T must be a multiple of `config.chunk`.

    Returns:
        `(out [B, T, H, V] f32 (input dtype with `narrow_slot_out`), lse
        [B, H, T] f32, sk [B, Hkv, K, M], sv [B, Hkv, M, V])`, the last
        two being the memory after step T.
    """
    out, lse, _, _, sk_end, sv_end, _, _ = _forward(
        q, k, v, g, sk0, sv0, scale, num_slots, config)
    return out, lse, sk_end, sv_end


def _slot_fwd(q, k, v, g, sk0, sv0, scale, num_slots, config):
    out, lse, sk, sv, sk_end, sv_end, gc, s = _forward(
        q, k, v, g, sk0, sv0, scale, num_slots, config)
    residuals = (q, k, v, g, gc, s, sk, sv, sk_end, sv_end)
    return (out, lse, sk_end, sv_end), (residuals, out, lse)


def _dq(q, k, v, gc, s, sk, sv, dout, lse, delta, scale, num_slots,
        config):
    """Reader backward: dq (scaled), dz, p and the readers' dL/dG terms."""
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim, slots = k.shape[2], v.shape[-1], gc.shape[-1]
    groups = heads // kv_heads
    per_query = lambda dim, dtype=_F32: jax.ShapeDtypeStruct(
        (batch, length, heads, dim), dtype)

    def specs(programs):
        return ((length // programs.rows, batch, heads),
                _reader_specs(programs, key_dim, value_dim, slots, groups)
                + [programs.own(value_dim), programs.per_row(),
                   programs.per_row()],
                [programs.own(dim) for dim in (key_dim, slots, slots,
                                               slots)])

    return _slot_call(
        _reader_kernel(_dq_kernel, scale, num_slots, config),
        (q, k, v, gc, s, sk, sv, dout, lse, delta), specs,
        factored=_factored(config, q.dtype), config=config,
        memory_args=(5, 6),
        # dq in the input dtype (the caller casts it there at once); dz
        # and p too with `narrow_probs` (every product that reads them
        # takes them in that dtype).
        out_shape=[per_query(key_dim, q.dtype)]
        + [per_query(slots, q.dtype if config.narrow_probs else _F32)] * 2
        + [per_query(slots)],
        compiler_params=_reader_params(config),
        interpret=config.interpret,
        name="nha_slot_dq")


def _dkv(k, v, gc, s, lk, lv, q, dz, p, dout, scale, config):
    """Writer backward: dk, dv and dL/ds per fed token (with `split_dkv`
    as a tuple of the keys' and the values' parts)."""
    batch, length, kv_heads, key_dim = k.shape
    heads, value_dim, slots = q.shape[2], v.shape[-1], gc.shape[-1]
    if heads > kv_heads:
        # With GQA the chunk-wide program (query heads unrolled) asked for
        # more shared memory than an H200 has (GPU check, d=128, 2 query
        # heads per kv head): 16-row programs with the exact terms.
        config = dataclasses.replace(config, rows=config.sub, factor=False)
    groups, chunk = heads // kv_heads, config.chunk
    per_kv = lambda dim, dtype=_F32: jax.ShapeDtypeStruct(
        (batch, length, kv_heads, dim), dtype)
    params = compiler_params(config.dkv_warps or config.num_warps,
                             config.num_stages)
    factored = _factored(config, k.dtype)
    if config.split_dkv:
        def side(x, l, r, w, keys):
            dim = x.shape[-1]
            def specs(programs):
                return ((length // programs.rows, batch, kv_heads),
                        [programs.own(dim, fed=True), programs.own(slots),
                         programs.own(slots), programs.whole(slots),
                         programs.memory(l.shape[-2:]),
                         programs.group(dim, groups),
                         programs.group(slots, groups)],
                        [programs.own(dim), programs.own(slots)])

            return _slot_call(
                functools.partial(
                    _side_kernel, scale=scale, chunk=chunk, sub=config.sub,
                    groups=groups, diag=config.diag, keys=keys),
                (x, gc, s, gc, l, r, w), specs, factored=factored,
                config=config, memory_args=(4,),
                out_shape=[per_kv(dim, x.dtype), per_kv(slots)],
                compiler_params=params,
                interpret=config.interpret,
                name="nha_slot_dk" if keys else "nha_slot_dv")

        dk, ds_keys = side(k, lk, q, dz, True)
        dv, ds_values = side(v, lv, dout, p, False)
        return dk, dv, (ds_keys, ds_values)
    def specs(programs):
        return ((length // programs.rows, batch, kv_heads),
                [programs.own(key_dim, fed=True),
                 programs.own(value_dim, fed=True),
                 programs.own(slots), programs.own(slots),
                 programs.whole(slots), programs.memory((key_dim, slots)),
                 programs.memory((slots, value_dim))]
                + [programs.group(dim, groups)
                   for dim in (key_dim, slots, slots, value_dim)],
                [programs.own(dim) for dim in (key_dim, value_dim, slots)])

    return _slot_call(
        functools.partial(_dkv_kernel, scale=scale, chunk=chunk,
                          sub=config.sub, groups=groups, diag=config.diag),
        (k, v, gc, s, gc, lk, lv, q, dz, p, dout), specs, factored=factored,
        config=config, memory_args=(5, 6),
        out_shape=[per_kv(key_dim, k.dtype), per_kv(value_dim, v.dtype),
                   per_kv(slots)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_slot_dkv")


def _slot_bwd(scale, num_slots, config, saved, cotangents):
    residuals, out, lse = saved
    dout, dlse, dsk_end, dsv_end = cotangents
    delta = jnp.einsum("bthv,bthv->bht", out, dout) - dlse
    # The kernels feed dout to the tensor cores in the input dtype: casting
    # once here halves what every program that re-reads it loads.
    return slot_gradients(residuals, dout.astype(residuals[2].dtype), lse,
                          delta, dsk_end, dsv_end, scale, num_slots, config)


def slot_forward(q, k, v, g, sk0, sv0, scale, num_slots, config):
    """`slot_attention`'s forward for a caller's own VJP.

    Returns:
        `(out, lse, sk_end, sv_end, residuals)`; `residuals` is what
        `slot_gradients` takes.
    """
    (out, lse, sk_end, sv_end), (residuals, _, _) = _slot_fwd(
        q, k, v, g, sk0, sv0, scale, num_slots, config)
    return out, lse, sk_end, sv_end, residuals


def slot_gradients(residuals, dout, lse, delta, dsk_end, dsv_end, scale,
                   num_slots, config, as_fed=()):
    """Gradients of the slot pass's inputs.

    The readers' probabilities are exp(z - lse) and their logit gradients
    p * (dp - delta), with dp from `dout`: with the pass's own lse, delta =
    rowsum(o * dout) - dlse; with the joint NHA lse and delta and the joint
    output's cotangent the same kernels give the joint softmax's gradient
    directly (no slot-normalised cotangent needed).

    Args:
        residuals: from `slot_forward`.
        dout: `[B, T, H, V]` output cotangent in the input dtype.
        lse, delta: `[B, H, T]` float32.
        dsk_end, dsv_end: cotangents of the returned memory.
        scale, num_slots, config: as in `slot_attention`.
        as_fed: with `config.fed_lag`, the gradients ("dk", "dv") to
            leave in the fed stream's rows (the caller adds them where the
            keys / values are).

    Returns:
        `(dq, dk, dv, dg, dsk0, dsv0)`.
    """
    q, k, v, g, gc, s, sk, sv, sk_end, sv_end = residuals
    batch, length, heads, _ = q.shape
    kv_heads, slots = k.shape[2], g.shape[-1]
    groups = heads // kv_heads
    dq, dz, p, x = _dq(q, k, v, gc, s, sk, sv, dout, lse, delta, scale,
                       num_slots, config)
    lk, lv, dsk0, dsv0 = chunk_adjoints(q, dz, p, dout, gc, dsk_end,
                                        dsv_end, scale, config)
    dk, dv, ds = _dkv(k, v, gc, s, lk, lv, q, dz, p, dout, scale, config)

    if config.gate_kernels:
        dg = gates.gate_gradient(x, ds, s, g, (lk, lv),
                                 (sk, sv, sk_end, sv_end), config)
    else:
        if isinstance(ds, tuple):
            ds = ds[0] + ds[1]
        after = _after_chunks(sk, sv, sk_end, sv_end, lk, lv)
        # dL/dG per step: readers (summed over the group) minus writers.
        x = x.reshape(batch, length, kv_heads, groups, slots).sum(axis=3)
        x = x - ds * s
        dg = (_by_chunk(_in_chunk_sums(x, config.chunk, reverse=True),
                        config.chunk) + after[:, :, None])
        dg = dg.reshape(x.shape) - ds * jnp.exp(g)
    unlag = lambda x: pad_axis(x[:, config.fed_lag:], 1, length)
    if config.fed_lag:  # the lagging inputs' own rows
        dk = dk if "dk" in as_fed else unlag(dk)
        dv = dv if "dv" in as_fed else unlag(dv)
    if config.fed_length:  # the gates too; fed rows from T on fed nothing
        fed = jnp.arange(length) < config.fed_length - config.fed_lag
        dg = unlag(dg) * fed[None, :, None, None]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dg.astype(g.dtype), dsk0, dsv0)


def _after_chunks(sk, sv, sk_end, sv_end, lk, lv):
    """sum over tau after chunk n's end of dL/dG_tau, `[B, N, Hkv, M]`.

    Shifting G by the same amount at every step after a chunk's end scales
    only the memory carried across that end, so the sum is <adjoint,
    memory> there, per slot: exact, and local. (Summing dL/dG over the
    rest of the sequence instead adds terms that mostly cancel, so their
    rounding errors, at the input dtype's level, grow along T while the
    true value does not.)
    """
    chunks = lk.shape[2]
    at_ends = lambda states, end: jnp.concatenate(
        [states[:, :, 1:chunks], end[:, :, None].astype(states.dtype)], 2)
    return (_einsum("bcnkm,bcnkm->bncm", lk, at_ends(sk, sk_end))
            + _einsum("bcnmv,bcnmv->bncm", lv, at_ends(sv, sv_end)))


slot_attention.defvjp(_slot_fwd, _slot_bwd)
