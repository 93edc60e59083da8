"""NHABackbone and NHADecoderBlock: construction, math wiring, config, saving."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_nha.models import NHABackbone
from keras_nha.models import NHADecoderBlock
from keras_nha.models.nha_backbone import GLOBAL_WINDOW
from keras_nha.models.nha_decoder_block import SHARED_BLOCK_ARGUMENTS


def _inputs(rng, batch=2, length=11):
    ids = rng.integers(0, 50, (batch, length)).astype("int32")
    mask = np.ones_like(ids)
    mask[-1, length - 3:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def test_output_shape_and_per_layer_windows(rng, make_backbone):
    backbone = make_backbone()
    out = backbone(_inputs(rng))
    assert tuple(out.shape) == (2, 11, 16)
    assert np.isfinite(ops.convert_to_numpy(out)).all()
    windows = [b.attention.window_size for b in backbone.transformer_layers]
    slots = [b.attention.num_slots for b in backbone.transformer_layers]
    assert windows == [3, GLOBAL_WINDOW, 0]
    assert slots == [4, 0, 3]


def test_block_is_prenorm_attention_then_glu(rng):
    block = NHADecoderBlock(4, 2, intermediate_dim=24, window_size=3,
                            num_slots=2)
    x = rng.normal(size=(2, 9, 16)).astype("float32")
    block(x)
    for weight in block.weights:
        weight.assign(rng.normal(0, 0.3, weight.shape).astype("float32"))
    mask = np.ones((2, 9), "float32")
    mask[1, 6:] = 0
    got = ops.convert_to_numpy(block(x, padding_mask=mask))

    def rms(v, scale):
        v = v.astype("float64")
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6) * scale

    attended = ops.convert_to_numpy(block.attention(
        rms(x, ops.convert_to_numpy(block.attention_norm.scale)).astype(
            "float32"), padding_mask=mask)).astype("float64")
    h = x + attended
    n = rms(h, ops.convert_to_numpy(block.feedforward_norm.scale))
    gate = n @ ops.convert_to_numpy(block.feedforward_gate_dense.kernel)
    up = n @ ops.convert_to_numpy(block.feedforward_intermediate_dense.kernel)
    down = ops.convert_to_numpy(block.feedforward_output_dense.kernel)
    expected = h + (gate / (1 + np.exp(-gate)) * up) @ down
    assert np.abs(got - expected)[mask > 0].max() < 1e-4


def test_windows_change_without_new_weights(rng, make_backbone):
    backbone = make_backbone()
    inputs = _inputs(rng)
    other = NHABackbone.from_config(
        {**backbone.get_config(), "window_size": [5, 2, 0]})
    other.set_weights(backbone.get_weights())
    same = NHABackbone.from_config(backbone.get_config())
    same.set_weights(backbone.get_weights())
    ref = ops.convert_to_numpy(backbone(inputs))
    np.testing.assert_allclose(ops.convert_to_numpy(same(inputs)), ref,
                               atol=1e-6)
    assert np.abs(ops.convert_to_numpy(other(inputs)) - ref).max() > 1e-3


def test_config_round_trip_and_variable_lengths(rng, make_backbone):
    backbone = make_backbone(tie_word_embeddings=False, use_qkv_bias=True,
                             feedforward_activation="gelu_approximate",
                             embedding_scale=2.0)
    config = backbone.get_config()
    revived = NHABackbone.from_config(config)
    assert revived.get_config() == config
    revived.set_weights(backbone.get_weights())
    for length in (1, 6):
        inputs = _inputs(rng, length=length)
        inputs["padding_mask"][:] = 1
        np.testing.assert_allclose(ops.convert_to_numpy(revived(inputs)),
                                   ops.convert_to_numpy(backbone(inputs)),
                                   atol=1e-6)
    out = backbone.predict(_inputs(rng), verbose=0)
    assert out.shape == (2, 11, 16)


def test_backbone_passes_its_block_arguments_to_every_block(make_backbone):
    shared = dict(head_dim=6, gate_logit_normalizer=4.0, feature_map="swish",
                  value_activation=None, attention_output_activation=None,
                  use_attention_output_norm=False, use_qkv_bias=True,
                  attention_scale=0.3, rope_max_wavelength=500,
                  rope_scaling_factor=2.0, feedforward_activation="gelu",
                  layer_norm_epsilon=1e-5, dropout=0.1,
                  implementation="chunked", chunk_size=8)
    assert set(shared) == set(SHARED_BLOCK_ARGUMENTS)
    backbone = make_backbone(**shared)
    config = backbone.get_config()
    assert {n: config[n] for n in shared} == shared
    for block in backbone.transformer_layers:
        block_config = block.get_config()
        assert {n: block_config[n] for n in shared} == shared
        assert NHADecoderBlock.from_config(block_config).get_config() == (
            block_config)
    attention = backbone.transformer_layers[0].attention
    assert (attention.head_dim, attention.scale, attention.use_bias,
            attention.feature_map, attention.chunk_size) == (
                6, 0.3, True, "swish", 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(window_size=[3, 2]), "one entry per layer"),
    (dict(window_size=-1), "window_size"),
    (dict(window_size=2.5), "window_size"),
    (dict(num_slots=[1, None, 2]), "num_slots"),
    (dict(num_layers=0), "num_layers"),
    (dict(window_size=[3, 0, 0], num_slots=[1, 0, 2]), "window_size"),
    (dict(feedforward_activation="relu"), "feedforward_activation"),
    (dict(num_key_value_heads=3), "`num_query_heads`.*num_key_value_heads"),
    (dict(hidden_dim=30), "`hidden_dim`.*pass head_dim"),
])
def test_bad_config_raises(kwargs, message):
    config = dict(vocabulary_size=50, num_layers=3, num_query_heads=4,
                  hidden_dim=32, intermediate_dim=48)
    with pytest.raises(ValueError, match=message):
        NHABackbone(**{**config, **kwargs})


def test_keras_file_round_trip_in_safe_mode(rng, make_backbone, tmp_path):
    backbone = make_backbone()
    inputs = _inputs(rng)
    path = os.path.join(tmp_path, "backbone.keras")
    backbone.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(restored, NHABackbone)
    np.testing.assert_allclose(ops.convert_to_numpy(restored(inputs)),
                               ops.convert_to_numpy(backbone(inputs)),
                               atol=1e-6)


def test_mixed_precision(rng, make_backbone):
    backbone = make_backbone(dtype="mixed_bfloat16")
    out = backbone(_inputs(rng))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert all(w.dtype == "float32" for w in backbone.weights)
    ref = make_backbone()
    ref.set_weights(backbone.get_weights())
    inputs = _inputs(rng)
    a = ops.convert_to_numpy(ops.cast(backbone(inputs), "float32"))
    b = ops.convert_to_numpy(ref(inputs))
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
