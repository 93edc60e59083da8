"""Sliding-window flash attention kernels of NHA (forward and backward).

The forward seeds each query row's online softmax with the slot part's
normalised output and log-sum-exp, so its result is the joint softmax over
[slots | window] (the log-sum-exp merge). The backward is the usual flash
backward fed the merged output and merged log-sum-exp, which gives the exact
window gradients. Keys outside the window, padded keys and never-written ring
entries are skipped or masked. All log-sum-exps are base 2.
"""

import triton
import triton.language as tl

from keras_nha.kernels.triton.common import history_mask
from keras_nha.kernels.triton.common import history_rows


@triton.jit
def _key_range(t0, BM: tl.constexpr, C, T, W, pos):
    """History rows [lo, hi) that some query of the block t0.. can see."""
    lo = tl.maximum(C + t0 - W + 1, C - tl.minimum(pos, C))
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(C + t0 + BM, C + T)
    return lo, hi


@triton.jit
def window_forward_kernel(
        Q, K, V, KR, VR, PM, RM, POS, OS, LS, O, L,
        T, C, W, sm_scale,
        H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        HAS_SLOTS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    pos = tl.load(POS)

    t0 = pid * BM
    t = t0 + tl.arange(0, BM)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    t_ok = t < T
    q = tl.load(Q + (b64 * T + t[:, None]) * (H * DK) + h * DK + dk[None, :],
                mask=t_ok[:, None] & (dk < DK)[None, :], other=0.0)
    row = (b64 * T + t) * H + h
    if HAS_SLOTS:
        m_i = tl.load(LS + row, mask=t_ok, other=0.0)
        l_i = tl.full([BM], 1.0, tl.float32)
        acc = tl.load(OS + row[:, None] * DV + dv[None, :],
                      mask=t_ok[:, None] & (dv < DV)[None, :], other=0.0)
    else:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BV], tl.float32)

    k_new = K + b64 * T * HKV * DK + hk * DK
    k_ring = KR + b64 * C * HKV * DK + hk * DK
    v_new = V + b64 * T * HKV * DV + hk * DV
    v_ring = VR + b64 * C * HKV * DV + hk * DV
    qk_scale = sm_scale * 1.4426950408889634
    lo, hi = _key_range(t0, BM, C, T, W, pos)
    query_row = C + t
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        j_ok = j < hi
        real = history_mask(PM + b64 * T, RM + b64 * C, j, C, pos, T, HAS_PM)
        kp = history_rows(k_new, k_ring, j, C, pos, HKV * DK, HKV * DK)
        vp = history_rows(v_new, v_ring, j, C, pos, HKV * DV, HKV * DV)
        k = tl.load(kp[:, None] + dk[None, :],
                    mask=j_ok[:, None] & (dk < DK)[None, :], other=0.0)
        v = tl.load(vp[:, None] + dv[None, :],
                    mask=j_ok[:, None] & (dv < DV)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
        s = s * qk_scale
        seen = ((j[None, :] <= query_row[:, None])
                & (j[None, :] > query_row[:, None] - W)
                & (j_ok & (real > 0))[None, :])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            input_precision=PRECISION)
        m_i = m_new
    some = l_i > 0
    out = acc / tl.where(some, l_i, 1.0)[:, None]
    lse = tl.where(some, m_i + tl.log2(tl.where(some, l_i, 1.0)), 0.0)
    tl.store(O + row[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty),
             mask=t_ok[:, None] & (dv < DV)[None, :])
    tl.store(L + row, lse, mask=t_ok)


@triton.jit
def window_dq_kernel(
        Q, K, V, KR, VR, PM, RM, POS, DO, L, DELTA, DQ,
        T, C, W, sm_scale,
        H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    b64 = b.to(tl.int64)
    pos = tl.load(POS)

    t0 = pid * BM
    t = t0 + tl.arange(0, BM)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    t_ok = t < T
    row = (b64 * T + t) * H + h
    q = tl.load(Q + row[:, None] * DK + dk[None, :],
                mask=t_ok[:, None] & (dk < DK)[None, :], other=0.0)
    do = tl.load(DO + row[:, None] * DV + dv[None, :],
                 mask=t_ok[:, None] & (dv < DV)[None, :], other=0.0)
    lse = tl.load(L + row, mask=t_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
    dq = tl.zeros([BM, BK], tl.float32)

    k_new = K + b64 * T * HKV * DK + hk * DK
    k_ring = KR + b64 * C * HKV * DK + hk * DK
    v_new = V + b64 * T * HKV * DV + hk * DV
    v_ring = VR + b64 * C * HKV * DV + hk * DV
    qk_scale = sm_scale * 1.4426950408889634
    lo, hi = _key_range(t0, BM, C, T, W, pos)
    query_row = C + t
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        j_ok = j < hi
        real = history_mask(PM + b64 * T, RM + b64 * C, j, C, pos, T, HAS_PM)
        kp = history_rows(k_new, k_ring, j, C, pos, HKV * DK, HKV * DK)
        vp = history_rows(v_new, v_ring, j, C, pos, HKV * DV, HKV * DV)
        k = tl.load(kp[:, None] + dk[None, :],
                    mask=j_ok[:, None] & (dk < DK)[None, :],
                    other=0.0).to(q.dtype)
        v = tl.load(vp[:, None] + dv[None, :],
                    mask=j_ok[:, None] & (dv < DV)[None, :],
                    other=0.0).to(do.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        seen = ((j[None, :] <= query_row[:, None])
                & (j[None, :] > query_row[:, None] - W)
                & (j_ok & (real > 0))[None, :] & t_ok[:, None])
        p = tl.where(seen, tl.exp2(tl.where(seen, s - lse[:, None], 0.0)),
                     0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + row[:, None] * DK + dk[None, :], dq * sm_scale,
             mask=t_ok[:, None] & (dk < DK)[None, :])


@triton.jit
def window_dkdv_kernel(
        Q, K, V, PM, DO, L, DELTA, DK_, DV_,
        T, W, sm_scale,
        H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr,
        DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_PM: tl.constexpr,
        PRECISION: tl.constexpr):
    """Gradients of the new tokens' window keys and values (ring entries
    belong to the state and get none). Query t sees new key u when
    0 <= t - u < W."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    G: tl.constexpr = H // HKV
    b64 = b.to(tl.int64)

    u0 = pid * BN
    u = u0 + tl.arange(0, BN)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    u_ok = u < T
    krow = (b64 * T + u) * HKV + hk
    k = tl.load(K + krow[:, None] * DK + dk[None, :],
                mask=u_ok[:, None] & (dk < DK)[None, :], other=0.0)
    v = tl.load(V + krow[:, None] * DV + dv[None, :],
                mask=u_ok[:, None] & (dv < DV)[None, :], other=0.0)
    if HAS_PM:
        real = tl.load(PM + b64 * T + u, mask=u_ok, other=0.0)
        key_ok = u_ok & (real > 0)
    else:
        key_ok = u_ok
    dk_acc = tl.zeros([BN, BK], tl.float32)
    dv_acc = tl.zeros([BN, BV], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    t_hi = tl.minimum(T, u0 + BN - 1 + W)
    for g in range(G):
        h = hk * G + g
        for t0 in range(u0, t_hi, BM):
            t = t0 + tl.arange(0, BM)
            t_ok = t < t_hi
            row = (b64 * T + t) * H + h
            q = tl.load(Q + row[:, None] * DK + dk[None, :],
                        mask=t_ok[:, None] & (dk < DK)[None, :],
                        other=0.0).to(k.dtype)
            do = tl.load(DO + row[:, None] * DV + dv[None, :],
                         mask=t_ok[:, None] & (dv < DV)[None, :],
                         other=0.0).to(v.dtype)
            lse = tl.load(L + row, mask=t_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=t_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            seen = ((t[None, :] >= u[:, None]) & (t[None, :] < u[:, None] + W)
                    & key_ok[:, None] & t_ok[None, :])
            p_t = tl.where(seen,
                           tl.exp2(tl.where(seen, s_t - lse[None, :], 0.0)),
                           0.0)
            dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk_acc += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK_ + krow[:, None] * DK + dk[None, :], dk_acc * sm_scale,
             mask=u_ok[:, None] & (dk < DK)[None, :])
    tl.store(DV_ + krow[:, None] * DV + dv[None, :], dv_acc,
             mask=u_ok[:, None] & (dv < DV)[None, :])
