"""Multi-query associative recall (MQAR) batches, generated on the fly.

The task follows Zoology (Arora et al., 2023): a sequence of `T` tokens starts
with `P` key-value pairs `k1 v1 k2 v2 ... kP vP`; the rest is filler (token 0)
into which every key is asked once, at a random later position, as the pair
`k v` (the value is fed back, teacher forcing). The model must predict `v` at
the position of each queried `k`, so loss and accuracy count those `P`
positions only. Keys come from `[1, vocab/2)` and values from
`[vocab/2, vocab)`, both drawn without replacement within a sequence.

Pure numpy: the same generator serves every Keras backend.
"""

import numpy as np

FILLER_TOKEN = 0


def check_mqar_arguments(batch_size, sequence_length, num_pairs, vocab_size):
    """Raises ValueError naming the first bad argument.

    Args:
        batch_size: sequences per batch, an int >= 1.
        sequence_length: tokens per sequence `T`, an int >= 4 * num_pairs.
        num_pairs: key-value pairs `P` per sequence, an int >= 1.
        vocab_size: token ids, an even int with at least `P` keys and `P`
            values (`vocab_size / 2 - 1 >= P`).
    """
    for name, value in (("batch_size", batch_size),
                        ("sequence_length", sequence_length),
                        ("num_pairs", num_pairs),
                        ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"`{name}`: expected an int, got {value!r}.")
        if value < 1:
            raise ValueError(f"`{name}`: expected >= 1, got {value}.")
    if sequence_length < 4 * num_pairs:
        raise ValueError(
            f"`sequence_length`: expected >= 4 * num_pairs = {4 * num_pairs} "
            f"(the pairs, then room for every query and its answer), got "
            f"{sequence_length}.")
    if vocab_size % 2:
        raise ValueError(f"`vocab_size`: expected an even number (half keys, "
                         f"half values), got {vocab_size}.")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(
            f"`vocab_size`: expected at least {2 * num_pairs + 2} for "
            f"{num_pairs} distinct keys and values, got {vocab_size}.")


def _distinct_samples(rng, rows, population, count):
    """`[rows, count]` ints from `range(population)`, distinct within a row,
    each row a uniformly random ordered sample without replacement."""
    if population < 8 * count:
        scores = rng.random((rows, population), dtype=np.float32)
        return np.argpartition(scores, count - 1, axis=1)[:, :count]
    # Large populations: the first `count` distinct values of 2 * count
    # uniform draws (O(count) per row instead of O(population)). Duplicates
    # are rare; a row with too few distinct draws is drawn again.
    draws = rng.integers(0, population, (rows, 2 * count))
    order = np.argsort(draws, axis=1, kind="stable")
    ranked = np.take_along_axis(draws, order, axis=1)
    repeated = np.zeros(draws.shape, bool)
    np.put_along_axis(repeated, order[:, 1:],
                      ranked[:, 1:] == ranked[:, :-1], axis=1)
    first = np.argsort(repeated, axis=1, kind="stable")[:, :count]
    samples = np.take_along_axis(draws, first, axis=1)
    short = np.flatnonzero(repeated.sum(axis=1) > count)
    if short.size:
        samples[short] = _distinct_samples(rng, short.size, population, count)
    return samples


def make_mqar_batch(rng, batch_size, sequence_length, num_pairs, vocab_size):
    """One MQAR batch.

    Args:
        rng: a `numpy.random.Generator`; the batch is a pure function of its
            state.
        batch_size: sequences `B`.
        sequence_length: tokens per sequence `T` (>= 4 * num_pairs).
        num_pairs: key-value pairs `P` per sequence; every key is queried.
        vocab_size: token ids; keys are `[1, vocab/2)`, values
            `[vocab/2, vocab)`, 0 is the filler.

    Returns:
        A dict of int32 arrays: `tokens` `[B, T]`, `positions` `[B, P]` (where
        each query key sits, increasing), `answers` `[B, P]` (the value paired
        with that key, to be predicted at that position).

    Example:

    >>> batch = make_mqar_batch(np.random.default_rng(0), 2, 64, 8, 8192)
    >>> batch["tokens"].shape, batch["answers"].shape
    ((2, 64), (2, 8))
    """
    check_mqar_arguments(batch_size, sequence_length, num_pairs, vocab_size)
    half = vocab_size // 2
    keys = 1 + _distinct_samples(rng, batch_size, half - 1, num_pairs)
    values = half + _distinct_samples(rng, batch_size, half, num_pairs)

    # The query region holds (T - 2P) // 2 two-token cells; P of them, chosen
    # uniformly, carry "key value", in a random order of the keys.
    cells = np.sort(_distinct_samples(
        rng, batch_size, (sequence_length - 2 * num_pairs) // 2, num_pairs),
        axis=1)
    order = np.argsort(rng.random((batch_size, num_pairs)), axis=1)
    asked_keys = np.take_along_axis(keys, order, axis=1)
    asked_values = np.take_along_axis(values, order, axis=1)

    tokens = np.full((batch_size, sequence_length), FILLER_TOKEN, np.int32)
    tokens[:, 0:2 * num_pairs:2] = keys
    tokens[:, 1:2 * num_pairs:2] = values
    positions = 2 * num_pairs + 2 * cells
    rows = np.arange(batch_size)[:, None]
    tokens[rows, positions] = asked_keys
    tokens[rows, positions + 1] = asked_values
    return dict(tokens=tokens, positions=positions.astype(np.int32),
                answers=asked_values.astype(np.int32))


def mqar_batches(seed, batch_size, sequence_length, num_pairs, vocab_size,
                 stream=0):
    """An endless, deterministic stream of MQAR batches.

    Args:
        seed: int; the same seed (and arguments) gives the same batches.
        batch_size, sequence_length, num_pairs, vocab_size: as in
            `make_mqar_batch`.
        stream: int; separate streams of one seed (e.g. 0 train, 1 test)
            never share a random state.

    Returns:
        A generator of `make_mqar_batch` dicts.
    """
    check_mqar_arguments(batch_size, sequence_length, num_pairs, vocab_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or (
            seed < 0):
        raise ValueError(f"`seed`: expected an int >= 0, got {seed!r}.")
    rng = np.random.default_rng(
        [seed, stream, sequence_length, num_pairs, vocab_size])
    while True:
        yield make_mqar_batch(rng, batch_size, sequence_length, num_pairs,
                              vocab_size)
