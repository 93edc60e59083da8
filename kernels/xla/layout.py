"""Static tiling for the XLA kernel, and its tensor layouts.

The kernel works on kv-head-major rows `[Z, rows, ...]` with
`Z = batch * kv_heads`. The rows are cut into groups of `group_rows` (one
loop iteration each, so transient memory is bounded by a group, not by the
sequence). Inside a group the slot memory works in chunks of `slot_chunk`
rows and the window in query blocks of `window_block` rows, each reading a
frame of `frame` key blocks.
"""

import dataclasses

import tensorflow as tf

# Rows per slot chunk: the intra-chunk decay tensor is [Ls, Ls, M] per
# chunk, the rest of the slot work is matmuls against chunk-start states.
SLOT_CHUNK = 16
# Rows per window query block; its frame covers WINDOW_BLOCK + W - 1 keys
# rounded up to whole blocks.
WINDOW_BLOCK = 64
# Rows per loop iteration, before the memory cap below.
GROUP_ROWS = 1024
# Cap on the window logits of one group, per query head, in elements.
GROUP_LOGITS = 1 << 19


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a sequence of `length` rows is cut (all Python ints)."""

    length: int
    slot_chunk: int  # Ls
    window_block: int  # Lw, a multiple of Ls
    group_rows: int  # R, a multiple of Lw
    num_groups: int
    frame: int  # key blocks read by one query block, 0 without window

    @property
    def rows(self):
        """Rows after padding: a whole number of groups."""
        return self.group_rows * self.num_groups

    @property
    def key_rows(self):
        """Rows of (shifted) window history that the frames read."""
        return self.rows + max(self.frame - 1, 0) * self.window_block

    @property
    def spill_rows(self):
        """Key rows a group's frames read past the group's own rows."""
        return max(self.frame - 1, 0) * self.window_block


def current_sizes():
    """The module's tile sizes now (tests and benchmarks may change them)."""
    return SLOT_CHUNK, WINDOW_BLOCK, GROUP_ROWS, GROUP_LOGITS


def make_tiling(length, capacity, sizes=None):
    """Tiling for `length` new rows and a window ring of `capacity` rows.

    Query row t sees the shifted history rows t .. t + capacity - 1, so a
    query block needs `frame` whole key blocks.
    """
    slot_chunk, window_block, group_rows, group_logits = (
        sizes or current_sizes())
    slot_chunk = max(1, min(slot_chunk, length))
    slot_chunks = -(-length // slot_chunk)
    window_block = slot_chunk * max(1, min(window_block // slot_chunk,
                                           slot_chunks))
    blocks = -(-length // window_block)
    frame = -(-(window_block + capacity - 1) // window_block) if capacity else 0
    per_block = window_block * max(frame, 1) * window_block
    largest = max(1, min(group_rows // window_block,
                         group_logits // per_block))
    num_groups = -(-blocks // largest)
    group_blocks = -(-blocks // num_groups)
    return Tiling(length, slot_chunk, window_block,
                  group_blocks * window_block, num_groups, frame)


def pad_rows(x, rows):
    """Zero-pads axis 1 of `x` to `rows` (static) entries."""
    extra = rows - x.shape[1]
    if extra == 0:
        return x
    return tf.pad(x, [[0, 0], [0, extra]] + [[0, 0]] * (len(x.shape) - 2))


def to_rows(x, rows):
    """`[B, T, Hkv, ...]` -> `[B * Hkv, rows, ...]` (zero padded)."""
    x = pad_rows(x[:, :rows], rows)
    order = [0, 2, 1] + list(range(3, len(x.shape)))
    x = tf.transpose(x, order)
    return tf.reshape(x, [-1, rows] + list(x.shape[3:]))


def from_rows(x, length, kv_heads):
    """Inverse of `to_rows` (drops padded rows): `[B, length, Hkv, ...]`."""
    x = tf.reshape(x, [-1, kv_heads] + list(x.shape[1:]))
    order = [0, 2, 1] + list(range(3, len(x.shape)))
    return tf.transpose(x, order)[:, :length]


def group_query_heads(x, kv_heads):
    """`[B, T, H, K]` -> `[B, T, Hkv, G, K]` (query head h uses kv h // G)."""
    return tf.reshape(x, [-1, x.shape[1], kv_heads, x.shape[2] // kv_heads,
                          x.shape[3]])


def take_rows(x, start, count, axis=1):
    """`count` entries of `x` along `axis` from `start` (may be traced)."""
    begin = [0] * len(x.shape)
    begin[axis] = start
    # Sizes spelled out: a -1 size makes tf2xla pad x to twice its size.
    size = tf.unstack(tf.shape(x))
    size[axis] = count
    return tf.slice(x, tf.stack(begin), tf.stack(size))


def take_group(stacked, index):
    """`stacked[index]` for `[num_groups, ...]` (index may be traced)."""
    return take_rows(stacked, index, 1, axis=0)[0]


def split_rows(x, size):
    """`[Z, R, ...]` -> `[Z, R // size, size, ...]`."""
    return tf.reshape(x, [-1, x.shape[1] // size, size] + list(x.shape[2:]))


def merge_rows(x):
    """`[Z, N, size, ...]` -> `[Z, N * size, ...]`."""
    return tf.reshape(x, [-1, x.shape[1] * x.shape[2]] + list(x.shape[3:]))
