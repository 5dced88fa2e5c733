"""Training configuration: the TrainConfig and DatasetConfig dataclasses, read by :mod:`flamingo_vlm.yaml_config`.

    datasets:                          # the mixture (paper section 2.4)
      - {name: m3w, format: mmc4, paths: ["mmc4/{00000..00999}.tar"], batch_size: 256, loss_weight: 1.0}
      - {name: laion, format: pairs, paths: ["laion/*.tar"], batch_size: 512, loss_weight: 0.2}
    steps: 500000
    lr: 1.0e-4
    warmup_steps: 5000
    lm: meta-llama/Llama-3.2-1B        # backbones, and FlamingoConfig overrides for the bridge
    vision: openai/clip-vit-large-patch14
    flamingo: {cross_attn_every_n_layers: 4}

Unknown keys are errors that name the key (and the closest known one).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from ..config import FlamingoConfig
from ..yaml_config import apply_overrides, coerce, from_dict, read_yaml_mapping, unknown_keys_error

# FlamingoConfig fields that the builder fills in; a config may not set them.
_DERIVED_FLAMINGO_KEYS = {
    "lm_name_or_path", "vision_name_or_path", "new_token_ids", "media_token_id", "end_of_chunk_token_id", "pad_token_id",
    "eos_token_id",
}


# TrainConfig.lora keys -> FlamingoConfig fields
LORA_KEYS = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "lora_target_modules"}


@dataclass
class DatasetConfig:
    """One dataset of the mixture.

    name: used in logs (``loss/<name>``) and checkpoints. format: pairs | mmc4 | obelics | video | instruct
    (supervised prompt + answer records, the loss on the answer: :mod:`flamingo_vlm.data.instruct`).
    paths: files, globs, brace ranges (``shard-{0000..0099}.tar``), directories or URLs.
    batch_size: the *global* batch per optimizer step (all processes together), as in the paper.
    loss_weight: the paper's lambda_m. micro_batch_size: samples per forward on each process
    (gradient accumulation; default: the whole per-process batch).
    max_tokens: sequence length (default 32 for pairs/video, 256 for documents).
    max_images: images per document window. num_frames / video_fps: frames per clip and their rate
    (None: spread over the whole clip; the paper samples 1 FPS). min_similarity: MMC4 image-text
    similarity threshold. min_image_size / max_aspect_ratio: document image filter (paper: 64 px, 3).
    p_next: probability per document that text attaches to the next image. image_dir: where MMC4
    jsonl / OBELICS image files are. lanes: independent readers (see flamingo_vlm.data.stream); fix it
    to keep the data order when the number of workers changes. shuffle_buffer: records each lane draws
    its next one from (across shard boundaries).
    """

    name: str
    format: Literal["pairs", "mmc4", "obelics", "video", "instruct"]
    paths: list[str]
    batch_size: int
    loss_weight: float = 1.0
    max_tokens: int | None = None
    max_images: int = 5
    num_frames: int = 8
    video_fps: float | None = None
    min_similarity: float = 0.24
    min_image_size: int = 64
    max_aspect_ratio: float = 3.0
    p_next: float = 0.0
    image_dir: str | None = None
    image_column: str = "images"
    text_column: str = "texts"
    micro_batch_size: int | None = None
    lanes: int | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1000  # records; the buffer spans shards (flamingo_vlm.data.stream)
    num_workers: int | None = None

    def __post_init__(self) -> None:
        from ..data.mixture import FORMATS

        where = f"dataset {self.name!r}"
        if self.format not in FORMATS:
            raise ValueError(f"{where}: format must be one of {FORMATS}, got {self.format!r}")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [str(self.paths)]
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise ValueError(f"{where}: paths is empty")
        for key in ("batch_size", "max_images", "num_frames", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"{where}: micro_batch_size must be >= 1")
        if self.loss_weight < 0:
            raise ValueError(f"{where}: loss_weight must be >= 0")
        if not 0.0 <= self.p_next <= 1.0:
            raise ValueError(f"{where}: p_next must be in [0, 1], got {self.p_next}")
        if self.video_fps is not None and self.video_fps <= 0:
            raise ValueError(f"{where}: video_fps must be > 0 (or null)")


@dataclass
class TrainConfig:
    """A training run. Optimisation follows the paper (section 2.4, appendix A.2) by default, except
    the learning rate schedule length (``steps``, ``warmup_steps``), which is the caller's."""

    datasets: list[DatasetConfig]
    steps: int = 1000
    # optimisation
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "wsd"] = "constant"  # wsd: warmup, constant, then a linear decay
    min_lr_ratio: float = 0.0  # cosine, wsd: the final lr as a fraction of lr
    decay_steps: int = 0  # wsd: the steps of the final decay
    weight_decay: float = 0.1  # on the xattn blocks' weight matrices; 0 on the resampler and embeddings
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm, once per optimizer step; null/0 disables
    gate_lr_multiplier: float = 1.0  # the tanh gates' lr relative to lr (>1 opens them faster in short runs)
    mixture: Literal["accumulate", "round_robin"] = "accumulate"
    # pack each step's samples (of every dataset it uses) end to end in rows of this many tokens, one forward for
    # all of them, instead of one padded batch per dataset (data/packing.py); at least every dataset's max_tokens.
    # Needs an LM that honours packed position ids (transformers' packed-sequence masks: checked at the start)
    pack_length: int | None = None
    pack_micro_batch_rows: int | None = None  # packed rows per forward (default: all of the step's); one process only
    # precision and speed
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of the forward where the device supports it
    frozen_dtype: Literal["fp32", "bf16"] | None = None  # store the frozen backbones in this dtype
    gradient_checkpointing: bool = False
    # encode each distinct frame once and keep its features (training/feature_cache.py): for runs that see their
    # images many times (epochs over a small set) with the vision encoder frozen; up to this many MiB of features
    cache_vision_features: bool = False
    vision_feature_cache_mib: int = 4096
    compile: bool = False
    compile_backend: str = "inductor"
    # distribution: under torchrun, "fsdp" shards parameters (FSDP2), "ddp" replicates them, "hsdp" shards
    # them within groups of `shard_size` processes (a node) and replicates across the groups
    distributed: Literal["fsdp", "ddp", "hsdp"] = "fsdp"
    shard_size: int | None = None  # hsdp: processes per shard group (e.g. the GPUs of a node)
    # "replicate": the frozen backbones stay whole on every process, outside FSDP, so only the trained
    # parameters are all-gathered (fits when the frozen LM fits on one device); "fsdp": sharded too
    frozen_sharding: Literal["fsdp", "replicate"] = "fsdp"
    # build on the meta device and load only this process's slices of the backbones' safetensors
    # (flamingo_vlm.training.construct); a new bridge on `lm` + `vision` (transformers models) only
    sharded_construction: bool = False
    reduce_every_micro_step: bool = False  # reduce-scatter gradients after each micro-batch (no unsharded accumulation)
    count_communication: bool = False  # report the bytes each step's collectives moved (comm/* in the metrics)
    device: str | None = None  # default: cuda:<local rank> if available, else cpu
    # data loading
    seed: int = 0
    # DataLoader workers per dataset and process (0 decodes in the training process); None: 2 where a GPU
    # is used, 0 on the CPU
    num_workers: int | None = None
    pin_memory: bool | None = None  # page-locked batches, copied to the GPU asynchronously; None: on with a GPU
    prefetch_factor: int = 2
    data_root: str | None = None  # relative dataset paths / image_dir are taken from here
    # outputs
    output_dir: str = "runs/flamingo"
    checkpoint_every: int = 1000  # 0: only at the end
    async_checkpoint: bool = False  # copy the shards to memory and write them while training goes on
    keep_last: int = 3
    save_final: bool = True  # write output_dir/final (save_pretrained layout + processor)
    log_every: int = 10
    tensorboard: bool = False
    nan_policy: Literal["skip", "stop"] = "skip"
    resume: bool | str = False  # True: from the latest checkpoint in output_dir (if any); or a checkpoint path
    # the model, for `flamingo train CONFIG` (train() itself takes a built model)
    lm: str | None = None
    vision: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None  # a save_pretrained directory to start the bridge from
    flamingo: dict[str, Any] = field(default_factory=dict)  # FlamingoConfig overrides
    # fine-tuning (paper section 3.2; flamingo_vlm.modeling.finetune): backbone weights trained with the bridge
    # and saved with it. None / {} leaves the model as built or loaded (the bridge only, for a new one).
    train_vision_blocks: int | None = None  # the vision encoder's last n blocks; -1: all of it
    train_lm_layers: int | None = None  # the LM's last n decoder layers
    lora: dict[str, Any] = field(default_factory=dict)  # {rank, alpha, dropout, target_modules}: LoRA on the LM (peft)
    image_size: int | None = None  # the vision encoder's input size (position embeddings interpolated)
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # {vision, lm, lora}: lr of that part = lr * m
    lm_kwargs: dict[str, Any] = field(default_factory=dict)
    vision_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.datasets = [d if isinstance(d, DatasetConfig) else from_dict(DatasetConfig, d, f"datasets[{i}]") for i, d in enumerate(self.datasets)]
        if not self.datasets:
            raise ValueError("datasets is empty: a run needs at least one dataset")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("warmup_steps", "decay_steps", "checkpoint_every", "keep_last", "num_workers", "vision_feature_cache_mib"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        checks = {
            "mixture": ("accumulate", "round_robin"), "precision": ("fp32", "bf16"),
            "frozen_dtype": ("fp32", "bf16", None), "distributed": ("fsdp", "ddp", "hsdp"), "frozen_sharding": ("fsdp", "replicate"), "nan_policy": ("skip", "stop"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.pack_length is not None:
            from ..data.mixture import DEFAULT_MAX_TOKENS

            longest = {d.name: d.max_tokens or DEFAULT_MAX_TOKENS[d.format] for d in self.datasets}
            if self.pack_length < max(longest.values()):
                raise ValueError(f"pack_length {self.pack_length} is shorter than a dataset's max_tokens ({longest}): a sample must fit a row")
        if self.pack_micro_batch_rows is not None and (self.pack_length is None or self.pack_micro_batch_rows < 1):
            raise ValueError("pack_micro_batch_rows is the packed rows per forward: it needs pack_length, and must be >= 1")
        if self.distributed == "hsdp" and (self.shard_size is None or self.shard_size < 1):
            raise ValueError("distributed: hsdp needs shard_size (processes per shard group, e.g. the GPUs of a node) >= 1")
        unknown = sorted(set(self.flamingo) - {f.name for f in dataclasses.fields(FlamingoConfig)})
        if unknown:
            raise unknown_keys_error(FlamingoConfig, unknown, "flamingo")
        derived = sorted(set(self.flamingo) & _DERIVED_FLAMINGO_KEYS)
        if derived:
            raise ValueError(f"`flamingo` sets {derived}, which the builder fills in from the backbones")
        # typed here, so that `flamingo.gate_init_std=1e-2` (a string in YAML 1.1) reaches the builder as a float
        hints = typing.get_type_hints(FlamingoConfig)
        self.flamingo = {k: coerce(v, hints[k], f"flamingo.{k}") for k, v in self.flamingo.items()}
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        unknown = sorted(set(self.lora) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"lora: unknown key(s) {unknown}; expected some of {sorted(LORA_KEYS)}")
        from .optim import LR_PARTS, WarmupSchedule

        WarmupSchedule(self.warmup_steps, self.steps, self.schedule, self.min_lr_ratio, self.decay_steps)  # its checks (schedule, decay_steps), before the run

        unknown = sorted(set(self.lr_multipliers) - set(LR_PARTS))
        if unknown:
            raise ValueError(f"lr_multipliers: unknown part(s) {unknown}; expected some of {sorted(LR_PARTS)}")
        self.lr_multipliers = {k: float(v) for k, v in self.lr_multipliers.items()}
        FlamingoConfig(**self.backbone_training())  # the same checks as the model's (ValueError naming the field)

    def backbone_training(self) -> dict[str, Any]:
        """The fine-tuning settings as FlamingoConfig fields (for ``FlamingoModel.set_backbone_training``)."""
        changes: dict[str, Any] = {}
        if self.train_vision_blocks is not None:
            changes["train_vision_blocks"] = int(self.train_vision_blocks)
        if self.train_lm_layers is not None:
            changes["train_lm_layers"] = int(self.train_lm_layers)
        if self.image_size is not None:
            changes["vision_image_size"] = int(self.image_size)
        for key, field_name in LORA_KEYS.items():
            if key in self.lora:
                value = self.lora[key]
                changes[field_name] = tuple(value) if key == "target_modules" else value
        return changes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path_or_dict: str | os.PathLike | dict, overrides: Sequence[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or a dict), with ``key.path=value`` overrides applied.

    ValueError names any key that TrainConfig / DatasetConfig / FlamingoConfig does not have.
    """
    if isinstance(path_or_dict, dict):
        data = copy.deepcopy(path_or_dict)
    else:
        data = read_yaml_mapping(path_or_dict, "train config")
    apply_overrides(data, overrides or ())
    if "datasets" not in data:
        raise ValueError("the config has no `datasets`")
    return from_dict(TrainConfig, data)
