"""Next-token cross-entropy, and the same loss fused with the LM head so that training never holds the logits.

The logits of a training batch are its largest activation: [B, L, V] floats (4 x 128 x 32k in fp32 is 62 MiB,
8 x 2048 x 128k is 8 GiB), and an unfused loss keeps two or three tensors of that size alive across the
backward (the logits, log-softmax, their gradients). :func:`head_cross_entropy` runs the head and the loss
a chunk of rows at a time and computes the chunk's gradients right there (the gradient of a cross-entropy
is ``softmax - onehot``, known in the forward), so it keeps only ``[N, d]`` of gradient and does no extra
matrix products: the same two products (logits, then gradient of the hidden states) as the unfused path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets the loss skips (padding, <image>, text before the first image)

# Causal LMs whose forward is exactly ``lm_head(base_model(...)[0])``: no logit soft-capping or scaling
# after the head (Gemma 2/3, Cohere, Granite... have some), so the fused loss is the loss of their logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gptj", "opt", "phi", "phi3", "gemma",
    "olmo", "olmo2", "stablelm", "starcoder2", "falcon",
})


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: position t holds the label of t + 1 (the last is ignored).

    Shifting the labels instead of the logits keeps ``logits.flatten(0, 1)`` a view: ``logits[:, :-1]``
    would copy the whole [B, L-1, V] tensor, and its gradient again in the backward."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token NLL (mean or sum over predicted tokens): logits [B, L, V] predict labels [B, L] shifted by
    one; -100 is ignored."""
    shifted = shift_labels(labels)
    if not bool((shifted != IGNORE_INDEX).any()):
        return logits.sum() * 0.0  # nothing to predict: a zero that keeps the graph
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(head(hidden[i]), labels[i]) over rows (w_i = 1 without ``row_weights``), a chunk of rows at
    a time; gradients made in the forward. Returns (that sum, each row's CE [N], not differentiable)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor | None, head: nn.Module, chunk: int,
                *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        want_hidden = ctx.needs_input_grad[0]
        want = [ctx.needs_input_grad[5 + i] for i in range(len(weights))]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weights = [torch.zeros_like(w) if w_wanted else None for w, w_wanted in zip(weights, want)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].detach().requires_grad_(want_hidden)
            with torch.enable_grad():
                logits = head(h)
                if row_weights is None:
                    loss = F.cross_entropy(logits.float(), labels[start : start + chunk], reduction="sum")
                else:
                    nll = F.cross_entropy(logits.float(), labels[start : start + chunk], reduction="none")
                    loss = (nll * row_weights[start : start + chunk]).sum()
            wrt = ([h] if want_hidden else []) + [w for w, w_wanted in zip(weights, want) if w_wanted]
            grads = list(torch.autograd.grad(loss, wrt)) if wrt else []
            if want_hidden:
                grad_hidden[start : start + chunk] = grads.pop(0)
            for i, w_wanted in enumerate(want):
                if w_wanted:
                    grad_weights[i] += grads.pop(0)
            total += loss.detach()
            if row_weights is not None:
                rows[start : start + chunk] = nll.detach()
        ctx.save_for_backward(*(g for g in [grad_hidden, *grad_weights] if g is not None))
        ctx.layout = [grad_hidden is not None] + [g is not None for g in grad_weights]
        ctx.mark_non_differentiable(rows)
        return total, rows

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_rows: torch.Tensor | None = None):
        saved = iter(ctx.saved_tensors)
        grads = [None if not present else (g := next(saved)) * grad_total.to(g.dtype) for present in ctx.layout]
        return grads[0], None, None, None, None, *grads[1:]


def head_weights(head: nn.Module) -> list[torch.Tensor]:
    """The tensors ``head``'s output depends on that may need a gradient: its parameters, and new token
    rows it shares with the input embedding (:class:`~flamingo_vlm.modeling.lm.ExtendedLMHead`)."""
    weights = list(head.parameters())
    tied = getattr(head, "tied_to", None)
    if tied:
        weights += [p for p in tied[0].parameters() if all(p is not w for w in weights)]
    return weights


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, reduction: str = "mean",
                       chunk_bytes: int | None = None) -> torch.Tensor:
    """Next-token NLL of ``head(hidden)`` without materialising the logits.

    hidden [B, L, d] (the LM's final hidden states), labels [B, L] (unshifted; -100 ignored). Equal to
    ``causal_lm_loss(head(hidden), labels, reduction)`` up to float rounding. Rows without a target (padding,
    ``<image>`` tokens) are skipped; the rest go through the head ``chunk_bytes`` of fp32 logits at a time
    (default 8 MiB on CPU, where small chunks also keep glibc's heap from growing, and 256 MiB on GPUs,
    where a matrix product needs many rows to run at speed).
    """
    total, count, _ = _fused_nll(hidden, head, labels, None, chunk_bytes)
    return total / count if reduction == "mean" and count else total


def head_cross_entropy_weighted(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, weights: torch.Tensor,
                                chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`head_cross_entropy` with a weight per target: (sum_t weights[t] * NLL of labels[t], the NLL of each
    target [B, L], detached, 0 where ignored). weights [B, L] are aligned with labels (a batch packing samples
    of several datasets weighs each dataset's tokens by its loss weight over its target count)."""
    total, _, rows = _fused_nll(hidden, head, labels, weights, chunk_bytes)
    return total, rows


def _fused_nll(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, weights: torch.Tensor | None,
               chunk_bytes: int | None) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(sum of (weighted) NLL, number of targets, per-target NLL [B, L] aligned with labels when weighted)."""
    if chunk_bytes is None:
        chunk_bytes = (256 << 20) if hidden.is_cuda else (8 << 20)
    shifted = shift_labels(labels).flatten()
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    token_nll = None if weights is None else hidden.new_zeros(labels.shape, dtype=torch.float32)
    if keep.numel() == 0:
        return hidden.sum() * 0.0, 0, token_nll
    rows = hidden.flatten(0, 1).index_select(0, keep)
    vocab = int(getattr(head, "vocab_size", 0) or head.weight.shape[0])
    chunk = max(16, chunk_bytes // (4 * vocab))
    row_weights = None if weights is None else shift_labels_like(weights).flatten().index_select(0, keep).float()
    total, nll = _HeadCrossEntropy.apply(rows, shifted.index_select(0, keep), row_weights, head, chunk, *head_weights(head))
    if token_nll is not None:
        shifted_nll = torch.zeros(labels.numel(), dtype=torch.float32, device=hidden.device).index_copy(0, keep, nll)
        token_nll[:, 1:] = shifted_nll.view(labels.shape)[:, :-1]  # the NLL of labels[t] sits at t - 1
    return total, keep.numel(), token_nll


def shift_labels_like(values: torch.Tensor) -> torch.Tensor:
    """[B, L] per-label values (weights) shifted as :func:`shift_labels` shifts the labels (0 at the end)."""
    return F.pad(values[:, 1:], (0, 1), value=0)


def causal_lm_loss_weighted(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused :func:`head_cross_entropy_weighted`: logits [B, L, V], labels and weights [B, L]."""
    shifted = shift_labels(labels)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    total = (nll * shift_labels_like(weights).float()).sum()
    token_nll = torch.zeros_like(nll)
    token_nll[:, 1:] = nll.detach()[:, :-1]
    return total, token_nll
