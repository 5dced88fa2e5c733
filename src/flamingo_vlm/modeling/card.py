"""The model card (``README.md``) that :meth:`FlamingoModel.save_pretrained` writes beside the weights, and
``push_to_hub``: the same folder uploaded through ``huggingface_hub``.

The card says what the folder holds and how to load it: the backbones it expects, the bridge's
architecture, the training data and steps, and evaluation results, when they are known.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
# The architecture fields a reader of the card wants; the full config is in flamingo_config.json.
BRIDGE_FIELDS = (
    "cross_attn_every_n_layers", "resampler_depth", "resampler_num_latents", "resampler_heads", "resampler_dim_head",
    "max_num_frames", "xattn_heads", "xattn_dim_head", "xattn_ff_mult", "media_attention", "gate_init",
    "vision_type", "vision_feature_layer",
)


def _backbone(name: str | None) -> tuple[str, bool]:
    """(what the card shows, whether it is a hub name that loads anywhere)."""
    if not name:
        return "(given as an object when built: pass it to load_flamingo)", False
    if os.path.isabs(name) or os.path.exists(name):
        return f"`{Path(name).name}` (a local path when saved: pass its location with lm= / vision=)", False
    return f"[`{name}`](https://huggingface.co/{name})", True


def _training_section(training: dict[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    if "steps" in training:
        lines.append(f"- optimizer steps: {training['steps']}")
    for key in ("lr", "schedule", "warmup_steps", "precision", "seed"):
        if key in training:
            lines.append(f"- {key}: {training[key]}")
    datasets = training.get("datasets") or []
    if datasets:
        lines += ["", "| dataset | format | batch size | loss weight |", "| --- | --- | --- | --- |"]
        lines += [f"| {d.get('name', '?')} | {d.get('format', '?')} | {d.get('batch_size', '?')} | {d.get('loss_weight', 1.0)} |"
                  for d in datasets]
    return lines + [""]


def _evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    """A table from ``flamingo eval``'s results JSON: one row per (task, metric), one column per shot count."""
    summary = evaluation.get("summary") or []
    if not summary:
        return []
    shots = sorted({s["shots"] for s in summary})
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for s in summary:
        for name, m in s.get("metrics", {}).items():
            cell = "n/a" if m.get("mean") is None else f"{m['mean']:.2f}"
            if len(m.get("values", [])) > 1:
                cell += f" ± {m['std']:.2f}"
            rows.setdefault((s["task"], name), {})[s["shots"]] = cell
    lines = ["## Evaluation", "", "| task | metric | " + " | ".join(f"{n}-shot" for n in shots) + " |",
             "| --- | --- | " + " | ".join("---" for _ in shots) + " |"]
    lines += [f"| {task} | {metric} | " + " | ".join(cells.get(n, "-") for n in shots) + " |" for (task, metric), cells in rows.items()]
    return lines + ["", "Few-shot results of `flamingo eval` (mean ± std over seeds).", ""]


def model_card(config: Any, *, trainable_parameters: int, training: dict[str, Any] | None = None,
               evaluation: dict[str, Any] | None = None) -> str:
    """The card's markdown for a model of ``config`` (a FlamingoConfig): front matter for the hub, then
    backbones, bridge, how to load it, training (``training``: a TrainConfig as a dict) and evaluation
    (``evaluation``: the results JSON of ``flamingo eval``)."""
    lm, lm_on_hub = _backbone(config.lm_name_or_path)
    vision, vision_on_hub = _backbone(config.vision_name_or_path)
    base = [n for n, on_hub in ((config.lm_name_or_path, lm_on_hub), (config.vision_name_or_path, vision_on_hub)) if on_hub]
    front = ["---", "library_name: flamingo-vlm", "tags:", "- flamingo", "- image-text-to-text", "- few-shot"]
    if base:
        front += ["base_model:"] + [f"- {b}" for b in base]
    front.append("---")
    bridge = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    lines = front + [
        "",
        "# Flamingo bridge",
        "",
        "A Flamingo model (Alayrac et al., 2022): a frozen vision encoder, a Perceiver Resampler and gated "
        "cross-attention blocks inserted into a frozen language model. This folder holds the trained bridge "
        f"only ({trainable_parameters:,} parameters, `model.safetensors`); the backbones load from their own checkpoints.",
        "",
        "## Backbones",
        "",
        f"- language model: {lm}",
        f"- vision encoder: {vision} ({config.vision_type})",
        "",
        "## Bridge",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {bridge[k]} |" for k in BRIDGE_FIELDS if k in bridge]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from flamingo_vlm import few_shot, load_flamingo",
        "",
        'model, processor = load_flamingo("path/to/this/folder")  # lm=..., vision=... if the backbones moved',
        'answer = few_shot(model, processor, [(image1, "Output: a red circle."), (image2, "Output: a blue square.")], query_image)',
        "```",
        "",
    ]
    if training:
        lines += _training_section(training)
    if evaluation:
        lines += _evaluation_section(evaluation)
    return "\n".join(lines).rstrip() + "\n"


def _read_json(value: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    return json.loads(Path(value).read_text())


def write_model_card(model: Any, directory: str | os.PathLike, *, training: dict[str, Any] | None = None,
                     evaluation: dict[str, Any] | str | os.PathLike | None = None) -> Path:
    """Write ``directory/README.md`` for ``model`` (a FlamingoModel). ``evaluation``: results dict or the
    path of ``flamingo eval``'s results JSON."""
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    text = model_card(model.config, trainable_parameters=trainable, training=training, evaluation=_read_json(evaluation))
    path = Path(directory) / CARD_NAME
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def push_to_hub(model: Any, repo_id: str, *, processor: Any = None, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload Flamingo bridge", training: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | str | os.PathLike | None = None) -> Any:
    """Save ``model`` (and ``processor``) as :meth:`save_pretrained` does, card included, into a temporary
    folder and upload that folder to the hub repo ``repo_id`` (created if needed). Returns the commit info
    of ``HfApi.upload_folder``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="flamingo-push-") as folder:
        model.save_pretrained(folder, training=training, evaluation=evaluation)
        if processor is not None:
            processor.save_pretrained(folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)


__all__ = ["CARD_NAME", "model_card", "push_to_hub", "write_model_card"]
