"""One-token NHA decode step compiled with XLA (contract of `nha_step`).

One fused program per (window_size, scale, shapes): write the token leaving
the window into the slots, put the new token into the ring, then one softmax
over [slot logits | ring logits]. Cost is constant in the context length.
"""

import tensorflow as tf

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.xla.window import MASKED_LOGIT

_COMPILED = {}


def _write_into_slots(slot_keys, slot_values, key, value, log_gate):
    """S <- S * alpha + outer(key, 1 - alpha); log gate 0 leaves S as is."""
    alpha = tf.exp(log_gate)  # [B, Hkv, M]
    strength = 1.0 - alpha
    slot_keys = (slot_keys * alpha[:, :, None, :]
                 + key[:, :, :, None] * strength[:, :, None, :])
    slot_values = (slot_values * alpha[:, :, :, None]
                   + strength[:, :, :, None] * value[:, :, None, :])
    return slot_keys, slot_values


def _step(query, key, value, log_forget_gate, window_query, window_key,
          padding_mask, state, *, window_size, scale):
    acc = state_lib.state_dtype(query.dtype.name)
    num_heads, key_dim = query.shape[1:]
    kv_heads = key.shape[1]
    groups = num_heads // kv_heads
    capacity = state_lib.capacity_of(state)
    position = state["position"]

    real = (tf.ones(tf.shape(query)[:1], acc) if padding_mask is None
            else tf.cast(padding_mask, acc))
    token = {"keys": tf.cast(key, acc), "window_keys": window_key,
             "values": tf.cast(value, acc),
             "log_forget_gates": tf.cast(log_forget_gate, acc)
             * real[:, None, None],
             "mask": real}
    slot_keys, slot_values = state["slot_keys"], state["slot_values"]
    new_state = dict(state, position=position + 1)
    if capacity == 0:
        # W = 0: the token enters the slots before it reads them (GSA).
        slot_keys, slot_values = _write_into_slots(
            slot_keys, slot_values, token["keys"], token["values"],
            token["log_forget_gates"])
    else:
        index = tf.math.floormod(position, capacity)
        if capacity == window_size:
            # The ring entry we overwrite is token t - W, leaving the window.
            leaving = {n: tf.cast(tf.gather(state[n], index, axis=1), acc)
                       for n in ("keys", "values", "log_forget_gates")}
            slot_keys, slot_values = _write_into_slots(
                slot_keys, slot_values, leaving["keys"], leaving["values"],
                leaving["log_forget_gates"])
        here = tf.equal(tf.range(capacity), index)
        for name, now in token.items():
            ring = state[name]
            shape = [1, capacity] + [1] * (len(ring.shape) - 2)
            new_state[name] = tf.where(tf.reshape(here, shape),
                                       tf.cast(now[:, None], ring.dtype), ring)
    new_state["slot_keys"], new_state["slot_values"] = slot_keys, slot_values

    def grouped(x):
        return tf.reshape(tf.cast(x, acc), [-1, kv_heads, groups, key_dim])

    logits, readouts = [], []
    if log_forget_gate.shape[-1]:
        logits.append(scale * tf.einsum("bhgk,bhkm->bhgm", grouped(query),
                                        slot_keys))
        readouts.append(lambda p: tf.einsum("bhgm,bhmv->bhgv", p,
                                            slot_values))
    if capacity:
        ring_logits = scale * tf.einsum(
            "bhgk,bchk->bhgc", grouped(window_query),
            tf.cast(new_state["window_keys"], acc))
        valid = new_state["mask"][:, None, None, :] > 0
        logits.append(tf.where(valid, ring_logits,
                               tf.constant(MASKED_LOGIT, acc)))
        ring_values = tf.cast(new_state["values"], acc)
        readouts.append(lambda p: tf.einsum("bhgc,bchv->bhgv", p,
                                            ring_values))
    probs = tf.nn.softmax(tf.concat(logits, axis=-1), axis=-1)
    sizes = [x.shape[-1] for x in logits]
    output = tf.add_n([read(p) for read, p in
                       zip(readouts, tf.split(probs, sizes, axis=-1))])
    output = tf.reshape(output, [-1, num_heads, output.shape[-1]])
    return tf.cast(output, query.dtype), new_state


def compiled_step(window_size, scale):
    """The XLA-compiled step for one (window_size, scale), cached."""
    key = (window_size, scale)
    if key not in _COMPILED:
        def step(query, key, value, log_forget_gate, window_query,
                 window_key, padding_mask, state):
            return _step(query, key, value, log_forget_gate, window_query,
                         window_key, padding_mask, state,
                         window_size=window_size, scale=scale)
        _COMPILED[key] = tf.function(step, jit_compile=True)
    return _COMPILED[key]


def xla_nha_step(query, key, value, log_forget_gate, state, *, window_size,
                 scale, window_query, window_key, padding_mask):
    """One decode step, compiled with XLA (same contract as `nha_step`).

    Args:
        query: `[B, H, K]`.
        key: `[B, Hkv, K]`.
        value: `[B, Hkv, V]`.
        log_forget_gate: `[B, Hkv, M]`.
        state: the NHA state dict (see `kernels/state.py`).
        window_size: Python int W the state was built for.
        scale: Python float.
        window_query: `[B, H, K]`.
        window_key: `[B, Hkv, K]`.
        padding_mask: `[B]` or None.

    Returns:
        `(output [B, H, V] in the query's dtype, new_state)`.

    Example:

    >>> state = keras_nha.ops.initial_state(1, 2, 16, 16, 8, 4)
    >>> q = tf.random.normal((1, 4, 16))
    >>> k = v = tf.random.normal((1, 2, 16))
    >>> g = tf.math.log_sigmoid(tf.random.normal((1, 2, 8)))
    >>> out, state = xla_nha_step(q, k, v, g, state, window_size=4,
    ...                           scale=0.25, window_query=q, window_key=k,
    ...                           padding_mask=None)
    >>> out.shape
    TensorShape([1, 4, 16])
    """
    return compiled_step(window_size, float(scale))(
        query, key, value, log_forget_gate, window_query, window_key,
        padding_mask, state)
