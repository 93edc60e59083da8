"""NHALayer: shapes, config, training, saving, decoding, mixed precision."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_nha
from keras_nha.layers import NHALayer
from nha_numpy_reference import nha_numpy
from nha_testing import relative_error

HIDDEN = 32


def make_layer(**kwargs):
    options = dict(num_heads=4, num_kv_heads=2, num_slots=8, window_size=5)
    options.update(kwargs)
    return NHALayer(**options)


def inputs(seed=0, batch=2, length=37):
    return np.random.default_rng(seed).normal(
        size=(batch, length, HIDDEN)).astype("float32")


def test_aliases_and_shapes():
    assert keras_nha.NHALayer is NHALayer
    assert keras_nha.NativeHybridAttention is NHALayer
    layer = make_layer()
    out = layer(inputs())
    assert tuple(out.shape) == (2, 37, HIDDEN)
    assert layer.compute_output_shape((2, 37, HIDDEN)) == (2, 37, HIDDEN)
    symbolic = layer(keras.Input((None, HIDDEN)))
    assert tuple(symbolic.shape) == (None, None, HIDDEN)


def test_config_round_trip():
    layer = make_layer(feature_map="swish", use_bias=True,
                       value_activation=None, use_output_norm=False,
                       rope_max_wavelength=500000, chunk_size=16)
    clone = NHALayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("window_size,num_slots", [(5, 8), (0, 8), (64, 0)])
def test_cached_decoding_matches_full_pass(window_size, num_slots):
    layer = make_layer(window_size=window_size, num_slots=num_slots)
    x = inputs(1)
    full = ops.convert_to_numpy(layer(x))
    cache = layer.get_initial_cache(2, max_length=37)
    out, cache = layer(x[:, :20], cache=cache)
    outputs = [ops.convert_to_numpy(out)]
    for t in range(20, 37):
        out, cache = layer(x[:, t:t + 1], cache=cache)
        outputs.append(ops.convert_to_numpy(out))
    assert relative_error(np.concatenate(outputs, axis=1), full) <= 1e-5


def _numpy_rotary(x, wavelength=10000.0):
    half = x.shape[-1] // 2
    frequency = wavelength ** -(np.arange(half) * 2.0 / x.shape[-1])
    angles = np.arange(x.shape[1])[:, None] * frequency[None, :]
    angles = np.concatenate([angles, angles], -1)[None, :, None, :]
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(angles) + rotated_half * np.sin(angles)


def _numpy_layer(layer, x, padding_mask):
    """The layer's math in float64 NumPy, from its weights (spec section 2)."""
    def weight(dense):
        return ops.convert_to_numpy(dense.kernel).astype(np.float64)

    def silu(z):
        return z / (1 + np.exp(-z))

    x = x.astype(np.float64)
    q = np.einsum("btm,mhd->bthd", x, weight(layer.query_dense))
    k = np.einsum("btm,mhd->bthd", x, weight(layer.key_dense))
    v = silu(np.einsum("btm,mhd->bthd", x, weight(layer.value_dense)))
    f = np.einsum("btm,mhs->bths", x, weight(layer.gate_dense))
    log_gates = -np.logaddexp(0.0, -f) / layer.gate_logit_normalizer
    window_q, window_k = _numpy_rotary(q), _numpy_rotary(k)
    if layer.feature_map == "swish":
        q, k = silu(q), silu(k)
    o = silu(nha_numpy(q, k, v, log_gates, layer.window_size, qw=window_q,
                       kw=window_k, padding_mask=padding_mask))
    flat = o.reshape(o.shape[:2] + (-1,))
    scale = ops.convert_to_numpy(layer.output_norm.scale).astype(np.float64)
    flat = flat / np.sqrt(np.mean(flat ** 2, -1, keepdims=True)
                          + layer.norm_epsilon) * scale
    return np.einsum("bthd,hdm->btm", flat.reshape(o.shape),
                     weight(layer.output_dense))


@pytest.mark.parametrize("feature_map,padded", [(None, False),
                                                ("swish", True)])
def test_layer_matches_numpy_spec(feature_map, padded):
    layer = make_layer(feature_map=feature_map)
    x = inputs(4)
    mask = np.ones(x.shape[:2], "float32")
    if padded:
        mask[0, 7:11] = 0
        mask[1, -3:] = 0
    layer.build(x.shape)
    rng = np.random.default_rng(4)
    for weight in layer.weights:  # large enough that the slots matter
        weight.assign(rng.normal(0, 0.3, weight.shape).astype("float32")
                      + (1.0 if "norm" in weight.path else 0.0))
    got = ops.convert_to_numpy(layer(x, padding_mask=mask))
    expected = _numpy_layer(layer, x, mask)
    assert relative_error(got, expected, mask) <= 1e-4


def test_padding_mask_hides_padded_tokens():
    layer = make_layer()
    x = inputs(2)
    mask = np.ones((2, 37), "float32")
    mask[0, 10:14] = 0
    noisy = x.copy()
    noisy[0, 10:14] = 100.0
    clean = ops.convert_to_numpy(layer(x, padding_mask=mask))
    dirty = ops.convert_to_numpy(layer(noisy, padding_mask=mask))
    real = mask > 0
    np.testing.assert_allclose(dirty[real], clean[real], atol=1e-5)


def _copy_task(seed, count=128, length=16):
    """Target: the previous input vector (needs attention to move it)."""
    x = np.random.default_rng(seed).normal(size=(count, length, 8))
    y = np.concatenate([np.zeros((count, 1, 8)), x[:, :-1]], axis=1)
    return x.astype("float32"), y.astype("float32")


def test_trains_with_fit():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((None, 8)),
        keras.layers.Dense(HIDDEN),
        make_layer(num_slots=4, window_size=4),
        keras.layers.Dense(8),
    ])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = _copy_task(0)
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.85 * losses[0], losses


def _model():
    inputs = keras.Input((None, HIDDEN))
    return keras.Model(inputs, make_layer()(inputs))


def test_keras_save_and_load(tmp_path):
    model = _model()
    x = inputs(3)
    path = tmp_path / "nha.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)),
                                  ops.convert_to_numpy(restored(x)))


_SAVE_UNDER_OTHER_BACKEND = """
import sys, numpy as np, keras
sys.path.insert(0, {tests!r})
from nha_layer_test import _model, inputs
keras.utils.set_random_seed(7)
model = _model()
model.save_weights({weights!r})
np.save({outputs!r}, keras.ops.convert_to_numpy(model(inputs(4))))
"""


def test_weights_load_across_backends(tmp_path):
    order = ["jax", "tensorflow", "torch"]
    other = order[(order.index(keras.config.backend()) + 1) % 3]
    weights = str(tmp_path / "nha.weights.h5")
    outputs = str(tmp_path / "outputs.npy")
    script = _SAVE_UNDER_OTHER_BACKEND.format(
        tests=str(pathlib.Path(__file__).parent), weights=weights,
        outputs=outputs)
    environment = dict(os.environ, KERAS_BACKEND=other)
    subprocess.run([sys.executable, "-c", script], env=environment,
                   check=True, capture_output=True)
    model = _model()
    model.load_weights(weights)
    expected = np.load(outputs)
    assert relative_error(ops.convert_to_numpy(model(inputs(4))),
                          expected) <= 1e-5


def test_mixed_precision():
    x = inputs(5)
    reference = make_layer()
    expected = ops.convert_to_numpy(reference(x))
    layer = make_layer(dtype="mixed_bfloat16")
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.gate_dense.compute_dtype == "float32"
    got = ops.convert_to_numpy(ops.cast(out, "float32"))
    assert relative_error(got, expected) <= 5e-2


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        NHALayer(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="window_size"):
        NHALayer(num_heads=2, num_slots=0, window_size=0)
    with pytest.raises(ValueError, match="window_size"):
        NHALayer(num_heads=2, window_size=-3)
    with pytest.raises(ValueError, match="feature_map"):
        NHALayer(num_heads=2, feature_map="relu")
    with pytest.raises(ValueError, match="chunk_size"):
        NHALayer(num_heads=2, chunk_size=0)
    for head_dim in (0, -4, "8", 2.0):
        with pytest.raises(ValueError, match="head_dim"):
            NHALayer(num_heads=2, head_dim=head_dim)
    with pytest.raises(ValueError, match="even head_dim"):
        NHALayer(num_heads=2, head_dim=7)
    NHALayer(num_heads=2, head_dim=7, use_rotary=False)
    with pytest.raises(ValueError, match="implementation"):
        NHALayer(num_heads=2, implementation="flash")
    with pytest.raises(ValueError, match="scale"):
        NHALayer(num_heads=2, scale="x")
    with pytest.raises(ValueError, match="value_activation"):
        NHALayer(num_heads=2, value_activation="nope")


@pytest.mark.parametrize("hidden,options,message", [
    (16, dict(num_heads=3, num_kv_heads=1), "not a multiple of num_heads"),
    (12, dict(num_heads=4), "odd head_dim"),
])
def test_bad_hidden_dim_for_the_heads(hidden, options, message):
    layer = make_layer(**options)
    with pytest.raises(ValueError, match=message):
        layer(np.zeros((1, 3, hidden), "float32"))


def test_initial_cache_of_an_unbuilt_layer():
    with pytest.raises(ValueError, match="build the layer"):
        make_layer().get_initial_cache(2)
    cache = make_layer(head_dim=6).get_initial_cache(2)
    assert tuple(cache["slot_keys"].shape) == (2, 2, 6, 8)


def test_layers_import_only_keras_and_the_backend():
    backend = keras.config.backend()
    script = (
        "import sys, keras, keras_nha\n"
        "keras_nha.NHALayer(num_heads=2, num_slots=4, window_size=3)("
        "keras.random.normal((1, 7, 16)))\n"
        "print(sorted(m for m in ('tensorflow', 'keras_hub', 'torch', 'jax')"
        " if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], check=True,
                            capture_output=True, text=True,
                            env=dict(os.environ, KERAS_BACKEND=backend))
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert "keras_hub" not in loaded
    if backend != "tensorflow":
        assert "tensorflow" not in loaded, loaded
