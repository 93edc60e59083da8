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

import collections

import numpy as np

FILLER_TOKEN = 0
PLACEMENTS = ("uniform", "power")


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


def _query_cells(rng, batch_size, cell_count, num_pairs, placement):
    """`[B, P]` increasing distinct cells of the query region."""
    if placement == "uniform":
        cells = _distinct_samples(rng, batch_size, cell_count, num_pairs)
    else:
        # Weighted sampling without replacement: the top P of
        # log(weight) + Gumbel noise (weight 1 / (c + 1)).
        noise = rng.gumbel(size=(batch_size, cell_count))
        scores = noise - np.log1p(np.arange(cell_count))
        cells = np.argpartition(-scores, num_pairs - 1, axis=1)[:, :num_pairs]
    return np.sort(cells, axis=1)


def _check_placement(placement):
    if placement not in PLACEMENTS:
        raise ValueError(f"`placement`: expected one of {PLACEMENTS}, got "
                         f"{placement!r}.")


def make_mqar_batch(rng, batch_size, sequence_length, num_pairs, vocab_size,
                    placement="uniform"):
    """One MQAR batch.

    Args:
        rng: a `numpy.random.Generator`; the batch is a pure function of its
            state.
        batch_size: sequences `B`.
        sequence_length: tokens per sequence `T` (>= 4 * num_pairs).
        num_pairs: key-value pairs `P` per sequence; every key is queried.
        vocab_size: token ids; keys are `[1, vocab/2)`, values
            `[vocab/2, vocab)`, 0 is the filler.
        placement: "uniform" (every cell of the query region equally likely)
            or "power" (cell `c` after the pairs with weight `1 / (c + 1)`).

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
    _check_placement(placement)
    half = vocab_size // 2
    keys = 1 + _distinct_samples(rng, batch_size, half - 1, num_pairs)
    values = half + _distinct_samples(rng, batch_size, half, num_pairs)

    # The query region holds (T - 2P) // 2 two-token cells; P of them, chosen
    # uniformly, carry "key value", in a random order of the keys.
    cells = _query_cells(rng, batch_size,
                         (sequence_length - 2 * num_pairs) // 2, num_pairs,
                         placement)
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


def make_mqar_mixture_batch(rng, batch_size, sequence_length, pair_counts,
                            vocab_size, placement="uniform"):
    """One MQAR batch whose rows split evenly over several pair counts.

    Args:
        rng: a `numpy.random.Generator`.
        batch_size: sequences `B` (rows `i * B // n` onwards hold the `i`-th
            of the `n` pair counts).
        sequence_length: tokens per sequence `T` (>= 4 * max(pair_counts)).
        pair_counts: a list of pair counts.
        vocab_size, placement: as in `make_mqar_batch`.

    Returns:
        A dict of int32 arrays `tokens` `[B, T]`, `positions` and `answers`
        `[B, max(pair_counts)]` (zero past a row's own count) and float32
        `weights` of the same shape (1 on a row's real answers, else 0).

    Example:

    >>> batch = make_mqar_mixture_batch(np.random.default_rng(0), 4, 64,
    ...                                 [4, 8], 512)
    >>> batch["weights"].sum(axis=1).tolist()
    [4.0, 4.0, 8.0, 8.0]
    """
    pair_counts = _pair_list(pair_counts)
    if batch_size < len(pair_counts):
        raise ValueError(f"`batch_size`: expected at least one row per pair "
                         f"count ({len(pair_counts)}), got {batch_size}.")
    most = max(pair_counts)
    edges = [i * batch_size // len(pair_counts)
             for i in range(len(pair_counts) + 1)]
    parts = collections.defaultdict(list)
    for count, low, high in zip(pair_counts, edges, edges[1:]):
        batch = make_mqar_batch(rng, high - low, sequence_length, count,
                                vocab_size, placement)
        pad = ((0, 0), (0, most - count))
        parts["tokens"].append(batch["tokens"])
        parts["positions"].append(np.pad(batch["positions"], pad))
        parts["answers"].append(np.pad(batch["answers"], pad))
        parts["weights"].append(np.pad(
            np.ones(batch["answers"].shape, np.float32), pad))
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _pair_list(pair_counts):
    """`pair_counts` as a non-empty list of ints (ValueError otherwise)."""
    if isinstance(pair_counts, (int, np.integer)) and not isinstance(
            pair_counts, bool):
        return [int(pair_counts)]
    if not isinstance(pair_counts, (list, tuple)) or not pair_counts:
        raise ValueError(f"`num_pairs`: expected an int or a non-empty list "
                         f"of ints, got {pair_counts!r}.")
    return [int(p) if isinstance(p, (int, np.integer)) and not isinstance(
        p, bool) else p for p in pair_counts]


def mqar_batches(seed, batch_size, sequence_length, num_pairs, vocab_size,
                 stream=0, placement="uniform"):
    """An endless, deterministic stream of MQAR batches.

    Args:
        seed: int; the same seed (and arguments) gives the same batches.
        batch_size, sequence_length, vocab_size, placement: as in
            `make_mqar_batch`.
        num_pairs: an int (batches of `make_mqar_batch`, plus all-one
            `weights`), or a list of pair counts (mixture batches of
            `make_mqar_mixture_batch`).
        stream: int; separate streams of one seed (e.g. 0 train, 1 test)
            never share a random state.

    Returns:
        A generator of batch dicts with `tokens`, `positions`, `answers` and
        `weights`.
    """
    pair_counts = _pair_list(num_pairs)
    for count in pair_counts:
        check_mqar_arguments(batch_size, sequence_length, count, vocab_size)
    _check_placement(placement)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or (
            seed < 0):
        raise ValueError(f"`seed`: expected an int >= 0, got {seed!r}.")
    # The uniform single-count stream keeps the seeding of rounds 1-3.
    key = [seed, stream, sequence_length, *pair_counts, vocab_size]
    if placement != "uniform":
        key.append(PLACEMENTS.index(placement))
    rng = np.random.default_rng(key)
    while True:
        yield make_mqar_mixture_batch(rng, batch_size, sequence_length,
                                      pair_counts, vocab_size, placement)
