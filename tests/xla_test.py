"""The XLA kernel (TensorFlow backend) against the float64 reference."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_nha import backends
from keras_nha.layers import NHALayer
from keras_nha.ops import initial_state
from keras_nha.ops import native_hybrid_attention
from keras_nha.ops import native_hybrid_attention_step
from nha_numpy_reference import nha_numpy
from nha_testing import INPUT_NAMES
from nha_testing import cast_inputs
from nha_testing import random_inputs
from nha_testing import relative_error
from nha_testing import value_and_grads

pytestmark = pytest.mark.skipif(keras.config.backend() != "tensorflow",
                                reason="the xla kernel runs on TensorFlow")

if keras.config.backend() == "tensorflow":
    import tensorflow as tf

    from keras_nha.backends import tensorflow as tf_backend
    from keras_nha.kernels.xla import layout
    from keras_nha.kernels.xla import sequence
    from keras_nha.kernels.xla import slot_memory
    from keras_nha.kernels.xla import step

LENGTH = 37


def numpy_output(inputs, window_size, scale=None):
    return nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                     inputs["log_forget_gate"], window_size, scale=scale,
                     qw=inputs.get("window_query"),
                     kw=inputs.get("window_key"),
                     padding_mask=inputs.get("padding_mask"))


def used_inputs(window_size, num_slots, length):
    unused = set()
    if window_size == 0:
        unused |= {"window_query", "window_key"}
    if num_slots == 0 or window_size >= length:
        # No slots, or nothing leaves the window: the slots stay empty.
        unused |= {"query", "key", "log_forget_gate"}
    if num_slots == 0 and window_size == 1:
        # Each token attends to itself alone: its logit does not matter.
        unused |= {"window_query", "window_key"}
    return tuple(n for n in INPUT_NAMES if n not in unused)


def cotangent(inputs, value_dim=16):
    shape = inputs["query"].shape[:3] + (value_dim,)
    result = np.random.default_rng(0).normal(size=shape)
    if "padding_mask" in inputs:  # outputs at padded rows are free
        result *= inputs["padding_mask"][:, :, None, None]
    return result


def check_against_reference(inputs, window_size, num_slots, scale=None):
    """xla vs NumPy (outputs) and vs the reference's autodiff (gradients)."""
    tensors = cast_inputs(inputs, "float64")
    length = inputs["query"].shape[1]
    names = used_inputs(window_size, num_slots, length)
    results = {}
    for implementation in ("reference", "xla"):
        def fn(**kw):
            return native_hybrid_attention(
                window_size=window_size, implementation=implementation,
                scale=scale, **kw)
        results[implementation] = value_and_grads(
            fn, tensors, names, cotangent(inputs))
    (ref_out, ref_grads), (out, grads) = results["reference"], results["xla"]
    mask = inputs.get("padding_mask")
    assert relative_error(out, numpy_output(inputs, window_size, scale),
                          mask) <= 1e-12
    assert relative_error(out, ref_out, mask) <= 1e-12
    for name in names:
        assert np.abs(ref_grads[name]).max() > 0, name
        assert relative_error(grads[name], ref_grads[name]) <= 1e-10, name


def _cases():
    windows = sorted({0, 1, 5, 64, LENGTH - 1, LENGTH, 3 * LENGTH})
    index = 0
    for num_slots in (8, 0):
        for window_size in windows:
            if window_size == 0 and num_slots == 0:
                continue
            index += 1
            # Group sizes 2, 1 (MHA) and 4 in turn; a custom scale on some.
            yield pytest.param(window_size, num_slots, index % 2 == 1,
                               (2, 4, 1)[index % 3],
                               0.3 if index % 4 == 2 else None,
                               id=f"W{window_size}-M{num_slots}")


@pytest.mark.parametrize("window_size,num_slots,padding,kv_heads,scale",
                         list(_cases()))
def test_outputs_and_gradients(window_size, num_slots, padding, kv_heads,
                               scale):
    inputs = random_inputs(window_size + num_slots, length=LENGTH,
                           num_slots=num_slots, padding=padding,
                           kv_heads=kv_heads)
    check_against_reference(inputs, window_size, num_slots, scale)


@pytest.mark.parametrize("window_size", [5, 30])
def test_loop_over_groups_and_blocked_scan(window_size, monkeypatch):
    # Tiny tiles so a short sequence runs the group loop, frames spilling
    # into the next group (one and several groups ahead) and a multi-level
    # chunk scan.
    monkeypatch.setattr(layout, "SLOT_CHUNK", 4)
    monkeypatch.setattr(layout, "WINDOW_BLOCK", 8)
    monkeypatch.setattr(layout, "GROUP_ROWS", 16)
    monkeypatch.setattr(slot_memory, "SCAN_BLOCK", 2)
    tiling = layout.make_tiling(40, window_size)
    assert tiling.num_groups > 2 and tiling.spill_rows > 0
    assert tiling.group_rows // tiling.slot_chunk > slot_memory.SCAN_BLOCK
    inputs = random_inputs(window_size, length=40, padding=True)
    check_against_reference(inputs, window_size, 8)


def _split_run(tensors, window_size, state, bounds, implementation="xla"):
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = {n: x[:, start:end] for n, x in tensors.items()}
        out, state = native_hybrid_attention(
            window_size=window_size, initial_state=state, return_state=True,
            implementation=implementation, **piece)
        pieces.append(ops.convert_to_numpy(out))
    return pieces, state


@pytest.mark.parametrize("window_size,num_slots,padding,max_length", [
    (6, 8, True, None), (0, 8, False, None), (64, 8, True, 40),
    (3, 0, True, None), (39, 8, True, None)])
def test_streaming_then_decode(window_size, num_slots, padding, max_length):
    length, prefill = 40, (13, 31)
    inputs = random_inputs(3 + window_size, length=length,
                           num_slots=num_slots, padding=padding)
    tensors = cast_inputs(inputs, "float64")
    state = initial_state(2, 2, 16, 16, num_slots, window_size,
                          max_length=max_length, dtype="float64")
    pieces, state = _split_run(tensors, window_size, state, (0,) + prefill)
    for t in range(prefill[-1], length):
        token = {n: x[:, t] for n, x in tensors.items()}
        out, state = native_hybrid_attention_step(
            state=state, window_size=window_size, implementation="xla",
            **token)
        pieces.append(ops.convert_to_numpy(out)[:, None])
    mask = inputs.get("padding_mask")
    assert relative_error(np.concatenate(pieces, axis=1),
                          numpy_output(inputs, window_size), mask) <= 1e-12

    # The state matches the portable path's, name by name and dtype by dtype.
    _, expected = _split_run(tensors, window_size, initial_state(
        2, 2, 16, 16, num_slots, window_size, max_length=max_length,
        dtype="float64"), (0, length), "chunked")
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        np.testing.assert_allclose(ops.convert_to_numpy(state[name]),
                                   ops.convert_to_numpy(value), rtol=1e-10,
                                   atol=1e-12, err_msg=name)


def test_gradients_through_the_state():
    inputs = random_inputs(41, length=30, padding=True)
    tensors = cast_inputs(inputs, "float64")
    head = {n: x[:, :12] for n, x in tensors.items()}
    _, start = native_hybrid_attention(window_size=5, return_state=True,
                                       implementation="chunked", **head)
    tail = {n: x[:, 12:] for n, x in tensors.items()}
    names = ("slot_keys", "slot_values", "keys", "window_keys", "values",
             "log_forget_gates")

    def run(implementation):
        def fn(**state):
            out, end = native_hybrid_attention(
                window_size=5, initial_state=state, return_state=True,
                implementation=implementation, **tail)
            # The final memory and ring get cotangents too.
            return out + 0.3 * ops.sum(end["slot_keys"]) + 0.2 * ops.sum(
                end["slot_values"]) + 0.1 * ops.sum(end["values"])
        return value_and_grads(fn, start, names, cotangent(
            {n: x[:, 12:] for n, x in inputs.items()}))

    (ref_out, ref_grads), (out, grads) = run("reference"), run("xla")
    assert relative_error(out, ref_out) <= 1e-12
    for name in names:
        assert np.abs(ref_grads[name]).max() > 0, name
        assert relative_error(grads[name], ref_grads[name]) <= 1e-10, name


def _loss_and_grads(tensors, cot):
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = native_hybrid_attention(window_size=5, implementation="xla",
                                      **tensors)
        loss = tf.reduce_sum(out * cot)
    return out, tape.gradient(loss, tensors)


def test_inside_tf_function_and_jit_compile():
    inputs = random_inputs(43, length=LENGTH, padding=True)
    tensors = cast_inputs(inputs, "float64")
    cot = cotangent(inputs)
    expected, expected_grads = value_and_grads(
        lambda **kw: native_hybrid_attention(window_size=5,
                                             implementation="reference",
                                             **kw),
        tensors, INPUT_NAMES, cot)
    # A graph with an unknown batch dimension (Keras' trainer makes these),
    # and the whole step compiled by XLA.
    specs = {n: tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype)
             for n, x in tensors.items()}
    graph = tf.function(_loss_and_grads, input_signature=(
        specs, tf.TensorSpec((None,) + cot.shape[1:], "float64")))
    jitted = tf.function(_loss_and_grads, jit_compile=True)
    mask = inputs["padding_mask"]
    for fn in (graph, jitted):
        out, grads = fn(tensors, tf.constant(cot))
        assert relative_error(out, expected, mask) <= 1e-12
        for name in INPUT_NAMES:
            assert relative_error(grads[name], expected_grads[name]) <= 1e-10


@pytest.fixture(scope="module")
def low_precision_case():
    inputs = random_inputs(47, length=LENGTH, padding=True)
    reference = value_and_grads(
        lambda **kw: native_hybrid_attention(window_size=5,
                                             implementation="reference",
                                             **kw),
        cast_inputs(inputs, "float64"), INPUT_NAMES, cotangent(inputs))
    return inputs, reference


@pytest.mark.parametrize("dtype,tolerance", [
    ("float32", 1e-5), ("bfloat16", 3e-2), ("float16", 5e-3)])
def test_low_precision(dtype, tolerance, low_precision_case):
    inputs, (expected, expected_grads) = low_precision_case
    tensors = cast_inputs(inputs, dtype)
    # As NHALayer does: gates stay float32 in every precision.
    tensors["log_forget_gate"] = tf.constant(inputs["log_forget_gate"],
                                             "float32")
    cot = tf.constant(cotangent(inputs), dtype)
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out, state = native_hybrid_attention(
            window_size=5, return_state=True, implementation="xla", **tensors)
        loss = tf.reduce_sum(tf.cast(out * cot, "float32"))
    grads = tape.gradient(loss, tensors)
    assert out.dtype == dtype
    _, expected_state = native_hybrid_attention(
        window_size=5, return_state=True, implementation="chunked", **tensors)
    for name, value in expected_state.items():
        assert state[name].dtype == value.dtype, name
    mask = inputs["padding_mask"]
    assert relative_error(out, expected, mask) <= tolerance
    for name in INPUT_NAMES:
        assert relative_error(tf.cast(grads[name], "float32"),
                              expected_grads[name]) <= 10 * tolerance, name


def _call(tensors, window_size=5):
    state = initial_state(2, 2, 16, 16, 8, window_size)
    return dict(query=tensors["query"], key=tensors["key"],
                value=tensors["value"],
                log_forget_gate=tensors["log_forget_gate"],
                window_size=window_size, scale=0.25,
                window_query=tensors["window_query"],
                window_key=tensors["window_key"], padding_mask=None,
                state=state)


def test_auto_selects_xla_and_refuses_unknown_time():
    tensors = cast_inputs(random_inputs(1, length=9), "float32")
    call = _call(tensors)
    assert backends.select("auto", call) is sequence.xla_nha
    assert backends.select("xla", call) is sequence.xla_nha
    token = {n: x[:, 0] for n, x in tensors.items()}
    assert backends.select_step("auto", _call(token)) is step.xla_nha_step

    refusals = []

    @tf.function(input_signature=[tf.TensorSpec((2, None, 4, 16))])
    def unknown_time(query):
        call = dict(_call(tensors), query=query)
        with pytest.raises(NotImplementedError, match="dimension"):
            tf_backend.fast_paths()["xla"](call)
        with pytest.raises(ValueError, match="cannot serve"):
            backends.select("xla", call)
        refusals.append(backends.select("auto", call))
        return query

    unknown_time(tensors["query"])
    assert refusals and refusals[0] is not sequence.xla_nha


def _model(implementation):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((24, 32))
    hidden = NHALayer(num_heads=4, num_kv_heads=2, num_slots=8, window_size=8,
                      implementation=implementation)(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    return keras.Model(inputs, keras.layers.Dense(1)(pooled))


def _train(implementation, jit_compile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 24, 32)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    model = _model(implementation)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse",
                  jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                        verbose=0)
    return history.history["loss"], [w.numpy() for w in model.weights]


@pytest.fixture(scope="module")
def portable_training():
    return _train("chunked", jit_compile=False)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_model_fit_uses_xla_and_trains(jit_compile, monkeypatch,
                                       portable_training):
    served = []
    loader = tf_backend._xla

    def spy(call):
        served.append(call["query"].shape)
        return loader(call)

    monkeypatch.setattr(tf_backend, "_xla", spy)
    losses, weights = _train("auto", jit_compile)
    assert served, "the trainer never asked for the xla kernel"
    assert losses[-1] < losses[0], losses
    # Same trajectory as the portable path from the same initial weights.
    np.testing.assert_allclose(losses, portable_training[0], rtol=1e-4)
    for got, expected in zip(weights, portable_training[1]):
        assert relative_error(got, expected) <= 1e-4


def test_saved_model_export_serves_the_same_outputs(tmp_path):
    model = _model("auto")
    path = str(tmp_path / "nha_export")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    for batch in (3, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 24, 32))
        x = x.astype("float32")
        np.testing.assert_allclose(served.serve(x).numpy(),
                                   model.predict(x, verbose=0), rtol=1e-5,
                                   atol=1e-6)
