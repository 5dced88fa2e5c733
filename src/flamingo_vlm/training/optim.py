"""AdamW over the bridge and the learning-rate schedule (paper appendix A.2 / section 2.4).

Weight decay 0.1 on the gated xattn blocks' weight matrices; none on the Perceiver Resampler (paper),
the new token embeddings, and the blocks' LayerNorm parameters and tanh-gate scalars (decaying those
would pull norms to zero and shut the gates). Learning rate: linear warm-up from 0, then constant
(paper) or cosine to ``min_lr_ratio * lr``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups from ``(flamingo name, parameter)`` pairs; each group keeps its ``names``."""
    decay, no_decay = [], []
    for name, p in named_params:
        # fine-tuned backbone matrices decay like the xattn blocks'; LoRA adapters do not (peft's default)
        matrix = p.ndim >= 2 and name.startswith(("xattn.", "vision_encoder.", "lm_layers."))
        (decay if matrix else no_decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "names": [n for n, _ in members], "weight_decay": wd})
    return groups


def split_gates(groups: list[dict], lr: float, multiplier: float) -> list[dict]:
    """Move the tanh-gate scalars into their own group with ``lr * multiplier``.

    The gates start at 0 and only open as fast as their learning rate lets them; a short run (the toy
    demo: minutes, not the paper's 500k steps) needs them to move faster than the weights they gate.
    """
    if multiplier == 1.0:
        return groups
    out = []
    for group in groups:
        gate = [i for i, n in enumerate(group["names"]) if n.endswith("_gate")]
        rest = [i for i in range(len(group["names"])) if i not in gate]
        for idx, extra in ((rest, {}), (gate, {"lr": lr * multiplier})):
            if idx:
                out.append({**group, **extra, "params": [group["params"][i] for i in idx], "names": [group["names"][i] for i in idx]})
    return out


# The parts of a fine-tuned model that may have their own learning rate (``lr_multipliers`` in TrainConfig),
# by the prefix of their flamingo_state_dict names (flamingo_vlm.modeling.finetune); the rest is the bridge.
LR_PARTS = {"vision": "vision_encoder.", "lm": "lm_layers.", "lora": "lora."}
SCHEDULES = ("constant", "cosine", "wsd")


def split_parts(groups: list[dict], lr: float, multipliers: dict[str, float]) -> list[dict]:
    """Move each backbone part named in ``multipliers`` ({"vision" | "lm" | "lora": m}) into groups of its
    own with ``lr * m`` (the paper fine-tunes the vision encoder at a smaller learning rate than the rest)."""
    unknown = sorted(set(multipliers) - set(LR_PARTS))
    if unknown:
        raise ValueError(f"lr_multipliers: unknown part(s) {unknown}; expected some of {sorted(LR_PARTS)}")
    if not multipliers:
        return groups
    out = []
    for group in groups:
        part_of = [next((k for k, prefix in LR_PARTS.items() if n.startswith(prefix) and k in multipliers), None) for n in group["names"]]
        for part in dict.fromkeys(part_of):
            idx = [i for i, k in enumerate(part_of) if k == part]
            extra = {} if part is None else {"lr": group.get("lr", lr) * multipliers[part]}
            out.append({**group, **extra, "params": [group["params"][i] for i in idx], "names": [group["names"][i] for i in idx]})
    return out


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, all on CPU or all on CUDA."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
    gate_lr_multiplier: float = 1.0, fused: bool | None = None, lr_multipliers: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW with the groups above. ``fused`` (default: wherever supported) runs torch's one-pass kernel:
    the same update as the per-tensor loop up to rounding, several times faster on CPU (benchmarks/RESULTS.md),
    as the loop reads and writes every state tensor several times."""
    if not named_params:
        raise ValueError("the model has no trainable parameters")
    if fused is None:
        fused = fused_adamw_supported([p for _, p in named_params])
    groups = split_parts(split_gates(param_groups(named_params, weight_decay), lr, gate_lr_multiplier), lr, dict(lr_multipliers or {}))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


class WarmupSchedule:
    """lr multiplier for optimizer step ``t`` (0-based): (t+1)/warmup during warm-up, then

    - ``constant``: 1;
    - ``cosine``: a cosine from 1 down to ``min_ratio`` at ``total`` steps;
    - ``wsd`` (warmup-stable-decay): 1, then over the last ``decay`` steps a straight line down to
      ``min_ratio`` (reached at step ``total``). A short decay at the end of a constant rate gives most of a
      cosine's gain without lowering the rate while the skills form.

    A class, not a lambda, so it pickles."""

    def __init__(self, warmup: int, total: int, kind: str = "constant", min_ratio: float = 0.0, decay: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if kind == "wsd" and not 0 < decay <= total - warmup:
            raise ValueError(f"schedule 'wsd' needs 0 < decay_steps <= steps - warmup_steps ({total - warmup}), got {decay}")
        self.warmup, self.total, self.kind, self.min_ratio, self.decay = warmup, total, kind, min_ratio, decay

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            left = min(1.0, max(0.0, (self.total - t) / self.decay))  # 1 until the decay starts, 0 at ``total``
            return self.min_ratio + (1.0 - self.min_ratio) * left
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, kind: str = "constant", min_lr_ratio: float = 0.0,
                    decay_steps: int = 0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(warmup_steps, total_steps, kind, min_lr_ratio, decay_steps))
