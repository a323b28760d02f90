"""z-aggregation, the torch specification (and the CPU implementation).

``zagg(out, x, idx, kind, chan_base, chan_cstride, jpos)`` fills, for every image n, table
row j, input channel c and slot k::

    members  = [x[n, c, z] for z in idx[j, k] if z >= 0] + [0 for z in idx[j, k] if z == -1]
    value    = members[0]                      kind 0 (identity)
             = sum(members) / len(members)     kind 1 (mean)
             = sqrt(sum((m - mean)**2) / len)  kind 2 (population std)
    out[n, jpos[j], chan_base[k] + c * chan_cstride[k]] = value

with ``x`` ``(N, C, S, Y, X)``, ``out`` ``(N, J', C', Y, X)`` (any strides), ``idx`` int64
``(J, K, G)`` (-1 a zero slice that counts, -2 nothing). MEAN/STD accumulate in float32
(float64 when ``x`` or ``out`` is float64); identity copies (casting to ``out``'s dtype).
"""

from __future__ import annotations

import torch

__all__ = ["zagg_reference", "compute_dtype"]


_SAME_BITS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any tensor is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _gather(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x (N, C, S, Y, X), z int64 (J, K') -> (N, J, C, K', Y, X); entries < 0 give 0.

    One plane copy per entry (``index_select`` along a middle axis is ~50x slower on CPU).
    """
    J, Kp = z.shape
    N, C, _, Y, X = x.shape
    g = torch.empty((N, J, C, Kp, Y, X), dtype=x.dtype, device=x.device)
    for j, row in enumerate(z.tolist()):
        for k, zi in enumerate(row):
            if zi >= 0:
                g[:, j, :, k] = x[:, :, zi]
            else:
                g[:, j, :, k] = 0
    return g


def zagg_reference(out, x, idx, kind, chan_base, chan_cstride, jpos) -> torch.Tensor:
    """The spec above, vectorised per slot kind (a few gathers, no Python loop over pixels).

    Returns ``out`` (filled in place).
    """
    dev = x.device
    idx, kind = idx.to(dev), kind.to(dev)
    C = x.shape[1]
    chan = chan_base.to(dev)[None, :] + torch.arange(C, device=dev)[:, None] * chan_cstride.to(
        dev
    )[None, :]  # (C, K)
    jj = jpos.to(dev).reshape(-1, 1, 1)
    bits = _SAME_BITS.get(out.dtype)  # torch has no index_put for unsigned 16/32/64
    target = out.view(bits) if bits is not None else out
    acc = compute_dtype(x.dtype, out.dtype)
    for k_kind in (0, 1, 2):
        ks = (kind == k_kind).nonzero().flatten()
        if ks.numel() == 0:
            continue
        sub = idx[:, ks]  # (J, K', G)
        cc = chan[:, ks][None]  # (1, C, K')
        if k_kind == 0:
            val = _gather(x, sub[:, :, 0]).to(out.dtype)
        else:
            member = sub >= 0  # real slices
            counted = sub >= -1  # real slices and zero padding
            cnt = counted.sum(-1).to(acc).reshape(1, *sub.shape[:2], 1, 1)  # (1, J, K', 1, 1)
            cnt = cnt.unsqueeze(2)  # (1, J, 1, K', 1, 1)
            vals = [
                _gather(x, torch.where(member[..., g], sub[..., g], -1)).to(acc)
                for g in range(sub.shape[-1])
            ]
            total = vals[0].clone()
            for v in vals[1:]:
                total += v
            mean = total / cnt
            if k_kind == 1:
                val = mean
            else:
                ss = torch.zeros_like(mean)
                for g, v in enumerate(vals):
                    w = counted[..., g].reshape(1, *sub.shape[:2], 1, 1).unsqueeze(2)
                    ss += torch.where(w, (v - mean) ** 2, 0)
                val = (ss / cnt).sqrt()
            val = val.to(out.dtype)
        target[:, jj, cc] = val.view(bits) if bits is not None else val  # (N, J, C, K', Y, X)
    return out
