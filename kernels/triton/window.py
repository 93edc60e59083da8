"""Sliding-window flash attention kernels of NHA (forward and backward).

The forward seeds each query row's online softmax with the slot part's
normalised output and log-sum-exp, so its result is the joint softmax over
[slots | window] (the log-sum-exp merge). The backward is the usual flash
backward fed the merged output and merged log-sum-exp, which gives the exact
window gradients. All log-sum-exps are base 2.

Query t (new token) sees new tokens u with t - W < u <= t and, when the state
holds earlier tokens, the ring entries whose positions are in its window. Key
blocks split into masked edge blocks and mask-free interior blocks; blocks
outside every window of a query block are never visited, so the work is
O(T W) for any W.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _split(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr,
           HAS_PM: tl.constexpr):
    """Cuts [lo, hi) into [lo, a) masked, [a, b) mask-free, [b, hi) masked,
    with block-aligned cuts; [full_lo, full_hi) is where no mask is needed."""
    lead = tl.maximum(full_lo - lo, 0)
    a = tl.minimum(lo + tl.cdiv(lead, BLOCK) * BLOCK, hi)
    inner = tl.maximum(tl.minimum(full_hi, hi) - a, 0) // BLOCK
    if HAS_PM:  # padded keys need the mask everywhere
        inner = inner * 0
    return a, a + inner * BLOCK


@triton.jit
def _forward_block(q, k, v, seen, m_i, l_i, acc, qk_scale,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(seen, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                        input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _new_block(k_base, v_base, pm, u0, t, T, W, HKV, DK: tl.constexpr,
               DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BN: tl.constexpr, HAS_PM: tl.constexpr, MASKED: tl.constexpr):
    """Keys and values of new tokens u0 .. u0 + BN and which of them the
    queries `t` see (only meaningful with MASKED)."""
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    u = u0 + tl.arange(0, BN)
    u_ok = u < T
    k = tl.load(k_base + u[:, None] * (HKV * DK) + dk[None, :],
                mask=u_ok[:, None] & (dk < DK)[None, :], other=0.0)
    v = tl.load(v_base + u[:, None] * (HKV * DV) + dv[None, :],
                mask=u_ok[:, None] & (dv < DV)[None, :], other=0.0)
    seen = u_ok[None, :]
    if MASKED:
        seen = seen & (u[None, :] <= t[:, None]) & (
            u[None, :] > t[:, None] - W)
        if HAS_PM:
            real = tl.load(pm + u, mask=u_ok, other=0.0)
            seen = seen & (real > 0)[None, :]
    return k, v, seen


@triton.jit
def _ring_block(KR, VR, RM, b, hk, pos, j0, r_hi, t, C, W, HKV,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, BN: tl.constexpr):
    """Keys and values of ring history rows j0 .. j0 + BN (oldest first) and
    which of them the queries `t` see (written, real, inside the window)."""
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    j = j0 + tl.arange(0, BN)
    j_ok = j < r_hi
    slot = (pos + j) % C
    at = (b * C + slot) * HKV + hk
    k = tl.load(KR + at[:, None] * DK + dk[None, :],
                mask=j_ok[:, None] & (dk < DK)[None, :], other=0.0)
    v = tl.load(VR + at[:, None] * DV + dv[None, :],
                mask=j_ok[:, None] & (dv < DV)[None, :], other=0.0)
    real = tl.load(RM + b * C + slot, mask=j_ok, other=0.0)
    seen = (j_ok & (real > 0))[None, :] & (j[None, :] > C + t[:, None] - W)
    return k, v, seen


@triton.jit
def _query_rows(POS, T, H, HKV, BM: tl.constexpr):
    """Batch, kv head, ring position, first query, query rows, which are
    real and their (b, t, h) row index, for a program of a grid (query
    blocks, batch * heads)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t0 = tl.program_id(0) * BM
    t = t0 + tl.arange(0, BM)
    return (b, h // (H // HKV), tl.load(POS), t0, t, t < T,
            (b * T + t) * H + h)


@triton.jit
def _forward_new(q, k_base, v_base, pm, t, m_i, l_i, acc, lo, hi, T, W,
                 qk_scale, HKV, DK: tl.constexpr,
                 DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BN: tl.constexpr, HAS_PM: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    for u0 in range(lo, hi, BN):
        k, v, seen = _new_block(k_base, v_base, pm, u0, t, T, W, HKV, DK, DV,
                                BK, BV, BN, HAS_PM, MASKED)
        m_i, l_i, acc = _forward_block(q, k.to(q.dtype), v, seen, m_i, l_i,
                                       acc, qk_scale, MASKED, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _ring_rows(pos, t0, C, W, BM: tl.constexpr):
    """History rows [lo, hi) of the ring that queries t0.. can see: entries
    with positions pos - C + r >= 0 inside some query's window."""
    lo = tl.maximum(C + t0 - W + 1, C - tl.minimum(pos, C))
    return tl.maximum(lo, 0), C


@triton.jit
def _new_rows(K, V, PM, b, hk, t0, T, W, HKV, DK: tl.constexpr,
              DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              HAS_PM: tl.constexpr):
    """New tokens the queries t0 .. t0 + BM see, u in (t - W, t]: cut
    points lo <= a <= z <= hi ([a, z) needs no mask) and the (batch, kv
    head) starts of keys, values and the padding mask."""
    lo = tl.maximum(t0 - W + 1, 0)
    hi = tl.minimum(t0 + BM, T)
    a, z = _split(lo, hi, t0 + BM - W, t0 + 1, BN, HAS_PM)
    return (lo, a, z, hi, K + b * T * HKV * DK + hk * DK,
            V + b * T * HKV * DV + hk * DV, PM + b * T)


@triton.jit
def window_forward_kernel(
        Q, K, V, KR, VR, PM, RM, POS, OS, LS, O, L,
        T, C, W, sm_scale,
        H, HKV, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        HAS_SLOTS: tl.constexpr, PRECISION: tl.constexpr):
    b, hk, pos, t0, t, t_ok, row = _query_rows(POS, T, H, HKV, BM)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    q = tl.load(Q + row[:, None] * DK + dk[None, :],
                mask=t_ok[:, None] & (dk < DK)[None, :], other=0.0)
    if HAS_SLOTS:
        m_i = tl.load(LS + row, mask=t_ok, other=0.0)
        l_i = tl.full([BM], 1.0, tl.float32)
        acc = tl.load(OS + row[:, None] * DV + dv[None, :],
                      mask=t_ok[:, None] & (dv < DV)[None, :],
                      other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BV], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    # Ring entries (streaming from a state): never-written ones are skipped.
    r_lo, r_hi = _ring_rows(pos, t0, C, W, BM)
    for j0 in range(r_lo, r_hi, BN):
        k, v, seen = _ring_block(KR, VR, RM, b, hk, pos, j0, r_hi, t, C, W,
                                 HKV, DK, DV, BK, BV, BN)
        m_i, l_i, acc = _forward_block(q, k.to(q.dtype), v, seen, m_i, l_i,
                                       acc, qk_scale, True, PRECISION)

    # New tokens: u in (t - W, t].
    lo, a, z, hi, k_base, v_base, pm = _new_rows(K, V, PM, b, hk, t0, T, W,
                                                 HKV, DK, DV, BM, BN, HAS_PM)
    m_i, l_i, acc = _forward_new(q, k_base, v_base, pm, t, m_i, l_i, acc, lo,
                                 a, T, W, qk_scale, HKV, DK, DV, BK, BV, BN,
                                 HAS_PM, True, PRECISION)
    m_i, l_i, acc = _forward_new(q, k_base, v_base, pm, t, m_i, l_i, acc, a,
                                 z, T, W, qk_scale, HKV, DK, DV, BK, BV, BN,
                                 HAS_PM, False, PRECISION)
    m_i, l_i, acc = _forward_new(q, k_base, v_base, pm, t, m_i, l_i, acc, z,
                                 hi, T, W, qk_scale, HKV, DK, DV, BK, BV, BN,
                                 HAS_PM, True, PRECISION)

    some = l_i > 0
    out = acc / tl.where(some, l_i, 1.0)[:, None]
    lse = tl.where(some, m_i + tl.log2(tl.where(some, l_i, 1.0)), 0.0)
    tl.store(O + row[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty),
             mask=t_ok[:, None] & (dv < DV)[None, :])
    tl.store(L + row, lse, mask=t_ok)


@triton.jit
def _dq_block(q, do, k, v, seen, lse, delta, dq, qk_scale,
              MASKED: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        p = tl.where(seen, tl.exp2(tl.where(seen, s - lse[:, None], 0.0)),
                     0.0)
    else:
        p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_new(q, do, k_base, v_base, pm, t, t_ok, lse, delta, dq, lo, hi, T, W,
            qk_scale, HKV, DK: tl.constexpr, DV: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
            HAS_PM: tl.constexpr, MASKED: tl.constexpr,
            PRECISION: tl.constexpr):
    for u0 in range(lo, hi, BN):
        k, v, seen = _new_block(k_base, v_base, pm, u0, t, T, W, HKV, DK, DV,
                                BK, BV, BN, HAS_PM, MASKED)
        dq = _dq_block(q, do, k.to(q.dtype), v.to(do.dtype),
                       seen & t_ok[:, None], lse, delta, dq, qk_scale, MASKED,
                       PRECISION)
    return dq


@triton.jit
def window_dq_kernel(
        Q, K, V, KR, VR, PM, RM, POS, DO, O, L, DELTA, DQ,
        T, C, W, sm_scale,
        H, HKV, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        PRECISION: tl.constexpr):
    """dq of the window part; also writes delta = rowsum(dO * O) (merged
    output O) of its rows for the kernels that run after it."""
    b, hk, pos, t0, t, t_ok, row = _query_rows(POS, T, H, HKV, BM)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    q = tl.load(Q + row[:, None] * DK + dk[None, :],
                mask=t_ok[:, None] & (dk < DK)[None, :], other=0.0)
    do = tl.load(DO + row[:, None] * DV + dv[None, :],
                 mask=t_ok[:, None] & (dv < DV)[None, :], other=0.0)
    o = tl.load(O + row[:, None] * DV + dv[None, :],
                mask=t_ok[:, None] & (dv < DV)[None, :], other=0.0)
    lse = tl.load(L + row, mask=t_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=t_ok)
    dq = tl.zeros([BM, BK], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    r_lo, r_hi = _ring_rows(pos, t0, C, W, BM)
    for j0 in range(r_lo, r_hi, BN):
        k, v, seen = _ring_block(KR, VR, RM, b, hk, pos, j0, r_hi, t, C, W,
                                 HKV, DK, DV, BK, BV, BN)
        dq = _dq_block(q, do, k.to(q.dtype), v.to(do.dtype),
                       seen & t_ok[:, None], lse, delta, dq, qk_scale, True,
                       PRECISION)

    lo, a, z, hi, k_base, v_base, pm = _new_rows(K, V, PM, b, hk, t0, T, W,
                                                 HKV, DK, DV, BM, BN, HAS_PM)
    dq = _dq_new(q, do, k_base, v_base, pm, t, t_ok, lse, delta, dq, lo, a, T,
                 W, qk_scale, HKV, DK, DV, BK, BV, BN, HAS_PM, True,
                 PRECISION)
    dq = _dq_new(q, do, k_base, v_base, pm, t, t_ok, lse, delta, dq, a, z, T,
                 W, qk_scale, HKV, DK, DV, BK, BV, BN, HAS_PM, False,
                 PRECISION)
    dq = _dq_new(q, do, k_base, v_base, pm, t, t_ok, lse, delta, dq, z, hi, T,
                 W, qk_scale, HKV, DK, DV, BK, BV, BN, HAS_PM, True,
                 PRECISION)
    tl.store(DQ + row[:, None] * DK + dk[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=t_ok[:, None] & (dk < DK)[None, :])


@triton.jit
def _dkdv_queries(k, v, key_ok, u, q_base, do_base, l_base, d_base, dk_acc,
                  dv_acc, lo, hi, T, W, qk_scale, H,
                  DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    for t0 in range(lo, hi, BM):
        t = t0 + tl.arange(0, BM)
        t_ok = t < T
        q = tl.load(q_base + t[:, None] * (H * DK) + dk[None, :],
                    mask=t_ok[:, None] & (dk < DK)[None, :],
                    other=0.0).to(k.dtype)
        do = tl.load(do_base + t[:, None] * (H * DV) + dv[None, :],
                     mask=t_ok[:, None] & (dv < DV)[None, :],
                     other=0.0).to(v.dtype)
        lse = tl.load(l_base + t * H, mask=t_ok, other=0.0)
        delta = tl.load(d_base + t * H, mask=t_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            seen = ((t[None, :] >= u[:, None]) & (t[None, :] < u[:, None] + W)
                    & key_ok[:, None] & t_ok[None, :])
            p_t = tl.where(seen,
                           tl.exp2(tl.where(seen, s_t - lse[None, :], 0.0)),
                           0.0)
        else:
            p_t = tl.exp2(s_t - lse[None, :])
        dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk_acc += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk_acc, dv_acc


@triton.jit
def window_dkdv_kernel(
        Q, K, V, PM, DO, L, DELTA, DK_, DV_,
        T, W, sm_scale,
        H, HKV, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        PRECISION: tl.constexpr):
    """Gradients of the new tokens' window keys and values (ring entries
    belong to the state and get none). Query t sees new key u when
    0 <= t - u < W."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    G = H // HKV

    u0 = pid * BN
    u = u0 + tl.arange(0, BN)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    u_ok = u < T
    krow = (b * T + u) * HKV + hk
    k = tl.load(K + krow[:, None] * DK + dk[None, :],
                mask=u_ok[:, None] & (dk < DK)[None, :], other=0.0)
    v = tl.load(V + krow[:, None] * DV + dv[None, :],
                mask=u_ok[:, None] & (dv < DV)[None, :], other=0.0)
    if HAS_PM:
        real = tl.load(PM + b * T + u, mask=u_ok, other=0.0)
        key_ok = u_ok & (real > 0)
    else:
        key_ok = u_ok
    dk_acc = tl.zeros([BN, BK], tl.float32)
    dv_acc = tl.zeros([BN, BV], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    hi = tl.minimum(T, u0 + BN - 1 + W)
    # Query blocks inside every key's window need no mask.
    a, z = _split(u0, hi, u0 + BN - 1, u0 + W, BM, HAS_PM)
    for g in range(G):
        h = hk * G + g
        q_base = Q + b * T * H * DK + h * DK
        do_base = DO + b * T * H * DV + h * DV
        l_base = L + b * T * H + h
        d_base = DELTA + b * T * H + h
        dk_acc, dv_acc = _dkdv_queries(
            k, v, key_ok, u, q_base, do_base, l_base, d_base, dk_acc, dv_acc,
            u0, a, T, W, qk_scale, H, DK, DV, BK, BV, BM, True, PRECISION)
        dk_acc, dv_acc = _dkdv_queries(
            k, v, key_ok, u, q_base, do_base, l_base, d_base, dk_acc, dv_acc,
            a, z, T, W, qk_scale, H, DK, DV, BK, BV, BM, False, PRECISION)
        dk_acc, dv_acc = _dkdv_queries(
            k, v, key_ok, u, q_base, do_base, l_base, d_base, dk_acc, dv_acc,
            z, hi, T, W, qk_scale, H, DK, DV, BK, BV, BM, True, PRECISION)
    tl.store(DK_ + krow[:, None] * DK + dk[None, :],
             (dk_acc * sm_scale).to(DK_.dtype.element_ty),
             mask=u_ok[:, None] & (dk < DK)[None, :])
    tl.store(DV_ + krow[:, None] * DV + dv[None, :], dv_acc,
             mask=u_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def row_dot_kernel(A, B_, OUT, N, D: tl.constexpr, BD: tl.constexpr,
                   BR: tl.constexpr):
    """OUT[r] = sum_d A[r, d] B[r, d] in fp32 (delta = rowsum(dO * O))."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    ok = (r < N)[:, None] & (d < D)[None, :]
    at = r.to(tl.int64)[:, None] * D + d[None, :]
    a = tl.load(A + at, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B_ + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + r, tl.sum(a * b, 1), mask=r < N)
