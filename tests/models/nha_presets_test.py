"""Presets: round trips, cross-backend loading, bundled preset, bad presets."""

import json
import os
import shutil
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_nha.models import NHABackbone
from keras_nha.models import NHACausalLM
from keras_nha.models import NHACausalLMPreprocessor
from keras_nha.models import NHATokenizer
from keras_nha.models import preset_path

BUNDLED = "nha_tiny_python_bytes"
# Logits of the bundled preset under the backend that trained it
# (TensorFlow), for fixed ids: load it, run `{"token_ids": ids, ...}`. The
# ids are 100 tokens long, so tokens leave the W=64 window into the slots.
REFERENCE = os.path.join(os.path.dirname(__file__), "data",
                         f"{BUNDLED}_logits.npz")
NEXT_BACKEND = {"jax": "tensorflow", "tensorflow": "torch", "torch": "jax"}


def _task(make_backbone):
    tokenizer = NHATokenizer()
    backbone = make_backbone(vocabulary_size=tokenizer.vocabulary_size())
    return NHACausalLM(backbone, NHACausalLMPreprocessor(tokenizer,
                                                         sequence_length=16))


def _logits(model, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if isinstance(model, NHABackbone):
        return ops.convert_to_numpy(model.token_embedding(model(inputs),
                                                          reverse=True))
    preprocessor, model.preprocessor = model.preprocessor, None
    try:
        return ops.convert_to_numpy(model(inputs))
    finally:
        model.preprocessor = preprocessor


@pytest.fixture
def saved(make_backbone, rng, tmp_path):
    lm = _task(make_backbone)
    ids = rng.integers(3, 259, (2, 13)).astype("int32")
    path = str(tmp_path / "preset")
    lm.save_to_preset(path)
    return lm, ids, path


def test_round_trip_backbone_tokenizer_task(saved):
    lm, ids, path = saved
    expected = _logits(lm, ids)
    for loaded in (NHACausalLM.from_preset(path),
                   keras_hub.models.CausalLM.from_preset(path)):
        assert isinstance(loaded, NHACausalLM)
        np.testing.assert_array_equal(_logits(loaded, ids), expected)
        assert loaded.preprocessor.sequence_length == 16
    backbone = keras_hub.models.Backbone.from_preset(path)
    assert isinstance(backbone, NHABackbone)
    assert backbone.get_config() == lm.backbone.get_config()
    np.testing.assert_array_equal(_logits(backbone, ids), expected)
    tokenizer = keras_hub.models.Tokenizer.from_preset(path)
    assert isinstance(tokenizer, NHATokenizer)
    assert tokenizer.detokenize(tokenizer("ok ✓")) == "ok ✓"
    # Nothing executable is saved: no Lambda layers, no pickles.
    for name in os.listdir(path):
        if name.endswith(".json"):
            with open(os.path.join(path, name)) as handle:
                assert "Lambda" not in handle.read()
    with open(os.path.join(path, "metadata.json")) as handle:
        assert json.load(handle)["tasks"] == ["CausalLM"]


def test_preset_loads_under_another_backend(saved, tmp_path):
    lm, ids, path = saved
    np.savez(tmp_path / "expected.npz", ids=ids, logits=_logits(lm, ids))
    other = NEXT_BACKEND[keras.config.backend()]
    script = (
        "import sys, keras, numpy as np\n"
        "from keras_nha.models import NHACausalLM\n"
        "data = np.load(sys.argv[2])\n"
        "lm = NHACausalLM.from_preset(sys.argv[1])\n"
        "lm.preprocessor = None\n"
        "ids = data['ids']\n"
        "got = keras.ops.convert_to_numpy(lm({'token_ids': ids, "
        "'padding_mask': np.ones_like(ids)}))\n"
        "print('MAXDIFF', float(np.abs(got - data['logits']).max()))\n")
    env = dict(os.environ, KERAS_BACKEND=other, JAX_ENABLE_X64="0",
               CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", script, path, str(tmp_path / "expected.npz")],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("MAXDIFF")[-1])
    assert diff < 1e-4, (other, diff)


def test_bundled_preset_by_short_name(no_x64):
    assert os.path.isfile(os.path.join(preset_path(BUNDLED), "config.json"))
    lm = keras_hub.models.CausalLM.from_preset(BUNDLED)
    assert isinstance(lm, NHACausalLM)
    assert BUNDLED in NHACausalLM.presets
    reference = np.load(REFERENCE)
    # Saved under one backend, reproduced under every backend.
    np.testing.assert_allclose(_logits(lm, reference["ids"]),
                               reference["logits"], atol=2e-4, rtol=1e-4)
    lm.compile(sampler="greedy")
    text = lm.generate("def ", max_length=24)
    assert text.startswith("def ") and len(text) > 4


def _corrupt(path, how):
    if how == "truncated weights":
        weights = os.path.join(path, "model.weights.h5")
        with open(weights, "rb") as handle:
            data = handle.read()
        with open(weights, "wb") as handle:
            handle.write(data[:len(data) // 2])
    elif how == "missing weights":
        os.remove(os.path.join(path, "model.weights.h5"))
    elif how == "config does not match weights":
        for name in ("config.json", "task.json"):
            with open(os.path.join(path, name)) as handle:
                config = json.load(handle)
            inner = config["config"]
            if name == "task.json":
                inner = inner["backbone"]["config"]
            inner["hidden_dim"] = 24
            with open(os.path.join(path, name), "w") as handle:
                json.dump(config, handle)
    elif how == "broken json":
        with open(os.path.join(path, "config.json"), "w") as handle:
            handle.write("{not json")
    elif how == "unregistered class":
        for name in ("config.json", "task.json"):
            with open(os.path.join(path, name)) as handle:
                config = json.load(handle)
            config["registered_name"] = config["class_name"] = "Lambda"
            with open(os.path.join(path, name), "w") as handle:
                json.dump(config, handle)


@pytest.mark.parametrize("how", [
    "truncated weights", "missing weights", "config does not match weights",
    "broken json", "unregistered class"])
def test_corrupt_preset_raises_clear_error(saved, tmp_path, how):
    _, _, path = saved
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    _corrupt(broken, how)
    with pytest.raises(ValueError, match="Could not load the preset"):
        NHACausalLM.from_preset(broken)
    with pytest.raises(ValueError, match="Could not load the preset"):
        NHABackbone.from_preset(broken)


def test_unknown_preset_name_keeps_keras_hub_message():
    with pytest.raises(ValueError, match="Unknown preset identifier") as info:
        NHACausalLM.from_preset("nha_tiny")
    assert "corrupt" not in str(info.value)


def test_models_without_keras_hub_say_how_to_install():
    code = ("import sys; sys.modules['keras_hub'] = None\n"
            "import keras_nha\n"
            "try:\n    keras_nha.NHACausalLM\n"
            "except ImportError as error:\n    print(error)\n")
    printed = subprocess.run([sys.executable, "-c", code], check=True,
                             capture_output=True, text=True).stdout
    assert "pip install 'keras-nha[hub]'" in printed


def test_causal_lm_keras_file_safe_mode(saved, tmp_path):
    lm, ids, _ = saved
    lm.preprocessor = None
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)  # safe_mode=True by default
    assert isinstance(restored, NHACausalLM)
    np.testing.assert_array_equal(_logits(restored, ids), _logits(lm, ids))
