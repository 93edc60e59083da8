"""Causal-LM task models built on NHALayer (needs keras-hub: pip install keras-nha[hub])."""

try:
    import keras_hub  # noqa: F401
except ImportError as error:
    raise ImportError(
        "keras_nha.models needs keras-hub: pip install 'keras-nha[hub]' "
        "(keras_nha.ops and keras_nha.layers work without it).") from error

from keras_nha.models.hybridize import hybridize
from keras_nha.models.nha_backbone import NHABackbone
from keras_nha.models.nha_causal_lm import NHACausalLM
from keras_nha.models.nha_causal_lm_preprocessor import NHACausalLMPreprocessor
from keras_nha.models.nha_decoder_block import NHADecoderBlock
from keras_nha.models.nha_presets import preset_path
from keras_nha.models.nha_presets import register_bundled_presets
from keras_nha.models.nha_tokenizer import NHATokenizer

register_bundled_presets(NHABackbone)
