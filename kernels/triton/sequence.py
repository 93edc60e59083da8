"""NHA over a sequence on the Triton kernels, differentiable in torch.

`triton_nha` follows the kernel contract of `kernels.chunked.chunked_nha`.
Forward: the stream's gate tiles and per-chunk state contributions (one
launch per state), a scan to chunk-start states (key and value states in one
launch), the slot-only softmax output, its log-sum-exp and the scaled slot
logits (one program per chunk and query head), then the window flash kernel
seeded with them (the joint softmax). Backward: window flash backward fed the
merged output and log-sum-exp, plus the slot backward (see `slots.py`),
which reads the forward's slot logits instead of recomputing them.

The chunk-start slot states of the forward are kept for the backward too
(recomputing them costs a third of the slot forward); set
KERAS_NHA_TRITON_KEEP_STATES=0 to recompute them instead and save their
memory (2 x B x Hkv x (T / 64) x d x M floats per call).

Gradients flow to query, key, value, log_forget_gate, window_query and
window_key; the incoming state and the returned slot memory carry none (the
loader refuses states that require grad). The returned ring buffers are built
with torch ops from the inputs, so they stay differentiable.
"""

import contextlib
import dataclasses
import os

import torch

from keras_nha.kernels.triton import common
from keras_nha.kernels.triton import launch
from keras_nha.kernels.triton import slots
from keras_nha.kernels.triton import state_pass
from keras_nha.kernels.triton import window
from keras_nha.kernels.triton.launch import launcher


@dataclasses.dataclass(frozen=True)
class _Config:
    window_size: int
    capacity: int
    scale: float
    blocks: common.Blocks
    has_mask: bool

    @property
    def visible(self):
        """Window length the queries see: the ring capacity when it is
        smaller than W (the caller promised the sequence fits)."""
        return min(self.window_size, self.capacity)

    def state_dtype(self, dtype, adjoint=False):
        """Storage dtype of the chunk-start states (or the adjoints)."""
        low = self.blocks.low_states
        if low == 3 and not adjoint:  # bf16 adjoints only
            return torch.float32
        if low == 2 or (low and dtype == torch.bfloat16):
            return torch.bfloat16
        return torch.float32

    def slot_output_dtype(self, dtype, backward=False):
        """Storage dtype of the slot-only output the window kernel starts
        from (`low_slot_out`), or with `backward` of the slot probabilities
        and logit gradients (`low_slot_grads`): the input's dtype for
        bfloat16 inputs, and for float16 ones the output's."""
        low = (self.blocks.low_slot_grads if backward
               else self.blocks.low_slot_out)
        if low == 2 and (self.capacity or backward):
            # With W = 0 the slot output is the output itself: kept.
            return torch.bfloat16
        # Gradients stay fp32 for float16 inputs: a loss-scaled dz could
        # pass float16's range (bfloat16 has float32's).
        sixteen = (torch.bfloat16,) if backward else (torch.bfloat16,
                                                      torch.float16)
        return dtype if low and dtype in sixteen else torch.float32

    @property
    def feeds(self):
        """Tokens leave the window into the slots only when the ring holds
        a full window (always so for W = 0)."""
        return self.capacity == self.window_size


def _keep_states():
    return os.environ.get("KERAS_NHA_TRITON_KEEP_STATES", "1") != "0"


def _slot_options(blocks, cap=0):
    """Launch options of the slot kernels: a register cap (blocks.slot_regs,
    else `cap`) lets two programs share an SM."""
    cap = blocks.slot_regs or cap
    if cap and not common.interpreting():
        return dict(num_warps=blocks.warps, maxnreg=cap)
    return dict(num_warps=blocks.warps)


def _precision(dtype):
    """tl.dot precision for fp32 operands: float32 inputs get "tf32x3"
    (three tf32 products: float32 accuracy on tensor cores; "ieee" dots
    compile to scalar code that spills ~10 KB per thread on sm_90); the
    fp32 intermediates of bf16/fp16 inputs get "tf32"."""
    if dtype != torch.float32:
        return "tf32"
    return os.environ.get("KERAS_NHA_TRITON_FP32_DOT", "tf32x3")


def _tile(width, num_slots):
    """Column tile for [tile, M] fp32 state blocks held in registers."""
    full = common.pow2(width)
    return min(full, max(16, 8192 // common.pow2(num_slots)))


def _scan_block(blocks, states):
    """State elements per chunk-scan program: `blocks.scan`, or with 0 one
    16-byte vector per thread of every warp (the scan along the chunk axis
    then stays in each thread's registers)."""
    if blocks.scan:
        return blocks.scan
    return 32 * blocks.scan_warps * (16 // states.element_size())


def _inner(width):
    """Column tile of the loops over a state's rows (keeps registers low)."""
    return min(common.pow2(width), 64)


_DUMMIES = {}


def _dummy(like):
    """A one-element tensor for pointer arguments the kernels never read
    (cached per device and dtype: no allocation or launch per call)."""
    key = (like.device, like.dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=like.dtype, device=like.device)
    return _DUMMIES[key]


def _ring_or_dummy(ring, like):
    return ring if ring.shape[1] else _dummy(like)


def _delta(ring, new):
    """Where the ring lies relative to the new-token tensor, in elements
    (the kernels address both from one base pointer)."""
    assert ring.dtype == new.dtype and ring.device == new.device
    gap = ring.data_ptr() - new.data_ptr()
    assert gap % new.element_size() == 0
    return gap // new.element_size()


class _Shapes:
    def __init__(self, query, key, value, log_forget_gate):
        self.B, self.T, self.H, self.K = query.shape
        self.HKV = key.shape[2]
        self.V = value.shape[-1]
        self.M = log_forget_gate.shape[-1]
        self.group = self.H // self.HKV


class _Slots:
    """Chunk-start slot states (values transposed, [V, M]), the stream's
    gate tiles and the final slot states (fp32, the state's layouts)."""

    def __init__(self, keys, values, decay, gates, strengths, entries,
                 per_chunk, final_keys, final_values):
        self.keys, self.values, self.decay = keys, values, decay
        self.gates, self.strengths = gates, strengths
        self.entries, self.per_chunk = entries, per_chunk
        self.final_keys, self.final_values = final_keys, final_values


def _slot_states(s, cfg, key, value, gate, ring, mask, position, slot_keys,
                 slot_values):
    """Chunk-start states from the input state (`slot_keys` [K, M] and
    `slot_values` [M, V] per sequence, fp32); without a feed every chunk
    starts from the input state."""
    if not cfg.feeds:
        dummy = _dummy(gate)
        return _Slots(slot_keys[:, :, None].contiguous(),
                      slot_values.transpose(-1, -2)[:, :, None].contiguous(),
                      None, dummy, dummy, 1, 0, slot_keys.clone(),
                      slot_values.clone())
    bt = cfg.blocks.chunk
    nt = common.cdiv(s.T, bt)
    f32 = dict(device=key.device, dtype=torch.float32)
    low = dict(device=key.device, dtype=cfg.state_dtype(key.dtype))
    if s.K == s.V:  # one buffer: both recurrences scan in one launch
        both = torch.empty(2, s.B, s.HKV, nt + 1, s.K, s.M, **low)
        sk, sv = both[0], both[1]
    else:
        sk = torch.empty(s.B, s.HKV, nt + 1, s.K, s.M, **low)
        sv = torch.empty(s.B, s.HKV, nt + 1, s.V, s.M, **low)
    decay = torch.empty(s.B, s.HKV, nt, s.M, **f32)
    gates = torch.empty(s.B, s.T, s.HKV, s.M, **f32)
    strengths = torch.empty_like(gates)
    mp = common.pow2(s.M)
    prec = _precision(key.dtype)
    if cfg.blocks.sequential:
        final_keys = torch.empty_like(slot_keys)
        final_values = torch.empty_like(slot_values)
        _state_pass(s, cfg, key, value, gate, ring, mask, position,
                    slot_keys, slot_values, sk, sv, decay, gates, strengths,
                    final_keys, final_values)
        return _Slots(sk, sv, decay, gates, strengths, nt + 1, 1, final_keys,
                      final_values)
    # Equal widths: both recurrences in one launch, sharing the gate work.
    keys = (key, ring["keys"], sk, s.K)
    values = (value, ring["values"], sv, s.V)
    launches = [(keys, values)] if s.K == s.V else [(keys, None),
                                                    (values, None)]
    for index, (side, other) in enumerate(launches):
        x, x_ring, out, width = side
        x2, x2_ring, out2, _ = other or side
        dt = _tile(width, s.M)
        grid = (nt, s.B * s.HKV, common.cdiv(width, dt))
        launcher(slots.prep_kernel)[grid](
            x, x2, gate, mask, position, gates, strengths, out, out2, decay,
            s.T, cfg.capacity, _delta(x_ring, x), _delta(x2_ring, x2),
            _delta(ring["log_forget_gates"], gate), s.HKV, D=width, M=s.M,
            DT=dt, MP=mp, BT=bt, HAS_PM=cfg.has_mask, WRITE_GATES=index == 0,
            BOTH=other is not None, PRECISION=prec,
            **_slot_options(cfg.blocks))
    # The scan also writes entry 0 and the final states (fp32).
    final_keys = torch.empty_like(slot_keys)
    final_values = torch.empty_like(slot_values)
    stacks = [(sk, s.K, 2, 0)] if s.K == s.V else [(sk, s.K, 1, 0),
                                                   (sv, s.V, 1, 1)]
    scan = _scan_block(cfg.blocks, sk)
    for out, width, count, first in stacks:
        launcher(slots.chunk_scan_kernel)[(count * s.B * s.HKV,
                                 common.cdiv(width * s.M, scan))](
            out, decay, slot_keys, slot_values, final_keys, final_values, nt,
            s.HKV, 1, s.B * s.HKV, first, D=width, M=s.M,
            BLOCK=scan, UNROLL=cfg.blocks.scan_unroll,
            REVERSE=False, WALK=bool(cfg.blocks.scan_walk),
            num_warps=cfg.blocks.scan_warps)
    return _Slots(sk, sv, decay, gates, strengths, nt + 1, 1, final_keys,
                  final_values)


def _state_options(blocks):
    return dict(num_warps=blocks.state_warps, num_stages=blocks.state_stages)


def _state_pass(s, cfg, key, value, gate, ring, mask, position, slot_keys,
                slot_values, sk, sv, decay, gates, strengths, final_keys,
                final_values):
    """`state_pass_kernel`: both recurrences in one launch when K == V."""
    nt = common.cdiv(s.T, cfg.blocks.chunk)
    dt = min(cfg.blocks.state_tile, common.pow2(max(s.K, s.V)))
    both = s.K == s.V and cfg.blocks.state_both
    sides = [(0, 1 if both else 2, s.K)] if s.K == s.V else [(0, 1, s.K),
                                                             (1, 1, s.V)]
    for first, count, width in sides:
        launcher(state_pass.state_pass_kernel)[
            (s.B * s.HKV, common.cdiv(width, dt), count)](
            key, value, gate, mask, position, gates, strengths, sk, sv, decay,
            slot_keys, slot_values, final_keys, final_values, s.T,
            cfg.capacity, nt, _delta(ring["keys"], key),
            _delta(ring["values"], value),
            _delta(ring["log_forget_gates"], gate), s.HKV, D=width, M=s.M,
            DT=dt, MP=common.pow2(s.M), BT=cfg.blocks.chunk,
            HAS_PM=cfg.has_mask, FIRST=first, WRITE_GATES=first == 0,
            BOTH=both, PRECISION=_precision(key.dtype),
            **_state_options(cfg.blocks))


def _adjoint_pass(s, cfg, reads, state, nt):
    """`adjoint_pass_kernel` over `reads` ((y, coef, adjoint, width) of the
    key and the value side): both in one launch when K == V."""
    dt = min(cfg.blocks.state_tile, common.pow2(max(s.K, s.V)))
    launches = [(reads[0], reads[1], 2)] if s.K == s.V else [
        (reads[0], reads[0], 1), (reads[1], reads[1], 1)]
    for (y, coef, adjoint, width), (y2, coef2, adjoint2, _), count in (
            launches):
        launcher(state_pass.adjoint_pass_kernel)[
            (s.B * s.H, common.cdiv(width, dt), count)](
            y, coef, y2, coef2, state.gates, state.decay, adjoint, adjoint2,
            s.T, nt, s.H, s.HKV, D=width, M=s.M, DT=dt,
            MP=common.pow2(s.M), BT=cfg.blocks.chunk,
            PRECISION=_precision(y.dtype), **_state_options(cfg.blocks))


def _forward(s, cfg, q, k, v, g, qw, kw, mask, ring, position, slot_keys,
             slot_values):
    dev = q.device
    blocks = cfg.blocks
    prec = _precision(q.dtype)
    o_slot = lse_slot = state = logits = None
    if s.M:
        state = _slot_states(s, cfg, k, v, g, ring, mask, position,
                             slot_keys, slot_values)
        o_slot = torch.empty(s.B, s.T, s.H, s.V, device=dev,
                             dtype=cfg.slot_output_dtype(q.dtype))
        lse_slot = torch.empty(s.B, s.T, s.H, device=dev, dtype=torch.float32)
        logits = torch.empty(s.B, s.T, s.H, s.M, device=dev,
                             dtype=torch.float32)
        grid = (common.cdiv(s.T, blocks.chunk), s.B * s.H)
        launcher(slots.slot_forward_kernel)[grid](
            q, k, v, state.gates, state.strengths, position, state.keys,
            state.values, o_slot, lse_slot, logits, s.T, cfg.capacity,
            cfg.scale, state.entries, state.per_chunk, _delta(ring["keys"], k),
            _delta(ring["values"], v), s.H, s.HKV, DK=s.K, DV=s.V, M=s.M,
            BK=common.pow2(s.K), BV=common.pow2(s.V),
            LT=_inner(max(s.K, s.V)), MP=common.pow2(s.M), BT=blocks.chunk,
            FEEDS=cfg.feeds, READOUT=not blocks.split, PRECISION=prec,
            **_slot_options(blocks))
        if blocks.split:
            _readout(s, cfg, None, logits, lse_slot, v, ring["values"],
                     state, state.values, o_slot, 1.0, position)
    if cfg.capacity == 0:
        output, lse = o_slot.to(q.dtype), lse_slot
    else:
        output = torch.empty(s.B, s.T, s.H, s.V, device=dev, dtype=q.dtype)
        lse = torch.empty(s.B, s.T, s.H, device=dev, dtype=torch.float32)
        grid = (common.cdiv(s.T, blocks.query), s.B * s.H)
        launcher(window.window_forward_kernel)[grid](
            qw, kw, v, ring["window_keys"], ring["values"], mask,
            ring["mask"], position,
            o_slot if s.M else output, lse_slot if s.M else lse, output, lse,
            s.T, cfg.capacity, cfg.visible, cfg.scale, H=s.H, HKV=s.HKV,
            DK=s.K, DV=s.V, BK=common.pow2(s.K), BV=common.pow2(s.V),
            BM=blocks.query, BN=blocks.key, HAS_PM=cfg.has_mask,
            HAS_SLOTS=bool(s.M), PRECISION=prec,
            num_warps=blocks.window_warps, num_stages=blocks.stages)
    if s.M:
        final_keys, final_values = state.final_keys, state.final_values
    else:
        final_keys, final_values = slot_keys.clone(), slot_values.clone()
    return output, lse, final_keys, final_values, state, logits


def _readout(s, cfg, coef, logits, lse, x, x_ring, state, states, out,
             out_scale, position, add=False):
    """`slot_readout_kernel` over every chunk and query head."""
    width = x.shape[-1]
    dummy = _dummy(out)
    grid = (common.cdiv(s.T, cfg.blocks.chunk), s.B * s.H)
    launcher(slots.slot_readout_kernel)[grid](
        dummy if coef is None else coef, dummy if logits is None else logits,
        dummy if lse is None else lse, x, state.gates, state.strengths,
        position, states, out, s.T, cfg.capacity, out_scale, state.entries,
        state.per_chunk, _delta(x_ring, x), s.H, s.HKV, D=width, M=s.M,
        BD=common.pow2(width), LT=_inner(width), MP=common.pow2(s.M),
        BT=cfg.blocks.chunk, FROM_LOGITS=logits is not None,
        FEEDS=cfg.feeds, ADD=add, PRECISION=_precision(x.dtype),
        # 128 registers at 8 warps: no spills on sm_90, two programs per SM.
        **_slot_options(cfg.blocks, 128 if cfg.blocks.warps == 8 else 0))


def _group_sum(x, s):
    if s.group == 1:
        return x
    return x.view(s.B, s.T, s.HKV, s.group, x.shape[-1]).sum(3)


def _chronological(ring, position):
    capacity = ring.shape[1]
    index = torch.remainder(
        position + torch.arange(capacity, device=ring.device), capacity)
    return ring.index_select(1, index)


def _slot_backward(s, cfg, q, k, v, g, mask, ring, position, slot_keys,
                   slot_values, do, lse, delta, logits, state=None,
                   dv_window=None, dq_window=None, dk_window=None,
                   join=None):
    """Slot parts of (dq, dk, dv, dg), the last three in new-token rows,
    plus `dv_window` (fp32, updated in place) and, where given (the window
    reads the slots' own queries or keys), `dq_window` and `dk_window`;
    `logits`: the forward's scaled slot logits; `state`: its `_Slots` (None:
    recompute them); `join()` (if given) before reading `dv_window` or
    `dk_window`. Also returns whether dq and dk include the window's."""
    dev = q.device
    blocks = cfg.blocks
    prec = _precision(q.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    if state is None:
        state = _slot_states(s, cfg, k, v, g, ring, mask, position,
                             slot_keys, slot_values)
    nt = common.cdiv(s.T, blocks.chunk)
    mp = common.pow2(s.M)
    dq = torch.empty(s.B, s.T, s.H, s.K, device=dev, dtype=q.dtype)
    # dz and p: read by four and three kernels (16-bit: low_slot_grads).
    dz = torch.empty(s.B, s.T, s.H, s.M, device=dev,
                     dtype=cfg.slot_output_dtype(q.dtype, backward=True))
    probs = torch.empty_like(dz)
    dg_read = torch.empty(s.B, s.T, s.H, s.M, **f32)
    launcher(slots.slot_dq_kernel)[(nt, s.B * s.H)](
        q, do, k, v, state.gates, state.strengths, position, state.keys,
        state.values, lse, delta, logits, dq, dz, probs, dg_read, s.T,
        cfg.capacity, cfg.scale, state.entries, state.per_chunk,
        _delta(ring["keys"], k), _delta(ring["values"], v), s.H, s.HKV,
        DK=s.K, DV=s.V, M=s.M, BK=common.pow2(s.K), BV=common.pow2(s.V),
        LT=_inner(max(s.K, s.V)), MP=mp, BT=blocks.chunk, FEEDS=cfg.feeds,
        READOUT=not blocks.split, PRECISION=prec, **_slot_options(blocks))
    if blocks.split:
        if dq_window is not None:
            dq = dq_window
        _readout(s, cfg, dz, None, None, k, ring["keys"], state, state.keys,
                 dq, cfg.scale, position, add=dq_window is not None)
    elif dq_window is not None:
        dq = dq + dq_window
    if not cfg.feeds:
        if join:
            join()
        return dq, None, dv_window, None, dq_window is not None, False

    # The key side (y = q, c = dz) and the value side (y = do, c = p).
    sides = ((q, dz, k, ring["keys"], s.K, cfg.scale),
             (do, probs, v, ring["values"], s.V, 1.0))
    low = dict(device=dev, dtype=cfg.state_dtype(q.dtype, adjoint=True))
    if s.K == s.V:  # one buffer: both adjoints scan in one launch
        both = torch.empty(2, s.B, s.H, nt, s.K, s.M, **low)
        adjoints = (both[0], both[1])
        stacks = [(both, s.K, 2)]
    else:
        adjoints = tuple(torch.empty(s.B, s.H, nt, width, s.M, **low)
                         for width in (s.K, s.V))
        stacks = [(adjoints[0], s.K, 1), (adjoints[1], s.V, 1)]
    # Equal widths: both adjoints' chunk terms in one launch.
    reads = [(y, coef, adjoint, width) for (y, coef, _, _, width, _), adjoint
             in zip(sides, adjoints)]
    launches = [(reads[0], reads[1])] if s.K == s.V else [(reads[0], None),
                                                          (reads[1], None)]
    if blocks.sequential:
        _adjoint_pass(s, cfg, reads, state, nt)
        launches = stacks = []
    for (y, coef, adjoint, width), other in launches:
        y2, coef2, adjoint2, _ = other or (y, coef, adjoint, width)
        dt = _tile(width, s.M)
        grid = (nt, s.B * s.H, common.cdiv(width, dt))
        launcher(slots.adjoint_delta_kernel)[grid](
            y, coef, y2, coef2, state.gates, adjoint, adjoint2, s.T, s.H,
            s.HKV, D=width, M=s.M, DT=dt, MP=mp, BT=blocks.chunk,
            BOTH=other is not None, PRECISION=prec, **_slot_options(blocks))
    scan = _scan_block(blocks, adjoints[0])
    for adjoint, width, count in stacks:
        launcher(slots.chunk_scan_kernel)[(count * s.B * s.H,
                                 common.cdiv(width * s.M, scan))](
            adjoint, state.decay, *(state.decay,) * 4, nt, s.H, s.group,
            s.B * s.H, 0, D=width, M=s.M, BLOCK=scan,
            UNROLL=blocks.scan_unroll, REVERSE=True,
            WALK=bool(blocks.scan_walk), num_warps=blocks.scan_warps)
    if join:
        join()
    ds = torch.empty(s.B, s.T, s.H, s.M, **f32)
    fed = s.T - cfg.capacity
    short = nt <= blocks.short_chunks  # fewer launches (CPU-bound)
    # With one query head per kv head the kernels write token gradients
    # directly (the value side onto the window's); else per query head,
    # summed over each group below.
    direct = s.group == 1
    dxs = []
    for index, ((y, coef, x, x_ring, width, y_scale), adjoint) in enumerate(
            zip(sides, adjoints)):
        onto = (dk_window, dv_window)[index]
        add = direct and onto is not None
        if add and index == 1:
            # The window's fp32 dv plus ours, stored in the input's dtype;
            # tokens that never left the window keep the window's alone.
            dx = torch.empty(s.B, s.T, s.HKV, width, device=dev,
                             dtype=x.dtype)
            dx[:, max(fed, 0):] = onto[:, max(fed, 0):]
        elif add:
            dx = onto
        elif direct:  # stored in the input's dtype: nothing to add
            dx = torch.empty(s.B, s.T, s.HKV, width, device=dev,
                             dtype=x.dtype)
            dx[:, max(fed, 0):].zero_()  # tokens that never left the window
        else:
            dx = torch.empty(s.B, s.T, s.H, width, **f32)
        parts = ((True, False), (False, True)) if (
            blocks.split and not blocks.fused_dx and not short) else (
                (True, True),)
        for want_ds, want_dx in parts:
            launcher(slots.slot_dx_kernel)[(nt, s.B * s.H)](
                y, coef, x, state.gates, state.strengths, position, adjoint,
                dx, onto if add else dx, ds, s.T, cfg.capacity, y_scale,
                _delta(x_ring, x), s.H, s.HKV, D=width, M=s.M,
                BD=common.pow2(width), LT=_inner(width), MP=mp,
                BT=blocks.chunk, ADD_DS=index > 0, DIRECT=direct, ADD_DX=add,
                WANT_DS=want_ds, WANT_DX=want_dx, PRECISION=prec,
                **_slot_options(blocks))
        dxs.append(dx)
    dx_k, dx_v = dxs

    dg = torch.empty(s.B, s.T, s.HKV, s.M, **f32)
    dg[:, max(s.T - cfg.capacity, 0):].zero_()  # never entered the slots
    if blocks.sequential or (short and blocks.short_gates):
        launcher(state_pass.gate_grad_pass_kernel)[
            (s.B * s.HKV, common.cdiv(s.M, 16))](
            dg_read, ds, state.strengths, mask, dg, s.T, cfg.capacity, nt,
            s.H, s.HKV, M=s.M, MT=16, BT=blocks.chunk, HAS_PM=cfg.has_mask,
            **_state_options(blocks))
    else:
        _gate_grad(s, cfg, dg_read, ds, state, mask, dg, nt)

    merged = (dq_window is not None, dk_window is not None)
    if direct:
        return (dq, dx_k, dx_v, dg) + merged
    dk = torch.zeros(s.B, s.T, s.HKV, s.K, **f32)
    dv = torch.zeros(s.B, s.T, s.HKV, s.V, **f32)
    if fed > 0:
        dk[:, :fed] = _group_sum(dx_k, s)[:, cfg.capacity:]
        dv[:, :fed] = _group_sum(dx_v, s)[:, cfg.capacity:]
    if dv_window is not None:
        dv += dv_window
    if dk_window is not None:
        dk += dk_window
    return (dq, dk, dv, dg) + merged


def _gate_grad(s, cfg, dg_read, ds, state, mask, dg, nt):
    """dg (into `dg`): the reverse cumulative sum of dG over the stream,
    chunk totals first."""
    blocks = cfg.blocks
    mp = common.pow2(s.M)
    totals = torch.empty(s.B, s.HKV, nt, s.M, device=dg.device,
                         dtype=torch.float32)
    launcher(slots.gate_total_kernel)[(nt, s.B * s.HKV)](
        dg_read, ds, state.strengths, totals, s.T, s.H, s.HKV, M=s.M, MP=mp,
        BT=blocks.chunk, **_slot_options(blocks))
    # In place: each chunk's total becomes the sum over the chunks after it.
    launcher(slots.chunk_scan_kernel)[(s.B * s.HKV, 1)](
        totals, *(totals,) * 5, nt, s.HKV, 1, s.B * s.HKV, 0, D=1, M=s.M,
        BLOCK=mp, UNROLL=blocks.gate_scan_unroll or blocks.scan_unroll,
        REVERSE=True, DECAYS=False, WALK=bool(blocks.scan_walk),
        num_warps=blocks.gate_scan_warps)
    launcher(slots.gate_grad_kernel)[(nt, s.B * s.HKV)](
        dg_read, ds, state.strengths, totals, mask, dg, s.T,
        cfg.capacity, s.H, s.HKV, M=s.M, MP=mp, BT=blocks.chunk,
        HAS_PM=cfg.has_mask, **_slot_options(blocks))


def _window_backward(s, cfg, qw, kw, v, mask, ring, position, do, output,
                     lse, delta, overlap=False):
    """Window dq, dk, dv (dv in fp32) and a `_Fork` (None without
    `overlap`); writes `delta` (rowsum(dO * O)). With `overlap`, dk/dv run
    on the fork's side stream once dq (which writes delta) is done: join
    before reading them."""
    dev = qw.device
    blocks = cfg.blocks
    prec = _precision(qw.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    dqw = torch.empty(s.B, s.T, s.H, s.K, device=dev, dtype=qw.dtype)
    dkw = torch.empty(s.B, s.T, s.HKV, s.K, device=dev, dtype=kw.dtype)
    dv = torch.empty(s.B, s.T, s.HKV, s.V, **f32)
    common_args = dict(H=s.H, HKV=s.HKV, DK=s.K, DV=s.V,
                       BK=common.pow2(s.K), BV=common.pow2(s.V),
                       HAS_PM=cfg.has_mask, PRECISION=prec,
                       num_warps=blocks.dq_warps or blocks.window_warps,
                       num_stages=blocks.stages)
    grid = (common.cdiv(s.T, blocks.query_bwd), s.B * s.H)
    launcher(window.window_dq_kernel)[grid](
        qw, kw, v, ring["window_keys"], ring["values"], mask, ring["mask"],
        position, do, output, lse, delta, dqw, s.T, cfg.capacity,
        cfg.visible, cfg.scale, BM=blocks.query_bwd, BN=blocks.key_bwd,
        **common_args)
    dkdv_query = blocks.dkdv_query or blocks.query_bwd
    dkdv_key = blocks.dkdv_key or blocks.key_bwd
    if qw.dtype == torch.float32 and not common.interpreting():
        # fp32 tiles at 128 keys need 328 KB of shared memory (H200: 227).
        dkdv_key = min(dkdv_key, 64)
    common_args["num_warps"] = blocks.dkdv_warps or blocks.window_warps
    grid = (common.cdiv(s.T, dkdv_key), s.B * s.HKV)
    fork = _Fork(qw.device) if overlap else None
    with fork or contextlib.nullcontext():
        launcher(window.window_dkdv_kernel)[grid](
            qw, kw, v, mask, do, lse, delta, dkw, dv, s.T, cfg.visible,
            cfg.scale, BM=dkdv_query, BN=dkdv_key, **common_args)
    return dqw, dkw, dv, fork


_SIDE_STREAMS = {}


def _overlapping(device):
    """KERAS_NHA_TRITON_OVERLAP=1: the window's dk/dv kernel runs beside
    the slot backward's first kernels (on a second CUDA stream)."""
    return device.type == "cuda" and os.environ.get(
        "KERAS_NHA_TRITON_OVERLAP", "0") == "1"


class _Fork:
    """A side stream that starts after the work queued so far on the
    current stream; `join()` makes the current stream wait for it. Tensors
    it uses are allocated before the fork on the current stream and live
    until after the join (the caching allocator reuses memory in stream
    order)."""

    def __init__(self, device):
        self.main = torch.cuda.current_stream(device)
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        self.side = _SIDE_STREAMS[device]
        self.side.wait_stream(self.main)
        self.context = torch.cuda.stream(self.side)
        self.joined = False

    def __enter__(self):
        self.context.__enter__()

    def __exit__(self, *error):
        return self.context.__exit__(*error)

    def join(self):
        if not self.joined:
            self.main.wait_stream(self.side)
            self.joined = True


class NHAFunction(torch.autograd.Function):
    """Autograd op over prepared (contiguous, same-dtype) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, g, qw, kw, mask, ring_keys, ring_window_keys,
                ring_values, ring_gates, ring_mask, position, slot_keys,
                slot_values, cfg, signature):
        s = _Shapes(q, k, v, g)
        ring = dict(keys=ring_keys, window_keys=ring_window_keys,
                    values=ring_values, log_forget_gates=ring_gates,
                    mask=ring_mask)
        with _plan(signature, "forward"):
            output, lse, final_keys, final_values, slot_state, logits = (
                _forward(s, cfg, q, k, v, g, qw, kw, mask, ring, position,
                         slot_keys, slot_values))
        ctx.cfg = cfg
        ctx.signature = signature
        # The returned slot states take no gradient: without this, autograd
        # would build (and fill) two zero tensors for them every backward.
        ctx.set_materialize_grads(False)
        ctx.slot_logits = logits
        # The window reads the slots' own queries or keys (no rotary copy):
        # one gradient each, summed in the kernels.
        ctx.shared = (qw is q, kw is k)
        ctx.slot_state = slot_state if _keep_states() else None
        ctx.save_for_backward(q, k, v, g, qw, kw, mask, ring_keys,
                              ring_window_keys, ring_values, ring_gates,
                              ring_mask, position, slot_keys, slot_values,
                              output, lse)
        final_keys = final_keys.contiguous()
        final_values = final_values.contiguous()
        ctx.mark_non_differentiable(final_keys, final_values)
        return output, final_keys, final_values

    @staticmethod
    def backward(ctx, d_output, _d_keys, _d_values):
        (q, k, v, g, qw, kw, mask, ring_keys, ring_window_keys, ring_values,
         ring_gates, ring_mask, position, slot_keys, slot_values, output,
         lse) = ctx.saved_tensors
        cfg = ctx.cfg
        s = _Shapes(q, k, v, g)
        ring = dict(keys=ring_keys, window_keys=ring_window_keys,
                    values=ring_values, log_forget_gates=ring_gates,
                    mask=ring_mask)
        if d_output is None:  # the output was not used
            d_output = torch.zeros_like(output)
        do = _prepared(d_output, q.dtype)
        with _plan(ctx.signature, do.dtype, do.data_ptr() & 15,
                   ctx.slot_state is None):
            dq, dk, dv, dg, dqw, dkw, merged = _backward(
                ctx, s, cfg, q, k, v, g, qw, kw, mask, ring, position,
                slot_keys, slot_values, output, lse, do)
        grads = []
        for grad, x, in_other in ((dq, q, False), (dk, k, False),
                                  (dv, v, False), (dg, g, False),
                                  (dqw, qw, merged[0]), (dkw, kw, merged[1])):
            if in_other:  # already summed into the slots' gradient
                grads.append(None)
            elif grad is None:  # zeros, as autodiff of the spec gives
                grads.append(torch.zeros_like(x))
            else:
                grads.append(grad if grad.dtype == x.dtype
                             else grad.to(x.dtype))
        return tuple(grads) + (None,) * 11


def _backward(ctx, s, cfg, q, k, v, g, qw, kw, mask, ring, position,
              slot_keys, slot_values, output, lse, do):
    """The gradients' kernels: (dq, dk, dv, dg, dqw, dkw) and whether dqw
    and dkw are summed into dq and dk."""
    delta = torch.empty(s.B, s.T, s.H, device=q.device,
                        dtype=torch.float32)
    dq = dk = dv = dg = dqw = dkw = None
    fork = None
    if cfg.capacity:  # its dq kernel writes delta
        dqw, dkw, dv, fork = _window_backward(
            s, cfg, qw, kw, v, mask, ring, position, do, output, lse,
            delta, bool(s.M) and _overlapping(q.device))
    else:
        rows = s.B * s.T * s.H
        launcher(window.row_dot_kernel)[(common.cdiv(rows, 16),)](
            do, output, delta, rows, D=s.V, BD=common.pow2(s.V), BR=16)
    merged = (False, False)
    if s.M:
        shared_q, shared_k = ctx.shared
        dq, dk, dv, dg, *merged = _slot_backward(
            s, cfg, q, k, v, g, mask, ring, position, slot_keys,
            slot_values, do, lse, delta, ctx.slot_logits,
            ctx.slot_state, dv, dqw if shared_q else None,
            dkw if shared_k else None, fork and fork.join)
        ctx.slot_state = None
    if fork:
        fork.join()
    return dq, dk, dv, dg, dqw, dkw, merged


def _new_ring(ring, tail, start, index):
    """The ring after the call: its last C history rows, `tail` holding the
    last min(C, T) new ones; `index` from `_ring_index`."""
    capacity, kept = ring.shape[1], tail.shape[1]
    last = tail.to(ring.dtype)
    if kept < capacity:
        last = torch.cat([_chronological(ring, start)[:, kept:], last], 1)
    return last.index_select(1, index)


def _ring_index(capacity, end, device):
    """Ring slot j holds the chronological row (j - end) mod C."""
    return torch.remainder(torch.arange(capacity, device=device) - end,
                           capacity)


@torch.compiler.disable
def triton_nha(query, key, value, log_forget_gate, *, window_size, scale,
               window_query, window_key, padding_mask, state, blocks=None,
               return_state=True):
    """NHA on the Triton kernels; the contract of `chunked_nha`.

    Args:
        query: `[B, T, H, K]`.
        key: `[B, T, Hkv, K]`.
        value: `[B, T, Hkv, V]`.
        log_forget_gate: `[B, T, Hkv, M]`.
        window_size: Python int W.
        scale: Python float.
        window_query: `[B, T, H, K]`.
        window_key: `[B, T, Hkv, K]`.
        padding_mask: `[B, T]` or None.
        state: the state dict (`kernels/state.py`) to start from.
        blocks: optional `common.Blocks` tile sizes (tests use small ones).
        return_state: False skips building the new state (its ring buffers
            cost ten small torch ops per call, which at short lengths the
            GPU waits for); `new_state` is then None.

    Returns:
        `(output [B, T, H, V] in the query's dtype, new_state)`.

    Example:

    >>> out, new_state = triton_nha(q, k, v, g, window_size=64, scale=0.125,
    ...     window_query=q, window_key=k, padding_mask=None, state=state)
    """
    launch.refresh()
    dtype = query.dtype
    s = _Shapes(query, key, value, log_forget_gate)
    keep = min(state["keys"].shape[1], s.T)
    capacity = state["keys"].shape[1]
    if blocks is None:
        blocks = common.default_blocks(s.K, s.V, s.M, s.T)
    cfg = _Config(window_size=window_size, capacity=capacity,
                  scale=float(scale), blocks=blocks,
                  has_mask=padding_mask is not None)

    q, k, v, qw, kw = (_prepared(x, dtype) for x in (
        query, key, value, window_query, window_key))
    g = _prepared(log_forget_gate, torch.float32)
    position = state["position"]
    if position.dtype != torch.int32 or position.dim():
        position = position.to(torch.int32).reshape(())
    mask = (_dummy(g) if padding_mask is None
            else _prepared(padding_mask, torch.float32))
    ring = {}
    for name in ("keys", "window_keys", "values"):
        ring[name] = _ring_or_dummy(_prepared(state[name], dtype, True), q)
    for name in ("log_forget_gates", "mask"):
        ring[name] = _ring_or_dummy(
            _prepared(state[name], torch.float32, True), g)
    slot_keys = _prepared(state["slot_keys"], torch.float32, True)
    slot_values = _prepared(state["slot_values"], torch.float32, True)

    tensors = (q, k, v, g, qw, kw, mask, ring["keys"], ring["window_keys"],
               ring["values"], ring["log_forget_gates"], ring["mask"],
               position, slot_keys, slot_values)
    output, final_keys, final_values = NHAFunction.apply(
        *tensors, cfg, _plan_signature(cfg, tensors, ring, k, v, g))
    if output.dtype != dtype:
        output = output.to(dtype)
    if not return_state:
        return output, None
    if padding_mask is None:
        real = torch.ones(s.B, keep, device=query.device, dtype=torch.float32)
    else:
        real = mask[:, s.T - keep:]
    start = state["position"]
    end = start + s.T
    acc = state["slot_keys"].dtype
    new_state = {
        "slot_keys": final_keys.to(acc),
        "slot_values": final_values.to(acc),
        "position": end,
    }
    tail = {name: x[:, s.T - keep:] for name, x in (
        ("keys", key), ("window_keys", window_key), ("values", value))}
    tail["log_forget_gates"] = log_forget_gate[:, s.T - keep:].to(
        torch.float32)
    if padding_mask is not None:
        tail["log_forget_gates"] = tail["log_forget_gates"] * real[
            :, :, None, None]
    tail["mask"] = real
    index = _ring_index(capacity, end, query.device) if capacity else None
    for name, rows in tail.items():
        new_state[name] = (_new_ring(state[name], rows, start, index)
                           if capacity else state[name])
    return output, new_state


def _plan_signature(cfg, tensors, ring, k, v, g):
    """What fixes the compiled kernel of every launch of a call (see
    `launch.Plan`): the tiles and sizes, each tensor argument's dtype,
    shape and 16-byte alignment (the kernels' own buffers are fresh, hence
    aligned), the int classes of the ring offsets, which inputs are shared,
    the dot precision and the device."""
    if not launch.planning():
        return ()
    offsets = tuple(_int_class(_delta(ring[name], x)) for name, x in (
        ("keys", k), ("values", v), ("log_forget_gates", g)))
    layout = tuple((t.dtype, t.shape, t.data_ptr() & 15) for t in tensors)
    return (cfg, layout, offsets, tensors[4] is tensors[0],
            tensors[5] is tensors[1], _precision(tensors[0].dtype),
            tensors[0].device)


def _plan(signature, *more):
    """`launch.Plan.of(signature + more)`; nothing without a signature
    (plans were off when the call began)."""
    if not signature:
        return contextlib.nullcontext()
    return launch.Plan.of(signature + more)


def _int_class(n):
    """How Triton specialises an int argument."""
    return n == 1, n % 16 == 0, -2 ** 31 <= n < 2 ** 31


def _prepared(x, dtype, detach=False):
    """`x` as a contiguous `dtype` tensor (no torch op when it already is)."""
    if x.dtype != dtype:
        x = x.to(dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    return x.detach() if detach and x.requires_grad else x
