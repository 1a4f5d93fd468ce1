"""Thin modules from the papers, on vitk ops, keeping the original parameter names."""
from .codebook import (FactorizedVectorQuantizer, LargeCodebookQuantizer, VectorQuantizer,  # noqa: F401
                       codebook_usage, disentanglement_loss)
from .masked_attention import (GMMAttention, GMMViTAttention, HybridPerceptionBlock, MambaAttentionAllDouble,  # noqa: F401
                               MambaAttentionChunkDouble, SpatialReductionAttention, StripSelfAttention,
                               VisionRetentionAll)
from .vision_transformer import (VisionTransformer, deit_small_patch16_224, deit_tiny_patch16_224,  # noqa: F401
                                 vit_base_patch16_224)
from .spectral import (GFNetBlock, GlobalFilter, HyenaOperator2d, SpectFormerBlock,  # noqa: F401
                       SpectralGatingNetwork, SVT_channel_mixing)
from .shiftadd import (Block as ShiftAddBlock, LinAngularAttention_binary, Mlp_FMoE, NaiveGate,  # noqa: F401
                       NoisyGate, PVTv2Stage, PyTorchFMoE_FC, pvt_v2_b0_stage)
