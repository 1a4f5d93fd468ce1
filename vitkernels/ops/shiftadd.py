"""The shiftadd family (ShiftAddViT): binary "MatAdd" linear attention and mixture-of-experts dispatch.

torch.ops.vitk.binary_linear_attention(q, k, v) -> Tensor                       (differentiable in q, k, v)
torch.ops.vitk.expert_dispatch(x, expert_index, num_experts) -> (x_sorted, offsets, order)   (in x)
torch.ops.vitk.expert_combine(y_sorted, order, gate) -> Tensor                  (in y_sorted and gate)

Semantics: vitkernels/reference/shiftadd.py. binary_linear_attention is a composite (csrc/composites.cpp)
over binary_linear_attention_fwd, which also returns what its backward needs: the codes bit-packed
(int64 [2, B, heads, N, ceil(d / 64)]), the norms ([3, B, heads, N]: ||q||, ||k||, the output's before
normalizing) and the state k_b^T v ([B, heads, d, dv]), the last two in float64 for float64 inputs and
float32 otherwise. Its gradient is the official straight-through estimator's.
"""
from typing import List

import torch

from ..dispatch import ALL_FLOAT_DTYPES
from . import _checks as check
from ._define import Limit, cpp, define, triton

# The Triton dispatch holds one expert per lane of a row (vitkernels.triton.shiftadd.MAX_EXPERTS).
MAX_TRITON_EXPERTS = 1024

INDEX_DTYPES = {torch.int64}


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- binary_linear_attention
def _check_qkv(q, k, v, *_):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, dtypes=ALL_FLOAT_DTYPES, dims=4, layout="[B, N, heads, head_dim]", like=("q", q))
        check.same_dtype(name, t, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape {list(q.shape[:3])} + [head_dim_v], got {list(v.shape)}")
    check.nonempty_head_dims(q, v)


def _saved_shapes(q, v):
    B, N, nh, d = q.shape
    return (2, B, nh, N, (d + 63) // 64), (3, B, nh, N), (B, nh, d, v.shape[-1])


def _fwd_fake(q, k, v, save_for_backward=True):
    codes, norms, state = _saved_shapes(q, v)
    out = check.out_like(q, v)
    if not save_for_backward:
        return out, q.new_empty((0,), dtype=torch.int64), q.new_empty((0,), dtype=_acc(q)), \
            q.new_empty((0,), dtype=_acc(q))
    return out, q.new_empty(codes, dtype=torch.int64), q.new_empty(norms, dtype=_acc(q)), \
        q.new_empty(state, dtype=_acc(q))


def _fwd_setup(ctx, inputs, output):
    q, k, v, save = inputs
    out, codes, norms, state = output
    ctx.save_for_backward(q, k, v, out, codes, norms, state)
    ctx.lean = not save
    ctx.mark_non_differentiable(codes, norms, state)


def _fwd_backward(ctx, grad_out, grad_codes, grad_norms, grad_state):
    if ctx.lean:
        raise RuntimeError("binary_linear_attention_fwd: called with save_for_backward=False, so its backward has "
                           "none of the codes, norms and state it needs; call it with save_for_backward=True when "
                           "a gradient is wanted")
    q, k, v, out, codes, norms, state = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitk.binary_linear_attention_bwd(grad_out, q, k, v, out, codes, norms, state)
    return dq, dk, dv, None


define("binary_linear_attention_fwd", check=_check_qkv, fake=_fwd_fake, autograd=(_fwd_backward, _fwd_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("shiftadd", dtypes=ALL_FLOAT_DTYPES)])


def _check_bwd(grad_out, q, k, v, out, codes, norms, state):
    _check_qkv(q, k, v)
    shape = (*q.shape[:-1], v.shape[-1])
    check.like("grad_out", grad_out, q, shape)
    check.like("out", out, q, shape)
    cshape, nshape, sshape = _saved_shapes(q, v)
    for name, t, dtypes, want in (("codes", codes, INDEX_DTYPES, cshape), ("norms", norms, {_acc(q)}, nshape),
                                  ("state", state, {_acc(q)}, sshape)):
        check.tensor(name, t, dtypes=dtypes, like=("q", q))
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{name}: expected shape {list(want)}, got {list(t.shape)} (an empty one means the "
                             "forward ran with save_for_backward=False)")


def _bwd_fake(grad_out, q, k, v, out, codes, norms, state):
    return check.grad_like(q), check.grad_like(k), check.grad_like(v)


define("binary_linear_attention_bwd", check=_check_bwd, fake=_bwd_fake, device_arg=1,
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES), triton("shiftadd", dtypes=ALL_FLOAT_DTYPES)])


# ---------------------------------------------------------------- expert_dispatch / expert_combine
def _rows(name, t, like=None):
    check.tensor(name, t, dtypes=ALL_FLOAT_DTYPES, like=like)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected 2 dimensions [T, C], got shape {tuple(t.shape)}")


def _index(name, idx, x_name, x):
    check.tensor(name, idx, dtypes=INDEX_DTYPES, like=(x_name, x))
    if idx.dim() != 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected shape [T] = [{x.shape[0]}] ({x_name}'s rows), got {list(idx.shape)}")


def _check_dispatch(x, expert_index, num_experts):
    _rows("x", x)
    _index("expert_index", expert_index, "x", x)
    if int(num_experts) < 1:
        raise ValueError(f"num_experts: expected at least 1, got {num_experts}")


def check_expert_range(expert_index: torch.Tensor, num_experts: int) -> None:
    """Out-of-range expert indices raise IndexError, as the C++ kernel does (a GPU kernel cannot)."""
    if expert_index.numel():
        lo, hi = (int(t) for t in torch.aminmax(expert_index))
        if lo < 0 or hi >= num_experts:
            raise IndexError(f"expert_index: expected values in [0, {num_experts}), got {lo if lo < 0 else hi}")


def _dispatch_fake(x, expert_index, num_experts):
    return (x.new_empty(x.shape), expert_index.new_empty((int(num_experts) + 1,)),
            expert_index.new_empty(expert_index.shape))


def _dispatch_setup(ctx, inputs, output):
    _, _, order = output
    ctx.save_for_backward(order)
    ctx.mark_non_differentiable(output[1], order)


def _dispatch_backward(ctx, grad_sorted, grad_offsets, grad_order):
    (order,) = ctx.saved_tensors
    # x_sorted = x[order]: the gradient goes back to the rows' own places, a combine with gate 1.
    ones = grad_sorted.new_ones(order.shape[0])
    return torch.ops.vitk.expert_combine(grad_sorted, order, ones), None, None


define("expert_dispatch", check=_check_dispatch, fake=_dispatch_fake,
       autograd=(_dispatch_backward, _dispatch_setup), backends=[
           cpp("cpu", dtypes=ALL_FLOAT_DTYPES),
           triton("shiftadd", dtypes=ALL_FLOAT_DTYPES, guard=lambda x, idx, e: check_expert_range(idx, int(e)),
                  limits=[Limit("experts", MAX_TRITON_EXPERTS, lambda x, idx, e: int(e))]),
       ])


def _check_combine(y_sorted, order, gate, *_):
    _rows("y_sorted", y_sorted)
    _index("order", order, "y_sorted", y_sorted)
    check.tensor("gate", gate, dtypes=ALL_FLOAT_DTYPES, like=("y_sorted", y_sorted))
    if gate.dim() != 1 or gate.shape[0] != y_sorted.shape[0]:
        raise ValueError(f"gate: expected shape [T] = [{y_sorted.shape[0]}] (one gate per token, in token order), "
                         f"got {list(gate.shape)}")


def check_permutation(order: torch.Tensor) -> None:
    """order is a permutation of [0, T), refused by name as the C++ kernel does (a GPU kernel cannot)."""
    T = order.shape[0]
    if T == 0:
        return
    lo, hi = (int(t) for t in torch.aminmax(order))
    if lo < 0 or hi >= T:
        raise IndexError(f"order: expected values in [0, {T}), got {lo if lo < 0 else hi}")
    counts = torch.bincount(order, minlength=T)
    if int(counts.max()) > 1:
        raise ValueError(f"order: expected a permutation of [0, {T}), got {int(counts.argmax())} twice")


def _combine_fake(y_sorted, order, gate):
    return y_sorted.new_empty(y_sorted.shape)


def _combine_setup(ctx, inputs, output):
    y_sorted, order, gate = inputs
    ctx.save_for_backward(y_sorted, order, gate)


def _combine_backward(ctx, grad_out):
    y_sorted, order, gate = ctx.saved_tensors
    want_y, want_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dy, dgate = torch.ops.vitk.expert_combine_bwd(grad_out, y_sorted, order, gate, want_y, want_gate)
    return dy if want_y else None, None, dgate if want_gate else None


def _combine_guard(y_sorted, order, gate, *_):
    check_permutation(order)


define("expert_combine", check=_check_combine, fake=_combine_fake, autograd=(_combine_backward, _combine_setup),
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES),
                 triton("shiftadd", dtypes=ALL_FLOAT_DTYPES, guard=_combine_guard)])


def _check_combine_bwd(grad_out, y_sorted, order, gate, y_grad, gate_grad):
    _check_combine(y_sorted, order, gate)
    _rows("grad_out", grad_out, like=("y_sorted", y_sorted))
    check.same_dtype("grad_out", grad_out, "y_sorted", y_sorted)
    if grad_out.shape != y_sorted.shape:
        raise ValueError(f"grad_out: expected shape {list(y_sorted.shape)} (y_sorted's), got {list(grad_out.shape)}")


def _combine_bwd_fake(grad_out, y_sorted, order, gate, y_grad, gate_grad):
    dy = y_sorted.new_empty(y_sorted.shape if y_grad else (0,))
    return dy, gate.new_empty((gate.shape[0] if gate_grad else 0,))


define("expert_combine_bwd", check=_check_combine_bwd, fake=_combine_bwd_fake, device_arg=1,
       backends=[cpp("cpu", dtypes=ALL_FLOAT_DTYPES),
                 triton("shiftadd", dtypes=ALL_FLOAT_DTYPES,
                        guard=lambda grad_out, y_sorted, order, *_: check_permutation(order))])


# ---------------------------------------------------------------- Python API
def binary_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ShiftAddViT's binary linear attention, q, k [B, N, heads, d], v [B, N, heads, dv], any strides (views
    of a packed qkv projection are read in place) -> [B, N, heads, dv]:

        qn = q / ||q||, kn = k / ||k|| (per token and head), q_b = 1[qn > mean(qn)], k_b = 1[kn > mean(kn)]
        (each mean over the whole tensor, every batch and head: a value equal to it gives 0),
        out = normalize(0.5 v + (1/pi) q_b (k_b^T v)) per token and head.

    The products with the binary codes are additions over their set bits. Gradients are the official
    straight-through estimator's: q_b and k_b pass the gradient of clamp(qn, 0, 1) and clamp(kn, 0, 1)."""
    return torch.ops.vitk.binary_linear_attention(q, k, v)


def expert_dispatch(x: torch.Tensor, expert_index: torch.Tensor, num_experts: int):
    """x [T, C]'s rows grouped by expert_index [T] (int64 in [0, num_experts)), each expert's tokens in token
    order: (x_sorted [T, C], offsets int64 [E + 1], order int64 [T]) with x_sorted[i] = x[order[i]] and
    expert e's rows at [offsets[e], offsets[e + 1]). Deterministic; differentiable in x."""
    return torch.ops.vitk.expert_dispatch(x, expert_index, num_experts)


def expert_combine(y_sorted: torch.Tensor, order: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The experts' rows y_sorted [T, C'] back in token order, times gate [T] (in token order):
    out[order[i]] = gate[order[i]] * y_sorted[i]. order must be a permutation of [0, T). Differentiable in
    y_sorted and gate."""
    return torch.ops.vitk.expert_combine(y_sorted, order, gate)


__all__: List[str] = ["binary_linear_attention", "expert_dispatch", "expert_combine"]
