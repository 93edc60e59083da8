"""Fixtures for the keras_nha.models tests: tiny models, fresh random weights."""

import keras
import numpy as np
import pytest

pytest.importorskip("keras_hub")


def tiny_backbone(seed=0, weight_scale=1.0, **overrides):
    """A 3-layer NHABackbone mixing a hybrid, a global and a pure-slot layer."""
    from keras_nha.models import NHABackbone

    config = dict(vocabulary_size=50, num_layers=3, num_query_heads=4,
                  num_key_value_heads=2, hidden_dim=16, intermediate_dim=24,
                  window_size=[3, None, 0], num_slots=[4, 0, 3])
    config.update(overrides)
    keras.utils.set_random_seed(seed)
    backbone = NHABackbone(**config)
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        # Random norms too, and large enough logits for unambiguous argmax.
        weight.assign(rng.normal(0, 0.2 * weight_scale, weight.shape).astype(
            weight.dtype) + (1.0 if "norm" in weight.path else 0.0))
    return backbone


def right_padded(rng, lengths, total, vocabulary_size=50, low=3):
    ids = np.zeros((len(lengths), total), "int32")
    mask = np.zeros((len(lengths), total), "int32")
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(low, vocabulary_size, n)
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture
def make_backbone():
    return tiny_backbone


@pytest.fixture
def make_padded():
    return right_padded


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % (1 << 32))


@pytest.fixture
def no_x64():
    """keras-hub's samplers mix int32 and Python ints in slice indices, which
    JAX rejects when 64-bit mode is on (the suite turns it on for float64
    references); generation runs with it off, as users run it."""
    if keras.config.backend() != "jax":
        yield
        return
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
