"""The small model the AOTInductor tests export: a Swin block (window_attention) followed by a PPMA
block (polyline_attention) and PVTv2's spatial-reduction attention (reduced_attention), so one
package holds ops of both attention families. Also a script that writes the package, an input and
the expected output for the C++-only test (tests/cpp/test_aoti_package.cpp):

    python tests/export/aoti_model.py OUT_DIR      ->  OUT_DIR/model.pt2, input.pt, expected.pt
"""
import os
import sys

import torch
from torch import nn

import vitkernels  # noqa: F401  (registers torch.ops.vitk)
from vitkernels.models.masked_attention import (MambaAttentionAllDouble, RotaryPositionEmbedding2D,
                                                SpatialReductionAttention)
from vitkernels.models.window_attention import SwinTransformerBlock

H = W = 8
DIM, HEADS = 32, 2


class TwoFamilies(nn.Module):
    def __init__(self):
        super().__init__()
        self.swin = SwinTransformerBlock(DIM, (H, W), num_heads=HEADS, window_size=4, shift_size=2)
        self.rope = RotaryPositionEmbedding2D(DIM, HEADS, initial_value=2.0, heads_range=4.0)
        self.ppma = MambaAttentionAllDouble(DIM, HEADS)
        self.sra = SpatialReductionAttention(DIM, num_heads=HEADS, sr_ratio=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x [B, H, W, C]
        x = self.swin(x)
        x = x + self.ppma(x, self.rope((H, W)))
        B = x.shape[0]
        return x + self.sra(x.reshape(B, H * W, DIM), (H, W)).reshape(B, H, W, DIM)


def build(seed: int = 0):
    """The model (eval mode, fixed weights) and an input."""
    torch.manual_seed(seed)
    model = TwoFamilies().eval()
    x = torch.randn(2, H, W, DIM)
    return model, x


def package(model: nn.Module, x: torch.Tensor, path: str) -> str:
    """torch.export, then AOTInductor into a .pt2 package at ``path``."""
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
    return torch._inductor.aoti_compile_and_package(ep, package_path=path)


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model, x = build()
    with torch.no_grad():
        expected = model(x)
    package(model, x, os.path.join(out_dir, "model.pt2"))
    # torch.save's archives are what torch::pickle_load reads in C++.
    torch.save(x, os.path.join(out_dir, "input.pt"))
    torch.save(expected, os.path.join(out_dir, "expected.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
