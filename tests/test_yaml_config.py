"""The one YAML-to-dataclass loader: nested dataclasses, overrides into lists, coercion, errors that name keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from flamingo_vlm.evaluation.cli import EvalConfig, load_eval_config
from flamingo_vlm.yaml_config import apply_overrides, from_dict, load_dataclass


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Stage:
    name: str
    steps: int
    mode: Literal["fast", "slow"] = "fast"


@dataclass
class Run:
    stages: list[Stage]
    optim: Optim = field(default_factory=Optim)
    warm: Optim | None = None
    resume: bool | str = False
    clip: float | None = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


BASE = {"stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": "3"}], "optim": {"lr": "1e-4"}}


def test_nested_dataclasses_and_lists_of_them_are_built_and_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    run = load_dataclass(Run, path)
    assert run.stages == [Stage("a", 2), Stage("b", 3)]  # "3" -> 3
    assert run.optim == Optim(lr=1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert run.warm is None and load_dataclass(Run, {**BASE, "warm": {"lr": 1}}).warm == Optim(lr=1.0)


def test_overrides_reach_list_elements_and_are_coerced_as_yaml():
    run = load_dataclass(Run, BASE, ["stages.1.steps=7", "stages.0.mode=slow", "optim.betas=[0.8, 0.9]", "resume=true",
                                     "clip=null", "extra.seed=3", "warm.lr=2e-5"])
    assert run.stages[1].steps == 7 and run.stages[0].mode == "slow"
    assert run.optim.betas == (0.8, 0.9) and run.resume is True and run.clip is None
    assert run.extra == {"seed": 3} and run.warm == Optim(lr=2e-5)
    assert load_dataclass(Run, BASE, ["resume=runs/x/step-10"]).resume == "runs/x/step-10"  # bool | str: not a bool, a path
    assert BASE["stages"][1]["steps"] == "3"  # the caller's mapping is copied, not changed
    # already-parsed values (flags) by dotted key, as evaluation/cli.py gives them
    assert apply_overrides({"a": [{"b": 1}]}, {"a.0.b": [4, 8]}) == {"a": [{"b": [4, 8]}]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zzz=3"], r"unknown Run key\(s\) 'zzz'; known keys: clip, extra, optim, resume, stages, warm"),
        (["optim.lrr=3"], r"optim: unknown Optim key\(s\) 'lrr' \(did you mean 'lr'\?\); known keys: betas, lr"),
        (["stages.1.stesp=3"], r"stages\[1\]: unknown Stage key\(s\) 'stesp' \(did you mean 'steps'\?\); known keys: mode, name, steps"),
        (["stages.2.steps=3"], r"stages.2 is not an index of a list of 2"),
        (["stages.0.steps=three"], r"stages\[0\].steps must be an integer, got 'three'"),
        (["stages.0.steps=1.5"], r"stages\[0\].steps must be an integer"),
        (["stages.0.mode=medium"], r"stages\[0\].mode must be one of \('fast', 'slow'\)"),
        (["optim.betas=[1, 2, 3]"], r"optim.betas must have 2 items"),
        (["clip=abc"], r"clip must be a number, got 'abc'"),
        (["optim=3"], r"optim must be a mapping of Optim keys"),
        (["optim.lr.x=1"], r"optim.lr is a str, not a mapping or list"),
        (["steps"], r"must look like key=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_dataclass(Run, BASE, overrides)


def test_missing_required_keys_are_named():
    with pytest.raises(ValueError, match=r"stages\[0\]: missing required Stage key\(s\) \['steps'\]"):
        from_dict(Run, {"stages": [{"name": "a"}]})
    with pytest.raises(FileNotFoundError, match="run config not found"):
        load_dataclass(Run, Path("no/such.yaml"), what="run config")


def test_eval_config_unknown_keys_overrides_and_paths(tmp_path):
    path = tmp_path / "exp" / "eval.yaml"
    path.parent.mkdir()
    config = {"model": "model", "data_root": "data", "tasks": [{"type": "coco_captioning", "image_dir": "coco"}], "limit": "5"}
    path.write_text(yaml.safe_dump(config))
    loaded = load_eval_config(path, {"shots": [0, 2], "device": None}, ["tasks.0.max_new_tokens=3", "seeds=[1, 2]"])
    assert isinstance(loaded, EvalConfig) and loaded.shots == [0, 2] and loaded.seeds == [1, 2] and loaded.limit == 5
    here = path.resolve().parent
    assert loaded.model == str(here / "model") and loaded.tasks == [
        {"type": "coco_captioning", "image_dir": str(here / "data" / "coco"), "max_new_tokens": 3}]
    assert loaded.out == "eval-results.json" and loaded.selection == "random"
    with pytest.raises(ValueError, match=r"unknown EvalConfig key\(s\) 'shot' \(did you mean 'shots'\?\)"):
        load_eval_config(path, sets=["shot=[0]"])
    with pytest.raises(ValueError, match="selection must be one of"):
        load_eval_config(path, {"selection": "best"})


def test_train_config_types_its_flamingo_overrides():
    """`flamingo` stays a mapping of FlamingoConfig overrides, typed by FlamingoConfig's fields."""
    from flamingo_vlm.training import load_train_config

    base = {"datasets": [{"name": "a", "format": "pairs", "paths": ["x.tar"], "batch_size": 2}]}
    cfg = load_train_config(base, ["flamingo.gate_init_std=1e-2", "flamingo.vision_post_norm=null", "flamingo.xattn_norm_media=no"])
    assert cfg.flamingo == {"gate_init_std": 0.01, "vision_post_norm": None, "xattn_norm_media": False}
    with pytest.raises(ValueError, match=r"flamingo.resampler_depth must be an integer, got 'two'"):
        load_train_config(base, ["flamingo.resampler_depth=two"])
    with pytest.raises(ValueError, match=r"flamingo: unknown FlamingoConfig key\(s\) 'lm_hidden_size'"):
        load_train_config(base, ["flamingo.lm_hidden_size=64"])  # derived from the backbones, no longer a field
