"""Which queries a trained MQAR model answers: accuracy by how far back the
queried pair sits.

Loads the runs of one setting saved by `mqar.py --checkpoint` and tests each
on the numpy test stream at one pair count, binning every answer by the
distance (in tokens) from its key-value pair to the query. A model that
recalls everything is flat; one that only remembers recent tokens (a window)
falls off with the distance.

    KERAS_BACKEND=jax python benchmarks/mqar_diagnose.py \\
        benchmarks/results/mqar_s4_resume/nha-M16-W16.npz --pairs 64
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mqar_data import mqar_batches  # noqa: E402

_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def accuracy_by_distance(path, pairs, batches=4, seq_len=None,
                         batch_size=None):
    """Per saved run, `{distance bin: (accuracy, answers)}`.

    Args:
        path: a checkpoint `.npz` of `mqar_checkpoint.save_checkpoint`
            (float16 or int8).
        pairs: the pair count to test at.
        batches: test batches.
        seq_len: the length to test at (default: the trained one).
        batch_size: sequences per batch (default: the recipe's).

    Returns:
        `(meta, [(seed, lr, {(low, high): (accuracy, count)})])`.
    """
    import keras

    from mqar_checkpoint import read_checkpoint
    from mqar_model import build_mqar_model

    meta, trainable, _ = read_checkpoint(path)
    recipe = meta["recipe"]
    model = build_mqar_model(meta["setting"], recipe["vocab"],
                             recipe["hidden"], recipe["heads"],
                             2 * recipe["hidden"], "chunked",
                             recipe["short_conv"], 16)
    results = []
    for index, (_, seed, lr) in enumerate(meta["runs"]):
        for variable, value in zip(model.trainable_variables, trainable):
            variable.assign(value[index])
        stream = mqar_batches(seed, batch_size or recipe["batch_size"],
                              seq_len or recipe["seq_len"], pairs,
                              recipe["vocab"], 1, recipe["placement"])
        hits, counts = np.zeros(len(_EDGES) - 1), np.zeros(len(_EDGES) - 1)
        for _ in range(batches):
            batch = next(stream)
            logits = keras.ops.convert_to_numpy(model(
                {"token_ids": batch["tokens"],
                 "positions": batch["positions"]}))
            right = logits.argmax(-1) == batch["answers"]
            keys = batch["tokens"][:, 0:2 * pairs:2]
            for row in range(len(keys)):
                where = {key: 2 * i for i, key in enumerate(keys[row])}
                for j, position in enumerate(batch["positions"][row]):
                    distance = position - where[batch["tokens"][row,
                                                                position]]
                    slot = np.searchsorted(_EDGES, distance, "right") - 1
                    hits[slot] += right[row, j]
                    counts[slot] += 1
        results.append((seed, lr, {
            (low, high): (hits[i] / counts[i], int(counts[i]))
            for i, (low, high) in enumerate(zip(_EDGES, _EDGES[1:]))
            if counts[i]}))
    return meta, results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoint", nargs="+")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int,
                        help="test at this length (default: the trained one)")
    parser.add_argument("--batch-size", type=int,
                        help="sequences per batch (default: the recipe's)")
    args = parser.parse_args(argv)
    for path in args.checkpoint:
        meta, results = accuracy_by_distance(path, args.pairs, args.batches,
                                             args.seq_len, args.batch_size)
        trained = meta["recipe"]["seq_len"]
        print(f"{meta['setting']} (step {meta['step']}, trained at T="
              f"{trained}), T={args.seq_len or trained}, {args.pairs} pairs:"
              f" accuracy by distance from pair to query (tokens)")
        for seed, lr, bins in results:
            print(f"  seed {seed} lr {lr:g}: " + "  ".join(
                f"[{low},{high}) {accuracy:.2f} (n={count})"
                for (low, high), (accuracy, count) in bins.items()))


if __name__ == "__main__":
    main()
