"""Checkpoints and exact resume: a run killed and resumed gives the losses and weights of an uninterrupted
one; a checkpoint write killed half-way leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training import checkpoint as ckpt
from flamingo_vlm.training.checkpoint import latest_checkpoint, list_checkpoints
from helpers import SMALL_BRIDGE, build
from train_fixtures import mixture_datasets, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 6


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return mixture_datasets(root, lanes=2)  # lanes fixed: the data order survives a change of workers


def config(data, out, **overrides):
    base = {"datasets": data, "steps": STEPS, "lr": 1e-3, "output_dir": str(out), "checkpoint_every": 2, "keep_last": 2, "log_every": 1, "device": "cpu"}
    return load_train_config({**base, **overrides})


def weights(model):
    return {n: p.detach().clone() for n, p in model.trainable_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    model, processor = build("llama")
    result = train(model, processor, config(data, out), progress=False)
    return out, [h["loss"] for h in result.history], weights(model)


def test_uninterrupted_run_keeps_the_last_checkpoints(uninterrupted):
    out, losses, final = uninterrupted
    assert len(losses) == STEPS
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # keep_last: 2
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and set(state["data"]) == {"docs", "pairs"} and state["data"]["docs"]["lanes"] == 2
    # the final model is a save_pretrained directory (with the processor) holding the trained weights
    from flamingo_vlm import load_flamingo
    from flamingo_vlm.tiny import make_tiny_clip, make_tiny_lm, make_tokenizer

    reloaded, processor = load_flamingo(out / "final", lm=make_tiny_lm("llama", vocab_size=len(make_tokenizer())), vision=make_tiny_clip())
    assert processor.media_token_id == reloaded.config.media_token_id
    assert all(torch.equal(p, final[n]) for n, p in reloaded.trainable_parameters())
    # a (sharded) checkpoint exports to the same layout
    exported = ckpt.export_checkpoint(out / "checkpoints" / "step-00000006", out / "exported")
    reloaded, _ = load_flamingo(exported, lm=make_tiny_lm("llama", vocab_size=len(make_tokenizer())), vision=make_tiny_clip(),
                                tokenizer=make_tokenizer())
    assert all(torch.equal(p, final[n]) for n, p in reloaded.trainable_parameters())


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async_checkpoint"])
def test_killed_and_resumed_run_reproduces_the_losses(data, uninterrupted, tmp_path, background):
    _, losses, final = uninterrupted

    def crash_after_5(record):
        if record["step"] == 5:
            raise Crash

    model, processor = build("llama")
    with pytest.raises(Crash):
        train(model, processor, config(data, tmp_path, async_checkpoint=background), progress=False, callback=crash_after_5)
    # in the background, the step-4 save is published only when the next one starts: a crash leaves step 2
    resumed_from = 2 if background else 4
    assert latest_checkpoint(tmp_path).name == f"step-{resumed_from:08d}"
    del model  # the process is gone: a fresh model, built the same way, continues

    model, processor = build("llama")
    resumed = train(model, processor, config(data, tmp_path, resume=True, num_workers=2, async_checkpoint=background), progress=False)
    assert resumed.start_step == resumed_from and [h["step"] for h in resumed.history] == list(range(resumed_from + 1, STEPS + 1))
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses[resumed_from:], abs=1e-6)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    after = weights(model)
    for n in final:
        assert torch.allclose(after[n], final[n], atol=1e-6), n
    # the metrics file holds each step once: the lines after the checkpoint were rewritten
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    assert [x["loss"] for x in lines] == pytest.approx(losses, abs=1e-6)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(data, uninterrupted, tmp_path, monkeypatch):
    _, losses, final = uninterrupted
    real = ckpt.write_bytes

    def dying_write(path, data):
        if path.parent.name == ".tmp-step-00000004" and path.name == ckpt.OPTIMIZER_NAME:
            real(path, data[: len(data) // 2])  # half the file is on disk when the process dies
            raise Crash
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", dying_write)
    model, processor = build("llama")
    with pytest.raises(Crash):
        train(model, processor, config(data, tmp_path), progress=False)
    monkeypatch.setattr(ckpt, "write_bytes", real)
    assert (tmp_path / "checkpoints" / ".tmp-step-00000004").is_dir()  # the half-written one, never published
    previous = latest_checkpoint(tmp_path)
    assert previous.name == "step-00000002"
    # the previous checkpoint loads: as a model directory, and to resume from
    state = ckpt.checkpoint_weights(previous)
    fresh, processor = build("llama")
    fresh.load_flamingo_state_dict(state)
    resumed = train(fresh, processor, config(data, tmp_path, resume=True), progress=False)
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses[2:], abs=1e-6)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000004").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]


def test_sigkill_during_training_then_resume_from_the_command_line(data, tmp_path):
    """A real kill -9 of a `flamingo train` process, then `--resume`: the losses are the uninterrupted ones."""
    from flamingo_vlm.tiny import create_tiny_backbones
    from flamingo_vlm.training.cli import build_model

    lm, clip = create_tiny_backbones(tmp_path / "backbones")
    cfg = {"lm": lm, "vision": clip, "flamingo": SMALL_BRIDGE, "datasets": data, "steps": 40, "lr": 1e-3, "checkpoint_every": 2,
           "keep_last": 0, "log_every": 1, "output_dir": str(tmp_path / "run"), "save_final": False, "device": "cpu"}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "flamingo_vlm.training.cli", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 4 for s, _ in list_checkpoints(tmp_path / "run")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = list_checkpoints(tmp_path / "run")[-1][0]
    assert proc.returncode == -signal.SIGKILL and killed_at < 40
    steps = killed_at + 2
    done = subprocess.run(cmd + ["--resume", f"steps={steps}"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, steps + 1))
    # reference: the same config run uninterrupted in this process
    reference_cfg = load_train_config({**cfg, "steps": steps, "output_dir": str(tmp_path / "reference")})
    reference = train(*build_model(reference_cfg), reference_cfg, progress=False)
    assert [x["loss"] for x in lines] == pytest.approx([h["loss"] for h in reference.history], abs=1e-6)
