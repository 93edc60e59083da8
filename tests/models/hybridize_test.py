"""hybridize(): exact conversion of keras-hub Llama, Mistral, Qwen and Gemma."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_nha.models import NHABackbone
from keras_nha.models import NHACausalLM
from keras_nha.models import hybridize

COMMON = dict(vocabulary_size=40, num_layers=2, num_query_heads=4,
              num_key_value_heads=2, hidden_dim=16, intermediate_dim=24)
SOURCES = {
    "llama": lambda: keras_hub.models.LlamaBackbone(
        **COMMON, tie_word_embeddings=False),
    "llama_tied_rope": lambda: keras_hub.models.LlamaBackbone(
        **COMMON, tie_word_embeddings=True, rope_max_wavelength=500),
    "mistral": lambda: keras_hub.models.MistralBackbone(
        **COMMON, head_dim=6, rope_scaling_factor=3.0, sliding_window=None),
    "mistral_window": lambda: keras_hub.models.MistralBackbone(
        **COMMON, head_dim=6, sliding_window=4),
    "qwen": lambda: keras_hub.models.QwenBackbone(**COMMON),
    "gemma": lambda: keras_hub.models.GemmaBackbone(**COMMON, head_dim=6),
}


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(rng.normal(0, 0.3, weight.shape).astype(weight.dtype))
    return model


def _inputs(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, (2, 13)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def _logits(backbone, inputs):
    return ops.convert_to_numpy(backbone.token_embedding(backbone(inputs),
                                                         reverse=True))


@pytest.mark.parametrize("family", sorted(SOURCES))
def test_no_slots_all_global_equals_source(family):
    source = _randomize(SOURCES[family](), seed=len(family))
    hybrid = hybridize(source, window_size=None, num_slots=0)
    assert isinstance(hybrid, NHABackbone)
    inputs = _inputs(seed=len(family))
    expected = _logits(source, inputs)
    got = _logits(hybrid, inputs)
    real = inputs["padding_mask"] > 0
    scale = np.abs(expected).max()
    assert np.abs(got - expected)[real].max() < 1e-5 * max(1.0, scale)


def test_global_layers_keep_the_source_sliding_window():
    source = _randomize(SOURCES["mistral_window"](), seed=5)
    hybrid = hybridize(source, window_size=7, num_slots=0,
                       global_layers=[0, 1])
    assert [b.attention.window_size for b in hybrid.transformer_layers] == [
        4, 4]
    inputs = _inputs(seed=5)
    expected = _logits(source, inputs)
    real = inputs["padding_mask"] > 0
    error = np.abs(_logits(hybrid, inputs) - expected)[real].max()
    assert error < 1e-5 * max(1.0, np.abs(expected).max())
    # The window matters at this length: a global hybrid differs.
    wider = hybridize(source, window_size=13, num_slots=0)
    assert np.abs(_logits(wider, inputs) - expected)[real].max() > 1e-3


def test_qwen_declared_sliding_window_is_kept():
    # keras-hub 0.32's Qwen applies its window only on its unfused attention
    # path, so its logits are no reference here; the declared span is.
    source = keras_hub.models.QwenBackbone(
        **COMMON, use_sliding_window_attention=True, sliding_window_size=5)
    hybrid = hybridize(source, window_size=None, num_slots=3,
                       global_layers=[1])
    assert [b.attention.window_size for b in hybrid.transformer_layers] == [
        5, 5]


def test_hybrid_layers_reuse_weights_and_gate_starts_from_keys():
    source = _randomize(SOURCES["qwen"](), seed=3)
    hybrid = hybridize(source, window_size=4, num_slots=7, global_layers=[1],
                       freeze_mlp=True)
    first, second = hybrid.transformer_layers
    assert (first.attention.window_size, first.attention.num_slots) == (4, 7)
    assert second.attention.num_slots == 0 and second.attention.gate_dense is None
    key = ops.convert_to_numpy(
        source.transformer_layers[0]._self_attention_layer._key_dense.kernel)
    gate = ops.convert_to_numpy(first.attention.gate_dense.kernel)
    assert gate.shape == (16, 2, 7)
    np.testing.assert_array_equal(gate, key[:, :, [0, 1, 2, 3, 0, 1, 2]])
    bias = ops.convert_to_numpy(
        source.transformer_layers[0]._self_attention_layer._query_dense.bias)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(first.attention.query_dense.bias), bias)
    assert not first.feedforward_gate_dense.trainable
    assert first.attention.query_dense.trainable
    assert first.attention.value_activation is None
    assert first.attention.output_norm is None
    inputs = _inputs(seed=3)
    out = _logits(hybrid, inputs)
    assert np.isfinite(out).all()
    # With a 4-token window and 13 tokens the hybrid differs from the source.
    assert np.abs(out - _logits(source, inputs)).max() > 1e-3


def test_causal_lm_in_causal_lm_out(no_x64):
    backbone = _randomize(SOURCES["llama"](), seed=5)
    source = keras_hub.models.LlamaCausalLM(backbone)
    hybrid = hybridize(source, window_size=3, num_slots=2, global_layers=[0])
    assert isinstance(hybrid, NHACausalLM)
    hybrid.compile(sampler="greedy")
    inputs = _inputs(seed=5)
    out = hybrid.generate(inputs, stop_token_ids=None)
    np.testing.assert_array_equal(out["token_ids"][inputs["padding_mask"] > 0],
                                  inputs["token_ids"][inputs["padding_mask"] > 0])


def test_preset_path_source(tmp_path):
    source = _randomize(SOURCES["mistral"](), seed=7)
    path = str(tmp_path / "mistral")
    source.save_to_preset(path)
    hybrid = hybridize(path, window_size=None, num_slots=0)
    inputs = _inputs(seed=7)
    np.testing.assert_allclose(_logits(hybrid, inputs)[0],
                               _logits(source, inputs)[0], atol=1e-5)


@pytest.mark.parametrize("make, error, message", [
    (lambda: keras_hub.models.GemmaBackbone(
        **COMMON, head_dim=6, attention_logit_soft_cap=50.0),
     ValueError, "soft"),
    (lambda: keras_hub.models.LlamaBackbone(
        **{**COMMON, "hidden_dim": 64, "num_query_heads": 2,
           "num_key_value_heads": 1},
        rope_frequency_adjustment_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_pretraining_sequence_length=8192),
     ValueError, "rotary"),
    (lambda: keras.layers.Dense(3), TypeError, "LlamaBackbone"),
])
def test_unsupported_sources_raise(make, error, message):
    with pytest.raises(error, match=message):
        hybridize(make())


def test_bad_arguments_raise():
    source = SOURCES["llama"]()
    with pytest.raises(ValueError, match="global_layers"):
        hybridize(source, global_layers=[2])
    with pytest.raises(ValueError, match="num_slots"):
        hybridize(source, num_slots=-1)
