"""Cross-entropy of a linear LM head without the ``(tokens, vocab)`` logits of the whole batch.

Why: in causal-LM fine-tuning the head's logits (batch x length x 49k
floats for SmolLM2) and their log-softmax are the largest single tensors of
a step (measured in ``benchmarks/sft_memory.py``), although the loss reads
only the labelled positions (the assistant replies: about a third of the
tokens in the SFT example). Here the head runs on the labelled positions
only, ``rows`` of them at a time, so at most ``rows x vocab`` logits exist at
once.

The loss is a sum (the loop normalises), so its gradient with respect to the
logits of each chunk, ``softmax - target distribution``, is known in the
forward pass: it is turned into the gradients of hidden states, head weight
and bias there and then, and the backward pass only scales them by the
incoming scalar. That costs no recomputation of the head (one head matmul
forward, one per gradient), and holds ``hidden``-sized and ``weight``-sized
gradients instead of the logits. Plain torch with its own backward: it runs
on every device, and the maintained fused kernels (Liger's, TRL's) are
Triton (GPU) or recompute the head in the backward pass.

Numerics follow ``F.cross_entropy(..., label_smoothing=eps, reduction="sum")``:
the target is (1 - eps) on the label plus eps / vocab on every class; the
softmax is computed in fp32 whatever the head's precision.
"""

from __future__ import annotations

from typing import Any

import torch

#: Logit floats per chunk (64 MiB in fp32): large enough for efficient matmuls.
CHUNK_FLOATS = 2**24


def chunk_rows(vocab: int, floats: int = CHUNK_FLOATS) -> int:
    """Rows per chunk so that one chunk's logits hold about ``floats`` values."""
    return max(1, floats // max(vocab, 1))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of one chunk of rows."""
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits += bias.float()
    return logits


def _chunk_losses(
    logits: torch.Tensor, targets: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-partition of fp32 ``logits``."""
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, targets[:, None]).squeeze(1)
    if eps:
        nll = (1 - eps) * nll + eps * (lse - logits.mean(dim=-1))
    return nll, lse


def linear_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    rows: int | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` (no gradients).

    Args:
        hidden: (N, H) states of the positions scored.
        weight: (V, H) head weight; bias: (V,) or None.
        targets: (N,) class ids (no ignored positions: select them out first).
        label_smoothing: eps of the smoothed target.
        rows: Rows per chunk (default: ``chunk_rows(V)``).
    """
    rows = rows or chunk_rows(weight.shape[0])
    dtype = _compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            logits = _chunk_logits(hidden[start:end].to(dtype), w, bias)
            out[start:end] = _chunk_losses(logits, targets[start:end], label_smoothing)[0]
    return out


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of a linear head; gradients are computed in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        eps: float,
        rows: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), **f32)
        grad_h = torch.empty(hidden.shape, **f32) if need_h else None
        grad_w = torch.zeros(weight.shape, **f32) if need_w else None
        grad_b = torch.zeros(weight.shape[0], **f32) if need_b else None
        vocab = weight.shape[0]
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            h, t = hidden[start:end].to(dtype), targets[start:end]
            logits = _chunk_logits(h, w, bias)
            losses, lse = _chunk_losses(logits, t, eps)
            total += losses.sum()
            # d loss / d logits = softmax - ((1 - eps) * onehot + eps / vocab), in place.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1 - eps
            if eps:
                grad -= eps / vocab
            g = grad.to(dtype)
            if grad_h is not None:
                grad_h[start:end] = g @ w
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:  # accumulate in fp32 whatever the head's precision
                    grad_w += (g.t() @ h).float()
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        scaled = tuple(
            None if g is None else (g * grad_out).to(dtype)
            for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        )
        ctx.grads = None
        return (*scaled, None, None, None)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` (arguments as ``linear_token_losses``).

    Differentiable with respect to ``hidden``, ``weight`` and ``bias``; equal to
    ``F.cross_entropy(hidden @ weight.T + bias, targets, label_smoothing=eps,
    reduction="sum")`` without building all the logits.
    """
    rows = rows or chunk_rows(weight.shape[0])
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return linear_token_losses(hidden, weight, bias, targets, label_smoothing, rows).sum()
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, label_smoothing, rows)
