"""Shared pieces of the NHA Triton kernels: block sizes and history indexing.

Every kernel works in "history" coordinates: the window ring of the state
(oldest first) followed by the T new tokens. History row j < C is ring entry
`(position + j) % C`; row j >= C is new token j - C. New token t is history
row C + t. With a capacity C equal to the window W, history row t is also the
token that leaves the window (and enters the slots) at step t, so the slot
memory is plain gated slot attention over history rows 0 .. T-1 (the
"stream"). Nothing is concatenated in memory: the kernels address the ring
relative to the new-token tensor (`ring_delta`) and pick each row's source by
its index.
"""

import dataclasses
import functools
import os

import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it is imported, so it is read once here
# too (host code asks per launch: an environment lookup each time adds up).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting():
    """True when Triton runs kernels on the CPU interpreter."""
    return _INTERPRETING


def pow2(n, least=16):
    """The power of two >= max(n, least): register tiles need such sizes.
    Plain Python: `triton.next_power_of_2` unwraps constexprs per call."""
    return max(least, 1 << (max(int(n), 1) - 1).bit_length())


def cdiv(a, b):
    """ceil(a / b) for host-side grids (plain Python, see `pow2`)."""
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes. `chunk` rows share one stored slot state and form one
    program of the slot kernels (tl.dot needs >= 16)."""

    chunk: int = 64
    query: int = 64
    key: int = 64
    query_bwd: int = 64
    key_bwd: int = 64
    warps: int = 4
    window_warps: int = 4
    stages: int = 2
    # The window dk/dv kernel's query and key blocks and warps (0: as
    # query_bwd, key_bwd, window_warps).
    dkdv_query: int = 0
    dkdv_key: int = 0
    dkdv_warps: int = 0
    # Warps of the window dq kernel (0: window_warps).
    dq_warps: int = 0
    # 1: the slot output and the slot part of dq in their own kernel
    # (`slot_readout_kernel`: two lighter programs instead of one).
    split: int = 0
    # 1: ds and dx of each recurrence in one kernel even when split (each
    # adjoint tile read once instead of twice).
    fused_dx: int = 0
    # Register cap of the slot kernels (0: none).
    slot_regs: int = 0
    # Chunk scans: state elements per program, chunks per scan step, warps.
    # The scan runs along the chunk axis of a [scan_unroll, scan] tile: it
    # stays in each thread's registers only when `scan` spans every thread
    # of every warp (scan = scan_warps x 32 x 8 for bf16 states, x 4 for
    # fp32); else it crosses warps through shared memory. 0: that size.
    scan: int = 256
    scan_unroll: int = 16
    scan_warps: int = 4
    # The gates' reverse sum over chunks (M elements per sequence): chunks
    # per step (0: scan_unroll) and warps.
    gate_scan_unroll: int = 0
    gate_scan_warps: int = 4
    # 1: the scans walk the chunks one by one per thread (no log-depth
    # scan across threads); `scan_unroll` then does not matter.
    scan_walk: int = 0
    # 1: with bfloat16 inputs the chunk-start states and the adjoints are
    # stored in bfloat16 (half the traffic; read on bf16 tensor cores). The
    # scans still carry fp32 and the returned state is fp32. 2: also with
    # float32 inputs (tests only: exercises the path on the interpreter).
    # 3: bfloat16 adjoints only (the forward's states stay fp32).
    low_states: int = 0
    # 1: chunk-start states and adjoints by one sequential pass per column
    # tile of `state_tile` state rows (`state_pass.py`) instead of prep
    # kernels and scans.
    sequential: int = 0
    state_tile: int = 32
    state_warps: int = 4
    state_stages: int = 2
    # 1: one program per column tile runs both recurrences (K == V).
    state_both: int = 0
    # 1: with 16-bit inputs the slot-only output (written by the slot
    # readout, read by the window kernel as its starting point) is stored in
    # the input's dtype, not fp32 (2: bfloat16 for any input; tests).
    low_slot_out: int = 0
    # The same for the backward's slot probabilities and logit gradients
    # (each read by three or four kernels).
    low_slot_grads: int = 0
    # Sequences of at most this many chunks take the few-launch backward:
    # ds and dx in one kernel per recurrence (`fused_dx`) and the gate
    # gradient in one sequential pass instead of three launches (short
    # sequences are bound by the CPU's launch time, not the GPU).
    short_chunks: int = 0
    # 0: short sequences keep the three-launch gate gradient (fused dx only).
    short_gates: int = 1


# The interpreter walks every program in Python: small tiles keep it quick
# and make the multi-block paths run at small test sizes.
INTERPRETER_BLOCKS = Blocks(chunk=32, query=16, key=16, query_bwd=16,
                            key_bwd=16, warps=1, window_warps=1, stages=1,
                            split=1)


# Sequences up to this long take the short tiles (`_blocks`).
SHORT_LENGTH = 4096


def default_blocks(key_dim, value_dim, num_slots, length=None):
    """Tile sizes for a call of `length` tokens;
    KERAS_NHA_TRITON_BLOCKS="query=64,stages=3" overrides fields (for
    tuning runs)."""
    return _blocks(max(key_dim, value_dim) > 128,
                   os.environ.get("KERAS_NHA_TRITON_BLOCKS", ""),
                   length is not None and length <= SHORT_LENGTH)


@functools.lru_cache(maxsize=64)
def _blocks(wide, override, short=False):
    if interpreting():
        blocks = INTERPRETER_BLOCKS
    elif wide:
        blocks = Blocks(chunk=64, query=64, key=32, query_bwd=32, key_bwd=32,
                        warps=8, window_warps=4, stages=2, split=1)
    else:
        # Measured on an H200 (benchmarks/TRITON_NOTES.md): small window
        # tiles on 4 warps, dk/dv over 128-key blocks on 8 warps and split
        # slot kernels on 4 warps beat the previous tiles by 25% at T=16384;
        # bf16 chunk states with 32 chunks per scan step took 3% off at 64k.
        # Session 5 (s5r1): chunk-scan programs of 1024 bf16 elements, 8
        # chunks a step (the scan stays in registers: states and adjoints
        # 3.91 -> 2.48 ms at 64k), and the slot-only output in bf16 (-0.16
        # ms). bf16 probabilities and logit gradients (low_slot_grads) saved
        # 0.13 ms more but raised the gate gradient's error from 1.6e-2 to
        # 5.4e-2 at T=16384: off. Up to 64 chunks (T <= 4096, where the CPU
        # is the bound) ds and dx in one kernel per recurrence: two launches
        # fewer, same GPU time at 4096 (the sequential gate pass cost 0.1 ms
        # of GPU there: off).
        blocks = Blocks(chunk=64, query=64, key=32, query_bwd=64,
                        key_bwd=32, dkdv_query=32, dkdv_key=128,
                        dkdv_warps=8, warps=4, window_warps=4, stages=2,
                        split=1, low_states=1, scan=0, scan_unroll=8,
                        gate_scan_unroll=32, low_slot_out=1,
                        short_chunks=64, short_gates=0)
        if short:
            # s6r1 at T=4096 (CUDA graph, fwd+bwd): dk/dv over 64-key
            # blocks on 4 warps 0.973 ms vs 0.994 (1024 smaller programs
            # fill the 132 SMs better than 512; bit-identical results).
            blocks = dataclasses.replace(blocks, dkdv_key=64, dkdv_warps=4)
    if override:
        fields = dict(item.split("=") for item in override.split(","))
        blocks = dataclasses.replace(
            blocks, **{k: int(v) for k, v in fields.items()})
    return blocks


@triton.jit
def ring_delta(RD, b, C, T, ROW):
    """Offset (elements) of batch row b's ring from its new-token rows.

    RD is `ring.data_ptr() - new.data_ptr()` in elements (same dtype, one
    flat address space); the ring holds C rows of ROW elements per batch row,
    the new tensor T.
    """
    return RD + b.to(tl.int64) * (C - T) * ROW


@triton.jit
def history_offsets(rows, C, pos, delta, ROW):
    """Element offsets of history rows `rows` from the new-token tensor's
    (batch, head) start; `delta` from `ring_delta`. One base pointer keeps the
    address arithmetic as cheap as for a single tensor."""
    ring_row = (pos + rows) % tl.maximum(C, 1)
    return tl.where(rows < C, delta + ring_row.to(tl.int64) * ROW,
                    (rows - C).to(tl.int64) * ROW)


@triton.jit
def stream_gates(gn_ptr, g_delta, pm_ptr, rows, cols, C, pos, T,
                 HKV, M: tl.constexpr, HAS_PM: tl.constexpr,
                 FEEDS: tl.constexpr):
    """Log gates [len(rows), len(cols)] (fp32) of stream rows, 0 where nothing
    enters the slots (padding, rows >= T, padded slot columns, no feed).

    Ring gates are stored already masked; new gates are multiplied by the
    padding mask here.
    """
    if FEEDS:
        ok = (rows >= 0) & (rows < T)
        at = history_offsets(rows, C, pos, g_delta, HKV * M)
        g = tl.load(gn_ptr + at[:, None] + cols[None, :],
                    mask=ok[:, None] & (cols < M)[None, :],
                    other=0.0).to(tl.float32)
        if HAS_PM:
            real = tl.load(pm_ptr + (rows - C), mask=ok & (rows >= C),
                           other=1.0)
            g = g * real[:, None]
        return g
    else:
        return tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)


@triton.jit
def stream_rows(xn_ptr, x_delta, rows, cols, C, pos, T, HKV,
                D: tl.constexpr, FEEDS: tl.constexpr,
                RAW: tl.constexpr = False):
    """Key-side rows [len(rows), len(cols)] of the slot stream (fp32, or the
    tensor's own dtype with RAW)."""
    if FEEDS:
        ok = (rows >= 0) & (rows < T)
        at = history_offsets(rows, C, pos, x_delta, HKV * D)
        x = tl.load(xn_ptr + at[:, None] + cols[None, :],
                    mask=ok[:, None] & (cols < D)[None, :], other=0.0)
        if RAW:
            return x
        else:
            return x.to(tl.float32)
    else:
        return tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)


@triton.jit
def plain_rows(ptr, rows, cols, T, ROW, D: tl.constexpr,
               RAW: tl.constexpr = False):
    """Rows [len(rows), len(cols)] of a `[T, ROW]`-strided tensor (fp32, or
    the tensor's own dtype with RAW)."""
    ok = (rows >= 0) & (rows < T)
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * ROW + cols[None, :],
                mask=ok[:, None] & (cols < D)[None, :], other=0.0)
    if RAW:
        return x
    else:
        return x.to(tl.float32)
