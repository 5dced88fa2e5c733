"""Processes, devices and model preparation: frozen dtype, activation checkpointing, torch.compile,
and FSDP2 (``fully_shard``), all applied in this one place.

FSDP2 units: each wrapped LM decoder layer (its gated xattn block together with the frozen layer: the
block's ``media_kv`` is called as a method, so it must live in the layer's unit), each vision encoder
layer, the resampler, and the root (embeddings with their new token rows, LM head, final norms).
Frozen parameters are sharded too but never get gradients: autograd only computes the input
gradients that carry the signal back to earlier xattn blocks. ``distributed: ddp`` uses the same
units on a (world, 1) mesh: parameters replicated, gradients all-reduced, as DDP does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.finetune import vision_blocks
from ..modeling.lm import FlamingoDecoderLayer, find_decoder_layers

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DistEnv:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (float64 on the collective's device, so counts stay exact)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1), else run as one process.

    Backend: NCCL on CUDA, gloo on CPU (so CI can run 2 CPU processes). Multi-node needs nothing here:
    torchrun's rendezvous flags (--nnodes, --node-rank, --rdzv-endpoint, ...) set the environment.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if device is None or str(device) == "cuda":  # one GPU per process: the local rank's
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **({"device_id": dev} if dev.type == "cuda" else {}))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast of the forward where the device supports it; a no-op context for fp32."""
    import contextlib

    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("bf16 is not supported on this GPU: training in fp32")
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in ``dtype`` (the paper keeps frozen weights in bf16); trained
    parameters (and so the optimizer state) stay fp32. Buffers (e.g. rotary tables) are left alone."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def decoder_layers(model) -> list[FlamingoDecoderLayer]:
    _, layers = find_decoder_layers(model.lm, model.decoder_layers_attr)
    return [layer for layer in layers if isinstance(layer, FlamingoDecoderLayer)]


def apply_activation_checkpointing(model) -> None:
    """Recompute each decoder layer (gated xattn block + frozen LM layer) in the backward pass.

    The layer's ``forward`` is replaced on the instance by a non-reentrant ``torch.utils.checkpoint`` of
    itself, so module names, ``isinstance`` checks and saved weights are unchanged (a CheckpointWrapper
    would rename every parameter). Must run before FSDP so recomputation happens inside the unit.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        if getattr(layer, "_flamingo_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._flamingo_checkpointed = True


def apply_compile(model, backend: str = "inductor", *, vision: bool = False) -> None:
    """``torch.compile`` the dense per-layer work: every frozen LM layer, the resampler's layers and the
    xattn feed-forwards (compiled in place: names unchanged); with ``vision``, the vision encoder's blocks
    too. The routed cross-attention is data-dependent (tokens grouped per image) and stays eager."""
    for layer in decoder_layers(model):
        layer.decoder_layer.compile(backend=backend, dynamic=True)
        if layer.gated_xattn is not None:
            layer.gated_xattn.ff.compile(backend=backend, dynamic=True)
    for attn, ff in model.resampler.layers:
        attn.compile(backend=backend, dynamic=True)
        ff.compile(backend=backend, dynamic=True)
    if vision:
        for block in _vision_blocks(model.vision_encoder):
            block.compile(backend=backend, dynamic=True)


def _vision_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The vision encoder's transformer blocks (its longest ModuleList of one layer type), if any."""
    return [block for _, block in vision_blocks(encoder)]


def device_mesh_shape(strategy: str, world_size: int, shard_size: int | None = None) -> tuple[int, ...]:
    """The mesh each strategy shards over: (world,) for FSDP; (replicas, shard) for DDP (shards of one)
    and HSDP (shards of ``shard_size`` processes). ValueError if the processes do not fill it."""
    if strategy == "fsdp":
        return (world_size,)
    if strategy == "ddp":
        return (world_size, 1)
    if strategy == "hsdp":
        if not shard_size or world_size % shard_size:
            raise ValueError(f"distributed: hsdp with shard_size={shard_size} needs a world size that is a multiple of it, got {world_size}")
        return (world_size // shard_size, shard_size)
    raise ValueError(f"distributed must be 'fsdp', 'ddp' or 'hsdp', got {strategy!r}")


def shard_model(model, env: DistEnv, strategy: str = "fsdp", *, frozen: str = "fsdp", precision: str = "fp32",
                shard_size: int | None = None) -> None:
    """Apply FSDP2 ``fully_shard`` to the model (see the module docstring for the units).

    frozen: "fsdp" shards the frozen backbones with the rest; "replicate" leaves them out of FSDP
    (``ignored_params``): every process holds them whole, and only the trained parameters are
    all-gathered, instead of the whole model twice per micro-step. precision "bf16": FSDP2's
    ``MixedPrecisionPolicy`` gathers parameters in bf16 and reduces gradients in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = device_mesh_shape(strategy, env.world_size, shard_size)
    # ddp is HSDP with shards of one: every parameter replicated, gradients all-reduced
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard") if len(shape) == 2 else None)
    if frozen not in ("fsdp", "replicate"):
        raise ValueError(f"frozen_sharding must be 'fsdp' or 'replicate', got {frozen!r}")
    ignored = None
    if frozen == "replicate":
        ignored = {p for p in model.parameters() if not p.requires_grad}
        if not any(p.is_meta for p in model.parameters()):  # (a meta model is materialised by its builder)
            model.to(env.device)  # FSDP moves what it manages; the frozen part is moved here, whole
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp, "ignored_params": ignored}
    units = [*decoder_layers(model), *_vision_blocks(model.vision_encoder), model.resampler]
    for unit in units:
        if not any(True for _ in unit.parameters()):
            continue  # nothing to shard (the resampler with use_resampler=False)
        if ignored is None or any(p.requires_grad for p in unit.parameters()):  # a unit of frozen weights only needs no FSDP
            fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


def set_gradient_sync(model, enabled: bool) -> None:
    """FSDP2: skip (False) or do (True) the gradient reduce-scatter/all-reduce of the next backward.
    Micro-steps before the last accumulate local unsharded gradients; the last one reduces their sum."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def reshard(model) -> None:
    """FSDP2: shard again every parameter a forward without a backward left gathered (the root module keeps its
    parameters after its forward, for the backward; a gradient-free forward, such as a check, must hand them back
    or the next backward's gradients are not reduced as sharded ones). Nothing to do without FSDP2."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()


def check_mixed_backbone(flamingo_config, frozen_dtype: str, precision: str) -> None:
    """ValueError when frozen backbone weights would be stored in ``frozen_dtype`` around trained backbone layers
    (fp32) without autocast: a trained vision block or LM layer would get bf16 inputs (or hand fp32 on to a bf16
    layer). LoRA adapters cast their own inputs and need nothing."""
    if frozen_dtype != "fp32" and precision != "bf16" and (flamingo_config.train_vision_blocks or flamingo_config.train_lm_layers):
        raise ValueError(
            f"frozen_dtype: {frozen_dtype} with trained backbone parts (train_vision_blocks={flamingo_config.train_vision_blocks}, "
            f"train_lm_layers={flamingo_config.train_lm_layers}) needs precision: bf16 (autocast): the trained layers stay fp32 "
            "between frozen bf16 ones"
        )


def apply_training_layout(model, config, env: DistEnv) -> None:
    """Frozen dtype, activation checkpointing, compile, then FSDP2 when there are several processes."""
    if config.frozen_dtype is not None:
        check_mixed_backbone(model.config, config.frozen_dtype, config.precision)
        cast_frozen(model, DTYPES[config.frozen_dtype])
    if config.gradient_checkpointing:
        apply_activation_checkpointing(model)
    if config.compile:
        apply_compile(model, config.compile_backend)
    if env.distributed:
        shard_model(model, env, config.distributed, frozen=config.frozen_sharding, precision=config.precision,
                    shard_size=config.shard_size)


def prepare_model(model, config, env: DistEnv):
    """:func:`apply_training_layout`, then a device move in one process (nothing for a model
    ``build_sharded_model`` already built that way)."""
    if getattr(model, "_flamingo_prepared", False):
        return model
    apply_training_layout(model, config, env)
    if not env.distributed:
        model.to(env.device)
    return model


# ---- full tensors from (possibly) sharded ones ---------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for DTensors: call it on all ranks, same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
