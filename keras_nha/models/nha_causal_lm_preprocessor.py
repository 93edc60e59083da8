"""Packs text into `token_ids`/`padding_mask` for `NHACausalLM`."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_nha.models.nha_backbone import NHABackbone
from keras_nha.models.nha_tokenizer import NHATokenizer


@keras.saving.register_keras_serializable(package="keras_nha")
class NHACausalLMPreprocessor(CausalLMPreprocessor):
    """Causal LM preprocessing for `NHACausalLM`.

    Tokenizes, adds `<s>`/`</s>`, pads (right) or truncates to
    `sequence_length`, and for training shifts by one token to make labels:
    `x = {"token_ids", "padding_mask"}`, `y` the next ids, `sample_weight`
    the next tokens' padding mask. `generate_preprocess` and
    `generate_postprocess` serve `NHACausalLM.generate()`.

    Args:
        tokenizer: an `NHATokenizer` (or any keras-hub tokenizer with start,
            end and pad tokens).
        sequence_length: padded length of packed sequences.
        add_start_token: prepend `<s>`.
        add_end_token: append `</s>`.
        **kwargs: `keras_hub.models.CausalLMPreprocessor` arguments.

    Returns:
        `(x, y, sample_weight)` when called for training.

    Example:

    >>> preprocessor = keras_nha.models.NHACausalLMPreprocessor(
    ...     keras_nha.models.NHATokenizer(), sequence_length=8)
    >>> x, y, w = preprocessor(["hello"])
    >>> x["token_ids"].shape
    (1, 8)
    """

    backbone_cls = NHABackbone
    tokenizer_cls = NHATokenizer
