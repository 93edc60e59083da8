"""The NHA operation against the float64 step-by-step NumPy reference."""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

from keras_nha.ops import initial_state
from keras_nha.ops import native_hybrid_attention
from keras_nha.ops import native_hybrid_attention_step
from nha_numpy_reference import nha_numpy
from nha_testing import INPUT_NAMES
from nha_testing import cast_inputs
from nha_testing import random_inputs
from nha_testing import relative_error
from nha_testing import value_and_grads


def windows(length):
    return sorted({0, 1, 5, max(length - 1, 0), length, 3 * length})


def numpy_output(inputs, window_size, scale=None):
    return nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                     inputs["log_forget_gate"], window_size, scale=scale,
                     qw=inputs.get("window_query"),
                     kw=inputs.get("window_key"),
                     padding_mask=inputs.get("padding_mask"))


def run(inputs, window_size, implementation, dtype="float32", **kwargs):
    tensors = cast_inputs(inputs, dtype)
    return ops.convert_to_numpy(ops.cast(native_hybrid_attention(
        window_size=window_size, implementation=implementation, **tensors,
        **kwargs), "float64" if dtype == "float64" else "float32"))


def _cases(implementation, lengths):
    seed = itertools.count()
    for length, num_slots in itertools.product(lengths, (0, 8)):
        for window_size in windows(length):
            if num_slots == 0 and window_size == 0:
                continue
            case = next(seed)
            # Alternate GQA/MHA, separate window q/k, padding and a custom
            # scale over cases.
            yield pytest.param(
                implementation, length, window_size, num_slots,
                2 if case % 2 else 4, case % 3 == 0, case % 4 == 1,
                0.3 if case % 5 == 2 else None,
                id=f"{implementation}-T{length}-W{window_size}-M{num_slots}")


@pytest.mark.parametrize(
    "implementation,length,window_size,num_slots,kv_heads,separate,padding,"
    "scale",
    list(_cases("chunked", (1, 37, 130))) + list(_cases("reference", (1, 37))))
def test_matches_numpy_reference_fp32(implementation, length, window_size,
                                      num_slots, kv_heads, separate, padding,
                                      scale):
    inputs = random_inputs(length + window_size, length=length,
                           kv_heads=kv_heads, num_slots=num_slots,
                           separate_window=separate, padding=padding)
    expected = numpy_output(inputs, window_size, scale)
    got = run(inputs, window_size, implementation, scale=scale)
    mask = inputs.get("padding_mask")
    assert relative_error(got, expected, mask) <= 1e-5


@pytest.mark.parametrize("chunk_size,window_size,num_slots", [
    (1, 5, 8), (8, 0, 8), (13, 6, 8), (64, 20, 8), (8, 9, 0)])
def test_chunk_size_keeps_the_numbers(chunk_size, window_size, num_slots):
    inputs = random_inputs(chunk_size + window_size, length=37, kv_heads=2,
                           num_slots=num_slots, padding=True)
    got = run(inputs, window_size, "chunked", chunk_size=chunk_size)
    expected = numpy_output(inputs, window_size)
    assert relative_error(got, expected, inputs["padding_mask"]) <= 1e-5


@pytest.mark.parametrize("window_size,num_slots", [(0, 8), (5, 8), (36, 8),
                                                   (111, 8), (5, 0)])
def test_float64_is_exact(window_size, num_slots):
    inputs = random_inputs(7, num_slots=num_slots, padding=True)
    expected = numpy_output(inputs, window_size)
    got = run(inputs, window_size, "chunked", "float64")
    assert relative_error(got, expected, inputs["padding_mask"]) <= 1e-12


@pytest.mark.parametrize("window_size", [0, 5, 64])
def test_bfloat16_inputs(window_size):
    inputs = random_inputs(3, length=70, separate_window=False)
    expected = numpy_output(inputs, window_size)
    got = run(inputs, window_size, "chunked", "bfloat16")
    assert relative_error(got, expected) <= 3e-2


def test_golden_cases():
    import pathlib
    data = np.load(pathlib.Path(__file__).parent / "data" / "nha_cases.npz")
    names = sorted({key.split("/")[0] for key in data.files})
    assert len(names) == 10
    for name in names:
        case = {k.split("/")[1]: data[k] for k in data.files
                if k.startswith(name + "/")}
        inputs = {n: case[n] for n in INPUT_NAMES}
        inputs["padding_mask"] = case["padding_mask"]
        for implementation in ("chunked", "reference", "auto"):
            got = run(inputs, int(case["window_size"]), implementation)
            error = relative_error(got, case["output"], case["padding_mask"])
            assert error <= 1e-5, (name, implementation, error)


GRADIENT_LENGTH = 21


@pytest.mark.parametrize("window_size,num_slots,kv_heads,padding,scale", [
    (0, 8, 2, True, None), (1, 8, 4, False, None), (1, 8, 2, True, None),
    (5, 8, 2, True, 0.3), (20, 8, 2, False, None), (21, 8, 2, True, None),
    (63, 8, 4, True, None), (5, 0, 2, True, None), (21, 0, 4, False, None),
    (40, 0, 2, True, 0.3)])
def test_gradients_match_reference(window_size, num_slots, kv_heads, padding,
                                   scale, length=GRADIENT_LENGTH):
    inputs = random_inputs(11 + window_size, length=length, kv_heads=kv_heads,
                           num_slots=num_slots, padding=padding)
    tensors = cast_inputs(inputs, "float64")
    cotangent = np.random.default_rng(0).normal(size=(2, length, 4, 16))
    if padding:  # outputs at padded positions are free: no loss on them
        cotangent *= inputs["padding_mask"][:, :, None, None]
    unused = set()
    if window_size == 0:
        unused |= {"window_query", "window_key"}
    if num_slots == 0:
        unused |= {"query", "key", "log_forget_gate"}
    if window_size >= length:  # nothing leaves the window: slots stay empty
        unused |= {"query", "key", "log_forget_gate"}
    names = tuple(n for n in INPUT_NAMES if n not in unused)
    results = {}
    for implementation in ("reference", "chunked"):
        def fn(**kw):
            return native_hybrid_attention(
                window_size=window_size, implementation=implementation,
                scale=scale, **kw)
        results[implementation] = value_and_grads(fn, tensors, names,
                                                  cotangent)
    (ref_out, ref_grads), (out, grads) = results["reference"], results[
        "chunked"]
    assert relative_error(out, ref_out, inputs.get("padding_mask")) <= 1e-10
    for name in names:
        assert np.abs(ref_grads[name]).max() > 0, name
        assert relative_error(grads[name], ref_grads[name]) <= 1e-9, name


@pytest.mark.parametrize("window_size,padding", [(32, True), (36, False)])
def test_gradients_match_reference_at_pallas_test_sizes(window_size, padding):
    # tests/pallas_test.py checks gradients against chunked at T = 37.
    test_gradients_match_reference(window_size, 8, 2, padding, None,
                                   length=37)


def test_reference_gradients_match_finite_differences():
    """The gradient oracle itself: autodiff of the step-by-step reference
    against central differences of the float64 NumPy transcription."""
    inputs = random_inputs(12, length=7, kv_heads=2, num_slots=3,
                           padding=True)
    mask = inputs.pop("padding_mask")
    rng = np.random.default_rng(1)
    cotangent = rng.normal(size=(2, 7, 4, 16)) * mask[:, :, None, None]
    tensors = {**cast_inputs(inputs, "float64"),
               "padding_mask": ops.convert_to_tensor(mask, "float64")}

    def fn(**kw):
        return native_hybrid_attention(window_size=2, scale=0.4,
                                       implementation="reference", **kw)

    _, grads = value_and_grads(fn, tensors, INPUT_NAMES, cotangent)

    def loss(arrays):
        return np.sum(cotangent * numpy_output({**arrays,
                                                "padding_mask": mask}, 2,
                                               scale=0.4))

    for name in INPUT_NAMES:
        direction = rng.normal(size=inputs[name].shape)
        if name == "log_forget_gate":  # stay <= 0 on both sides
            direction *= 0.1
        step = 1e-6
        plus = loss({**inputs, name: inputs[name] + step * direction})
        minus = loss({**inputs, name: inputs[name] - step * direction})
        numeric = (plus - minus) / (2 * step)
        analytic = float(np.sum(grads[name] * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (
            name, numeric, analytic)


def _split_points(rng, length, pieces):
    return sorted(rng.choice(np.arange(1, length), pieces - 1, replace=False))


@pytest.mark.parametrize("window_size,num_slots,padding", [
    (0, 8, False), (1, 8, True), (5, 8, True), (16, 8, False), (5, 0, True),
    (44, 8, True), (45, 8, False), (1000, 8, False), (1000, 0, True)])
def test_streaming_prefill_then_decode(window_size, num_slots, padding):
    length, decoded = 45, 9
    inputs = random_inputs(23, length=length, num_slots=num_slots,
                           padding=padding)
    tensors = cast_inputs(inputs, "float32")
    whole = ops.convert_to_numpy(native_hybrid_attention(
        window_size=window_size, **tensors))
    rng = np.random.default_rng(window_size)
    state = initial_state(2, 2, 16, 16, num_slots, window_size,
                          max_length=length)
    bounds = [0] + _split_points(rng, length - decoded, 3) + [length - decoded]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = {n: x[:, start:end] for n, x in tensors.items()}
        out, state = native_hybrid_attention(
            window_size=window_size, initial_state=state, return_state=True,
            **piece)
        pieces.append(ops.convert_to_numpy(out))
    for t in range(length - decoded, length):
        token = {n: x[:, t] for n, x in tensors.items()}
        out, state = native_hybrid_attention_step(
            state=state, window_size=window_size, **token)
        pieces.append(ops.convert_to_numpy(out)[:, None])
    streamed = np.concatenate(pieces, axis=1)
    assert int(ops.convert_to_numpy(state["position"])) == length
    assert relative_error(streamed, whole, inputs.get("padding_mask")) <= 1e-5


def test_state_after_call_equals_state_after_steps():
    inputs = random_inputs(5, length=20, padding=True)
    tensors = cast_inputs(inputs, "float64")
    _, chunked_state = native_hybrid_attention(
        window_size=6, return_state=True, implementation="chunked", **tensors)
    _, reference_state = native_hybrid_attention(
        window_size=6, return_state=True, implementation="reference",
        **tensors)
    for name, value in chunked_state.items():
        np.testing.assert_allclose(ops.convert_to_numpy(value),
                                   ops.convert_to_numpy(reference_state[name]),
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def test_decode_inside_while_loop():
    inputs = random_inputs(9, length=12)
    tensors = cast_inputs(inputs, "float32")
    whole = ops.convert_to_numpy(native_hybrid_attention(window_size=4,
                                                         **tensors))

    def body(t, carry):
        state, outputs = carry
        token = {n: ops.take(x, t, axis=1) for n, x in tensors.items()}
        out, state = native_hybrid_attention_step(state=state, window_size=4,
                                                  **token)
        outputs = ops.where(ops.arange(12)[None, :, None, None] == t,
                            out[:, None], outputs)
        return state, outputs

    state = initial_state(2, 2, 16, 16, 8, 4)
    _, outputs = ops.fori_loop(0, 12, body, (state, ops.zeros((2, 12, 4, 16))))
    assert relative_error(ops.convert_to_numpy(outputs), whole) <= 1e-5


def _gsa_numpy(q, k, v, g):
    """Gated Slot Attention (arXiv 2409.07146) in its own two-pass form."""
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    groups = q.shape[2] // k.shape[2]
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[2])):
        c = h // groups
        slot_k = np.zeros((k.shape[-1], g.shape[-1]))
        slot_v = np.zeros((g.shape[-1], v.shape[-1]))
        for t in range(q.shape[1]):
            alpha = np.exp(g[b, t, c])
            slot_k = slot_k @ np.diag(alpha) + np.outer(k[b, t, c], 1 - alpha)
            slot_v = np.diag(alpha) @ slot_v + np.outer(1 - alpha, v[b, t, c])
            logits = q[b, t, h] @ slot_k / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max())
            out[b, t, h] = (p / p.sum()) @ slot_v
    return out


def test_window_zero_is_gated_slot_attention():
    inputs = random_inputs(13, length=29, separate_window=False)
    expected = _gsa_numpy(*(inputs[n] for n in INPUT_NAMES[:4]))
    assert relative_error(run(inputs, 0, "chunked"), expected) <= 1e-5


def test_no_slots_full_window_is_causal_attention():
    inputs = random_inputs(17, length=33, kv_heads=4, num_slots=0,
                           separate_window=False)
    tensors = cast_inputs(inputs, "float32")
    expected = ops.dot_product_attention(tensors["query"], tensors["key"],
                                         tensors["value"], is_causal=True)
    for window_size in (33, 100):
        got = run(inputs, window_size, "chunked")
        assert relative_error(got, ops.convert_to_numpy(expected)) <= 1e-5


def test_full_window_slots_are_zero_sinks():
    inputs = random_inputs(19, length=21, kv_heads=4, num_slots=8,
                           separate_window=False)
    got = run(inputs, 21, "chunked")
    q, k, v = (inputs[n] for n in ("query", "key", "value"))
    logits = np.einsum("bthd,bshd->bhts", q, k) / 4.0
    logits = np.where(np.tril(np.ones((21, 21))) > 0, logits, -np.inf)
    sinks = np.zeros(logits.shape[:3] + (8,))
    z = np.concatenate([sinks, logits], axis=-1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshd->bthd", p[..., 8:], v)
    assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("extreme", ["alpha_to_one", "alpha_to_zero",
                                     "huge_logits", "long_sequence"])
def test_numerical_extremes(extreme):
    length, window_size = (1500, 16) if extreme == "long_sequence" else (70, 5)
    inputs = random_inputs(29, batch=1, length=length, heads=2, kv_heads=1,
                           separate_window=False)
    if extreme == "alpha_to_one":
        inputs["log_forget_gate"] = -1e-7 * np.random.default_rng(0).random(
            inputs["log_forget_gate"].shape)
    elif extreme == "alpha_to_zero":
        inputs["log_forget_gate"] = -60.0 - 500 * np.random.default_rng(
            0).random(inputs["log_forget_gate"].shape)
    elif extreme == "huge_logits":
        inputs["query"] = inputs["query"] * 250.0
    elif extreme == "long_sequence":
        inputs["log_forget_gate"] = inputs["log_forget_gate"] / 20.0
    expected = numpy_output(inputs, window_size)
    got = run(inputs, window_size, "chunked")
    assert np.all(np.isfinite(got))
    assert relative_error(got, expected) <= (2e-4 if extreme == "huge_logits"
                                             else 1e-5)


def test_symbolic_inputs_give_output_spec():
    q = keras.KerasTensor((None, 10, 4, 16))
    k = keras.KerasTensor((None, 10, 2, 16))
    v = keras.KerasTensor((None, 10, 2, 8))
    g = keras.KerasTensor((None, 10, 2, 6))
    out = native_hybrid_attention(q, k, v, g, 3)
    assert out.shape == (None, 10, 4, 8)


def test_functional_model_replays_the_whole_call():
    """Every argument (window, scale, window q/k, mask, state) survives the
    symbolic build of a functional model."""
    inputs = cast_inputs(random_inputs(4, length=11, kv_heads=2, num_slots=3,
                                       padding=True), "float32")
    state = native_hybrid_attention(
        window_size=4, return_state=True,
        **{n: x[:, :5] for n, x in inputs.items()})[1]
    rest = {n: x[:, 5:] for n, x in inputs.items()}
    names = sorted(rest)
    symbolic = {n: keras.Input(tuple(rest[n].shape[1:]),
                               dtype=rest[n].dtype, name=n) for n in names}
    symbolic_state = {n: keras.Input(tuple(x.shape[1:]), dtype=x.dtype,
                                     name=f"state_{n}")
                      for n, x in state.items() if n != "position"}
    position = state["position"]

    def attend(tensors, ring):
        return native_hybrid_attention(
            window_size=4, scale=0.3, initial_state={**ring,
                                                     "position": position},
            return_state=True, **tensors)

    output, new_state = attend(symbolic, symbolic_state)
    assert new_state["keys"].shape[1:] == state["keys"].shape[1:]
    model = keras.Model({**symbolic, **{f"state_{n}": x for n, x in
                                        symbolic_state.items()}},
                        [output, new_state["slot_values"]])
    got = model({**rest, **{f"state_{n}": x for n, x in state.items()
                            if n != "position"}})
    expected = attend(rest, {n: x for n, x in state.items()
                             if n != "position"})
    for a, b in zip(got, (expected[0], expected[1]["slot_values"])):
        np.testing.assert_allclose(ops.convert_to_numpy(a),
                                   ops.convert_to_numpy(b), atol=1e-6)


def test_functional_model_replays_the_decode_step():
    inputs = cast_inputs(random_inputs(6, length=6, kv_heads=2, num_slots=3),
                         "float32")
    _, state = native_hybrid_attention(window_size=4, return_state=True,
                                       **{n: x[:, :5] for n, x in
                                          inputs.items()})
    token = {n: x[:, 5] for n, x in inputs.items()}
    symbolic = {n: keras.Input(tuple(x.shape[1:]), name=n)
                for n, x in token.items()}
    output, new_state = native_hybrid_attention_step(
        state=state, window_size=4, scale=0.3, **symbolic)
    model = keras.Model(symbolic, [output, new_state["slot_keys"]])
    expected_output, expected_state = native_hybrid_attention_step(
        state=state, window_size=4, scale=0.3, **token)
    for got, expected in zip(model(token), (expected_output,
                                            expected_state["slot_keys"])):
        np.testing.assert_allclose(ops.convert_to_numpy(got),
                                   ops.convert_to_numpy(expected), atol=1e-6)


def test_a_kernel_that_can_skip_the_state_is_told_to(monkeypatch):
    from keras_nha import backends
    from keras_nha.kernels.chunked import chunked_nha

    calls = []

    def kernel(*, return_state=True, **call):
        calls.append(return_state)
        output, state = chunked_nha(**call)
        return output, state if return_state else None

    module = backends.backend_module()
    monkeypatch.setattr(module, "fast_paths", lambda: {"fake": lambda c: kernel})
    inputs = cast_inputs(random_inputs(7, length=9, kv_heads=2, num_slots=4),
                         "float32")
    plain = native_hybrid_attention(window_size=3, **inputs)
    output, state = native_hybrid_attention(window_size=3, return_state=True,
                                            **inputs)
    assert calls == [False, True]
    assert state is not None
    np.testing.assert_array_equal(ops.convert_to_numpy(plain),
                                  ops.convert_to_numpy(output))


@pytest.mark.parametrize("window_size,num_slots", [
    (w, m) for m in (0, 4) for w in (0, 1, 5, 20, 36, 37, 111) if w or m])
def test_fresh_sequence_equals_zero_state(window_size, num_slots):
    """`state=None` skips the empty ring; numbers and state stay the same."""
    from keras_nha.kernels.chunked import chunked_nha
    from keras_nha.kernels.state import fresh_state

    inputs = cast_inputs(random_inputs(window_size + 11, length=37,
                                       kv_heads=2, num_slots=num_slots,
                                       padding=True), "float64")
    call = dict(window_size=window_size, scale=0.3, **inputs)
    fresh = chunked_nha(state=None, chunk_size=8, **call)
    zero = chunked_nha(state=fresh_state(**call), chunk_size=8, **call)
    np.testing.assert_allclose(ops.convert_to_numpy(fresh[0]),
                               ops.convert_to_numpy(zero[0]), atol=1e-12)
    for name, value in zero[1].items():
        assert fresh[1][name].dtype == value.dtype, name
        np.testing.assert_allclose(ops.convert_to_numpy(fresh[1][name]),
                                   ops.convert_to_numpy(value), atol=1e-12,
                                   err_msg=name)


def test_a_loader_that_takes_fresh_states_gets_none(monkeypatch):
    from keras_nha import backends
    from keras_nha.kernels.chunked import chunked_nha

    seen = []

    def kernel(**call):
        seen.append(call["state"])
        return chunked_nha(**call)

    def loader(call):
        return kernel

    loader.takes_fresh_state = True
    module = backends.backend_module()
    monkeypatch.setattr(module, "fast_paths", lambda: {"fake": loader})
    inputs = cast_inputs(random_inputs(3, length=6, kv_heads=2, num_slots=4),
                         "float32")
    native_hybrid_attention(window_size=3, **inputs)
    assert seen == [None]
