"""One-token NHA decode on Triton: two launches, cost flat in the context.

Launch 1 does two independent jobs in one grid: (a) per batch row and kv
head, tiled over the state, the token that leaves the window (ring entry
`position % C`, or the new token when W = 0) enters the slot memory; (b) per
batch row, query head and block of ring rows, a partial softmax (max, sum,
weighted values) over the ring entries that stay, so the ring's keys are read
by many programs at once. Launch 2, per batch row and query head: slot logits
from the new slot memory, the partials, the new token, one softmax, the
output; the first query head of each kv head then writes the new token into
the ring (launch 1 has read the leaving entry by then: same stream).
"""

import torch
import triton
import triton.language as tl

from keras_nha.kernels.triton import common
from keras_nha.kernels.triton import launch
from keras_nha.kernels.triton.launch import launcher

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _update_slots(K_, V_, G_, PM, SK, SV, RK, RV, RG, NSK, NSV, bhk, tile,
                  here, C, HKV, DK: tl.constexpr, DV: tl.constexpr,
                  M: tl.constexpr, KT: tl.constexpr, VT: tl.constexpr,
                  MP: tl.constexpr, HAS_PM: tl.constexpr,
                  SOURCE: tl.constexpr):
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    cols = tl.arange(0, MP)
    m_ok = cols < M
    if SOURCE == 2:
        gate = tl.load(G_ + bhk.to(tl.int64) * M + cols, mask=m_ok,
                       other=0.0).to(tl.float32)
        if HAS_PM:
            gate = gate * tl.load(PM + b)
        k_src = K_ + bhk.to(tl.int64) * DK
        v_src = V_ + bhk.to(tl.int64) * DV
    elif SOURCE == 1:
        at = (b * C + here) * HKV + hk
        gate = tl.load(RG + at * M + cols, mask=m_ok, other=0.0)
        k_src = RK + at * DK
        v_src = RV + at * DV
    else:
        gate = tl.zeros([MP], tl.float32)
        k_src = K_ + bhk.to(tl.int64) * DK
        v_src = V_ + bhk.to(tl.int64) * DV
    alpha = tl.exp(gate)
    strength = 1.0 - alpha
    k_tiles = tl.cdiv(DK, KT)
    if tile < k_tiles:
        dk = tile * KT + tl.arange(0, KT)
        at_k = bhk.to(tl.int64) * DK * M + dk[:, None] * M + cols[None, :]
        ok_k = (dk < DK)[:, None] & m_ok[None, :]
        x_k = tl.load(k_src + dk, mask=dk < DK, other=0.0).to(tl.float32)
        s_k = tl.load(SK + at_k, mask=ok_k, other=0.0)
        tl.store(NSK + at_k, s_k * alpha[None, :]
                 + x_k[:, None] * strength[None, :], mask=ok_k)
    else:
        dv = (tile - k_tiles) * VT + tl.arange(0, VT)
        at_v = bhk.to(tl.int64) * M * DV + cols[:, None] * DV + dv[None, :]
        ok_v = m_ok[:, None] & (dv < DV)[None, :]
        x_v = tl.load(v_src + dv, mask=dv < DV, other=0.0).to(tl.float32)
        s_v = tl.load(SV + at_v, mask=ok_v, other=0.0)
        tl.store(NSV + at_v, s_v * alpha[:, None]
                 + strength[:, None] * x_v[None, :], mask=ok_v)


@triton.jit
def _ring_partial(QW, RKW, RV, RM, PART, bh, split, here, C, sm_scale, H, HKV,
                  DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, RB: tl.constexpr):
    """Max, sum and weighted values (base 2) of the ring rows of one block,
    the row being overwritten left out; written to PART[bh, split]."""
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // (H // HKV)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    j = split * RB + tl.arange(0, RB)
    j_ok = (j < C) & (j != here)
    qw = tl.load(QW + bh.to(tl.int64) * DK + dk, mask=dk < DK,
                 other=0.0).to(tl.float32)
    slot = (b * C + j) * HKV + hk
    kw = tl.load(RKW + slot[:, None] * DK + dk[None, :],
                 mask=j_ok[:, None] & (dk < DK)[None, :],
                 other=0.0).to(tl.float32)
    real = tl.load(RM + b * C + j, mask=j_ok, other=0.0)
    s = tl.sum(kw * qw[None, :], 1) * (sm_scale * 1.4426950408889634)
    s = tl.where(j_ok & (real > 0), s, NEG_INF)
    m = tl.max(s, 0)
    m_use = tl.where(m == NEG_INF, 0.0, m)
    p = tl.exp2(s - m_use)
    v = tl.load(RV + slot[:, None] * DV + dv[None, :],
                mask=j_ok[:, None] & (dv < DV)[None, :],
                other=0.0).to(tl.float32)
    out = PART + (bh.to(tl.int64) * tl.cdiv(C, RB) + split) * (BV + 2)
    tl.store(out + dv, tl.sum(p[:, None] * v, 0))
    tl.store(out + BV, m)
    tl.store(out + BV + 1, tl.sum(p, 0))


@triton.jit
def step_prepare_kernel(K_, V_, G_, QW, PM, POS, SK, SV, RK, RKW, RV, RG, RM,
                        NSK, NSV, PART, C, sm_scale, H, HKV, updates,
                        DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                        KT: tl.constexpr, VT: tl.constexpr, MP: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, RB: tl.constexpr,
                        HAS_PM: tl.constexpr, SOURCE: tl.constexpr):
    """Launch 1: programs [0, updates) update the slot memory (SOURCE: 0
    nothing enters, 1 the ring entry leaving the window, 2 the new token
    itself, W = 0); the rest compute ring partials."""
    pid = tl.program_id(0)
    pos = tl.load(POS)
    here = pos % tl.maximum(C, 1)
    if pid < updates:
        tiles = tl.cdiv(DK, KT) + tl.cdiv(DV, VT)
        _update_slots(K_, V_, G_, PM, SK, SV, RK, RV, RG, NSK, NSV,
                      pid // tiles, pid % tiles, here, C, HKV, DK, DV, M, KT,
                      VT, MP, HAS_PM, SOURCE)
    else:
        splits = tl.cdiv(C, RB)
        work = pid - updates
        _ring_partial(QW, RKW, RV, RM, PART, work // splits, work % splits,
                      here, C, sm_scale, H, HKV, DK, DV, BK, BV, RB)


@triton.jit
def step_attend_kernel(Q, QW, K_, KW, V_, G_, PM, POS, NSK, NSV, RK, RKW, RV,
                       RG, RM, PART, OUT, C, sm_scale, H, HKV,
                       DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, MT: tl.constexpr,
                       MP: tl.constexpr, RB: tl.constexpr,
                       SPLITS: tl.constexpr, HAS_PM: tl.constexpr):
    """Launch 2: slot logits, ring partials and the new token in one
    softmax; then the new token enters the ring."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    G = H // HKV
    hk = h // G
    bhk = b * HKV + hk
    pos = tl.load(POS)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    k_ok = dk < DK
    v_ok = dv < DV
    qk_scale = sm_scale * 1.4426950408889634
    q = tl.load(Q + bh.to(tl.int64) * DK + dk, mask=k_ok,
                other=0.0).to(tl.float32)
    m_i = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([1], tl.float32), 0)
    acc = tl.zeros([BV], tl.float32)
    for m0 in tl.static_range(0, MP if M > 0 else 0, MT):
        mm = m0 + tl.arange(0, MT)
        mm_ok = mm < M
        sk = tl.load(NSK + bhk * DK * M + dk[:, None] * M + mm[None, :],
                     mask=k_ok[:, None] & mm_ok[None, :], other=0.0)
        z = tl.where(mm_ok, tl.sum(q[:, None] * sk, 0) * qk_scale, NEG_INF)
        sv = tl.load(NSV + bhk * M * DV + mm[:, None] * DV + dv[None, :],
                     mask=mm_ok[:, None] & v_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(z, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * sv, 0)
        m_i = m_new
    if C > 0:
        here = pos % C
        if HAS_PM:
            real = tl.load(PM + b)
        else:
            real = 1.0
        # The ring partials of launch 1.
        sp = tl.arange(0, SPLITS)
        sp_ok = sp < tl.cdiv(C, RB)
        part = PART + (bh.to(tl.int64) * tl.cdiv(C, RB) + sp) * (BV + 2)
        m_p = tl.load(part + BV, mask=sp_ok, other=float("-inf"))
        l_p = tl.load(part + BV + 1, mask=sp_ok, other=0.0)
        a_p = tl.load(part[:, None] + dv[None, :], mask=sp_ok[:, None],
                      other=0.0)
        m_new = tl.maximum(m_i, tl.max(m_p, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(m_p == float("-inf"), 0.0, tl.exp2(m_p - m_use))
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(w * l_p, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a_p, 0)
        m_i = m_new
        # The new token, in the ring entry it takes over.
        qw = tl.load(QW + bh.to(tl.int64) * DK + dk, mask=k_ok,
                     other=0.0).to(tl.float32)
        kw_t = tl.load(KW + bhk * DK + dk, mask=k_ok, other=0.0).to(
            tl.float32)
        v_t = tl.load(V_ + bhk * DV + dv, mask=v_ok, other=0.0).to(tl.float32)
        s_t = tl.where(real > 0, tl.sum(kw_t * qw, 0) * qk_scale,
                       float("-inf"))
        m_new = tl.maximum(m_i, s_t)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p_t = tl.exp2(s_t - m_use)
        l_i = l_i * alpha + p_t
        acc = acc * alpha + p_t * v_t
        if h % G == 0:
            at = (b * C + here) * HKV + hk
            k_t = tl.load(K_ + bhk * DK + dk, mask=k_ok, other=0.0)
            tl.store(RK + at * DK + dk, k_t.to(RK.dtype.element_ty),
                     mask=k_ok)
            tl.store(RKW + at * DK + dk, kw_t.to(RKW.dtype.element_ty),
                     mask=k_ok)
            tl.store(RV + at * DV + dv, v_t.to(RV.dtype.element_ty),
                     mask=v_ok)
            ms = tl.arange(0, MP)
            g_t = tl.load(G_ + bhk * M + ms, mask=ms < M, other=0.0).to(
                tl.float32)
            tl.store(RG + at * M + ms, g_t * real, mask=ms < M)
            if hk == 0:
                tl.store(RM + b * C + here, real)
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(OUT + bh.to(tl.int64) * DV + dv, out.to(OUT.dtype.element_ty),
             mask=v_ok)


@torch.compiler.disable
def triton_nha_step(query, key, value, log_forget_gate, state, *, window_size,
                    scale, window_query, window_key, padding_mask,
                    inplace=False):
    """One decode step; the contract of `kernels.step.nha_step`.

    Args:
        query: `[B, H, K]`.
        key: `[B, Hkv, K]`.
        value: `[B, Hkv, V]`.
        log_forget_gate: `[B, Hkv, M]`.
        state: the state dict (`kernels/state.py`).
        window_size: Python int W.
        scale: Python float.
        window_query: `[B, H, K]`.
        window_key: `[B, Hkv, K]`.
        padding_mask: `[B]` or None.
        inplace: write the new token into `state`'s ring buffers instead of
            copies (the caller gives the old state up). The returned state
            then shares them.

    Returns:
        `(output [B, H, V] in the query's dtype, new_state)`.

    Example:

    >>> out, state = triton_nha_step(q, k, v, g, state, window_size=512,
    ...     scale=0.125, window_query=q, window_key=k, padding_mask=None)
    """
    launch.refresh()
    batch, heads, key_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    num_slots = log_forget_gate.shape[-1]
    capacity = state["keys"].shape[1]
    dev = query.device
    q, qw = query.contiguous(), window_query.contiguous()
    k, kw, v = key.contiguous(), window_key.contiguous(), value.contiguous()
    g = log_forget_gate.to(torch.float32).contiguous()
    has_mask = padding_mask is not None
    mask = (padding_mask.to(torch.float32).contiguous() if has_mask
            else g)
    position = state["position"].to(torch.int32).reshape(())
    slot_keys = state["slot_keys"].to(torch.float32).contiguous()
    slot_values = state["slot_values"].to(torch.float32).contiguous()
    new_keys = torch.empty_like(slot_keys)
    new_values = torch.empty_like(slot_values)
    ring = {}
    for name in ("keys", "window_keys", "values", "log_forget_gates", "mask"):
        x = state[name]
        if not capacity:
            x = torch.zeros(1, device=dev, dtype=x.dtype)
        elif not inplace or not x.is_contiguous():
            x = x.clone(memory_format=torch.contiguous_format)
        ring[name] = x
    if capacity == 0:
        source = 2
    else:
        source = 1 if capacity == window_size else 0
    mp = common.pow2(num_slots)
    bk, bv = common.pow2(key_dim), common.pow2(value_dim)
    kt = min(bk, max(16, 8192 // mp))
    vt = min(bv, max(16, 8192 // mp))
    rows = 16 if common.interpreting() else 64
    splits = common.cdiv(capacity, rows)
    parts = torch.empty(batch * heads * max(splits, 1) * (bv + 2),
                        device=dev, dtype=torch.float32)
    updates = (batch * kv_heads * (common.cdiv(key_dim, kt)
                                   + common.cdiv(value_dim, vt))
               if num_slots else 0)
    common_args = dict(DK=key_dim, DV=value_dim, M=num_slots, MP=mp, BK=bk,
                       BV=bv, RB=rows, HAS_PM=has_mask)
    warps = 1 if common.interpreting() else 4
    if updates + batch * heads * splits:
        launcher(step_prepare_kernel)[(updates + batch * heads * splits,)](
            k, v, g, qw, mask, position, slot_keys, slot_values,
            ring["keys"], ring["window_keys"], ring["values"],
            ring["log_forget_gates"], ring["mask"], new_keys, new_values,
            parts, capacity, float(scale), heads, kv_heads, updates, KT=kt,
            VT=vt, SOURCE=source, num_warps=2 * warps, **common_args)
    out = torch.empty(batch, heads, value_dim, device=dev, dtype=query.dtype)
    launcher(step_attend_kernel)[(batch * heads,)](
        q, qw, k, kw, v, g, mask, position, new_keys, new_values, ring["keys"],
        ring["window_keys"], ring["values"], ring["log_forget_gates"],
        ring["mask"], parts, out, capacity, float(scale), heads, kv_heads,
        MT=min(mp, max(16, 4096 // bv), max(16, 4096 // bk)),
        SPLITS=common.pow2(max(splits, 1), least=2), num_warps=warps,
        **common_args)
    acc = state["slot_keys"].dtype
    new_state = {"slot_keys": new_keys.to(acc),
                 "slot_values": new_values.to(acc),
                 "position": state["position"] + 1}
    for name in ring:
        new_state[name] = ring[name] if capacity else state[name]
    return out, new_state
