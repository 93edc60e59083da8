"""The slot memory of NHA, chunkwise, forward and backward (TensorFlow ops).

All functions work on one group of P chunks of L rows, batched over
`Z = batch * kv_heads`:

- queries `q` `[Z, P, L, G, K]` (G query heads per kv head),
- the fed stream `keys` `[Z, P, L, K]`, `values` `[Z, P, L, V]`,
  `log_gates` `[Z, P, L, M]` (row t is the token entering the slots at step
  t; log gate 0 where nothing enters),
- the slot memory `Sk` `[Z, K, M]`, `Sv` `[Z, M, V]` at the group's start.

With Gamma the in-chunk inclusive cumsum of the log gates and
s = 1 - exp(g), the memory a query at row t of a chunk reads is

    S_t = exp(Gamma_t) * S_chunk_start + sum_{i <= t} exp(Gamma_t - Gamma_i) s_i x_i

(per slot m). Every exponent used below is <= 0, so no gate can overflow.
Chunk start states inside the group come from a [P, P, M] decay matrix (the
first level of the scan); the loop over groups carries the memory (second
level).
"""

import dataclasses

import tensorflow as tf


def _causal(size, strict=False):
    rows = tf.range(size)[:, None]
    cols = tf.range(size)[None, :]
    return cols < rows if strict else cols <= rows


def _masked_exp(exponent, mask):
    """exp(exponent) where mask, else 0; exponent may be > 0 off the mask."""
    zero = tf.zeros((), exponent.dtype)
    return tf.where(mask, tf.exp(tf.where(mask, exponent, zero)), zero)


@dataclasses.dataclass
class Gates:
    """Per-chunk gate terms derived from the log gates `[Z, P, L, M]`."""

    alpha: tf.Tensor  # exp(g)
    strength: tf.Tensor  # s = 1 - exp(g)
    from_start: tf.Tensor  # exp(Gamma_t)               [Z, P, L, M]
    to_end: tf.Tensor  # exp(Gamma_last - Gamma_i)     [Z, P, L, M]
    decay: tf.Tensor  # exp(Gamma_t - Gamma_i), i <= t [Z, P, L(t), L(i), M]
    chunk_log_decay: tf.Tensor  # Gamma_last             [Z, P, M]

    @property
    def weights(self):
        """decay * s_i: what row i contributes to the memory row t reads."""
        return self.decay * self.strength[:, :, None]


def gates(log_gates):
    chunk = log_gates.shape[2]
    cum = tf.cumsum(log_gates, axis=2)
    last = cum[:, :, -1:]
    causal = _causal(chunk)[None, None, :, :, None]
    alpha = tf.exp(log_gates)
    return Gates(
        alpha=alpha,
        strength=1.0 - alpha,
        from_start=tf.exp(cum),
        to_end=tf.exp(last - cum),
        decay=_masked_exp(cum[:, :, :, None] - cum[:, :, None, :], causal),
        chunk_log_decay=last[:, :, 0])


def _group_decays(chunk_log_decay):
    """Decays between chunks of the group.

    Returns `before` `[Z, P, M]` (from the group start to chunk j's start),
    `between` `[Z, P(j), P(l), M]` (from the end of chunk l to the start of
    chunk j, zero unless l < j) and `after` `[Z, P, M]` (from the end of
    chunk l to the group end), and `total` `[Z, M]`.
    """
    group = chunk_log_decay.shape[1]
    inclusive = tf.cumsum(chunk_log_decay, axis=1)
    exclusive = inclusive - chunk_log_decay
    total = inclusive[:, -1]
    between = _masked_exp(
        exclusive[:, :, None] - inclusive[:, None, :],
        _causal(group, strict=True)[None, :, :, None])
    return (tf.exp(exclusive), between, tf.exp(total[:, None] - inclusive),
            tf.exp(total))


def chunk_states(gate, keys, values, slot_keys, slot_values):
    """Slot memory at every chunk start and end of the group.

    Returns `(starts, ends)`, each `(Sk [Z, P, K, M], Sv [Z, P, M, V])`; the
    group's end state is `ends[i][:, -1]`.
    """
    feed = gate.to_end * gate.strength  # [Z, P, L, M]
    chunk_keys = tf.einsum("zpik,zpim->zpkm", keys, feed)
    chunk_values = tf.einsum("zpim,zpiv->zpmv", feed, values)
    before, between, _, _ = _group_decays(gate.chunk_log_decay)
    starts_k = (before[:, :, None, :] * slot_keys[:, None]
                + tf.einsum("zjlm,zlkm->zjkm", between, chunk_keys))
    starts_v = (before[:, :, :, None] * slot_values[:, None]
                + tf.einsum("zjlm,zlmv->zjmv", between, chunk_values))
    decay = tf.exp(gate.chunk_log_decay)
    ends_k = decay[:, :, None, :] * starts_k + chunk_keys
    ends_v = decay[:, :, :, None] * starts_v + chunk_values
    return (starts_k, starts_v), (ends_k, ends_v)


def logits(q, keys, gate, starts_k, scale):
    """Slot logits `[Z, P, L, G, M]` (scaled).

    Without `gate` (constant memory) `starts_k` is the memory `[Z, K, M]`.
    """
    if gate is None:
        return scale * tf.einsum("zptgk,zkm->zptgm", q, starts_k)
    inter = tf.einsum("zptgk,zpkm->zptgm", q, starts_k)
    scores = tf.einsum("zptgk,zpik->zptgi", q, keys)
    intra = tf.einsum("zptgi,zptim->zptgm", scores, gate.weights)
    return scale * (intra + inter * gate.from_start[:, :, :, None])


def readout(probs, values, gate, starts_v):
    """`sum_m probs[m] * Sv_t[m]`: `[Z, P, L, G, V]` (probs unnormalised ok)."""
    if gate is None:
        return tf.einsum("zptgm,zmv->zptgv", probs, starts_v)
    mixed = tf.einsum("zptgm,zptim->zptgi", probs, gate.weights)
    return (tf.einsum("zptgi,zpiv->zptgv", mixed, values)
            + tf.einsum("zptgm,zpmv->zptgv",
                        probs * gate.from_start[:, :, :, None], starts_v))


def backward(q, keys, values, gate, starts, ends, carry, probs, slot_logits,
             d_out, delta, scale):
    """Gradients of one group's slot path.

    Args:
        q, keys, values: the group's inputs (see module docstring).
        gate: `gates(log_gates)`, or None when nothing is fed (W > ring
            capacity: the memory is constant).
        starts: `(Sk, Sv)` at every chunk start `[Z, P, ...]` (without
            `gate`: the constant memory `[Z, ...]`).
        ends: `(Sk, Sv)` at every chunk end `[Z, P, ...]` (unused without
            `gate`).
        carry: `(dSk, dSv)`: gradient w.r.t. the memory at the group's end.
        probs: slot probabilities `[Z, P, L, G, M]` (of the joint softmax).
        slot_logits: the logits `probs` came from.
        d_out: output cotangent `[Z, P, L, G, V]`.
        delta: `sum(d_out * out)` over V, `[Z, P, L, G]`.
        scale: logit scale.

    Returns:
        `(dq, dkeys, dvalues, dlog_gates, carry)`, carry being the gradient
        w.r.t. the memory at the group's start. Without `gate`, dkeys,
        dvalues and dlog_gates are None.
    """
    starts_k, starts_v = starts
    if gate is None:
        d_probs = tf.einsum("zptgv,zmv->zptgm", d_out, starts_v)
        d_logits = probs * (d_probs - delta[..., None])
        dq = scale * tf.einsum("zptgm,zkm->zptgk", d_logits, starts_k)
        carry = (carry[0] + scale * tf.einsum("zptgk,zptgm->zkm", q,
                                              d_logits),
                 carry[1] + tf.einsum("zptgm,zptgv->zmv", probs, d_out))
        return dq, None, None, None, carry

    from_start = gate.from_start[:, :, :, None]
    weights = gate.weights
    value_scores = tf.einsum("zptgv,zpiv->zptgi", d_out, values)
    d_probs = (from_start * tf.einsum("zptgv,zpmv->zptgm", d_out, starts_v)
               + tf.einsum("zptgi,zptim->zptgm", value_scores, weights))
    d_logits = probs * (d_probs - delta[..., None])

    local_k = scale * tf.einsum("zptgk,zptgm->zpkm", q, d_logits * from_start)
    local_v = tf.einsum("zptgm,zptgv->zpmv", probs * from_start, d_out)
    key_mix = tf.einsum("zptgm,zptim->zptgi", d_logits, weights)
    value_mix = tf.einsum("zptgm,zptim->zptgi", probs, weights)
    dq = scale * (tf.einsum("zptgm,zpkm->zptgk", d_logits * from_start,
                            starts_k)
                  + tf.einsum("zptgi,zpik->zptgk", key_mix, keys))
    d_keys = scale * tf.einsum("zptgi,zptgk->zpik", key_mix, q)
    d_values = tf.einsum("zptgi,zptgv->zpiv", value_mix, d_out)
    scores = tf.einsum("zptgk,zpik->zptgi", q, keys)
    pair = (scale * tf.einsum("zptgi,zptgm->zptim", scores, d_logits)
            + tf.einsum("zptgi,zptgm->zptim", value_scores, probs))
    d_strength = tf.reduce_sum(gate.decay * pair, axis=2)  # [Z, P, L(i), M]

    end_k, end_v, carry = _reverse_chunks(gate, local_k, local_v, carry)
    feed = gate.to_end * gate.strength
    d_keys += tf.einsum("zpkm,zpim->zpik", end_k, feed)
    d_values += tf.einsum("zpim,zpmv->zpiv", feed, end_v)
    d_strength += gate.to_end * (tf.einsum("zpik,zpkm->zpim", keys, end_k)
                                 + tf.einsum("zpmv,zpiv->zpim", end_v, values))
    # d/dGamma_t: row t's logits and readout see Gamma_t in every term but
    # the row's own write (the s * ds part); the chunk's end state sees
    # Gamma_last.
    d_cum = (tf.reduce_sum(d_logits * slot_logits + probs * d_probs, axis=3)
             - gate.strength * d_strength)
    d_last = (tf.reduce_sum(end_k * ends[0], axis=2)
              + tf.reduce_sum(end_v * ends[1], axis=3))
    d_log_gates = (tf.cumsum(d_cum, axis=2, reverse=True)
                   + d_last[:, :, None] - gate.alpha * d_strength)
    return dq, d_keys, d_values, d_log_gates, carry


def _reverse_chunks(gate, local_k, local_v, carry):
    """Gradient w.r.t. the memory at every chunk end, and at the group start.

    `local_*` `[Z, P, ...]`: what each chunk's own rows send to its start
    state; `carry`: gradient at the group's end.
    """
    before, between, after, total = _group_decays(gate.chunk_log_decay)
    carry_k, carry_v = carry
    end_k = (after[:, :, None, :] * carry_k[:, None]
             + tf.einsum("zlnm,zlkm->znkm", between, local_k))
    end_v = (after[:, :, :, None] * carry_v[:, None]
             + tf.einsum("zlnm,zlmv->znmv", between, local_v))
    carry_k = (total[:, None, :] * carry_k
               + tf.einsum("zlm,zlkm->zkm", before, local_k))
    carry_v = (total[:, :, None] * carry_v
               + tf.einsum("zlm,zlmv->zmv", before, local_v))
    return end_k, end_v, (carry_k, carry_v)
