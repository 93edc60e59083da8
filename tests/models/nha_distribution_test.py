"""NHA models under `keras.distribution` (JAX) on 8 host CPU devices.

The distributed runs happen in two fresh processes (`distribution_check.py`,
run side by side): JAX reads the host device count from `XLA_FLAGS` only
when it starts. Scenarios, all with the same weights and data:
- `single`: no distribution (the reference);
- `data`: `DataParallel` over 8 devices;
- `model`: `ModelParallel` on a 1 x 4 mesh (heads split 4 ways);
- `data_and_model`: `ModelParallel` on a 2 x 4 mesh (batch split 2 ways,
  heads 4 ways);
- `pallas`: one decoder block with `implementation="pallas"` (Pallas'
  interpreter on CPU) on the 2 x 4 mesh against the portable path;
- `readme`: the JAX code of README.md's "Training on several devices".

On TensorFlow, README's `tf.distribute.MirroredStrategy` example runs in a
fresh process too (`tf_mirrored_check.py`) against one device; on torch,
README's `DistributedDataParallel` script runs on 2 processes against 1
(`torch_ddp_check.py`).
"""

import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="keras.distribution is complete on JAX only")

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "distribution_check.py")
README = os.path.join(HERE, os.pardir, os.pardir, "README.md")
GROUPS = (("single", "data", "model"),
          ("data_and_model", "pallas", "readme"))
DISTRIBUTED = ("data", "model", "data_and_model")
MESHES = {"data": {"batch": 8}, "model": {"batch": 1, "model": 4},
          "data_and_model": {"batch": 2, "model": 4}}
ACTIVATION_MOVES = ("all-to-all", "collective-permute")

# What the layout map must give each weight (path suffix -> axes).
EXPECTED_WEIGHT_AXES = (
    (r"token_embedding/embeddings", ["model", None]),
    (r"attention/(query|key|value|gate)/kernel", [None, "model", None]),
    (r"attention/output_norm/scale", ["model"]),
    (r"attention/output/kernel", ["model", None, None]),
    (r"feedforward_(gate|intermediate)_dense/kernel", [None, "model"]),
    (r"feedforward_output_dense/kernel", ["model", None]),
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_ENABLE_X64="0")
    processes = [subprocess.Popen(
        [sys.executable, HELPER, *group], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for group in GROUPS]
    merged = {}
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0 and "RESULT " in out, err[-4000:]
        merged.update(json.loads(out.split("RESULT ", 1)[1]))
    return merged


def _normalized(axes, mesh):
    """Mesh axes of size 1 split nothing: compare them as None."""
    return [None if axis is None or mesh.get(axis, 1) == 1 else axis
            for axis in axes]


def _expected_weight_axes(path, rank, scenario):
    if scenario != "data":
        for pattern, axes in EXPECTED_WEIGHT_AXES:
            if re.search(pattern + "$", path):
                return _normalized(axes, MESHES[scenario])
    return [None] * rank


@jax_only
def test_get_layout_map_entries_and_argument_checks():
    from keras_nha.models import NHABackbone

    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("data", "heads"), devices)
    layout_map = NHABackbone.get_layout_map(
        mesh, model_parallel_dim_name="heads", data_parallel_dim_name="data")
    assert layout_map["transformer_layer_11/attention/key/kernel"].axes == (
        None, "heads", None)
    assert layout_map["transformer_layer_0/attention/output/kernel"].axes == (
        "heads", None, None)
    assert layout_map["token_embedding/reverse_embeddings"].axes == (
        None, "heads")
    assert layout_map["cache/slot_keys"].axes == ("data", "heads", None, None)
    assert layout_map["cache/values"].axes == ("data", None, "heads", None)
    assert layout_map["transformer_layer_0/attention_norm/scale"] is None
    with pytest.raises(TypeError, match="device_mesh"):
        NHABackbone.get_layout_map("mesh")
    with pytest.raises(ValueError, match="model_parallel_dim_name"):
        NHABackbone.get_layout_map(mesh, data_parallel_dim_name="data")
    with pytest.raises(ValueError, match="data_parallel_dim_name"):
        NHABackbone.get_layout_map(mesh, model_parallel_dim_name="heads")


@jax_only
@pytest.mark.parametrize("scenario", DISTRIBUTED)
def test_weights_are_sharded_as_the_layout_map_says(results, scenario):
    weights = results[scenario]["weights"]
    assert len(weights) == len(results["single"]["weights"])
    for path, axes in weights.items():
        assert _normalized(axes, MESHES[scenario]) == _expected_weight_axes(
            path, len(axes), scenario), path


@jax_only
@pytest.mark.parametrize("scenario", DISTRIBUTED)
def test_fit_losses_equal_single_device(results, scenario):
    single = results["single"]["losses"]
    losses = results[scenario]["losses"]
    assert single[1] < single[0]  # it trains
    np.testing.assert_allclose(losses, single, rtol=2e-5)


@jax_only
@pytest.mark.parametrize("scenario", DISTRIBUTED)
def test_greedy_generate_tokens_equal_single_device(results, scenario):
    tokens = np.array(results[scenario]["tokens"])
    expected = np.array(results["single"]["tokens"])
    assert tokens.shape == (results["batch"], 10)
    np.testing.assert_array_equal(tokens, expected)


@jax_only
@pytest.mark.parametrize("scenario", DISTRIBUTED)
def test_nha_operation_inputs_are_split_on_batch_and_heads(results,
                                                           scenario):
    mesh = MESHES[scenario]
    heads = "model" if "model" in mesh else None
    batch = "batch" if mesh["batch"] > 1 else None
    names = ("query", "key", "value", "log_forget_gate", "window_query",
             "window_key")
    for phase in ("fit", "generate"):
        sequence = results[scenario][f"{phase}_operation_inputs"][
            "native_hybrid_attention"]
        for name in names:
            assert _normalized(sequence[name], mesh) == [
                batch, None, heads, None], (phase, name)
    step = results[scenario]["generate_operation_inputs"][
        "native_hybrid_attention_step"]
    for name in names:
        assert _normalized(step[name], mesh) == [batch, heads, None], name


@jax_only
@pytest.mark.parametrize("scenario", DISTRIBUTED)
def test_decode_cache_is_split_on_batch_and_kv_heads(results, scenario):
    mesh = MESHES[scenario]
    heads = "model" if "model" in mesh else None
    batch = "batch" if mesh["batch"] > 1 else None
    expected = {"slot_keys": [batch, heads, None, None],
                "slot_values": [batch, heads, None, None],
                "keys": [batch, None, heads, None],
                "window_keys": [batch, None, heads, None],
                "values": [batch, None, heads, None],
                "log_forget_gates": [batch, None, heads, None],
                "mask": [batch, None], "position": [batch]}
    initial = results[scenario]["initial_cache"]
    assert set(initial) == set(expected)
    for name, axes in initial.items():
        assert _normalized(axes, mesh) == expected[name], name
    # Inside the compiled generate(), every cache entry exists only at its
    # per-device shape: the full cache never materialises on a device.
    shapes = results[scenario]["generate_cache_shapes"]
    assert len(shapes) >= 8
    for name, entry in shapes.items():
        assert entry["global"] != entry["local"], name
        assert entry["global_count"] == 0, (name, entry)
        assert entry["local_count"] > 0, (name, entry)


def _gathered_values_per_token(collectives, tokens_per_device):
    """The largest all-gather result, in values per local token."""
    sizes = [math.prod(dims) for dims in collectives.get("all-gather", [])]
    return max(sizes, default=0) / tokens_per_device


@jax_only
def test_one_block_forward_and_backward_only_all_reduces(results):
    # jax.jit(value_and_grad(block)).lower(...).compile() on the 2 x 4 mesh:
    # all-reduces only (partial sums after the row-split output and down
    # projections; the norm's statistics over the split heads).
    block = results["data_and_model"]["block_collectives"]
    assert set(block) == {"all-reduce"}, block


@jax_only
@pytest.mark.parametrize("scenario", ("model", "data_and_model"))
def test_no_activation_is_gathered(results, scenario):
    mesh = MESHES[scenario]
    local_batch = results["batch"] // mesh["batch"]
    tokens = local_batch * results["length"]
    # The whole train step and generate() may gather one value per token
    # and model shard (the softmax or argmax statistics over the vocabulary
    # shards), never a hidden state (hidden_dim values per token).
    step = results[scenario]["train_step_collectives"]
    assert _gathered_values_per_token(step, tokens) <= mesh["model"], step
    assert "all-reduce" in step
    generate = results[scenario]["generate_collectives"]
    assert _gathered_values_per_token(
        generate, local_batch * 10) <= mesh["model"], generate
    for collectives in (step, generate):
        assert not set(ACTIVATION_MOVES) & set(collectives), collectives


@jax_only
def test_pallas_kernel_runs_per_shard_in_the_distributed_block(results):
    pallas = results["pallas"]
    assert pallas["output_error"] < 1e-5
    assert pallas["gradient_error"] < 1e-4
    inputs = pallas["operation_inputs"]["native_hybrid_attention"]
    for name, axes in inputs.items():
        assert axes == ["batch", None, "model", None], name
    # `pallas_call` is opaque to XLA: without the kernels' own partitioning
    # rule its operands would be gathered onto every device.
    collectives = pallas["collectives"]
    assert "all-gather" not in collectives, collectives
    assert not set(ACTIVATION_MOVES) & set(collectives), collectives


@jax_only
def test_pallas_decode_step_runs_per_shard(results):
    assert results["pallas"]["decode_error"] < 1e-5
    collectives = results["pallas"]["decode_step_collectives"]
    assert "all-gather" not in collectives, collectives
    assert not set(ACTIVATION_MOVES) & set(collectives), collectives


@jax_only
def test_readme_example_runs(results):
    readme = results["readme"]
    if readme is None:
        pytest.skip("README.md is not beside the tests")
    assert readme["query_kernel"] == [None, "model", None]
    assert readme["generated_shape"] == [8, 24]
    assert readme["prompts_kept"] and readme["in_vocabulary"]


@jax_only
@pytest.mark.parametrize("scenario", ("model", "data_and_model"))
def test_heads_that_do_not_split_evenly_raise(results, scenario):
    # 2 kv heads over the 4 devices of the "model" axis.
    error = results[scenario]["uneven_heads_error"]
    assert error and "`num_key_value_heads`" in error and "4 devices" in error


@pytest.mark.skipif(keras.config.backend() != "tensorflow",
                    reason="tf.distribute needs the TensorFlow backend")
def test_tensorflow_mirrored_strategy_readme_example_equals_one_device():
    if not os.path.exists(README):
        pytest.skip("README.md is not beside the tests")
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "tf_mirrored_check.py")],
        env=env, capture_output=True, text=True, timeout=900)
    assert "RESULT " in result.stdout, result.stderr[-4000:]
    run = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert run["replicas"] == 2
    assert run["losses"][1] < run["losses"][0]
    np.testing.assert_allclose(run["losses"], run["single_losses"],
                               rtol=1e-5)


@pytest.mark.skipif(keras.config.backend() != "torch",
                    reason="DistributedDataParallel needs the torch backend")
def test_torch_ddp_readme_example_equals_one_process():
    if not os.path.exists(README):
        pytest.skip("README.md is not beside the tests")
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "torch_ddp_check.py")],
        env=dict(os.environ, KERAS_BACKEND="torch"), capture_output=True,
        text=True, timeout=900)
    assert "RESULT " in result.stdout, result.stderr[-4000:]
    run = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert run["one_process"][1] < run["one_process"][0]
    np.testing.assert_allclose(run["two_processes"], run["one_process"],
                               rtol=1e-5)
