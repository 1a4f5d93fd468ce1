"""ViT / DeiT: timm's state-dict names load strictly, the fused model equals a plain transcription of
timm's forward, and it compiles without graph breaks."""
import pytest
import torch
import torch.nn.functional as F

from vitkernels.models import vision_transformer as vt


def _timm_state_dict(dim, depth, heads, classes, patch=16, img=224, chans=3, gen=None):
    """The keys and shapes timm's VisionTransformer (class token, qkv bias) saves, with random values."""
    n = (img // patch) ** 2 + 1

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.05

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, n, dim),
          "patch_embed.proj.weight": r(dim, chans, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    sd.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim), "head.weight": r(classes, dim), "head.bias": r(classes)})
    return sd


def _timm_forward(sd, x, depth, heads):
    """timm's VisionTransformer.forward written out over the state dict (eval mode)."""
    dim = sd["cls_token"].shape[-1]
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), 1) + sd["pos_embed"]
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, -1, dim), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(t, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name,dim,heads", [("deit_tiny_patch16_224", 192, 3), ("deit_small_patch16_224", 384, 6),
                                            ("vit_base_patch16_224", 768, 12)])
def test_timm_state_dict_loads_strictly(name, dim, heads):
    model = getattr(vt, name)(num_classes=10)
    sd = _timm_state_dict(dim, 12, heads, 10, gen=torch.Generator().manual_seed(1))
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("use_reference", [False, True])
def test_forward_matches_timm_transcription(use_reference):
    depth, heads, dim = 2, 3, 48
    gen = torch.Generator().manual_seed(2)
    model = vt.VisionTransformer(img_size=48, embed_dim=dim, depth=depth, num_heads=heads, num_classes=7,
                                 use_reference=use_reference).double().eval()
    sd = _timm_state_dict(dim, depth, heads, 7, img=48, gen=gen)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 48, 48, generator=gen, dtype=torch.float64)
    want = _timm_forward(sd, x, depth, heads)
    if use_reference:
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    else:  # the fused op computes in fp32
        model.float()
        torch.testing.assert_close(model(x.float()).double(), want, rtol=1e-4, atol=1e-4)


def test_backward_and_compile_fullgraph():
    torch.manual_seed(3)
    model = vt.VisionTransformer(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    ref = vt.VisionTransformer(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5, use_reference=True)
    ref.load_state_dict(model.state_dict())
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
