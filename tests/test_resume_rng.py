"""Resume restores the random number generators: a run whose steps consume randomness (dropout-like noise
drawn from torch, numpy and Python's random, as dropout, augmentation or sampling code would) gives, once
killed and resumed, the losses, the draws and the weights of the uninterrupted run.

Today nothing in the training loop draws from the global generators after the start (the data streams
are keyed by seed), so the noise is added by a forward hook on a gated xattn block: without it, a resume
that forgot the RNG states would look exact.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training.checkpoint import latest_checkpoint
from helpers import build
from train_fixtures import mixture_datasets, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 4


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return [d for d in mixture_datasets(tmp_path_factory.mktemp("data"), lanes=2) if d["name"] == "pairs"]


def config(data, out, **overrides):
    base = {"datasets": data, "steps": STEPS, "lr": 1e-3, "output_dir": str(out), "checkpoint_every": 2, "log_every": 1,
            "device": "cpu", "save_final": False}
    return load_train_config({**base, **overrides})


def noisy_model():
    """A tiny model whose first gated block's output gets dropout and a random scale at every call, from
    all three generators; returns (model, processor, draws) with draws: one tuple per call."""
    model, processor = build("llama")
    draws: list[tuple[float, float, float]] = []

    def noise(block, args, output):
        if not block.training:
            return None
        scale = 1 + 0.1 * float(np.random.standard_normal()) + 0.1 * random.random()
        mask = (torch.rand(output.shape) > 0.2).to(output.dtype) / 0.8
        draws.append((float(mask.sum()), scale, float(torch.rand(()))))
        return output * mask * scale

    model.xattn_blocks[0].register_forward_hook(noise)
    return model, processor, draws


def fresh_process_rngs():
    """What a new process starts with (train seeds torch itself; numpy and random are the process's)."""
    random.seed(1234)
    np.random.seed(1234)


def test_killed_and_resumed_run_continues_the_random_streams(data, tmp_path):
    fresh_process_rngs()
    model, processor, straight_draws = noisy_model()
    straight = train(model, processor, config(data, tmp_path / "straight"), progress=False)
    straight_losses = [h["loss"] for h in straight.history]
    straight_weights = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    calls_per_step = len(straight_draws) // STEPS
    assert calls_per_step >= 1 and len(straight_draws) == STEPS * calls_per_step

    def crash_after_3(record):
        if record["step"] == 3:
            raise Crash

    fresh_process_rngs()
    model, processor, _ = noisy_model()
    with pytest.raises(Crash):
        train(model, processor, config(data, tmp_path / "killed"), progress=False, callback=crash_after_3)
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000002"

    fresh_process_rngs()
    model, processor, resumed_draws = noisy_model()
    resumed = train(model, processor, config(data, tmp_path / "killed", resume=True), progress=False)
    assert [h["step"] for h in resumed.history] == [3, 4]
    # the draws of steps 3-4 are the uninterrupted run's: every generator continued where it was saved
    assert resumed_draws == straight_draws[2 * calls_per_step :]
    assert [h["loss"] for h in resumed.history] == pytest.approx(straight_losses[2:], abs=1e-6)
    for name, p in model.trainable_parameters():
        torch.testing.assert_close(p.detach(), straight_weights[name], atol=1e-6, rtol=0, msg=name)
    # and the draws matter: steps 3-4 drew other numbers than steps 1-2 (a run restarting the streams
    # would repeat those)
    assert straight_draws[: 2 * calls_per_step] != straight_draws[2 * calls_per_step :]
