"""NHACausalLM: cached decoding equals the full forward pass; generate()."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_nha.models import NHACausalLM
from keras_nha.models import NHACausalLMPreprocessor
from keras_nha.models import NHATokenizer


def _logits(lm, ids):
    ids = np.asarray(ids, "int32")
    return ops.convert_to_numpy(lm({"token_ids": ids,
                                    "padding_mask": np.ones_like(ids)}))


def test_cached_decoding_equals_full_forward(rng, make_backbone):
    # Prompt far longer than every window (W = 3, 0; one global layer).
    lm = NHACausalLM(make_backbone())
    ids = rng.integers(0, 50, (2, 26)).astype("int32")
    full = _logits(lm, ids)
    cache = lm.get_initial_cache(2, max_length=26)
    pieces = []
    for start, stop in ((0, 12), (12, 13), (13, 25), (25, 26)):
        logits, hidden, cache = lm.call_with_cache(ids[:, start:stop], cache)
        assert tuple(hidden.shape) == (2, stop - start, 16)
        pieces.append(ops.convert_to_numpy(logits))
    incremental = np.concatenate(pieces, axis=1)
    assert np.abs(incremental - full).max() < 1e-4 * max(1, np.abs(full).max())
    assert all(int(ops.convert_to_numpy(s["position"])[0]) == 26 for s in cache)


def test_cache_size_is_constant_in_length(make_backbone):
    lm = NHACausalLM(make_backbone(window_size=[3, 5, 0]))
    short = lm.get_initial_cache(2, max_length=16)
    long = lm.get_initial_cache(2, max_length=4096)
    size = lambda c: sum(int(np.prod(t.shape)) for s in c for t in s.values())
    assert size(short) == size(long)


def test_cache_of_global_layers_needs_max_length(make_backbone):
    lm = NHACausalLM(make_backbone(), preprocessor=None)
    with pytest.raises(ValueError, match=r"`max_length`: layers \[1\]"):
        lm.get_initial_cache(2)


def _reference_greedy(lm, ids, lengths, total):
    """Greedy decoding with one full (uncached) forward pass per token.

    The model is causal, so logits at position t ignore what follows t: one
    fixed-shape buffer serves every step (one compilation).
    """
    ids = np.array(ids)
    lengths = list(lengths)
    mask = np.ones_like(ids)
    while min(lengths) < total:
        logits = ops.convert_to_numpy(lm.predict_on_batch(
            {"token_ids": ids, "padding_mask": mask}))
        for row, n in enumerate(lengths):
            if n < total:
                ids[row, n] = np.argmax(logits[row, n - 1])
                lengths[row] = n + 1
    return ids


def test_generate_matches_full_forward_greedy_with_padding(
        rng, make_backbone, make_padded, no_x64):
    lm = NHACausalLM(make_backbone(weight_scale=5.0))
    lengths, total = [5, 11, 8], 20
    ids, mask = make_padded(rng, lengths, total)
    expected = _reference_greedy(lm, ids, lengths, total)
    # Contrastive search with k=1, alpha=0 is greedy, but tiles and gathers
    # the cache and reads the prefill's hidden states.
    for sampler in ("greedy",
                    keras_hub.samplers.ContrastiveSampler(k=1, alpha=0.0)):
        lm.compile(sampler=sampler)
        out = lm.generate({"token_ids": ids, "padding_mask": mask},
                          stop_token_ids=None)
        np.testing.assert_array_equal(out["token_ids"], expected)
        assert out["padding_mask"].all()


def _bytes(entry):
    return sum(int(np.prod(t.shape)) * np.dtype(
        keras.backend.standardize_dtype(t.dtype)).itemsize
        for t in entry.values())


def test_cache_keeps_only_what_decoding_reads(rng, make_backbone, make_padded,
                                              no_x64):
    # A global layer with slots, a sliding window without slots, GSA.
    lm = NHACausalLM(make_backbone(window_size=[None, 3, 0],
                                   num_slots=[4, 0, 3], weight_scale=5.0))
    batch, total, kv_heads, head_dim = 3, 20, 2, 4
    # float32 window keys, values and mask per ring token; int32 positions.
    ring_token = 4 * (2 * kv_heads * head_dim + 1)
    expected = [batch * (total * ring_token + 4),
                batch * (3 * ring_token + 4),
                batch * (4 * 2 * kv_heads * head_dim * 3 + 4)]
    cache = lm.get_initial_cache(batch, max_length=total)
    assert [_bytes(entry) for entry in cache] == expected
    assert set(cache[0]) == {"window_keys", "values", "mask", "position"}
    # The entries left out are refilled with zeros: tokens are unchanged.
    lengths = [5, 11, 8]
    ids, mask = make_padded(rng, lengths, total)
    reference = _reference_greedy(lm, ids, lengths, total)
    lm.compile(sampler="greedy")
    out = lm.generate({"token_ids": ids, "padding_mask": mask},
                      stop_token_ids=None)
    np.testing.assert_array_equal(out["token_ids"], reference)


@pytest.mark.parametrize("sampler", [
    "top_p", keras_hub.samplers.BeamSampler(num_beams=2),
    keras_hub.samplers.ContrastiveSampler(k=2, alpha=0.6)])
def test_samplers_keep_prompts(rng, make_backbone, make_padded, sampler,
                               no_x64):
    lm = NHACausalLM(make_backbone(num_layers=2, window_size=[2, 0],
                                   num_slots=[2, 3]))
    ids, mask = make_padded(rng, [4, 9], 14)
    lm.compile(sampler=sampler)
    out = lm.generate({"token_ids": ids, "padding_mask": mask},
                      stop_token_ids=None)["token_ids"]
    assert out.shape == ids.shape
    np.testing.assert_array_equal(out[mask > 0], ids[mask > 0])
    assert ((out >= 0) & (out < 50)).all()


def test_generate_strings_and_stop_token(make_backbone, no_x64):
    tokenizer = NHATokenizer()
    backbone = make_backbone(vocabulary_size=tokenizer.vocabulary_size(),
                             weight_scale=3.0)
    lm = NHACausalLM(backbone, NHACausalLMPreprocessor(tokenizer,
                                                       sequence_length=24))
    lm.compile(sampler="greedy")
    outputs = lm.generate(["def f(x):", "ab"], max_length=24)
    assert outputs[0].startswith("def f(x):") and outputs[1].startswith("ab")
    # Same compiled function: everything after the first new </s> is masked.
    end = tokenizer.end_token_id
    packed = lm.preprocessor.generate_preprocess(["def f(x):", "ab"],
                                                 sequence_length=24)
    out = lm.make_generate_function()(packed, stop_token_ids=(end,))
    for row, prompt in enumerate((10, 3)):
        out_ids = ops.convert_to_numpy(out["token_ids"])[row]
        keep = ops.convert_to_numpy(out["padding_mask"])[row]
        ends = np.flatnonzero(out_ids[prompt:] == end)
        stop = prompt + ends[0] + 1 if len(ends) else len(out_ids)
        assert keep[:stop].all() and not keep[stop:].any()


def test_fit_lowers_loss(rng, make_backbone):
    lm = NHACausalLM(make_backbone(num_layers=2, window_size=[3, 0],
                                   num_slots=[4, 3]))
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    # A learnable sequence: counting modulo the vocabulary.
    ids = (np.arange(17)[None, :] + rng.integers(0, 50, (160, 1))) % 50
    x = {"token_ids": ids[:, :-1].astype("int32"),
         "padding_mask": np.ones((160, 16), "int32")}
    history = lm.fit(x, ids[:, 1:], batch_size=16, epochs=3, verbose=0)
    # Chance level is log(50) = 3.9; the next id is a function of the last.
    assert history.history["loss"][-1] < 0.5 * np.log(50)


def test_mixed_precision_cache_keeps_float32_slots(rng, make_backbone):
    lm = NHACausalLM(make_backbone(dtype="mixed_bfloat16"))
    ids = rng.integers(0, 50, (2, 10)).astype("int32")
    full = _logits(lm, ids).astype("float32")
    cache = lm.get_initial_cache(2, max_length=10)
    assert all(keras.backend.standardize_dtype(s["slot_keys"].dtype)
               == "float32" for s in cache if "slot_keys" in s)
    assert all(keras.backend.standardize_dtype(s["keys"].dtype) == "bfloat16"
               for s in cache if "keys" in s)
    first, _, cache = lm.call_with_cache(ids[:, :7], cache)
    rest = [lm.call_with_cache(ids[:, t:t + 1], cache) for t in (7,)]
    logits, _, cache = rest[0]
    last, _, _ = lm.call_with_cache(ids[:, 8:10], cache)
    incremental = np.concatenate([ops.convert_to_numpy(ops.cast(x, "float32"))
                                  for x in (first, logits, last)], axis=1)
    # The state stays float32 through the layers (no autocasting).
    assert all(keras.backend.standardize_dtype(s["slot_keys"].dtype)
               == "float32" for s in cache if "slot_keys" in s)
    assert np.isfinite(incremental).all()
    assert np.abs(incremental - full).max() < 0.05 * np.abs(full).max()
