"""What a launch will do, checked before anything is built: ``flamingo train CONFIG --dry-run --world-size N``.

:func:`check_launch` applies every rule that depends on the number of processes (each dataset's global
batch and lanes, the device mesh) and on the output directory. The real launch runs it first, so a
config that cannot run at this size fails in seconds with a message naming the dataset and the fix,
not after the model was built and sharded.

:func:`dry_run` then builds the model on the meta device (shapes only: no weights are read, no memory
is used; only the backbones' config.json and the tokenizer are loaded) and :func:`estimate` prints what
one rank holds and sends: parameters, persistent and transient memory, and bytes communicated per
optimizer step under the configured sharding. The numbers are arithmetic on the parameter counts
(FSDP2's collectives are ring all-gathers / reduce-scatters: each rank sends (W - 1) / W of the data):

- FSDP: every micro-step all-gathers each unit's parameters in the forward and again in the backward
  (units reshard after their forward), and one reduce-scatter of the trained gradients per step
  (``set_requires_gradient_sync``: gradients reduced once, in the last backward);
- DDP (a replicate mesh): one all-reduce of the trained gradients per step (2 (W - 1) / W of them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.stream import check_lanes, default_lanes, shared_lanes
from .checkpoint import CHECKPOINTS_DIR
from ..config import CONFIG_NAME
from .config import TrainConfig
from .distributed import device_mesh_shape

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2}
ADAMW_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW's two fp32 moments


def world_size_from_env() -> int:
    """The number of processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


GPU_NUM_WORKERS = 2  # DataLoader workers per dataset and process by default where a GPU is used


def _device_type(config: TrainConfig, device_type: str | None) -> str:
    if device_type is not None:
        return device_type
    if config.device:
        return torch.device(config.device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def data_workers(config: TrainConfig, device_type: str | None = None) -> int:
    """``num_workers``, or by default ``GPU_NUM_WORKERS`` on a GPU (decoding off the training process)
    and 0 on the CPU (where the workers would take the cores the model computes on)."""
    if config.num_workers is not None:
        return config.num_workers
    return GPU_NUM_WORKERS if _device_type(config, device_type) == "cuda" else 0


def pin_memory(config: TrainConfig, device_type: str | None = None) -> bool:
    """``pin_memory``, or by default whether a GPU is used (page-locked batches copy asynchronously)."""
    if config.pin_memory is not None:
        return config.pin_memory
    return _device_type(config, device_type) == "cuda"


def dataset_lanes(config: TrainConfig, world_size: int, device_type: str | None = None) -> dict[str, int]:
    """Each dataset's lanes at this world size: the configured number, or the default for it."""
    out = {}
    for d in config.datasets:
        workers = d.num_workers if d.num_workers is not None else data_workers(config, device_type)
        if d.lanes is not None:
            out[d.name] = d.lanes
        else:
            if d.batch_size % world_size:  # default_lanes needs a whole per-rank batch; check_launch names the problem
                out[d.name] = world_size
            else:
                out[d.name] = default_lanes(d.batch_size, world_size, workers)
    return out


def mesh_shape(config: TrainConfig, world_size: int) -> tuple[int, ...]:
    """The device mesh ``shard_model`` will build (see ``distributed.device_mesh_shape``)."""
    return device_mesh_shape(config.distributed, world_size, config.shard_size)


def _saved_lanes(config: TrainConfig) -> tuple[str | None, dict[str, int]]:
    """(checkpoint, lanes per dataset) of the checkpoint a resume would read, if there is one."""
    if not config.resume:
        return None, {}
    root = Path(str(config.resume)) if config.resume is not True else Path(config.output_dir)
    if (root / "trainer_state.json").is_file():
        ckpt = root
    else:
        found = sorted((root / CHECKPOINTS_DIR).glob("step-*/trainer_state.json")) if (root / CHECKPOINTS_DIR).is_dir() else []
        if not found:
            return None, {}
        ckpt = found[-1].parent
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return str(ckpt), {name: int(s["lanes"]) for name, s in (state.get("data") or {}).items()}


def check_output_dir(config: TrainConfig) -> list[str]:
    """Problems with ``output_dir``: a file in its place, or no permission to create or write it."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        return [f"output_dir {str(out)!r} is a file, not a directory"]
    probe = out
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return [f"output_dir {str(out)!r}: {str(probe)!r} is a file, so the directory cannot be created"]
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "write into" if probe == out else "create it under"
        return [f"output_dir {str(out)!r}: no permission to {what} {str(probe)!r}"]
    return []


def check_launch(config: TrainConfig, world_size: int, device_type: str | None = None) -> list[str]:
    """Every rule that depends on ``world_size`` and the output directory; ValueError listing each broken
    one (all of them, not only the first). Returns one line per dataset describing how it is split."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    problems: list[str] = []
    lines: list[str] = []
    lanes = dataset_lanes(config, world_size, device_type)
    checkpoint, saved = _saved_lanes(config)
    for d in config.datasets:
        n = saved.get(d.name, lanes[d.name]) if d.lanes is None else lanes[d.name]
        try:
            check_lanes(d.name, n, d.batch_size, world_size)
        except ValueError as e:
            fits = [w for w in range(1, 2 * world_size + 1) if d.batch_size % w == 0]
            hint = f"; world sizes that divide it: {', '.join(map(str, fits[-6:]))}" if d.batch_size % world_size else ""
            where = f" (lanes {n} from the checkpoint {checkpoint})" if d.name in saved and d.lanes is None else ""
            problems.append(f"{e}{where}{hint}")
            continue
        per_rank = d.batch_size // world_size
        micro = min(d.micro_batch_size or per_rank, per_rank)
        count = -(-per_rank // micro)  # every process runs as many (the last one may be smaller)
        shared = shared_lanes(n, d.batch_size, world_size)
        note = f" ({shared} read by two or more processes: a multiple of {world_size} lanes avoids that)" if shared else ""
        lines.append(f"{d.name}: global batch {d.batch_size} = {world_size} processes x {per_rank} "
                     f"({count} micro-batches of up to {micro}), {n} lanes{note}")
    try:
        mesh_shape(config, world_size)
    except ValueError as e:
        problems.append(str(e))
    if config.cache_vision_features and config.train_vision_blocks:
        problems.append("cache_vision_features needs a frozen vision encoder, but train_vision_blocks trains it")
    if config.cache_vision_features and world_size > 1 and config.frozen_sharding != "replicate":
        # a sharded encoder all-gathers its weights in every process's forward: a process whose frames were all
        # cached would skip a collective the others run
        problems.append("cache_vision_features with several processes needs frozen_sharding: replicate "
                        "(each process then encodes its own misses)")
    if config.pack_micro_batch_rows and world_size > 1:
        # each process packs its own share into as many rows as it needs: split into micro-batches, processes would
        # run different numbers of forwards, and FSDP's per-forward all-gathers would wait on each other for ever
        problems.append("pack_micro_batch_rows needs a single process (processes would run different numbers of forwards); "
                        "with several, each packs its share into one forward: leave it unset")
    problems += check_output_dir(config)
    if problems:
        raise ValueError(f"this config cannot run on {world_size} process(es):\n  - " + "\n  - ".join(problems))
    return lines


def check_shared_output_dir(output_dir: str | os.PathLike, env) -> None:
    """Every process sees the directory rank 0 created (checkpoints are written by all of them into one
    directory): rank 0 writes a token there, every process reads it back; all fail together otherwise,
    at the start instead of at the first checkpoint."""
    if not env.distributed:
        return
    import secrets

    path = Path(output_dir) / f".shared-check-{env.broadcast_object(secrets.token_hex(8))}"
    if env.is_main:
        path.write_text("shared")
    env.barrier()
    seen = env.gather_objects(path.is_file())
    env.barrier()
    if env.is_main:
        path.unlink(missing_ok=True)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise ValueError(f"output_dir {str(output_dir)!r} is not shared: process(es) {missing} do not see what rank 0 wrote there; "
                         "put it on a filesystem every node mounts")


# ---- the model on the meta device ------------------------------------------------------------------
def _meta_lm(config: TrainConfig, name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in (config.lm_kwargs or {}).items() if k in ("trust_remote_code", "revision")}
    lm_config = AutoConfig.from_pretrained(name, **kwargs)
    lm = AutoModelForCausalLM.from_config(lm_config, **({"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}))
    lm.name_or_path = name
    return lm


def _meta_vision(config: TrainConfig, vision: str):
    from ..modeling.vision import load_vision_encoder

    vision_type = config.flamingo.get("vision_type")
    kwargs = dict(config.vision_kwargs or {})
    if vision_type in ("open_clip", "timm"):  # their constructors take a weights switch: shapes only
        kwargs["pretrained"] = None if vision_type == "open_clip" else False
        return load_vision_encoder(vision, vision_type, **kwargs)
    import transformers
    from transformers import AutoConfig

    vcfg = AutoConfig.from_pretrained(vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    kind = vision_type or vcfg.model_type
    model = (transformers.SiglipVisionModel if "siglip" in str(kind) else transformers.CLIPVisionModel)(vcfg)
    model.name_or_path = vision
    return model


def build_meta_model(config: TrainConfig, *, with_processor: bool = False, bridge_device: str = "meta"):
    """The FlamingoModel the config describes, on the meta device (shapes, no storage, no weights read).

    Only the backbones' configs and the tokenizer are read. With ``init_from``, the backbones default to
    the ones that model was saved with. ``bridge_device="cpu"``: the resampler and xattn blocks are built
    (and initialised) on the CPU, the backbones still on meta. ``with_processor``: (model, processor)."""
    import torch

    from ..builder import build_flamingo
    from .finetune import apply_finetuning

    lm, vision = config.lm, config.vision
    if config.init_from and (not lm or not vision):
        saved = json.loads((Path(config.init_from) / CONFIG_NAME).read_text())
        lm, vision = lm or saved.get("lm_name_or_path"), vision or saved.get("vision_name_or_path")
    if not lm or not vision:
        raise ValueError("the config must name `lm` and `vision` backbones (or `init_from`, a saved Flamingo model)")
    with torch.device("meta"):
        lm_model = _meta_lm(config, lm)
        encoder = _meta_vision(config, vision)
    with torch.device(bridge_device):
        model, processor = build_flamingo(lm_model, encoder, config.tokenizer or lm, **config.flamingo)
        apply_finetuning(model, processor, config)
    return (model, processor) if with_processor else model


# ---- what one rank holds and sends ------------------------------------------------------------------
@dataclass
class Estimate:
    """Per-rank numbers for one optimizer step (bytes)."""

    world_size: int
    trained_params: int
    frozen_params: int
    persistent_bytes: float  # sharded (or replicated) weights, gradients and optimizer state kept all run long
    transient_bytes: float  # largest units gathered at once, and unsharded gradients between micro-steps
    all_gather_bytes: float
    reduce_bytes: float  # reduce-scatter (FSDP) or all-reduce (DDP) of trained gradients
    micro_steps: int
    units: int
    notes: list[str] = field(default_factory=list)

    @property
    def communicated_bytes(self) -> float:
        return self.all_gather_bytes + self.reduce_bytes

    def lines(self) -> list[str]:
        gib = lambda b: f"{b / GIB:,.2f} GiB"  # noqa: E731
        return [
            f"parameters: {self.trained_params + self.frozen_params:,} ({self.trained_params:,} trained, {self.frozen_params:,} frozen)",
            f"memory per rank: {gib(self.persistent_bytes)} weights + gradients + optimizer state, "
            f"+ up to {gib(self.transient_bytes)} gathered/unsharded during a step (activations not included)",
            f"communicated per rank per step: {gib(self.communicated_bytes)} "
            f"({gib(self.all_gather_bytes)} all-gathered over {self.micro_steps} micro-steps x {self.units} units, "
            f"{gib(self.reduce_bytes)} gradient reduction)",
            *self.notes,
        ]


def fsdp_units(model) -> list[list]:
    """The parameters of each FSDP2 unit ``shard_model`` makes, the root's (everything left) last."""
    from .distributed import _vision_blocks, decoder_layers

    units = [list(m.parameters()) for m in [*decoder_layers(model), *_vision_blocks(model.vision_encoder), model.resampler]]
    seen = {id(p) for unit in units for p in unit}
    units.append([p for p in model.parameters() if id(p) not in seen])
    return units


def micro_steps_per_step(config: TrainConfig, world_size: int) -> int:
    """Forward/backward passes each rank runs per optimizer step (the most any step takes)."""
    counts = []
    for d in config.datasets:
        per_rank = d.batch_size // world_size
        counts.append(-(-per_rank // (d.micro_batch_size or per_rank)))
    return sum(counts) if config.mixture == "accumulate" else max(counts)


def estimate(model, config: TrainConfig, world_size: int) -> Estimate:
    """Per-rank memory and communication of ``model`` (any device, meta included) under ``config``.

    Mirrors ``shard_model``: with ``frozen_sharding: replicate`` the frozen weights are outside FSDP
    (held whole, never gathered); FSDP gathers in bf16 under ``precision: bf16`` (MixedPrecisionPolicy),
    and reduces gradients in fp32 once per step, or after every micro-batch with ``reduce_every_micro_step``.
    """
    frozen_size = BYTES[config.frozen_dtype] if config.frozen_dtype else 4
    replicate_frozen = config.frozen_sharding == "replicate"

    def stored(p) -> int:
        return p.numel() * (4 if p.requires_grad else frozen_size)

    def managed(p) -> bool:  # held by FSDP (sharded, gathered for compute)
        return p.requires_grad or not replicate_frozen

    def gathered(p) -> int:
        return p.numel() * 2 if config.precision == "bf16" else stored(p)

    units = [[p for p in u if managed(p)] for u in fsdp_units(model)]
    units = [u for u in units[:-1] if any(p.requires_grad for p in u) or not replicate_frozen] + [units[-1]]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen_bytes = sum(stored(p) for p in model.parameters() if not p.requires_grad)
    micro = micro_steps_per_step(config, world_size)
    shape = mesh_shape(config, world_size) if world_size > 1 else (1,)
    w, replicas = shape[-1], (shape[0] if len(shape) == 2 else 1)  # w: processes a parameter is sharded over
    ring = (w - 1) / w
    reductions = micro if config.reduce_every_micro_step else 1
    notes = []
    if w > 1:
        frozen_held = frozen_bytes if replicate_frozen else frozen_bytes / w
        persistent = frozen_held + trained * ADAMW_BYTES_PER_PARAM / w
        root_bytes = sum(gathered(p) for p in units[-1])
        unit_bytes = sorted((sum(gathered(p) for p in u) for u in units[:-1]), reverse=True)
        transient = sum(unit_bytes[:2]) + root_bytes  # one unit computing, the next prefetched; the root stays gathered
        if reductions == 1 and micro > 1:
            transient += trained * 4  # no-sync micro-steps keep whole fp32 gradients until the last
        # each non-root unit: gathered in the forward and again in the backward; the root once per micro-step
        all_gather = micro * ring * (2 * sum(unit_bytes) + root_bytes)
        # reduce-scatter within the shard group, then (HSDP) all-reduce of the shards across the replicas
        reduce = reductions * trained * 4 * (ring + 2 * (replicas - 1) / replicas / w)
        notes.append(f"mesh {shape}: FSDP2 shards over {w} processes" + (f" x {replicas} replicas" if replicas > 1 else "")
                     + f", {len(units)} units, frozen weights "
                     + ("whole on every process (frozen_sharding: replicate)" if replicate_frozen else "sharded"))
    else:
        persistent = frozen_bytes + trained * ADAMW_BYTES_PER_PARAM
        transient = 0.0
        all_gather = 0.0
        reduce = reductions * 2 * (replicas - 1) / replicas * trained * 4
        notes.append(f"mesh {shape}: parameters replicated on every process" if replicas > 1 else "one process")
    return Estimate(world_size, trained, frozen, persistent, transient, all_gather, reduce, micro, len(units), notes)


def dry_run(config: TrainConfig, world_size: int, print_fn=print) -> Estimate:
    """Check the launch at ``world_size``, build the model on the meta device, print the plan."""
    lines = check_launch(config, world_size)
    model = build_meta_model(config)
    if config.frozen_dtype is not None:
        from .distributed import check_mixed_backbone

        check_mixed_backbone(model.config, config.frozen_dtype, config.precision)
    result = estimate(model, config, world_size)
    print_fn(f"dry run: {world_size} process(es), distributed={config.distributed}, output_dir={config.output_dir}")
    for line in lines + result.lines():
        print_fn("  " + line)
    print_fn("dry run passed: the launch checks hold at this size")
    return result


__all__ = ["Estimate", "build_meta_model", "check_launch", "check_output_dir", "check_shared_output_dir", "data_workers", "dry_run", "estimate", "pin_memory",
           "world_size_from_env"]

