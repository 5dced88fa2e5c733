"""Train configs: YAML + overrides, clear errors for keys that do not exist, the shipped templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flamingo_vlm.training import DatasetConfig, TrainConfig, load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))

BASE = {
    "datasets": [
        {"name": "m3w", "format": "mmc4", "paths": ["docs/{00000..00003}.tar"], "batch_size": 8},
        {"name": "laion", "format": "pairs", "paths": "laion/*.tar", "batch_size": 16, "loss_weight": 0.2},
    ],
    "steps": 10,
    "lr": "1e-4",  # YAML 1.1 reads 1e-4 as a string: coerced
    "flamingo": {"cross_attn_every_n_layers": 4},
}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_train_config(path, ["steps=100", "datasets.0.batch_size=4", "datasets.1.loss_weight=0.5", "lr=3e-4",
                                   "flamingo.resampler_depth=2", "betas=[0.9, 0.95]", "resume=true", "grad_clip=null"])
    assert isinstance(cfg, TrainConfig) and all(isinstance(d, DatasetConfig) for d in cfg.datasets)
    assert cfg.steps == 100 and cfg.lr == 3e-4 and cfg.betas == (0.9, 0.95) and cfg.resume is True and cfg.grad_clip is None
    assert cfg.datasets[0].batch_size == 4 and cfg.datasets[1].loss_weight == 0.5
    assert cfg.datasets[1].paths == ["laion/*.tar"]  # a single path becomes a list
    assert cfg.flamingo == {"cross_attn_every_n_layers": 4, "resampler_depth": 2}
    assert load_train_config(BASE).lr == 1e-4
    assert load_train_config(BASE, ["resume=runs/x/checkpoints/step-00000010"]).resume == "runs/x/checkpoints/step-00000010"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stpes=3"], r"unknown TrainConfig key\(s\) 'stpes' \(did you mean 'steps'\?\)"),
        (["datasets.1.batch_sise=3"], r"datasets\[1\]: unknown DatasetConfig key\(s\) 'batch_sise' \(did you mean 'batch_size'\?\)"),
        (["flamingo.cross_attn_every=2"], r"flamingo: unknown FlamingoConfig key\(s\) 'cross_attn_every' \(did you mean 'cross_attn_every_n_layers'\?\)"),
        (["flamingo.media_token_id=5"], r"builder fills in"),
        (["datasets.0.format=webvid"], r"format must be one of"),
        (["mixture=interleave"], r"mixture must be one of"),
        (["steps=ten"], r"steps must be an integer"),
        (["datasets.5.batch_size=1"], r"not an index of a list of 2"),
        (["steps"], r"must look like key=value"),
        (["datasets.0.p_next=1.5"], r"p_next must be in \[0, 1\]"),
        (["schedule=wsd"], r"schedule 'wsd' needs 0 < decay_steps <= steps - warmup_steps \(10\), got 0"),
        (["schedule=wsd", "decay_steps=11"], r"decay_steps <= steps - warmup_steps \(10\), got 11"),
        (["decay_steps=-1"], r"decay_steps must be >= 0"),
        (["schedule=linear"], r"schedule must be one of \('constant', 'cosine', 'wsd'\), got 'linear'"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(BASE, overrides)


def test_missing_required_keys():
    with pytest.raises(ValueError, match=r"datasets\[0\]: missing required DatasetConfig key\(s\) \['batch_size'\]"):
        load_train_config({"datasets": [{"name": "a", "format": "pairs", "paths": ["x.tar"]}]})
    with pytest.raises(ValueError, match="no `datasets`"):
        load_train_config({"steps": 3})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_templates_are_valid(path):
    cfg = load_train_config(path)
    assert cfg.lm and cfg.vision and cfg.datasets
    assert cfg.flamingo.get("resampler_depth", 6) == 6 and cfg.flamingo.get("resampler_num_latents", 64) == 64


def test_templates_follow_the_paper():
    every = {p.stem: load_train_config(p).flamingo["cross_attn_every_n_layers"] for p in CONFIGS if p.stem.startswith("flamingo-")}
    assert every == {"flamingo-3b": 1, "flamingo-9b": 4, "flamingo-80b": 7}
    paper = load_train_config(CONFIGS[[p.stem for p in CONFIGS].index("flamingo-3b")])
    assert {d.name: d.loss_weight for d in paper.datasets} == {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03}
    assert paper.mixture == "accumulate" and paper.warmup_steps == 5000 and paper.lr == 1e-4 and paper.grad_clip == 1.0
