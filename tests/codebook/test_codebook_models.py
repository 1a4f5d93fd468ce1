"""The quantizer modules of vitkernels.models.codebook: semantics, gradients, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from vitkernels.models import (FactorizedVectorQuantizer, LargeCodebookQuantizer, VectorQuantizer,
                               codebook_usage, disentanglement_loss)
from vitkernels.reference import codebook as ref


def _spread(module):
    # Default init packs the codes into a tiny box; spread them so every test sees distinct codes.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("codebook_dim,cosine", [(None, False), (4, True), (4, False)])
def test_vector_quantizer_semantics(codebook_dim, cosine):
    vq = _spread(VectorQuantizer(dim=12, codebook_size=37, codebook_dim=codebook_dim, cosine=cosine, beta=0.3))
    z = torch.randn(2, 5, 12, requires_grad=True)
    zq, idx, loss = vq(z)
    ze = vq.proj_in(z)
    codes = vq.embedding.weight
    if cosine:
        ze, codes = F.normalize(ze, dim=-1), F.normalize(codes, dim=-1)
    expect_idx, _ = ref.codebook_argmin(ze.detach(), codes.detach())
    assert torch.equal(idx, expect_idx)
    e = codes[idx]
    torch.testing.assert_close(loss, F.mse_loss(e, ze.detach()) + 0.3 * F.mse_loss(ze, e.detach()))
    torch.testing.assert_close(zq, vq.proj_out(e))
    # Straight-through: z_q's gradient reaches z as if quantization were the identity.
    zq.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    vq.proj_out(vq.proj_in(z2) if not cosine else F.normalize(vq.proj_in(z2), dim=-1)).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_factorized_quantizer_semantics():
    fq = _spread(FactorizedVectorQuantizer(dim=10, codebook_size=23, groups=3, codebook_dim=4,
                                           disentangle_weight=0.5))
    z = torch.randn(7, 10)
    zq, idx, loss = fq(z)
    assert zq.shape == z.shape and idx.shape == (7, 3)
    ze = F.normalize(fq.proj_in(z).unflatten(-1, (3, 4)), dim=-1)
    codes = F.normalize(fq.embedding, dim=-1)
    expect_idx, _ = ref.codebook_argmin(ze.detach(), codes.detach())
    assert torch.equal(idx, expect_idx)
    e = codes[torch.arange(3), idx]
    u = F.normalize(e, dim=-1)
    pairs = [(u[:, a] * u[:, b]).sum(-1) ** 2 for a in range(3) for b in range(3) if a != b]
    dis = torch.stack(pairs).mean()
    torch.testing.assert_close(disentanglement_loss(e), dis)
    torch.testing.assert_close(loss, F.mse_loss(e, ze) + 0.25 * F.mse_loss(ze, e) + 0.5 * dis)


def test_large_codebook_quantizer():
    frozen = torch.randn(500, 16)
    lq = LargeCodebookQuantizer(frozen, dim=6)
    z = torch.randn(3, 4, 6)
    zq, idx, loss = lq(z)
    codes = lq.projector(frozen)
    expect_idx, _ = ref.codebook_argmin(z, codes.detach())
    assert torch.equal(idx, expect_idx)
    torch.testing.assert_close(zq, codes[idx])
    loss.backward()
    assert lq.projector.weight.grad is not None and lq.projector.weight.grad.abs().sum() > 0
    assert "frozen_codebook" in dict(lq.named_buffers())
    assert not any(p is lq.frozen_codebook for p in lq.parameters())


@pytest.mark.parametrize("make", [
    lambda: VectorQuantizer(dim=6, codebook_size=11, codebook_dim=3, cosine=True),
    lambda: VectorQuantizer(dim=5, codebook_size=9),
    lambda: FactorizedVectorQuantizer(dim=6, codebook_size=7, groups=2, codebook_dim=3),
    lambda: LargeCodebookQuantizer(torch.randn(13, 4), dim=5),
], ids=["vitvqgan", "plain", "fqgan", "vqganlc"])
def test_quantizer_loss_gradcheck(make):
    """Finite differences against autograd through the fused ops. The VQ loss as a whole has stop
    gradients, so each term is checked against the variables it trains: the codebook (and
    disentanglement) terms against the code parameters with the latents fixed, the commitment term
    against the input and encoder with the codes fixed. gradcheck perturbs the parameters in place,
    so the module sees each perturbation."""
    torch.manual_seed(1)
    m = _spread(make()).double()
    z = torch.randn(4, m.dim, dtype=torch.float64)
    named = dict(m.named_parameters())
    code_params = tuple(p for n, p in named.items() if n.startswith(("embedding", "projector")))
    enc_params = tuple(p for n, p in named.items() if n.startswith("proj_in"))

    def terms(z):
        ze, e, _ = m.quantize(z)
        return m.loss_terms(ze, e)

    def code_loss(*_):
        t = terms(z)
        return t["codebook"] + t.get("disentangle", 0.0)

    def commit_loss(z, *_):
        return terms(z)["commitment"]

    assert code_params and torch.autograd.gradcheck(code_loss, code_params)
    assert torch.autograd.gradcheck(commit_loss, (z.requires_grad_(), *enc_params))


def test_vector_quantizer_compiles_without_breaks_or_recompiles():
    torch._dynamo.reset()
    vq = _spread(VectorQuantizer(dim=16, codebook_size=64, codebook_dim=8, cosine=True))
    compiled = torch.compile(vq, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            z = torch.randn(3, 10, 16, requires_grad=True)
            zq, idx, loss = compiled(z)
            (zq.square().mean() + loss).backward()
            zq_e, idx_e, loss_e = vq(z)
            assert torch.equal(idx, idx_e)
            torch.testing.assert_close(loss, loss_e)
    assert vq.embedding.weight.grad is not None


def test_codebook_usage_without_one_hot():
    idx = torch.tensor([0, 0, 1, 3])
    used, ppl = codebook_usage(idx, 5)
    assert used.item() == pytest.approx(3 / 5)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert ppl.item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    used_g, ppl_g = codebook_usage(torch.tensor([[0, 1], [0, 2], [0, 3]]), 4, grouped=True)
    assert used_g.tolist() == pytest.approx([0.25, 0.75])
    assert ppl_g.tolist() == pytest.approx([1.0, 3.0])
