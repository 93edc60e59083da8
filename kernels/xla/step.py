"""The portable one-token decode step (`kernels/step.py`), compiled by XLA.

One fused program per (window_size, scale): write the token leaving the
window into the slots, put the new token into the ring, then one softmax over
[slot logits | ring logits]. Its cost does not grow with the context.
"""

import functools

import tensorflow as tf

from keras_nha.kernels.step import nha_step


@functools.lru_cache(maxsize=None)
def compiled_step(window_size, scale):
    """The XLA-compiled step for one (window_size, scale), cached."""
    def step(query, key, value, log_forget_gate, window_query, window_key,
             padding_mask, state):
        return nha_step(query, key, value, log_forget_gate, state,
                        window_size=window_size, scale=scale,
                        window_query=window_query, window_key=window_key,
                        padding_mask=padding_mask)
    return tf.function(step, jit_compile=True)


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
