"""The XLA sequence kernel: `chunked_nha`'s contract, compiled by XLA.

Builds the shifted history stream (ring oldest-first, then the new tokens)
exactly like `kernels/chunked.py`, lays it out in tiled rows and hands it to the
custom-gradient core. Each (window_size, scale) gets one `tf.function`
compiled with XLA; it traces once per input shape and dtype.
"""

import tensorflow as tf

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.xla import core
from keras_nha.kernels.xla import layout

_COMPILED = {}


def _history(state, new, start, acc):
    """Ring (oldest first) then the new rows, `[B, C + T, ...]` in acc."""
    return {n: tf.concat([
        tf.cast(state_lib.ring_to_chronological(state[n], start), acc),
        tf.cast(new[n], acc)], axis=1) for n in state_lib.RING_NAMES}


def _nha(query, key, value, log_forget_gate, window_query, window_key,
         padding_mask, state, *, window_size, scale, sizes):
    acc = state_lib.state_dtype(query.dtype.name)
    length, num_heads, _ = query.shape[1:]
    kv_heads, num_slots = key.shape[2], log_forget_gate.shape[-1]
    capacity = state_lib.capacity_of(state)
    feeds = capacity == window_size and num_slots > 0
    tiling = layout.make_tiling(length, capacity, sizes)
    config = core.Config(tiling=tiling, capacity=capacity,
                         num_slots=num_slots, feeds=feeds, scale=scale)
    start = state["position"]

    real = (tf.ones(tf.shape(query)[:2], acc) if padding_mask is None
            else tf.cast(padding_mask, acc))
    new = {"keys": key, "window_keys": window_key, "values": value,
           "log_forget_gates": tf.cast(log_forget_gate, acc)
           * real[:, :, None, None],
           "mask": real}
    history = _history(state, new, start, acc)

    def grouped(x):
        return layout.to_rows(
            layout.group_query_heads(tf.cast(x, acc), kv_heads), tiling.rows)

    inputs = {}
    if num_slots:
        inputs["slot_query"] = grouped(query)
        for name in ("slot_keys", "slot_values"):
            inputs[name] = tf.reshape(state[name],
                                      [-1] + list(state[name].shape[2:]))
        if feeds:
            # History row t is the token leaving the window at step t.
            for name, source in (("fed_keys", "keys"),
                                 ("fed_values", "values"),
                                 ("fed_log_gates", "log_forget_gates")):
                inputs[name] = layout.to_rows(history[source][:, :length],
                                              tiling.rows)
    if capacity:
        inputs["window_query"] = grouped(window_query)
        mask = tf.tile(history["mask"][:, 1:, None], [1, 1, kv_heads])
        for name, source in (("window_keys", history["window_keys"][:, 1:]),
                             ("window_values", history["values"][:, 1:]),
                             ("window_mask", mask)):
            inputs[name] = layout.to_rows(source, tiling.key_rows)

    out, memory = core.nha_core(config, inputs)
    out = layout.from_rows(out, length, kv_heads)
    out = tf.reshape(out, [-1, length, num_heads, out.shape[-1]])

    end = start + length
    new_state = {"position": end}
    if memory is None:
        new_state["slot_keys"] = state["slot_keys"]
        new_state["slot_values"] = state["slot_values"]
    else:
        new_state["slot_keys"] = tf.reshape(memory[0],
                                            tf.shape(state["slot_keys"]))
        new_state["slot_values"] = tf.reshape(memory[1],
                                              tf.shape(state["slot_values"]))
    for n in state_lib.RING_NAMES:
        last = history[n][:, length:]
        new_state[n] = tf.cast(state_lib.chronological_to_ring(last, end),
                               state[n].dtype)
    return tf.cast(out, query.dtype), new_state


def compiled(window_size, scale):
    """The XLA-compiled kernel for one (window_size, scale), cached."""
    sizes = layout.current_sizes()
    key = (window_size, scale, sizes)
    if key not in _COMPILED:
        def kernel(query, key, value, log_forget_gate, window_query,
                   window_key, padding_mask, state):
            return _nha(query, key, value, log_forget_gate, window_query,
                        window_key, padding_mask, state,
                        window_size=window_size, scale=scale, sizes=sizes)
        _COMPILED[key] = tf.function(kernel, jit_compile=True)
    return _COMPILED[key]


def xla_nha(query, key, value, log_forget_gate, *, window_size, scale,
            window_query, window_key, padding_mask, state):
    """NHA over a sequence, compiled with XLA (same contract as chunked_nha).

    Args:
        query: `[B, T, H, K]`; T must be static.
        key: `[B, T, Hkv, K]`.
        value: `[B, T, Hkv, V]`.
        log_forget_gate: `[B, T, Hkv, M]`, entries <= 0.
        window_size: Python int W.
        scale: Python float.
        window_query: `[B, T, H, K]`.
        window_key: `[B, T, Hkv, K]`.
        padding_mask: `[B, T]` or None.
        state: the NHA state dict (see `kernels/state.py`).

    Returns:
        `(output [B, T, H, V] in the query's dtype, new_state)`.

    Example:

    >>> state = keras_nha.ops.initial_state(1, 2, 16, 16, 8, 4)
    >>> q = tf.random.normal((1, 10, 4, 16))
    >>> k = v = tf.random.normal((1, 10, 2, 16))
    >>> g = tf.math.log_sigmoid(tf.random.normal((1, 10, 2, 8)))
    >>> out, state = xla_nha(q, k, v, g, window_size=4, scale=0.25,
    ...                      window_query=q, window_key=k,
    ...                      padding_mask=None, state=state)
    >>> out.shape
    TensorShape([1, 10, 4, 16])
    """
    return compiled(window_size, float(scale))(
        query, key, value, log_forget_gate, window_query, window_key,
        padding_mask, state)
