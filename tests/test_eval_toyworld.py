"""The toy world's evaluation sets run through the harness unchanged (its files, the built-in readers)."""

import json

import pytest

from helpers import build, open_gates
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from flamingo_vlm.evaluation import build_task, evaluate, format_results_table

toyworld = pytest.importorskip("flamingo_vlm.toyworld.generate")


def toy_world_task_specs(world) -> list[dict]:
    """Task configs for the toy world's eval/ folder, exactly as a user would write them in YAML."""
    ev = world / "eval"
    return [
        {"type": "coco_captioning", "name": "toy_captions", "karpathy_json": ev / "coco/dataset_coco.json", "image_dir": ev / "coco"},
        {"type": "vqav2", "name": "toy_vqa", "image_dir": ev / "vqa/images",
         "questions_json": ev / "vqa/v2_OpenEnded_mscoco_val2014_questions.json", "annotations_json": ev / "vqa/v2_mscoco_val2014_annotations.json",
         "support_questions_json": ev / "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
         "support_annotations_json": ev / "vqa/v2_mscoco_train2014_annotations.json"},
        {"type": "classification", "name": "toy_shapes", "list_file": ev / "classification/val.txt",
         "support_list_file": ev / "classification/train.txt", "class_names": ev / "classification/classnames.txt"},
        {"type": "video_qa", "name": "toy_video_qa", "qa_json": ev / "videoqa/test_qa.json", "support_qa_json": ev / "videoqa/train_qa.json",
         "video_dir": ev / "videoqa/videos", "num_frames": 4},
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toyworld.generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=toyworld.WorldSizes.tiny(), progress=False)


def test_toy_world_evaluation_sets_run_unchanged(world, tmp_path):
    tasks = [build_task({**spec, "max_new_tokens": 4}) for spec in toy_world_task_specs(world)]
    for task in tasks:
        assert task.queries() and task.support()
    model, processor = build("llama", max_num_frames=4)
    open_gates(model, 0.5)
    path = tmp_path / "toy.json"
    results = evaluate(model, processor, tasks, shots=[0, 4], seeds=[0], limit=4, results_path=path, progress=False)
    assert {(r["task"], r["shots"]) for r in results["runs"]} == {(t.name, n) for t in tasks for n in (0, 4)}
    assert all(r["num_examples"] == 4 and r["value"] is not None for r in results["runs"])
    vqa = next(r for r in results["runs"] if r["task"] == "toy_vqa")
    assert all(isinstance(p["reference"], list) and len(p["reference"]) == 10 for p in vqa["predictions"])
    shapes = next(r for r in results["runs"] if r["task"] == "toy_shapes" and r["shots"] == 4)
    assert len(shapes["predictions"][0]["scores"]) == len((world / "eval/classification/classnames.txt").read_text().split())
    assert json.loads(path.read_text())["summary"] and "toy_video_qa" in format_results_table(results)
    # RICES works on the same files
    rices = evaluate(model, processor, tasks[2:3], shots=[4], selection="rices", limit=4, progress=False)
    assert rices["runs"][0]["selection"] == "rices"
