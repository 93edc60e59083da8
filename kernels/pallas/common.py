"""Small helpers shared by the Pallas NHA kernels."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite, so that a row whose every logit is masked stays finite.
MASKED = -1e30


def compiler_params(num_warps=4, num_stages=2):
    """Triton compiler parameters under either of their historical names."""
    from jax.experimental.pallas import triton as plgpu
    params = getattr(plgpu, "CompilerParams", None) or getattr(
        plgpu, "TritonCompilerParams")
    return params(num_warps=num_warps, num_stages=num_stages)


def on_gpu():
    return jax.default_backend() == "gpu"


def padded_size(n, minimum=16):
    """Triton blocks need power-of-two sizes of at least 16."""
    return max(minimum, pl.next_power_of_2(n))


def pad_axis(x, axis, size):
    """Zero pads `x` along `axis` up to `size` (no copy when already there)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def dot(a, b, *, trans_b=False):
    """Matrix product with float32 accumulation (full precision for f32)."""
    precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
                 and b.dtype == jnp.float32 else None)
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision,
                           preferred_element_type=jnp.float32)


def dot_ta(a, b):
    """`a.T @ b` with float32 accumulation."""
    precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
                 and b.dtype == jnp.float32 else None)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static tiling of one call (hashable: it is a `custom_vjp` static arg).

    Attributes:
        block_q: query rows per window program.
        block_k: history rows per window loop step.
        dq_blocks: `(query rows, history rows)` of the window dq kernel;
            None: `(block_q, block_k)`.
        dkv_blocks: the same for the window dk/dv kernel (query rows per
            loop step, history rows per program).
        chunk: tokens per slot chunk (slot states are stored at chunk starts).
        sub: rows of one slot sub-block (a divisor of `chunk`, at least
            16): the unit of the exact in-block terms.
        rows: rows per slot reader program, a multiple of `sub` dividing
            `chunk`, capped at `chunk` (a whole chunk per program loads the
            chunk's state once for all its sub-blocks).
        tile: state columns per program of the sequential slot kernels.
        num_warps: Triton warps per program.
        dkv_warps: warps of the slot dk/dv/ds kernel (0: `num_warps`).
        reader_warps: warps of the slot reader and dq kernels (0:
            `num_warps`).
        window_warps: warps of the window kernels (0: `num_warps`).
        num_stages: Triton software-pipelining stages.
        sequential_stages: pipelining stages of the chunk-walking kernels.
        diag: how slot programs add the writers of their own 16 rows:
            "tensor" (a `[16, 16, M]` tensor, no loop) or "loop".
        factor: whether chunk-wide slot programs (`rows == chunk`) use
            factored in-chunk products (a few matrix products per chunk)
            in chunks whose gates allow them without overflow, falling back
            to the exact sub-block terms elsewhere.
        walk: how the slot memory is carried from chunk to chunk: "loop"
            (one kernel computes each chunk's writes inside the sequential
            walk), "scan" (every chunk's writes at once as batched
            matrix products, then a walk that only scales and adds) or
            "fused" (segmented walks computing the chunk writes,
            `chunk_states.py`).
        state_tiles: with `walk="fused"`, programs per segment and kv
            head (tiles of the key memory's rows and the value memory's
            columns).
        segment: with `walk="scan"` or "fused", chunks per segment of
            the scan; 0 picks it from the chunk count.
        narrow_writes: with `walk="scan"`, store each chunk's batched
            writes in the input dtype instead of float32 (the scan reads
            them twice; the carry stays float32).
        narrow_slot_out: store the slot readers' normalised output in the
            input dtype (it seeds the window pass's float32 accumulator)
            instead of float32.
        narrow_probs: store the slot dq kernel's dz and p (read by the
            adjoint walk and the dk/dv kernel) in the input dtype.
        split_dkv: the slot dk/dv/ds kernel as two kernels, one for the
            keys' side (dk and its part of ds), one for the values'.
        gate_kernels: the slot pass's gate cumsums and gate gradient as
            Pallas kernels (`gates.py`) instead of XLA products.
        exact_pass: with factored products, the slot reader, dq and
            dk/dv kernels as two calls each: the factored products alone
            (chunks whose gates allow them), then the exact terms alone
            (the other chunks), instead of one kernel holding both.
        fast_chunks: with `exact_pass`, chunks per program of the call
            with the factored products (a loop: the next chunk's loads can
            overlap this one's products).
        window_interior: the window kernels walk the history blocks
            inside every query row's window in a loop of their own, which
            applies only the key mask (no window bounds per element).
        split_history: the window kernels read the state's ring and the
            new tokens as two parts (`window.py`) instead of one
            concatenated copy of both.
        fed_lag: rows by which the slots' fed stream lags the keys and
            values the slot kernels are given (a fresh sequence: fed row t
            is token t - fed_lag, read in place; earlier rows carry no
            writes, their gates are 0). A multiple of the chunk (times
            `fast_chunks`); set per call by `sequence.py`, 0: the keys
            and values are the fed stream itself.
        fed_length: with `fed_lag`, nonzero when the gate kernels read
            the new tokens' log gates in place too, `fed_lag` rows
            behind: fed rows before `fed_lag` and from `fed_length` (T)
            on get gate 0 inside the kernels. 0: the gates are the fed
            stream itself (a delayed, masked copy).
        gates_in_place: whether `sequence.py` lets the gate kernels read
            a fresh sequence's gates in place (`fed_length`).
        grads_into_window: with `fed_lag` (whole window dk/dv blocks),
            the window's gradient kernels add the slots' gradients of the
            arrays both read (dv always; dk with `shared_key`, dq with
            `shared_query`) to their own, instead of XLA adding them
            afterwards.
        shared_query, shared_key: the window reads the slots' queries /
            keys themselves (no separate window_query / window_key; set
            per call by `sequence.py`).
        interpret: run the kernels in Pallas' interpreter (CPU).
    """

    block_q: int = 64
    block_k: int = 64
    dq_blocks: tuple = None
    dkv_blocks: tuple = None
    chunk: int = 64
    sub: int = 16
    rows: int = 16
    tile: int = 32
    num_warps: int = 4
    dkv_warps: int = 0
    reader_warps: int = 0
    window_warps: int = 0
    num_stages: int = 2
    sequential_stages: int = 1
    diag: str = "tensor"
    walk: str = "loop"
    factor: bool = False
    segment: int = 0
    state_tiles: int = 2
    narrow_writes: bool = False
    narrow_slot_out: bool = False
    narrow_probs: bool = False
    split_dkv: bool = False
    gate_kernels: bool = False
    exact_pass: bool = False
    fast_chunks: int = 1
    split_history: bool = False
    window_interior: bool = False
    fed_lag: int = 0
    fed_length: int = 0
    gates_in_place: bool = True
    grads_into_window: bool = False
    shared_query: bool = False
    shared_key: bool = False
    interpret: bool = False


def window_blocks(config):
    """Every `(query rows, history rows)` tiling the window kernels use."""
    forward = (config.block_q, config.block_k)
    return (forward, config.dq_blocks or forward,
            config.dkv_blocks or forward)


def idiv(a, b):
    """Integer division inside kernels, int32 also under `jax_enable_x64`."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def irange(n):
    return jnp.arange(n, dtype=jnp.int32)


def loop(lower, upper, body, carry):
    """`lax.fori_loop` with an int32 counter, also under `jax_enable_x64`."""
    return lax.fori_loop(jnp.asarray(lower, jnp.int32),
                         jnp.asarray(upper, jnp.int32), body, carry)
