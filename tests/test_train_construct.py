"""Sharded construction (meta device, FSDP2, each process reading only its slices of the backbones'
safetensors): the logits are those of the ordinary build, in one process and on 2 (torchrun, gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flamingo_vlm.training.construct import SafetensorsIndex, checkpoint_key
from helpers import SMALL_BRIDGE
from train_fixtures import single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
SCRIPT = Path(__file__).with_name("dist_construct.py")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    from flamingo_vlm.tiny import create_tiny_backbones

    root = tmp_path_factory.mktemp("construct")
    lm, clip = create_tiny_backbones(root / "backbones")
    cfg = {
        "lm": lm,
        "vision": clip,
        "flamingo": SMALL_BRIDGE,
        "device": "cpu",
        "output_dir": str(root / "run"),
        "datasets": [{"name": "p", "format": "pairs", "paths": ["unused/*.tar"], "batch_size": 2}],
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd: list[str], timeout: int = 180) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="no torchrun")
def test_sharded_construction_gives_the_ordinary_logits(config_path, tmp_path):
    common = ["frozen_dtype=bf16"]  # the cast happens as slices are read; the new token rows use the checkpoint's rows
    run([sys.executable, str(SCRIPT), str(config_path), str(tmp_path / "plain"), *common])
    run([sys.executable, str(SCRIPT), str(config_path), str(tmp_path / "one"), "sharded_construction=true", *common])
    run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(SCRIPT),
            str(config_path),
            str(tmp_path / "two"),
            "sharded_construction=true",
            *common,
        ]
    )
    plain = torch.load(tmp_path / "plain.pt")
    assert plain.abs().max() > 0
    for name in ("one", "two"):
        assert torch.allclose(torch.load(tmp_path / f"{name}.pt"), plain, atol=1e-5, rtol=0), name


def test_checkpoint_names_drop_the_wrappers(config_path):
    index = SafetensorsIndex(Path(yaml.safe_load(config_path.read_text())["lm"]))
    assert (
        checkpoint_key("model.layers.0.decoder_layer.self_attn.q_proj.weight", index, ("model",))
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert checkpoint_key("model.embed_tokens.base.weight", index, ("model",)) == "model.embed_tokens.weight"
    with pytest.raises(KeyError, match="no tensor 'model.nothing.weight'"):
        checkpoint_key("model.nothing.weight", index, ("model",))
    rows = index.slice("model.embed_tokens.weight", 2, 5)
    assert rows.shape[0] == 3
