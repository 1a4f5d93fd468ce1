"""vitkernels.quant: calibrate, RepQ-ViT reparameterization, quantize_ (real and simulated), on the
package's ViT/DeiT and Swin models."""
import copy

import pytest
import torch
import torch.nn as nn

from vitkernels import quant
from vitkernels.models import lowbit as lb
from vitkernels.models.vision_transformer import VisionTransformer, deit_small_patch16_224
from vitkernels.models.window_attention import SwinTransformer


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=10).eval()
    with torch.no_grad():        # LayerNorm affines with real inter-channel variation
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand_like(mod.weight) * 3 + 0.1)
                mod.bias.copy_(torch.randn_like(mod.bias))
    return m


def tiny_swin(seed=0):
    torch.manual_seed(seed)
    return SwinTransformer(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                           num_classes=10, drop_path_rate=0.0).eval()


def images(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


CONFIGS = [
    quant.Int8DynamicConfig(attn_bits=4),
    quant.Int8DynamicConfig(attn_bits=8, attn_quantizer="log2"),
    quant.Int8DynamicConfig(attn_bits=4, attn_quantizer="adalog", attn_base=1.6),
    quant.Int8DynamicConfig(),
    quant.Int4WeightConfig(group_size=32),
    quant.Int4Int8Config(),
    quant.ShiftWeightConfig(),
]


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_reparameterization_keeps_float_output(method):
    m = tiny_vit()
    x = images()
    state = quant.calibrate(m, [images(seed=5), images(seed=6)], method=method)
    assert len(state.attn) == 2 and len(state.layernorm) == 5
    with torch.no_grad():
        before = m(x)
        spread = state.layernorm["blocks.0.norm1"][1] - state.layernorm["blocks.0.norm1"][0]
        quant.reparameterize_layernorm_(m, state)
        after = m(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # The reparameterized activation shares one scale: its channel ranges now have (nearly) one width.
    lo, hi = state.layernorm["blocks.0.norm1"]
    assert float((hi - lo).std() / (hi - lo).mean()) < 0.01 < float(spread.std() / spread.mean())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c))
@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin])
def test_quantized_equals_simulation(config, model_fn):
    m = model_fn()
    state = quant.calibrate(m, [images(seed=5)])
    quant.reparameterize_layernorm_(m, state)
    real, sim = copy.deepcopy(m), copy.deepcopy(m)
    report = quant.quantize_(real, config, state)
    sim_report = quant.quantize_(sim, config, state, simulate=True)
    assert set(report.converted) == set(sim_report.converted)
    assert any(isinstance(mod, lb.Int8Linear) for mod in real.modules()) == isinstance(config, quant.Int8DynamicConfig)
    if getattr(config, "attn_bits", None) and model_fn is tiny_vit:
        assert {"blocks.0.attn", "blocks.1.attn"} <= set(report.converted)
    if getattr(config, "attn_bits", None) and model_fn is tiny_swin:
        assert any("window" in why for why in report.skipped.values())
    x = images()
    with torch.no_grad():
        got, want, fp = real(x), sim(x), m(x)
    assert rel_err(got, want) <= 1e-3, rel_err(got, want)
    # Still the same model: W8A8 stays close to fp32; 4-bit and power-of-two weights are coarser.
    assert rel_err(got, fp) < (0.15 if isinstance(config, quant.Int8DynamicConfig) else 1.0)


def test_state_dict_round_trip():
    config = quant.Int8DynamicConfig(attn_bits=4)
    m = tiny_vit()
    state = quant.calibrate(m, [images(seed=5)])
    quant.quantize_(m, config, state)
    other = tiny_vit(seed=3)                 # different weights, and calibrated on other data
    quant.quantize_(other, config, quant.calibrate(other, [images(seed=9)]))
    other.load_state_dict(m.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(other(x), m(x))
    assert other.blocks[0].attn._vitk_attn_params == m.blocks[0].attn._vitk_attn_params


def test_compile_fullgraph_deit_s():
    # DeiT-S's widths with 4 of its 12 blocks: every block is the same code, so fullgraph and the
    # recompile check cover the model, while 12 random-init blocks amplify rounding flips (below) by
    # an amount that depends on the CPU's vector width (5.4e-2 on AVX2, under 5e-2 on AVX-512).
    m = VisionTransformer(embed_dim=384, depth=4, num_heads=6, num_classes=10).eval()
    x = images(1, 224)
    state = quant.calibrate(m, [x])
    quant.quantize_(m, quant.Int8DynamicConfig(attn_bits=4), state)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)
        got = compiled(x)
        compiled(images(1, 224, seed=7))
    # Inductor's fused LayerNorm / GELU round differently in the last bit (1e-7: fp32 DeiT compiles to
    # 6.5e-7 of eager); the few per-token int8 codes that sit on a rounding tie then flip, and the
    # random-init blocks amplify that (these 4: 1.1e-2 on AVX2).
    err = rel_err(got, eager)
    assert err <= 5e-2, err


def test_nothing_to_quantize_gives_a_report():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    report = quant.quantize_(m, quant.Int8DynamicConfig())
    assert report.converted == {} and report.skipped == {}
    assert "nothing to quantize" in str(report)


def test_attention_needs_state():
    with pytest.raises(ValueError, match="^state:"):
        quant.quantize_(tiny_vit(), quant.Int8DynamicConfig(attn_bits=4))


def test_bad_configs():
    with pytest.raises(ValueError, match="^attn_bits:"):
        quant.quantize_(tiny_vit(), quant.Int8DynamicConfig(attn_bits=0), quant.QuantState())
    with pytest.raises(ValueError, match="^attn_base:"):
        quant.quantize_(tiny_vit(), quant.Int8DynamicConfig(attn_bits=4, attn_quantizer="adalog"), quant.QuantState())
    with pytest.raises(ValueError, match="^attn_quantizer:"):
        quant.quantize_(tiny_vit(), quant.Int8DynamicConfig(attn_bits=4, attn_quantizer="log3"), quant.QuantState())
    with pytest.raises(TypeError, match="^config:"):
        quant.quantize_(tiny_vit(), "int8")
    with pytest.raises(ValueError, match="^method:"):
        quant.calibrate(tiny_vit(), [images()], method="mse")


def test_report_lists_skips():
    m = tiny_vit()
    report = quant.quantize_(m, quant.Int4WeightConfig(group_size=64))
    # patch_embed is a conv; in_features 96 is not a multiple of 64; the MLP's fc2 (384) is.
    assert "blocks.0.attn.qkv" in report.skipped and "blocks.0.mlp.fc2" in report.converted
    assert "group_size" in report.skipped["blocks.0.attn.qkv"]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("model_fn", [tiny_vit, tiny_swin])
def test_mlp_activation_runs_in_fc1_epilogue(model_fn, approximate):
    m = model_fn()
    mlps = [(n, mod) for n, mod in m.named_modules() if type(mod).__name__ == "Mlp"]
    for _, mlp in mlps:
        mlp.act = nn.GELU(approximate=approximate)
    report = quant.quantize_(m, quant.Int8DynamicConfig())
    want = "gelu" if approximate == "none" else "gelu_tanh"
    for name, mlp in mlps:
        assert mlp.fc1.activation == want and isinstance(mlp.act, nn.Identity)
        assert want in report.converted[f"{name}.act"]
    x = images()
    with torch.no_grad():
        fused = m(x)
        for _, mlp in mlps:                 # the same quantized model with the activation as its own module
            mlp.fc1.activation, mlp.act = "none", nn.GELU(approximate=approximate)
        unfused = m(x)
    assert rel_err(fused, unfused) < 1e-5


def test_mlp_activation_stays_when_fc1_stays_float():
    m = tiny_vit()
    report = quant.quantize_(m, quant.Int4WeightConfig(group_size=64))   # fc1's in_features 96: skipped
    assert "blocks.0.mlp.fc1" in report.skipped and isinstance(m.blocks[0].mlp.act, nn.GELU)
    assert "blocks.0.mlp.act" not in report.converted
