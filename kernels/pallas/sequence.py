"""`pallas_nha`: the sequence kernel behind `implementation="pallas"`.

Token shift, as in `kernels/chunked.py`: the history stream is the state's
ring (oldest first) followed by the new tokens. History row t is the token
that enters the slots at step t, and query t's window is history rows
t+1 .. t+C. So NHA splits into two Pallas passes: the slot pass's
normalised output and log-sum-exp seed the window pass's online softmax,
which is exactly the softmax over [slots | window]; `joint.joint_attention`
puts both under one VJP (`slots.slot_attention` and
`window.window_attention` serve a call without a window or without slots).
"""

import dataclasses

import jax
import jax.numpy as jnp

from keras_nha.kernels import state as state_lib
from keras_nha.kernels.pallas import sharding
from keras_nha.kernels.pallas.common import KernelConfig
from keras_nha.kernels.pallas.common import pad_axis
from keras_nha.kernels.pallas.common import padded_size
from keras_nha.kernels.pallas.common import round_up
from keras_nha.kernels.pallas.common import window_blocks
from keras_nha.kernels.pallas.joint import joint_attention
from keras_nha.kernels.pallas.slots import slot_attention
from keras_nha.kernels.pallas.window import window_attention


def default_config(length, head_dim, interpret, slots=64, itemsize=2,
                   bfloat16=False):
    """Tiles for `length` tokens, a (padded) head dim, slot count, the
    inputs' bytes per element and whether they are bfloat16."""
    block = 64 if length > 32 else 16
    if head_dim > 128:  # keeps the window tiles within shared memory
        block = min(block, 32)
    chunk = 64 if length >= 256 else 32
    # One slot program per chunk, factored products and a segmented scan are
    # 2x faster than 16-row programs and sequential chunk walks at T=65536 on
    # an H200, but with d > 128, M > 64 or float32 inputs their tiles exceeded
    # the H200's shared memory (GPU checks, rounds 3-4): those keep the 16-row
    # design, which passed there. (Interpret mode has no such limit; CI tests
    # both designs.)
    wide = not interpret and (head_dim > 128 or slots > 64 or itemsize > 2)
    # bfloat16 intermediates where every product reads them in bfloat16
    # anyway (float16's range is too small for dz).
    narrow = bfloat16 and not wide
    return KernelConfig(block_q=block, block_k=block, chunk=chunk, sub=16,
                        rows=16 if wide else chunk, factor=not wide,
                        # Fused walks, gate kernels, bf16 slot output / dz /
                        # p and split dk/dv: 1.547 / 4.385 -> 1.106 / 3.606
                        # ms fwd / fwd+bwd at T=16384 on an H200 (s4r1).
                        walk="loop" if wide else "fused", tile=32,
                        narrow_writes=not wide, gate_kernels=not wide,
                        narrow_slot_out=narrow, narrow_probs=narrow,
                        split_dkv=not wide,
                        # 4 warps: window pass 2.04 / 9.00 -> 1.52 / 5.01 ms
                        # fwd / fwd+bwd, slot pass 4.64 / 13.51 -> 4.38 /
                        # 12.12 at T=65536 on an H200 (round 2); the 16-row
                        # design keeps the warps it passed the GPU check with.
                        num_warps=4 if head_dim <= 64 or not wide else 8,
                        # Its dk, dv and ds tiles: 4.04 ms with 8 warps
                        # (session 2, round 2), 4.24 with 4 (s3r1); split
                        # into two kernels, 4 warps: 12.32 -> 11.82 ms
                        # fwd+bwd at T=65536 on an H200 (s5r2).
                        dkv_warps=0 if wide else 4,
                        num_stages=2,
                        # A [16, 16, 128] float32 tensor is too many registers.
                        diag="tensor" if slots <= 64 else "loop",
                        # The factored and exact slot programs as two calls:
                        # 13.12 -> 12.55 ms fwd+bwd at T=65536 on an H200
                        # (s5r1). `split_history` (12.38 with both) stays
                        # off: the s5r2 GPU check stalled in its first case
                        # (GQA, W=100) with both on.
                        exact_pass=True,
                        # A fresh sequence: the window's kernels add the
                        # slots' dq / dk / dv of arrays both read: 11.34 ->
                        # 10.97 ms fwd+bwd at T=65536 on an H200 (s6r1).
                        grads_into_window=True,
                        interpret=interpret)


def _core(query, window_query, history, slot_keys, slot_values, *,
          length, window_size, scale, capacity, num_slots, config):
    """NHA over padded history streams; per shard under `sharding`.

    `length` is the real T (queries are padded past it).
    Returns `(out [B, Tp, H, Vp], slot_keys, slot_values)`; `out` is in the
    query dtype when there is a window, else float32.
    """
    padded = query.shape[1]
    if "ring_mask" in history:  # `split_history`: the fed stream is apart
        window = [(history["ring_" + n], history["window_" + n])
                  for n in ("keys", "values", "mask")]
    elif "window_mask" in history:  # a fresh sequence: the new tokens only
        window = [(history["window_" + n],) for n in ("keys", "values",
                                                      "mask")]
    else:
        window = [history[n] for n in ("window_keys", "values", "mask")]
    if not num_slots:
        out, _ = window_attention(window_query, *window, scale, capacity,
                                  config)
        return out, slot_keys, slot_values
    if capacity == window_size:
        fed = [history[n][:, :padded] for n in ("keys", "values",
                                                "log_forget_gates")]
        # History rows past T are tokens still inside the window at the
        # end: they must not enter the returned slot memory (gates read
        # in place: the gate kernel masks them).
        if not config.fed_length:
            fed[2] = fed[2] * (jnp.arange(padded) < length)[
                None, :, None, None]
    else:
        # The caller promised the sequence fits the ring: nothing leaves.
        fed = [jnp.zeros(history[n].shape[:1] + (padded,)
                         + history[n].shape[2:], history[n].dtype)
               for n in ("keys", "values", "log_forget_gates")]
    if not capacity:
        out, _, slot_keys, slot_values = slot_attention(
            query, *fed, slot_keys, slot_values, scale, num_slots, config)
        return out, slot_keys, slot_values
    return joint_attention(query, window_query, *fed, slot_keys, slot_values,
                           *window, scale, capacity, num_slots, config)


def pallas_nha(query, key, value, log_forget_gate, *, window_size, scale,
               window_query, window_key, padding_mask, state, config=None):
    """NHA with Pallas kernels (the `kernels.chunked.chunked_nha` contract).

    Args:
        query, key, value, log_forget_gate, window_query, window_key,
            padding_mask: validated inputs, `[B, T, ...]`; window_query /
            window_key None: the window reads `query` / `key` themselves.
        window_size: W.
        scale: logit scale.
        state: the state to start from; None: a fresh sequence (the
            window and the slots then read the new tokens in place).
        config: a `KernelConfig`; by default from the length and device.

    Returns:
        `(output [B, T, H, V] in the query dtype, new_state)`.

    Example:

    >>> q = jnp.ones((1, 40, 4, 32)); k = v = jnp.ones((1, 40, 2, 32))
    >>> g = jnp.full((1, 40, 2, 16), -0.1)
    >>> state = keras_nha.ops.initial_state(1, 2, 32, 32, 16, 8)
    >>> out, state = pallas_nha(q, k, v, g, window_size=8, scale=32 ** -0.5,
    ...     window_query=q, window_key=k, padding_mask=None, state=state)
    >>> out.shape
    (1, 40, 4, 32)
    """
    f32 = jnp.float32
    batch, length, heads, key_dim = query.shape
    value_dim, num_slots = value.shape[-1], log_forget_gate.shape[-1]
    shared = dict(shared_query=window_query is None,
                  shared_key=window_key is None)
    window_query = query if window_query is None else window_query
    window_key = key if window_key is None else window_key
    fresh = state is None
    if fresh:  # its ring is empty; the zeros only shape the returned state
        state = state_lib.fresh_state(query, key, value, log_forget_gate,
                                      window_size)
    capacity = state_lib.capacity_of(state)
    if config is None:
        config = default_config(length, max(padded_size(key_dim),
                                            padded_size(value_dim)),
                                jax.default_backend() != "gpu",
                                padded_size(num_slots),
                                jnp.dtype(query.dtype).itemsize,
                                query.dtype == jnp.bfloat16)
    config = dataclasses.replace(config, **shared)
    start = state["position"]
    real = (jnp.ones((batch, length), f32) if padding_mask is None
            else jnp.asarray(padding_mask).astype(f32))
    gates = log_forget_gate.astype(f32)
    if padding_mask is not None:  # (no pass over the gates without one)
        gates = gates * real[:, :, None, None]
    new = {"keys": key, "window_keys": window_key, "values": value,
           "log_forget_gates": gates, "mask": real}
    ring = {n: jnp.asarray(state_lib.ring_to_chronological(state[n], start)
                           ).astype(new[n].dtype)
            for n in state_lib.RING_NAMES}

    key_pad, value_pad = padded_size(key_dim), padded_size(value_dim)
    slot_pad = padded_size(num_slots) if num_slots else 0
    # Block sizes are powers of two: the largest is a multiple of the rest.
    blocks = window_blocks(config)
    history_block = max(cols for _, cols in blocks)
    step = max(config.chunk, *(rows for rows, _ in blocks))
    widths = {"keys": key_pad, "window_keys": key_pad, "values": value_pad,
              "log_forget_gates": slot_pad}
    pad_width = lambda n, x: pad_axis(x, 3, widths[n]) if n in widths else x
    if fresh and capacity:
        padded_length = round_up(length, max(step, history_block))
        config, streams = _fresh_streams(new, length, padded_length,
                                         capacity, capacity == window_size,
                                         config, pad_width)
    elif config.split_history and capacity:
        padded_length = round_up(length, max(step, history_block))
        streams = _split_streams(ring, new, padded_length,
                                 round_up(capacity, history_block), pad_width)
    else:
        padded_length = round_up(length, step)
        padded_history = round_up(max(capacity + length, padded_length),
                                  history_block)
        streams = {n: pad_width(n, pad_axis(jnp.concatenate(
            [ring[n], new[n]], axis=1), 1, padded_history))
            for n in state_lib.RING_NAMES}
    queries = [pad_axis(pad_axis(x, 1, padded_length), 3, key_pad)
               for x in (query, window_query)]
    slot_keys = pad_axis(pad_axis(state["slot_keys"].astype(f32), 2,
                                  key_pad), 3, slot_pad)
    slot_values = pad_axis(pad_axis(state["slot_values"].astype(f32), 2,
                                    slot_pad), 3, value_pad)

    core = sharding.per_shard(
        _core, length=length, window_size=window_size, scale=scale,
        capacity=capacity, num_slots=num_slots, config=config)
    out, slot_keys, slot_values = core(*queries, streams, slot_keys,
                                       slot_values)

    output = out[:, :length, :, :value_dim].astype(query.dtype)
    end = start + length
    new_state = {
        "slot_keys": slot_keys[:, :, :key_dim, :num_slots].astype(
            state["slot_keys"].dtype),
        "slot_values": slot_values[:, :, :num_slots, :value_dim].astype(
            state["slot_values"].dtype),
        "position": end,
    }
    for n in state_lib.RING_NAMES:
        # The last C rows of ring ++ new.
        last = jnp.concatenate([ring[n][:, min(length, capacity):],
                                new[n][:, max(length - capacity, 0):]],
                               axis=1)
        new_state[n] = jnp.asarray(state_lib.chronological_to_ring(
            last, end)).astype(state[n].dtype)
    return output, new_state


def _fresh_streams(new, length, padded_length, capacity, feeds, config,
                   pad_width):
    """`pallas_nha`'s config and streams for a fresh sequence (empty ring).

    The window reads the new tokens in place ("window_keys",
    "window_values", "window_mask", padded to `padded_length` rows: no copy
    when T is a whole number of blocks). The slots' fed stream is the new
    tokens delayed by C rows (`feeds`: C is the window; else nothing
    leaves it): with C a multiple of the chunk and the fused walks, the
    slot kernels read the new keys and values in place, `fed_lag` = C rows
    behind ("keys", "values"), and with the gate kernels and
    `gates_in_place` the log gates too (`fed_length` = T); otherwise, as
    ever, a delayed copy.
    """
    in_place = (feeds and config.walk == "fused"
                and capacity % (config.chunk * config.fast_chunks) == 0)
    gates_in_place = (in_place and config.gate_kernels
                      and config.gates_in_place)
    streams = {}
    for n in ("keys", "values", "log_forget_gates"):
        # (Without `feeds`, `_core` feeds zeros of this shape.)
        lagging = in_place if n != "log_forget_gates" else gates_in_place
        streams[n] = pad_width(n, pad_axis(
            new[n] if lagging or not feeds else jnp.pad(
                new[n], [(0, 0), (capacity, 0)] + [(0, 0)] * (new[n].ndim - 2)
            )[:, :padded_length], 1, padded_length))
    for n, name in (("window_keys", "keys"), ("values", "values"),
                    ("mask", "mask")):
        streams["window_" + name] = pad_width(n, pad_axis(new[n], 1,
                                                          padded_length))
    if in_place:
        config = dataclasses.replace(
            config, fed_lag=capacity,
            fed_length=length if gates_in_place else 0)
    return config, streams


def _split_streams(ring, new, padded_length, ring_rows, pad_width):
    """`pallas_nha`'s streams with `KernelConfig.split_history`.

    The slots' fed stream (ring ++ new, its first `padded_length` rows:
    "keys", "values", "log_forget_gates") is one copy; the window reads the
    new tokens in place ("window_keys", "window_values", "mask", padded to
    `padded_length` rows: no copy when T is a whole number of blocks) and
    the ring apart ("ring_keys", "ring_values", "ring_mask"), front-padded
    to `ring_rows` rows (masked) so that both parts are whole blocks.
    """
    streams = {}
    for n in ("keys", "values", "log_forget_gates"):
        fed = jnp.concatenate([ring[n], new[n]], axis=1)[:, :padded_length]
        streams[n] = pad_width(n, pad_axis(fed, 1, padded_length))
    for n, name in (("window_keys", "keys"), ("values", "values"),
                    ("mask", "mask")):
        front = ring_rows - ring[n].shape[1]
        widths = [(0, 0)] * ring[n].ndim
        widths[1] = (front, 0)
        streams["ring_" + name] = pad_width(n, jnp.pad(ring[n], widths))
        streams["window_" + name] = pad_width(n, pad_axis(new[n], 1,
                                                          padded_length))
    return streams
