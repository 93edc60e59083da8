"""NHA_SPEC.md section 1, transcribed line by line in float64 NumPy.

Independent of the package: the ground truth every implementation is tested
against.
"""

import numpy as np


def nha_numpy(q, k, v, g, window_size, scale=None, qw=None, kw=None,
              padding_mask=None):
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    qw = q if qw is None else np.asarray(qw, np.float64)
    kw = k if kw is None else np.asarray(kw, np.float64)
    batch, length, heads, key_dim = q.shape
    kv_heads, num_slots = k.shape[2], g.shape[-1]
    real = (np.ones((batch, length)) if padding_mask is None
            else np.asarray(padding_mask, np.float64))
    scale = key_dim ** -0.5 if scale is None else scale
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(heads):
            c = h // (heads // kv_heads)
            slot_k = np.zeros((key_dim, num_slots))
            slot_v = np.zeros((num_slots, v.shape[-1]))
            for t in range(length):
                j = t - window_size
                if j >= 0 and real[b, j]:
                    a = np.exp(g[b, j, c])
                    s = 1 - a
                    slot_k = slot_k * a[None, :] + np.outer(k[b, j, c], s)
                    slot_v = slot_v * a[:, None] + np.outer(s, v[b, j, c])
                window = [i for i in range(max(0, t - window_size + 1), t + 1)
                          if real[b, i]]
                z_slot = scale * q[b, t, h] @ slot_k
                z_win = np.array([scale * qw[b, t, h] @ kw[b, i, c]
                                  for i in window])
                z = np.concatenate([z_slot, z_win])
                if z.size == 0:
                    continue
                p = np.exp(z - z.max())
                p /= p.sum()
                out[b, t, h] = p[:num_slots] @ slot_v
                if window:
                    out[b, t, h] += p[num_slots:] @ v[b, window, c]
    return out
