"""Triton kernels (torch backend), run in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported, so the kernels run in
a child process (this file with `--worker`) and the tests read its report.
Outputs are checked against the float64 NumPy transcription of the spec;
gradients of every input, streaming states and decode steps against the
float64 step-by-step reference. Sizes are small and odd (T = 37 crosses two
slot chunks and several window blocks of the interpreter's tiles).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="Triton kernels run on the torch backend")

TOLERANCE = 5e-5
LENGTH = 37

SEQUENCE_CASES = {}
for _w in (0, 1, 5, 64, LENGTH - 1, LENGTH, 3 * LENGTH):
    for _m in (0, 8):
        if _w or _m:
            SEQUENCE_CASES[f"W{_w}-M{_m}"] = dict(window_size=_w, num_slots=_m)
SEQUENCE_CASES.update({
    "W5-M8-gqa2x4-batch2": dict(window_size=5, num_slots=8, batch=2,
                                heads=4, kv_heads=2),
    "W5-M8-padding": dict(window_size=5, num_slots=8, batch=2, padding=True),
    "W0-M8-padding": dict(window_size=0, num_slots=8, batch=2, padding=True),
    "W37-M0-padding": dict(window_size=LENGTH, num_slots=0, batch=2,
                           padding=True),
    # Strong decay: chunks whose cumulative gates pass SAFE_LOG take the
    # exact offset-by-offset path.
    "W5-M8-strong-gates": dict(window_size=5, num_slots=8, gate_scale=6.0),
    "W0-M8-strong-gates": dict(window_size=0, num_slots=8, gate_scale=6.0),
    # The backward recomputes the slot states instead of keeping them.
    "W5-M8-gqa2x4-recomputed-states": dict(
        window_size=5, num_slots=8, heads=4, kv_heads=2, keep_states="0"),
    # Unequal window-backward tiles (dq and dk/dv blocks differ).
    "W11-M8-uneven-tiles": dict(
        window_size=11, num_slots=8, heads=4, kv_heads=2,
        blocks="query_bwd=32,key_bwd=16,dkdv_query=16,dkdv_key=32"),
    # Slot outputs, dq, ds and dx fused into fewer kernels (split=0).
    "W5-M8-gqa2x4-fused-slots": dict(window_size=5, num_slots=8, heads=4,
                                     kv_heads=2, blocks="split=0"),
    "W111-M8-fused-slots": dict(window_size=111, num_slots=8,
                                blocks="split=0"),
    "W5-M8-strong-gates-fused-slots": dict(window_size=5, num_slots=8,
                                           gate_scale=6.0, blocks="split=0"),
    # Three slot chunks scanned two per step: the scans' carries; then
    # walked chunk by chunk (GQA: the adjoints' decays per kv head).
    "W11-M8-scan-steps": dict(window_size=11, num_slots=8,
                              blocks="chunk=16,scan=64,scan_unroll=2"),
    "W11-M8-scan-steps-auto-block": dict(
        window_size=11, num_slots=8, heads=4, kv_heads=2,
        blocks="chunk=16,scan=0,scan_unroll=2,scan_warps=1"),
    "W11-M8-gqa2x4-scan-walk": dict(window_size=11, num_slots=8, heads=4,
                                    kv_heads=2, padding=True, batch=2,
                                    blocks="chunk=16,scan=64,scan_walk=1"),
    # Short sequences: ds and dx in one kernel, the gate gradient in one
    # sequential pass (the few-launch backward), with GQA and padding.
    "W11-M8-gqa2x4-short-backward": dict(
        window_size=11, num_slots=8, heads=4, kv_heads=2, padding=True,
        batch=2, blocks="short_chunks=8"),
    "W5-M8-short-backward-gates-by-scan": dict(
        window_size=5, num_slots=8, blocks="short_chunks=8,short_gates=0"),
    # The window reads the slots' own queries and keys: gradients summed in
    # the kernels (one query head per kv head: written in place).
    "W9-M8-mha-shared-window": dict(window_size=9, num_slots=8, kv_heads=2,
                                    separate_window=False),
    "W9-M8-shared-window-fused-slots": dict(
        window_size=9, num_slots=8, separate_window=False, blocks="split=0"),
    "W7-M5-dims24x20-shared-window": dict(window_size=7, num_slots=5,
                                          key_dim=24, value_dim=20,
                                          separate_window=False,
                                          scale=0.3),
    # Chunk states and adjoints stored in bfloat16 (forced for fp32
    # inputs): bf16 rounding, so a looser bound that still catches a wrong
    # path (errors of O(1) or more).
    "W5-M8-gqa2x4-bf16-states": dict(window_size=5, num_slots=8, heads=4,
                                     kv_heads=2, blocks="low_states=2",
                                     tolerance=1e-2),
    # The slot-only output, and the backward's slot probabilities and logit
    # gradients, stored in bfloat16 (forced for fp32 inputs).
    "W5-M8-gqa2x4-bf16-slot-output": dict(
        window_size=5, num_slots=8, heads=4, kv_heads=2,
        blocks="low_slot_out=2,low_slot_grads=2", tolerance=1e-2),
    "W0-M8-padding-bf16-slot-output": dict(
        window_size=0, num_slots=8, batch=2, padding=True,
        blocks="low_slot_out=2,low_slot_grads=2", tolerance=1e-2),
    # States and adjoints by the sequential pass (two column tiles, each
    # writing the gates of some of the 12 slots; two kv heads; both
    # recurrences in one program, then in two).
    "W5-M12-gqa2x4-sequential-states": dict(
        window_size=5, num_slots=12, heads=4, kv_heads=2, batch=2,
        padding=True, blocks="sequential=1,state_tile=8,state_both=1"),
    "W5-M8-mha-sequential-states": dict(
        window_size=5, num_slots=8, kv_heads=2,
        blocks="sequential=1,state_tile=8"),
    "W0-M5-dims24x20-sequential-bf16-states": dict(
        window_size=0, num_slots=5, key_dim=24, value_dim=20,
        blocks="sequential=1,state_tile=16,low_states=2", tolerance=1e-2),
})
STREAM_CASES = {
    "W5-M8": dict(window_size=5, num_slots=8),
    "W0-M8-strong-gates": dict(window_size=0, num_slots=8, gate_scale=6.0),
    "W16-M0-padding": dict(window_size=16, num_slots=0, padding=True),
    "W64-M8-short-ring": dict(window_size=64, num_slots=8, max_length=45),
    # W = T - 1 over the whole stream: the first slot write happens in the
    # second call, from a ring that holds every earlier token.
    "W36-M8-gqa2x4": dict(window_size=36, num_slots=8, heads=4, kv_heads=2),
    "W5-M8-fused-slots": dict(window_size=5, num_slots=8, padding=True,
                              blocks="split=0"),
    "W5-M8-dims24x20-scan-walk-bf16-states": dict(
        window_size=5, num_slots=8, key_dim=24, value_dim=20,
        blocks="scan_walk=1,low_states=2", tolerance=1e-2),
    "W5-M8-dims24x20-sequential-states": dict(
        window_size=5, num_slots=8, key_dim=24, value_dim=20, padding=True,
        blocks="sequential=1,state_tile=16"),
    "W5-M8-dims24x20-bf16-states": dict(window_size=5, num_slots=8,
                                        key_dim=24, value_dim=20,
                                        blocks="low_states=2",
                                        tolerance=1e-2),
}
STEP_CASES = {
    "W0-M8": dict(window_size=0, num_slots=8),
    "W1-M8": dict(window_size=1, num_slots=8),
    "W5-M8-padding": dict(window_size=5, num_slots=8, padding=True),
    "W5-M0": dict(window_size=5, num_slots=0),
    "W64-M8-short-ring": dict(window_size=64, num_slots=8, max_length=30),
    "W26-M8-gqa2x4": dict(window_size=26, num_slots=8, heads=4, kv_heads=2),
}
# `triton_nha(..., return_state=False)`: the same output, no state built.
STATELESS_CASES = {
    "W5-M8-padding": dict(window_size=5, num_slots=8, batch=2, padding=True),
}
# A fresh sequence (no initial state) from the loader's cached zero state.
FRESH_CASES = {
    "W5-M8-gqa2x4": dict(window_size=5, num_slots=8, heads=4, kv_heads=2),
    "W40-M8-uncached": dict(window_size=40, num_slots=8, uncached=True),
}
_SHAPE_KEYS = ("batch", "heads", "kv_heads", "key_dim", "value_dim",
               "num_slots", "separate_window", "padding", "gate_scale")


# ---------------------------------------------------------------- worker ---

def _shape(case, length):
    shape = dict(batch=1, length=length, heads=2, kv_heads=1, key_dim=16,
                 value_dim=16)
    shape.update({k: v for k, v in case.items() if k in _SHAPE_KEYS})
    return shape


def _error(got, expected, mask=None):
    """Relative to the largest expected entry; absolute where that is ~0
    (e.g. the logits' gradients when every softmax has a single entry)."""
    from nha_testing import relative_error

    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if expected.size == 0:  # e.g. the gates' gradient with M = 0
        return 0.0
    if np.abs(expected).max() < 1e-6:
        assert np.all(np.isfinite(got)), "non-finite values"
        return float(np.abs(got).max())
    return relative_error(got, expected, mask)


def _attention(implementation, window_size, scale=None, padding_mask=None,
               state=None):
    import keras_nha
    from keras import ops

    def fn(**inputs):
        out = keras_nha.ops.native_hybrid_attention(
            window_size=window_size, scale=scale, padding_mask=padding_mask,
            initial_state=state, implementation=implementation, **inputs)
        # Some inputs do not reach the output (the window for W = 0, the
        # slots when nothing leaves the window); touching them keeps every
        # gradient defined (zero) for both implementations.
        return out + 0.0 * sum(ops.sum(x) for x in inputs.values())
    return fn


def _mask_tensor(mask, dtype):
    from keras import ops
    return None if mask is None else ops.convert_to_tensor(mask, dtype)


def _compare(inputs, case, states=(None, None), expected=None, seed=0):
    """Triton (fp32) against the reference (fp64): outputs and gradients."""
    from nha_testing import INPUT_NAMES
    from nha_testing import cast_inputs
    from nha_testing import value_and_grads

    mask = inputs.pop("padding_mask", None)
    names = [n for n in INPUT_NAMES if n in inputs]
    window, scale = case["window_size"], case.get("scale")
    rng = np.random.default_rng(seed)
    shape = inputs["query"].shape[:3] + (inputs["value"].shape[-1],)
    cotangent = rng.normal(size=shape)
    if mask is not None:  # padded outputs are free: give them no gradient
        cotangent = cotangent * mask[..., None, None]
    out, grads = value_and_grads(
        _attention("triton", window, scale, _mask_tensor(mask, "float32"),
                   states[0]),
        cast_inputs(inputs, "float32"), names, cotangent)
    ref_out, ref_grads = value_and_grads(
        _attention("reference", window, scale, _mask_tensor(mask, "float64"),
                   states[1]),
        cast_inputs(inputs, "float64"), names, cotangent)
    errors = {"output": _error(out, ref_out, mask)}
    if expected is not None:
        errors["output_vs_numpy"] = _error(out, expected, mask)
    for name in names:
        errors[f"d_{name}"] = _error(grads[name], ref_grads[name])
    return errors


def _state_errors(got, expected):
    from keras import ops
    errors = {}
    for name, value in expected.items():
        a = ops.convert_to_numpy(got[name]).astype(np.float64)
        b = ops.convert_to_numpy(value).astype(np.float64)
        errors[f"state_{name}"] = (_error(a, b) if b.size and b.ndim
                                   else float(np.abs(a - b).max(initial=0)))
    return errors


def _sequence_case(case, seed):
    from nha_numpy_reference import nha_numpy
    from nha_testing import random_inputs

    inputs = random_inputs(seed, **_shape(case, LENGTH))
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], case["window_size"],
                         scale=case.get("scale"),
                         qw=inputs.get("window_query"),
                         kw=inputs.get("window_key"),
                         padding_mask=inputs.get("padding_mask"))
    return _compare(inputs, case, expected=expected, seed=seed)


def _stateless_case(case, seed):
    import torch
    from nha_numpy_reference import nha_numpy
    from nha_testing import random_inputs

    from keras_nha.kernels import state as state_lib
    from keras_nha.kernels.triton.sequence import triton_nha

    inputs = random_inputs(seed, **_shape(case, LENGTH))
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], case["window_size"],
                         qw=inputs["window_query"], kw=inputs["window_key"],
                         padding_mask=inputs["padding_mask"])
    x = {n: torch.tensor(np.asarray(v), dtype=torch.float32)
         for n, v in inputs.items()}
    b, _, hkv, k = x["key"].shape
    state = state_lib.zero_state(b, hkv, k, x["value"].shape[-1],
                                 case["num_slots"], case["window_size"],
                                 "float32")
    outputs = []
    for return_state in (False, True):
        out, new_state = triton_nha(
            x["query"], x["key"], x["value"], x["log_forget_gate"],
            window_size=case["window_size"], scale=k ** -0.5,
            window_query=x["window_query"], window_key=x["window_key"],
            padding_mask=x["padding_mask"], state=state,
            return_state=return_state)
        outputs.append(out.numpy())
        assert (new_state is None) == (not return_state)
    return {"output_vs_numpy": _error(outputs[0], expected,
                                      inputs["padding_mask"]),
            "vs_return_state": float(np.abs(outputs[0] - outputs[1]).max())}


def _fresh_case(case, seed):
    """A fresh sequence through the public op twice: the loader's cached
    zero state serves both calls, stays zero, and the returned state shares
    none of its tensors (with `uncached`, too large to keep: none kept)."""
    import keras_nha
    from keras import ops
    from nha_numpy_reference import nha_numpy
    from nha_testing import cast_inputs

    from keras_nha.backends import torch as torch_backend

    torch_backend._ZERO_STATES.clear()
    limit = torch_backend._MAX_CACHED_BYTES
    if case.get("uncached"):  # too large to keep: built per call
        torch_backend._MAX_CACHED_BYTES = 0
    inputs = random_inputs_for(case, LENGTH, seed)
    inputs.pop("padding_mask", None)
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], case["window_size"],
                         qw=inputs.get("window_query"),
                         kw=inputs.get("window_key"))
    results = []
    for _ in range(2):
        out, state = keras_nha.ops.native_hybrid_attention(
            window_size=case["window_size"], return_state=True,
            implementation="triton", **cast_inputs(inputs, "float32"))
        results.append((ops.convert_to_numpy(out), state))
    errors = {"output_vs_numpy": _error(results[0][0], expected),
              "vs_first_call": float(np.abs(results[0][0]
                                            - results[1][0]).max())}
    if case.get("uncached"):
        errors["states_kept"] = float(len(torch_backend._ZERO_STATES))
        torch_backend._MAX_CACHED_BYTES = limit
        return errors
    (cached,) = torch_backend._ZERO_STATES.values()
    storages = {x.untyped_storage().data_ptr() for x in cached.values()
                if x.numel()}
    shared = [n for _, state in results for n, x in state.items()
              if x.numel() and x.untyped_storage().data_ptr() in storages]
    errors["cached_zero_state_max"] = max(float(x.abs().max())
                                          for x in cached.values()
                                          if x.numel())
    errors["tensors_shared_with_the_cache"] = float(len(shared))
    return errors


def _prefix_states(inputs, case, prefix):
    """States after `prefix` tokens (reference path), in fp32 and fp64."""
    import keras_nha
    from nha_testing import cast_inputs

    shape = inputs["key"].shape
    states = []
    for dtype in ("float32", "float64"):
        state = keras_nha.ops.initial_state(
            shape[0], shape[2], shape[3], inputs["value"].shape[-1],
            case["num_slots"], case["window_size"],
            max_length=case.get("max_length"), dtype=dtype)
        head = {n: x[:, :prefix] for n, x in inputs.items()}
        mask = head.pop("padding_mask", None)
        _, state = keras_nha.ops.native_hybrid_attention(
            window_size=case["window_size"], initial_state=state,
            padding_mask=_mask_tensor(mask, dtype), return_state=True,
            implementation="reference", **cast_inputs(head, dtype))
        states.append(state)
    return states


def _stream_case(case, seed):
    import keras_nha
    from nha_testing import cast_inputs

    prefix, suffix = 20, 17
    inputs = random_inputs_for(case, prefix + suffix, seed)
    states = _prefix_states(inputs, case, prefix)
    tail = {n: x[:, prefix:] for n, x in inputs.items()}
    errors = _compare(dict(tail), case, states, seed=seed)
    mask = tail.pop("padding_mask", None)
    final = []
    for implementation, dtype, state in (("triton", "float32", states[0]),
                                         ("reference", "float64", states[1])):
        _, new_state = keras_nha.ops.native_hybrid_attention(
            window_size=case["window_size"], initial_state=state,
            padding_mask=_mask_tensor(mask, dtype), return_state=True,
            implementation=implementation, **cast_inputs(tail, dtype))
        final.append(new_state)
    errors.update(_state_errors(*final))
    return errors


def random_inputs_for(case, length, seed):
    from nha_testing import random_inputs
    return random_inputs(seed, **_shape(case, length))


def _step_case(case, seed):
    import keras_nha
    from keras import ops
    from nha_testing import cast_inputs

    prefix, steps = 23, 4
    inputs = random_inputs_for(case, prefix + steps, seed)
    states = _prefix_states(inputs, case, prefix)
    errors = {}
    for t in range(prefix, prefix + steps):
        token = {n: x[:, t] for n, x in inputs.items()}
        mask = token.pop("padding_mask", None)
        results = []
        for i, (implementation, dtype) in enumerate((("triton", "float32"),
                                                     ("reference",
                                                      "float64"))):
            out, states[i] = keras_nha.ops.native_hybrid_attention_step(
                state=states[i], window_size=case["window_size"],
                padding_mask=_mask_tensor(mask, dtype),
                implementation=implementation, **cast_inputs(token, dtype))
            results.append(ops.convert_to_numpy(out))
        step_errors = {"output": _error(*results, mask)}
        step_errors.update(_state_errors(*states))
        for name, value in step_errors.items():
            errors[name] = max(errors.get(name, 0.0), value)
    return errors


def _worker():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    groups = (("sequence", SEQUENCE_CASES, _sequence_case),
              ("stream", STREAM_CASES, _stream_case),
              ("step", STEP_CASES, _step_case),
              ("stateless", STATELESS_CASES, _stateless_case),
              ("fresh", FRESH_CASES, _fresh_case))
    for group, cases, run in groups:
        for seed, (name, case) in enumerate(cases.items()):
            only = os.environ.get("NHA_TRITON_TEST_ONLY")
            if only and not any(part in f"{group}/{name}"
                                for part in only.split(",")):
                continue
            os.environ["KERAS_NHA_TRITON_BLOCKS"] = case.get("blocks", "")
            os.environ["KERAS_NHA_TRITON_KEEP_STATES"] = case.get(
                "keep_states", "1")
            try:
                result = {"errors": run(dict(case), seed)}
            except Exception as error:  # reported to the parent test
                result = {"failure": f"{type(error).__name__}: {error}"}
            result["tolerance"] = case.get("tolerance", TOLERANCE)
            print(json.dumps({"case": f"{group}/{name}", **result}),
                  flush=True)


# ----------------------------------------------------------------- tests ---

@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="1", KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, os.path.abspath(__file__),
                           "--worker"], env=env, capture_output=True,
                          text=True, timeout=900)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            results[entry.pop("case")] = entry
    if not results:
        pytest.fail(f"the interpreter worker reported nothing "
                    f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return results


def _check(report, case):
    assert case in report, f"{case} missing from the worker's report"
    entry = report[case]
    assert "failure" not in entry, entry.get("failure")
    errors = entry["errors"]
    assert errors, "no quantity was compared"
    bad = {k: v for k, v in errors.items() if not v < entry["tolerance"]}
    assert not bad, f"errors above {entry['tolerance']}: {bad}"


@pytest.mark.parametrize("case", sorted(SEQUENCE_CASES))
def test_sequence_outputs_and_gradients(report, case):
    _check(report, f"sequence/{case}")
    expected = {"output", "output_vs_numpy", "d_query", "d_key", "d_value",
                "d_log_forget_gate"}
    assert expected <= set(report[f"sequence/{case}"]["errors"])


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_streaming_from_a_state(report, case):
    _check(report, f"stream/{case}")
    assert "state_slot_values" in report[f"stream/{case}"]["errors"]


@pytest.mark.parametrize("case", sorted(STATELESS_CASES))
def test_without_returned_state(report, case):
    _check(report, f"stateless/{case}")
    assert "vs_return_state" in report[f"stateless/{case}"]["errors"]


@pytest.mark.parametrize("case", sorted(FRESH_CASES))
def test_fresh_sequence_from_the_cached_zero_state(report, case):
    _check(report, f"fresh/{case}")
    kept = "states_kept" if FRESH_CASES[case].get("uncached") else (
        "cached_zero_state_max")
    assert kept in report[f"fresh/{case}"]["errors"]


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_decode_step(report, case):
    _check(report, f"step/{case}")
    assert "state_values" in report[f"step/{case}"]["errors"]


def _call(device="cpu", dtype="float32", num_slots=8, requires_grad=False):
    import torch

    from keras_nha.kernels import state as state_lib

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=getattr(torch, dtype))

    q, k, v = rand(1, 9, 2, 16), rand(1, 9, 1, 16), rand(1, 9, 1, 16)
    g = -torch.rand(1, 9, 1, num_slots, device=device)
    state = state_lib.zero_state(1, 1, 16, 16, num_slots, 4, dtype)
    if requires_grad:
        state["slot_keys"].requires_grad_(True)
    return dict(query=q, key=k, value=v, log_forget_gate=g, window_size=4,
                scale=0.25, window_query=q, window_key=k, padding_mask=None,
                state=state)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="checks the behaviour without the interpreter")
def test_auto_never_picks_triton_for_cpu_tensors():
    pytest.importorskip("triton")
    from keras_nha import backends
    from keras_nha.kernels.chunked import chunked_nha

    call = _call()
    assert backends.select("auto", call) is chunked_nha
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.select("triton", call)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(device="meta"), "meta"),
    (dict(dtype="float64"), "float64"),
    (dict(num_slots=130), "130 slots"),
    (dict(requires_grad=True), "incoming state"),
])
def test_loader_refuses_what_the_kernels_do_not_cover(kwargs, reason):
    pytest.importorskip("triton")
    from keras_nha.backends import torch as torch_backend

    with pytest.raises(NotImplementedError, match=reason):
        torch_backend.fast_paths()["triton"](_call(**kwargs))


def test_loader_refuses_during_symbolic_build():
    from keras.src.backend.common.symbolic_scope import SymbolicScope

    from keras_nha.backends import torch as torch_backend

    with SymbolicScope():
        with pytest.raises(NotImplementedError, match="tracing"):
            torch_backend.fast_step_paths()["triton"](_call())


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


def test_launch_plan_replays_in_order_and_drops_on_a_different_launch():
    pytest.importorskip("triton")
    from keras_nha.kernels.triton import launch

    first, second = object(), object()

    def run(plan_signature, kernels):
        """Launch `kernels` under the plan; what each launch replayed."""
        got = []
        with launch.Plan.of(plan_signature):
            plan = launch._ACTIVE.plan
            for fn in kernels:
                found = plan.replay(fn)
                got.append(found)
                if found is None:
                    plan.record(fn, ("compiled", fn))
        return got

    saved = launch._PLANS[0]
    launch._PLANS[0] = True
    try:
        assert run("s", [first, second]) == [None, None]  # recorded
        assert run("s", [first, second]) == [("compiled", first),
                                              ("compiled", second)]
        # Another kernel where the record has `second`: dropped, keyed.
        assert run("s", [first, first]) == [("compiled", first), None]
        assert "s" not in launch.Plan._known
        assert run("s", [second]) == [None]  # recorded afresh
        assert run("s", [second]) == [("compiled", second)]
        # Fewer launches than recorded: dropped at the end.
        run("t", [first, second])
        assert run("t", [first]) == [("compiled", first)]
        assert "t" not in launch.Plan._known
        with launch.Plan.of("u"):  # no nesting: the inner one is a no-op
            assert launch.Plan.of("v") is launch._NO_PLAN
        launch._PLANS[0] = False
        assert launch.Plan.of("s") is launch._NO_PLAN
    finally:
        launch._PLANS[0] = saved
        launch.Plan._known.clear()
