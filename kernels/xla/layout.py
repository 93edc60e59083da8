"""Static tiling for the XLA kernel: chunk sizes and tensor layouts.

The kernel works on kv-head-major tensors `[Z, N, L, ...]` with
`Z = batch * kv_heads`, `N` chunks of `L` rows, processed in `num_groups`
groups of `group` chunks (one loop iteration per group, so transient memory
is bounded by the group, not the sequence).
"""

import dataclasses

import tensorflow as tf

# Rows per chunk: the slot memory's intra-chunk decay tensor is [L, L, M]
# and each window frame spans whole chunks, so small chunks waste little.
CHUNK = 32
# Rows per loop iteration (a multiple of CHUNK), before the memory cap below.
GROUP_ROWS = 1024
# Cap on window + slot logits per head and group, in elements.
GROUP_LOGITS = 1 << 19


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a sequence of `length` rows is cut (all Python ints)."""

    length: int
    chunk: int
    chunks: int  # N, a multiple of `group`
    group: int  # chunks per loop iteration (P)
    frame: int  # key chunks seen by one query chunk (D), 0 without window

    @property
    def num_groups(self):
        return self.chunks // self.group

    @property
    def key_chunks(self):
        """Chunks of (shifted) window history the frames read."""
        return self.chunks + max(self.frame - 1, 0)


def make_tiling(length, capacity, num_slots, chunk=CHUNK):
    """Tiling for `length` new rows and a window ring of `capacity` rows.

    Query row t sees the shifted history rows t .. t + capacity - 1, so a
    query chunk needs `frame` whole key chunks.
    """
    chunk = max(1, min(chunk, length))
    needed = -(-length // chunk)
    frame = -(-(chunk + capacity - 1) // chunk) if capacity else 0
    per_chunk = chunk * (frame * chunk + num_slots)
    largest = max(1, min(GROUP_ROWS // chunk, GROUP_LOGITS // per_chunk))
    num_groups = -(-needed // largest)
    group = -(-needed // num_groups)
    return Tiling(length, chunk, group * num_groups, group, frame)


def pad_rows(x, rows, axis=1):
    """Zero-pads axis `axis` of `x` to `rows` (static) entries."""
    extra = rows - x.shape[axis]
    if extra == 0:
        return x
    paddings = [[0, 0]] * len(x.shape)
    paddings[axis] = [0, extra]
    return tf.pad(x, paddings)


def to_chunks(x, tiling, chunks=None):
    """`[B, T, Hkv, ...]` -> `[B * Hkv, N, L, ...]` (zero padded rows)."""
    chunks = tiling.chunks if chunks is None else chunks
    rows = chunks * tiling.chunk
    x = pad_rows(x[:, :rows], rows)
    rest = x.shape[3:]
    x = tf.reshape(x, [-1, chunks, tiling.chunk, x.shape[2]] + list(rest))
    order = [0, 3, 1, 2] + list(range(4, 4 + len(rest)))
    x = tf.transpose(x, order)
    return tf.reshape(x, [-1, chunks, tiling.chunk] + list(rest))


def from_chunks(x, tiling, kv_heads):
    """Inverse of `to_chunks` (drops padded rows): `[B, T, Hkv, ...]`."""
    rest = x.shape[3:]
    x = tf.reshape(x, [-1, kv_heads, tiling.chunks * tiling.chunk]
                   + list(rest))
    order = [0, 2, 1] + list(range(3, 3 + len(rest)))
    return tf.transpose(x, order)[:, :tiling.length]


def group_query_heads(x, kv_heads):
    """`[B, T, H, K]` -> `[B, T, Hkv, G, K]` (query head h uses kv h // G)."""
    return tf.reshape(x, [-1, x.shape[1], kv_heads, x.shape[2] // kv_heads,
                          x.shape[3]])


def take_chunks(x, start, count):
    """Chunks `start .. start + count` of `[Z, N, ...]` (start may be traced)."""
    begin = [0, start] + [0] * (len(x.shape) - 2)
    size = [-1, count] + [-1] * (len(x.shape) - 2)
    return tf.slice(x, begin, size)
