"""`pallas_step`: one NHA decode step with a Pallas readout kernel.

The state update (the token leaving the window enters the slots, the new
token takes its ring entry) is a handful of O(state) array updates that XLA
does in place under `jit` with a donated state. The readout — slot logits,
window logits over the ring and ONE softmax — is a Pallas kernel per
(batch row, kv head) that serves the whole query group at once: the slot
memory and the ring are read once per kv head, whatever the group size.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.pallas.common import MASKED
from keras_nha.kernels.pallas.common import compiler_params
from keras_nha.kernels.pallas.common import dot
from keras_nha.kernels.pallas.common import irange
from keras_nha.kernels.pallas.common import loop
from keras_nha.kernels.pallas.common import pad_axis
from keras_nha.kernels.pallas.common import padded_size
from keras_nha.kernels.pallas.common import round_up
from keras_nha.kernels.pallas.sharding import per_shard_readout

# Shardy factors of the readout's operands (queries, window queries, slot
# keys, slot values, ring keys, ring values, ring mask) and of its output.
_READOUT_FACTORS = ("b c g k", "b c g k", "b c k m", "b c m v", "b r c k",
                    "b r c v", "b r")
_READOUT_OUT_FACTORS = "b c g v"


def _readout_kernel(q_ref, qw_ref, sk_ref, sv_ref, k_ref, v_ref, mask_ref,
                    o_ref, *, scale, num_slots, block, blocks):
    f32 = jnp.float32
    rows = q_ref.shape[0]
    top = jnp.full((rows,), -jnp.inf, f32)
    total = jnp.zeros((rows,), f32)
    acc = jnp.zeros((rows, o_ref.shape[-1]), f32)
    if num_slots:
        logits = dot(q_ref[...].astype(f32), sk_ref[...]) * scale
        logits = jnp.where((irange(logits.shape[1]) < num_slots)[None, :],
                           logits, -jnp.inf)
        top = jnp.max(logits, axis=1)
        weights = jnp.exp(logits - top[:, None])
        total = jnp.sum(weights, axis=1)
        acc = dot(weights, sv_ref[...])
    if blocks:
        qw = qw_ref[...]

        def body(j, carry):
            acc, top, total = carry
            entries = pl.ds(j * block, block)
            k = k_ref[entries, :]
            v = v_ref[entries, :]
            logits = dot(qw.astype(k.dtype), k, trans_b=True) * scale
            logits = jnp.where(mask_ref[entries][None, :] > 0, logits, MASKED)
            new_top = jnp.maximum(top, jnp.max(logits, axis=1))
            correction = jnp.exp(top - new_top)
            weights = jnp.exp(logits - new_top[:, None])
            total = total * correction + jnp.sum(weights, axis=1)
            acc = acc * correction[:, None] + dot(weights.astype(v.dtype), v)
            return acc, new_top, total

        acc, top, total = loop(0, blocks, body, (acc, top, total))
    o_ref[...] = acc / total[:, None]


def _readout(queries, window_queries, slot_keys, slot_values, ring_keys,
             ring_values, ring_mask, *, scale, num_slots, block, blocks,
             interpret):
    """The readout kernel over a grid of (batch row, kv head)."""
    batch, kv_heads, group_pad, key_pad = queries.shape
    slot_pad, value_pad = slot_values.shape[2:]
    ring_pad = ring_keys.shape[1]
    per_head = lambda *dims: pl.BlockSpec(
        (None, None) + dims, lambda b, c: (b, c) + (0,) * len(dims))
    ring = lambda dim: pl.BlockSpec((None, ring_pad, None, dim),
                                    lambda b, c: (b, 0, c, 0))
    return pl.pallas_call(
        functools.partial(_readout_kernel, scale=scale, num_slots=num_slots,
                          block=block, blocks=blocks),
        grid=(batch, kv_heads),
        in_specs=[per_head(group_pad, key_pad), per_head(group_pad, key_pad),
                  per_head(key_pad, slot_pad), per_head(slot_pad, value_pad),
                  ring(key_pad), ring(value_pad),
                  pl.BlockSpec((None, ring_pad), lambda b, c: (b, 0))],
        out_specs=per_head(group_pad, value_pad),
        out_shape=jax.ShapeDtypeStruct(
            (batch, kv_heads, group_pad, value_pad), jnp.float32),
        compiler_params=compiler_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nha_decode_readout",
    )(queries, window_queries, slot_keys, slot_values, ring_keys,
      ring_values, ring_mask)


def _write_into_slots(slot_keys, slot_values, key, value, log_gate):
    alpha = jnp.exp(log_gate)
    strength = -jnp.expm1(log_gate)
    slot_keys = (slot_keys * alpha[:, :, None, :]
                 + key[:, :, :, None] * strength[:, :, None, :])
    slot_values = (slot_values * alpha[:, :, :, None]
                   + strength[:, :, :, None] * value[:, :, None, :])
    return slot_keys, slot_values


def advance_state(key, value, log_forget_gate, state, window_size,
                  window_key, padding_mask):
    """The state after one token (exactly `kernels.step.nha_step`'s)."""
    acc = state["slot_keys"].dtype
    batch = key.shape[0]
    capacity = state_lib.capacity_of(state)
    real = (jnp.ones((batch,), acc) if padding_mask is None
            else jnp.asarray(padding_mask).astype(acc))
    gate = log_forget_gate.astype(acc) * real[:, None, None]
    slot_keys, slot_values = state["slot_keys"], state["slot_values"]
    position = state["position"]
    new_state = dict(state, position=position + 1)
    if capacity == 0:
        slot_keys, slot_values = _write_into_slots(
            slot_keys, slot_values, key.astype(acc), value.astype(acc), gate)
    else:
        here = jnp.mod(position, capacity)
        if capacity == window_size:
            take = lambda n: lax.dynamic_index_in_dim(
                state[n], here, axis=1, keepdims=False).astype(acc)
            slot_keys, slot_values = _write_into_slots(
                slot_keys, slot_values, take("keys"), take("values"),
                take("log_forget_gates"))
        token = {"keys": key, "window_keys": window_key, "values": value,
                 "log_forget_gates": gate, "mask": real}
        for n, now in token.items():
            new_state[n] = lax.dynamic_update_index_in_dim(
                state[n], now.astype(state[n].dtype), here, axis=1)
    new_state["slot_keys"], new_state["slot_values"] = slot_keys, slot_values
    return new_state


def pallas_step(query, key, value, log_forget_gate, state, *, window_size,
                scale, window_query, window_key, padding_mask,
                interpret=None):
    """One decode step (the `kernels.step.nha_step` contract).

    Args:
        query: `[B, H, K]`; key `[B, Hkv, K]`; value `[B, Hkv, V]`;
            log_forget_gate `[B, Hkv, M]`; window_query/window_key like
            query/key; padding_mask `[B]` or None.
        state: the state dict (`kernels.state`).
        window_size: W.
        scale: logit scale.
        interpret: run the kernel in Pallas' interpreter (default: off GPU).

    Returns:
        `(output [B, H, V] in the query dtype, new_state)`.

    Example:

    >>> state = keras_nha.ops.initial_state(1, 2, 32, 32, 16, 8)
    >>> q = jnp.ones((1, 4, 32)); k = v = jnp.ones((1, 2, 32))
    >>> out, state = pallas_step(q, k, v, jnp.full((1, 2, 16), -0.1), state,
    ...     window_size=8, scale=32 ** -0.5, window_query=q, window_key=k,
    ...     padding_mask=None)
    >>> out.shape
    (1, 4, 32)
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    new_state = advance_state(key, value, log_forget_gate, state, window_size,
                              window_key, padding_mask)
    batch, heads, key_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    num_slots = log_forget_gate.shape[-1]
    groups = heads // kv_heads
    capacity = state_lib.capacity_of(state)
    key_pad, value_pad = padded_size(key_dim), padded_size(value_dim)
    slot_pad = padded_size(num_slots)
    group_pad = padded_size(groups)
    block = min(64, padded_size(capacity)) if capacity else 16
    ring_pad = round_up(capacity, block) if capacity else block

    def queries(x):
        x = x.reshape(batch, kv_heads, groups, key_dim)
        return pad_axis(pad_axis(x, 2, group_pad), 3, key_pad)

    slot_keys = pad_axis(pad_axis(new_state["slot_keys"].astype(jnp.float32),
                                  2, key_pad), 3, slot_pad)
    slot_values = pad_axis(pad_axis(
        new_state["slot_values"].astype(jnp.float32), 2, slot_pad), 3,
        value_pad)
    if capacity:
        ring_keys = pad_axis(pad_axis(new_state["window_keys"], 1, ring_pad),
                             3, key_pad)
        ring_values = pad_axis(pad_axis(new_state["values"], 1, ring_pad), 3,
                               value_pad)
        ring_mask = pad_axis(new_state["mask"].astype(jnp.float32), 1,
                             ring_pad)
    else:
        ring_keys = jnp.zeros((batch, block, kv_heads, key_pad), key.dtype)
        ring_values = jnp.zeros((batch, block, kv_heads, value_pad),
                                value.dtype)
        ring_mask = jnp.zeros((batch, block), jnp.float32)

    # Per shard: each device reads its own rows' and kv heads' cache.
    readout = per_shard_readout(
        functools.partial(_readout, scale=scale, num_slots=num_slots,
                          block=block, interpret=interpret,
                          blocks=ring_pad // block if capacity else 0),
        _READOUT_FACTORS, _READOUT_OUT_FACTORS)
    out = readout(queries(query), queries(window_query), slot_keys,
                  slot_values, ring_keys, ring_values, ring_mask)
    out = out[:, :, :groups, :value_dim].reshape(batch, heads, value_dim)
    return out.astype(query.dtype), new_state
