"""The launch plan: ``flamingo train CONFIG --dry-run --world-size N`` and the checks every launch runs first.

The templates are checked at the launch size their own header documents, on the meta device, with
backbone configs of the real checkpoints' shapes written here (no hub access: config.json only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flamingo_vlm.cli import main
from flamingo_vlm.tiny import make_tiny_clip, make_tiny_lm, make_tokenizer
from flamingo_vlm.training import load_train_config, plan

TEMPLATES = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))

# config.json of each template's LM, at the published checkpoint's shape
LM_SHAPES = {
    "EleutherAI/pythia-1.4b": dict(
        model_type="gpt_neox",
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        vocab_size=50304,
        rotary_pct=0.25,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "meta-llama/Llama-3.1-70B": dict(
        model_type="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
    ),
    "mosaicml/mpt-7b": dict(
        model_type="mpt", d_model=4096, n_layers=32, n_heads=32, expansion_ratio=4, vocab_size=50432
    ),
}
CLIP_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """{hub name: local directory with that checkpoint's config.json} (+ a tokenizer beside each LM)."""
    from transformers import AutoConfig, CLIPVisionConfig

    root = tmp_path_factory.mktemp("backbones")
    tokenizer = make_tokenizer()
    dirs = {}
    for name, shape in LM_SHAPES.items():
        shape = dict(shape)
        path = root / name.replace("/", "--")
        AutoConfig.for_model(shape.pop("model_type"), **shape).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    CLIPVisionConfig(**CLIP_L14).save_pretrained(root / "clip-l14")
    dirs["vision"] = str(root / "clip-l14")
    return dirs


def documented_world_size(template: Path) -> int:
    """nnodes x nproc-per-node of the torchrun line in the template's header."""
    header = "".join(line for line in template.read_text().splitlines(keepends=True) if line.startswith("#"))
    nproc = re.search(r"--nproc-per-node (\d+)", header)
    assert nproc, f"{template.name}: no documented torchrun launch line"
    nnodes = re.search(r"--nnodes (\d+)", header)
    return int(nproc.group(1)) * (int(nnodes.group(1)) if nnodes else 1)


def template_args(template: Path, backbones: dict, tmp_path: Path) -> list[str]:
    cfg = load_train_config(template)
    args = [f"lm={backbones[cfg.lm]}", f"vision={backbones['vision']}", f"output_dir={tmp_path / 'run'}"]
    if (
        cfg.flamingo.get("vision_type") == "open_clip"
    ):  # open_clip's ViT-L/14 has CLIP ViT-L/14's shape: the HF config stands in
        args += ["flamingo.vision_type=clip", "vision_kwargs={}"]
    return args


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_passes_at_its_documented_size(template, backbones, tmp_path, capsys):
    world = documented_world_size(template)
    rc = main(
        ["train", str(template), *template_args(template, backbones, tmp_path), "--dry-run", "--world-size", str(world)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"dry run: {world} process(es)" in out and "dry run passed" in out
    assert re.search(r"parameters: [\d,]+ \([\d,]+ trained, [\d,]+ frozen\)", out)
    assert "memory per rank" in out and "communicated per rank per step" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_a_world_size_that_does_not_fit_fails_before_building(backbones, tmp_path, monkeypatch, capsys):
    template = next(t for t in TEMPLATES if t.stem == "flamingo-80b")
    args = template_args(template, backbones, tmp_path)

    def must_not_build(*a, **k):
        raise AssertionError("the model was built before the world-size checks")

    monkeypatch.setattr(plan, "build_meta_model", must_not_build)
    rc = main(["train", str(template), *args, "--dry-run", "--world-size", "128"])
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "cannot run on 128 process(es)" in err
        and "dataset 'vtp': batch_size=64 (global) is not divisible by the 128 processes" in err
    )

    # the real launch runs the same checks before it downloads or builds anything
    from flamingo_vlm.training import cli as train_cli

    monkeypatch.setattr(train_cli, "build_model", must_not_build)
    monkeypatch.setenv("WORLD_SIZE", "128")
    rc = main(["train", str(template), *args])
    assert rc == 2 and "dataset 'vtp'" in capsys.readouterr().err


BASE = {
    "datasets": [
        {"name": "docs", "format": "mmc4", "paths": ["docs/*.tar"], "batch_size": 8, "micro_batch_size": 2},
        {"name": "pairs", "format": "pairs", "paths": ["pairs/*.tar"], "batch_size": 16, "lanes": 4},
    ],
    "steps": 10,
}


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ([], 3, r"dataset 'docs': batch_size=8 \(global\) is not divisible by the 3 processes"),
        (["datasets.1.lanes=32"], 8, r"dataset 'pairs': lanes=32 must divide batch_size=16"),
        (
            ["distributed=hsdp", "shard_size=8"],
            4,
            r"hsdp with shard_size=8 needs a world size that is a multiple of it, got 4",
        ),
        (
            ["datasets.1.lanes=3"],
            1,
            r"dataset 'pairs': lanes=3 must divide batch_size=16",
        ),
        (
            ["pack_length=256", "pack_micro_batch_rows=2"],
            2,
            r"pack_micro_batch_rows needs a single process",
        ),
    ],
)
def test_world_size_rules(tmp_path, overrides, world, message):
    cfg = load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ValueError, match=message):
        plan.check_launch(cfg, world)


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "datasets.1.lanes=32"])
    with pytest.raises(ValueError) as e:
        plan.check_launch(cfg, 16)
    assert "dataset 'docs'" in str(e.value) and "dataset 'pairs'" in str(e.value)


def test_output_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir '.*file' is a file"):
        plan.check_launch(load_train_config(BASE, [f"output_dir={tmp_path / 'file'}"]), 2)
    with pytest.raises(ValueError, match=r"is a file, so the directory cannot be created"):
        plan.check_launch(load_train_config(BASE, [f"output_dir={tmp_path / 'file' / 'run'}"]), 2)
    lines = plan.check_launch(load_train_config(BASE, [f"output_dir={tmp_path / 'a' / 'b'}"]), 2)
    assert lines[0] == "docs: global batch 8 = 2 processes x 4 (2 micro-batches of up to 2), 2 lanes"
    assert not (tmp_path / "a").exists()


def test_resume_checks_the_checkpoints_lanes(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "data": {"docs": {"lanes": 4, "states": {}}}}))
    cfg = load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "resume=true"])
    plan.check_launch(cfg, 2)  # the checkpoint's 4 lanes split over 2 processes
    # at 8 processes the default would be 8 lanes, but the run continues with the checkpoint's 4, two
    # processes reading each (4 is not a multiple of 8: allowed, and said)
    lines = plan.check_launch(load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "resume=true"]), 8)
    assert lines[0] == ("docs: global batch 8 = 8 processes x 1 (1 micro-batches of up to 1), 4 lanes "
                        "(4 read by two or more processes: a multiple of 8 lanes avoids that)")
    assert lines[1].endswith("4 lanes (4 read by two or more processes: a multiple of 8 lanes avoids that)")
    plan.check_launch(load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "datasets.1.lanes=8"]), 8)
    with pytest.raises(
        ValueError,
        match=r"dataset 'docs': lanes=4 must divide batch_size=6 \(lanes 4 from the checkpoint .*step-00000004\)",
    ):
        plan.check_launch(
            load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "resume=true", "datasets.0.batch_size=6"]), 2
        )


def test_meta_build_has_the_real_builds_parameters(tmp_path):
    """The meta-device model has exactly the parameters (names, shapes, trainable or not) of a real build."""
    from flamingo_vlm import build_flamingo

    tokenizer = make_tokenizer()
    make_tiny_lm("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    make_tiny_clip().save_pretrained(tmp_path / "clip")
    overrides = {
        "cross_attn_every_n_layers": 1,
        "resampler_depth": 2,
        "resampler_num_latents": 4,
        "xattn_heads": 2,
        "xattn_dim_head": 8,
    }
    real, _ = build_flamingo(str(tmp_path / "lm"), str(tmp_path / "clip"), **overrides)
    cfg = load_train_config(
        {
            "datasets": BASE["datasets"],
            "lm": str(tmp_path / "lm"),
            "vision": str(tmp_path / "clip"),
            "flamingo": overrides,
        }
    )
    meta = plan.build_meta_model(cfg)
    shapes = lambda m: {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(meta) == shapes(real)
    assert all(p.device.type == "meta" for p in meta.parameters())
    est = plan.estimate(meta, cfg, 2)
    assert est.trained_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert est.trained_params + est.frozen_params == sum(p.numel() for p in real.parameters())


class FakeEnv:
    """Two processes, of which process 1 does not see rank 0's files (another node's local disk)."""

    distributed, is_main, rank, world_size = True, True, 0, 2

    def broadcast_object(self, obj):
        return obj

    def barrier(self):
        pass

    def gather_objects(self, obj):
        return [obj, False]


def test_an_output_dir_that_is_not_shared_fails_at_the_start(tmp_path):
    with pytest.raises(ValueError, match=r"is not shared: process\(es\) \[1\] do not see what rank 0 wrote"):
        plan.check_shared_output_dir(tmp_path, FakeEnv())
    assert list(tmp_path.iterdir()) == []  # the token file is removed


def test_data_loading_defaults_follow_the_device(tmp_path):
    cfg = load_train_config(BASE, [f"output_dir={tmp_path / 'run'}"])
    assert cfg.num_workers is None and cfg.pin_memory is None
    assert (plan.data_workers(cfg, "cuda"), plan.pin_memory(cfg, "cuda")) == (plan.GPU_NUM_WORKERS, True)
    assert (plan.data_workers(cfg, "cpu"), plan.pin_memory(cfg, "cpu")) == (0, False)
    assert plan.data_workers(load_train_config(BASE, [f"output_dir={tmp_path}", "device=cuda:1"])) == plan.GPU_NUM_WORKERS
    # the default lanes follow the workers: 2 processes x 2 workers on GPUs
    assert plan.dataset_lanes(cfg, 2, "cuda")["docs"] == 4 and plan.dataset_lanes(cfg, 2, "cpu")["docs"] == 2
    chosen = load_train_config(BASE, [f"output_dir={tmp_path / 'run'}", "num_workers=3", "pin_memory=false"])
    assert (plan.data_workers(chosen, "cuda"), plan.pin_memory(chosen, "cuda")) == (3, False)
