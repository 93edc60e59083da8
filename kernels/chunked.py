"""Chunkwise-parallel NHA in `keras.ops`: the portable fast path.

Two observations make the step recurrence parallel:

1. Token shift. At step t the slots hold the tokens up to t - W. Put the
   window's history (the state's ring, oldest first; nothing for a fresh
   sequence) in front of the new tokens; delayed by W rows, that history
   gives the token that enters the slots at step t. The slot memory becomes
   a plain GSA recurrence over this shifted stream, and the window of query
   t is the W history rows ending at the new token t.
2. Slot memory in chunks of C tokens. With G the in-chunk cumulative log gate
   and s = 1 - exp(g), a query at in-chunk row t sees

       Sk_t = exp(G_t) * Sk_start + sum_{i<=t} exp(G_t - G_i) s_i k_i

   (per slot). `decay[t, i] = exp(G_t - G_i) s_i` (i <= t) is a [C, C, M] tensor
   whose exponents are all <= 0, so no gate value can overflow it. The chunk
   start states come from an log-depth scan over chunks.

The window logits are banded: queries in blocks of Cw rows see Cw + W - 1 keys
gathered from the history. Slot and window logits share ONE softmax. Work and
memory are O(T (C M + (Cw + W) K)) per head: linear in T for a fixed W.
"""

from keras import backend
from keras import ops

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.step import MASKED_LOGIT
from keras_nha.kernels.step import read_with_one_softmax


def _pad_time(x, length, before=0):
    """Zero rows: `before` in front, then up to `length` rows in all."""
    after = length - before - x.shape[1]
    if before == after == 0:
        return x
    return ops.pad(x, [[0, 0], [before, after]] + [[0, 0]] * (ops.ndim(x) - 2))


def _delayed(x, delay, length):
    """Rows t - delay of `x` for t < length, zero where t < delay."""
    if delay >= length:
        return ops.zeros((ops.shape(x)[0], length) + tuple(x.shape[2:]),
                         x.dtype)
    return _pad_time(x[:, :length - delay], length, before=delay)


def _chunks(x, size):
    """`[B, T, ...]` -> `[B, N, size, ...]`, zero padded at the end."""
    count = -(-x.shape[1] // size)
    x = _pad_time(x, count * size)
    return ops.reshape(x, (-1, count, size) + tuple(x.shape[2:]))


def _unchunk(x, length):
    """`[B, N, size, ...]` -> `[B, length, ...]`."""
    x = ops.reshape(x, (-1, x.shape[1] * x.shape[2]) + tuple(x.shape[3:]))
    return x[:, :length]


def _combine_chunks(earlier, later):
    """Composes two spans of the slot recurrence (associative)."""
    decay_a, keys_a, values_a = earlier
    decay_b, keys_b, values_b = later
    return (decay_a * decay_b,
            keys_a * decay_b[..., None, :] + keys_b,
            values_a * decay_b[..., :, None] + values_b)


def _scan_chunks(decay, keys, values):
    """Inclusive scan of `_combine_chunks` over axis 1, in log2(N) steps.

    (Hillis-Steele; keras' torch `associative_scan` drops dtype and device.)
    """
    shift = 1
    while shift < decay.shape[1]:
        def earlier(x, identity):
            return ops.concatenate([identity(x[:, :shift]), x[:, :-shift]], 1)
        decay, keys, values = _combine_chunks(
            (earlier(decay, ops.ones_like), earlier(keys, ops.zeros_like),
             earlier(values, ops.zeros_like)), (decay, keys, values))
        shift *= 2
    return keys, values


def _slot_pass(q, keys, values, log_gates, slot_keys, slot_values, scale,
               chunk):
    """Slot logits and a readout closure for the shifted GSA stream.

    q `[B, T, Hkv, G, K]`; keys/values/log_gates `[B, T, Hkv, *]` (the token
    fed at each step, log gate 0 where nothing is fed).
    """
    qc, kc, vc, gc = (_chunks(x, chunk) for x in (q, keys, values, log_gates))
    strength = 1.0 - ops.exp(gc)
    # In-chunk cumulative sum as a masked matmul (keras' torch cumsum drops
    # float64 to float32).
    lower = ops.tril(ops.ones((chunk, chunk), gc.dtype))
    cum = ops.einsum("ti,bnihm->bnthm", lower, gc)  # [B, N, C, Hkv, M]
    causal = (lower > 0)[None, None, :, :, None, None]
    diff = cum[:, :, :, None] - cum[:, :, None, :]  # [B, N, Ct, Ci, Hkv, M]
    decay = ops.where(causal, ops.exp(ops.where(causal, diff, 0.0)), 0.0)
    decay = decay * strength[:, :, None]

    # Chunk start states: S_{n+1} = exp(G_last) * S_n + sum_i to_end_i (x) x_i.
    to_end = ops.exp(cum[:, :, -1:] - cum) * strength
    chunk_keys = ops.einsum("bnchk,bnchm->bnhkm", kc, to_end)
    chunk_values = ops.einsum("bnchm,bnchv->bnhmv", to_end, vc)
    chunk_decay = ops.exp(cum[:, :, -1])
    all_keys, all_values = _scan_chunks(
        ops.concatenate([ops.ones_like(chunk_decay[:, :1]), chunk_decay], 1),
        ops.concatenate([slot_keys[:, None], chunk_keys], 1),
        ops.concatenate([slot_values[:, None], chunk_values], 1))
    start_keys, start_values = all_keys[:, :-1], all_values[:, :-1]

    from_start = ops.exp(cum)[:, :, :, :, None]  # [B, N, C, Hkv, 1, M]
    scores = ops.einsum("bnchgk,bnihk->bnhgci", qc, kc)
    logits = (ops.einsum("bnhgci,bncihm->bnchgm", scores, decay)
              + ops.einsum("bnchgk,bnhkm->bnchgm", qc, start_keys) * from_start)

    def readout(probs):
        pc = _chunks(probs, chunk)
        weights = ops.einsum("bnchgm,bncihm->bnchgi", pc, decay)
        out = (ops.einsum("bnchgi,bnihv->bnchgv", weights, vc)
               + ops.einsum("bnchgm,bnhmv->bnchgv", pc * from_start,
                            start_values))
        return _unchunk(out, q.shape[1])

    return (_unchunk(logits * scale, q.shape[1]), readout,
            (all_keys[:, -1], all_values[:, -1]))


def _window_pass(qw, history_keys, history_values, history_mask, lead,
                 window, scale, chunk):
    """Banded window logits and a readout closure.

    The history is `lead` ring rows, then the new tokens: query t sees
    history rows lead + t - window + 1 .. lead + t.
    """
    length = qw.shape[1]
    block = min(max(window, chunk), length)
    blocks = -(-length // block)
    # Block n needs the rows ending at its last query; no block needs more
    # than `span` of them, and a fresh global layer (lead 0, one block)
    # needs exactly the new tokens: plain causal attention, no masked ring.
    span = min(block + window - 1, blocks * block + lead)
    before = max(0, span - block - lead)
    index = ops.reshape(
        ops.arange(blocks, dtype="int32")[:, None] * block
        + (before + block + lead - span)
        + ops.arange(span, dtype="int32")[None, :], (-1,))

    def gather(x):
        x = _pad_time(x, before + lead + blocks * block, before)
        return ops.reshape(ops.take(x, index, axis=1),
                           (-1, blocks, span) + tuple(x.shape[2:]))

    keys, values, key_mask = map(gather, (history_keys, history_values,
                                          history_mask))
    rows = ops.arange(block)[:, None] + (span - block)
    cols = ops.arange(span)[None, :]
    band = ops.logical_and(cols <= rows, cols > rows - window)
    valid = ops.logical_and(band[None, None, :, None, None, :],
                            key_mask[:, :, None, None, None, :] > 0)
    logits = scale * ops.einsum("bnchgk,bnlhk->bnchgl", _chunks(qw, block),
                                keys)
    logits = ops.where(valid, logits, MASKED_LOGIT)

    def readout(probs):
        out = ops.einsum("bnchgl,bnlhv->bnchgv", _chunks(probs, block), values)
        return _unchunk(out, length)

    return _unchunk(logits, length), readout


def chunked_nha(query, key, value, log_forget_gate, *, window_size, scale,
                window_query, window_key, padding_mask, state=None,
                chunk_size=32):
    """Inputs `[B, T, ...]` and a state (None: a fresh sequence); returns
    `(output [B, T, H, V], state)`."""
    length, num_heads, key_dim = query.shape[1:]
    num_kv_heads, num_slots = key.shape[2], log_forget_gate.shape[-1]
    if state is None:
        acc = state_lib.state_dtype(key.dtype)
        ring_dtypes = state_lib.ring_dtypes(key.dtype)
        capacity, start, lead = min(window_size, length), 0, 0
        slot_keys = ops.zeros((ops.shape(query)[0], num_kv_heads, key_dim,
                               num_slots), acc)
        slot_values = ops.zeros((ops.shape(query)[0], num_kv_heads, num_slots,
                                 value.shape[-1]), acc)
    else:
        acc = backend.standardize_dtype(state["slot_keys"].dtype)
        ring_dtypes = {n: state[n].dtype for n in state_lib.RING_NAMES}
        capacity = state_lib.capacity_of(state)
        start, lead = state["position"], capacity
        slot_keys, slot_values = state["slot_keys"], state["slot_values"]

    real = (ops.ones(ops.shape(query)[:2], acc) if padding_mask is None
            else ops.cast(padding_mask, acc))
    new = {"keys": key, "window_keys": window_key, "values": value,
           "log_forget_gates": ops.cast(log_forget_gate, acc) * real[..., None,
                                                                     None],
           "mask": real}
    history = {
        n: ops.concatenate([
            ops.cast(state_lib.ring_to_chronological(state[n], start), acc),
            ops.cast(new[n], acc)], axis=1) if lead else ops.cast(new[n], acc)
        for n in state_lib.RING_NAMES}

    def grouped(x):
        return ops.reshape(ops.cast(x, acc), (-1, length, num_kv_heads,
                                              num_heads // num_kv_heads,
                                              key_dim))

    parts = []
    if num_slots:
        # The token fed at step t is the one leaving the window then; ring
        # rows and never-written entries feed nothing (gate 0, strength 0).
        fed = {n: _delayed(history[n], window_size - lead, length)
               for n in ("keys", "values", "log_forget_gates")}
        slot_logits, slot_readout, (slot_keys, slot_values) = _slot_pass(
            grouped(query), fed["keys"], fed["values"],
            fed["log_forget_gates"], slot_keys, slot_values, scale,
            min(chunk_size, length))
        parts.append((slot_logits, slot_readout))
    if capacity:
        parts.append(_window_pass(
            grouped(window_query), history["window_keys"], history["values"],
            history["mask"], lead, capacity, scale, chunk_size))
    output = read_with_one_softmax(parts)
    output = ops.reshape(output, (-1, length, num_heads, output.shape[-1]))

    end = ops.cast(start + length, "int32")
    new_state = {"slot_keys": slot_keys, "slot_values": slot_values,
                 "position": end}
    for n in state_lib.RING_NAMES:
        last = history[n][:, lead + length - capacity:]
        new_state[n] = ops.cast(state_lib.chronological_to_ring(last, end),
                                ring_dtypes[n])
    return ops.cast(output, query.dtype), new_state
