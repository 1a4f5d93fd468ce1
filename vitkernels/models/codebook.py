"""Vector quantizers of the VQ tokenizers, on the fused codebook ops.

- VectorQuantizer: ViT-VQGAN's factorized, l2-normalized codes (Yu et al., 2022).
- FactorizedVectorQuantizer: FQGAN's sub-codebooks with a disentanglement loss (Bai et al., 2024).
- LargeCodebookQuantizer: VQGAN-LC's frozen 100,000-entry feature codebook behind a trainable
  projector (Zhu et al., 2024).
- codebook_usage: fraction of codes used and perplexity, without an N x K one-hot.

Every quantizer returns (z_q, indices, loss): z_q carries the straight-through gradient to z,
loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (codebook + commitment terms, mean over elements).
The nearest-code search never builds the N x K distance matrix the original code does.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.codebook import codebook_argmin, codebook_lookup


def _searchable(x: torch.Tensor) -> torch.Tensor:
    # The search kernels take fp32/fp16/bf16; a float64 model (gradcheck, say) searches in fp32.
    return x.detach().float() if x.dtype == torch.float64 else x.detach()


def _vq_terms(z: torch.Tensor, e: torch.Tensor, beta: float) -> Dict[str, torch.Tensor]:
    # The codebook term moves codes toward the (fixed) latents; the commitment term keeps latents
    # near their (fixed) codes. Each term alone is a proper function of the variables it trains.
    return {"codebook": F.mse_loss(e, z.detach()), "commitment": beta * F.mse_loss(z, e.detach())}


def _straight_through(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return z + (e - z).detach()


class _Quantizer(nn.Module):
    """What the quantizers share: the fused nearest-code search of the latent among codes(), the VQ
    loss and the straight-through output. A quantizer says how z becomes the latent that is
    searched (_latent) and how the quantized latent becomes its output (_output)."""

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def _output(self, z_q: torch.Tensor) -> torch.Tensor:
        return z_q

    def quantize(self, z: torch.Tensor):
        """(latent, its code, indices) in the codebook space."""
        ze = self._latent(z)
        codes = self.codes()
        indices, _ = codebook_argmin(_searchable(ze), _searchable(codes))
        return ze, codebook_lookup(indices, codes), indices

    def loss_terms(self, ze: torch.Tensor, e: torch.Tensor) -> Dict[str, torch.Tensor]:
        return _vq_terms(ze, e, self.beta)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ze, e, indices = self.quantize(z)
        loss = sum(self.loss_terms(ze, e).values())
        return self._output(_straight_through(ze, e)), indices, loss


class VectorQuantizer(_Quantizer):
    """ViT-VQGAN's quantizer: optional projection of ``dim`` to a low ``codebook_dim`` for the search
    (and back), and with ``cosine=True`` l2-normalized latents and codes (the paper's choice, which
    improves codebook usage). Parameters: ``embedding.weight`` [codebook_size, codebook_dim], and
    ``proj_in`` / ``proj_out`` when codebook_dim differs from dim.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: Optional[int] = None,
                 cosine: bool = False, beta: float = 0.25):
        super().__init__()
        codebook_dim = codebook_dim or dim
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.cosine, self.beta = cosine, beta
        self.proj_in = nn.Linear(dim, codebook_dim) if codebook_dim != dim else nn.Identity()
        self.proj_out = nn.Linear(codebook_dim, dim) if codebook_dim != dim else nn.Identity()
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cosine else w

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        ze = self.proj_in(z)
        return F.normalize(ze, dim=-1) if self.cosine else ze

    def _output(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.proj_out(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.proj_out(codebook_lookup(indices, self.codes()))


def disentanglement_loss(codes: torch.Tensor) -> torch.Tensor:
    """FQGAN's disentanglement term for sub-codes ``codes`` [..., G, d]: the mean squared inner
    product of the l2-normalized sub-codes of different groups for the same token."""
    G = codes.shape[-2]
    if G < 2:
        return codes.new_zeros(())
    u = F.normalize(codes, dim=-1)
    gram = u @ u.transpose(-1, -2)                              # [..., G, G], G is small
    off = ~torch.eye(G, dtype=torch.bool, device=codes.device)
    return gram[..., off].pow(2).mean()


class FactorizedVectorQuantizer(_Quantizer):
    """FQGAN's factorized quantizer: ``groups`` sub-codebooks of ``codebook_size`` codes each, searched
    in one fused call (sub-codebook g only sees sub-vector g). Each group has its own projection of
    the encoder feature (``proj_in`` produces all groups at once); the quantized sub-vectors are
    concatenated and projected back. The loss adds ``disentangle_weight`` times the disentanglement
    term so the sub-codebooks learn complementary features.
    """

    def __init__(self, dim: int, codebook_size: int, groups: int, codebook_dim: int = 8,
                 cosine: bool = True, beta: float = 0.25, disentangle_weight: float = 0.1):
        super().__init__()
        self.dim, self.codebook_size, self.groups, self.codebook_dim = dim, codebook_size, groups, codebook_dim
        self.cosine, self.beta, self.disentangle_weight = cosine, beta, disentangle_weight
        self.proj_in = nn.Linear(dim, groups * codebook_dim)
        self.proj_out = nn.Linear(groups * codebook_dim, dim)
        self.embedding = nn.Parameter(torch.empty(groups, codebook_size, codebook_dim))
        nn.init.uniform_(self.embedding, -1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self) -> torch.Tensor:
        return F.normalize(self.embedding, dim=-1) if self.cosine else self.embedding

    def _latent(self, z: torch.Tensor) -> torch.Tensor:
        # [..., G, d]: the grouped search takes all groups in one launch, indices [..., G].
        ze = self.proj_in(z).unflatten(-1, (self.groups, self.codebook_dim))
        return F.normalize(ze, dim=-1) if self.cosine else ze

    def _output(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.proj_out(z_q.flatten(-2))

    def loss_terms(self, ze: torch.Tensor, e: torch.Tensor) -> Dict[str, torch.Tensor]:
        terms = super().loss_terms(ze, e)
        terms["disentangle"] = self.disentangle_weight * disentanglement_loss(e)
        return terms


class LargeCodebookQuantizer(_Quantizer):
    """VQGAN-LC's quantizer: a frozen ``[K, F]`` codebook of image features (the paper uses 100,000
    CLIP features) and a trainable linear ``projector`` to the lookup dimension ``dim``. Only the
    projector learns, so every code moves with it and the codebook stays fully used.
    """

    def __init__(self, frozen_codebook: torch.Tensor, dim: int, beta: float = 0.25):
        super().__init__()
        if frozen_codebook.dim() != 2:
            raise ValueError(f"frozen_codebook: expected [K, F], got shape {tuple(frozen_codebook.shape)}")
        self.register_buffer("frozen_codebook", frozen_codebook.detach().clone())
        self.projector = nn.Linear(frozen_codebook.shape[1], dim)
        self.dim, self.beta = dim, beta

    def codes(self) -> torch.Tensor:
        return self.projector(self.frozen_codebook)


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, codebook_size: int, *, grouped: bool = False):
    """(fraction of codes used, perplexity) from a histogram of ``indices``, never a one-hot.

    With ``grouped=True`` the last dimension of ``indices`` is the group, and both results are per
    group (shape [G]). Perplexity is exp(entropy) of the code distribution: codebook_size when every
    code is used equally, 1 when one code takes everything.
    """
    if grouped:
        G = indices.shape[-1]
        flat = indices.reshape(-1, G).long() + torch.arange(G, device=indices.device) * codebook_size
        counts = torch.bincount(flat.reshape(-1), minlength=G * codebook_size).view(G, codebook_size)
    else:
        counts = torch.bincount(indices.reshape(-1).long(), minlength=codebook_size).unsqueeze(0)
    counts = counts[:, :codebook_size].double()
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    used = (counts > 0).double().mean(-1)
    if not grouped:
        return used[0], entropy.exp()[0]
    return used, entropy.exp()
