"""`torchrun` with 2 CPU processes (gloo): FSDP2 and the DDP-like mode give the single process's loss curve
for the same global batch; a sharded 2-process checkpoint resumes on 1 and on 2 processes; no process
gathers the checkpoint (rank 0's peak memory while saving is the other rank's)."""

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
from flamingo_vlm.training.checkpoint import checkpoint_weights
from flamingo_vlm.training.cli import build_model
from helpers import SMALL_BRIDGE
from train_fixtures import mixture_datasets, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(), reason="no torchrun")
def test_two_processes_give_the_single_process_loss_curve(tmp_path):
    from flamingo_vlm.tiny import create_tiny_backbones

    lm, clip = create_tiny_backbones(tmp_path / "backbones")
    datasets = mixture_datasets(tmp_path / "data", lanes=2)
    datasets[1]["micro_batch_size"] = 1  # pairs: 2 micro-steps per process, reduced once
    cfg = {"lm": lm, "vision": clip, "flamingo": SMALL_BRIDGE, "datasets": datasets, "steps": STEPS, "lr": 1e-3, "warmup_steps": 1,
           "checkpoint_every": 2, "keep_last": 0, "log_every": 1, "device": "cpu"}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    log = tmp_path / "save-memory"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "FLAMINGO_SAVE_MEMORY_LOG": str(log)}
    script = Path(__file__).with_name("dist_train.py")
    # a bridge of ~18M trained parameters (220 MB with AdamW state): what a gathering save would show on rank 0
    big = ["flamingo.xattn_ff_mult=1024", "flamingo.xattn_heads=8", "flamingo.xattn_dim_head=256", "steps=1", "checkpoint_every=1",
           "save_final=false", f"output_dir={tmp_path / 'big'}", "--no-progress"]
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", str(script),
           str(path), f"output_dir={tmp_path / 'fsdp'}", "--no-progress", "::",
           str(path), f"output_dir={tmp_path / 'ddp'}", "distributed=ddp", "save_final=false", "--no-progress", "::",
           str(path), f"output_dir={tmp_path / 'fsdp-resumed'}", f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'step-00000002'}",
           "save_final=false", "async_checkpoint=true", "checkpoint_every=1", "--no-progress", "::",
           str(path), f"output_dir={tmp_path / 'fsdp-packed'}", "pack_length=64", "save_final=false", "--no-progress", "::",
           str(path), *big]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes, fsdp on cpu" in done.stdout + done.stderr and "2 processes, ddp on cpu" in done.stdout + done.stderr

    single_cfg = load_train_config(path, [f"output_dir={tmp_path / 'single'}"])
    model, processor = build_model(single_cfg)
    single = train(model, processor, single_cfg, progress=False)
    expected = [h["loss"] for h in single.history]
    for run in ("fsdp", "ddp", "fsdp-packed"):  # packed: each process packs its share, the same objective
        lines = metrics(tmp_path / run)
        assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
        assert [x["loss"] for x in lines] == pytest.approx(expected, abs=1e-4), run
        assert [x["loss/pairs"] for x in lines] == pytest.approx([h["loss/pairs"] for h in single.history], abs=1e-4), run
        assert [x["tokens"] for x in lines] == [h["tokens"] for h in single.history]
        assert [x["grad_norm"] for x in lines] == pytest.approx([h["grad_norm"] for h in single.history], rel=1e-4), run
        state = json.loads((tmp_path / run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and sorted(state["data"]["docs"]["states"]) == ["0", "1"]
    # the trained weights, gathered from the FSDP shards, are the single process's
    gathered = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    for name, p in model.trainable_parameters():
        assert torch.allclose(gathered[name], p.detach(), atol=1e-4), name

    # a 2-process checkpoint resumes on 2 processes (above) and in one process, and continues the same curve
    assert [x["loss"] for x in metrics(tmp_path / "fsdp-resumed")] == pytest.approx(expected[2:], abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "fsdp-resumed" / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]  # async
    resumed_cfg = load_train_config(path, [f"output_dir={tmp_path / 'fsdp'}", f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'step-00000002'}"])
    resumed = train(*build_model(resumed_cfg), resumed_cfg, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx(expected[2:], abs=1e-4)

    # saving the big bridge: every process writes its own shards, none gathers the whole state
    saves = [json.loads((log.parent / f"{log.name}.rank{r}").read_text().splitlines()[-1]) for r in (0, 1)]
    assert all(x["output_dir"] == str(tmp_path / "big") for x in saves)
    rank0, rank1 = (x["peak_kib"] for x in saves)
    assert rank0 <= 1.2 * rank1, saves
    weights = checkpoint_weights(tmp_path / "big" / "checkpoints" / "step-00000001")
    whole_kib = sum(t.numel() * t.element_size() for t in weights.values()) / 1024
    assert whole_kib > 60_000  # the bridge is big enough for a gather to show
    assert saves[0]["peak_kib"] - saves[0]["rss_kib"] < whole_kib, (saves, whole_kib)  # less than the weights alone
