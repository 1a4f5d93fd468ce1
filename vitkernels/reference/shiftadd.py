"""Eager references of the shiftadd family, written the way ShiftAddViT's own code computes them.

    binary_linear_attention   the MatAdd core of LinAngularAttention_binary: normalized q and k
                              binarized at their global means (a straight-through estimator for
                              training), out = 0.5 v + (1/pi) q_b (k_b^T v), normalized
    expert_dispatch           SparseDispatcher's scatter: token rows grouped by expert, stable
    expert_combine            SparseDispatcher's gather: expert rows back in token order, times the gate
    sparse_dispatcher_moe     the official MoE layer's whole path from dense gates: SparseDispatcher's
                              dispatch, the experts, and its log-space combine

Layout of the attention: q, k, v [B, N, heads, d] (heads before tokens inside, as the model's
reshape of its qkv projection gives them after the permute that this module undoes).
"""
import math
from typing import Sequence, Tuple

import torch


def binarize(x: torch.Tensor) -> torch.Tensor:
    """ShiftAddViT's binarization with its straight-through estimator: the forward value is
    1[x > mean(x)], the mean over the whole tensor (every batch, head, token and channel); the gradient
    is that of clamp(x, 0, 1)."""
    binary_no_grad = torch.gt(x - x.mean(), 0).to(x.dtype)
    clipped = torch.clamp(x, 0, 1.0)
    return binary_no_grad.detach() - clipped.detach() + clipped


def binary_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, N, heads, d] -> [B, N, heads, d]: the official forward, heads moved first and back."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))            # [B, heads, N, d]
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    q = binarize(q)
    k = binarize(k)
    attn = k.transpose(-2, -1) @ v                              # kq_matmul (MatAdd): [B, heads, d, dv]
    x = 0.5 * v + 1.0 / math.pi * (q @ attn)                    # kqv_matmul (MatAdd)
    x = x / x.norm(dim=-1, keepdim=True)
    return x.transpose(1, 2).contiguous()


def binary_codes(x: torch.Tensor) -> torch.Tensor:
    """The forward value of ``binarize`` after normalization, as a bool tensor (for tests of ties)."""
    x = x / x.norm(dim=-1, keepdim=True)
    return x > x.mean()


def expert_dispatch(x: torch.Tensor, expert_index: torch.Tensor,
                    num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseDispatcher: sort the tokens by expert (stable: a token keeps its place among its expert's),
    and the row counts per expert as offsets [E + 1]."""
    order = torch.sort(expert_index, stable=True).indices
    counts = torch.bincount(expert_index, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return x[order], offsets, order


def expert_combine(y_sorted: torch.Tensor, order: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """SparseDispatcher's combine for top-1 routing: expert rows times their token's gate, added at their
    token's place (index_add, as the official code does)."""
    stitched = y_sorted * gate[order].unsqueeze(1).to(y_sorted.dtype)
    zeros = y_sorted.new_zeros(order.shape[0], y_sorted.shape[1])
    return zeros.index_add(0, order, stitched)


def sparse_dispatcher_moe(inp: torch.Tensor, gates: torch.Tensor, experts: Sequence) -> torch.Tensor:
    """The official MoE layer (fmoe_new.py's SparseDispatcher) on tokens inp [T, C] with dense gates [T, E]
    (nonzero where a token is routed): tokens found by nonzero, grouped by expert, split by the counts,
    each group through its expert, and combined in log space: log(sum over a token's experts of
    exp(y) * gate), a zero sum replaced by float eps. For top-1 routing this is y * gate up to that eps
    (and exp overflows beyond y = 88 in float32)."""
    nonzero = torch.nonzero(gates)
    sorted_experts, index_sorted_experts = nonzero.sort(0)
    _, expert_index = sorted_experts.split(1, dim=1)
    batch_index = nonzero[index_sorted_experts[:, 1], 0]
    part_sizes = (gates > 0).sum(0).tolist()
    nonzero_gates = torch.gather(gates[batch_index], 1, expert_index)
    expert_inputs = torch.split(inp[batch_index], part_sizes, dim=0)
    expert_outputs = [experts[i](expert_inputs[i]) for i in range(len(experts))]
    stitched = torch.cat(expert_outputs, 0).exp() * nonzero_gates
    zeros = torch.zeros(gates.shape[0], expert_outputs[-1].shape[1], dtype=stitched.dtype, device=stitched.device)
    combined = zeros.index_add(0, batch_index, stitched)
    combined = torch.where(combined == 0, torch.finfo(torch.float64).eps, combined)
    return combined.log()
