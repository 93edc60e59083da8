"""The sliding window of NHA as banded blocks, forward and backward.

Query row t reads the shifted history rows t .. t + C - 1 (C = ring
capacity; history = ring oldest-first then the new tokens, without its first
row). A query chunk of L rows therefore reads D whole key chunks, a "frame"
of D * L keys, of which each row keeps a band of C. Per group of P query
chunks the frames come from P + D - 1 key chunks `[Z, P + D - 1, L, ...]`.
"""

import numpy as np
import tensorflow as tf

# Finite, so a row whose every logit is masked still has a finite softmax.
MASKED_LOGIT = -1e30


def frames(key_chunks, frame):
    """`[Z, P + D - 1, L, ...]` -> `[Z, P, D * L, ...]` (overlapping)."""
    group = key_chunks.shape[1] - frame + 1
    index = np.arange(group)[:, None] + np.arange(frame)[None, :]
    x = tf.gather(key_chunks, index, axis=1)
    return tf.reshape(x, [-1, group, frame * x.shape[3]] + list(x.shape[4:]))


def unframe(frame_grads, frame):
    """Transpose of `frames`: sums overlapping frames back into key chunks."""
    group, span = frame_grads.shape[1], frame_grads.shape[2]
    chunk = span // frame
    rest = list(frame_grads.shape[3:])
    x = tf.reshape(frame_grads, [-1, group, frame, chunk] + rest)
    no_pad = [[0, 0]] * len(rest)
    if frame <= group:
        return tf.add_n([
            tf.pad(x[:, :, d], [[0, 0], [d, frame - 1 - d], [0, 0]] + no_pad)
            for d in range(frame)])
    # Many key chunks per frame (a long window): skew each frame by its
    # index with one pad and reshape, then sum over frames.
    width = frame + group
    x = tf.pad(x, [[0, 0], [0, 0], [0, group], [0, 0]] + no_pad)
    x = tf.reshape(x, [-1, group * width, chunk] + rest)
    x = tf.reshape(x[:, :group * (width - 1)],
                   [-1, group, width - 1, chunk] + rest)
    return tf.reduce_sum(x, axis=1)


def band(chunk, frame, capacity):
    """`[L, D * L]` bool: row r keeps frame columns r .. r + C - 1."""
    rows = np.arange(chunk)[:, None]
    cols = np.arange(frame * chunk)[None, :]
    return tf.constant((cols >= rows) & (cols < rows + capacity))


def logits(window_query, keys, mask, capacity, scale):
    """Masked window logits `[Z, P, L, G, D * L]`.

    Args:
        window_query: `[Z, P, L, G, K]`.
        keys: frames `[Z, P, D * L, K]`.
        mask: frames of the history mask `[Z, P, D * L]` (1 = real token).
        capacity: C, the band width.
        scale: logit scale.
    """
    chunk, span = window_query.shape[2], keys.shape[2]
    valid = tf.logical_and(band(chunk, span // chunk, capacity)[None, None],
                           mask[:, :, None, :] > 0)
    scores = scale * tf.einsum("zptgk,zpck->zptgc", window_query, keys)
    return tf.where(valid[:, :, :, None, :], scores,
                    tf.constant(MASKED_LOGIT, scores.dtype))


def readout(probs, values):
    """`[Z, P, L, G, V]` from probabilities and value frames `[Z, P, DL, V]`."""
    return tf.einsum("zptgc,zpcv->zptgv", probs, values)


def backward(window_query, keys, values, probs, d_out, delta, scale):
    """Gradients of the window path for one group.

    `probs` are the window part of the joint softmax; `delta` is
    `sum(d_out * out)` over V. Returns `(d_window_query, d_key_frames,
    d_value_frames)`.
    """
    d_probs = tf.einsum("zptgv,zpcv->zptgc", d_out, values)
    d_logits = probs * (d_probs - delta[..., None])
    d_query = scale * tf.einsum("zptgc,zpck->zptgk", d_logits, keys)
    d_keys = scale * tf.einsum("zptgc,zptgk->zpck", d_logits, window_query)
    d_values = tf.einsum("zptgc,zptgv->zpcv", probs, d_out)
    return d_query, d_keys, d_values
