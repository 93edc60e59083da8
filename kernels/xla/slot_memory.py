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


def _decay(log_rows, log_cols, keep):
    """`exp(rows_t - cols_i)` where `keep[t, i]` else 0: `[..., t, i, M]`.

    Callers keep only pairs whose exponent is <= 0 (cumulative sums of log
    gates <= 0), where `-|x|` is `x`; the abs keeps the discarded pairs
    finite without a select around the exp.
    """
    diff = log_rows[..., :, None, :] - log_cols[..., None, :, :]
    return tf.exp(-tf.abs(diff)) * tf.cast(keep, diff.dtype)[:, :, None]


def _contract_keys(x, decay):
    """`sum_i x[t, g, i] * decay[t, i, m]` -> `[Z, P, t, G, M]`."""
    return tf.reduce_sum(x[..., None] * decay[:, :, :, None], axis=-2)


def _contract_slots(x, decay):
    """`sum_m x[t, g, m] * decay[t, i, m]` -> `[Z, P, t, G, i]`."""
    return tf.reduce_sum(x[:, :, :, :, None, :] * decay[:, :, :, None],
                         axis=-1)


def _contract_heads(x, y):
    """`sum_g x[t, g, i] * y[t, g, m]` -> `[Z, P, t, i, M]`."""
    return tf.reduce_sum(x[..., None] * y[:, :, :, :, None, :], axis=3)


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
    """`Gates` of the fed log gates `[Z, P, L, M]` (in-chunk cumsums)."""
    cum = tf.cumsum(log_gates, axis=2)
    last = cum[:, :, -1:]
    alpha = tf.exp(log_gates)
    return Gates(
        alpha=alpha,
        strength=1.0 - alpha,
        from_start=tf.exp(cum),
        to_end=tf.exp(last - cum),
        decay=_decay(cum, cum, _causal(cum.shape[2])),
        chunk_log_decay=last[:, :, 0])


# Chunks per block of the blocked scan over chunk states.
SCAN_BLOCK = 8


def affine_scan(log_decay, x, init, block=None):
    """`h_0 = init`, `h_{j+1} = exp(log_decay_j) * h_j + x_j`, in parallel.

    Blocks of `block` steps are solved with a [block, block] decay matrix,
    the blocks' own totals by the same scan one level up, so the work is
    linear in the number of steps and every exponent stays <= 0.

    Args:
        log_decay: `[Z, P, M]`, <= 0.
        x: `[Z, P, R, M]`.
        init: `[Z, R, M]`.
        block: steps solved directly (default `SCAN_BLOCK`).

    Returns:
        `(states [Z, P, R, M], final [Z, R, M])`: h_0 .. h_{P-1} and h_P.
    """
    block = block or SCAN_BLOCK
    steps = log_decay.shape[1]
    if steps <= block:
        inclusive = tf.cumsum(log_decay, axis=1)
        exclusive = inclusive - log_decay
        total = inclusive[:, -1:]
        between = _decay(exclusive, inclusive, _causal(steps, strict=True))
        states = (tf.exp(exclusive)[:, :, None] * init[:, None]
                  + tf.reduce_sum(between[:, :, :, None] * x[:, None],
                                  axis=2))
        final = (tf.exp(total) * init + tf.reduce_sum(
            tf.exp(total - inclusive)[:, :, None] * x, axis=1))
        return states, final
    count = -(-steps // block)
    # Steps appended at the end with decay 1 and no input change nothing.
    log_decay = _pad_steps(log_decay, count * block)
    x = _pad_steps(x, count * block)
    rest = x.shape[2:]
    local, block_x = affine_scan(
        tf.reshape(log_decay, [-1, block, rest[-1]]),
        tf.reshape(x, [-1, block] + list(rest)),
        tf.zeros(tf.concat([tf.shape(x)[:1] * count, list(rest)], 0),
                 x.dtype),
        block)
    log_decay = tf.reshape(log_decay, [-1, count, block, rest[-1]])
    block_starts, final = affine_scan(
        tf.reduce_sum(log_decay, axis=2),
        tf.reshape(block_x, [-1, count] + list(rest)), init, block)
    within = tf.exp(tf.cumsum(log_decay, axis=2, exclusive=True))
    states = (tf.reshape(local, [-1, count, block] + list(rest))
              + within[:, :, :, None] * block_starts[:, :, None])
    return tf.reshape(states, [-1, count * block] + list(rest))[:, :steps], (
        final)


def _pad_steps(x, steps):
    extra = steps - x.shape[1]
    if not extra:
        return x
    return tf.pad(x, [[0, 0], [0, extra]] + [[0, 0]] * (len(x.shape) - 2))


def _join_memory(keys, values):
    """`[..., K, M]` and `[..., M, V]` -> `[..., K + V, M]` (for scans)."""
    rank = len(values.shape)
    order = list(range(rank - 2)) + [rank - 1, rank - 2]
    return tf.concat([keys, tf.transpose(values, order)], axis=-2)


def _split_memory(joined, key_dim):
    """Inverse of `_join_memory`."""
    rank = len(joined.shape)
    order = list(range(rank - 2)) + [rank - 1, rank - 2]
    return joined[..., :key_dim, :], tf.transpose(joined[..., key_dim:, :],
                                                  order)


def chunk_states(gate, keys, values, slot_keys, slot_values):
    """Slot memory at every chunk start and end of the group.

    Returns `(starts, ends)`, each `(Sk [Z, P, K, M], Sv [Z, P, M, V])`; the
    group's end state is `ends[i][:, -1]`.
    """
    feed = gate.to_end * gate.strength  # [Z, P, L, M]
    chunk_keys = tf.einsum("zpik,zpim->zpkm", keys, feed)
    chunk_values = tf.einsum("zpim,zpiv->zpmv", feed, values)
    starts, _ = affine_scan(gate.chunk_log_decay,
                            _join_memory(chunk_keys, chunk_values),
                            _join_memory(slot_keys, slot_values))
    starts_k, starts_v = _split_memory(starts, keys.shape[-1])
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
    intra = _contract_keys(scores, gate.weights)
    return scale * (intra + inter * gate.from_start[:, :, :, None])


def readout(probs, values, gate, starts_v):
    """`sum_m probs[m] * Sv_t[m]`: `[Z, P, L, G, V]` (probs unnormalised ok)."""
    if gate is None:
        return tf.einsum("zptgm,zmv->zptgv", probs, starts_v)
    mixed = _contract_slots(probs, gate.weights)
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
               + _contract_keys(value_scores, weights))
    d_logits = probs * (d_probs - delta[..., None])

    local_k = scale * tf.einsum("zptgk,zptgm->zpkm", q, d_logits * from_start)
    local_v = tf.einsum("zptgm,zptgv->zpmv", probs * from_start, d_out)
    key_mix = _contract_slots(d_logits, weights)
    value_mix = _contract_slots(probs, weights)
    dq = scale * (tf.einsum("zptgm,zpkm->zptgk", d_logits * from_start,
                            starts_k)
                  + tf.einsum("zptgi,zpik->zptgk", key_mix, keys))
    d_keys = scale * tf.einsum("zptgi,zptgk->zpik", key_mix, q)
    d_values = tf.einsum("zptgi,zptgv->zpiv", value_mix, d_out)
    scores = tf.einsum("zptgk,zpik->zptgi", q, keys)
    pair = (scale * _contract_heads(scores, d_logits)
            + _contract_heads(value_scores, probs))
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
    state; `carry`: gradient at the group's end. Backward in chunks, the
    gradient follows the same recurrence as the memory:
    d_end_{n-1} = exp(decay_n) * d_end_n + local_n.
    """
    flip = lambda x: tf.reverse(x, axis=[1])
    ends, start = affine_scan(
        flip(gate.chunk_log_decay), flip(_join_memory(local_k, local_v)),
        _join_memory(*carry))
    end_k, end_v = _split_memory(flip(ends), local_k.shape[2])
    return end_k, end_v, _split_memory(start, local_k.shape[2])
