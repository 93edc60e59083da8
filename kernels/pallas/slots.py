"""The NHA slot memory (a GSA recurrence over the token-shifted stream), in Pallas.

Per kv head, with fed keys k_i, values v_i, log gates g_i (0 where nothing
enters), s_i = 1 - exp(g_i) and start memory (Sk0, Sv0):

    Sk_t = exp(g_t) * Sk_{t-1} + outer(k_t, s_t)     [K, M]
    Sv_t = exp(g_t) * Sv_{t-1} + outer(s_t, v_t)     [M, V]
    z_t  = scale * q_t @ Sk_t,  p_t = softmax(z_t),  o_t = p_t @ Sv_t

The pass returns the slot-normalised `o` and `lse = logsumexp(z)`, merged with
the window pass by the caller. It runs in chunks of C tokens with the
chunk-local inclusive cumsum G of g:

- `_states_kernel` walks the chunks once per (batch, kv head) and stores the
  memory at every chunk start (float32).
- `_forward_kernel` (one program per chunk and query head) reads its chunk's
  start memory through exp(G_t) and adds the in-chunk terms
  exp(G_t - G_i) s_i token by token, so every exponent is <= 0: no gate can
  overflow, whatever its magnitude.

The backward mirrors it: `_dq_kernel` recomputes p and forms dz, dp and dq;
`_adjoint_kernel` walks the chunks backwards accumulating dL/dS at every
chunk end; `_dkv_kernel` gives dk, dv and dL/ds per token. The gate gradient
then is a reverse cumsum (every logit and readout at step t carries the
factor exp(G_t) per slot; every write at step i carries exp(-G_i)):

    dL/dg_t = sum_{tau >= t} (dz*z + p*dp - ds*s)_tau - ds_t * exp(g_t).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import dot
from keras_nha.kernels.pallas.common import idiv
from keras_nha.kernels.pallas.common import irange
from keras_nha.kernels.pallas.common import loop
from keras_nha.kernels.pallas.common import dot_ta


def _from(gc_rows, gc_i, rows, i):
    """exp(G_t - G_i) for rows t >= i, else 0 (exponents stay <= 0)."""
    return jnp.exp(jnp.where(rows[:, None] >= i, gc_rows - gc_i[None, :],
                             -jnp.inf))


def _states_kernel(k_ref, v_ref, gc_ref, s_ref, sk0_ref, sv0_ref, sk_ref,
                   sv_ref, *, chunk, chunks):
    def body(n, carry):
        sk, sv = carry
        sk_ref[n] = sk
        sv_ref[n] = sv
        rows = pl.ds(n * chunk, chunk)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        gc = gc_ref[rows, :]
        total = gc_ref[n * chunk + chunk - 1, :]
        to_end = s_ref[rows, :] * jnp.exp(total[None, :] - gc)
        decay = jnp.exp(total)
        sk = sk * decay[None, :] + dot_ta(k, to_end.astype(k.dtype))
        sv = sv * decay[:, None] + dot_ta(to_end.astype(v.dtype), v)
        return sk, sv

    sk, sv = loop(0, chunks, body, (sk0_ref[...], sv0_ref[...]))
    sk_ref[chunks] = sk
    sv_ref[chunks] = sv


def _slot_terms(q, k_ref, v_ref, gc_ref, s_ref, sk, sv, do, chunk):
    """Slot logits (before `scale`) and, if `do` is given, dL/dp for a chunk.

    The chunk's start memory is read through exp(G_t); the in-chunk writes
    are added one token i at a time (rows t >= i), all in float32.
    """
    f32 = jnp.float32
    rows = irange(chunk)
    gc = gc_ref[...]
    eg = jnp.exp(gc)
    z = dot(q, sk.astype(q.dtype)) * eg
    qf = q.astype(f32)
    if do is None:
        dp = jnp.zeros_like(z)
    else:
        dp = dot(do.astype(v_ref.dtype), sv.astype(v_ref.dtype),
                 trans_b=True) * eg
        dof = do.astype(f32)

    def body(i, carry):
        z, dp = carry
        weight = _from(gc, gc_ref[i, :], rows, i) * s_ref[i, :][None, :]
        qk = jnp.sum(qf * k_ref[i, :].astype(f32)[None, :], axis=1)
        z = z + qk[:, None] * weight
        if do is not None:
            dov = jnp.sum(dof * v_ref[i, :].astype(f32)[None, :], axis=1)
            dp = dp + dov[:, None] * weight
        return z, dp

    z, dp = loop(0, chunk, body, (z, dp))
    return z, dp, gc, eg


def _slot_mask(z, num_slots):
    return (jnp.arange(z.shape[1]) < num_slots)[None, :]


def _forward_kernel(q_ref, k_ref, v_ref, gc_ref, s_ref, sk_ref, sv_ref, o_ref,
                    lse_ref, *, scale, num_slots, chunk):
    q = q_ref[...]
    sv = sv_ref[...]
    z, _, gc, eg = _slot_terms(q, k_ref, v_ref, gc_ref, s_ref, sk_ref[...],
                               sv, None, chunk)
    z = jnp.where(_slot_mask(z, num_slots), z * scale, -jnp.inf)
    top = jnp.max(z, axis=1)
    weights = jnp.exp(z - top[:, None])
    total = jnp.sum(weights, axis=1)
    p = weights / total[:, None]
    lse_ref[...] = top + jnp.log(total)
    out = dot((p * eg).astype(v_ref.dtype), sv.astype(v_ref.dtype))
    rows = irange(chunk)

    def body(i, out):
        weight = _from(gc, gc_ref[i, :], rows, i) * s_ref[i, :][None, :]
        mix = jnp.sum(p * weight, axis=1)
        return out + mix[:, None] * v_ref[i, :].astype(jnp.float32)[None, :]

    o_ref[...] = loop(0, chunk, body, out)


def _dq_kernel(q_ref, k_ref, v_ref, gc_ref, s_ref, sk_ref, sv_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dz_ref, p_ref, x_ref, *, scale,
               num_slots, chunk):
    q = q_ref[...]
    sk = sk_ref[...]
    z, dp, gc, eg = _slot_terms(q, k_ref, v_ref, gc_ref, s_ref, sk,
                                sv_ref[...], do_ref[...], chunk)
    real = _slot_mask(z, num_slots)
    z = jnp.where(real, z * scale, 0.0)
    p = jnp.where(real, jnp.exp(z - lse_ref[...][:, None]), 0.0)
    dz = p * (dp - delta_ref[...][:, None])
    dq = dot((dz * eg).astype(q.dtype), sk.astype(q.dtype), trans_b=True)
    rows = irange(chunk)

    def body(i, dq):
        weight = _from(gc, gc_ref[i, :], rows, i) * s_ref[i, :][None, :]
        mix = jnp.sum(dz * weight, axis=1)
        return dq + mix[:, None] * k_ref[i, :].astype(jnp.float32)[None, :]

    dq_ref[...] = loop(0, chunk, body, dq) * scale
    dz_ref[...] = dz
    p_ref[...] = p
    # dL/dG_t from the readers at t (each carries the factor exp(G_t)).
    x_ref[...] = dz * z + p * dp


def _adjoint_kernel(q_ref, dz_ref, p_ref, do_ref, gc_ref, dsk_ref, dsv_ref,
                    lk_ref, lv_ref, dsk0_ref, dsv0_ref, *, scale, chunk,
                    chunks, groups):
    dtype = q_ref.dtype

    def body(r, carry):
        lk, lv = carry
        n = chunks - 1 - r
        lk_ref[n] = lk
        lv_ref[n] = lv
        rows = pl.ds(n * chunk, chunk)
        eg = jnp.exp(gc_ref[rows, :])
        decay = jnp.exp(gc_ref[n * chunk + chunk - 1, :])
        lk = lk * decay[None, :]
        lv = lv * decay[:, None]
        for g in range(groups):
            q = q_ref[rows, g, :]
            dz = dz_ref[rows, g, :]
            p = p_ref[rows, g, :]
            do = do_ref[rows, g, :]
            lk = lk + scale * dot_ta(q, (dz * eg).astype(dtype))
            lv = lv + dot_ta((p * eg).astype(dtype), do.astype(dtype))
        return lk, lv

    lk, lv = loop(0, chunks, body, (dsk_ref[...], dsv_ref[...]))
    dsk0_ref[...] = lk
    dsv0_ref[...] = lv


def _dkv_kernel(k_ref, v_ref, gc_ref, s_ref, lk_ref, lv_ref, q_ref, dz_ref,
                p_ref, do_ref, dk_ref, dv_ref, ds_ref, *, scale, chunk,
                groups):
    f32 = jnp.float32
    k = k_ref[...]
    v = v_ref[...]
    dtype = k.dtype
    gc = gc_ref[...]
    s = s_ref[...]
    lk = lk_ref[...].astype(dtype)
    lv = lv_ref[...].astype(dtype)
    # Writes at i reach the chunk end with exp(G_end - G_i) <= 1.
    to_end = jnp.exp(gc_ref[chunk - 1, :][None, :] - gc)
    dk = dot((s * to_end).astype(dtype), lk, trans_b=True)
    dv = dot((s * to_end).astype(dtype), lv)
    ds = to_end * (dot(k, lk) + dot(v.astype(dtype), lv, trans_b=True))
    kf, vf = k.astype(f32), v.astype(f32)
    rows = irange(chunk)

    def body(t, carry):
        dk, dv, ds = carry
        # exp(G_t - G_i) for writers i <= t.
        reach = jnp.exp(jnp.where(rows[:, None] <= t,
                                  gc_ref[t, :][None, :] - gc, -jnp.inf))
        for g in range(groups):
            q_t = q_ref[t, g, :].astype(f32)
            do_t = do_ref[t, g, :].astype(f32)
            by_key = scale * dz_ref[t, g, :][None, :] * reach
            by_value = p_ref[t, g, :][None, :] * reach
            ds = ds + by_key * jnp.sum(kf * q_t[None, :], axis=1)[:, None]
            ds = ds + by_value * jnp.sum(vf * do_t[None, :], axis=1)[:, None]
            dk = dk + jnp.sum(by_key * s, axis=1)[:, None] * q_t[None, :]
            dv = dv + jnp.sum(by_value * s, axis=1)[:, None] * do_t[None, :]
        return dk, dv, ds

    dk, dv, ds = loop(0, chunk, body, (dk, dv, ds))
    dk_ref[...] = dk
    dv_ref[...] = dv
    ds_ref[...] = ds


def _chunk_cumsum(g, chunk):
    """In-chunk inclusive cumsum of `g [B, T, Hkv, M]` (T % chunk == 0)."""
    batch, length = g.shape[:2]
    shaped = g.reshape((batch, length // chunk, chunk) + g.shape[2:])
    return jnp.cumsum(shaped, axis=2).reshape(g.shape)


def _specs_chunk(chunk, dim, groups=None):
    """A chunk of rows of `[B, T, H, dim]` for programs (n, b, head)."""
    if groups is None:
        return pl.BlockSpec((None, chunk, None, dim),
                            lambda n, b, h: (b, n, h, 0))
    return pl.BlockSpec((None, chunk, None, dim),
                        lambda n, b, h: (b, n, h // groups, 0))


def _states(k, v, gc, s, sk0, sv0, config):
    batch, length, kv_heads, key_dim = k.shape
    value_dim, slots = v.shape[-1], gc.shape[-1]
    chunk = config.chunk
    chunks = length // chunk
    whole = lambda dim: pl.BlockSpec((None, length, None, dim),
                                     lambda b, c: (b, 0, c, 0))
    return pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, chunks=chunks),
        grid=(batch, kv_heads),
        in_specs=[whole(key_dim), whole(value_dim), whole(slots),
                  whole(slots),
                  pl.BlockSpec((None, None, key_dim, slots),
                               lambda b, c: (b, c, 0, 0)),
                  pl.BlockSpec((None, None, slots, value_dim),
                               lambda b, c: (b, c, 0, 0))],
        out_specs=[
            pl.BlockSpec((None, None, chunks + 1, key_dim, slots),
                         lambda b, c: (b, c, 0, 0, 0)),
            pl.BlockSpec((None, None, chunks + 1, slots, value_dim),
                         lambda b, c: (b, c, 0, 0, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, chunks + 1, key_dim,
                                  slots), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, chunks + 1, slots,
                                  value_dim), jnp.float32)],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=config.interpret,
        name="nha_slot_states",
    )(k, v, gc, s, sk0, sv0)


def _state_spec(shape, groups):
    return pl.BlockSpec((None, None, None) + shape,
                        lambda n, b, h: (b, h // groups, n, 0, 0))


def _forward(q, k, v, g, sk0, sv0, scale, num_slots, config):
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim, slots = k.shape[2], v.shape[-1], g.shape[-1]
    groups, chunk = heads // kv_heads, config.chunk
    gc = _chunk_cumsum(g, chunk)
    s = -jnp.expm1(g)
    sk, sv = _states(k, v, gc, s, sk0, sv0, config)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, num_slots=num_slots,
                          chunk=chunk),
        grid=(length // chunk, batch, heads),
        in_specs=[_specs_chunk(chunk, key_dim),
                  _specs_chunk(chunk, key_dim, groups),
                  _specs_chunk(chunk, value_dim, groups),
                  _specs_chunk(chunk, slots, groups),
                  _specs_chunk(chunk, slots, groups),
                  _state_spec((key_dim, slots), groups),
                  _state_spec((slots, value_dim), groups)],
        out_specs=[_specs_chunk(chunk, value_dim),
                   pl.BlockSpec((None, None, chunk),
                                lambda n, b, h: (b, h, n))],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, value_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=config.interpret,
        name="nha_slot_forward",
    )(q, k, v, gc, s, sk, sv)
    return out, lse, sk, sv, gc, s


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
        `(out [B, T, H, V] f32, lse [B, H, T] f32, sk [B, Hkv, K, M],
        sv [B, Hkv, M, V])`, the last two being the memory after step T.
    """
    out, lse, sk, sv, _, _ = _forward(q, k, v, g, sk0, sv0, scale, num_slots,
                                      config)
    return out, lse, sk[:, :, -1], sv[:, :, -1]


def _slot_fwd(q, k, v, g, sk0, sv0, scale, num_slots, config):
    out, lse, sk, sv, gc, s = _forward(q, k, v, g, sk0, sv0, scale,
                                       num_slots, config)
    residuals = (q, k, v, g, gc, s, sk, sv, out, lse)
    return (out, lse, sk[:, :, -1], sv[:, :, -1]), residuals


def _slot_bwd(scale, num_slots, config, residuals, cotangents):
    q, k, v, g, gc, s, sk, sv, out, lse = residuals
    dout, dlse, dsk_end, dsv_end = cotangents
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim, slots = k.shape[2], v.shape[-1], g.shape[-1]
    groups, chunk = heads // kv_heads, config.chunk
    chunks = length // chunk
    params = compiler_params(config.num_warps, config.num_stages)
    delta = jnp.einsum("bthv,bthv->bht", out, dout) - dlse
    per_query = lambda dim: jax.ShapeDtypeStruct(
        (batch, length, heads, dim), jnp.float32)
    dq, dz, p, x = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, num_slots=num_slots,
                          chunk=chunk),
        grid=(chunks, batch, heads),
        in_specs=[_specs_chunk(chunk, key_dim),
                  _specs_chunk(chunk, key_dim, groups),
                  _specs_chunk(chunk, value_dim, groups),
                  _specs_chunk(chunk, slots, groups),
                  _specs_chunk(chunk, slots, groups),
                  _state_spec((key_dim, slots), groups),
                  _state_spec((slots, value_dim), groups),
                  _specs_chunk(chunk, value_dim),
                  pl.BlockSpec((None, None, chunk), lambda n, b, h: (b, h, n)),
                  pl.BlockSpec((None, None, chunk), lambda n, b, h: (b, h, n))],
        out_specs=[_specs_chunk(chunk, key_dim), _specs_chunk(chunk, slots),
                   _specs_chunk(chunk, slots), _specs_chunk(chunk, slots)],
        out_shape=[per_query(key_dim), per_query(slots), per_query(slots),
                   per_query(slots)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_slot_dq",
    )(q, k, v, gc, s, sk, sv, dout, lse, delta)

    grouped = lambda dim: pl.BlockSpec((None, length, groups, dim),
                                       lambda b, c: (b, 0, c, 0))
    lk, lv, dsk0, dsv0 = pl.pallas_call(
        functools.partial(_adjoint_kernel, scale=scale, chunk=chunk,
                          chunks=chunks, groups=groups),
        grid=(batch, kv_heads),
        in_specs=[grouped(key_dim), grouped(slots), grouped(slots),
                  grouped(value_dim),
                  pl.BlockSpec((None, length, None, slots),
                               lambda b, c: (b, 0, c, 0)),
                  pl.BlockSpec((None, None, key_dim, slots),
                               lambda b, c: (b, c, 0, 0)),
                  pl.BlockSpec((None, None, slots, value_dim),
                               lambda b, c: (b, c, 0, 0))],
        out_specs=[
            pl.BlockSpec((None, None, chunks, key_dim, slots),
                         lambda b, c: (b, c, 0, 0, 0)),
            pl.BlockSpec((None, None, chunks, slots, value_dim),
                         lambda b, c: (b, c, 0, 0, 0)),
            pl.BlockSpec((None, None, key_dim, slots),
                         lambda b, c: (b, c, 0, 0)),
            pl.BlockSpec((None, None, slots, value_dim),
                         lambda b, c: (b, c, 0, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, chunks, key_dim, slots),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, chunks, slots, value_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, key_dim, slots),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, slots, value_dim),
                                 jnp.float32)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_slot_adjoint",
    )(q, dz, p, dout, gc, dsk_end, dsv_end)

    group_chunk = lambda dim: pl.BlockSpec((None, chunk, groups, dim),
                                           lambda n, b, c: (b, n, c, 0))
    adjoint = lambda shape: pl.BlockSpec((None, None, None) + shape,
                                         lambda n, b, c: (b, c, n, 0, 0))
    per_kv = lambda dim: jax.ShapeDtypeStruct(
        (batch, length, kv_heads, dim), jnp.float32)
    dk, dv, ds = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, chunk=chunk,
                          groups=groups),
        grid=(chunks, batch, kv_heads),
        in_specs=[_specs_chunk(chunk, key_dim), _specs_chunk(chunk, value_dim),
                  _specs_chunk(chunk, slots), _specs_chunk(chunk, slots),
                  adjoint((key_dim, slots)), adjoint((slots, value_dim)),
                  group_chunk(key_dim), group_chunk(slots),
                  group_chunk(slots), group_chunk(value_dim)],
        out_specs=[_specs_chunk(chunk, key_dim), _specs_chunk(chunk, value_dim),
                   _specs_chunk(chunk, slots)],
        out_shape=[per_kv(key_dim), per_kv(value_dim), per_kv(slots)],
        compiler_params=params,
        interpret=config.interpret,
        name="nha_slot_dkv",
    )(k, v, gc, s, lk, lv, q, dz, p, dout)

    # dL/dG per step: readers (summed over the group) minus writers, plus
    # the returned memory, which reads G at the last step.
    x = x.reshape(batch, length, kv_heads, groups, slots).sum(axis=3)
    x = x - ds * s
    final = (jnp.einsum("bckm,bckm->bcm", dsk_end, sk[:, :, -1])
             + jnp.einsum("bcmv,bcmv->bcm", dsv_end, sv[:, :, -1]))
    x = x.at[:, -1].add(final)
    dg = jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1) - ds * jnp.exp(g)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dg.astype(g.dtype), dsk0, dsv0)


slot_attention.defvjp(_slot_fwd, _slot_bwd)
