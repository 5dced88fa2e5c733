"""Packed training batches (TrainConfig.pack_length): every sample of a packed row is computed as it would be
alone, by the LM, the cross-attention and the loss; the step's weighted gradient is the unpacked one."""

from __future__ import annotations

import random

import pytest
import torch

from flamingo_vlm.data import TokenLayout, collate
from flamingo_vlm.data.mixture import DEFAULT_MAX_TOKENS
from flamingo_vlm.data.packing import collate_packed, pack_rows
from flamingo_vlm.data.samples import Sample
from flamingo_vlm.modeling.loss import IGNORE_INDEX
from flamingo_vlm.processing import stack_media
from flamingo_vlm.processing.labels import make_labels
from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training.loop import DatasetBatch, check_packed_attention, forward_backward, micro_batches
from helpers import build, randomize_bridge
from train_fixtures import single_thread, mixture_datasets  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def random_samples(rng: random.Random, model, n: int, *, frames=(1,), max_len: int = 24, size: int = 32) -> list[Sample]:
    """Rows as the data formats make them: text and ``<image>`` tokens in any order (also none, also first),
    ending with <|endofchunk|>, each medium of a random frame count from ``frames``."""
    c = model.config
    out = []
    for k in range(n):
        length = rng.randint(2, max_len)
        ids = [rng.randrange(3, 200) for _ in range(length)]
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            ids[rng.randrange(length)] = c.media_token_id
        ids[-1] = c.end_of_chunk_token_id
        media = [torch.randn(rng.choice(frames), 3, size, size) for _ in range(ids.count(c.media_token_id))]
        out.append(Sample(torch.tensor(ids), media, key=f"s{k}", target_start=rng.choice([None, None, 1])))
    return out


def test_pack_rows_first_fit_decreasing():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 30))]
        rows = pack_rows(lengths, 20)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 20 for row in rows)
        assert len(rows) <= 2 * sum(lengths) / 20 + 1  # first-fit: no two rows both at most half full
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([3, 21], 20)


def test_collate_packed_lays_out_each_sample_as_it_is_alone():
    model, processor = build("llama")
    layout = TokenLayout.from_processor(processor)
    kw = dict(pad_token_id=layout.pad_token_id, media_token_id=layout.media_token_id)
    rng = random.Random(1)
    groups = [random_samples(rng, model, 7, frames=(1,)), random_samples(rng, model, 5, frames=(1, 3))]
    [batch] = collate_packed(groups, length=40, **kw)
    ids, pos, labels, dataset = batch["input_ids"], batch["position_ids"], batch["labels"], batch["dataset"]
    assert batch["attention_mask"] is None and ids.shape[1] <= 40
    found = {}
    for r in range(ids.shape[0]):
        starts = [t for t in range(ids.shape[1]) if pos[r, t] == 0] + [ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            assert pos[r, a:b].tolist() == list(range(b - a))
            if dataset[r, a] >= 0:
                found[tuple(ids[r, a:b].tolist())] = (int(dataset[r, a]), labels[r, a:b])
            else:  # the padding at the end of a row: no target
                assert b == ids.shape[1] and (labels[r, a:b] == IGNORE_INDEX).all() and (dataset[r, a:b] == -1).all()
    for d, group in enumerate(groups):
        for s in group:
            dd, lab = found[tuple(s.input_ids.tolist())]
            start = None if s.target_start is None else torch.tensor([s.target_start])
            alone = make_labels(s.input_ids[None], torch.ones(1, len(s.input_ids), dtype=torch.long), layout.media_token_id, start)[0]
            alone[0] = IGNORE_INDEX
            assert dd == d and torch.equal(lab, alone)
    # media in the order of the <image> tokens, row by row; videos and images together, padding frames masked
    order = {id(m): m for g in groups for s in g for m in s.media}
    assert batch["pixel_values"].shape[0] == int((ids == layout.media_token_id).sum()) == len(order)
    assert batch["frame_mask"] is not None and batch["frame_mask"].sum() == sum(m.shape[0] for m in order.values())
    # the targets per dataset are the unpacked batches'
    assert batch["num_targets"] == [collate(g, **kw)["num_targets"] for g in groups]
    assert batch["num_tokens"] == [sum(len(s.input_ids) for s in g) for g in groups]
    # micro-batches of rows hold every sample once
    micro = collate_packed(groups, length=40, rows_per_batch=2, **kw)
    assert sum(len(b["keys"]) for b in micro) == 12 and [sum(x) for x in zip(*(b["num_targets"] for b in micro))] == batch["num_targets"]
    with pytest.raises(ValueError, match="does not fit a packed row of 10"):
        collate_packed(groups, length=10, **kw)


@pytest.mark.parametrize("lm_type", ["llama", "gpt2", "qwen2"])
def test_packed_rows_give_each_sample_its_own_logits(lm_type):
    """Random interleavings, samples with and without images, images and videos in one batch, open gates:
    each sample's logits in a packed row are its logits alone (its self-attention, cross-attention and positions)."""
    model, processor = build(lm_type)
    randomize_bridge(model, seed=3)
    model.eval()
    layout = TokenLayout.from_processor(processor)
    rng = random.Random(2)
    samples = random_samples(rng, model, 9, frames=(1, 2, 4))
    [batch] = collate_packed([samples], length=64, pad_token_id=layout.pad_token_id, media_token_id=layout.media_token_id)
    with torch.no_grad():
        packed = model(batch["input_ids"], None, pixel_values=batch["pixel_values"], frame_mask=batch["frame_mask"],
                       position_ids=batch["position_ids"]).logits
        ids, pos = batch["input_ids"], batch["position_ids"]
        by_tokens = {}
        for r in range(ids.shape[0]):
            starts = [t for t in range(ids.shape[1]) if pos[r, t] == 0] + [ids.shape[1]]
            for a, b in zip(starts, starts[1:]):
                by_tokens[tuple(ids[r, a:b].tolist())] = packed[r, a:b]
        for s in samples:
            m = stack_media(s.media) if s.media else {"pixel_values": None}
            alone = model(s.input_ids[None], pixel_values=m["pixel_values"], frame_mask=m.get("frame_mask")).logits[0]
            torch.testing.assert_close(by_tokens[tuple(s.input_ids.tolist())], alone, rtol=1e-4, atol=1e-4)


def test_packed_step_gradient_is_the_unpacked_one():
    """forward_backward over packed rows (two datasets, micro-batches of rows) = over each dataset's padded batches:
    the same weighted gradient sum_d lambda_d * grad(mean NLL_d) and the same NLL sums."""
    model, processor = build("llama")
    randomize_bridge(model, seed=4)
    model.train()
    layout = TokenLayout.from_processor(processor)
    kw = dict(pad_token_id=layout.pad_token_id, media_token_id=layout.media_token_id)
    rng = random.Random(5)
    docs, clips = random_samples(rng, model, 6, frames=(1,)), random_samples(rng, model, 4, frames=(3,), max_len=10)
    plain = [DatasetBatch(0, 1.0, micro_batches(docs, None, **kw), collate(docs, **kw)["num_targets"]),
             DatasetBatch(1, 0.3, micro_batches(clips, 2, **kw), collate(clips, **kw)["num_targets"])]
    sums = forward_backward(model, plain, device=torch.device("cpu"))
    want = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    model.zero_grad(set_to_none=True)
    packed = collate_packed([docs, clips], length=32, rows_per_batch=2, **kw)
    assert len(packed) > 1
    parts = [DatasetBatch(0, 1.0, [], plain[0].num_targets), DatasetBatch(1, 0.3, [], plain[1].num_targets)]
    packed_sums = forward_backward(model, parts, device=torch.device("cpu"), packed=packed)
    torch.testing.assert_close(packed_sums, sums, rtol=1e-5, atol=1e-5)
    for name, p in model.trainable_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(want[n].abs().sum() > 0 for n in want if n.startswith("xattn."))


def test_an_lm_that_ignores_packed_positions_is_refused():
    """OPT's positions come from its attention mask: packed samples would see each other, so packing is refused."""
    model, _ = build("opt")
    with pytest.raises(ValueError, match="does not keep packed samples apart"):
        check_packed_attention(model, torch.device("cpu"))
    check_packed_attention(build("llama")[0], torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, mixture_datasets(root)


def test_training_packed_follows_the_unpacked_run(data, tmp_path):
    """Two steps of the mixture, packed and not, from one initialisation: the same losses and the same bridge."""
    _, datasets = data
    base = {"datasets": datasets, "steps": 2, "lr": 1e-3, "checkpoint_every": 0, "save_final": False, "log_every": 1, "device": "cpu"}
    runs = {}
    for pack in (None, 64):
        model, processor = build("llama")
        config = load_train_config({**base, "output_dir": str(tmp_path / f"run{pack}"), "pack_length": pack})
        runs[pack] = (train(model, processor, config, progress=False), dict(model.trainable_parameters()))
    (plain, p_params), (packed, q_params) = runs[None], runs[64]
    for a, b in zip(plain.history, packed.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
        assert b["loss/docs"] == pytest.approx(a["loss/docs"], rel=1e-5)
    for name, p in p_params.items():
        torch.testing.assert_close(q_params[name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_pack_length_is_checked_against_the_datasets(data, tmp_path):
    _, datasets = data
    base = {"datasets": datasets, "output_dir": str(tmp_path)}
    longest = max(d.get("max_tokens") or DEFAULT_MAX_TOKENS[d["format"]] for d in datasets)
    with pytest.raises(ValueError, match="shorter than a dataset's max_tokens"):
        load_train_config({**base, "pack_length": longest - 1})
    with pytest.raises(ValueError, match="needs pack_length"):
        load_train_config({**base, "pack_micro_batch_rows": 2})
    load_train_config({**base, "pack_length": longest, "pack_micro_batch_rows": 2})
