"""A tiny end-to-end run of the demo pipeline: toy world -> toy backbones -> training -> few-shot eval."""

import json
import time
from dataclasses import asdict, replace

import torch
from helpers import build
from train_fixtures import mixture_datasets

from flamingo_vlm.toyworld.backbones import BackboneSizes
from flamingo_vlm.toyworld.cache import ensure_toyworld
from flamingo_vlm.toyworld.demo import DemoSettings, run_demo, training_probe
from flamingo_vlm.toyworld.generate import WorldSizes, generate_world
from flamingo_vlm.toyworld.tasks import LabelMappingTask
from flamingo_vlm.training import load_train_config, train


def test_tiny_demo_end_to_end(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    tiny_sizes = BackboneSizes.tiny()
    summary = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", settings=DemoSettings.tiny(), world_preset="tiny", progress=False)
    printed = capsys.readouterr().out
    assert "toy backbones: pretrained here" in printed  # the tiny preset ships nothing
    # each task's numbers are printed as soon as its runs are scored, before the whole table
    streamed = [line.split()[0] for line in printed.split("few-shot evaluation")[1].split("\n\n")[0].splitlines()[2:]]
    assert streamed == [row["task"] for row in summary["summary"][:: len(DemoSettings.tiny().shots)]]
    out = tmp_path / "out"
    for name in ("results.json", "results.txt", "few_shot.png", "eval.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    tasks = {row["task"] for row in results["summary"]}
    assert {"captioning", "vqa", "classification", "video_qa", "heldout_new_format", "label_mapping_colour", "heldout_label_mapping_size"} <= tasks
    assert {row["shots"] for row in results["summary"]} == set(DemoSettings.tiny().shots)
    # at alpha = 0 the model had the LM's exact text loss; frozen really means frozen
    assert summary["init_text_loss"] == summary["lm_text_loss"]
    assert summary["lm_unchanged"] is True
    losses = summary["train"]["losses"]
    assert len(losses) == DemoSettings.tiny().steps and all(l == l for l in losses)
    assert sum(losses[-2:]) < sum(losses[:2])  # the loss falls

    # a second run reuses the cached world and backbones (nothing is rebuilt)
    stamp = (ensure_toyworld(tmp_path / "cache", preset="tiny", progress=False)["lm"] / "DONE").stat().st_mtime
    run_demo(tmp_path / "out2", cache_dir=tmp_path / "cache", settings=DemoSettings.tiny(), world_preset="tiny", progress=False)
    assert (ensure_toyworld(tmp_path / "cache", preset="tiny", progress=False)["lm"] / "DONE").stat().st_mtime == stamp

    # a backbone trained with other settings than the code's (an older cache) is rebuilt, and only that one
    paths = ensure_toyworld(tmp_path / "cache", preset="tiny", progress=False)
    lm_stamp, clip_stamp = ((paths[k] / "DONE").stat().st_mtime_ns for k in ("lm", "clip"))
    monkeypatch.setattr(BackboneSizes, "tiny", classmethod(lambda cls: replace(tiny_sizes, clip_steps=tiny_sizes.clip_steps + 1)))
    ensure_toyworld(tmp_path / "cache", preset="tiny", progress=False)
    assert (paths["lm"] / "DONE").stat().st_mtime_ns == lm_stamp
    assert (paths["clip"] / "DONE").stat().st_mtime_ns != clip_stamp
    assert json.loads((paths["clip"] / "DONE").read_text())["settings"]["clip_steps"] == tiny_sizes.clip_steps + 1


def test_the_shipped_backbones_are_what_the_code_trains(tmp_path):
    """The full preset's backbones in the package were trained by this code on this world's data; a change to
    either (settings, LM corpus, image-text pairs, backbones.py) must come with `flamingo demo --rebuild` and
    `python -m flamingo_vlm.toyworld.cache` (docs/toyworld.md), or the demo would pretrain them itself."""
    from flamingo_vlm.toyworld.cache import SHIPPED, _shipped, backbone_sources, build_info
    from flamingo_vlm.toyworld.generate import generate_world

    world = generate_world(tmp_path / "world", parts=("text", "pairs"), progress=False)  # ~12 s of CPU
    assert build_info(SHIPPED / "lm").get("sources") == backbone_sources(world)
    settings = asdict(BackboneSizes())
    lm_settings = {k: v for k, v in settings.items() if k.startswith("lm_") or k == "vocab_size"}
    clip_settings = {"lm": lm_settings, **{k: v for k, v in settings.items() if k.startswith("clip_")}}
    assert _shipped("lm", lm_settings, world) == SHIPPED / "lm"
    assert _shipped("clip", clip_settings, world) == SHIPPED / "clip"
    # and they load through from_pretrained, the path a real backbone takes
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    assert AutoModelForCausalLM.from_pretrained(SHIPPED / "lm").config.num_hidden_layers == BackboneSizes().lm_layers
    assert len(AutoTokenizer.from_pretrained(SHIPPED / "lm")) == BackboneSizes().vocab_size
    assert CLIPVisionModel.from_pretrained(SHIPPED / "clip").config.num_hidden_layers == BackboneSizes().clip_layers


def test_shipped_backbones_are_refused_when_anything_they_were_trained_from_changes(tmp_path, monkeypatch):
    from flamingo_vlm.toyworld import cache

    world = tmp_path / "world"
    (world / "text").mkdir(parents=True)
    (world / "text" / "lm_corpus.txt").write_text("another corpus\n")
    shipped = cache.build_info(cache.SHIPPED / "lm")
    assert cache._shipped("lm", shipped["settings"], world) is None  # other data
    monkeypatch.setattr(cache, "backbone_sources", lambda w: shipped["sources"])
    assert cache._shipped("lm", shipped["settings"], world) == cache.SHIPPED / "lm"
    assert cache._shipped("lm", {**shipped["settings"], "lm_steps": 1}, world) is None  # other settings


def test_the_training_probe_leaves_the_training_as_it_would_be(tmp_path, capsys):
    """The demo scores a held-out task during training; the run's losses are bit-identical to a run without it."""
    torch.set_num_threads(1)
    world = generate_world(tmp_path / "world", sizes=WorldSizes.tiny(), parts=("eval",), progress=False)
    task = LabelMappingTask("label_mapping_colour", scenes_json=str(world / "eval" / "heldout" / "scenes.json"))
    datasets = mixture_datasets(tmp_path / "data")
    losses = {}
    for probing in (False, True):
        model, processor = build("llama")
        probe = training_probe(model, processor, task, shots=2, every=2, steps=5, queries=3, seed=0, batch_size=4, start=time.time())
        config = load_train_config({"datasets": datasets, "steps": 5, "lr": 1e-3, "output_dir": str(tmp_path / f"run{probing}"),
                                    "checkpoint_every": 0, "save_final": False, "device": "cpu"})
        losses[probing] = [h["loss"] for h in train(model, processor, config, progress=False, callback=probe if probing else None).history]
    assert losses[True] == losses[False]
    probes = [line for line in capsys.readouterr().out.splitlines() if "label_mapping_colour at 2 shots" in line]
    assert [line.split(":")[0].strip() for line in probes] == ["step 2", "step 4"]
