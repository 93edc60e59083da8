"""NHATokenizer and NHACausalLMPreprocessor: bytes, special tokens, tf.data."""

import numpy as np
import pytest
from keras import ops

from keras_nha.models import NHACausalLMPreprocessor
from keras_nha.models import NHATokenizer

TEXTS = ["héllo wörld", "", "def f(x):\n\treturn x ** 2  # ✓", "\x00\x7f"]


def test_round_trip_and_ids():
    tokenizer = NHATokenizer()
    assert tokenizer.vocabulary_size() == 259
    assert [tokenizer.pad_token_id, tokenizer.start_token_id,
            tokenizer.end_token_id] == [0, 1, 2]
    ids = tokenizer(TEXTS)
    for text, row in zip(TEXTS, ids):
        assert list(np.asarray(row)) == [b + 3 for b in text.encode()]
    assert tokenizer.detokenize(ids) == TEXTS
    single = ops.convert_to_numpy(tokenizer("hi"))
    assert single.tolist() == [107, 108]
    assert tokenizer.detokenize([1, 107, 108, 2, 0]) == "hi"
    assert tokenizer.id_to_token(3 + 65) == "<0x41>"
    assert tokenizer.token_to_id("<0x41>") == 68
    assert tokenizer.token_to_id("</s>") == 2


def test_invalid_bytes_are_replaced_not_fatal():
    tokenizer = NHATokenizer()
    assert tokenizer.detokenize([3 + 0xFF, 3 + ord("a")]) == "\ufffda"


@pytest.mark.parametrize("bad", [-1, 259, "x"])
def test_bad_ids_and_tokens_raise(bad):
    tokenizer = NHATokenizer()
    with pytest.raises(ValueError):
        if isinstance(bad, str):
            tokenizer.token_to_id(bad)
        else:
            tokenizer.id_to_token(bad)


def test_tf_data_path_matches_python_path():
    tf = pytest.importorskip("tensorflow")
    tokenizer = NHATokenizer()
    preprocessor = NHACausalLMPreprocessor(tokenizer, sequence_length=12)
    expected = preprocessor(TEXTS)
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(4).map(
        preprocessor)
    (x, y, weights), = list(dataset)
    np.testing.assert_array_equal(x["token_ids"].numpy(),
                                  ops.convert_to_numpy(expected[0]["token_ids"]))
    np.testing.assert_array_equal(y.numpy(), ops.convert_to_numpy(expected[1]))
    np.testing.assert_array_equal(weights.numpy(),
                                  ops.convert_to_numpy(expected[2]))
    detok = tf.function(tokenizer.detokenize)(tf.ragged.constant(
        [[3 + b for b in t.encode()] for t in TEXTS]))
    assert [t.decode() for t in detok.numpy()] == TEXTS


def test_preprocessor_packs_and_shifts():
    preprocessor = NHACausalLMPreprocessor(NHATokenizer(), sequence_length=6)
    x, y, weights = preprocessor(["abc", "abcdefgh"])
    ids = ops.convert_to_numpy(x["token_ids"])
    np.testing.assert_array_equal(ids[0], [1, 100, 101, 102, 2, 0])
    np.testing.assert_array_equal(ids[1], [1, 100, 101, 102, 103, 104])
    np.testing.assert_array_equal(ops.convert_to_numpy(y)[0],
                                  [100, 101, 102, 2, 0, 0])
    np.testing.assert_array_equal(ops.convert_to_numpy(weights)[0],
                                  [1, 1, 1, 1, 0, 0])
    packed = preprocessor.generate_preprocess(["abc"], sequence_length=8)
    np.testing.assert_array_equal(ops.convert_to_numpy(packed["token_ids"])[0],
                                  [1, 100, 101, 102, 0, 0, 0, 0])
    assert preprocessor.generate_postprocess(packed) == ["abc"]
