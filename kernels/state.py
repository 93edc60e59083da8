"""The fixed-size NHA state and its window ring buffer.

The state is a dict of tensors, so it passes through `jit`, `tf.function` and
`keras.ops.while_loop` unchanged:

- `slot_keys` `[B, Hkv, K, M]` and `slot_values` `[B, Hkv, M, V]`: the slot
  memory, in float32 (float64 for float64 inputs).
- `keys`, `window_keys` `[B, C, Hkv, K]`, `values` `[B, C, Hkv, V]`,
  `log_forget_gates` `[B, C, Hkv, M]` and `mask` `[B, C]`: the last C tokens,
  token at absolute position p stored at ring index `p % C`. `keys`, `values`
  and `log_forget_gates` are what the token writes into the slots when it
  leaves the window; `window_keys` is what the window logits use; `mask` is 1
  for a real token (0 for padding and never-written entries).
- `position`: int32 scalar, the absolute position of the next token.

The capacity C is the window size W, or less when the caller promises that
the whole sequence fits (a global layer with W >= max_length).

A sequence kernel also accepts `state=None`: a fresh sequence. It then skips
the empty ring instead of attending over C masked rows (for a global layer,
C = T of them) and returns a state of capacity min(W, T).
"""

from keras import backend
from keras import ops

RING_NAMES = ("keys", "window_keys", "values", "log_forget_gates", "mask")
STATE_NAMES = ("slot_keys", "slot_values") + RING_NAMES + ("position",)


def state_dtype(dtype):
    """Slot memory, gates and softmax run in float32 at least."""
    return "float64" if backend.standardize_dtype(dtype) == "float64" else (
        "float32")


def ring_dtypes(dtype):
    """The dtype of each ring entry for inputs of `dtype`."""
    acc = state_dtype(dtype)
    return {"keys": dtype, "window_keys": dtype, "values": dtype,
            "log_forget_gates": acc, "mask": acc}


def zero_state(batch_size, num_kv_heads, key_dim, value_dim, num_slots,
               capacity, dtype):
    """An all-zero state with room for `capacity` window tokens."""
    b, h = batch_size, num_kv_heads
    acc = state_dtype(dtype)
    ring = ring_dtypes(dtype)
    return {
        "slot_keys": ops.zeros((b, h, key_dim, num_slots), acc),
        "slot_values": ops.zeros((b, h, num_slots, value_dim), acc),
        "keys": ops.zeros((b, capacity, h, key_dim), ring["keys"]),
        "window_keys": ops.zeros((b, capacity, h, key_dim),
                                 ring["window_keys"]),
        "values": ops.zeros((b, capacity, h, value_dim), ring["values"]),
        "log_forget_gates": ops.zeros((b, capacity, h, num_slots),
                                      ring["log_forget_gates"]),
        "mask": ops.zeros((b, capacity), ring["mask"]),
        "position": ops.zeros((), "int32"),
    }


def fresh_state(query, key, value, log_forget_gate, window_size, **unused):
    """The zero state a fresh sequence of these inputs starts from."""
    return zero_state(ops.shape(query)[0], key.shape[2], key.shape[3],
                      value.shape[3], log_forget_gate.shape[-1],
                      min(window_size, query.shape[1]), key.dtype)


def capacity_of(state):
    return state["keys"].shape[1]


def ring_to_chronological(ring, position):
    """Reorders a ring `[B, C, ...]` oldest first (positions position-C..)."""
    capacity = ring.shape[1]
    index = ops.mod(position + ops.arange(capacity, dtype="int32"), capacity)
    return ops.take(ring, index, axis=1)


def chronological_to_ring(chronological, end_position):
    """Inverse of `ring_to_chronological` for a buffer ending at end_position."""
    capacity = chronological.shape[1]
    index = ops.mod(
        ops.arange(capacity, dtype="int32") - end_position, capacity)
    return ops.take(chronological, index, axis=1)
