"""MQAR training batches generated on the accelerator, inside the jitted step.

The same task and distribution as `mqar_data.make_mqar_mixture_batch` (keys
from `[1, V/2)`, values from `[V/2, V)`, distinct within a sequence; every key
asked once as `k v` in a random order at two-token cells of the query region;
"uniform" or "power" placement; rows split evenly over the pair counts), but
in `jax.numpy` from a PRNG key. Generating batches on the host cost ~0.7 ms per
run and step in numpy and held the GIL beside the training loop; here a batch
is a few small fused kernels and the training loop can run many steps per
call (`lax.scan`) without leaving the device.

Every row is built at the largest pair count and masked down to its own
count, so one shape serves the whole mixture. The random streams differ from
the numpy generator's (the test sets stay numpy: `mqar_data`, stream 1).
"""

import numpy as np

from mqar_data import FILLER_TOKEN
from mqar_data import PLACEMENTS
from mqar_data import check_mqar_arguments


def _row_pair_counts(batch_size, pair_counts):
    """`[B]` pair count of each row (rows `i * B // n` on hold count `i`)."""
    edges = [i * batch_size // len(pair_counts)
             for i in range(len(pair_counts) + 1)]
    counts = np.zeros(batch_size, np.int32)
    for count, low, high in zip(pair_counts, edges, edges[1:]):
        counts[low:high] = count
    return counts


def device_mqar_batch(key, batch_size, sequence_length, pair_counts,
                      vocab_size, placement="power"):
    """One mixture MQAR batch as jax arrays (jit- and vmap-friendly).

    Args:
        key: a `jax.random` key; the batch is a pure function of it.
        batch_size: sequences `B` (at least one row per pair count).
        sequence_length: tokens per sequence `T` (>= 4 * max(pair_counts)).
        pair_counts: list of pair counts; the rows split evenly over them.
        vocab_size: token ids (even; keys `[1, V/2)`, values `[V/2, V)`).
        placement: "uniform" or "power" (as in `mqar_data.make_mqar_batch`).

    Returns:
        A tuple `(tokens [B, T], positions [B, P], answers [B, P],
        weights [B, P])` with `P = max(pair_counts)`: int32, except float32
        weights (1 on a row's real answers, 0 on the padding, where
        positions and answers are 0), the layout `mqar.py` trains on.

    Example:

    >>> import jax
    >>> tokens, positions, answers, weights = device_mqar_batch(
    ...     jax.random.key(0), 4, 64, [4, 8], 512)
    >>> weights.sum(axis=1).tolist()
    [4.0, 4.0, 8.0, 8.0]
    """
    import jax
    import jax.numpy as jnp

    pair_counts = [int(p) for p in pair_counts]
    for count in pair_counts:
        check_mqar_arguments(batch_size, sequence_length, count, vocab_size)
    if placement not in PLACEMENTS:
        raise ValueError(f"`placement`: expected one of {PLACEMENTS}, got "
                         f"{placement!r}.")
    if batch_size < len(pair_counts):
        raise ValueError(f"`batch_size`: expected at least one row per pair "
                         f"count ({len(pair_counts)}), got {batch_size}.")
    most, half = max(pair_counts), vocab_size // 2
    counts = jnp.asarray(_row_pair_counts(batch_size, pair_counts))[:, None]
    slot = jnp.arange(most)[None, :]
    real = slot < counts                                    # [B, P]
    key_key, value_key, cell_key, order_key = jax.random.split(key, 4)

    def distinct(rng, population):
        """`[B, P]` ordered samples of `range(population)` without
        replacement: the first P of a uniformly random permutation."""
        scores = jax.random.uniform(rng, (batch_size, population))
        return jnp.argsort(scores, axis=1)[:, :most].astype("int32")

    keys = 1 + distinct(key_key, half - 1)
    values = half + distinct(value_key, half)

    # Query cells: the top P of (Gumbel noise + log weight) among a row's own
    # (T - 2p) // 2 cells is a weighted sample without replacement; its first
    # p are the row's cells, sorted by position.
    cell_count = (sequence_length - 2 * counts) // 2         # [B, 1]
    cell = jnp.arange((sequence_length - 2 * min(pair_counts)) // 2)[None]
    scores = jax.random.gumbel(cell_key, (batch_size, cell.shape[1]))
    if placement == "power":
        scores = scores - jnp.log1p(cell.astype("float32"))
    scores = jnp.where(cell < cell_count, scores, -jnp.inf)
    _, cells = jax.lax.top_k(scores, most)
    cells = jnp.sort(jnp.where(real, cells, cell.shape[1]), axis=1)
    # The keys are asked in a random order (a random permutation of a row's
    # first p pairs; padding sorts last).
    order = jnp.argsort(jnp.where(
        real, jax.random.uniform(order_key, (batch_size, most)), 2.0), axis=1)
    asked_keys = jnp.take_along_axis(keys, order, axis=1)
    asked_values = jnp.take_along_axis(values, order, axis=1)

    positions = jnp.where(real, 2 * counts + 2 * cells, 0)
    rows = jnp.arange(batch_size)[:, None]
    nowhere = sequence_length    # an out-of-range index: dropped by .set
    tokens = jnp.full((batch_size, sequence_length), FILLER_TOKEN, "int32")
    tokens = tokens.at[rows, jnp.where(real, 2 * slot, nowhere)].set(
        keys, mode="drop")
    tokens = tokens.at[rows, jnp.where(real, 2 * slot + 1, nowhere)].set(
        values, mode="drop")
    tokens = tokens.at[rows, jnp.where(real, positions, nowhere)].set(
        asked_keys, mode="drop")
    tokens = tokens.at[rows, jnp.where(real, positions + 1, nowhere)].set(
        asked_values, mode="drop")
    answers = jnp.where(real, asked_values, 0)
    return (tokens, positions.astype("int32"), answers.astype("int32"),
            real.astype("float32"))
