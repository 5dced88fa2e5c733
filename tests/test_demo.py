"""A tiny end-to-end run of the demo pipeline: toy world -> toy backbones -> training -> few-shot eval."""

import json
from dataclasses import replace

import torch

from flamingo_vlm.toyworld.backbones import BackboneSizes
from flamingo_vlm.toyworld.cache import ensure_toyworld
from flamingo_vlm.toyworld.demo import DemoSettings, run_demo


def test_tiny_demo_end_to_end(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    tiny_sizes = BackboneSizes.tiny()
    summary = run_demo(tmp_path / "out", cache_dir=tmp_path / "cache", settings=DemoSettings.tiny(), world_preset="tiny", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "results.txt", "few_shot.png", "eval.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    tasks = {row["task"] for row in results["summary"]}
    assert {"captioning", "vqa", "classification", "video_qa", "heldout_new_format", "heldout_label_mapping"} <= tasks
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
