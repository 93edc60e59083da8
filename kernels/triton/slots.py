"""Slot-memory kernels of NHA: chunked gated slot attention over the stream.

The slot memory is two gated linear recurrences over the stream (history rows
0 .. T-1, see `common.py`), both written with `x_i (x) s_i` (s = 1 - alpha)
and decayed per slot by alpha = exp(g):

    Sk_t = Sk_{t-1} * alpha_t + k_t (x) s_t    [K, M] -> z_t = scale q_t Sk_t
    Sv_t = Sv_{t-1} * alpha_t + v_t (x) s_t    [V, M] -> o_t = Sv_t p_t

(Sv is kept transposed, [V, M], so both states share one layout.) A prep
pass writes the in-chunk cumulative log gates G and the strengths s of every
stream row, and what each chunk adds to the states; a scan turns those into
chunk-start states. One program then handles one chunk of rows and one query
head: the chunk-start state plus the pairs (t, i) inside the chunk, whose
weight is exp(G_t - G_i) s_i.

Inside a chunk the pair weights factor as exp(G_t) * exp(-G_i) s_i, so the
in-chunk terms are plain matrix products -- when that cannot overflow (every
|G| of the chunk below SAFE_LOG, the usual case with tau-scaled gates). A
chunk with stronger decay takes the exact path: offset by offset, every
exponent G_t - G_i <= 0. No gate value can overflow either path.

Backward: with p the joint (slot | window) probabilities of the slots, dz the
gradient of the slot logits and dp_t = Sv_t^T do_t,

    dG_t = z_t dz_t + p_t dp_t - s_t (ds1_t + ds2_t)      (per slot)
    dg_t = sum_{t' >= t} dG_t' - alpha_t (ds1_t + ds2_t)

where ds1, ds2 are the gradients of the write strengths of the two
recurrences. The adjoint states run the same recurrences backwards.
"""

import triton
import triton.language as tl

from keras_nha.kernels.triton.common import interpreting
from keras_nha.kernels.triton.common import plain_rows
from keras_nha.kernels.triton.common import ring_delta
from keras_nha.kernels.triton.common import stream_gates
from keras_nha.kernels.triton.common import stream_rows

LOG2E = tl.constexpr(1.4426950408889634)
INTERPRETED = tl.constexpr(interpreting())
# exp(60) ~ 1e26: products of such factors with O(1) terms stay far from the
# float32 limit (~3e38) and keep full relative precision.
SAFE_LOG = tl.constexpr(60.0)


@triton.jit
def _state_dot(a, st, PRECISION: tl.constexpr):
    """a @ st for a tile `st` of a chunk state or adjoint: fp32 ones in
    `PRECISION`, bfloat16 ones on bf16 tensor cores (fp32 accumulation)."""
    if st.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), st, input_precision=PRECISION)
    elif INTERPRETED:  # its bf16 dot is wrong; bf16 products are exact fp32
        return tl.dot(a.to(st.dtype).to(tl.float32), st.to(tl.float32),
                      input_precision="ieee")
    else:
        return tl.dot(a.to(st.dtype), st)


@triton.jit
def _gates(GC, SS, rows, cols, T, HKV, M: tl.constexpr):
    """In-chunk cumulative log gates G and strengths s of stream rows (the
    (batch, kv head) start already applied); 0 outside [0, T)."""
    ok = ((rows >= 0) & (rows < T))[:, None] & (cols < M)[None, :]
    at = rows.to(tl.int64)[:, None] * (HKV * M) + cols[None, :]
    return (tl.load(GC + at, mask=ok, other=0.0),
            tl.load(SS + at, mask=ok, other=0.0))


@triton.jit
def _safe(G):
    return tl.min(tl.min(G, 1), 0) > -SAFE_LOG


@triton.jit
def _pair_logits(A, G, s, GC, SS, c0, T, HKV, M: tl.constexpr,
                 BT: tl.constexpr, MP: tl.constexpr, PRECISION: tl.constexpr):
    """sum_{i <= t in chunk} A[t, i] exp(G_t - G_i) s_i: [BT, MP].

    A [BT, BT] must already be zero above the diagonal."""
    if _safe(G):
        out = tl.exp(G) * tl.dot(A, tl.exp(-G) * s, input_precision=PRECISION)
    else:
        r = tl.arange(0, BT)
        cols = tl.arange(0, MP)
        out = tl.zeros([BT, MP], tl.float32)
        for delta in range(BT):
            g_i, s_i = _gates(GC, SS, c0 + r - delta, cols, T, HKV, M)
            ok = (r >= delta)[:, None]
            dec = tl.where(ok, tl.exp(tl.minimum(G - g_i, 0.0)), 0.0) * s_i
            a_d = tl.sum(tl.where(r[None, :] == r[:, None] - delta, A, 0.0), 1)
            out += a_d[:, None] * dec
    return out


@triton.jit
def _pair_weights(Cf, G, s, GC, SS, c0, T, HKV, M: tl.constexpr,
                  BT: tl.constexpr, MP: tl.constexpr,
                  PRECISION: tl.constexpr):
    """W[t, i] = sum_m Cf[t, m] exp(G_t - G_i)[m] s_i[m] for i <= t, else 0."""
    r = tl.arange(0, BT)
    if _safe(G):
        w = tl.dot(Cf * tl.exp(G), tl.trans(tl.exp(-G) * s),
                   input_precision=PRECISION)
        w = tl.where(r[None, :] <= r[:, None], w, 0.0)
    else:
        cols = tl.arange(0, MP)
        w = tl.zeros([BT, BT], tl.float32)
        for delta in range(BT):
            g_i, s_i = _gates(GC, SS, c0 + r - delta, cols, T, HKV, M)
            ok = (r >= delta)[:, None]
            dec = tl.where(ok, tl.exp(tl.minimum(G - g_i, 0.0)), 0.0) * s_i
            col = tl.sum(Cf * dec, 1)
            w += tl.where(r[None, :] == r[:, None] - delta, col[:, None], 0.0)
    return w


@triton.jit
def _chunk_contribution(XN, RDX, S, w, b, hk, n, NT, rows, d, cols, C, pos, T,
                        HKV, D: tl.constexpr, M: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Stores what chunk n adds to the state sequence (b, hk) of S, column
    tile d: sum_i x_i (x) w_i."""
    x = stream_rows(XN + b * T * HKV * D + hk * D,
                    ring_delta(RDX, b, C, T, HKV * D), rows, d, C, pos, T,
                    HKV, D, True)
    delta = tl.dot(tl.trans(x), w, input_precision=PRECISION)
    out = S + ((b * HKV + hk) * (NT + 1) + n + 1) * D * M
    tl.store(out + d[:, None] * M + cols[None, :],
             delta.to(S.dtype.element_ty),
             mask=(d < D)[:, None] & (cols < M)[None, :])


@triton.jit
def prep_kernel(XN, XN2, GN, PM, POS, GC, SS, S, S2, DEC, T, C, RDX, RDX2,
                RDG, HKV, D: tl.constexpr, M: tl.constexpr, DT: tl.constexpr,
                MP: tl.constexpr, BT: tl.constexpr, HAS_PM: tl.constexpr,
                WRITE_GATES: tl.constexpr, BOTH: tl.constexpr,
                PRECISION: tl.constexpr):
    """Per chunk n: what it adds to the state, to S[b, hk, n + 1]:
    sum_i x_i (x) exp(G_end - G_i) s_i; with BOTH also for the rows XN2
    (the values, same width) into S2, sharing the gate work. With
    WRITE_GATES also G, s of its rows (to GC, SS) and its decay exp(G_end)
    (to DEC)."""
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
    G = tl.cumsum(g, 0)
    gend = tl.sum(g, 0)
    strength = 1.0 - tl.exp(g)
    w = tl.exp(gend[None, :] - G) * strength
    d = tile * DT + tl.arange(0, DT)
    _chunk_contribution(XN, RDX, S, w, b, hk, n, NT, rows, d, cols, C, pos,
                        T, HKV, D, M, PRECISION)
    if BOTH:
        _chunk_contribution(XN2, RDX2, S2, w, b, hk, n, NT, rows, d, cols, C,
                            pos, T, HKV, D, M, PRECISION)
    if WRITE_GATES:
        if tile == 0:
            ok = (rows < T)[:, None] & (cols < M)[None, :]
            at = (b * T + rows.to(tl.int64))[:, None] * (HKV * M) + (
                hk * M + cols[None, :])
            tl.store(GC + at, G, mask=ok)
            tl.store(SS + at, strength, mask=ok)
            tl.store(DEC + (bhk.to(tl.int64) * NT + n) * M + cols,
                     tl.exp(gend), mask=cols < M)


@triton.jit
def _read_contribution(Y, CF, R, decay, b, h, bh, n, NT, rows, d, cols, T, H,
                       D: tl.constexpr, M: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Stores sum_t y_t (x) c_t decay_t over the chunk's rows (column tile
    d) to R[b, h, n]."""
    c = plain_rows(CF + b * T * H * M + h * M, rows, cols, T, H * M, M)
    y = plain_rows(Y + b * T * H * D + h * D, rows, d, T, H * D, D)
    delta = tl.dot(tl.trans(y), c * decay, input_precision=PRECISION)
    out = R + (bh.to(tl.int64) * NT + n) * D * M
    tl.store(out + d[:, None] * M + cols[None, :],
             delta.to(R.dtype.element_ty),
             mask=(d < D)[:, None] & (cols < M)[None, :])


@triton.jit
def adjoint_delta_kernel(Y, CF, Y2, CF2, GC, R, R2, T, H, HKV,
                         D: tl.constexpr, M: tl.constexpr, DT: tl.constexpr,
                         MP: tl.constexpr, BT: tl.constexpr,
                         BOTH: tl.constexpr, PRECISION: tl.constexpr):
    """What the reads of chunk n send back to the state before it, written to
    R[b, h, n]: sum_t y_t (x) c_t exp(G_t); with BOTH also for (Y2, CF2)
    (the other recurrence, same width) into R2."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)
    NT = tl.num_programs(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    rows = n * BT + tl.arange(0, BT)
    cols = tl.arange(0, MP)
    d = tile * DT + tl.arange(0, DT)
    decay = tl.exp(plain_rows(GC + b * T * HKV * M + hk * M, rows, cols, T,
                              HKV * M, M))
    _read_contribution(Y, CF, R, decay, b, h, bh, n, NT, rows, d, cols, T, H,
                       D, M, PRECISION)
    if BOTH:
        _read_contribution(Y2, CF2, R2, decay, b, h, bh, n, NT, rows, d, cols,
                           T, H, D, M, PRECISION)


@triton.jit
def _chain(a_decay, a_value, b_decay, b_value):
    """Composes `S -> S * decay + value` maps: a first, then b."""
    return a_decay * b_decay, a_value * b_decay + b_value


@triton.jit
def chunk_scan_kernel(S, DEC, INIT_K, INIT_V, FINAL_K, FINAL_V, NT, HX,
                      GROUP, BHX, FIRST, D: tl.constexpr, M: tl.constexpr,
                      BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                      REVERSE: tl.constexpr, DECAYS: tl.constexpr = True,
                      WALK: tl.constexpr = False):
    """Turns per-chunk contributions into states, in place, UNROLL chunks
    per step (one tile load, a log-depth scan, one tile store).

    S holds one or more stacks of BHX = B * HX state sequences (the key and
    the value recurrence side by side: one launch, twice the programs); all
    stacks share the decays. Without DECAYS every decay is 1 (plain sums:
    the reverse one is the gates' sum over later chunks).

    Forward (S has NT + 1 entries, entry 0 the initial state): entry n + 1
    becomes the state after chunk n: S_{n+1} = S_n * dec_n + entry_{n+1}.
    Reverse (NT entries): entry n becomes the adjoint arriving at the end of
    chunk n from the chunks after it: R_n = V_{n+1}, V_n = V_{n+1} dec_n +
    entry_n, V_NT = 0.

    Forward, the carry starts from the fp32 input state (INIT_K [D, M] per
    sequence for the key recurrence, INIT_V [M, D] for the value one: the
    state's own layouts), which the kernel also writes to entry 0, and ends
    in FINAL_K / FINAL_V (same layouts). Stack s of the launch is recurrence
    FIRST + s (0 keys, 1 values). S may be stored in bfloat16; the carry is
    fp32.

    With WALK each thread walks its elements' chunks one by one (one
    coalesced row load and store per chunk, no cross-thread scan) instead
    of UNROLL-chunk tiles with a log-depth scan.
    """
    bh = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < D * M
    m = e % M
    b = (bh % BHX) // HX
    hk = (bh % HX) // GROUP
    dec = DEC + ((b * (HX // GROUP) + hk).to(tl.int64) * NT) * M
    step = D * M
    u = tl.arange(0, UNROLL)
    if REVERSE and WALK:
        base = S + bh.to(tl.int64) * NT * step
        carry = tl.zeros([BLOCK], tl.float32)
        for i in range(NT):
            n = NT - 1 - i
            x = tl.load(base + n * step + e, mask=ok, other=0.0)
            tl.store(base + n * step + e, carry.to(S.dtype.element_ty),
                     mask=ok)
            carry = carry * _walk_decay(dec, n, m, ok, M, DECAYS) + x.to(
                tl.float32)
    elif REVERSE:
        base = S + bh.to(tl.int64) * NT * step
        carry = tl.zeros([BLOCK], tl.float32)
        tiles = tl.cdiv(NT, UNROLL)
        for i in range(tiles):
            n = (tiles - 1 - i) * UNROLL + u
            live = (n < NT)[:, None] & ok[None, :]
            at = n.to(tl.int64)[:, None] * step + e[None, :]
            x = tl.load(base + at, mask=live, other=0.0).to(tl.float32)
            d = _scan_decays(dec, n, m, live, UNROLL, BLOCK, M, DECAYS)
            p, y = tl.associative_scan((d, x), 0, _chain, reverse=True)
            v = carry[None, :] * p + y
            # R_n = V_{n+1}: row k's V goes one row up; the carry (V after
            # this tile) to the tile's last row.
            tl.store(base + at - step, v.to(S.dtype.element_ty),
                     mask=((n <= NT) & (u >= 1))[:, None] & ok[None, :])
            last = (tiles - i) * UNROLL - 1
            tl.store(base + last.to(tl.int64) * step + e,
                     carry.to(S.dtype.element_ty), mask=ok & (last < NT))
            carry = tl.sum(tl.where((u == 0)[:, None], v, 0.0), 0)
    else:
        base = S + bh.to(tl.int64) * (NT + 1) * step
        keys = FIRST + bh // BHX == 0
        values = FIRST + bh // BHX != 0
        seq = (bh % BHX).to(tl.int64) * step
        at_k = seq + e
        at_v = seq + m * D + e // M
        carry = tl.where(
            keys, tl.load(INIT_K + at_k, mask=ok & keys, other=0.0),
            tl.load(INIT_V + at_v, mask=ok & values, other=0.0))
        tl.store(base + e, carry.to(S.dtype.element_ty), mask=ok)
        if WALK:
            for n in range(NT):
                at = base + (n + 1) * step + e
                x = tl.load(at, mask=ok, other=0.0).to(tl.float32)
                carry = carry * _walk_decay(dec, n, m, ok, M, DECAYS) + x
                tl.store(at, carry.to(S.dtype.element_ty), mask=ok)
        else:
            for n0 in range(0, NT, UNROLL):
                n = n0 + u
                live = (n < NT)[:, None] & ok[None, :]
                at = (n + 1).to(tl.int64)[:, None] * step + e[None, :]
                x = tl.load(base + at, mask=live, other=0.0).to(tl.float32)
                d = _scan_decays(dec, n, m, live, UNROLL, BLOCK, M, DECAYS)
                p, y = tl.associative_scan((d, x), 0, _chain)
                v = carry[None, :] * p + y
                tl.store(base + at, v.to(S.dtype.element_ty), mask=live)
                carry = tl.sum(tl.where((u == UNROLL - 1)[:, None], v, 0.0),
                               0)
        tl.store(FINAL_K + at_k, carry, mask=ok & keys)
        tl.store(FINAL_V + at_v, carry, mask=ok & values)


@triton.jit
def _walk_decay(dec, n, m, ok, M: tl.constexpr, DECAYS: tl.constexpr):
    """Chunk n's decays of the elements (slot m each) of a walked row."""
    if DECAYS:
        return tl.load(dec + n * M + m, mask=ok, other=1.0)
    else:
        return 1.0


@triton.jit
def _scan_decays(dec, n, m, live, UNROLL: tl.constexpr, BLOCK: tl.constexpr,
                 M: tl.constexpr, DECAYS: tl.constexpr):
    """Per-chunk decays [UNROLL, BLOCK] of a scan tile (1 without DECAYS)."""
    if DECAYS:
        return tl.load(dec + n[:, None] * M + m[None, :], mask=live,
                       other=1.0)
    else:
        return tl.full([UNROLL, BLOCK], 1.0, tl.float32)


@triton.jit
def _scan_rows(y_ptr, Y_ROW, x_ptr, x_delta, s_ptr, rows, C, pos, T, HKV,
               D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
               LT: tl.constexpr, BT: tl.constexpr, MP: tl.constexpr,
               FEEDS: tl.constexpr, PRECISION: tl.constexpr):
    """Over column tiles of width D: (Y @ S [BT, MP], Y @ X^T [BT, BT]) for
    query-side rows Y, the chunk-start state S [D, M] at `s_ptr` and the
    stream rows X (the second is 0 without a feed)."""
    cols = tl.arange(0, MP)
    ys = tl.zeros([BT, MP], tl.float32)
    yx = tl.zeros([BT, BT], tl.float32)
    for d0 in tl.static_range(0, BD, LT):
        d = d0 + tl.arange(0, LT)
        y = plain_rows(y_ptr, rows, d, T, Y_ROW, D, True)
        st = tl.load(s_ptr + d[:, None] * M + cols[None, :],
                     mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
        ys += _state_dot(y, st, PRECISION)
        if FEEDS:
            x = stream_rows(x_ptr, x_delta, rows, d, C, pos, T, HKV, D, True,
                            True)
            yx += tl.dot(y, tl.trans(x.to(y.dtype)),
                         input_precision=PRECISION)
    return ys, yx


@triton.jit
def _store_readout(out_ptr, OUT_ROW, scale, t_ok, coef, w, s_ptr, x_ptr,
                   x_delta, rows, C, pos, T, HKV, D: tl.constexpr,
                   M: tl.constexpr, BD: tl.constexpr, LT: tl.constexpr,
                   MP: tl.constexpr, FEEDS: tl.constexpr,
                   PRECISION: tl.constexpr, ADD: tl.constexpr = False):
    """out = scale (coef @ S^T + w @ X), column tile by column tile: S the
    chunk-start state [D, M], X the stream rows (w ignored without feed);
    added to what `out` holds with ADD."""
    cols = tl.arange(0, MP)
    for d0 in tl.static_range(0, BD, LT):
        d = d0 + tl.arange(0, LT)
        st = tl.load(s_ptr + d[:, None] * M + cols[None, :],
                     mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
        out = _state_dot(coef, tl.trans(st), PRECISION)
        if FEEDS:
            x = stream_rows(x_ptr, x_delta, rows, d, C, pos, T, HKV, D, True,
                            True)
            out += tl.dot(w.to(x.dtype), x, input_precision=PRECISION)
        at = out_ptr + rows.to(tl.int64)[:, None] * OUT_ROW + d[None, :]
        ok = t_ok[:, None] & (d < D)[None, :]
        out = scale * out
        if ADD:
            out += tl.load(at, mask=ok, other=0.0).to(tl.float32)
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _chunk_program(GC, SS, POS, T, H, HKV, M: tl.constexpr, BT: tl.constexpr,
                   MP: tl.constexpr):
    """Where a program of a grid (chunks, batch * query heads) works: batch,
    query head, kv head, ring position, first row, in-chunk row index,
    stream rows, slot columns, which rows are real, and the starts of its
    (batch, kv head) gate and strength tiles."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    c0 = tl.program_id(0) * BT
    r = tl.arange(0, BT)
    start = b * T * HKV * M + hk * M
    return (b, h, hk, tl.load(POS), c0, r, c0 + r, tl.arange(0, MP),
            c0 + r < T, GC + start, SS + start)


@triton.jit
def _kv_stream(KN, VN, RDK, RDV, b, hk, C, T, HKV, DK: tl.constexpr,
               DV: tl.constexpr):
    """(batch, kv head) starts of the new keys and values and their rings'
    offsets (`ring_delta`)."""
    return (KN + b * T * HKV * DK + hk * DK,
            ring_delta(RDK, b, C, T, HKV * DK),
            VN + b * T * HKV * DV + hk * DV,
            ring_delta(RDV, b, C, T, HKV * DV))


@triton.jit
def slot_forward_kernel(Q, KN, VN, GC, SS, POS, SK, SV, OS, LS, ZS,
                        T, C, sm_scale, ns, per_chunk, RDK, RDV, H, HKV,
                        DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, LT: tl.constexpr,
                        MP: tl.constexpr, BT: tl.constexpr,
                        FEEDS: tl.constexpr, READOUT: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Slot-only softmax output (fp32), its base-2 log-sum-exp and the
    scaled slot logits (fp32, kept for the backward), for one chunk and
    query head. Without READOUT the output is left to
    `slot_readout_kernel` (two lighter programs instead of one)."""
    b, h, hk, pos, c0, r, rows, cols, t_ok, gc, ss = _chunk_program(
        GC, SS, POS, T, H, HKV, M, BT, MP)
    state = (b * HKV + hk) * ns + tl.program_id(0) * per_chunk
    kn, k_delta, vn, v_delta = _kv_stream(KN, VN, RDK, RDV, b, hk, C, T, HKV,
                                          DK, DV)

    z, a = _scan_rows(Q + b * T * H * DK + h * DK, H * DK, kn, k_delta,
                      SK + state * DK * M, rows, C, pos, T, HKV, DK, M, BK,
                      LT, BT, MP, FEEDS, PRECISION)
    if FEEDS:
        G, s = _gates(gc, ss, rows, cols, T, HKV, M)
        a = tl.where(r[None, :] <= r[:, None], a, 0.0)
        z = z * tl.exp(G) + _pair_logits(a, G, s, gc, ss, c0, T, HKV, M, BT,
                                         MP, PRECISION)
    z = sm_scale * z
    row = (b * T + rows) * H + h
    tl.store(ZS + row[:, None] * M + cols[None, :], z,
             mask=t_ok[:, None] & (cols < M)[None, :])
    z = tl.where((cols < M)[None, :], z, float("-inf"))
    zmax = tl.max(z, 1)
    e = tl.exp2((z - zmax[:, None]) * LOG2E)
    total = tl.sum(e, 1)
    tl.store(LS + row, zmax * LOG2E + tl.log2(total), mask=t_ok)
    if READOUT:
        probs = e / total[:, None]
        if FEEDS:
            coef = probs * tl.exp(G)
            w = _pair_weights(probs, G, s, gc, ss, c0, T, HKV, M, BT, MP,
                              PRECISION)
        else:
            coef = probs
            w = tl.zeros([BT, BT], tl.float32)
        _store_readout(OS + (b * T * H + h) * DV, H * DV, 1.0, t_ok, coef,
                       w, SV + state * DV * M, vn, v_delta, rows, C, pos, T,
                       HKV, DV, M, BV, LT, MP, FEEDS, PRECISION)


@triton.jit
def slot_readout_kernel(CF, ZS, LS, XN, GC, SS, POS, S, OUT, T, C, out_scale,
                        ns, per_chunk, RDX, H, HKV, D: tl.constexpr,
                        M: tl.constexpr, BD: tl.constexpr, LT: tl.constexpr,
                        MP: tl.constexpr, BT: tl.constexpr,
                        FROM_LOGITS: tl.constexpr, FEEDS: tl.constexpr,
                        ADD: tl.constexpr, PRECISION: tl.constexpr):
    """out = out_scale (c exp(G) @ S^T + W(c) @ X) for one chunk and query
    head: the slot output (c = the slot probabilities, from the scaled
    logits ZS and log-sum-exp LS with FROM_LOGITS; S = Sv, X = v) or the
    slot part of dq (c = dz from CF; S = Sk, X = k), added to what OUT
    holds with ADD."""
    b, h, hk, pos, c0, _r, rows, cols, t_ok, gc, ss = _chunk_program(
        GC, SS, POS, T, H, HKV, M, BT, MP)
    state = (b * HKV + hk) * ns + tl.program_id(0) * per_chunk
    row = (b * T + rows) * H + h
    ok = t_ok[:, None] & (cols < M)[None, :]
    at = row[:, None] * M + cols[None, :]
    if FROM_LOGITS:
        z = tl.load(ZS + at, mask=ok, other=0.0)
        lse = tl.load(LS + row, mask=t_ok, other=0.0)
        c = tl.where(ok, tl.exp2(tl.where(ok, z * LOG2E - lse[:, None], 0.0)),
                     0.0)
    else:
        c = tl.load(CF + at, mask=ok, other=0.0).to(tl.float32)
    if FEEDS:
        G, s = _gates(gc, ss, rows, cols, T, HKV, M)
        coef = c * tl.exp(G)
        w = _pair_weights(c, G, s, gc, ss, c0, T, HKV, M, BT, MP, PRECISION)
    else:
        coef = c
        w = tl.zeros([BT, BT], tl.float32)
    _store_readout(OUT + (b * T * H + h) * D, H * D, out_scale, t_ok, coef, w,
                   S + state * D * M, XN + b * T * HKV * D + hk * D,
                   ring_delta(RDX, b, C, T, HKV * D), rows, C, pos, T, HKV, D,
                   M, BD, LT, MP, FEEDS, PRECISION, ADD)


@triton.jit
def slot_dq_kernel(Q, DO, KN, VN, GC, SS, POS, SK, SV, L, DELTA, ZS,
                   DQ, DZ, P, DGR, T, C, sm_scale, ns, per_chunk, RDK, RDV,
                   H, HKV, DK: tl.constexpr, DV: tl.constexpr,
                   M: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   LT: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                   FEEDS: tl.constexpr, READOUT: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Backward, query side, one chunk and query head: slot probabilities p
    (from the forward's scaled logits ZS), logit gradients dz, the read part
    of dG and (with READOUT; else `slot_readout_kernel`) the slot part of
    dq."""
    b, h, hk, pos, c0, r, rows, cols, t_ok, gc, ss = _chunk_program(
        GC, SS, POS, T, H, HKV, M, BT, MP)
    state = (b * HKV + hk) * ns + tl.program_id(0) * per_chunk
    kn, k_delta, vn, v_delta = _kv_stream(KN, VN, RDK, RDV, b, hk, C, T, HKV,
                                          DK, DV)

    row = (b * T + rows) * H + h
    ok = t_ok[:, None] & (cols < M)[None, :]
    at = row[:, None] * M + cols[None, :]
    z = tl.load(ZS + at, mask=ok, other=0.0)
    if FEEDS:
        G, s = _gates(gc, ss, rows, cols, T, HKV, M)
        decay = tl.exp(G)
        causal = r[None, :] <= r[:, None]
    dp, a = _scan_rows(DO + b * T * H * DV + h * DV, H * DV, vn, v_delta,
                       SV + state * DV * M, rows, C, pos, T, HKV, DV, M, BV,
                       LT, BT, MP, FEEDS, PRECISION)
    if FEEDS:
        dp = dp * decay + _pair_logits(tl.where(causal, a, 0.0), G, s, gc,
                                       ss, c0, T, HKV, M, BT, MP, PRECISION)
    lse = tl.load(L + row, mask=t_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
    p = tl.where(ok, tl.exp2(tl.where(ok, z * LOG2E - lse[:, None], 0.0)),
                 0.0)
    dz = p * (dp - delta[:, None])
    tl.store(DZ + at, dz, mask=ok)
    tl.store(P + at, p, mask=ok)
    tl.store(DGR + at, tl.where(ok, z * dz + p * dp, 0.0), mask=ok)
    if READOUT:
        if FEEDS:
            coef = dz * decay
            w = _pair_weights(dz, G, s, gc, ss, c0, T, HKV, M, BT, MP,
                              PRECISION)
        else:
            coef = dz
            w = tl.zeros([BT, BT], tl.float32)
        _store_readout(DQ + (b * T * H + h) * DK, H * DK, sm_scale, t_ok,
                       coef, w, SK + state * DK * M, kn, k_delta, rows, C,
                       pos, T, HKV, DK, M, BK, LT, MP, FEEDS, PRECISION)


@triton.jit
def slot_dx_kernel(Y, CF, XN, GC, SS, POS, R, DX, DXA, DS, T, C, y_scale,
                   RDX, H,
                   HKV, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
                   LT: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                   ADD_DS: tl.constexpr, DIRECT: tl.constexpr,
                   ADD_DX: tl.constexpr, WANT_DS: tl.constexpr,
                   WANT_DX: tl.constexpr, PRECISION: tl.constexpr):
    """Backward, write side of one recurrence (keys: Y = q, c = dz, scaled;
    values: Y = do, c = p), one chunk and query head: the gradient of the
    written rows x_i (WANT_DX) and of their strengths s_i (WANT_DS; added
    to DS with ADD_DS: both recurrences write with the same s). Two launches
    with one of each are two lighter programs instead of one.

    DX rows are stream rows per query head, or with DIRECT (one query head
    per kv head) the new tokens the rows came from (row C + u is token u;
    ring rows get nothing), added to what DXA holds with ADD_DX (DXA may be
    DX itself)."""
    b, h, hk, pos, c0, r, rows, cols, t_ok, gc, ss = _chunk_program(
        GC, SS, POS, T, H, HKV, M, BT, MP)
    xn = XN + b * T * HKV * D + hk * D
    x_delta = ring_delta(RDX, b, C, T, HKV * D)
    y_ptr = Y + b * T * H * D + h * D
    c_ptr = CF + b * T * H * M + h * M
    r_ptr = R + (tl.program_id(1).to(tl.int64) * tl.num_programs(0)
                 + tl.program_id(0)) * D * M

    row = (b * T + rows) * H + h
    later = r[None, :] >= r[:, None]
    if WANT_DS:
        # x R (through the adjoint R at the chunk's end) and x Y^T, tile by
        # tile.
        xr = tl.zeros([BT, MP], tl.float32)
        ax = tl.zeros([BT, BT], tl.float32)
        for d0 in tl.static_range(0, BD, LT):
            d = d0 + tl.arange(0, LT)
            x = stream_rows(xn, x_delta, rows, d, C, pos, T, HKV, D, True,
                            True)
            y = plain_rows(y_ptr, rows, d, T, H * D, D, True)
            ra = tl.load(r_ptr + d[:, None] * M + cols[None, :],
                         mask=(d < D)[:, None] & (cols < M)[None, :],
                         other=0.0)
            xr += _state_dot(x, ra, PRECISION)
            ax += tl.dot(x.to(y.dtype), tl.trans(y),
                         input_precision=PRECISION)
        ax = tl.where(later, ax, 0.0)

    G, s = _gates(gc, ss, rows, cols, T, HKV, M)
    # exp(G_end - G_i): what the chunk's remaining rows do to row i's write.
    gend = tl.min(tl.where(t_ok[:, None], G, 0.0), 0)
    to_end = tl.exp(gend[None, :] - G)
    if WANT_DS:
        ds = xr * to_end
    cs = plain_rows(c_ptr, rows, cols, T, H * M, M)
    if _safe(G):
        ce = cs * tl.exp(G)
        back = tl.exp(-G)
        if WANT_DX:
            coef = tl.where(later, tl.dot(back * s, tl.trans(ce),
                                          input_precision=PRECISION), 0.0)
        if WANT_DS:
            ds += back * tl.dot(ax, ce, input_precision=PRECISION)
    else:
        if WANT_DX:
            coef = tl.zeros([BT, BT], tl.float32)
        for delta in range(BT):
            ahead = rows + delta
            g_t, _s_t = _gates(gc, ss, ahead, cols, T, HKV, M)
            c_t = plain_rows(c_ptr, ahead, cols, T, H * M, M)
            ok = ((r + delta) < BT)[:, None]
            e = tl.where(ok, c_t * tl.exp(tl.minimum(g_t - G, 0.0)), 0.0)
            at_t = r[None, :] == r[:, None] + delta
            if WANT_DX:
                coef += tl.where(at_t, tl.sum(e * s, 1)[:, None], 0.0)
            if WANT_DS:
                ds += tl.sum(tl.where(at_t, ax, 0.0), 1)[:, None] * e

    if WANT_DS:
        ds_at = DS + row[:, None] * M + cols[None, :]
        ds_ok = t_ok[:, None] & (cols < M)[None, :]
        ds = ds * y_scale
        if ADD_DS:
            ds += tl.load(ds_at, mask=ds_ok, other=0.0)
        tl.store(ds_at, ds, mask=ds_ok)
    if WANT_DX:
        _store_dx(DX, DXA, r_ptr, y_ptr, to_end * s, coef, row, rows, t_ok, C,
                  T, H, y_scale, D, M, BD, LT, cols, DIRECT, ADD_DX,
                  PRECISION)


@triton.jit
def _store_dx(DX, DXA, r_ptr, y_ptr, weight, coef, row, rows, t_ok, C, T, H,
              y_scale, D: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
              LT: tl.constexpr, cols, DIRECT: tl.constexpr,
              ADD_DX: tl.constexpr, PRECISION: tl.constexpr):
    """dx = y_scale (weight @ R^T + coef @ Y), column tile by column tile."""
    if DIRECT:
        out_row = row - C * H
        out_ok = t_ok & (rows >= C)
    else:
        out_row = row
        out_ok = t_ok
    for d0 in tl.static_range(0, BD, LT):
        d = d0 + tl.arange(0, LT)
        ra = tl.load(r_ptr + d[:, None] * M + cols[None, :],
                     mask=(d < D)[:, None] & (cols < M)[None, :], other=0.0)
        dx = _state_dot(weight, tl.trans(ra), PRECISION)
        y = plain_rows(y_ptr, rows, d, T, H * D, D, True)
        dx += tl.dot(coef.to(y.dtype), y, input_precision=PRECISION)
        dx_at = out_row[:, None] * D + d[None, :]
        dx_ok = out_ok[:, None] & (d < D)[None, :]
        dx = dx * y_scale
        if ADD_DX:
            dx += tl.load(DXA + dx_at, mask=dx_ok, other=0.0).to(tl.float32)
        tl.store(DX + dx_at, dx.to(DX.dtype.element_ty), mask=dx_ok)


@triton.jit
def _gate_sums(DGR, DS, SS, T, H, HKV, M: tl.constexpr, MP: tl.constexpr,
               BT: tl.constexpr):
    """For a program of a grid (chunks, batch * kv heads): its chunk's
    stream rows, slot columns, batch, kv head, strengths s, and over the
    group's query heads the sums of dG = z dz + p dp - s ds and of ds."""
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    G = H // HKV
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, MP)
    s = plain_rows(SS + b * T * HKV * M + hk * M, rows, cols, T, HKV * M, M)
    total = tl.zeros([BT, MP], tl.float32)
    ds = tl.zeros([BT, MP], tl.float32)
    for g in range(G):
        h = hk * G + g
        ds_h = plain_rows(DS + b * T * H * M + h * M, rows, cols, T, H * M, M)
        total += plain_rows(DGR + b * T * H * M + h * M, rows, cols, T,
                            H * M, M) - s * ds_h
        ds += ds_h
    return rows, cols, b, hk, s, total, ds


@triton.jit
def gate_total_kernel(DGR, DS, SS, TOT, T, H, HKV, M: tl.constexpr,
                      MP: tl.constexpr, BT: tl.constexpr):
    """Per chunk and kv head: sum over its rows and query heads of
    dG = z dz + p dp - s ds."""
    _rows, cols, _b, _hk, _s, total, _ds = _gate_sums(DGR, DS, SS, T, H, HKV,
                                                      M, MP, BT)
    at = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(TOT + at * M + cols, tl.sum(total, 0), mask=cols < M)


@triton.jit
def gate_grad_kernel(DGR, DS, SS, AFTER, PM, DG, T, C, H, HKV,
                     M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                     HAS_PM: tl.constexpr):
    """dg of the stream rows: sum_{t' >= t} dG_t' - alpha_t ds_t, written to
    the new token each row came from (row C + u is token u), masked."""
    rows, cols, b, hk, s, total, ds = _gate_sums(DGR, DS, SS, T, H, HKV, M,
                                                 MP, BT)
    at = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    after = tl.load(AFTER + at * M + cols, mask=cols < M, other=0.0)
    dg = tl.cumsum(total, 0, reverse=True) + after[None, :] - (1.0 - s) * ds
    u = rows - C
    ok = ((u >= 0) & (rows < T))[:, None] & (cols < M)[None, :]
    if HAS_PM:
        real = tl.load(PM + b * T + u, mask=(u >= 0) & (rows < T), other=0.0)
        dg = dg * real[:, None]
    tl.store(DG + (b * T + u.to(tl.int64))[:, None] * (HKV * M) + hk * M
             + cols[None, :], dg, mask=ok)
