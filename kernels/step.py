"""One NHA token step in `keras.ops`: the decode path and the reference's body.

Shapes (one token): query `[B, H, K]`, key `[B, Hkv, K]`, value `[B, Hkv, V]`,
log_forget_gate `[B, Hkv, M]`, padding_mask `[B]` or None. The state is the
dict described in `state.py`.
"""

from keras import backend
from keras import ops

from keras_nha.kernels.state import capacity_of

# Finite, so that a row whose every logit is masked still gives finite output.
MASKED_LOGIT = -1e30


def read_with_one_softmax(parts):
    """ONE softmax over the concatenated logits of `[(logits, readout), ...]`.

    Each readout maps its share of the probabilities to an output; the
    outputs add up.
    """
    logits = [part_logits for part_logits, _ in parts]
    probs = ops.softmax(ops.concatenate(logits, axis=-1), axis=-1)
    sizes = [part.shape[-1] for part in logits]
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    shares = ops.split(probs, offsets, axis=-1) if offsets else [probs]
    return sum(read(share) for (_, read), share in zip(parts, shares))


def write_into_slots(slot_keys, slot_values, key, value, log_gate):
    """S <- S * alpha + outer(key, 1 - alpha) (and likewise for values).

    A masked token carries log_gate 0: alpha = 1 and 1 - alpha = 0, no change.
    """
    alpha = ops.exp(log_gate)  # [B, Hkv, M]
    strength = 1.0 - alpha
    slot_keys = (slot_keys * alpha[:, :, None, :]
                 + key[:, :, :, None] * strength[:, :, None, :])
    slot_values = (slot_values * alpha[:, :, :, None]
                   + strength[:, :, :, None] * value[:, :, None, :])
    return slot_keys, slot_values


def nha_step(query, key, value, log_forget_gate, state, *, window_size, scale,
             window_query, window_key, padding_mask):
    """Advances the state by one token; returns `(output [B, H, V], state)`."""
    acc = backend.standardize_dtype(state["slot_keys"].dtype)
    batch, num_heads, key_dim = query.shape
    num_kv_heads, num_slots = key.shape[1], log_forget_gate.shape[-1]
    groups = num_heads // num_kv_heads
    capacity = capacity_of(state)

    real = (ops.ones((), acc) if padding_mask is None
            else ops.cast(padding_mask, acc))
    token = {
        "keys": ops.cast(key, acc),
        "window_keys": ops.cast(window_key, acc),
        "values": ops.cast(value, acc),
        "log_forget_gates": ops.cast(log_forget_gate, acc) * ops.reshape(
            real, (-1, 1, 1)),
        "mask": ops.broadcast_to(real, (ops.shape(query)[0],)),
    }
    slot_keys, slot_values = state["slot_keys"], state["slot_values"]
    position = state["position"]
    new_state = dict(state, position=position + 1)

    if capacity == 0:
        # W = 0: the token enters the slots before it reads them (GSA).
        slot_keys, slot_values = write_into_slots(
            slot_keys, slot_values, token["keys"], token["values"],
            token["log_forget_gates"])
    else:
        index = ops.mod(position, capacity)
        if capacity == window_size:
            # The ring entry we overwrite holds token t - W, which leaves the
            # window now and enters the slots. (With capacity < W nothing
            # leaves: the caller promised the sequence fits.)
            leaving = {n: ops.cast(ops.take(state[n], index, axis=1), acc)
                       for n in ("keys", "values", "log_forget_gates")}
            slot_keys, slot_values = write_into_slots(
                slot_keys, slot_values, leaving["keys"], leaving["values"],
                leaving["log_forget_gates"])
        # A masked select rather than a dynamic slice update: TensorFlow has
        # no gradient for the latter.
        here = ops.arange(capacity, dtype=index.dtype) == index
        for n, value_now in token.items():
            ring = state[n]
            at = ops.reshape(here, (1, capacity) + (1,) * (ops.ndim(ring) - 2))
            new_state[n] = ops.where(
                at, ops.cast(ops.expand_dims(value_now, 1), ring.dtype), ring)
    new_state["slot_keys"], new_state["slot_values"] = slot_keys, slot_values

    q = ops.reshape(ops.cast(query, acc), (-1, num_kv_heads, groups, key_dim))
    parts = []
    if num_slots:
        parts.append((scale * ops.einsum("bhgk,bhkm->bhgm", q, slot_keys),
                      lambda p: ops.einsum("bhgm,bhmv->bhgv", p, slot_values)))
    if capacity:
        qw = ops.reshape(ops.cast(window_query, acc),
                         (-1, num_kv_heads, groups, key_dim))
        ring_keys = ops.cast(new_state["window_keys"], acc)
        ring_values = ops.cast(new_state["values"], acc)
        window_logits = scale * ops.einsum("bhgk,bchk->bhgc", qw, ring_keys)
        valid = new_state["mask"][:, None, None, :] > 0
        parts.append((ops.where(valid, window_logits, MASKED_LOGIT),
                      lambda p: ops.einsum("bhgc,bchv->bhgv", p, ring_values)))
    output = read_with_one_softmax(parts)
    output = ops.reshape(output, (-1, num_heads, output.shape[-1]))
    return ops.cast(output, query.dtype), new_state
