"""Supervised fine-tuning data: the answer-only loss masks exactly the prompt, the instruction JSONL format
reads into the tokens inference sees, and evaluation tasks' training splits become such records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flamingo_vlm.data import InstructFormat, collate
from flamingo_vlm.data.samples import SkipSample
from flamingo_vlm.modeling.loss import IGNORE_INDEX
from flamingo_vlm.processing.labels import make_labels
from helpers import build, image


@pytest.fixture(scope="module")
def tiny():
    return build()


def test_target_start_masks_the_prompt_with_right_or_left_padding():
    ids = torch.tensor([[1, 9, 5, 6, 7, 8, 0, 0], [0, 0, 1, 9, 5, 6, 7, 8]])
    mask = (torch.arange(8) >= torch.tensor([[0], [2]])).long() * (torch.arange(8) < torch.tensor([[6], [8]])).long()
    labels = make_labels(ids, mask, media_token_id=9, target_start=torch.tensor([4, 4]))
    # row 0 (right padding): real tokens 0..5, targets from real index 4; row 1 (left padding): from 2 + 4
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [7, 8] + [IGNORE_INDEX] * 2
    assert labels[1].tolist() == [IGNORE_INDEX] * 6 + [7, 8]
    # 0 leaves the pretraining rule: everything after the first <image> but the image token itself
    plain = make_labels(ids, mask, media_token_id=9, target_start=torch.tensor([0, 0]))
    assert torch.equal(plain, make_labels(ids, mask, media_token_id=9))


def _record(path, name, answer=" a red square", shots=()):
    items = []
    for shot_name, shot_answer in shots:
        items += [{"image": shot_name}, f"Question: what? Answer:{shot_answer}<|endofchunk|>"]
    items += [{"image": name}, "Question: what? Answer:"]
    return {"items": items, "answer": answer}


def test_instruct_record_tokens_equal_the_inference_prompt_and_only_the_answer_is_a_target(tiny, tmp_path):
    model, processor = tiny
    image((200, 10, 10)).save(tmp_path / "a.png")
    image((10, 10, 200)).save(tmp_path / "b.png")
    shard = tmp_path / "train.jsonl"
    rec = _record(tmp_path, "a.png", shots=[("b.png", " a blue one")])
    shard.write_text(json.dumps(rec) + "\n")
    fmt = InstructFormat(processor)
    sample = fmt.decode(
        {"__key__": "0", "__url__": str(shard), "line": json.dumps(rec).encode()}, np.random.default_rng(0)
    )
    # the prompt is tokenised as flamingo eval / generate tokenise it; the answer follows, then <|endofchunk|>
    prompt = processor([image((10, 10, 200)), rec["items"][1], image((200, 10, 10)), rec["items"][3]])
    n = prompt["input_ids"].shape[1]
    assert sample.input_ids[:n].tolist() == prompt["input_ids"][0].tolist()
    answer = processor.tokenize(" a red square<|endofchunk|>", add_special_tokens=False)["input_ids"]
    assert sample.input_ids[n:].tolist() == answer and sample.target_start == n
    assert len(sample.media) == 2 and torch.allclose(sample.media[1], prompt["pixel_values"][1])
    batch = collate([sample], pad_token_id=processor.tokenizer.pad_token_id, media_token_id=processor.media_token_id)
    targets = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    assert targets == list(range(n, n + len(answer)))  # the shot's answer is prompt: masked
    assert batch["num_targets"] == len(answer)
    assert batch["labels"][0, -1].item() == processor.end_of_chunk_token_id


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"items": ["no image"], "answer": " x"}, "bad_record"),
        ({"items": [{"image": "missing.png"}, "Q:"], "answer": " x"}, "missing_file"),
        ({"items": [{"image": "a.png"}, "Q:"], "answer": ""}, "bad_record"),
        ({"items": [{"image": "a.png"}, 3], "answer": " x"}, "bad_record"),
        ({"answer": " x"}, "bad_record"),
    ],
)
def test_bad_instruct_records_are_skipped_with_a_reason(tiny, tmp_path, record, reason):
    _, processor = tiny
    image((200, 10, 10)).save(tmp_path / "a.png")
    raw = {"__key__": "3", "__url__": str(tmp_path / "x.jsonl"), "line": json.dumps(record).encode()}
    with pytest.raises(SkipSample) as e:
        InstructFormat(processor).decode(raw, np.random.default_rng(0))
    assert e.value.reason == reason and "x.jsonl#3" in str(e.value)


def test_a_record_longer_than_max_tokens_is_skipped(tiny, tmp_path):
    _, processor = tiny
    image((200, 10, 10)).save(tmp_path / "a.png")
    rec = {"items": [{"image": "a.png"}, "word " * 50], "answer": " x"}
    raw = {"__key__": "0", "__url__": str(tmp_path / "x.jsonl"), "line": json.dumps(rec).encode()}
    with pytest.raises(SkipSample, match="max_tokens=16"):
        InstructFormat(processor, max_tokens=16).decode(raw, np.random.default_rng(0))


def test_a_vqa_training_split_becomes_records_with_the_eval_prompt(tiny, tmp_path):
    from eval_fixtures import write_vqa

    from flamingo_vlm.evaluation import VQATask, build_prompt
    from flamingo_vlm.evaluation.train_data import task_records, write_task_records

    _, processor = tiny
    files = write_vqa(tmp_path / "vqa")
    task = VQATask(
        "vqav2",
        files["val_q"],
        files["val_a"],
        files["image_dir"],
        support_questions_json=files["train_q"],
        support_annotations_json=files["train_a"],
    )
    pool = task.support()
    records = list(task_records(task, shots=2, seed=3))
    assert len(records) == len(pool)
    path = tmp_path / "train.jsonl"
    assert write_task_records(task, path, shots=2, seed=3) == len(pool)
    assert [json.loads(line) for line in path.read_text().splitlines()] == json.loads(json.dumps(records, default=str))
    fmt = InstructFormat(processor)
    for index, (ex, rec) in enumerate(zip(pool, records)):
        assert rec["answer"] == " " + task.answer(ex) and rec["id"] == ex.id
        sample = fmt.decode(
            {"__key__": str(index), "__url__": str(path), "line": json.dumps(rec).encode()}, np.random.default_rng(0)
        )
        # the shots are other training examples, and the prompt is the one evaluation builds for the query
        shot_ids = [i["image"] for i in rec["items"] if isinstance(i, dict)][:-1]
        assert len(shot_ids) == 2
        assert rec["items"][-1] == task.format_example(ex, with_answer=False)[-1]
        text = [x for x in build_prompt(task, ex, []) if isinstance(x, str)]
        prompt = processor([item if isinstance(item, str) else image((1, 2, 3)) for item in rec["items"]])
        assert sample.input_ids[: sample.target_start].tolist() == prompt["input_ids"][0].tolist()
        assert text[-1] in processor.decode(sample.input_ids[: sample.target_start])
    zero = next(task_records(task, shots=0))
    assert len([i for i in zero["items"] if isinstance(i, dict)]) == 1
    with pytest.raises(ValueError, match="shots need more than"):
        next(task_records(task, shots=len(pool)))


def test_flamingo_eval_writes_the_training_splits_without_a_model(tmp_path, capsys):
    import yaml
    from eval_fixtures import write_vqa

    from flamingo_vlm.cli import main

    files = write_vqa(tmp_path / "vqa")
    task = {
        "type": "vqav2",
        "name": "vqa",
        "questions_json": str(files["val_q"]),
        "annotations_json": str(files["val_a"]),
        "image_dir": str(files["image_dir"]),
        "support_questions_json": str(files["train_q"]),
        "support_annotations_json": str(files["train_a"]),
    }
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"tasks": [task], "shots": [1, 4], "seeds": [5]}))
    assert main(["eval", str(config), "--write-train-data", str(tmp_path / "out")]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "vqa.jsonl").read_text().splitlines()]
    assert records and all(sum(isinstance(i, dict) for i in r["items"]) == 2 for r in records)  # 1 shot + the query
    assert "vqa: " in capsys.readouterr().out
