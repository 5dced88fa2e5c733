"""Fine-tuning with unfrozen backbone parts (the vision encoder's last block, the LM's last layer, LoRA adapters)
on instruction data, under `torchrun` with 2 CPU processes (FSDP2, gloo): the losses are the single process's,
and a 2-process checkpoint resumes (on 2 processes and on 1) to the same curve, backbone weights included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training.cli import build_model
from helpers import SMALL_BRIDGE
from train_fixtures import instruct_shards, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _config(tmp_path: Path) -> Path:
    from flamingo_vlm.tiny import create_tiny_backbones

    lm, clip = create_tiny_backbones(tmp_path / "backbones")
    dataset = {
        "name": "vqa",
        "format": "instruct",
        "paths": instruct_shards(tmp_path / "data"),
        "batch_size": 4,
        "lanes": 2,
        "micro_batch_size": 1,
    }
    cfg = {
        "lm": lm,
        "vision": clip,
        "flamingo": SMALL_BRIDGE,
        "datasets": [dataset],
        "steps": STEPS,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "keep_last": 0,
        "log_every": 1,
        "device": "cpu",
        "train_vision_blocks": 1,
        "train_lm_layers": 1,
        "lora": {"rank": 2, "alpha": 4.0},
        "lr_multipliers": {"vision": 0.5, "lm": 0.5},
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(), reason="no torchrun"
)
def test_fine_tuning_backbone_parts_on_two_processes_gives_the_single_process_curve(tmp_path):
    path = _config(tmp_path)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = Path(__file__).with_name("dist_train.py")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(path),
        f"output_dir={tmp_path / 'fsdp'}",
        "--no-progress",
        "::",
        str(path),
        f"output_dir={tmp_path / 'fsdp-resumed'}",
        f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'step-00000002'}",
        "save_final=false",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single_cfg = load_train_config(path, [f"output_dir={tmp_path / 'single'}"])
    model, processor = build_model(single_cfg)
    names = {n for n, _ in model.trainable_parameters()}
    assert any(n.startswith("vision_encoder.") for n in names) and any(n.startswith("lm_layers.") for n in names)
    assert any(n.startswith("lora.") for n in names)
    single = train(model, processor, single_cfg, progress=False)
    expected = [h["loss"] for h in single.history]
    lines = metrics(tmp_path / "fsdp")
    assert [x["loss"] for x in lines] == pytest.approx(expected, abs=1e-4)
    assert [x["grad_norm"] for x in lines] == pytest.approx([h["grad_norm"] for h in single.history], rel=1e-4)
    assert [x["loss"] for x in metrics(tmp_path / "fsdp-resumed")] == pytest.approx(expected[2:], abs=1e-4)
    # the trained weights, backbone parts included, gathered from the FSDP shards, are the single process's
    gathered = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert set(gathered) >= names
    for name, p in model.trainable_parameters():
        assert torch.allclose(gathered[name], p.detach(), atol=1e-4), name
    # the 2-process checkpoint resumes in one process too
    resumed_cfg = load_train_config(
        path, [f"output_dir={tmp_path / 'fsdp'}", f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'step-00000002'}"]
    )
    resumed = train(*build_model(resumed_cfg), resumed_cfg, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx(expected[2:], abs=1e-4)
