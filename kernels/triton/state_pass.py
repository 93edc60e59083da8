"""Chunk-start slot states and adjoints in one sequential pass per tile.

The alternative to `prep_kernel` + `chunk_scan_kernel` (`Blocks.sequential`):
one program per (state sequence, column tile, recurrence) walks the chunks
in order, keeps its [DT, M] tile of the state in fp32 registers and stores
each chunk-start state once. The prep-and-scan route writes every chunk's
contribution, reads it back, scans and writes the states again, and each
scan step waits on a log-depth scan; here a chunk costs one tile of loads
(independent of the carry, so the loop pipelines them), one small matrix
product and one store.

Forward: S_{n+1} = S_n * exp(g_end) + sum_i x_i (x) exp(g_end - G_i) s_i.
Reverse (adjoints): R_n = V_{n+1}; V_n = V_{n+1} * exp(g_end_n) +
sum_t y_t (x) c_t exp(G_t), V_NT = 0 (the same maps as the scans). The gate
gradient's reverse sum over the stream is a third such pass (one launch
instead of chunk totals, a scan and a write-out). Fewer launches matter at
short lengths, where the CPU's launch time is what the GPU waits for.
"""

import triton
import triton.language as tl

from keras_nha.kernels.triton.common import plain_rows
from keras_nha.kernels.triton.common import ring_delta
from keras_nha.kernels.triton.common import stream_gates
from keras_nha.kernels.triton.common import stream_rows


@triton.jit
def _initial(INIT, seq, d, cols, ok, ROW, COL):
    """A tile of the input state (fp32) in its own layout: [D, M] keys
    (ROW = M, COL = 1) or [M, D] values (ROW = 1, COL = D)."""
    at = seq + d[:, None] * ROW + cols[None, :] * COL
    return tl.load(INIT + at, mask=ok, other=0.0).to(tl.float32), at


@triton.jit
def _forward_states(XN, RDX, S, INIT, FINAL, XN2, RDX2, S2, INIT2, FINAL2,
                    GN, RDG, PM, GC, SS, DEC, b, hk, bhk, pos, d, T, C, NT,
                    HKV, INIT_ROW, INIT_COL, D: tl.constexpr,
                    M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                    HAS_PM: tl.constexpr, WRITE_GATES: tl.constexpr,
                    BOTH: tl.constexpr, PRECISION: tl.constexpr):
    """One recurrence's column tile `d`: entries 0 .. NT of S and FINAL;
    with BOTH also the value recurrence (XN2 into S2, INIT2 [M, D] to
    FINAL2), sharing the gate work."""
    cols = tl.arange(0, MP)
    ok = (d < D)[:, None] & (cols < M)[None, :]
    # The slot columns whose G, s this tile writes (WRITE_GATES).
    mine = cols * tl.num_programs(1) // MP == tl.program_id(1)
    seq = bhk.to(tl.int64) * D * M
    carry, init = _initial(INIT, seq, d, cols, ok, INIT_ROW, INIT_COL)
    if BOTH:
        carry2, init2 = _initial(INIT2, seq, d, cols, ok, 1, D)
    else:
        carry2, init2 = carry, init
    entry = bhk.to(tl.int64) * (NT + 1) * D * M
    tile = d[:, None] * M + cols[None, :]
    tl.store(S + entry + tile, carry.to(S.dtype.element_ty), mask=ok)
    if BOTH:
        tl.store(S2 + entry + tile, carry2.to(S2.dtype.element_ty), mask=ok)
    gn = GN + b * T * HKV * M + hk * M
    g_delta = ring_delta(RDG, b, C, T, HKV * M)
    for n in range(NT):
        rows = n * BT + tl.arange(0, BT)
        g = stream_gates(gn, g_delta, PM + b * T, rows, cols, C, pos, T,
                         HKV, M, HAS_PM, True)
        G = tl.cumsum(g, 0)
        gend = tl.sum(g, 0)
        strength = 1.0 - tl.exp(g)
        w = tl.exp(gend[None, :] - G) * strength
        decay = tl.exp(gend)[None, :]
        at = entry + (n + 1) * (D * M) + tile
        carry = _advance(XN, RDX, S, carry, decay, w, b, hk, rows, d, at, ok,
                         C, pos, T, HKV, D, PRECISION)
        if BOTH:
            carry2 = _advance(XN2, RDX2, S2, carry2, decay, w, b, hk, rows, d,
                              at, ok, C, pos, T, HKV, D, PRECISION)
        if WRITE_GATES:  # each column tile writes its share of the slots
            gat = (b * T + rows.to(tl.int64))[:, None] * (HKV * M) + (
                hk * M + cols[None, :])
            live = (rows < T)[:, None] & (mine & (cols < M))[None, :]
            tl.store(GC + gat, G, mask=live)
            tl.store(SS + gat, strength, mask=live)
            tl.store(DEC + (bhk.to(tl.int64) * NT + n) * M + cols,
                     tl.exp(gend), mask=mine & (cols < M))
    tl.store(FINAL + init, carry, mask=ok)
    if BOTH:
        tl.store(FINAL2 + init2, carry2, mask=ok)


@triton.jit
def _advance(XN, RDX, S, carry, decay, w, b, hk, rows, d, at, ok, C, pos, T,
             HKV, D: tl.constexpr, PRECISION: tl.constexpr):
    """carry * decay + what the chunk's rows write (x^T w), stored at `at`."""
    x = stream_rows(XN + b * T * HKV * D + hk * D,
                    ring_delta(RDX, b, C, T, HKV * D), rows, d, C, pos, T,
                    HKV, D, True)
    carry = carry * decay + tl.dot(tl.trans(x), w, input_precision=PRECISION)
    tl.store(S + at, carry.to(S.dtype.element_ty), mask=ok)
    return carry


@triton.jit
def state_pass_kernel(XN, XN2, GN, PM, POS, GC, SS, S, S2, DEC, INIT_K,
                      INIT_V, FINAL_K, FINAL_V, T, C, NT, RDX, RDX2, RDG, HKV,
                      D: tl.constexpr, M: tl.constexpr, DT: tl.constexpr,
                      MP: tl.constexpr, BT: tl.constexpr,
                      HAS_PM: tl.constexpr, FIRST: tl.constexpr,
                      WRITE_GATES: tl.constexpr, BOTH: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Chunk-start states, column tile program_id(1): recurrence FIRST +
    program_id(2) (0: the keys XN into S, from INIT_K [D, M] per sequence
    to FINAL_K; 1: the values XN2 into S2, from INIT_V [M, D] to FINAL_V,
    same width D), or with BOTH both in one program (the gate work shared).
    With WRITE_GATES the key tiles also write the stream's G, s (GC, SS)
    and chunk decays (DEC), each tile a share of the slots (no program
    carries all of that extra work)."""
    bhk = tl.program_id(0)
    d = tl.program_id(1) * DT + tl.arange(0, DT)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    pos = tl.load(POS)
    if FIRST + tl.program_id(2) == 0:
        _forward_states(XN, RDX, S, INIT_K, FINAL_K, XN2, RDX2, S2, INIT_V,
                        FINAL_V, GN, RDG, PM, GC, SS, DEC, b, hk, bhk, pos, d,
                        T, C, NT, HKV, M, 1, D, M, MP, BT, HAS_PM,
                        WRITE_GATES, BOTH, PRECISION)
    else:
        _forward_states(XN2, RDX2, S2, INIT_V, FINAL_V, XN2, RDX2, S2,
                        INIT_V, FINAL_V, GN, RDG, PM, GC, SS, DEC, b, hk, bhk,
                        pos, d, T, C, NT, HKV, 1, D, D, M, MP, BT, HAS_PM,
                        False, False, PRECISION)


@triton.jit
def _reverse_adjoints(Y, CF, R, GC, DEC, b, h, hk, bh, d, T, NT, H, HKV,
                      D: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                      BT: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.arange(0, MP)
    ok = (d < D)[:, None] & (cols < M)[None, :]
    tile = d[:, None] * M + cols[None, :]
    base = R + bh.to(tl.int64) * NT * D * M
    dec = DEC + (b * HKV + hk) * NT * M
    gc = GC + b * T * HKV * M + hk * M
    cf = CF + b * T * H * M + h * M
    y_ptr = Y + b * T * H * D + h * D
    carry = tl.zeros([d.shape[0], MP], tl.float32)
    for i in range(NT):
        n = NT - 1 - i
        tl.store(base + n * (D * M) + tile,
                 carry.to(R.dtype.element_ty), mask=ok)
        rows = n * BT + tl.arange(0, BT)
        decay = tl.exp(plain_rows(gc, rows, cols, T, HKV * M, M))
        c = plain_rows(cf, rows, cols, T, H * M, M)
        y = plain_rows(y_ptr, rows, d, T, H * D, D)
        added = tl.dot(tl.trans(y), c * decay, input_precision=PRECISION)
        chunk = tl.load(dec + n * M + cols, mask=cols < M, other=1.0)
        carry = carry * chunk[None, :] + added


@triton.jit
def adjoint_pass_kernel(Y, CF, Y2, CF2, GC, DEC, R, R2, T, NT, H, HKV,
                        D: tl.constexpr, M: tl.constexpr, DT: tl.constexpr,
                        MP: tl.constexpr, BT: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Adjoint states arriving at the end of each chunk (R[b, h, n], per
    query head) of the reads (Y, CF); programs with program_id(2) == 1 do
    (Y2, CF2) into R2 (the other recurrence, same width D)."""
    bh = tl.program_id(0)
    d = tl.program_id(1) * DT + tl.arange(0, DT)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    if tl.program_id(2) == 0:
        _reverse_adjoints(Y, CF, R, GC, DEC, b, h, hk, bh, d, T, NT, H, HKV,
                          D, M, MP, BT, PRECISION)
    else:
        _reverse_adjoints(Y2, CF2, R2, GC, DEC, b, h, hk, bh, d, T, NT, H,
                          HKV, D, M, MP, BT, PRECISION)


@triton.jit
def gate_grad_pass_kernel(DGR, DS, SS, PM, DG, T, C, NT, H, HKV,
                          M: tl.constexpr, MT: tl.constexpr,
                          BT: tl.constexpr, HAS_PM: tl.constexpr):
    """dg of the stream rows, sum_{t' >= t} dG_t' - alpha_t ds_t with dG =
    z dz + p dp - s ds summed over the group's query heads, chunks walked
    backwards with the sum over later chunks carried (slot columns
    program_id(1) * MT ...); written to the new token each row came from
    (row C + u is token u), masked."""
    bhk = tl.program_id(0)
    cols = tl.program_id(1) * MT + tl.arange(0, MT)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    G = H // HKV
    ss = SS + b * T * HKV * M + hk * M
    carry = tl.zeros([MT], tl.float32)
    for i in range(NT):
        rows = (NT - 1 - i) * BT + tl.arange(0, BT)
        s = plain_rows(ss, rows, cols, T, HKV * M, M)
        total = tl.zeros([BT, MT], tl.float32)
        ds = tl.zeros([BT, MT], tl.float32)
        for g in range(G):
            h = hk * G + g
            ds_h = plain_rows(DS + b * T * H * M + h * M, rows, cols, T,
                              H * M, M)
            total += plain_rows(DGR + b * T * H * M + h * M, rows, cols, T,
                                H * M, M) - s * ds_h
            ds += ds_h
        dg = tl.cumsum(total, 0, reverse=True) + carry[None, :] - (
            1.0 - s) * ds
        carry += tl.sum(total, 0)
        u = rows - C
        ok = ((u >= 0) & (rows < T))[:, None] & (cols < M)[None, :]
        if HAS_PM:
            real = tl.load(PM + b * T + u, mask=(u >= 0) & (rows < T),
                           other=0.0)
            dg = dg * real[:, None]
        tl.store(DG + (b * T + u.to(tl.int64))[:, None] * (HKV * M)
                 + hk * M + cols[None, :], dg, mask=ok)
