"""Plain eager PyTorch ground truth for the codebook family.

This is how the VQ tokenizers' own code finds the nearest code (ViT-VQGAN, VQGAN-LC, FQGAN,
LlamaGen): expand ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, materialize the full N x K matrix with
one addmm, then argmin over K. It costs N x K memory, which is exactly what the fused kernels avoid.
"""
import math

import torch
import torch.nn.functional as F

_EPS = 1e-12  # F.normalize's default


def _as_groups(z: torch.Tensor, codebook: torch.Tensor):
    """(z as [G, N, D], codebook as [G, K, D], output shape z.shape[:-1])."""
    D = codebook.shape[-1]
    if codebook.dim() == 2:
        return z.reshape(1, -1, D), codebook.unsqueeze(0), z.shape[:-1]
    G = codebook.shape[0]
    # The row count spelled out: reshape(-1, ...) cannot infer it when G = 0.
    return z.reshape(math.prod(z.shape[:-2]), G, D).transpose(0, 1), codebook, z.shape[:-1]


def codebook_distances(z: torch.Tensor, codebook: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """The full [G, N, K] matrix of squared distances (or 2 - 2 cos), computed in at least fp32."""
    zg, cb, _ = _as_groups(z, codebook)
    acc = torch.promote_types(z.dtype, torch.float32)
    zg, cb = zg.to(acc), cb.to(acc)
    if cosine:
        zg, cb = F.normalize(zg, dim=-1), F.normalize(cb, dim=-1)
        return 2 - 2 * torch.bmm(zg, cb.transpose(1, 2))
    z2 = (zg * zg).sum(-1, keepdim=True)
    e2 = (cb * cb).sum(-1).unsqueeze(1)
    return torch.baddbmm(z2 + e2, zg, cb.transpose(1, 2), alpha=-2)


def _direct_scores(zg: torch.Tensor, cb: torch.Tensor, cosine: bool) -> torch.Tensor:
    """[G, N, K] in zg's dtype, without the expansion: ||z - e||^2, or for cosine -z.e / max(||e||, eps)
    (the cosine times ||z||, the same positive factor for every code of a row). Sums run over d in
    order, as the kernels' exact paths run them (they fuse each multiply-add)."""
    acc = zg.new_zeros(zg.shape[0], zg.shape[1], cb.shape[1])
    if cosine:
        for d in range(zg.shape[-1]):
            acc += zg[:, :, d, None] * cb[:, None, :, d]
        norm2 = torch.zeros_like(cb[..., 0])
        for d in range(cb.shape[-1]):
            norm2 += cb[..., d] * cb[..., d]
        # math.sqrt rounds correctly, as the kernels' square roots do; torch.sqrt on the CPU (SLEEF)
        # may be an ulp off, which would break ties such as a code and its multiple differently.
        norm = torch.tensor([math.sqrt(v) for v in norm2.flatten().tolist()], dtype=norm2.dtype)
        return -acc / norm.view_as(norm2).to(acc.device).clamp_min(_EPS)[:, None, :]
    for d in range(zg.shape[-1]):
        t = zg[:, :, d, None] - cb[:, None, :, d]
        acc += t * t
    return acc


def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False, exact: bool = False):
    """(indices int64, distances float32), each of shape z.shape[:-1].

    exact=False ranks by the expansion, in the inputs' precision (at least fp32), as the papers do;
    exact=True by the direct distances in float64. The reported distance is recomputed for the chosen
    code, ||z - e||^2 (cosine: 2 - 2 cos of the normalized vectors), rather than read back from the
    cancellation-prone expansion.

    Cosine ranks by -cos, not by 2 - 2 cos: for a row shorter than F.normalize's eps the normalized row
    is shorter than 1 and 2 - 2 cos would round its cosines away.

    Non-finite values (the ops' rule): a code holding a NaN or an infinity is never chosen unless every
    code of its group holds one; a row of z holding one gets code 0. torch.argmin alone would pick the
    first NaN distance, so one NaN code would capture every row of the batch, and an infinite row would
    be ranked by the expansion's inf - inf.
    """
    zg, cb, out_shape = _as_groups(z, codebook)
    acc = torch.float64 if exact else torch.promote_types(z.dtype, torch.float32)
    zf, cbf = zg.to(acc), cb.to(acc)
    bad_code = ~torch.isfinite(cbf).all(-1)                                 # [G, K]
    bad_row = ~torch.isfinite(zf).all(-1)                                   # [G, N]
    usable = cbf.masked_fill(bad_code[..., None], 0)                        # no inf - inf from a bad code
    penalty = torch.zeros_like(bad_code, dtype=acc).masked_fill(bad_code, float("inf")).unsqueeze(1)
    if exact:
        score = _direct_scores(zf, usable, cosine) + penalty
    elif cosine:
        score = torch.baddbmm(penalty, F.normalize(zf, dim=-1), F.normalize(usable, dim=-1).transpose(1, 2),
                              alpha=-1)
    else:
        z2 = (zf * zf).sum(-1, keepdim=True)
        e2 = (usable * usable).sum(-1).unsqueeze(1) + penalty
        score = torch.baddbmm(z2 + e2, zf, usable.transpose(1, 2), alpha=-2)
    idx = score.argmin(-1).masked_fill(bad_row, 0)                          # [G, N]
    chosen = torch.gather(cbf, 1, idx.unsqueeze(-1).expand(-1, -1, cb.shape[-1]))
    if cosine:
        dist = (2 - 2 * (F.normalize(zf, dim=-1) * F.normalize(chosen, dim=-1)).sum(-1)).clamp_min(0)
    else:
        dist = ((zf - chosen) ** 2).sum(-1)
    if codebook.dim() == 3:
        idx, dist = idx.transpose(0, 1), dist.transpose(0, 1)
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return idx.reshape(out_shape), dist.reshape(out_shape).to(out_dtype)


def codebook_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook[indices] ([K, D] codebook), or codebook[g, indices[..., g]] ([G, K, D] codebook)."""
    if codebook.dim() == 2:
        return codebook[indices.long()]
    G = codebook.shape[0]
    groups = torch.arange(G, device=indices.device)
    return codebook[groups, indices.long()]


def codebook_lookup_backward(grad_output: torch.Tensor, indices: torch.Tensor, codebook_shape) -> torch.Tensor:
    grad = grad_output.new_zeros(codebook_shape)
    D = codebook_shape[-1]
    rows = grad_output.reshape(indices.numel(), D)
    if len(codebook_shape) == 2:
        return grad.index_add_(0, indices.reshape(-1).long(), rows)
    G, K = codebook_shape[0], codebook_shape[1]
    flat = (indices.long() + torch.arange(G, device=indices.device) * K).reshape(-1)
    return grad.view(G * K, D).index_add_(0, flat, rows).view(codebook_shape)
