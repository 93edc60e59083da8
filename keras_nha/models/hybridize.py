"""Turns a pretrained keras-hub Llama, Mistral, Qwen or Gemma into an NHA model.

The recipe of the paper (section "hybridizing pretrained models"): keep the
embeddings, norms, feedforward networks, q/k/v/o projections and rotary
settings; add a gate projection `g_proj: D -> Hkv * M` per layer, initialised
from the key projection; attend with NHA (window path with the model's own
rotary embedding, slot path with raw q and k, no value activation, no output
norm). Listed layers stay global (plain causal attention).
"""

import math

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone
from keras_hub.models import CausalLM
from keras_hub.models import GemmaBackbone
from keras_hub.models import LlamaBackbone
from keras_hub.models import MistralBackbone
from keras_hub.models import QwenBackbone

from keras_nha.layers.arguments import check_int
from keras_nha.layers.rotary import apply_rotary
from keras_nha.models.nha_backbone import NHABackbone
from keras_nha.models.nha_causal_lm import NHACausalLM

_SUPPORTED = (LlamaBackbone, MistralBackbone, QwenBackbone, GemmaBackbone)


def _value(variable):
    return ops.convert_to_numpy(variable)


def _epsilon(norms):
    epsilons = {float(norm.epsilon) for norm in norms}
    if len(epsilons) != 1:
        raise ValueError(f"`backbone`: its RMS norms use different epsilons "
                         f"{sorted(epsilons)}; NHABackbone has one.")
    return epsilons.pop()


def _rotary_settings(rotary, head_dim):
    """(max_wavelength, scaling_factor) that reproduce a keras-hub rotary layer.

    Probed numerically rather than read from the config: what the layer
    computes is what the hybrid must reproduce (e.g. keras-hub 0.32's Llama
    rotary layer ignores its position scaling factor).
    """
    # Long enough for low-frequency adjustments to show.
    probe = np.random.default_rng(0).normal(
        size=(1, 4096, 1, head_dim)).astype("float32")
    half = rotary.compute_dtype in ("bfloat16", "float16")
    expected = _value(ops.cast(rotary(ops.convert_to_tensor(
        probe, rotary.compute_dtype)), "float32"))
    positions = ops.arange(probe.shape[1], dtype="int32")
    wavelength = float(rotary.max_wavelength)
    for scaling in (float(getattr(rotary, "scaling_factor", 1.0)), 1.0):
        got = _value(apply_rotary(ops.convert_to_tensor(probe), positions,
                                  wavelength, scaling))
        if np.allclose(got, expected, atol=6e-2 if half else 1e-2):
            return wavelength, scaling
    raise ValueError(
        f"`backbone`: its rotary embedding ({type(rotary).__name__}, e.g. "
        "Llama 3.1 frequency adjustment or YaRN) has no NHALayer "
        "counterpart yet; plain and linearly scaled rotary are supported.")


def _llama_like(source):
    """Config and per-block weights of Llama, Mistral and Qwen backbones."""
    blocks = source.transformer_layers
    attention = blocks[0]._self_attention_layer
    query_kernel = attention._query_dense.kernel
    wavelength, scaling = _rotary_settings(attention.rotary_embedding_layer,
                                           query_kernel.shape[2])
    config = dict(
        num_query_heads=query_kernel.shape[1],
        num_key_value_heads=attention._key_dense.kernel.shape[1],
        head_dim=query_kernel.shape[2],
        intermediate_dim=blocks[0]._feedforward_gate_dense.units,
        use_qkv_bias=isinstance(source, QwenBackbone),
        rope_max_wavelength=wavelength, rope_scaling_factor=scaling,
        feedforward_activation="silu",
        embedding_scale=None,
        layer_norm_epsilon=_epsilon(
            [source.layer_norm] + [n for b in blocks for n in (
                b._self_attention_layernorm, b._feedforward_layernorm)]),
        dropout=float(getattr(source, "dropout", 0.0)))

    def weights(block):
        attn = block._self_attention_layer
        out = {
            "attention_norm": _value(block._self_attention_layernorm.scale),
            "query": _value(attn._query_dense.kernel),
            "key": _value(attn._key_dense.kernel),
            "value": _value(attn._value_dense.kernel),
            "output": _value(attn._output_dense.kernel),
            "feedforward_norm": _value(block._feedforward_layernorm.scale),
            "gate": _value(block._feedforward_gate_dense.kernel),
            "up": _value(block._feedforward_intermediate_dense.kernel),
            "down": _value(block._feedforward_output_dense.kernel),
        }
        if config["use_qkv_bias"]:
            out.update(query_bias=_value(attn._query_dense.bias),
                       key_bias=_value(attn._key_dense.bias),
                       value_bias=_value(attn._value_dense.bias))
        return out

    return config, [weights(b) for b in blocks], _value(source.layer_norm.scale)


def _gemma(source):
    """Config and per-block weights of (first generation) Gemma backbones."""
    blocks = source.transformer_layers
    unsupported = [name for name in ("attention_logit_soft_cap",
                                     "final_logit_soft_cap")
                   if getattr(source, name, None) is not None]
    unsupported += [name for name in ("use_post_attention_norm",
                                      "use_post_ffw_norm")
                    if getattr(source, name, False)]
    if unsupported:
        raise ValueError(f"`backbone`: Gemma features {unsupported} have no "
                         "NHA counterpart (logit soft-capping, post-norms).")
    head_dim = source.head_dim
    attention = blocks[0].attention
    # The block's attention layer decides (keras-hub 0.32 always passes True).
    scale_dim = head_dim if attention.query_head_dim_normalize else (
        source.hidden_dim // source.num_query_heads)
    wavelength, scaling = _rotary_settings(attention.rope_layer, head_dim)
    config = dict(
        num_query_heads=source.num_query_heads,
        num_key_value_heads=source.num_key_value_heads, head_dim=head_dim,
        intermediate_dim=source.intermediate_dim // 2,
        use_qkv_bias=False, attention_scale=1.0 / math.sqrt(scale_dim),
        rope_max_wavelength=wavelength, rope_scaling_factor=scaling,
        feedforward_activation="gelu_approximate",
        embedding_scale=math.sqrt(source.hidden_dim),
        layer_norm_epsilon=_epsilon(
            [source.layer_norm] + [n for b in blocks for n in (
                b.pre_attention_norm, b.pre_ffw_norm)]),
        dropout=float(source.dropout))

    def heads_first_to_model_first(kernel):
        return np.transpose(_value(kernel), (1, 0, 2))

    def weights(block):
        # Gemma's norms multiply by (1 + scale).
        return {
            "attention_norm": 1.0 + _value(block.pre_attention_norm.scale),
            "query": heads_first_to_model_first(block.attention.query_dense.kernel),
            "key": heads_first_to_model_first(block.attention.key_dense.kernel),
            "value": heads_first_to_model_first(block.attention.value_dense.kernel),
            "output": _value(block.attention.output_dense.kernel),
            "feedforward_norm": 1.0 + _value(block.pre_ffw_norm.scale),
            "gate": _value(block.gating_ffw.kernel),
            "up": _value(block.gating_ffw_2.kernel),
            "down": _value(block.ffw_linear.kernel),
        }

    return (config, [weights(b) for b in blocks],
            1.0 + _value(source.layer_norm.scale))


def _source_window(source):
    """The source's own attention span: its sliding window, or None (global).

    keras-hub's Mistral (sliding_window) and Qwen (sliding_window_size with
    use_sliding_window_attention) let token t see the last S tokens, itself
    included: NHA's window of W = S. (keras-hub 0.32's Qwen applies its
    window only on its unfused attention path; the hybrid always does, as the
    config declares.)
    """
    if isinstance(source, MistralBackbone):
        return source.sliding_window
    if isinstance(source, QwenBackbone) and getattr(
            source, "use_sliding_window_attention", False):
        return source.sliding_window_size
    return None


def _gate_from_keys(key_kernel, num_slots):
    """`g_proj` `[D, Hkv, M]`: slot m of head h starts as key feature m % K."""
    head_dim = key_kernel.shape[-1]
    return key_kernel[:, :, np.arange(num_slots) % head_dim]


def _load_source(backbone):
    if isinstance(backbone, str):
        backbone = Backbone.from_preset(backbone)
    task = None
    if isinstance(backbone, CausalLM):
        task, backbone = backbone, backbone.backbone
    if not isinstance(backbone, _SUPPORTED):
        raise TypeError(
            "`backbone`: expected a keras-hub LlamaBackbone, MistralBackbone, "
            "QwenBackbone or GemmaBackbone (or one of their CausalLMs, or a "
            f"preset path), got {type(backbone).__name__}.")
    return backbone, task


def hybridize(backbone, window_size=512, num_slots=64, global_layers=(),
              gate_logit_normalizer=8.0, freeze_mlp=False, dtype=None):
    """Converts a pretrained keras-hub model into an NHA hybrid.

    Every layer keeps its embeddings, norms, feedforward network, q/k/v/o
    projections and rotary settings. Layers not in `global_layers` attend
    with NHA: an exact window of `window_size` tokens plus `num_slots` gated
    slots, read with one softmax, through a new gate projection initialised
    from the key projection. Layers in `global_layers` keep the source's
    attention and no slots: full causal attention, or the source's own
    sliding window (Mistral; Qwen with `use_sliding_window_attention`).
    With `num_slots=0` and every layer global (or `window_size=None`) the
    result computes exactly the source model's logits. Fine-tune afterwards
    (the paper: feedforward frozen, lr 3e-5).

    Args:
        backbone: a keras-hub `LlamaBackbone` (Llama 2/3), `MistralBackbone`,
            `QwenBackbone` (Qwen 2/2.5) or `GemmaBackbone` (Gemma 1), a
            `CausalLM` of one of them, or a preset path/handle of one.
        window_size: W of the hybrid layers, or None for the source's own
            span (global, or its sliding window).
        num_slots: M of the hybrid layers.
        global_layers: indices of layers that stay full attention.
        gate_logit_normalizer: tau of the new forget gates.
        freeze_mlp: mark the feedforward weights non-trainable (a training
            setting: it is not saved with the model).
        dtype: dtype policy of the result; default the source's.

    Returns:
        An `NHABackbone`, or an `NHACausalLM` (with the source's
        preprocessor) when a `CausalLM` was given.

    Example:

    >>> source = keras_hub.models.LlamaBackbone(
    ...     vocabulary_size=100, num_layers=2, num_query_heads=4,
    ...     num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)
    >>> hybrid = keras_nha.models.hybridize(
    ...     source, window_size=64, num_slots=16, global_layers=[1])
    """
    source, task = _load_source(backbone)
    num_layers = len(source.transformer_layers)
    global_layers = sorted(set(int(i) for i in global_layers))
    if any(not 0 <= i < num_layers for i in global_layers):
        raise ValueError(f"`global_layers`: expected indices in [0, "
                         f"{num_layers}), got {global_layers}.")
    check_int("num_slots", num_slots, 0)
    if isinstance(source, GemmaBackbone):
        config, blocks, final_norm = _gemma(source)
    else:
        config, blocks, final_norm = _llama_like(source)
    if dtype is None:
        dtype = source.dtype_policy
        if not isinstance(dtype, keras.DTypePolicy) or isinstance(
                dtype, keras.dtype_policies.DTypePolicyMap):
            raise ValueError("`backbone`: quantized or per-layer dtype "
                             "policies are not supported; pass `dtype`.")
        dtype = dtype.name

    source_window = _source_window(source)
    if window_size is None:
        window_size = source_window
    windows = [source_window if i in global_layers else window_size
               for i in range(num_layers)]
    slots = [0 if i in global_layers else num_slots for i in range(num_layers)]
    embedding = source.token_embedding
    hybrid = NHABackbone(
        vocabulary_size=embedding.input_dim, num_layers=num_layers,
        hidden_dim=embedding.output_dim, window_size=windows, num_slots=slots,
        gate_logit_normalizer=gate_logit_normalizer, feature_map=None,
        value_activation=None, attention_output_activation=None,
        use_attention_output_norm=False,
        tie_word_embeddings=embedding.tie_weights, dtype=dtype, **config)

    hybrid.token_embedding.embeddings.assign(_value(embedding.embeddings))
    if not embedding.tie_weights:
        hybrid.token_embedding.reverse_embeddings.assign(
            _value(embedding.reverse_embeddings))
    hybrid.layer_norm.scale.assign(final_norm)
    for block, weights in zip(hybrid.transformer_layers, blocks):
        attention = block.attention
        block.attention_norm.scale.assign(weights["attention_norm"])
        block.feedforward_norm.scale.assign(weights["feedforward_norm"])
        for name, layer in (("query", attention.query_dense),
                            ("key", attention.key_dense),
                            ("value", attention.value_dense)):
            layer.kernel.assign(weights[name])
            if f"{name}_bias" in weights:
                layer.bias.assign(weights[f"{name}_bias"])
        attention.output_dense.kernel.assign(weights["output"])
        if attention.gate_dense is not None:
            attention.gate_dense.kernel.assign(
                _gate_from_keys(weights["key"], attention.num_slots))
        block.feedforward_gate_dense.kernel.assign(weights["gate"])
        block.feedforward_intermediate_dense.kernel.assign(weights["up"])
        block.feedforward_output_dense.kernel.assign(weights["down"])
        if freeze_mlp:
            for layer in (block.feedforward_gate_dense,
                          block.feedforward_intermediate_dense,
                          block.feedforward_output_dense):
                layer.trainable = False
    if task is None:
        return hybrid
    return NHACausalLM(hybrid, preprocessor=task.preprocessor)
