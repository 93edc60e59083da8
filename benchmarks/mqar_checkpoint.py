"""Save and resume the MQAR runs of one setting between GPU rounds.

A checkpoint is one `.npz` file per setting: the trainable and non-trainable
values of every vmapped run and the step reached, plus the run list and the
recipe it must be resumed with. The weights are stored in float16 (half the
bytes; the rounding, ~5e-4 relative, is below one optimizer update) and the
AdamW moments are NOT stored (they would triple the file: a round's output is
limited to 10 MB): a resumed run restarts AdamW's moments at zero with its
bias correction from step 1, while its learning-rate schedule continues at
the saved step (`mqar.py --resume-warmup` ramps it up again meanwhile).
With `bits=8` every matrix is stored as int8 with one float32 scale per row
(its largest magnitude / 127; vectors stay float16): half the bytes again,
for two GPU jobs of ten runs each within one round's returned files, at a
rounding error of at most 1/254 of a row's largest weight.
"""

import json

import numpy as np

# Arguments that must match for a resumed run to continue the same task and
# recipe (the schedule's length, `steps`, comes from the checkpoint).
RECIPE = ("seq_len", "vocab", "hidden", "heads", "pairs",
          "placement", "short_conv", "batch_size", "warmup", "weight_decay",
          "clipnorm")


def _quantized(array):
    """`(int8 values, float32 scales)` with one scale per row (last axis)."""
    array = np.asarray(array, np.float32)
    scale = np.max(np.abs(array), axis=-1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.round(array / scale).astype(np.int8), scale


def save_checkpoint(path, setting, runs, step, trainable, non_trainable,
                    args, bits=16):
    """Writes the runs of a setting to `path` (.npz).

    Args:
        path: file to write.
        setting: the setting name.
        runs: list of `(train_pairs, seed, lr)`, the vmapped runs.
        step: training steps done.
        trainable, non_trainable: lists of arrays stacked over the runs.
        args: the parsed command line (its `RECIPE` fields are stored).
        bits: 16 (float16 weights) or 8 (int8 matrices, one scale per row).
    """
    if bits not in (8, 16):
        raise ValueError(f"`bits`: expected 8 or 16, got {bits!r}.")
    meta = dict(setting=setting, step=int(step), steps=int(args.steps),
                runs=[[list(p) if isinstance(p, tuple) else p, s, lr]
                      for p, s, lr in runs],
                recipe={name: getattr(args, name) for name in RECIPE})
    arrays = {}
    for i, value in enumerate(trainable):
        value = np.asarray(value, np.float32)
        if bits == 8 and value.ndim >= 3:   # runs x a matrix or more
            arrays[f"trainable_{i}"], arrays[f"scale_{i}"] = _quantized(value)
        else:
            arrays[f"trainable_{i}"] = value.astype(np.float16)
    arrays.update({f"non_trainable_{i}": np.asarray(v)
                   for i, v in enumerate(non_trainable)})
    with open(path, "wb") as handle:
        np.savez_compressed(handle, meta=json.dumps(meta), **arrays)


def load_checkpoint(path, setting, runs, args):
    """Reads a checkpoint written by `save_checkpoint` for the same runs.

    Args:
        path: the `.npz` file.
        setting, runs, args: as in `save_checkpoint`; they must match the
            stored ones.

    Returns:
        `(step, steps, trainable, non_trainable)`: the step reached, the
        length of the learning-rate schedule, and the lists of float32
        (trainable) and stored-dtype (non-trainable) arrays.

    Raises:
        ValueError: naming what differs, if the checkpoint is of another
            setting, other runs or another recipe.
    """
    meta, trainable, non_trainable = read_checkpoint(path)
    expected = [[list(p) if isinstance(p, tuple) else p, s, lr]
                for p, s, lr in runs]
    if meta["setting"] != setting:
        raise ValueError(f"`resume`: {path} holds {meta['setting']!r}, not "
                         f"{setting!r}.")
    if meta["runs"] != expected:
        raise ValueError(f"`resume`: {path} holds runs {meta['runs']}, not "
                         f"{expected}.")
    for name in RECIPE:
        stored, given = meta["recipe"][name], getattr(args, name)
        if (list(given) if isinstance(given, tuple) else given) != stored:
            raise ValueError(f"`resume`: {path} was trained with {name}="
                             f"{stored!r}, this run has {given!r}.")
    return meta["step"], meta["steps"], trainable, non_trainable


def read_checkpoint(path):
    """`(meta, float32 trainable arrays, non-trainable arrays)` of a file."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        trainable = [data[f"trainable_{i}"].astype(np.float32) * (
            data[f"scale_{i}"] if f"scale_{i}" in data.files else 1.0)
                     for i in range(_count(data, "trainable_"))]
        non_trainable = [data[f"non_trainable_{i}"]
                         for i in range(_count(data, "non_trainable_"))]
    return meta, trainable, non_trainable


def _rows_of_seeds(path, meta, seeds):
    """The stored run index of each seed (each must be there once)."""
    stored_seeds = [seed for _, seed, _ in meta["runs"]]
    rows = []
    for seed in seeds:
        if stored_seeds.count(seed) != 1:
            raise ValueError(f"`seeds`: {path} holds seeds {stored_seeds}; "
                             f"seed {seed} is not there exactly once.")
        rows.append(stored_seeds.index(seed))
    return rows


def _count(data, prefix):
    return sum(1 for name in data.files if name.startswith(prefix)
               and name[len(prefix):].isdigit())


# What a model's weights depend on: a checkpoint's weights initialise runs
# of another sequence length, pair mixture or schedule if these match.
SHAPE_RECIPE = ("vocab", "hidden", "heads", "short_conv")


def load_weights(path, setting, seeds, args):
    """The weights of some runs of a checkpoint, to start other runs from.

    Unlike `load_checkpoint`, the sequence length, pairs and schedule may
    differ (fine-tuning at a longer T, or testing only): the runs are
    matched by seed.

    Args:
        path: an `.npz` written by `save_checkpoint`.
        setting: the setting name; must be the stored one.
        seeds: one seed per run to start, each stored exactly once.
        args: the parsed command line (its `SHAPE_RECIPE` fields must match).

    Returns:
        `(trainable, non_trainable, step)`: lists of arrays stacked over
        `seeds` in their order, and the step the checkpoint had reached.

    Raises:
        ValueError: naming what differs or which seed is missing.
    """
    meta, trainable, non_trainable = read_checkpoint(path)
    if meta["setting"] != setting:
        raise ValueError(f"`init_from`: {path} holds {meta['setting']!r}, "
                         f"not {setting!r}.")
    for name in SHAPE_RECIPE:
        stored, given = meta["recipe"][name], getattr(args, name)
        if given != stored:
            raise ValueError(f"`init_from`: {path} was trained with {name}="
                             f"{stored!r}, this run has {given!r}.")
    rows = _rows_of_seeds(path, meta, seeds)
    pick = lambda arrays: [np.asarray(a)[rows] for a in arrays]
    return pick(trainable), pick(non_trainable), meta["step"]


def keep_runs(path, seeds, output=None):
    """Rewrites a checkpoint with only the runs of `seeds` (in their order).

    The stored values are copied as they are (no second rounding).

    Args:
        path: an `.npz` written by `save_checkpoint`.
        seeds: the seeds of the runs to keep, each stored exactly once.
        output: where to write (default: over `path`).
    """
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in data.files if name != "meta"}
    rows = _rows_of_seeds(path, meta, seeds)
    meta["runs"] = [meta["runs"][row] for row in rows]
    arrays = {name: value[rows] if name.startswith(("trainable_", "scale_",
                                                    "non_trainable_"))
              else value for name, value in arrays.items()}
    with open(output or path, "wb") as handle:
        np.savez_compressed(handle, meta=json.dumps(meta), **arrays)


def best_seeds(results_path, setting, count, pairs):
    """The `count` seeds of `setting` with the best final test accuracy at
    `pairs` pairs in a `mqar.py` result file (best first)."""
    scores = {}
    with open(results_path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if (record["setting"] == setting
                        and record["pairs"] == pairs
                        and not record.get("transfer")):
                    scores[record["seed"]] = record["test_accuracy"]
    return sorted(scores, key=lambda seed: -scores[seed])[:count]


def merge_checkpoints(paths, output):
    """Writes the runs of several checkpoints of one setting and recipe as
    one (in the order given), e.g. the best runs of two processes, to be
    fine-tuned together in one vmapped process.

    Raises:
        ValueError: if the settings or recipes differ, or a seed repeats.
    """
    metas, parts = [], []
    for path in paths:
        with np.load(path) as data:
            metas.append(json.loads(str(data["meta"])))
            parts.append({name: data[name] for name in data.files
                          if name != "meta"})
    first = metas[0]
    for path, meta in zip(paths, metas):
        if (meta["setting"], meta["recipe"]) != (first["setting"],
                                                 first["recipe"]):
            raise ValueError(f"`paths`: {path} holds another setting or "
                             f"recipe than {paths[0]}.")
    runs = [run for meta in metas for run in meta["runs"]]
    seeds = [seed for _, seed, _ in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`paths`: seeds {seeds} repeat.")
    meta = dict(first, runs=runs, step=min(m["step"] for m in metas),
                steps=max(m["steps"] for m in metas))
    arrays = {name: np.concatenate([part[name] for part in parts])
              for name in parts[0]}
    with open(output, "wb") as handle:
        np.savez_compressed(handle, meta=json.dumps(meta), **arrays)
