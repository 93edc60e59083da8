"""Bad input gets a ValueError naming the argument; edge sizes just work."""

import numpy as np
import pytest
from keras import ops

from keras_nha.ops import initial_state
from keras_nha.ops import native_hybrid_attention
from keras_nha.ops import native_hybrid_attention_step
from nha_numpy_reference import nha_numpy
from nha_testing import cast_inputs
from nha_testing import relative_error
from nha_testing import random_inputs


@pytest.fixture
def tensors():
    return cast_inputs(random_inputs(0, length=9, separate_window=False),
                       "float32")


def call(tensors, window_size=3, **overrides):
    arguments = dict(tensors, window_size=window_size)
    arguments.update(overrides)
    return native_hybrid_attention(**arguments)


@pytest.mark.parametrize("argument,make,message", [
    ("query", lambda t: t["query"][0], "rank-4"),
    ("query", lambda t: t["query"][:, :, :3], "multiple of the key's"),
    ("key", lambda t: t["key"][:1], "batch and time"),
    ("key", lambda t: t["key"][:, :5], "batch and time"),
    ("key", lambda t: t["key"][..., :8], "key dim"),
    ("value", lambda t: t["value"][:, :, :1], "heads of `key`"),
    ("log_forget_gate", lambda t: t["log_forget_gate"][:, :4],
     "batch, time and heads"),
    ("query", lambda t: ops.cast(t["query"], "int32"), "floating-point"),
    ("padding_mask", lambda t: ops.ones((2, 8)), "padding_mask"),
    ("window_query", lambda t: t["query"][..., :8], "window_query"),
])
def test_bad_shapes(tensors, argument, make, message):
    with pytest.raises(ValueError, match=message):
        call(tensors, **{argument: make(tensors)})


@pytest.mark.parametrize("window_size", [-1, 2.0, True, "3",
                                         np.ones(()).astype("int32")])
def test_bad_window_size(tensors, window_size):
    with pytest.raises(ValueError, match="window_size"):
        call(tensors, window_size=window_size)


def test_tensor_window_size(tensors):
    with pytest.raises(ValueError, match="window_size.*a tensor"):
        call(tensors, window_size=ops.convert_to_tensor(3))


def test_empty_sequence(tensors):
    with pytest.raises(ValueError, match="`query`.*T = 0"):
        call({n: x[:, :0] for n, x in tensors.items()})


def test_no_slots_and_no_window(tensors):
    gates = tensors["log_forget_gate"][..., :0]
    with pytest.raises(ValueError, match="window_size"):
        call(tensors, window_size=0, log_forget_gate=gates)


def test_unknown_implementation(tensors):
    with pytest.raises(ValueError, match="implementation"):
        call(tensors, implementation="cuda")


def test_kernel_of_another_backend(tensors):
    import keras
    other = {"jax": "triton", "torch": "xla", "tensorflow": "pallas"}
    with pytest.raises(ValueError, match="backend"):
        call(tensors, implementation=other[keras.config.backend()])


def test_positive_log_gates_are_caught_eagerly(tensors):
    with pytest.raises(ValueError, match="log_forget_gate"):
        call(tensors, log_forget_gate=-tensors["log_forget_gate"])


@pytest.mark.parametrize("chunk_size", [0, 2.0, True, "8"])
def test_bad_chunk_size(tensors, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        call(tensors, chunk_size=chunk_size)


@pytest.mark.parametrize("scale", [0.0, -1.0, "x"])
def test_bad_scale(tensors, scale):
    with pytest.raises(ValueError, match="scale"):
        call(tensors, scale=scale)


def test_state_from_another_configuration(tensors):
    for state, message in [
            (initial_state(2, 2, 16, 16, 4, 3), "slot_keys"),
            (initial_state(3, 2, 16, 16, 8, 3), "slot_keys"),
            (initial_state(2, 2, 16, 16, 8, 5), "ring of 5"),
            ({"slot_keys": 1}, "state dict")]:
        with pytest.raises(ValueError, match=message):
            call(tensors, initial_state=state)


def test_ring_too_small_for_the_sequence(tensors):
    state = initial_state(2, 2, 16, 16, 8, 100, max_length=5)
    with pytest.raises(ValueError, match="max_length"):
        call(tensors, window_size=100, initial_state=state)


def test_huge_window_state_needs_max_length():
    with pytest.raises(ValueError, match="max_length"):
        initial_state(1, 1, 8, 8, 4, 1 << 30)


def test_step_wants_one_token(tensors):
    state = initial_state(2, 2, 16, 16, 8, 3)
    with pytest.raises(ValueError, match="rank-3"):
        native_hybrid_attention_step(
            tensors["query"], tensors["key"][:, 0], tensors["value"][:, 0],
            tensors["log_forget_gate"][:, 0], state, 3)


@pytest.mark.parametrize("length,window_size,batch,kv_heads", [
    (1, 4, 1, 2), (1, 0, 2, 2), (6, 50, 1, 2), (1, 0, 1, 4), (9, 3, 1, 1)])
def test_edge_sizes_run(length, window_size, batch, kv_heads):
    numbers = random_inputs(1, batch=batch, length=length, kv_heads=kv_heads)
    out = native_hybrid_attention(window_size=window_size,
                                  **cast_inputs(numbers, "float32"))
    assert tuple(out.shape) == (batch, length, 4, 16)
    expected = nha_numpy(numbers["query"], numbers["key"], numbers["value"],
                         numbers["log_forget_gate"], window_size,
                         qw=numbers["window_query"], kw=numbers["window_key"])
    assert relative_error(ops.convert_to_numpy(out), expected) <= 1e-5


def test_fully_padded_rows_stay_finite():
    inputs = random_inputs(2, length=8, num_slots=0)
    inputs["padding_mask"] = np.zeros((2, 8))
    out = native_hybrid_attention(window_size=3, **cast_inputs(inputs,
                                                               "float32"))
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))
