"""The MQAR task generator of benchmarks/mqar_data.py (numpy; any backend)."""

import importlib.util
import pathlib

import numpy as np
import pytest

_BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(
        name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mqar_data = _load("mqar_data")
mqar_model = _load("mqar_model")


def _batch(seed=0, batch_size=16, sequence_length=100, num_pairs=12,
           vocab_size=64, placement="uniform"):
    return mqar_data.make_mqar_batch(np.random.default_rng(seed), batch_size,
                                     sequence_length, num_pairs, vocab_size,
                                     placement)


def test_shapes_and_dtypes():
    batch = _batch(batch_size=5, sequence_length=70, num_pairs=9)
    assert batch["tokens"].shape == (5, 70)
    assert batch["positions"].shape == (5, 9)
    assert batch["answers"].shape == (5, 9)
    assert all(a.dtype == np.int32 for a in batch.values())


def _check_rows(batch, num_pairs, vocab_size):
    """Every row of `batch` is a valid MQAR sequence with `num_pairs`."""
    half = vocab_size // 2
    for tokens, positions, answers in zip(batch["tokens"], batch["positions"],
                                          batch["answers"]):
        keys = tokens[0:2 * num_pairs:2]
        values = tokens[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
        assert keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < vocab_size
        paired = dict(zip(keys, values))
        # Queries come after the pairs, in increasing order, each key once.
        assert positions.min() >= 2 * num_pairs
        assert np.all(np.diff(positions) >= 2)
        assert sorted(tokens[positions]) == sorted(keys)
        for position, answer in zip(positions, answers):
            assert answer == paired[tokens[position]]
            assert tokens[position + 1] == answer  # fed back (teacher forcing)
        # Everything else in the query region is filler.
        asked = np.zeros(len(tokens), bool)
        asked[:2 * num_pairs] = True
        asked[positions] = asked[positions + 1] = True
        assert np.all(tokens[~asked] == mqar_data.FILLER_TOKEN)


@pytest.mark.parametrize("placement", mqar_data.PLACEMENTS)
def test_answers_are_the_values_paired_with_the_queried_keys(placement):
    batch = _batch(num_pairs=12, vocab_size=64, placement=placement)
    _check_rows(batch, 12, 64)


def test_power_placement_asks_soon_after_the_pairs():
    uniform = _batch(batch_size=256, sequence_length=512, num_pairs=8)
    power = _batch(batch_size=256, sequence_length=512, num_pairs=8,
                   placement="power")
    # Uniform cells average about half the query region (248 cells); with
    # weight 1 / (c + 1) most queries sit in its first tenth.
    cell = lambda b: (b["positions"] - 16) // 2
    assert 100 < cell(uniform).mean() < 150
    assert np.median(cell(power)) < 25
    assert (cell(power) > 124).any()   # the tail is still reached


def test_mixture_batch_rows_have_their_own_pair_counts():
    batch = mqar_data.make_mqar_mixture_batch(
        np.random.default_rng(0), 10, 64, [4, 8, 16], 128, "power")
    assert batch["tokens"].shape == (10, 64)
    assert batch["answers"].shape == batch["weights"].shape == (10, 16)
    counts = batch["weights"].sum(axis=1).astype(int).tolist()
    assert counts == [4] * 3 + [8] * 3 + [16] * 4   # rows i * 10 // 3
    for low, high, pairs in ((0, 3, 4), (3, 6, 8), (6, 10, 16)):
        rows = {name: value[low:high, :pairs] if name != "tokens" else
                value[low:high] for name, value in batch.items()}
        _check_rows(rows, pairs, 128)
        assert np.all(batch["answers"][low:high, pairs:] == 0)
    stream = mqar_data.mqar_batches(5, 10, 64, [4, 8, 16], 128)
    again = mqar_data.mqar_batches(5, 10, 64, [4, 8, 16], 128)
    np.testing.assert_array_equal(next(stream)["tokens"],
                                  next(again)["tokens"])
    single = next(mqar_data.mqar_batches(5, 4, 64, 8, 128))
    assert np.all(single["weights"] == 1)


@pytest.mark.parametrize("call, name", [
    (lambda: next(mqar_data.mqar_batches(0, 4, 64, 8, 128,
                                         placement="log")), "placement"),
    (lambda: next(mqar_data.mqar_batches(0, 2, 64, [4, 8, 12], 128)),
     "batch_size"),
    (lambda: next(mqar_data.mqar_batches(0, 4, 64, [], 128)), "num_pairs"),
    (lambda: next(mqar_data.mqar_batches(0, 4, 64, [4, 20], 128)),
     "sequence_length"),
])
def test_bad_mixture_or_placement_raises(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


def test_short_convolution_keeps_the_model_causal():
    import keras

    model = mqar_model.build_mqar_model("nha-M4-W4", 32, hidden_dim=16,
                                        num_heads=2, intermediate_dim=32,
                                        short_conv=3)
    tokens = np.random.default_rng(0).integers(1, 32, (2, 16)).astype("int32")
    changed = tokens.copy()
    changed[:, 9:] = (changed[:, 9:] + 7) % 31 + 1
    positions = np.array([[2, 5, 8], [0, 7, 8]], "int32")
    read = lambda t: keras.ops.convert_to_numpy(
        model({"token_ids": t, "positions": positions}, training=False))
    before, after = read(tokens), read(changed)
    np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)
    kernel = model.get_layer("short_conv").kernel
    assert tuple(kernel.shape) == (3, 1, 16)   # depthwise, 3 taps
    with pytest.raises(ValueError, match="`short_conv`"):
        mqar_model.build_mqar_model("full", 32, short_conv=-1)


def test_queries_spread_over_the_sequence():
    batch = _batch(batch_size=64, sequence_length=256, num_pairs=8)
    # Uniform placement: some queries land in the last quarter, some early.
    assert (batch["positions"] >= 192).any()
    assert (batch["positions"] < 64).any()


def test_deterministic_per_seed():
    first = next(mqar_data.mqar_batches(3, 4, 64, 8, 128))
    again = next(mqar_data.mqar_batches(3, 4, 64, 8, 128))
    other = next(mqar_data.mqar_batches(4, 4, 64, 8, 128))
    test_stream = next(mqar_data.mqar_batches(3, 4, 64, 8, 128, stream=1))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["tokens"], other["tokens"])
    assert not np.array_equal(first["tokens"], test_stream["tokens"])
    stream = mqar_data.mqar_batches(3, 4, 64, 8, 128)
    assert not np.array_equal(next(stream)["tokens"], next(stream)["tokens"])


@pytest.mark.parametrize("arguments, name", [
    (dict(batch_size=0), "batch_size"),
    (dict(sequence_length=47), "sequence_length"),   # < 4 * 12
    (dict(num_pairs=0), "num_pairs"),
    (dict(num_pairs=2.0), "num_pairs"),
    (dict(vocab_size=63), "vocab_size"),             # odd
    (dict(vocab_size=24), "vocab_size"),             # 11 keys < 12 pairs
    (dict(batch_size=True), "batch_size"),
])
def test_bad_arguments_raise(arguments, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        _batch(**arguments)


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="`seed`"):
        next(mqar_data.mqar_batches(-1, 4, 64, 8, 128))


def test_settings_and_state_sizes():
    assert mqar_model.parse_setting("nha-M32-W16") == ([16, 16], [32, 32])
    assert mqar_model.parse_setting("gsa-M8") == ([0, 0], [8, 8])
    assert mqar_model.parse_setting("swa-W64") == ([64, 64], [0, 0])
    assert mqar_model.parse_setting("full") == ([None, None], [0, 0])
    assert mqar_model.parse_setting("hybrid-M16") == ([0, None], [16, 0])
    floats = lambda name: mqar_model.state_floats(name, 256, 2, 64)
    # Equal state: M + W tokens per layer.
    assert floats("nha-M32-W32") == floats("gsa-M64") == floats("swa-W64")
    assert floats("nha-M32-W32") == 2 * 2 * 64 * 2 * 64
    assert floats("full") == 2 * 2 * 256 * 2 * 64
    assert floats("swa-W512") == floats("full")    # the window stops at T
    for bad in ("nha-W64-X3", "gsa-W64", "full-M4", "lstm", None):
        with pytest.raises(ValueError, match="`setting`"):
            mqar_model.parse_setting(bad)


@pytest.mark.parametrize("population, count", [(16, 2), (4096, 64), (9, 9)])
def test_distinct_samples_are_distinct_and_in_range(population, count):
    # (16, 2) draws 4 from 16 per row: many rows repeat a value and take
    # the redraw path; (9, 9) is a full permutation.
    samples = mqar_data._distinct_samples(np.random.default_rng(0), 2000,
                                          population, count)
    assert samples.shape == (2000, count)
    assert samples.min() >= 0 and samples.max() < population
    assert all(len(set(row)) == count for row in samples)
    if population <= 16:   # uniform: each value about equally often first
        frequency = np.bincount(samples[:, 0], minlength=population) / 2000
        assert np.all(np.abs(frequency * population - 1) < 0.35)


def _load_with_benchmarks_on_path(name):
    """Loads a benchmark module that imports its siblings by name."""
    import sys

    if str(_BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(_BENCHMARKS))
    return _load(name)


_needs_jax = pytest.mark.skipif(
    __import__("keras").config.backend() != "jax",
    reason="the on-device generator and the training loop are JAX")


@_needs_jax
@pytest.mark.parametrize("placement", mqar_data.PLACEMENTS)
def test_device_batches_are_valid_mixture_rows(placement):
    import jax

    device_data = _load_with_benchmarks_on_path("mqar_device_data")
    tokens, positions, answers, weights = map(np.asarray, jax.jit(
        lambda key: device_data.device_mqar_batch(
            key, 10, 64, [4, 8, 16], 128, placement))(jax.random.key(3)))
    assert tokens.shape == (10, 64) and answers.shape == (10, 16)
    assert tokens.dtype == positions.dtype == answers.dtype == np.int32
    counts = weights.sum(axis=1).astype(int).tolist()
    assert counts == [4] * 3 + [8] * 3 + [16] * 4   # as the numpy mixture
    for low, high, pairs in ((0, 3, 4), (3, 6, 8), (6, 10, 16)):
        rows = dict(tokens=tokens[low:high],
                    positions=positions[low:high, :pairs],
                    answers=answers[low:high, :pairs])
        _check_rows(rows, pairs, 128)
        assert np.all(positions[low:high, pairs:] == 0)
        assert np.all(answers[low:high, pairs:] == 0)


@_needs_jax
def test_device_batches_follow_the_numpy_distribution():
    import jax

    device_data = _load_with_benchmarks_on_path("mqar_device_data")
    make = jax.jit(lambda key: device_data.device_mqar_batch(
        key, 256, 512, [8], 1024, "power"))
    _, positions, _, _ = make(jax.random.key(0))
    cells = (np.asarray(positions) - 16) // 2
    numpy_cells = (_batch(batch_size=256, sequence_length=512, num_pairs=8,
                          vocab_size=1024, placement="power")["positions"]
                   - 16) // 2
    # Same weighting 1 / (c + 1): medians agree, the tail is reached.
    assert abs(np.median(cells) - np.median(numpy_cells)) < 5
    assert (cells > 124).any()
    again = np.asarray(make(jax.random.key(0))[1])
    other = np.asarray(make(jax.random.key(1))[1])
    np.testing.assert_array_equal(np.asarray(positions), again)
    assert not np.array_equal(again, other)
    with pytest.raises(ValueError, match="`placement`"):
        device_data.device_mqar_batch(jax.random.key(0), 4, 64, [4], 128,
                                      "log")
    with pytest.raises(ValueError, match="`batch_size`"):
        device_data.device_mqar_batch(jax.random.key(0), 2, 64, [4, 8, 12],
                                      128)


def _recipe(**changes):
    import argparse

    recipe = dict(steps=500, seq_len=64, vocab=128, hidden=16, heads=2,
                  pairs=[4, 8], placement="power", short_conv=3,
                  batch_size=8, warmup=10, weight_decay=0.1, clipnorm=1.0)
    recipe.update(changes)
    return argparse.Namespace(**recipe)


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    checkpoint = _load_with_benchmarks_on_path("mqar_checkpoint")
    rng = np.random.default_rng(0)
    runs = [((4, 8), 0, 1e-3), ((4, 8), 1, 1e-3)]
    trainable = [rng.normal(size=(2, 5, 3)).astype("float32"),
                 rng.normal(size=(2, 7)).astype("float32")]
    non_trainable = [np.arange(4, dtype="int32").reshape(2, 2)]
    path = str(tmp_path / "runs.npz")
    checkpoint.save_checkpoint(path, "nha-M4-W4", runs, 120, trainable,
                               non_trainable, _recipe())
    step, steps, loaded, loaded_fixed = checkpoint.load_checkpoint(
        path, "nha-M4-W4", runs, _recipe(steps=9999))
    assert (step, steps) == (120, 500)   # the schedule comes from the file
    for saved, back in zip(trainable, loaded):
        assert back.dtype == np.float32 and back.shape == saved.shape
        np.testing.assert_allclose(back, saved, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(loaded_fixed[0], non_trainable[0])
    for setting, other_runs, recipe, name in (
            ("gsa-M8", runs, _recipe(), "nha-M4-W4"),
            ("nha-M4-W4", runs[:1], _recipe(), "runs"),
            ("nha-M4-W4", runs, _recipe(vocab=256), "vocab"),
            ("nha-M4-W4", runs, _recipe(pairs=[8]), "pairs")):
        with pytest.raises(ValueError, match=name):
            checkpoint.load_checkpoint(path, setting, other_runs, recipe)


@_needs_jax
def test_learning_rate_warms_up_then_decays_to_one_percent():
    train = _load_with_benchmarks_on_path("mqar_train")
    rate = lambda step, total=1000: float(train.learning_rate(
        2.0, step, 100, total))
    assert rate(0) == pytest.approx(0.02)
    assert rate(99) == pytest.approx(2.0)
    assert rate(550) == pytest.approx(2.0 * (0.01 + 0.99 * 0.5))
    assert rate(1000) == pytest.approx(0.02)
    assert rate(5000) == pytest.approx(0.02)
    # A longer schedule decays later (the plan fixes `total` at warmup's end).
    assert rate(550, total=4000) > rate(550)


def test_accuracy_by_distance_counts_every_answer(tmp_path):
    import keras

    checkpoint = _load_with_benchmarks_on_path("mqar_checkpoint")
    diagnose = _load_with_benchmarks_on_path("mqar_diagnose")
    recipe = _recipe(seq_len=48, vocab=64, hidden=8, pairs=[4, 8],
                     batch_size=4)
    runs = [((4, 8), 5, 1e-3)]
    keras.utils.set_random_seed(5)
    model = mqar_model.build_mqar_model("nha-M4-W4", 64, 8, 2, 16,
                                        "chunked", 3, 16)
    path = str(tmp_path / "nha.npz")
    checkpoint.save_checkpoint(
        path, "nha-M4-W4", runs, 7,
        [np.asarray(keras.ops.convert_to_numpy(v))[None]
         for v in model.trainable_variables], [], recipe)
    meta, results = diagnose.accuracy_by_distance(path, 8, batches=2)
    assert meta["step"] == 7 and len(results) == 1
    seed, lr, bins = results[0]
    assert (seed, lr) == (5, 1e-3)
    assert sum(count for _, count in bins.values()) == 2 * 4 * 8
    assert all(0.0 <= accuracy <= 1.0 for accuracy, _ in bins.values())
    # An untrained model guesses: far from solving the task.
    hits = sum(accuracy * count for accuracy, count in bins.values())
    assert hits / (2 * 4 * 8) < 0.5
    # At a longer T than trained, with another batch size.
    _, longer = diagnose.accuracy_by_distance(path, 8, batches=1,
                                              seq_len=200, batch_size=3)
    bins = longer[0][2]
    assert sum(count for _, count in bins.values()) == 3 * 8
    assert max(high for _, high in bins) > 48   # queries beyond T = 48


def test_int8_checkpoint_rounds_each_row_within_its_scale(tmp_path):
    checkpoint = _load_with_benchmarks_on_path("mqar_checkpoint")
    rng = np.random.default_rng(1)
    runs = [((4, 8), 0, 1e-3), ((4, 8), 1, 1e-3)]
    matrix = rng.normal(size=(2, 40, 128)).astype("float32")
    matrix[1, 3] *= 50.0   # one large row keeps its own scale
    vector = rng.normal(size=(2, 128)).astype("float32")
    paths = {bits: str(tmp_path / f"runs{bits}.npz") for bits in (8, 16)}
    for bits, path in paths.items():
        checkpoint.save_checkpoint(path, "gsa-M4", runs, 3, [matrix, vector],
                                   [], _recipe(), bits)
    _, _, (matrix_back, vector_back), _ = checkpoint.load_checkpoint(
        paths[8], "gsa-M4", runs, _recipe())
    row_max = np.max(np.abs(matrix), axis=-1, keepdims=True)
    error = np.abs(matrix_back - matrix)
    assert np.all(error <= row_max / 254 * 1.001)
    assert error.max() > 0   # it really was rounded
    np.testing.assert_allclose(vector_back, vector, rtol=1e-3, atol=1e-4)
    sizes = {bits: pathlib.Path(path).stat().st_size
             for bits, path in paths.items()}
    assert sizes[8] < 0.7 * sizes[16]
    with pytest.raises(ValueError, match="`bits`"):
        checkpoint.save_checkpoint(paths[8], "gsa-M4", runs, 3, [vector], [],
                                   _recipe(), 4)


def test_slots_only_model_closes_the_window_of_slot_layers():
    import keras

    def build(setting, slots_only):
        keras.utils.set_random_seed(0)
        return mqar_model.build_mqar_model(setting, 64, 8, 2, 16, "chunked",
                                           3, 16, slots_only=slots_only)

    def windows(model):
        return [layer.window_size for layer in model.layers
                if hasattr(layer, "num_slots")]

    open_model, closed = build("nha-M4-W8", False), build("nha-M4-W8", True)
    assert windows(open_model) == [8, 8] and windows(closed) == [0, 0]
    assert [v.shape for v in closed.trainable_variables] == [
        v.shape for v in open_model.trainable_variables]
    tokens = np.random.default_rng(0).integers(1, 64, (2, 24)).astype("int32")
    inputs = {"token_ids": tokens,
              "positions": np.tile(np.arange(24, dtype="int32"), (2, 1))}
    outputs = [keras.ops.convert_to_numpy(m(inputs)) for m in (open_model,
                                                                closed)]
    assert not np.allclose(outputs[0], outputs[1], atol=1e-5)
    # A layer without slots keeps its window (M = 0 with W = 0 is invalid).
    hybrid = build("hybrid-M4", True)
    assert windows(hybrid)[0] == 0 and windows(hybrid)[1] >= 24   # global
    assert hybrid.count_params() == build("hybrid-M4", False).count_params()


@_needs_jax
def test_training_opens_the_window_and_resumes_from_int8(tmp_path):
    import json

    mqar = _load_with_benchmarks_on_path("mqar")
    output, saved = tmp_path / "runs.jsonl", tmp_path / "runs.npz"
    common = ["--settings", "nha-M4-W4", "--seq-len", "32", "--vocab", "64",
              "--hidden", "8", "--pairs", "4", "--placement", "power",
              "--short-conv", "3", "--seeds", "3", "--batch-size", "4",
              "--warmup", "1", "--steps", "6", "--steps-per-call", "2",
              "--log-every", "2", "--eval-batches", "1", "--window-off-steps",
              "2", "--implementation", "chunked", "--chunk-size", "8",
              "--checkpoint", str(saved), "--checkpoint-bits", "8",
              "--output", str(output)]
    mqar.main(common + ["--stop-at", "4"])
    mqar.main(common + ["--resume", str(saved), "--resume-warmup", "2"])
    first, resumed = [json.loads(line) for line in open(output)]
    assert first["setting"] == "nha-M4-W4+woff2"
    assert first["base_setting"] == "nha-M4-W4"
    assert (first["step"], first["resumed_from"]) == (4, 0)
    assert (resumed["step"], resumed["resumed_from"]) == (6, 4)
    assert resumed["resume_warmup"] == 2
    for record in (first, resumed):
        assert np.isfinite(record["test_loss"])
        assert 0.0 <= record["test_accuracy"] <= 1.0


def test_transfer_cells_keep_the_pair_counts_that_fit():
    train = _load_with_benchmarks_on_path("mqar_train")
    cells = train.transfer_cells([256, 512, 1024, 2048], [16, 64, 128, 255],
                                 512, 256)
    # The trained length is left out; T >= 4 P; at most vocab / 2 - 1 keys.
    assert cells == [(512, [16, 64, 128]), (1024, [16, 64, 128, 255]),
                     (2048, [16, 64, 128, 255])]
    assert train.transfer_cells([2048], [256], 512, 256) == []
    assert train.transfer_cells([64], [16, 32], 1024, 256) == [(64, [16])]
    sizes = [train.transfer_batch_size(t) for t in (128, 512, 2048, 65536)]
    assert sizes == [64, 32, 8, 4]


def _two_run_checkpoint(tmp_path, steps_done=7, steps=7):
    checkpoint = _load_with_benchmarks_on_path("mqar_checkpoint")
    rng = np.random.default_rng(2)
    runs = [((4, 8), 5, 1e-3), ((4, 8), 9, 1e-3), ((4, 8), 7, 1e-3)]
    trainable = [rng.normal(size=(3, 6, 4)).astype("float32"),
                 rng.normal(size=(3, 4)).astype("float32")]
    non_trainable = [np.arange(6, dtype="int32").reshape(3, 2)]
    path = str(tmp_path / "runs.npz")
    checkpoint.save_checkpoint(path, "gsa-M4", runs, steps_done, trainable,
                               non_trainable, _recipe(steps=steps), 8)
    return checkpoint, path, trainable, non_trainable


def test_weights_of_chosen_seeds_start_runs_of_another_length(tmp_path):
    checkpoint, path, trainable, non_trainable = _two_run_checkpoint(tmp_path)
    # Another T, pairs and schedule are fine: only the shapes must match.
    loaded, fixed, step = checkpoint.load_weights(
        path, "gsa-M4", [7, 5], _recipe(seq_len=512, pairs=[16], steps=3))
    assert step == 7
    np.testing.assert_allclose(loaded[0], trainable[0][[2, 0]], atol=0.05)
    np.testing.assert_allclose(loaded[1], trainable[1][[2, 0]], rtol=1e-3,
                               atol=1e-3)
    np.testing.assert_array_equal(fixed[0], non_trainable[0][[2, 0]])
    for setting, seeds, recipe, name in (
            ("nha-M4-W4", [5], _recipe(), "nha-M4-W4"),
            ("gsa-M4", [6], _recipe(), "seed 6"),
            ("gsa-M4", [5], _recipe(hidden=32), "hidden")):
        with pytest.raises(ValueError, match=name):
            checkpoint.load_weights(path, setting, seeds, recipe)


def test_keeping_runs_copies_their_stored_values(tmp_path):
    checkpoint, path, _, _ = _two_run_checkpoint(tmp_path)
    before = checkpoint.load_weights(path, "gsa-M4", [9, 7], _recipe())
    smaller = str(tmp_path / "kept.npz")
    checkpoint.keep_runs(path, [9, 7], smaller)
    after = checkpoint.load_weights(smaller, "gsa-M4", [9, 7], _recipe())
    for old, new in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(old, new)   # no second rounding
    runs = [((4, 8), 9, 1e-3), ((4, 8), 7, 1e-3)]
    assert checkpoint.load_checkpoint(smaller, "gsa-M4", runs,
                                      _recipe())[0] == 7
    with pytest.raises(ValueError, match="seed 5"):
        checkpoint.load_weights(smaller, "gsa-M4", [5], _recipe())


def test_shrinking_keeps_best_finished_runs_and_all_unfinished(tmp_path):
    import json

    keep = _load_with_benchmarks_on_path("mqar_keep")
    checkpoint, done, _, _ = _two_run_checkpoint(tmp_path)
    results = tmp_path / "runs.jsonl"
    with open(results, "w") as handle:
        for seed, accuracy in ((5, 0.2), (9, 0.9), (7, 0.5)):
            for pairs in (4, 8):
                handle.write(json.dumps(dict(
                    setting="gsa-M4", pairs=pairs, seed=seed,
                    test_accuracy=accuracy if pairs == 4 else 1 - accuracy))
                    + "\n")
    (tmp_path / "open").mkdir()
    _, unfinished, _, _ = _two_run_checkpoint(tmp_path / "open", 3, 7)
    lines = keep.shrink([(done, "gsa-M4"), (unfinished, "gsa-M4")],
                        str(results), 2, 4, 1e9)
    assert "kept seeds [9, 7] (finished)" in lines[0]
    assert "kept seeds [5, 9, 7] (unfinished" in lines[1]
    assert checkpoint.load_weights(done, "gsa-M4", [9, 7], _recipe())
    with pytest.raises(ValueError, match="seed 5"):
        checkpoint.load_weights(done, "gsa-M4", [5], _recipe())
    # Over the byte budget, an unfinished file keeps its best run too.
    lines = keep.shrink([(unfinished, "gsa-M4")], str(results), 1, 8, 10)
    assert "kept seeds [5] (over the budget)" in lines[0]


@_needs_jax
def test_test_only_repeats_the_final_test_and_transfers(tmp_path):
    import json

    mqar = _load_with_benchmarks_on_path("mqar")
    output, saved = tmp_path / "runs.jsonl", tmp_path / "runs.npz"
    recipe = ["--settings", "nha-M4-W4", "--seq-len", "32", "--vocab", "64",
              "--hidden", "8", "--pairs", "4", "8", "--placement", "power",
              "--short-conv", "3", "--batch-size", "4",
              "--eval-batches", "2", "--implementation", "chunked",
              "--chunk-size", "8", "--transfer-lengths", "32", "64",
              "--transfer-pairs", "8", "16", "31", "64",
              "--transfer-sequences", "8"]
    mqar.main(recipe + ["--seeds", "3", "4", "--warmup", "1", "--steps", "4",
                        "--steps-per-call", "2", "--log-every", "2",
                        "--checkpoint", str(saved),
                        "--output", str(output)])
    mqar.main(recipe + ["--seeds", "4", "--test-only", "--init-from",
                        str(saved), "--output", str(tmp_path / "again")])
    trained = [json.loads(line) for line in open(output)]
    again = [json.loads(line) for line in open(tmp_path / "again")]
    moved = [json.loads(line) for line in open(tmp_path / "again.transfer")]
    assert [(r["seed"], r["pairs"], r["step"]) for r in again] == [
        (4, 4, 4), (4, 8, 4)]
    for record in again:   # the same test stream, float16-rounded weights
        first = next(r for r in trained if (r["seed"], r["pairs"]) == (
            4, record["pairs"]))
        assert record["test_loss"] == pytest.approx(first["test_loss"],
                                                    rel=1e-2)
    # Only T = 64 (32 is the trained length), with the counts that fit.
    assert [(r["seq_len"], r["trained_seq_len"], r["pairs"]) for r in
            moved] == [(64, 32, 8), (64, 32, 16)]
    assert all(r["transfer"] and r["test_sequences"] == 8 and
               0.0 <= r["test_accuracy"] <= 1.0 for r in moved)
    assert moved[0]["state_floats"] == trained[0]["state_floats"]


def test_merged_checkpoints_hold_every_run_in_order(tmp_path):
    checkpoint, path, trainable, _ = _two_run_checkpoint(tmp_path)
    first, second = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    checkpoint.keep_runs(path, [9], first)
    checkpoint.keep_runs(path, [5, 7], second)
    merged = str(tmp_path / "merged.npz")
    checkpoint.merge_checkpoints([first, second], merged)
    loaded, _, _ = checkpoint.load_weights(merged, "gsa-M4", [9, 5, 7],
                                           _recipe())
    np.testing.assert_allclose(loaded[1], trainable[1][[1, 0, 2]],
                               rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="repeat"):
        checkpoint.merge_checkpoints([first, first], merged)
