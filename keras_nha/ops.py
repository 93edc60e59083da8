"""Native Hybrid Attention as a backend-agnostic Keras operation.

The README's "What is computed" section states the math: M gated slots fed by
the tokens that left a sliding window of W tokens, both read with ONE softmax.
"""

import keras
from keras import KerasTensor
from keras import Operation

from keras_nha import backends
from keras_nha import validation
from keras_nha.kernels import state as state_lib

__all__ = ["native_hybrid_attention", "native_hybrid_attention_step",
           "initial_state"]

# A ring this long must be asked for explicitly (max_length), not by accident.
_LARGEST_IMPLICIT_RING = 1 << 20


def initial_state(batch_size, num_kv_heads, key_dim, value_dim, num_slots,
                  window_size, *, max_length=None, dtype="float32"):
    """An empty NHA state for streaming or decoding.

    Args:
        batch_size: rows in the batch.
        num_kv_heads: key/value heads (Hkv).
        key_dim: K, the key and query head dim.
        value_dim: V, the value head dim.
        num_slots: M, the slot count.
        window_size: W, the window the state will be used with.
        max_length: the longest sequence this state will see (prefill plus
            decode). The ring keeps `min(window_size, max_length)` tokens, so
            a global layer (W >= any length) stays bounded.
        dtype: dtype of the window keys and values in the ring. Slot memory
            and gates are float32 (float64 for float64).

    Returns:
        A dict of tensors (see `keras_nha.kernels.state`).

    Example:

    >>> state = keras_nha.ops.initial_state(2, 4, 64, 64, 32, 128)
    >>> state["slot_keys"].shape
    (2, 4, 64, 32)
    """
    validation.check_window_size(window_size)
    capacity = window_size
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or (
                max_length < 1):
            raise ValueError(f"`max_length`: expected a Python int >= 1, got "
                             f"{max_length!r}.")
        capacity = min(window_size, max_length)
    elif window_size > _LARGEST_IMPLICIT_RING:
        raise ValueError(
            f"`window_size`: a ring of {window_size} tokens is too large to "
            "allocate; pass `max_length` (the longest sequence you will run).")
    if num_slots == 0 and window_size == 0:
        raise ValueError("`window_size`: expected > 0 when `num_slots` is 0.")
    return state_lib.zero_state(batch_size, num_kv_heads, key_dim, value_dim,
                                num_slots, capacity, dtype)


def _is_symbolic(tensors):
    return any(isinstance(x, KerasTensor)
               for x in keras.tree.flatten(tensors))


def _spec_like(state):
    """Symbolic tensors of a state's shapes and dtypes (what a call returns)."""
    return {name: KerasTensor(x.shape, x.dtype) for name, x in state.items()}


class NativeHybridAttention(Operation):
    """`native_hybrid_attention` as an operation of a functional model.

    The Python arguments live on the operation; the tensors (the optional
    ones may be None) are its call arguments, so a functional model replays
    the exact call it was built with.
    """

    def __init__(self, window_size, *, scale=None, return_state=False,
                 implementation="auto", chunk_size=None, name=None):
        super().__init__(name=name)
        self.window_size = window_size
        self.scale = scale
        self.return_state = return_state
        self.implementation = implementation
        self.chunk_size = chunk_size

    def call(self, query, key, value, log_forget_gate, window_query=None,
             window_key=None, padding_mask=None, initial_state=None):
        return native_hybrid_attention(
            query, key, value, log_forget_gate, self.window_size,
            scale=self.scale, window_query=window_query,
            window_key=window_key, padding_mask=padding_mask,
            initial_state=initial_state, return_state=self.return_state,
            implementation=self.implementation, chunk_size=self.chunk_size)

    def compute_output_spec(self, query, key, value, log_forget_gate,
                            window_query=None, window_key=None,
                            padding_mask=None, initial_state=None):
        output = KerasTensor(query.shape[:-1] + (value.shape[-1],),
                             dtype=query.dtype)
        if not self.return_state:
            return output
        if initial_state is not None:
            return output, _spec_like(initial_state)
        batch, time = query.shape[:2]
        kv_heads, key_dim, value_dim = key.shape[2], key.shape[3], value.shape[3]
        num_slots = log_forget_gate.shape[-1]
        capacity = self.window_size if time is None else min(self.window_size,
                                                             time)
        acc = state_lib.state_dtype(query.dtype)
        state = {
            "slot_keys": KerasTensor((batch, kv_heads, key_dim, num_slots), acc),
            "slot_values": KerasTensor((batch, kv_heads, num_slots, value_dim),
                                       acc),
            "keys": KerasTensor((batch, capacity, kv_heads, key_dim),
                                key.dtype),
            "window_keys": KerasTensor((batch, capacity, kv_heads, key_dim),
                                       key.dtype),
            "values": KerasTensor((batch, capacity, kv_heads, value_dim),
                                  value.dtype),
            "log_forget_gates": KerasTensor(
                (batch, capacity, kv_heads, num_slots), acc),
            "mask": KerasTensor((batch, capacity), acc),
            "position": KerasTensor((), "int32"),
        }
        return output, state


class NativeHybridAttentionStep(Operation):
    """`native_hybrid_attention_step` as an operation of a functional model."""

    def __init__(self, window_size, *, scale=None, implementation="auto",
                 name=None):
        super().__init__(name=name)
        self.window_size = window_size
        self.scale = scale
        self.implementation = implementation

    def call(self, query, key, value, log_forget_gate, state,
             window_query=None, window_key=None, padding_mask=None):
        return native_hybrid_attention_step(
            query, key, value, log_forget_gate, state, self.window_size,
            scale=self.scale, window_query=window_query,
            window_key=window_key, padding_mask=padding_mask,
            implementation=self.implementation)

    def compute_output_spec(self, query, key, value, log_forget_gate, state,
                            *args):
        output = KerasTensor(query.shape[:-1] + (value.shape[-1],),
                             dtype=query.dtype)
        return output, _spec_like(state)


def native_hybrid_attention(query, key, value, log_forget_gate, window_size, *,
                            scale=None, window_query=None, window_key=None,
                            padding_mask=None, initial_state=None,
                            return_state=False, implementation="auto",
                            chunk_size=None):
    """Native Hybrid Attention over a sequence.

    Token t attends, with one softmax, to M slots (written by the tokens that
    left its window, through a per-slot gated recurrence) and to the last
    `window_size` tokens (itself included). W = 0 is Gated Slot Attention;
    W >= T is full causal attention plus M zero "sink" logits; M = 0 is
    sliding-window attention.

    Args:
        query: `[B, T, H, K]`, reads the slots.
        key: `[B, T, Hkv, K]`, written into the slots; H % Hkv == 0.
        value: `[B, T, Hkv, V]`, shared by slots and window.
        log_forget_gate: `[B, T, Hkv, M]`, log(alpha) <= 0 (positive entries
            are a bug of the caller; checked for eager CPU tensors only).
        window_size: Python int W >= 0.
        scale: logit scale, default `K ** -0.5`.
        window_query: `[B, T, H, K]` for window logits (e.g. with rotary
            embedding); defaults to `query`.
        window_key: `[B, T, Hkv, K]` for window logits; defaults to `key`.
        padding_mask: `[B, T]`, 1 for real tokens. Padded tokens never enter
            the slots nor the window; their outputs are finite but arbitrary.
        initial_state: a state from `initial_state()` or an earlier call with
            `return_state=True`, to continue a sequence.
        return_state: also return the state after the last token.
        implementation: "auto" (fastest available), "reference" (step by
            step, slow), "chunked" (portable), or a backend kernel:
            "triton" (torch), "pallas" (jax), "xla" (tensorflow).
        chunk_size: block length of the "chunked" path (default 32; its
            memory grows with chunk_size * M per token, so small models run
            faster with 8-16). The other implementations choose their own.

    Returns:
        `[B, T, H, V]` in the query's dtype, and the state if `return_state`.

    Example:

    >>> q = keras.random.normal((2, 100, 4, 32))
    >>> k = v = keras.random.normal((2, 100, 2, 32))
    >>> g = keras.ops.log_sigmoid(keras.random.normal((2, 100, 2, 16)))
    >>> keras_nha.ops.native_hybrid_attention(q, k, v, g, 32).shape
    (2, 100, 4, 32)
    """
    validation.check_implementation(implementation)
    validation.check_chunk_size(chunk_size)
    batch, time, _, kv_heads, key_dim, value_dim, num_slots = (
        validation.check_inputs(query, key, value, log_forget_gate,
                                window_size, window_query, window_key,
                                padding_mask))
    scale = validation.check_scale(scale, key_dim)
    tensors = (query, key, value, log_forget_gate, window_query, window_key,
               padding_mask, initial_state)
    if _is_symbolic(tensors):
        return NativeHybridAttention(
            window_size, scale=scale, return_state=return_state,
            implementation=implementation, chunk_size=chunk_size,
        ).symbolic_call(*tensors)
    validation.check_gates_nonpositive(log_forget_gate)
    if initial_state is not None:
        validation.check_state(initial_state, batch, kv_heads, key_dim,
                               value_dim, num_slots, window_size, time)
    call = dict(query=query, key=key, value=value,
                log_forget_gate=log_forget_gate, window_size=window_size,
                scale=scale,
                window_query=query if window_query is None else window_query,
                window_key=key if window_key is None else window_key,
                padding_mask=padding_mask, state=initial_state)
    kernel = backends.select(implementation, call, chunk_size, return_state)
    output, state = kernel(**call)
    return (output, state) if return_state else output


def native_hybrid_attention_step(query, key, value, log_forget_gate, state,
                                 window_size, *, scale=None, window_query=None,
                                 window_key=None, padding_mask=None,
                                 implementation="auto"):
    """One decode step: advances `state` by one token.

    Cost is constant in the context length: the slot memory plus a ring of
    the last W tokens.

    Args:
        query: `[B, H, K]`.
        key: `[B, Hkv, K]`.
        value: `[B, Hkv, V]`.
        log_forget_gate: `[B, Hkv, M]`.
        state: from `initial_state()` or `native_hybrid_attention(...,
            return_state=True)`.
        window_size: the Python int W the state was built for.
        scale: logit scale, default `K ** -0.5`.
        window_query: `[B, H, K]`, defaults to `query`.
        window_key: `[B, Hkv, K]`, defaults to `key`.
        padding_mask: `[B]`, 0 for a padded token.
        implementation: as in `native_hybrid_attention`.

    Returns:
        `(output [B, H, V], new_state)`.

    Example:

    >>> state = keras_nha.ops.initial_state(1, 2, 32, 32, 16, 8)
    >>> q = keras.random.normal((1, 4, 32))
    >>> k = v = keras.random.normal((1, 2, 32))
    >>> g = keras.ops.log_sigmoid(keras.random.normal((1, 2, 16)))
    >>> out, state = keras_nha.ops.native_hybrid_attention_step(
    ...     q, k, v, g, state, 8)
    """
    validation.check_implementation(implementation)
    batch, _, _, kv_heads, key_dim, value_dim, num_slots = (
        validation.check_inputs(query, key, value, log_forget_gate,
                                window_size, window_query, window_key,
                                padding_mask, time_axis=False))
    scale = validation.check_scale(scale, key_dim)
    validation.check_state(state, batch, kv_heads, key_dim, value_dim,
                           num_slots, window_size, 1)
    tensors = (query, key, value, log_forget_gate, state, window_query,
               window_key, padding_mask)
    if _is_symbolic(tensors):
        return NativeHybridAttentionStep(
            window_size, scale=scale, implementation=implementation,
        ).symbolic_call(*tensors)
    validation.check_gates_nonpositive(log_forget_gate)
    call = dict(query=query, key=key, value=value,
                log_forget_gate=log_forget_gate, state=state,
                window_size=window_size, scale=scale,
                window_query=query if window_query is None else window_query,
                window_key=key if window_key is None else window_key,
                padding_mask=padding_mask)
    kernel = backends.select_step(implementation, call)
    return kernel(**call)
