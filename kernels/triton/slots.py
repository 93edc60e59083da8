"""Slot-memory kernels of NHA: chunked gated slot attention over the stream.

The slot memory is two gated linear recurrences over the stream (history rows
0 .. T-1, see `common.py`), both written with `x_i (x) s_i` (s = 1 - alpha)
and decayed per slot by alpha = exp(g):

    Sk_t = Sk_{t-1} * alpha_t + k_t (x) s_t      [K, M]  -> z_t = scale q_t Sk_t
    Sv_t = Sv_{t-1} * alpha_t + v_t (x) s_t      [V, M]  -> o_t = Sv_t p_t

(Sv is kept transposed, [V, M], so both states share one layout.) States are
stored at chunk starts (`chunk` rows); a program handles one sub-chunk of
`sub` rows: the chunk-start state, the earlier sub-chunks of its chunk through
tensor-core products factored at the sub-chunk start, and its own rows one by
one. Every exponent is a difference G_t - G_i with t >= i of the per-slot
cumulative log gate, so it is <= 0: no gate value can overflow.

Backward: with p the joint (slot | window) probabilities of the slots, dz the
gradient of the slot logits and dp_t = Sv_t^T do_t,

    dG_t = z_t dz_t + p_t dp_t - s_t (ds1_t + ds2_t)      (per slot)
    dg_t = sum_{t' >= t} dG_t' - alpha_t (ds1_t + ds2_t)

where ds1, ds2 are the gradients of the write strengths of the two
recurrences. The adjoint states run the same recurrences backwards.
"""

import triton
import triton.language as tl

from keras_nha.kernels.triton.common import plain_rows
from keras_nha.kernels.triton.common import ring_delta
from keras_nha.kernels.triton.common import stream_gates
from keras_nha.kernels.triton.common import stream_rows

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _prefix(gn, gr, pm, c0, sub0, C, pos, T, HKV,
            M: tl.constexpr, MP: tl.constexpr, BS: tl.constexpr,
            HAS_PM: tl.constexpr, FEEDS: tl.constexpr):
    """Sum of the log gates of stream rows [c0, sub0): [MP]."""
    cols = tl.arange(0, MP)
    total = tl.zeros([MP], tl.float32)
    for b0 in range(c0, sub0, BS):
        rb = b0 + tl.arange(0, BS)
        total += tl.sum(stream_gates(gn, gr, pm, rb, cols, C, pos, T, HKV, M,
                                     HAS_PM, FEEDS), 0)
    return total


@triton.jit
def _decay3d(Gloc, g, BS: tl.constexpr):
    """[t, i, m] = exp(G_t - G_i) s_i for i <= t within a sub-chunk, else 0."""
    r = tl.arange(0, BS)
    earlier = (r[None, :] <= r[:, None])[:, :, None]
    diff = tl.where(earlier, Gloc[:, None, :] - Gloc[None, :, :], 0.0)
    return tl.where(earlier, tl.exp(diff), 0.0) * (1.0 - tl.exp(g))[None, :,
                                                                      :]


@triton.jit
def _logits(Y, y_ptr, Y_ROW, rows, s_ptr, xn, xr, gn, gr, pm,
            c0, sub0, Gpre, Gloc, g, C, pos, T,
            HKV, D: tl.constexpr, M: tl.constexpr,
            BD: tl.constexpr, DT: tl.constexpr, MP: tl.constexpr,
            BS: tl.constexpr, HAS_PM: tl.constexpr, FEEDS: tl.constexpr,
            PRECISION: tl.constexpr, DIAG3D: tl.constexpr):
    """Y_t . S_t for the sub-chunk rows: [BS, MP].

    Y `[BS, BD]` (also readable at `y_ptr`, row stride Y_ROW), S_t the state
    `[D, M]` after stream row t, whose chunk-start value is at `s_ptr`.
    """
    cols = tl.arange(0, MP)
    acc = tl.zeros([BS, MP], tl.float32)
    for d0 in tl.static_range(0, BD, DT):
        d = d0 + tl.arange(0, DT)
        y = plain_rows(y_ptr, rows, d, T, Y_ROW, D)
        s = tl.load(s_ptr + d[:, None] * M + cols[None, :],
                    mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
        acc += tl.dot(y, s, input_precision=PRECISION)
    z = acc * tl.exp(Gpre[None, :] + Gloc)
    if FEEDS:
        dcols = tl.arange(0, BD)
        cross = tl.zeros([BS, MP], tl.float32)
        run = tl.zeros([MP], tl.float32)
        for b0 in range(c0, sub0, BS):
            rb = b0 + tl.arange(0, BS)
            gb = stream_gates(gn, gr, pm, rb, cols, C, pos, T, HKV, M, HAS_PM,
                              FEEDS)
            gcum = run[None, :] + tl.cumsum(gb, 0)
            run += tl.sum(gb, 0)
            u = tl.exp(Gpre[None, :] - gcum) * (1.0 - tl.exp(gb))
            xb = stream_rows(xn, xr, rb, dcols, C, pos, T, HKV, D, FEEDS)
            a = tl.dot(Y, tl.trans(xb), input_precision=PRECISION)
            cross += tl.dot(a, u, input_precision=PRECISION)
        z += cross * tl.exp(Gloc)

        xs = stream_rows(xn, xr, rows, dcols, C, pos, T, HKV, D, FEEDS)
        a = tl.dot(Y, tl.trans(xs), input_precision=PRECISION)
        if DIAG3D:
            dec = _decay3d(Gloc, g, BS)
            z += tl.sum(a[:, :, None] * dec, 1)
        else:
            r = tl.arange(0, BS)
            strength = 1.0 - tl.exp(g)
            for jj in range(BS):
                here = r[:, None] == jj
                g_j = tl.sum(tl.where(here, Gloc, 0.0), 0)
                s_j = tl.sum(tl.where(here, strength, 0.0), 0)
                dec = tl.exp(tl.minimum(Gloc - g_j[None, :], 0.0)) * s_j[
                    None, :]
                a_col = tl.sum(tl.where(r[None, :] == jj, a, 0.0), 1)
                z += tl.where(r[:, None] >= jj, a_col[:, None] * dec, 0.0)
    return z


@triton.jit
def _readout(Cf, rows, s_ptr, xn, xr, gn, gr, pm, c0, sub0, Gpre, Gloc, g,
             d0, C, pos, T, HKV, D: tl.constexpr, M: tl.constexpr,
             DT: tl.constexpr, MP: tl.constexpr, BS: tl.constexpr,
             HAS_PM: tl.constexpr, FEEDS: tl.constexpr,
             PRECISION: tl.constexpr, DIAG3D: tl.constexpr):
    """S_t c_t for the sub-chunk rows, columns d0 .. d0+DT: [BS, DT]."""
    cols = tl.arange(0, MP)
    d = d0 + tl.arange(0, DT)
    s = tl.load(s_ptr + d[:, None] * M + cols[None, :],
                mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
    out = tl.dot(Cf * tl.exp(Gpre[None, :] + Gloc), tl.trans(s),
                 input_precision=PRECISION)
    if FEEDS:
        ce = Cf * tl.exp(Gloc)
        run = tl.zeros([MP], tl.float32)
        for b0 in range(c0, sub0, BS):
            rb = b0 + tl.arange(0, BS)
            gb = stream_gates(gn, gr, pm, rb, cols, C, pos, T, HKV, M, HAS_PM,
                              FEEDS)
            gcum = run[None, :] + tl.cumsum(gb, 0)
            run += tl.sum(gb, 0)
            u = tl.exp(Gpre[None, :] - gcum) * (1.0 - tl.exp(gb))
            w = tl.dot(ce, tl.trans(u), input_precision=PRECISION)
            xb = stream_rows(xn, xr, rb, d, C, pos, T, HKV, D, FEEDS)
            out += tl.dot(w, xb, input_precision=PRECISION)

        if DIAG3D:
            wd = tl.sum(Cf[:, None, :] * _decay3d(Gloc, g, BS), 2)
        else:
            r = tl.arange(0, BS)
            wd = tl.zeros([BS, BS], tl.float32)
            strength = 1.0 - tl.exp(g)
            for jj in range(BS):
                here = r[:, None] == jj
                g_j = tl.sum(tl.where(here, Gloc, 0.0), 0)
                s_j = tl.sum(tl.where(here, strength, 0.0), 0)
                dec = tl.exp(tl.minimum(Gloc - g_j[None, :], 0.0)) * s_j[
                    None, :]
                col = tl.sum(tl.where(r[:, None] >= jj, Cf * dec, 0.0), 1)
                wd += tl.where(r[None, :] == jj, col[:, None], 0.0)
        xs = stream_rows(xn, xr, rows, d, C, pos, T, HKV, D, FEEDS)
        out += tl.dot(wd, xs, input_precision=PRECISION)
    return out


@triton.jit
def chunk_delta_kernel(XN, GN, PM, POS, S, DEC, T, C, RDX, RDG,
                       HKV, D: tl.constexpr, M: tl.constexpr,
                       DT: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                       HAS_PM: tl.constexpr, WRITE_DECAY: tl.constexpr,
                       PRECISION: tl.constexpr):
    """What chunk n adds to the state, written to S[b, hk, n + 1]:
    sum_i x_i (x) exp(G_end - G_i) s_i; and its decay exp(G_end)."""
    n = tl.program_id(0)
    bhk = tl.program_id(1)
    tile = tl.program_id(2)
    NT = tl.num_programs(0)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    pos = tl.load(POS)
    rows = n * BT + tl.arange(0, BT)
    cols = tl.arange(0, MP)
    g = stream_gates(GN + b * T * HKV * M + hk * M,
                     ring_delta(RDG, b, C, T, HKV * M), PM + b * T, rows,
                     cols, C, pos, T, HKV, M, HAS_PM, True)
    gend = tl.sum(g, 0)
    w = tl.exp(gend[None, :] - tl.cumsum(g, 0)) * (1.0 - tl.exp(g))
    d = tile * DT + tl.arange(0, DT)
    x = stream_rows(XN + b * T * HKV * D + hk * D,
                    ring_delta(RDX, b, C, T, HKV * D), rows, d, C, pos, T,
                    HKV, D, True)
    delta = tl.dot(tl.trans(x), w, input_precision=PRECISION)
    out = S + (bhk.to(tl.int64) * (NT + 1) + n + 1) * D * M
    tl.store(out + d[:, None] * M + cols[None, :], delta,
             mask=(d < D)[:, None] & (cols < M)[None, :])
    if WRITE_DECAY:
        if tile == 0:
            tl.store(DEC + (bhk.to(tl.int64) * NT + n) * M + cols,
                     tl.exp(gend), mask=cols < M)


@triton.jit
def adjoint_delta_kernel(Y, CF, GN, PM, POS, R, T, C, RDG,
                         H, HKV, D: tl.constexpr,
                         M: tl.constexpr, DT: tl.constexpr, MP: tl.constexpr,
                         BT: tl.constexpr, HAS_PM: tl.constexpr,
                         PRECISION: tl.constexpr):
    """What the reads of chunk n send back to the state before it, written to
    R[b, h, n]: sum_t y_t (x) c_t exp(G_t) (G from the chunk start)."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    NT = tl.num_programs(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    pos = tl.load(POS)
    rows = n * BT + tl.arange(0, BT)
    cols = tl.arange(0, MP)
    g = stream_gates(GN + b * T * HKV * M + hk * M,
                     ring_delta(RDG, b, C, T, HKV * M), PM + b * T, rows,
                     cols, C, pos, T, HKV, M, HAS_PM, True)
    c = plain_rows(CF + b * T * H * M + h * M, rows, cols, T, H * M, M)
    w = c * tl.exp(tl.cumsum(g, 0))
    d = tile * DT + tl.arange(0, DT)
    y = plain_rows(Y + b * T * H * D + h * D, rows, d, T, H * D, D)
    delta = tl.dot(tl.trans(y), w, input_precision=PRECISION)
    out = R + (bh.to(tl.int64) * NT + n) * D * M
    tl.store(out + d[:, None] * M + cols[None, :], delta,
             mask=(d < D)[:, None] & (cols < M)[None, :])


@triton.jit
def chunk_scan_kernel(S, DEC, NT, HX: tl.constexpr, GROUP: tl.constexpr,
                      D: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr,
                      REVERSE: tl.constexpr):
    """Turns per-chunk contributions into states, in place.

    Forward (S has NT + 1 entries, entry 0 the initial state): entry n + 1
    becomes the state after chunk n. Reverse (NT entries): entry n becomes
    the adjoint arriving at the end of chunk n from the chunks after it.
    """
    bh = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < D * M
    m = e % M
    b = bh // HX
    hk = (bh % HX) // GROUP
    dec = DEC + ((b * (HX // GROUP) + hk).to(tl.int64) * NT) * M + m
    if REVERSE:
        base = S + bh.to(tl.int64) * NT * D * M + e
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(NT):
            n = NT - 1 - i
            here = tl.load(base + n * D * M, mask=ok, other=0.0)
            tl.store(base + n * D * M, acc, mask=ok)
            acc = here + tl.load(dec + n * M, mask=ok, other=0.0) * acc
    else:
        base = S + bh.to(tl.int64) * (NT + 1) * D * M + e
        acc = tl.load(base, mask=ok, other=0.0)
        for n in range(NT):
            acc = (acc * tl.load(dec + n * M, mask=ok, other=0.0)
                   + tl.load(base + (n + 1) * D * M, mask=ok, other=0.0))
            tl.store(base + (n + 1) * D * M, acc, mask=ok)


@triton.jit
def slot_forward_kernel(Q, KN, VN, GN, PM, POS, SK, SV, OS, LS,
                        T, C, sm_scale, ns, per_chunk, RDK, RDV, RDG,
                        H, HKV, DK: tl.constexpr,
                        DV: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                        KT: tl.constexpr, VT: tl.constexpr, MP: tl.constexpr,
                        BS: tl.constexpr, BT: tl.constexpr,
                        HAS_PM: tl.constexpr, FEEDS: tl.constexpr,
                        PRECISION: tl.constexpr, DIAG3D: tl.constexpr):
    """Slot-only softmax output (fp32) and its base-2 log-sum-exp."""
    sub = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    pos = tl.load(POS)
    sub0 = sub * BS
    n = sub0 // BT
    c0 = n * BT
    rows = sub0 + tl.arange(0, BS)
    cols = tl.arange(0, MP)
    gn = GN + b * T * HKV * M + hk * M
    gr = ring_delta(RDG, b, C, T, HKV * M)
    pm = PM + b * T
    kn = KN + b * T * HKV * DK + hk * DK
    kr = ring_delta(RDK, b, C, T, HKV * DK)
    vn = VN + b * T * HKV * DV + hk * DV
    vr = ring_delta(RDV, b, C, T, HKV * DV)
    state = (b * HKV + hk) * ns + n * per_chunk

    g = stream_gates(gn, gr, pm, rows, cols, C, pos, T, HKV, M, HAS_PM, FEEDS)
    gloc = tl.cumsum(g, 0)
    gpre = _prefix(gn, gr, pm, c0, sub0, C, pos, T, HKV, M, MP, BS, HAS_PM,
                   FEEDS)
    q_ptr = Q + b * T * H * DK + h * DK
    q = plain_rows(q_ptr, rows, tl.arange(0, BK), T, H * DK, DK)
    z = sm_scale * _logits(q, q_ptr, H * DK, rows, SK + state * DK * M, kn,
                           kr, gn, gr, pm, c0, sub0, gpre, gloc, g, C, pos, T,
                           HKV, DK, M, BK, KT, MP, BS, HAS_PM, FEEDS,
                           PRECISION, DIAG3D)
    z = tl.where((cols < M)[None, :], z, float("-inf"))
    zmax = tl.max(z, 1)
    e = tl.exp2((z - zmax[:, None]) * LOG2E)
    total = tl.sum(e, 1)
    probs = e / total[:, None]
    out = _readout(probs, rows, SV + state * DV * M, vn, vr, gn, gr, pm, c0,
                   sub0, gpre, gloc, g, tile * VT, C, pos, T, HKV, DV, M, VT, MP,
                   BS, HAS_PM, FEEDS, PRECISION, DIAG3D)
    t_ok = rows < T
    row = (b * T + rows) * H + h
    d = tile * VT + tl.arange(0, VT)
    tl.store(OS + row[:, None] * DV + d[None, :], out,
             mask=t_ok[:, None] & (d < DV)[None, :])
    if tile == 0:
        tl.store(LS + row, zmax * LOG2E + tl.log2(total), mask=t_ok)


@triton.jit
def slot_dq_kernel(Q, DO, KN, VN, GN, PM, POS, SK, SV, L, DELTA,
                   DQ, DZ, P, DGR, T, C, sm_scale, ns, per_chunk, RDK, RDV,
                   RDG,
                   H, HKV, DK: tl.constexpr,
                   DV: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, KT: tl.constexpr, VT: tl.constexpr,
                   MP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
                   HAS_PM: tl.constexpr, FEEDS: tl.constexpr,
                   PRECISION: tl.constexpr, DIAG3D: tl.constexpr):
    """Backward, query side: slot probabilities p, logit gradients dz, the
    read part of dG and the slot part of dq (columns of this tile)."""
    sub = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    pos = tl.load(POS)
    sub0 = sub * BS
    n = sub0 // BT
    c0 = n * BT
    rows = sub0 + tl.arange(0, BS)
    cols = tl.arange(0, MP)
    gn = GN + b * T * HKV * M + hk * M
    gr = ring_delta(RDG, b, C, T, HKV * M)
    pm = PM + b * T
    kn = KN + b * T * HKV * DK + hk * DK
    kr = ring_delta(RDK, b, C, T, HKV * DK)
    vn = VN + b * T * HKV * DV + hk * DV
    vr = ring_delta(RDV, b, C, T, HKV * DV)
    state = (b * HKV + hk) * ns + n * per_chunk

    g = stream_gates(gn, gr, pm, rows, cols, C, pos, T, HKV, M, HAS_PM, FEEDS)
    gloc = tl.cumsum(g, 0)
    gpre = _prefix(gn, gr, pm, c0, sub0, C, pos, T, HKV, M, MP, BS, HAS_PM,
                   FEEDS)
    q_ptr = Q + b * T * H * DK + h * DK
    do_ptr = DO + b * T * H * DV + h * DV
    q = plain_rows(q_ptr, rows, tl.arange(0, BK), T, H * DK, DK)
    do = plain_rows(do_ptr, rows, tl.arange(0, BV), T, H * DV, DV)
    z = sm_scale * _logits(q, q_ptr, H * DK, rows, SK + state * DK * M, kn,
                           kr, gn, gr, pm, c0, sub0, gpre, gloc, g, C, pos, T,
                           HKV, DK, M, BK, KT, MP, BS, HAS_PM, FEEDS,
                           PRECISION, DIAG3D)
    dp = _logits(do, do_ptr, H * DV, rows, SV + state * DV * M, vn, vr, gn,
                 gr, pm, c0, sub0, gpre, gloc, g, C, pos, T, HKV, DV, M, BV, VT,
                 MP, BS, HAS_PM, FEEDS, PRECISION, DIAG3D)
    t_ok = rows < T
    row = (b * T + rows) * H + h
    lse = tl.load(L + row, mask=t_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
    ok = t_ok[:, None] & (cols < M)[None, :]
    p = tl.where(ok, tl.exp2(tl.where(ok, z * LOG2E - lse[:, None], 0.0)),
                 0.0)
    dz = p * (dp - delta[:, None])
    dq = sm_scale * _readout(dz, rows, SK + state * DK * M, kn, kr, gn, gr,
                             pm, c0, sub0, gpre, gloc, g, tile * KT, C, pos, T,
                             HKV, DK, M, KT, MP, BS, HAS_PM, FEEDS, PRECISION,
                             DIAG3D)
    d = tile * KT + tl.arange(0, KT)
    tl.store(DQ + row[:, None] * DK + d[None, :], dq,
             mask=t_ok[:, None] & (d < DK)[None, :])
    if tile == 0:
        at = row[:, None] * M + cols[None, :]
        tl.store(DZ + at, dz, mask=ok)
        tl.store(P + at, p, mask=ok)
        tl.store(DGR + at, tl.where(ok, z * dz + p * dp, 0.0), mask=ok)


@triton.jit
def slot_dx_kernel(Y, CF, XN, GN, PM, POS, R, DX, DS, T, C, y_scale, RDX,
                   RDG,
                   H, HKV, D: tl.constexpr,
                   M: tl.constexpr, BD: tl.constexpr, DT: tl.constexpr,
                   MP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
                   HAS_PM: tl.constexpr, PRECISION: tl.constexpr,
                   DIAG3D: tl.constexpr):
    """Backward, write side of one recurrence (keys: Y = q, c = dz, scaled;
    values: Y = do, c = p): per query head, the gradient of the written rows
    x_i (columns of this tile) and of their write strengths s_i."""
    sub = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    NT = tl.cdiv(T, BT)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    pos = tl.load(POS)
    sub0 = sub * BS
    n = sub0 // BT
    c0 = n * BT
    c1 = tl.minimum(c0 + BT, T)
    r = tl.arange(0, BS)
    rows = sub0 + r
    cols = tl.arange(0, MP)
    dcols = tl.arange(0, BD)
    d = tile * DT + tl.arange(0, DT)
    gn = GN + b * T * HKV * M + hk * M
    gr = ring_delta(RDG, b, C, T, HKV * M)
    pm = PM + b * T
    xn = XN + b * T * HKV * D + hk * D
    xr = ring_delta(RDX, b, C, T, HKV * D)
    y_ptr = Y + b * T * H * D + h * D
    c_ptr = CF + b * T * H * M + h * M
    r_ptr = R + (bh.to(tl.int64) * NT + n) * D * M

    g = stream_gates(gn, gr, pm, rows, cols, C, pos, T, HKV, M, HAS_PM, True)
    gloc = tl.cumsum(g, 0)
    gsub = tl.sum(g, 0)
    strength = 1.0 - tl.exp(g)
    gpre = _prefix(gn, gr, pm, c0, sub0, C, pos, T, HKV, M, MP, BS, HAS_PM,
                   True)
    gpost = _prefix(gn, gr, pm, sub0 + BS, c1, C, pos, T, HKV, M, MP, BS,
                    HAS_PM, True)
    # exp(G_end - G_i) and exp(G_e - G_i), G_e the end of this sub-chunk.
    to_end = tl.exp(gsub[None, :] - gloc + gpost[None, :])
    to_sub_end = tl.exp(gsub[None, :] - gloc)

    # Reads in later chunks, through the adjoint at the end of this chunk.
    radj = tl.load(r_ptr + d[:, None] * M + cols[None, :],
                   mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
    dx = tl.dot(to_end * strength, tl.trans(radj), input_precision=PRECISION)
    ds = tl.zeros([BS, MP], tl.float32)
    for e0 in tl.static_range(0, BD, DT):
        de = e0 + tl.arange(0, DT)
        xe = stream_rows(xn, xr, rows, de, C, pos, T, HKV, D, True)
        re = tl.load(r_ptr + de[:, None] * M + cols[None, :],
                     mask=(de < D)[:, None] & (cols < M)[None, :], other=0.0)
        ds += tl.dot(xe, re, input_precision=PRECISION)
    ds = ds * to_end

    # Reads in the later sub-chunks of this chunk.
    x = stream_rows(xn, xr, rows, dcols, C, pos, T, HKV, D, True)
    v_i = to_sub_end * strength
    run = tl.zeros([MP], tl.float32)
    for b0 in range(sub0 + BS, c1, BS):
        rb = b0 + r
        gb = stream_gates(gn, gr, pm, rb, cols, C, pos, T, HKV, M, HAS_PM,
                          True)
        y_b = plain_rows(c_ptr, rb, cols, T, H * M, M) * tl.exp(
            run[None, :] + tl.cumsum(gb, 0))
        run += tl.sum(gb, 0)
        coef = tl.dot(v_i, tl.trans(y_b), input_precision=PRECISION)
        dx += tl.dot(coef, plain_rows(y_ptr, rb, d, T, H * D, D),
                     input_precision=PRECISION)
        ax = tl.dot(x, tl.trans(plain_rows(y_ptr, rb, dcols, T, H * D, D)),
                    input_precision=PRECISION)
        ds += to_sub_end * tl.dot(ax, y_b, input_precision=PRECISION)

    # Reads in this sub-chunk (t >= i), row by row.
    ys = plain_rows(y_ptr, rows, dcols, T, H * D, D)
    ax = tl.dot(x, tl.trans(ys), input_precision=PRECISION)
    cs = plain_rows(c_ptr, rows, cols, T, H * M, M)
    if DIAG3D:
        # [i, t, m] = c_t exp(G_t - G_i) for t >= i.
        later = (r[None, :] >= r[:, None])[:, :, None]
        diff = tl.where(later, gloc[None, :, :] - gloc[:, None, :], 0.0)
        e3 = tl.where(later, tl.exp(diff), 0.0) * cs[None, :, :]
        wd = tl.sum(e3 * strength[:, None, :], 2)
        ds += tl.sum(ax[:, :, None] * e3, 1)
    else:
        wd = tl.zeros([BS, BS], tl.float32)
        for jj in range(BS):
            here = r[:, None] == jj
            g_t = tl.sum(tl.where(here, gloc, 0.0), 0)
            c_t = tl.sum(tl.where(here, cs, 0.0), 0)
            earlier = r[:, None] <= jj
            e = tl.where(earlier, c_t[None, :] * tl.exp(
                tl.minimum(g_t[None, :] - gloc, 0.0)), 0.0)
            col = tl.sum(e * strength, 1)
            wd += tl.where(r[None, :] == jj, col[:, None], 0.0)
            a_col = tl.sum(tl.where(r[None, :] == jj, ax, 0.0), 1)
            ds += a_col[:, None] * e
    dx += tl.dot(wd, plain_rows(y_ptr, rows, d, T, H * D, D),
                 input_precision=PRECISION)

    t_ok = rows < T
    row = (b * T + rows) * H + h
    tl.store(DX + row[:, None] * D + d[None, :], dx * y_scale,
             mask=t_ok[:, None] & (d < D)[None, :])
    if tile == 0:
        tl.store(DS + row[:, None] * M + cols[None, :], ds * y_scale,
                 mask=t_ok[:, None] & (cols < M)[None, :])
