"""Plain eager PyTorch ground truth for the codebook family.

This is how the VQ tokenizers' own code finds the nearest code (ViT-VQGAN, VQGAN-LC, FQGAN,
LlamaGen): expand ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, materialize the full N x K matrix with
one addmm, then argmin over K. It costs N x K memory, which is exactly what the fused kernels avoid.
"""
import torch
import torch.nn.functional as F


def _as_groups(z: torch.Tensor, codebook: torch.Tensor):
    """(z as [G, N, D], codebook as [G, K, D], output shape z.shape[:-1])."""
    D = codebook.shape[-1]
    if codebook.dim() == 2:
        return z.reshape(1, -1, D), codebook.unsqueeze(0), z.shape[:-1]
    G = codebook.shape[0]
    return z.reshape(-1, G, D).transpose(0, 1), codebook, z.shape[:-1]


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


def codebook_argmin(z: torch.Tensor, codebook: torch.Tensor, *, cosine: bool = False):
    """(indices int64, distances float32), each of shape z.shape[:-1].

    The reported distance is recomputed exactly for the chosen code, ||z - e||^2 (cosine: 2 - 2 cos of
    the normalized vectors), rather than read back from the cancellation-prone expansion.
    """
    zg, cb, out_shape = _as_groups(z, codebook)
    d = codebook_distances(z, codebook, cosine)
    idx = d.argmin(-1)                                                      # [G, N]
    acc = d.dtype
    chosen = torch.gather(cb.to(acc), 1, idx.unsqueeze(-1).expand(-1, -1, cb.shape[-1]))
    zf = zg.to(acc)
    if cosine:
        dist = 2 - 2 * (F.normalize(zf, dim=-1) * F.normalize(chosen, dim=-1)).sum(-1)
    else:
        dist = ((zf - chosen) ** 2).sum(-1)
    if codebook.dim() == 3:
        idx, dist = idx.transpose(0, 1), dist.transpose(0, 1)
    return idx.reshape(out_shape), dist.reshape(out_shape).to(torch.float32 if acc != torch.float64 else acc)


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
