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
           vocab_size=64):
    return mqar_data.make_mqar_batch(np.random.default_rng(seed), batch_size,
                                     sequence_length, num_pairs, vocab_size)


def test_shapes_and_dtypes():
    batch = _batch(batch_size=5, sequence_length=70, num_pairs=9)
    assert batch["tokens"].shape == (5, 70)
    assert batch["positions"].shape == (5, 9)
    assert batch["answers"].shape == (5, 9)
    assert all(a.dtype == np.int32 for a in batch.values())


def test_answers_are_the_values_paired_with_the_queried_keys():
    num_pairs, vocab_size = 12, 64
    batch = _batch(num_pairs=num_pairs, vocab_size=vocab_size)
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
