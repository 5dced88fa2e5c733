"""The training loop: the mixture's weighted gradient sum, optimizer groups and schedule, clipping once per
step, NaN handling, corrupt samples counted, and the speed/precision options."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flamingo_vlm.data import MMC4Format, PairsFormat, TokenLayout, collate
from flamingo_vlm.data.images import ImageFilter
from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training.loop import DatasetBatch, forward_backward, micro_batches
from flamingo_vlm.training.optim import WarmupSchedule, param_groups
from helpers import build, open_gates
from train_fixtures import single_thread, image_bytes, colour_image, mixture_datasets, mmc4_shards, pair_shards, write_tar  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, mixture_datasets(root)


def config(data, tmp_path, **overrides):
    root, datasets = data
    base = {"datasets": datasets, "steps": 3, "lr": 1e-3, "output_dir": str(tmp_path / "run"), "checkpoint_every": 0, "save_final": False,
            "log_every": 1, "device": "cpu"}
    return load_train_config({**base, **overrides})


def read(fmt, shard, n):
    from flamingo_vlm.data.sources import TarSource

    records = list(TarSource().records(shard))[:n]
    return [fmt.decode(r, np.random.default_rng(0)) for r in records]


def test_mixture_weights_scale_each_datasets_gradient(tmp_path):
    """The accumulated gradient is sum_d lambda_d * grad(mean token loss of d's batch), micro-batched or not."""
    model, processor = build("llama")
    open_gates(model, 0.5)
    model.train()
    layout = TokenLayout.from_processor(processor)
    docs = read(MMC4Format(layout, processor.image_transform, max_tokens=64, max_images=5, p_next=0.0, image_filter=ImageFilter(),
                           image_dir=None), mmc4_shards(tmp_path / "d", num_shards=1)[0], 3)
    pairs = read(PairsFormat(layout, processor.image_transform), pair_shards(tmp_path / "p", num_shards=1)[0], 4)
    kw = dict(pad_token_id=layout.pad_token_id, media_token_id=layout.media_token_id)
    doc_batch, pair_batch = collate(docs, **kw), collate(pairs, **kw)
    parts = [
        DatasetBatch(0, 1.0, micro_batches(docs, None, **kw), doc_batch["num_targets"]),
        DatasetBatch(1, 0.2, micro_batches(pairs, 1, **kw), pair_batch["num_targets"]),  # 4 micro-batches of 1
    ]
    sums = forward_backward(model, parts, device=torch.device("cpu"))
    ours = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.zero_grad(set_to_none=True)

    def loss(batch):
        keys = ("input_ids", "attention_mask", "pixel_values", "frame_mask", "labels")
        return model(**{k: batch[k] for k in keys}).loss  # the core's mean token NLL

    la, lb = loss(doc_batch), loss(pair_batch)
    (1.0 * la + 0.2 * lb).backward()
    assert sums[0].item() / doc_batch["num_targets"] == pytest.approx(la.item(), rel=1e-5)
    assert sums[1].item() / pair_batch["num_targets"] == pytest.approx(lb.item(), rel=1e-5)
    for name, p in model.trainable_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert any(ours[n].abs().sum() > 0 for n in ours if n.startswith("xattn."))
    # and the weights are really applied: another lambda gives another gradient
    model.zero_grad(set_to_none=True)
    forward_backward(model, [parts[0], DatasetBatch(1, 1.0, parts[1].micro, parts[1].num_targets)], device=torch.device("cpu"))
    assert not torch.allclose(ours["resampler.latents"], model.resampler.latents.grad)


def test_history_reports_weighted_loss_and_counts(data, tmp_path):
    model, processor = build("llama")
    result = train(model, processor, config(data, tmp_path, steps=3), progress=False)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert h["loss"] == pytest.approx(1.0 * h["loss/docs"] + 0.2 * h["loss/pairs"])
        assert h["tokens"] > 0 and h["tokens_per_s"] > 0 and h["lr"] == 1e-3 and not h["skipped_step"]
        assert h["skipped/docs"] == 0 and h["skipped/pairs"] == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == [h["loss"] for h in result.history]
    rr = train(build("llama")[0], processor, config(data, tmp_path, steps=4, mixture="round_robin", output_dir=str(tmp_path / "rr")), progress=False)
    assert [sorted(k for k in h if k.startswith("loss/")) for h in rr.history] == [["loss/docs"], ["loss/pairs"]] * 2
    assert rr.history[1]["loss"] == pytest.approx(0.2 * rr.history[1]["loss/pairs"])


def test_optimizer_groups_and_schedule():
    model, _ = build("llama")
    named = list(model.trainable_parameters())
    decay, no_decay = param_groups(named, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["names"] and all(n.startswith("xattn.") and n.endswith("weight") for n in decay["names"])
    assert {n for n, p in named if n.startswith("xattn.") and p.ndim >= 2} == set(decay["names"])
    assert all(n in no_decay["names"] for n, _ in named if n.startswith(("resampler.", "new_token_")) or n.endswith("_gate"))
    s = WarmupSchedule(4, 14, "cosine", min_ratio=0.1)
    assert [s(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    c = WarmupSchedule(2, 10, "constant")
    assert [c(t) for t in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    w = WarmupSchedule(2, 10, "wsd", min_ratio=0.2, decay=4)  # steps 0-1 warm up, 2-6 at 1, then down to 0.2 at step 10
    assert [w(t) for t in range(11)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    for bad in (0, 9):
        with pytest.raises(ValueError, match="decay_steps"):
            WarmupSchedule(2, 10, "wsd", decay=bad)


def test_warmup_and_one_clip_per_optimizer_step(data, tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def counting(params, max_norm, *a, **k):
        calls.append(max_norm)
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    root, datasets = data
    micro = [{**d, "micro_batch_size": 1} for d in datasets]  # 8 micro-batches per step
    model, processor = build("llama")
    result = train(model, processor, config((root, micro), tmp_path, steps=3, warmup_steps=2, grad_clip=0.5), progress=False)
    assert calls == [0.5, 0.5, 0.5]
    assert [h["lr"] for h in result.history] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_non_finite_loss_is_reported_and_the_step_skipped(data, tmp_path):
    model, processor = build("llama")
    calls = {"n": 0}

    def poison(module, args, kwargs, output):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2, its first dataset (docs)
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.lm.base_model.register_forward_hook(poison, with_kwargs=True)  # training fuses the head with the loss
    snapshots = []
    result = train(model, processor, config(data, tmp_path, steps=3), progress=False,
                   callback=lambda record: snapshots.append({n: p.detach().clone() for n, p in model.trainable_parameters()}))
    flags = [h["skipped_step"] for h in result.history]
    assert flags == [False, True, False]
    assert math.isnan(result.history[1]["loss/docs"]) and math.isfinite(result.history[2]["loss"])
    assert all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])  # no update at step 2
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0])  # step 3 trains again

    model, processor = build("llama")
    calls["n"] = 0
    model.lm.base_model.register_forward_hook(poison, with_kwargs=True)
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite loss .* in docs; batch: \[.*docs-0000\d\.tar#docs"):
        train(model, processor, config(data, tmp_path, steps=3, nan_policy="stop", output_dir=str(tmp_path / "stop")), progress=False)


def test_corrupt_samples_are_skipped_and_counted(data, tmp_path):
    bad = write_tar(tmp_path / "bad" / "pairs-bad.tar", [
        {"__key__": f"b{i}", "png": image_bytes(colour_image(i)) if i % 3 else b"corrupt", "txt": "a red circle"} for i in range(9)
    ] + [{"__key__": "nocap", "png": image_bytes(colour_image(1))}])
    root, datasets = data
    mixed = [datasets[0], {**datasets[1], "paths": [bad]}]
    model, processor = build("llama")
    result = train(model, processor, config((root, mixed), tmp_path, steps=3), progress=False)
    last = result.history[-1]
    assert last["skipped/pairs"] >= 3 and last["skips"]["pairs"]["corrupt_image"] >= 2 and last["skips"]["pairs"]["bad_record"] >= 1
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_checkpointing_and_precision_options(data, tmp_path):
    base = train(build("llama")[0], build("llama")[1], config(data, tmp_path, steps=2), progress=False)
    model, processor = build("llama")
    ckpt = train(model, processor, config(data, tmp_path, steps=2, gradient_checkpointing=True), progress=False)
    assert [h["loss"] for h in ckpt.history] == pytest.approx([h["loss"] for h in base.history], abs=1e-6)
    assert getattr(model.lm.model.layers[0], "_flamingo_checkpointed", False)

    model, processor = build("llama")
    bf16 = train(model, processor, config(data, tmp_path, steps=2, precision="bf16", frozen_dtype="bf16"), progress=False)
    assert model.lm.model.layers[0].decoder_layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    assert [h["loss"] for h in bf16.history] == pytest.approx([h["loss"] for h in base.history], abs=5e-2)

    model, processor = build("llama")
    compiled = train(model, processor, config(data, tmp_path, steps=1, compile=True, compile_backend="eager"), progress=False)
    assert compiled.history[0]["loss"] == pytest.approx(base.history[0]["loss"], abs=1e-5)


def test_tensorboard_without_the_package_is_a_clear_error(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(build("llama")[0], build("llama")[1], config(data, tmp_path, steps=1, tensorboard=True), progress=False)


def test_flamingo_train_subcommand(data, tmp_path, capsys):
    """`flamingo train CONFIG KEY=VALUE --flags` through add_train_parser, as the `flamingo` command wires it."""
    import argparse

    import yaml

    from flamingo_vlm.tiny import create_tiny_backbones
    from flamingo_vlm.training.cli import add_train_parser
    from helpers import SMALL_BRIDGE

    lm, clip = create_tiny_backbones(tmp_path / "backbones")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"lm": lm, "vision": clip, "flamingo": SMALL_BRIDGE, "datasets": data[1], "steps": 5, "device": "cpu"}))
    parser = argparse.ArgumentParser(prog="flamingo")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", str(path), "steps=2", "datasets.1.loss_weight=0.5", "--output-dir", str(tmp_path / "run"),
                              "--set", "lr=2e-3", "--no-progress"])
    assert args.func(args) == 0
    assert "model: " in capsys.readouterr().out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["lr"] == 2e-3
    assert lines[0]["loss"] == pytest.approx(lines[0]["loss/docs"] + 0.5 * lines[0]["loss/pairs"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and (tmp_path / "run" / "final" / "flamingo_processor.json").is_file()
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        args = parser.parse_args(["train", str(path), "stepz=2"])
        args.func(args)


def test_gate_lr_multiplier_gives_the_gates_their_own_learning_rate():
    import torch
    from torch import nn

    from flamingo_vlm.training.optim import build_optimizer, build_scheduler

    named = [("xattn.0.attn_gate", nn.Parameter(torch.zeros(1))), ("xattn.0.attn.to_q.weight", nn.Parameter(torch.ones(2, 2))),
             ("resampler.latents", nn.Parameter(torch.ones(2, 2)))]
    opt = build_optimizer(named, lr=1e-3, weight_decay=0.1, gate_lr_multiplier=10.0)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs == {"xattn.0.attn_gate": 1e-2, "xattn.0.attn.to_q.weight": 1e-3, "resampler.latents": 1e-3}
    build_scheduler(opt, warmup_steps=2, total_steps=4)  # sets step 0's lr: warm-up scales every group
    assert {n: g["lr"] for g in opt.param_groups for n in g["names"]}["xattn.0.attn_gate"] == 5e-3
    assert len(build_optimizer(named, lr=1e-3, weight_decay=0.1).param_groups) == 2


def test_fused_adamw_is_the_default_and_updates_as_the_per_tensor_loop():
    import torch
    from torch import nn

    from flamingo_vlm.training.optim import build_optimizer

    torch.manual_seed(0)
    start = {"xattn.0.ff.0.weight": torch.randn(8, 4), "xattn.0.attn_gate": torch.zeros(1), "resampler.latents": torch.randn(3, 4)}
    runs = {}
    for fused in (None, False):
        named = [(n, nn.Parameter(t.clone())) for n, t in start.items()]
        opt = build_optimizer(named, lr=1e-2, weight_decay=0.1, fused=fused)
        assert all(g["fused"] is (fused is None) for g in opt.param_groups)  # default: fused on CPU
        for step in range(5):
            for i, (_, p) in enumerate(named):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).view_as(p)
            opt.step()
        runs[fused] = [p.detach() for _, p in named]
    assert not torch.equal(runs[None][0], start["xattn.0.ff.0.weight"])  # the steps did move the weights
    for a, b in zip(runs[None], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
