"""Pallas kernels (JAX backend), run in Pallas' interpreter on CPU.

Outputs against the float64 NumPy transcription of the spec; gradients of
every input against float64 autodiff of the portable chunked path.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from nha_numpy_reference import nha_numpy
from nha_testing import INPUT_NAMES
from nha_testing import cast_inputs
from nha_testing import random_inputs
from nha_testing import relative_error
from nha_testing import value_and_grads

import keras_nha

pytestmark = pytest.mark.skipif(keras.config.backend() != "jax",
                                reason="Pallas kernels run on the JAX backend")

TOLERANCE = 2e-5


def _attention(implementation, window_size, padding_mask=None,
               shared=False, scale=None):
    """NHA of the inputs; `shared`: the window reads query and key
    themselves (window_query / window_key ignored, get no gradient)."""
    def fn(query, key, value, log_forget_gate, window_query, window_key):
        return keras_nha.ops.native_hybrid_attention(
            query, key, value, log_forget_gate, window_size, scale=scale,
            window_query=None if shared else window_query,
            window_key=None if shared else window_key,
            padding_mask=padding_mask, implementation=implementation)
    return fn


def _check_against_references(inputs, window_size, shared=False, scale=None):
    mask = inputs.get("padding_mask")
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], window_size, scale=scale,
                         qw=inputs["window_query"], kw=inputs["window_key"],
                         padding_mask=mask)
    rng = np.random.default_rng(len(inputs["query"][0]) + window_size)
    cotangent = rng.normal(size=expected.shape)
    if mask is not None:  # padded outputs are free: give them no gradient
        cotangent = cotangent * mask[..., None, None]
    ops_mask = None if mask is None else ops.convert_to_tensor(mask,
                                                               "float32")
    arrays = {n: inputs[n] for n in INPUT_NAMES}
    out, grads = value_and_grads(
        _attention("pallas", window_size, ops_mask, shared, scale),
        cast_inputs(arrays, "float32"), INPUT_NAMES, cotangent)
    ref_mask = None if mask is None else ops.convert_to_tensor(mask,
                                                               "float64")
    _, ref_grads = value_and_grads(
        _attention("chunked", window_size, ref_mask, shared, scale),
        cast_inputs(arrays, "float64"), INPUT_NAMES, cotangent)
    assert relative_error(out, expected, mask) < TOLERANCE
    for name in INPUT_NAMES:
        assert np.all(np.isfinite(grads[name])), name
        if np.abs(ref_grads[name]).max(initial=0) == 0:
            assert np.abs(grads[name]).max(initial=0) < 1e-6, name
        else:
            assert relative_error(grads[name], ref_grads[name]) < TOLERANCE, (
                name)


LENGTH = 37

# One compile per case is the cost here, so each case also covers one more
# feature: GQA everywhere, padding, head dims / slot counts / group sizes
# that need padding inside the kernels, and gates strong enough that their
# in-chunk cumsum falls far below -88 (exp would overflow if factored). The
# strong-gate case runs the slot kernels' per-row path ("loop", used above
# 64 slots) instead of the block tensor, and the exact in-chunk terms (the
# default factored products are refused for such gates). `config` changes
# the kernel tiling (`KernelConfig` fields) from the default (one slot
# program per chunk, factored products, fused segmented walks, gate
# kernels, split dk/dv kernels, factored and exact slot programs as two
# calls): the 16-row
# design GPUs use for float32,
# d > 128 or M > 64 (sequential chunk walks, XLA gate sums, one dk/dv
# kernel), chunk programs without factored products on session 3's XLA-fed
# scans (with window backward tiles other than the forward's), and the
# fused walks over 16-token chunks (four chunks in segments of three, the
# last one padded; GQA takes the exact 16-row dk/dv programs, no groups
# the factored ones).
CASES = {
    "gsa_w0": dict(window_size=0),
    "gsa_w0_padding_scale": dict(window_size=0, padding=True, scale=0.3),
    "w5_no_slots_sliding_window": dict(window_size=5, num_slots=0),
    "w_length_no_slots_padding": dict(window_size=LENGTH, num_slots=0,
                                      padding=True),
    "w1_odd_dims_groups4": dict(window_size=1, key_dim=12, value_dim=20,
                                num_slots=5, kv_heads=1),
    "w5_padding_16_row_programs": dict(
        window_size=5, padding=True,
        config=dict(walk="loop", rows=16, factor=False, gate_kernels=False,
                    split_dkv=False, narrow_writes=False)),
    "w64_beyond_length_no_groups": dict(window_size=64, kv_heads=4),
    "w7_exact_chunk_programs_backward_blocks_xla_scan": dict(
        window_size=7, config=dict(factor=False, dq_blocks=(32, 16),
                                   dkv_blocks=(16, 32), walk="scan",
                                   gate_kernels=False, split_dkv=False)),
    "w_length_minus_1_strong_gates": dict(window_size=LENGTH - 1,
                                          gate_scale=40.0,
                                          config=dict(diag="loop")),
    "w_length": dict(window_size=LENGTH),
    "w5_padding_fused_walks_gate_kernels_split_dkv": dict(
        window_size=5, padding=True,
        config=dict(walk="fused", gate_kernels=True, split_dkv=True,
                    chunk=16, rows=16, segment=3)),
    "w9_no_groups_fused_walks_split_dkv": dict(
        window_size=9, kv_heads=4,
        config=dict(walk="fused", gate_kernels=True, split_dkv=True)),
    "w_3x_length_no_slots": dict(window_size=3 * LENGTH, num_slots=0),
    # Factored chunks first, then chunks too strong for them: each of the
    # two calls per kernel (`exact_pass`) must serve its own chunks; the
    # factored call walks two chunks per program (four, T padded to 64).
    "w5_mixed_gates_exact_pass_2_chunk_programs": dict(
        window_size=5, strong_from=20,
        config=dict(exact_pass=True, fast_chunks=2, chunk=16, rows=16,
                    segment=3)),
    # The window reading the ring (front-padded) and the new tokens apart;
    # the slot kernels' factored and exact sides in one call (session 4).
    "w5_padding_split_history_one_slot_call": dict(
        window_size=5, padding=True,
        config=dict(split_history=True, exact_pass=False)),
    # 16-row window blocks: some lie inside every query row's window.
    "w_length_window_interior_split_history": dict(
        window_size=LENGTH,
        config=dict(window_interior=True, split_history=True, block_q=16,
                    block_k=16, dkv_blocks=(16, 16))),
    # A fresh sequence (no state given) with W a multiple of the chunk:
    # the slot kernels read the new keys and values in place, W rows
    # behind (`fed_lag`); the last fed rows lie past T (masked). The
    # second case: 16-token chunks, two per factored program, padding,
    # the slots' dv added by the window's dk/dv kernel (16-row blocks);
    # the third: the slots' dq, dk and dv added by the window's kernels
    # (the window reads the slot queries and keys themselves).
    "w32_fresh_keys_values_in_place": dict(window_size=32),
    "w32_padding_fresh_in_place_2_chunk_programs_grads_into_window": dict(
        window_size=32, padding=True, strong_from=30,
        config=dict(fast_chunks=2, chunk=16, rows=16, segment=3,
                    grads_into_window=True, dkv_blocks=(32, 16))),
    "w32_fresh_shared_query_key_grads_into_window": dict(
        window_size=32, shared=True, kv_heads=1,
        config=dict(grads_into_window=True, dkv_blocks=(16, 32))),
    "w_3x_length_no_slots_groups4": dict(
        window_size=3 * LENGTH, num_slots=0, kv_heads=1,
        config=dict(dkv_blocks=(16, 32))),
}


def _use_config(changes, monkeypatch, request):
    """Every Pallas call of the test gets the default config changed by
    `changes` (`KernelConfig` fields)."""
    import dataclasses

    import jax

    from keras_nha.kernels.pallas import sequence
    default = sequence.default_config
    monkeypatch.setattr(sequence, "default_config", lambda *a, **k: (
        dataclasses.replace(default(*a, **k), **changes)))
    # A cached trace of the same shapes would keep the other tiling.
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients(case, monkeypatch, request):
    options = dict(CASES[case])
    window_size = options.pop("window_size")
    changes = options.pop("config", None)
    if changes:
        _use_config(changes, monkeypatch, request)
    options.setdefault("num_slots", 8)
    options.setdefault("kv_heads", 2)
    strong_from = options.pop("strong_from", None)
    shared = options.pop("shared", False)
    scale = options.pop("scale", None)
    inputs = random_inputs(len(case), length=LENGTH, heads=4, **options)
    if shared:  # the window reads the slot queries and keys
        inputs["window_query"] = inputs["query"]
        inputs["window_key"] = inputs["key"]
    if strong_from is not None:  # gates from this token on decay 40x faster
        inputs["log_forget_gate"][:, strong_from:] *= 40.0
    _check_against_references(inputs, window_size, shared, scale)


def _run(inputs, window_size, implementation, state=None, start=0, stop=None,
         dtype="float32"):
    piece = {n: ops.convert_to_tensor(inputs[n][:, start:stop], dtype)
             for n in INPUT_NAMES}
    return keras_nha.ops.native_hybrid_attention(
        piece["query"], piece["key"], piece["value"],
        piece["log_forget_gate"], window_size,
        window_query=piece["window_query"], window_key=piece["window_key"],
        initial_state=state, return_state=True,
        implementation=implementation)


def _decode_step(inputs, t, state, window_size, mask=None):
    """One Pallas decode step on token t of `inputs` (float32)."""
    token = {n: ops.convert_to_tensor(inputs[n][:, t], "float32")
             for n in INPUT_NAMES}
    return keras_nha.ops.native_hybrid_attention_step(
        token["query"], token["key"], token["value"],
        token["log_forget_gate"], state, window_size,
        window_query=token["window_query"], window_key=token["window_key"],
        padding_mask=None if mask is None else ops.convert_to_tensor(
            mask[:, t], "float32"),
        implementation="pallas")


@pytest.mark.parametrize("window_size, split_history",
                         [(0, False), (6, False), (6, True)])
def test_streaming_and_decode_match_one_call(window_size, split_history,
                                             monkeypatch, request):
    # The second call's ring holds real tokens: concatenated with the new
    # tokens (default) or read apart from them.
    if split_history:
        _use_config(dict(split_history=True), monkeypatch, request)
    length, prefix, steps = 30, 17, 4
    inputs = random_inputs(20 + window_size, length=length, num_slots=8)
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], window_size,
                         qw=inputs["window_query"], kw=inputs["window_key"])
    state = keras_nha.ops.initial_state(2, 2, 16, 16, 8, window_size,
                                        max_length=length)
    first, state = _run(inputs, window_size, "pallas", state, 0, prefix)
    second, state = _run(inputs, window_size, "pallas", state, prefix,
                         length - steps)
    got = [ops.convert_to_numpy(first), ops.convert_to_numpy(second)]
    for t in range(length - steps, length):
        out, state = _decode_step(inputs, t, state, window_size)
        got.append(ops.convert_to_numpy(out)[:, None])
    assert relative_error(np.concatenate(got, axis=1), expected) < TOLERANCE

    _, ref_state = _run(inputs, window_size, "chunked", None, 0, length,
                        dtype="float64")
    assert int(state["position"]) == length
    for name, value in ref_state.items():
        if name != "position" and np.size(value):
            assert relative_error(state[name], value) < TOLERANCE, name


@pytest.mark.parametrize("window_size", [32, 6, 0])
def test_fresh_sequence_returns_the_state(window_size):
    # No state given: the returned state (slot memory after T, ring of the
    # last W tokens) must be what the float64 chunked path returns.
    inputs = random_inputs(60 + window_size, length=LENGTH, heads=4,
                           num_slots=8)
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], window_size,
                         qw=inputs["window_query"], kw=inputs["window_key"])
    out, state = _run(inputs, window_size, "pallas")
    assert relative_error(out, expected) < TOLERANCE
    _, ref_state = _run(inputs, window_size, "chunked", dtype="float64")
    assert int(state["position"]) == LENGTH
    for name, value in ref_state.items():
        if name != "position" and np.size(value):
            assert relative_error(state[name], value) < TOLERANCE, name


def test_fresh_streams_read_new_tokens_in_place():
    import dataclasses

    import jax.numpy as jnp

    from keras_nha.kernels.pallas import sequence

    new = {n: jnp.ones((1, 128, 2, 16)) for n in ("keys", "window_keys",
                                                  "values",
                                                  "log_forget_gates")}
    new["mask"] = jnp.ones((1, 128))
    base = sequence.default_config(128, 16, True, 16)
    same = lambda n, x: x
    # W = 64, two 32-token chunks: keys and values in place, 64 rows behind.
    config, streams = sequence._fresh_streams(new, 120, 128, 64, True, base,
                                              same)
    assert (config.fed_lag, config.fed_length) == (64, 120)
    for name in ("keys", "values", "log_forget_gates", "window_keys",
                 "window_values"):
        assert streams[name] is new[name.removeprefix("window_")
                                    if name != "window_keys" else name]
    # Gates as a copy: delayed by W (`_core` masks the rows past T).
    changed = dataclasses.replace(base, gates_in_place=False)
    config, streams = sequence._fresh_streams(new, 120, 128, 64, True,
                                              changed, same)
    assert (config.fed_lag, config.fed_length) == (64, 0)
    assert streams["keys"] is new["keys"]
    gates = np.asarray(streams["log_forget_gates"])
    assert gates[:, :64].max() == 0 and gates[:, 64:].min() == 1
    # W = 40 is no whole number of chunks: delayed copies, no lag.
    config, streams = sequence._fresh_streams(new, 120, 128, 40, True, base,
                                              same)
    assert (config.fed_lag, config.fed_length) == (0, 0)
    keys = np.asarray(streams["keys"])
    assert keys[:, :40].max() == 0 and keys[:, 40:].min() == 1


@pytest.mark.parametrize("window_size,num_slots,max_length", [
    (5, 6, None), (6, 0, None), (1, 8, None), (64, 8, 12)])
def test_decode_with_padding_and_groups(window_size, num_slots, max_length):
    # The last case: a global layer whose ring (max_length) is shorter
    # than W.
    length = 12
    inputs = random_inputs(31 + window_size, length=length, heads=4,
                           kv_heads=1, num_slots=num_slots, padding=True)
    mask = inputs["padding_mask"]
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], window_size,
                         qw=inputs["window_query"], kw=inputs["window_key"],
                         padding_mask=mask)
    state = keras_nha.ops.initial_state(2, 1, 16, 16, num_slots, window_size,
                                        max_length=max_length)
    outputs = []
    for t in range(length):
        out, state = _decode_step(inputs, t, state, window_size, mask)
        outputs.append(ops.convert_to_numpy(out))
    assert relative_error(np.stack(outputs, 1), expected, mask) < TOLERANCE


@pytest.mark.parametrize("decay_rows", [False, True])
def test_segmented_scan_matches_a_sequential_walk(decay_rows, monkeypatch):
    import jax.numpy as jnp

    from keras_nha.kernels.pallas import slots
    from keras_nha.kernels.pallas.sequence import default_config

    rng = np.random.default_rng(3)
    batch, heads, chunks, slots_count, width = 1, 2, 7, 16, 32
    log_decay = -rng.uniform(size=(batch, heads, chunks, slots_count))
    state = ((slots_count, width) if decay_rows else (width, slots_count))
    local = rng.normal(size=(batch, heads, chunks) + state)
    init = rng.normal(size=(batch, heads) + state)
    config = default_config(256, width, True, slots_count)
    for reverse in (False, True):
        carry, expected = init.copy(), [None] * chunks
        for n in (reversed(range(chunks)) if reverse else range(chunks)):
            expected[n] = carry
            decay = np.exp(log_decay[:, :, n])
            decay = decay[..., :, None] if decay_rows else decay[..., None, :]
            carry = carry * decay + local[:, :, n]
        # 3 does not divide 7: the last segment is padded with no-op chunks.
        for segment in (2, 3, 32):
            monkeypatch.setattr(slots, "_SEGMENT", segment)
            got, final = slots._scan(
                *(jnp.asarray(x, jnp.float32) for x in (
                    log_decay, np.swapaxes(local, 1, 2), init)),
                config, decay_rows=decay_rows, dtype=jnp.float32,
                reverse=reverse)
            np.testing.assert_allclose(got, np.stack(expected, 2),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(final, carry, rtol=1e-5, atol=1e-5)


def test_jit_and_bfloat16():
    import jax

    inputs = random_inputs(40, length=LENGTH, num_slots=8)
    expected = nha_numpy(inputs["query"], inputs["key"], inputs["value"],
                         inputs["log_forget_gate"], 7,
                         qw=inputs["window_query"], kw=inputs["window_key"])
    arrays = cast_inputs({n: inputs[n] for n in INPUT_NAMES}, "bfloat16")
    arrays["log_forget_gate"] = ops.cast(arrays["log_forget_gate"], "float32")
    out = jax.jit(_attention("pallas", 7))(**arrays)
    assert out.dtype == "bfloat16"
    assert relative_error(out, expected) < 2e-2


def test_selection():
    from keras_nha import backends

    inputs = cast_inputs(random_inputs(50, length=9), "float32")
    call = dict(inputs, window_size=3, scale=0.25, padding_mask=None,
                state=keras_nha.ops.initial_state(2, 2, 16, 16, 8, 3))
    from keras_nha.kernels.pallas.sequence import pallas_nha
    assert backends.select("pallas", call).__wrapped__ is pallas_nha
    import jax
    if jax.default_backend() != "gpu":
        from keras_nha.kernels.chunked import chunked_nha
        assert backends.select("auto", call).__wrapped__ is chunked_nha
    with pytest.raises(ValueError, match="pallas"):
        keras_nha.ops.native_hybrid_attention(
            *[ops.cast(inputs[n], "float64") for n in INPUT_NAMES[:4]], 3,
            implementation="pallas")


_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["KERAS_BACKEND"] = "jax"
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import keras_nha
    sys.path.insert(0, {tests!r})
    from nha_numpy_reference import nha_numpy
    from nha_testing import random_inputs

    changes = {changes!r}
    if changes:  # KernelConfig fields changed from the default
        import dataclasses
        from keras_nha.kernels.pallas import sequence
        default = sequence.default_config
        sequence.default_config = lambda *a, **k: dataclasses.replace(
            default(*a, **k), **changes)
    x = random_inputs(60, batch=2, length=21, heads=8, kv_heads=4,
                      num_slots=8)
    expected = nha_numpy(x["query"], x["key"], x["value"],
                         x["log_forget_gate"], 5, qw=x["window_query"],
                         kw=x["window_key"])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "model"))
    spec = NamedSharding(mesh, P("batch", None, "model", None))
    names = ("query", "key", "value", "log_forget_gate", "window_query",
             "window_key")
    args = [jax.device_put(jnp.asarray(x[n], jnp.float32), spec)
            for n in names]

    def loss(q, k, v, g, qw, kw):
        out = keras_nha.ops.native_hybrid_attention(
            q, k, v, g, 5, window_query=qw, window_key=kw,
            implementation="pallas")
        return jnp.sum(out * out), out

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)),
                                      has_aux=True))
    hlo = step.lower(*args).compile().as_text()
    (_, out), grads = step(*args)
    error = np.abs(np.asarray(out) - expected).max() / np.abs(expected).max()
    assert error < 2e-5, error
    assert out.sharding.is_equivalent_to(spec, 4), out.sharding
    assert "all-gather" not in hlo, "activations were gathered"
    # The same gradients as one device computing everything.
    local = [jax.device_put(jnp.asarray(x[n], jnp.float32), jax.devices()[0])
             for n in names]
    _, expected_grads = jax.jit(jax.value_and_grad(
        loss, argnums=tuple(range(6)), has_aux=True))(*local)
    for got, want in zip(grads, expected_grads):
        got, want = np.asarray(got), np.asarray(want)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    print("SHARDED_OK")
""")


@pytest.mark.parametrize("changes", [{}, dict(split_history=True)])
def test_sharded_over_batch_and_heads_runs_per_shard(changes):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_ENABLE_X64="0")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT.format(tests=tests,
                                                      changes=changes)],
        env=env, capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]
