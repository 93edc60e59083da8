"""A byte-level tokenizer that needs no vocabulary files."""

import keras
import numpy as np
from keras_hub.tokenizers import Tokenizer

from keras_nha.models.nha_backbone import NHABackbone

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
_OFFSET = len(_SPECIAL_TOKENS)


def _as_strings(inputs):
    """Python strings from str/bytes, lists of them, or string tensors."""
    if isinstance(inputs, (str, bytes)):
        return [inputs], False
    if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray):
        inputs = inputs.numpy()
    array = np.asarray(inputs, dtype=object)
    if array.ndim == 0:
        return [array.item()], False
    if array.ndim != 1:
        raise ValueError(f"`inputs`: expected a string or a rank-1 batch of "
                         f"strings, got shape {array.shape}.")
    return list(array), True


def _as_id_lists(inputs):
    """Lists of Python ints from ids, lists of ids, or (ragged) tensors."""
    if hasattr(inputs, "to_list"):
        inputs = inputs.to_list()
    elif hasattr(inputs, "shape") and not isinstance(inputs, (list, tuple)):
        inputs = keras.ops.convert_to_numpy(inputs).tolist()
    if isinstance(inputs, (int, np.integer)):
        return [[int(inputs)]], False
    inputs = list(inputs)
    if not inputs or isinstance(inputs[0], (int, np.integer)):
        return [[int(i) for i in inputs]], False
    return [[int(i) for i in np.asarray(row).reshape(-1)] for row in inputs], True


@keras.saving.register_keras_serializable(package="keras_nha")
class NHATokenizer(Tokenizer):
    """UTF-8 bytes as tokens, plus padding, start and end tokens.

    Id 0 is `<pad>`, 1 is `<s>`, 2 is `</s>`; byte `b` is id `b + 3`, so the
    vocabulary has 259 entries and no asset files. Any text round-trips.
    Inside `tf.data` pipelines it runs with TensorFlow ops; otherwise in plain
    Python.

    Args:
        **kwargs: `keras_hub.tokenizers.Tokenizer` arguments (name, dtype).

    Returns:
        `tokenize` returns int ids: a list/array for one string, a list of
        them (or a ragged tensor in `tf.data`) for a batch.

    Example:

    >>> tokenizer = keras_nha.models.NHATokenizer()
    >>> tokenizer("hi")
    array([107, 108], dtype=int32)
    >>> tokenizer.detokenize([107, 108])
    'hi'
    """

    backbone_cls = NHABackbone

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        self._add_special_token("<pad>", "pad_token")
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        self.file_assets = []

    def vocabulary_size(self):
        return 256 + _OFFSET

    def get_vocabulary(self):
        return list(_SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]

    def id_to_token(self, id):
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or (
                not 0 <= id < self.vocabulary_size()):
            raise ValueError(f"`id`: expected an int in [0, "
                             f"{self.vocabulary_size()}), got {id!r}.")
        return self.get_vocabulary()[id]

    def token_to_id(self, token):
        if token in _SPECIAL_TOKENS:
            return _SPECIAL_TOKENS.index(token)
        if (isinstance(token, str) and len(token) == 6
                and token.startswith("<0x") and token.endswith(">")):
            return int(token[3:5], 16) + _OFFSET
        raise ValueError(f"`token`: expected one of {_SPECIAL_TOKENS} or a "
                         f"byte token like '<0x41>', got {token!r}.")

    def tokenize(self, inputs):
        if self._use_tf_workflow():
            return self._tokenize_tf(inputs)
        texts, batched = _as_strings(inputs)
        ids = [np.frombuffer(t.encode("utf-8") if isinstance(t, str) else t,
                             np.uint8).astype(self.compute_dtype) + _OFFSET
               for t in texts]
        return [i.tolist() for i in ids] if batched else ids[0]

    def _tokenize_tf(self, inputs):
        import tensorflow as tf

        inputs = tf.convert_to_tensor(inputs)
        scalar = inputs.shape.rank == 0
        if scalar:
            inputs = inputs[None]
        pieces = tf.strings.bytes_split(inputs)
        ids = tf.ragged.map_flat_values(
            lambda p: tf.io.decode_raw(p, tf.uint8)[:, 0], pieces)
        ids = tf.cast(ids, self.compute_dtype) + _OFFSET
        return ids[0] if scalar else ids

    def detokenize(self, inputs):
        if self._use_tf_workflow():
            return self._detokenize_tf(inputs)
        rows, batched = _as_id_lists(inputs)
        texts = [bytes(i - _OFFSET for i in row
                       if _OFFSET <= i < self.vocabulary_size()).decode(
                           "utf-8", errors="replace") for row in rows]
        return texts if batched else texts[0]

    def _detokenize_tf(self, inputs):
        import tensorflow as tf

        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.convert_to_tensor(inputs)
        scalar = inputs.shape.rank == 1
        if scalar:
            inputs = inputs[None]
        if not isinstance(inputs, tf.RaggedTensor):
            inputs = tf.RaggedTensor.from_tensor(inputs)
        inputs = tf.cast(inputs, "int32")
        inputs = tf.ragged.boolean_mask(inputs, inputs >= _OFFSET)
        table = tf.constant([bytes([b]) for b in range(256)])
        byte_strings = tf.strings.reduce_join(
            tf.gather(table, inputs - _OFFSET), axis=-1)
        texts = tf.strings.unicode_transcode(byte_strings, "UTF-8", "UTF-8",
                                             errors="replace")
        return texts[0] if scalar else texts

    def save_assets(self, dir_path):
        """Nothing to save: the vocabulary is fixed."""

    def load_assets(self, dir_path):
        """Nothing to load: the vocabulary is fixed."""

    def load_preset_assets(self, preset):
        """Nothing to load: the vocabulary is fixed."""
