"""``train``: the Flamingo objective on a dataset mixture, from one CPU process to many GPUs.

Each optimizer step (paper section 2.4):

1. take this rank's share of one global batch of every dataset (``accumulate``) or of one dataset
   (``round_robin``), split into micro-batches;
2. one small all-reduce of the number of target tokens per dataset, so every process normalises by
   the *global* count: the step's loss is sum_d lambda_d * (sum of token NLL of d) / (targets of d),
   exactly what one process would compute on the whole global batch;
3. forward/backward per micro-batch with that weight; the gradient reduction runs once, in the last
   backward (FSDP2 ``set_requires_gradient_sync``), never per micro-step;
4. global-norm clipping once, a NaN/inf check (skip or stop), AdamW, the schedule;
5. metrics (one all-reduce), logging, and an atomic checkpoint every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.labels import collate
from ..data.mixture import COUNT_KEYS, Mixture
from ..data.packing import collate_packed
from ..data.samples import Sample
from .checkpoint import CHECKPOINTS_DIR, PendingCheckpoint, checkpoint_dir_name, latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from .comm import count_collectives
from .config import TrainConfig, load_train_config
from .distributed import DistEnv, autocast_context, full_tensor, init_distributed, prepare_model, reshard, set_gradient_sync
from .feature_cache import VisionFeatureCache
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler
from .plan import check_launch, check_shared_output_dir, data_workers, pin_memory

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """history: one dict per optimizer step run by this call (step, loss, loss/<name>, lr, grad_norm,
    tokens, tokens_per_s, skipped/<name>, skips, skipped_step). checkpoint_dir: the last checkpoint
    written; final_dir: the final model (save_pretrained layout + processor), if saved."""

    history: list[dict] = field(default_factory=list)
    checkpoint_dir: str | None = None
    final_dir: str | None = None
    start_step: int = 0


@dataclass
class DatasetBatch:
    """One dataset's part of a step on this rank: its micro-batches and its loss normalisation."""

    index: int
    weight: float
    micro: list[dict]  # empty when the step's samples are packed together (StepBatches.packed)
    num_targets: int  # target tokens of this dataset's *global* batch this step
    num_tokens: int = 0  # this rank's non-padding tokens
    keys: list[str] = field(default_factory=list)


@dataclass
class StepBatches:
    """A step's data on this rank: per dataset, and (``pack_length``) the micro-batches packing them all."""

    parts: list[DatasetBatch]
    packed: list[dict] = field(default_factory=list)


def micro_batches(samples: list[Sample], size: int | None, *, pad_token_id: int, media_token_id: int,
                  pin_memory: bool = False) -> list[dict]:
    """Collated micro-batches of ``size`` samples; ``pin_memory``: their tensors page-locked, so that the
    copies to the GPU (``non_blocking``) overlap the computation."""
    size = size or len(samples)
    batches = [collate(samples[i : i + size], pad_token_id=pad_token_id, media_token_id=media_token_id) for i in range(0, len(samples), size)]
    return [pinned(b) for b in batches] if pin_memory else batches


def pinned(batch: dict) -> dict:
    """The batch with its tensors page-locked (their copies to the GPU then overlap the computation)."""
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def _media_inputs(batch: dict, device: torch.device, feature_cache: VisionFeatureCache | None) -> dict:
    """A batch's media as the model takes them: vision features from ``feature_cache`` (looked up by the host
    copy's pixels) or the pixels, and the frame mask (None entries where the batch has none)."""
    pixels, mask = batch["pixel_values"], batch["frame_mask"]
    media = {"frame_mask": None if mask is None else mask.to(device, non_blocking=True)}
    if pixels is not None and feature_cache is not None:
        media["vision_features"] = feature_cache(pixels, mask, device)
    else:
        media["pixel_values"] = None if pixels is None else pixels.to(device, non_blocking=True)
    return media


def _loss_scale(part: DatasetBatch, world_size: int) -> float:
    """A dataset's factor on its NLL sum: lambda_d / its global targets, times the world size (the data-parallel
    reduction averages over processes while the objective sums them)."""
    return part.weight * world_size / max(part.num_targets, 1)


def forward_backward(model, parts: list[DatasetBatch], *, device: torch.device, precision: str = "fp32", world_size: int = 1,
                     reduce_every_micro_step: bool = False, feature_cache: VisionFeatureCache | None = None,
                     packed: list[dict] | None = None) -> torch.Tensor:
    """Accumulate the step's gradient: sum_d weight_d * grad(sum NLL_d) / num_targets_d.

    Gradients are scaled by ``world_size`` because the data-parallel reduction averages over processes
    while the objective sums them. The reduction runs once, in the last backward, unless
    ``reduce_every_micro_step`` (then each backward reduce-scatters, and no unsharded gradient is kept).
    ``feature_cache``: the vision features come from it (computed once per distinct frame). ``packed``: the
    parts' samples packed together (:func:`~flamingo_vlm.data.packing.collate_packed`, the parts in order as its
    datasets): one forward per packed micro-batch, each token weighted by its dataset's weight / targets.
    Returns this rank's NLL sum per part [len(parts)] (detached).
    """
    if packed:
        return _forward_backward_packed(model, parts, packed, device=device, precision=precision, world_size=world_size,
                                        reduce_every_micro_step=reduce_every_micro_step, feature_cache=feature_cache)
    total = sum(len(p.micro) for p in parts)
    done = 0
    sums = []
    for part in parts:
        nll_sum = torch.zeros((), device=device)
        scale = _loss_scale(part, world_size)
        for batch in part.micro:
            done += 1
            set_gradient_sync(model, reduce_every_micro_step or done == total)  # by default one reduction, in the last backward
            inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
            with autocast_context(precision, device):  # the loss fused with the LM head: no [B, L, V] logits kept
                media = _media_inputs(batch, device, feature_cache)
                nll = model(**inputs, **media, return_logits=False, loss_reduction="sum").loss
            (nll * scale).backward()
            nll_sum += nll.detach()
        sums.append(nll_sum)
    return torch.stack(sums) if sums else torch.zeros(0, device=device)


def _forward_backward_packed(model, parts: list[DatasetBatch], packed: list[dict], *, device: torch.device, precision: str,
                             world_size: int, reduce_every_micro_step: bool, feature_cache: VisionFeatureCache | None) -> torch.Tensor:
    scales = torch.tensor([_loss_scale(p, world_size) for p in parts], dtype=torch.float32, device=device)
    sums = torch.zeros(len(parts), dtype=torch.float32, device=device)
    for i, batch in enumerate(packed):
        set_gradient_sync(model, reduce_every_micro_step or i == len(packed) - 1)
        dataset = batch["dataset"].to(device, non_blocking=True)
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "labels")}
        weights = torch.where(dataset >= 0, scales[dataset.clamp(min=0)], torch.zeros((), device=device))
        with autocast_context(precision, device):
            media = _media_inputs(batch, device, feature_cache)
            out = model(**inputs, **media, attention_mask=None, loss_weights=weights, return_logits=False, loss_reduction="sum")
        out.loss.backward()
        real = dataset >= 0
        sums.index_add_(0, dataset[real], out.token_nll[real].float())
    return sums


def check_packed_attention(model, device: torch.device) -> None:
    """Raise unless the LM keeps packed samples apart: a sample's logits after another in the same row (position
    ids restarting at 0, no attention mask) must be its logits alone. LMs whose transformers code builds its masks
    with ``create_causal_mask`` do (Llama, Mistral, Qwen, Gemma, ...); others would let samples see each other."""
    vocab = min(int(model.config.new_token_ids[0]) if model.config.new_token_ids else model.lm.config.vocab_size, 1000)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 7), generator=g), torch.randint(0, vocab, (1, 5), generator=g)
    ids = torch.cat([a, b], dim=1).to(device)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(ids, attention_mask=None, position_ids=positions).logits[:, 7:].float()
            alone = model(b.to(device)).logits.float()
    finally:
        model.train(was_training)
    tol = (1e-3 if next(model.lm.parameters()).dtype == torch.float32 else 5e-2) * (1 + alone.abs().max().item())
    if not torch.allclose(packed, alone, rtol=0, atol=tol):
        raise ValueError(
            f"pack_length: this LM ({type(model.lm).__name__}) does not keep packed samples apart (a sample's logits after "
            f"another differ from its logits alone by up to {(packed - alone).abs().max().item():.3g}): its attention ignores "
            "restarting position ids. Train without packing (pack_length: null)."
        )


def take_step_batches(mixture: Mixture, step: int, config: TrainConfig, env: DistEnv) -> StepBatches:
    """This rank's micro-batches of every dataset the step uses (or, with ``pack_length``, of all of them packed
    together), each dataset normalised by its *global* target count (one all-reduce), so that N processes
    compute exactly what one process would."""
    pin = pin_memory(config, env.device.type)
    kw = dict(pad_token_id=mixture.pad_token_id, media_token_id=mixture.media_token_id)
    drawn = mixture.next_samples(step)
    packed: list[dict] = []
    if config.pack_length:
        packed = collate_packed([samples for _, samples in drawn], length=config.pack_length, rows_per_batch=config.pack_micro_batch_rows, **kw)
        if pin:
            packed = [pinned(b) for b in packed]
        parts = [DatasetBatch(d, config.datasets[d].loss_weight, [], sum(b["num_targets"][j] for b in packed),
                              sum(b["num_tokens"][j] for b in packed), [s.key for s in samples])
                 for j, (d, samples) in enumerate(drawn)]
    else:
        parts = []
        for d, samples in drawn:
            micro = micro_batches(samples, config.datasets[d].micro_batch_size, pin_memory=pin, **kw)
            parts.append(DatasetBatch(d, config.datasets[d].loss_weight, micro, sum(b["num_targets"] for b in micro),
                                      sum(b["num_tokens"] for b in micro), [k for b in micro for k in b["keys"]]))
    targets = torch.tensor([float(p.num_targets) for p in parts], dtype=torch.float64, device=env.device)
    for p, n in zip(parts, env.all_reduce_sum(targets).tolist()):
        p.num_targets = int(n)
    return StepBatches(parts, packed)


def reduce_step_stats(nll: torch.Tensor, parts: list[DatasetBatch], mixture: Mixture, env: DistEnv) -> tuple[dict[int, float], int, list[dict[str, int]]]:
    """One all-reduce for the step's metrics: (mean token loss per dataset index, tokens of the global
    batch, skip/drop counts so far per dataset)."""
    tokens = [float(p.num_tokens) for p in parts]
    counts = mixture.counts()
    stats = torch.cat([
        nll.double(),
        torch.tensor(tokens, dtype=torch.float64, device=env.device),
        torch.tensor([float(c.get(k, 0)) for c in counts for k in COUNT_KEYS], dtype=torch.float64, device=env.device),
    ])
    values = env.all_reduce_sum(stats).tolist()
    k = len(parts)
    losses = {p.index: values[i] / max(p.num_targets, 1) for i, p in enumerate(parts)}
    flat = values[2 * k :]
    n = len(COUNT_KEYS)
    global_counts = [{key: int(flat[d * n + j]) for j, key in enumerate(COUNT_KEYS)} for d in range(len(counts))]
    return losses, int(sum(values[k : 2 * k])), global_counts


def non_finite_report(step: int, loss: float, losses: dict[int, float], grad_norm: float, parts: list[DatasetBatch], names: list[str]) -> str:
    """Which step, dataset and samples gave a NaN/inf loss or gradient."""
    bad = [names[p.index] for p in parts if not math.isfinite(losses[p.index])] or ["(gradient)"]
    keys = [key for p in parts if names[p.index] in bad or bad == ["(gradient)"] for key in p.keys]
    per_dataset = {names[d]: v for d, v in losses.items()}
    return (f"step {step}: non-finite loss {loss} (per dataset: {per_dataset}, grad norm {grad_norm}) in {', '.join(bad)}; "
            f"batch: {keys[:8]}{' ...' if len(keys) > 8 else ''}")


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``resume: true`` -> the latest one in output_dir (None if there is
    none yet: a fresh start), or an explicit checkpoint path."""
    if config.resume is False or config.resume is None:
        return None
    if config.resume is True:
        return latest_checkpoint(config.output_dir)
    path = Path(str(config.resume))
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)  # an output_dir was given
    if latest is None:
        raise FileNotFoundError(f"resume={config.resume!r}: neither a checkpoint nor a directory holding checkpoints")
    return latest


def _merge_data_states(states: list[dict]) -> dict:
    merged: dict[str, Any] = {}
    for state in states:
        for name, s in state.items():
            entry = merged.setdefault(name, {"lanes": s["lanes"], "states": {}})
            entry["states"].update(s["states"])
    return merged


def _describe_counts(names: list[str], counts: list[dict[str, int]]) -> str:
    parts = []
    for name, c in zip(names, counts):
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k != "skipped_records" and v)
        if detail:
            parts.append(f"{name}: {c.get('skipped_records', 0)} records skipped ({detail})")
    return "; ".join(parts)


def train(
    model,
    processor,
    config: TrainConfig | dict | str | os.PathLike,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the bridge of ``model`` (a FlamingoModel) on ``config.datasets``.

    Works in one plain process and under ``torchrun`` (FSDP2 over the processes). ``callback(record)``
    runs after each optimizer step (after its checkpoint, if any). The model is trained in place; under
    FSDP2 it stays sharded, and ``final_dir`` holds the whole trained weights.
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    env = init_distributed(config.device)
    check_launch(config, env.world_size, env.device.type)  # every world-size rule, before the model is prepared
    torch.manual_seed(config.seed)
    output_dir = Path(config.output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    check_shared_output_dir(output_dir, env)
    found = resolve_resume(config) if env.is_main else None
    resume_from = env.broadcast_object(str(found) if found else None)  # one decision for every process

    prepare_model(model, config, env)
    if config.pack_length:
        check_packed_attention(model, env.device)
        reshard(model)  # a forward without a backward, under FSDP2
    named = list(model.trainable_parameters())
    params = [p for _, p in named]
    optimizer = build_optimizer(
        named, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
        gate_lr_multiplier=config.gate_lr_multiplier, lr_multipliers=config.lr_multipliers,
    )
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.steps, kind=config.schedule,
                                min_lr_ratio=config.min_lr_ratio, decay_steps=config.decay_steps)
    trainer_state: dict = {}
    if resume_from:
        trainer_state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, env=env)
    start = int(trainer_state.get("step", 0))
    result = TrainResult(checkpoint_dir=resume_from, start_step=start)
    names = [d.name for d in config.datasets]
    weights = [d.loss_weight for d in config.datasets]  # the paper's lambda_m

    mixture = Mixture(
        config.datasets, processor, strategy=config.mixture, seed=config.seed, rank=env.rank, world_size=env.world_size,
        num_workers=data_workers(config, env.device.type), prefetch_factor=config.prefetch_factor, data_root=config.data_root,
        state=trainer_state.get("data"),
    )
    log = MetricsLogger(output_dir, enabled=env.is_main, total_steps=config.steps, start_step=start, progress=progress,
                        log_every=config.log_every, tensorboard=config.tensorboard)
    if resume_from:
        log.message(f"resumed from {resume_from} at step {start}")
    elif config.resume:
        log.message(f"no checkpoint in {output_dir / CHECKPOINTS_DIR}: starting from step 0")
    if env.is_main and env.distributed:
        log.message(f"{env.world_size} processes, {config.distributed} on {env.device.type}")
    model.train()
    feature_cache = None
    if config.cache_vision_features:
        if any(p.requires_grad for p in model.vision_encoder.parameters()):
            raise ValueError("cache_vision_features needs a frozen vision encoder, but this model trains it")
        feature_cache = VisionFeatureCache(model, config.vision_feature_cache_mib << 20)
    last_counts = [dict(c) for c in trainer_state.get("counts", [{} for _ in names])]
    pending: PendingCheckpoint | None = None
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            batches = take_step_batches(mixture, step, config, env)
            parts = batches.parts
            with count_collectives() if config.count_communication else contextlib.nullcontext() as comm:
                nll = forward_backward(model, parts, device=env.device, precision=config.precision, world_size=env.world_size,
                                       reduce_every_micro_step=config.reduce_every_micro_step, feature_cache=feature_cache,
                                       packed=batches.packed)
            losses, tokens, counts = reduce_step_stats(nll, parts, mixture, env)
            loss = sum(weights[d] * v for d, v in losses.items())
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, config.grad_clip or math.inf)).item()  # once per step
            lr = optimizer.param_groups[0]["lr"]
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            else:
                text = non_finite_report(step + 1, loss, losses, grad_norm, parts, names)
                if config.nan_policy == "stop":
                    raise FloatingPointError(text + " (nan_policy: stop)")
                logger.warning("%s; step skipped (nan_policy: skip)", text)
                log.message(text + "; step skipped")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step + 1, "loss": loss, **{f"loss/{names[d]}": v for d, v in losses.items()},
                                      "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
                                      "time_s": elapsed, **{f"skipped/{n}": c["skipped_records"] for n, c in zip(names, counts)},
                                      "skips": {n: {k: v for k, v in c.items() if v} for n, c in zip(names, counts)},
                                      "skipped_step": not finite, **(comm.as_metrics() if comm is not None else {})}
            result.history.append(record)
            log.log(record)
            if (step + 1) % config.log_every == 0 and counts != last_counts:
                described = _describe_counts(names, counts)
                if described:
                    log.message(f"step {step + 1}: {described}")
                last_counts = counts

            if step + 1 == config.steps or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
                data_state = _merge_data_states(env.gather_objects(mixture.state_dict()))
                if pending is not None:  # the previous background save is published before the next starts
                    pending.wait()
                saved = save_checkpoint(
                    output_dir, step + 1, model=model, optimizer=optimizer, scheduler=scheduler, env=env, keep_last=config.keep_last,
                    trainer_state={"data": data_state, "counts": counts, "config": config.to_dict(), "time": time.time()},
                    background=config.async_checkpoint,
                )
                pending = saved if isinstance(saved, PendingCheckpoint) else None
                result.checkpoint_dir = str(output_dir / CHECKPOINTS_DIR / checkpoint_dir_name(step + 1))
            if callback is not None:
                callback(record)
                reshard(model)  # in case it ran forwards without a backward (an evaluation), under FSDP2
        if pending is not None:
            pending.wait()
            pending = None
        if config.save_final:
            result.final_dir = str(save_final(model, processor, output_dir / "final", env))
    finally:
        if pending is not None:  # stopped by an error: the last background write completes, unpublished
            pending.abandon()
        mixture.close()
        log.close()
    return result


__all__ = ["CHECKPOINTS_DIR", "TrainResult", "check_packed_attention", "forward_backward", "micro_batches", "resolve_resume", "train"]
