"""NHA's two Pallas passes under one VJP.

The slot pass (`slots.slot_forward`) gives its slot-normalised output o_s
and log-sum-exp lse_s; they seed the window pass's online softmax
(`window.window_forward`), which returns NHA's output o and joint lse L.
The backward needs no slot-normalised cotangent: with L, delta =
rowsum(o * do) and the output's cotangent do, both passes' backward kernels
(`window.window_gradients`, `slots.slot_gradients`) give the joint
softmax's gradient directly, since their probabilities are exp(logit - L).
So o_s is never kept for the backward and no per-pass cotangent is formed.
"""

import functools

import jax
import jax.numpy as jnp

from keras_nha.kernels.pallas.slots import slot_forward
from keras_nha.kernels.pallas.slots import slot_gradients
from keras_nha.kernels.pallas.window import accepts_slot_grads
from keras_nha.kernels.pallas.window import window_forward
from keras_nha.kernels.pallas.window import window_gradients


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def joint_attention(q, qw, k, v, g, sk0, sv0, kw, history_values, mask,
                    scale, capacity, num_slots, config):
    """NHA over padded streams: slots and window, one softmax.

    Args:
        q: `[B, T, H, K]` slot queries.
        qw: `[B, T, H, K]` window queries.
        k, v, g: `[B, T, Hkv, ...]` keys, values and float32 log gates fed
            to the slots (g is 0 where nothing is fed).
        sk0, sv0: float32 slot memory before the first step.
        kw: `[B, L, Hkv, K]` history window keys (L >= T + capacity), or
            `(ring, new)` parts (`window.py`).
        history_values: `[B, L, Hkv, V]` history values, parted as `kw`.
        mask: `[B, L]` float, 1 where the history row is a real token,
            parted as `kw`.
        scale: logit scale.
        capacity: the window C (query t sees history rows t+1 .. t+C).
        num_slots: the real slot count (columns past it are padding).
        config: a `KernelConfig`.

    Returns:
        `(out [B, T, H, V] in qw's dtype, sk_end, sv_end)`: the output and
        the slot memory after step T (float32).
    """
    return _joint_fwd(q, qw, k, v, g, sk0, sv0, kw, history_values, mask,
                      scale, capacity, num_slots, config)[0]


def _joint_fwd(q, qw, k, v, g, sk0, sv0, kw, history_values, mask, scale,
               capacity, num_slots, config):
    out_s, lse_s, sk_end, sv_end, slot_residuals = slot_forward(
        q, k, v, g, sk0, sv0, scale, num_slots, config)
    out, lse = window_forward(qw, kw, history_values, mask, (out_s, lse_s),
                              scale, capacity, config)
    saved = (slot_residuals, qw, kw, history_values, mask, out, lse)
    return (out, sk_end, sv_end), saved


def _joint_bwd(scale, capacity, num_slots, config, saved, cotangents):
    slot_residuals, qw, kw, history_values, mask, out, lse = saved
    dout, dsk_end, dsv_end = cotangents
    f32 = jnp.float32
    delta = jnp.einsum("bthv,bthv->bht", out.astype(f32), dout.astype(f32))
    # Cast once: every kernel feeds it to the tensor cores in this dtype.
    dout = dout.astype(jax.tree.leaves(history_values)[0].dtype)
    # A fresh sequence (`sequence.py`): the fed values are the history's
    # (and so may the keys and queries be): the window's kernels can add
    # the slots' gradients of them to their own.
    into_window = ()
    if config.grads_into_window and accepts_slot_grads(kw, config.fed_lag,
                                                       config):
        into_window = ("dv",) + ("dk",) * config.shared_key + (
            "dq",) * config.shared_query
    dq, dk, dv, dg, dsk0, dsv0 = slot_gradients(
        slot_residuals, dout, lse, delta, dsk_end, dsv_end, scale, num_slots,
        config, as_fed=into_window)
    slot = {"dq": dq, "dk": dk, "dv": dv}
    dqw, dkw, dvw = window_gradients(
        qw, kw, history_values, mask, dout, lse, delta, scale, capacity,
        config, {n: slot[n] for n in into_window}, config.fed_lag)
    dq, dk, dv = (jnp.zeros_like(slot[n]) if n in into_window else slot[n]
                  for n in ("dq", "dk", "dv"))
    return (dq, dqw, dk, dv, dg, dsk0, dsv0, dkw, dvw,
            jax.tree.map(jnp.zeros_like, mask))


joint_attention.defvjp(_joint_fwd, _joint_bwd)
