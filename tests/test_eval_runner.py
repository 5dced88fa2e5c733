"""The runner end to end: every built-in task at 0 and 4 shots on a tiny random model, results JSON,
resuming, seeds, the episode hook, prompt ensembling, and ``flamingo eval CONFIG``."""

import argparse
import json
import math
import random

import pytest
import torch
import yaml

from eval_fixtures import solid, write_all
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from helpers import SMALL_BRIDGE, build, open_gates
from flamingo_vlm import build_flamingo
from flamingo_vlm.evaluation import Example, Prediction, Task, build_task, evaluate, format_results_table
from flamingo_vlm.evaluation import runner as runner_module
from flamingo_vlm.evaluation.cli import add_eval_parser
from flamingo_vlm.inference import candidate_log_likelihoods, rank_scores
from flamingo_vlm.tiny import create_tiny_backbones


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = build("llama", max_num_frames=4)
    open_gates(model, 0.5)
    return model, processor


def _fast(spec, **kw):
    return {**spec, "max_new_tokens": 4, **kw}  # short answers keep the suite fast


def test_every_task_runs_zero_and_four_shot(specs, model_and_processor, tmp_path):
    model, processor = model_and_processor
    tasks = [build_task(_fast(spec)) for spec in specs.values()]
    path = tmp_path / "results.json"
    results = evaluate(model, processor, tasks, shots=[0, 4], seeds=[0], batch_size=2, results_path=path, progress=False)
    assert json.loads(path.read_text())["runs"] == json.loads(json.dumps(results["runs"]))
    assert len(results["runs"]) == 2 * len(tasks)
    for run in results["runs"]:
        task = next(t for t in tasks if t.name == run["task"])
        assert run["metric"] == task.metric and run["scores"][task.metric] is not None and math.isfinite(run["value"])
        assert run["num_examples"] == len(task.queries()) == len(run["predictions"])
        assert run["zero_shot_text_examples"] == (run["shots"] == 0)
        for record in run["predictions"]:
            assert {"id", "prediction", "reference", "shots"} <= set(record)
            assert len(record["shots"]) == (2 if run["shots"] == 0 else 4)  # paper's 0-shot: two text-only examples
            if task.kind == "rank":
                assert record["prediction"] in task.candidates(task.queries()[0]) and record["scores"]
    table = format_results_table(results)
    for task in tasks:
        assert task.name in table
    assert "0-shot" in table and "4-shot" in table and "text-only" in table


def test_batch_size_does_not_change_rank_predictions(specs, model_and_processor):
    model, processor = model_and_processor
    tasks = [build_task(specs["imagenet"]), build_task(specs["hateful_memes"])]
    one = evaluate(model, processor, tasks, shots=[2], batch_size=1, progress=False)
    many = evaluate(model, processor, tasks, shots=[2], batch_size=4, progress=False)
    for a, b in zip(one["runs"], many["runs"]):
        assert [r["prediction"] for r in a["predictions"]] == [r["prediction"] for r in b["predictions"]]
        for ra, rb in zip(a["predictions"], b["predictions"]):
            assert ra["shots"] == rb["shots"]  # shots do not depend on the batch
            assert ra["scores"] == pytest.approx(rb["scores"], abs=1e-3)


def test_resume_skips_finished_runs(specs, model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    tasks = [build_task(_fast(specs["vqav2"]))]
    path = tmp_path / "r.json"
    first = evaluate(model, processor, tasks, shots=[0, 2], seeds=[0, 1], results_path=path, progress=False)
    calls = []
    original = runner_module._Runner.run
    monkeypatch.setattr(runner_module._Runner, "run", lambda self, task, q, s, n, seed, sel, **kw: calls.append((n, seed)) or original(self, task, q, s, n, seed, sel, **kw))
    again = evaluate(model, processor, tasks, shots=[0, 2], seeds=[0, 1], results_path=path, progress=False)
    assert calls == [] and again["runs"] == json.loads(json.dumps(first["runs"]))
    evaluate(model, processor, tasks, shots=[0, 2, 3], seeds=[0, 1], results_path=path, progress=False)
    assert calls == [(3, 0), (3, 1)]  # only the new runs
    evaluate(model, processor, tasks, shots=[2], seeds=[0], limit=1, results_path=path, progress=False)
    assert calls[-1] == (2, 0)  # a different --limit is a different run
    evaluate(model, processor, tasks, shots=[2], seeds=[0], limit=1, results_path=path, resume=False, progress=False)
    assert len(calls) == 4
    evaluate(model, processor, tasks, shots=[2], seeds=[0], limit=1, results_path=path, protocol="openflamingo", progress=False)
    assert len(calls) == 5  # another protocol is another run
    with pytest.raises(ValueError, match="holds results of model"):
        evaluate(model, processor, tasks, shots=[2], results_path=path, model_name="another", progress=False)


def test_limit_per_task(specs, model_and_processor):
    """A dict limit caps the tasks it names, each at its own count; the others run all their queries."""
    model, processor = model_and_processor
    tasks = [build_task(_fast(specs["vqav2"])), build_task(specs["imagenet"])]
    assert all(len(t.queries()) > 2 for t in tasks)
    results = evaluate(model, processor, tasks, shots=[0], limit={"vqav2": 1, "imagenet": 2}, progress=False)
    assert {r["task"]: r["num_examples"] for r in results["runs"]} == {"vqav2": 1, "imagenet": 2}
    results = evaluate(model, processor, tasks, shots=[0], limit={"vqav2": 1}, progress=False)
    assert {r["task"]: r["num_examples"] for r in results["runs"]} == {"vqav2": 1, "imagenet": len(tasks[1].queries())}


def test_seeds_are_aggregated(specs, model_and_processor):
    model, processor = model_and_processor
    results = evaluate(model, processor, [build_task(specs["imagenet"])], shots=[1], seeds=[0, 1, 2], progress=False)
    values = [r["value"] for r in results["runs"]]
    (summary,) = results["summary"]
    assert summary["seeds"] == [0, 1, 2] and summary["metric"] == "top1"
    assert summary["mean"] == pytest.approx(sum(values) / 3)
    assert summary["std"] == pytest.approx(math.sqrt(sum((v - summary["mean"]) ** 2 for v in values) / 3))
    shots = [tuple(r["shots"]) for run in results["runs"] for r in run["predictions"]]
    assert len(set(shots)) > 1  # seeds draw different shots


class NonceNaming(Task):
    """A held-out-style task: each prompt binds fresh words to the classes (the episode hook)."""

    name = "nonce"
    kind = "rank"
    metric = "accuracy"
    WORDS = ["gorp", "jiba", "plonk", "hisk"]

    def __init__(self):
        super().__init__()
        self.episodes, self.formatted, self.scored = 0, [], None

    def support(self):
        return [Example(f"s{i}", [solid(i % 3)], {"label": i % 3}) for i in range(6)]

    def queries(self):
        return [Example(f"q{i}", [solid(i)], {"label": i}) for i in range(3)]

    def episode(self, query, shots, rng):
        self.episodes += 1
        words = rng.sample(self.WORDS, 3)

        def bind(ex):
            return Example(ex.id, ex.media, {**ex.fields, "answer": words[ex.fields["label"]], "words": words})

        return bind(query), [bind(s) for s in shots]

    def format_example(self, ex, with_answer):
        self.formatted.append(ex)
        return super().format_example(ex, with_answer)

    def candidates(self, ex):
        return ex.fields["words"]

    def score(self, predictions, examples):
        self.scored = examples
        return {"accuracy": 100.0 * sum(p == ex.fields["answer"] for p, ex in zip(predictions, examples)) / len(examples)}


def test_episode_hook_rewrites_every_prompt(model_and_processor):
    model, processor = model_and_processor
    task = NonceNaming()
    results = evaluate(model, processor, [task], shots=[2], seeds=[0], batch_size=2, progress=False)
    assert task.episodes == 3  # once per prompt
    assert all("words" in ex.fields for ex in task.formatted)  # prompts are built from the rewritten examples
    assert [ex.fields["answer"] for ex in task.scored] == [r["reference"] for r in results["runs"][0]["predictions"]]
    for record, ex in zip(results["runs"][0]["predictions"], task.scored):
        assert record["prediction"] in ex.fields["words"] and set(record["scores"]) == set(ex.fields["words"])


def test_prompt_ensembling_averages_over_shot_orders(model_and_processor):
    model, processor = model_and_processor
    task = NonceNaming()
    results = evaluate(model, processor, [task], shots=[3], seeds=[0], ensemble=4, progress=False)
    run = results["runs"][0]
    assert run["ensemble"] == 4
    # recompute query 0 by hand: same shots and episode (same per-query generator), 4 orders, mean scores
    rng = random.Random("0/nonce/3/0")
    shots = runner_module.sample_random_shots(task.support(), 3, rng, exclude_id="q0")
    query, shots = task.episode(task.queries()[0], shots, rng)
    orders = runner_module.shot_permutations(shots, 4, rng)
    assert len(orders) == 4
    prompts = [runner_module.build_prompt(task, query, order) for order in orders]
    conts = [[task.continuation(c) for c in task.candidates(query)]] * 4
    scores = torch.stack(rank_scores(candidate_log_likelihoods(model, processor, prompts, conts), True)).mean(0)
    expected = dict(zip(task.candidates(query), scores.tolist()))
    assert run["predictions"][0]["scores"] == pytest.approx(expected, abs=1e-4)
    assert run["predictions"][0]["prediction"] == max(expected, key=expected.get)


def test_generation_settings_come_from_the_task(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update({k: kwargs[k] for k in ("num_beams", "max_new_tokens")})
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)

    class Echo(Task):
        name, prompt, max_new_tokens = "echo", "Say:", 3

        def support(self):
            return [Example(i, [solid(i)], {"answer": "hi"}) for i in range(3)]

        queries = support

    results = evaluate(model, processor, [Echo()], shots=[0], progress=False)
    assert seen == {"num_beams": 3, "max_new_tokens": 3}  # paper default: 3 beams
    assert results["runs"][0]["zero_shot_text_examples"] and isinstance(Prediction("x"), str)


def test_flamingo_eval_cli(specs, tmp_path):
    lm_path, vision_path = create_tiny_backbones(tmp_path / "backbones")
    model, processor = build_flamingo(lm_path, vision_path, **SMALL_BRIDGE)
    model_dir = tmp_path / "exp" / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    # a config with paths relative to data_root, itself relative to the config file
    data_root = tmp_path / "exp" / "data"
    data_root.symlink_to(specs["imagenet"]["list_file"].rsplit("/imagenet/", 1)[0], target_is_directory=True)
    config = {
        "model": "model", "data_root": "data", "shots": [0, 4], "seeds": [0, 1],
        "tasks": [
            {"type": "imagenet", "name": "tiny_imagenet", "list_file": "imagenet/val.txt", "support_list_file": "imagenet/train.txt",
             "class_names": "imagenet/classnames.txt"},
            {"type": "coco_captioning", "karpathy_json": "coco/dataset_coco.json", "image_dir": "coco", "max_new_tokens": 3},
        ],
    }
    config_path = tmp_path / "exp" / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser(prog="flamingo")
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out" / "results.json"
    args = parser.parse_args(["eval", str(config_path), "--limit", "2", "--shots", "0,2", "--seeds", "0", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    results = json.loads(out.read_text())
    assert {(r["task"], r["shots"], r["seed"]) for r in results["runs"]} == {
        ("tiny_imagenet", 0, 0), ("tiny_imagenet", 2, 0), ("coco", 0, 0), ("coco", 2, 0)}
    assert all(r["num_examples"] == 2 for r in results["runs"])
    assert results["model"].endswith("model") and results["config"]["limit"] == 2
    assert "tiny_imagenet" in out.with_suffix(".txt").read_text()


def test_a_test_dev_split_is_written_as_an_evalai_submission(model_and_processor, tmp_path):
    """Questions without answers: the run's accuracy is null and its predictions go to an EvalAI file beside
    the results JSON, one entry per question, the same answers the results record."""
    from flamingo_vlm.evaluation.tasks.vqa import VQATask

    model, processor = model_and_processor
    (tmp_path / "img").mkdir()
    questions = [{"question_id": 100 + i, "image_id": i, "question": "what colour is it?"} for i in range(3)]
    for q in questions:
        solid(q["image_id"]).save(tmp_path / "img" / f"COCO_test2015_{q['image_id']:012d}.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "test2015", "questions": questions}))
    task = VQATask("vqav2_test_dev", tmp_path / "q.json", None, tmp_path / "img", zero_shot_text_examples=False, max_new_tokens=3)
    results = evaluate(model, processor, [task], shots=[0], seeds=[0], results_path=tmp_path / "results.json", progress=False)
    [run] = results["runs"]
    assert run["value"] is None
    submitted = json.loads(open(run["submission_file"]).read())
    assert run["submission_file"].endswith("results.submissions/vqav2_test_dev_0shot_random_seed0.json")
    assert submitted == [{"question_id": r["id"], "answer": r["prediction"]} for r in run["predictions"]]
    assert [s["question_id"] for s in submitted] == [100, 101, 102]


def test_a_data_root_override_moves_the_config_files_task_paths(tmp_path, monkeypatch):
    """`--set data_root=DIR` (from the working directory) is where the file's relative task paths resolve; a task
    path given as an override stays the caller's."""
    from flamingo_vlm.evaluation.cli import load_eval_config

    (tmp_path / "cfg").mkdir()
    config_path = tmp_path / "cfg" / "eval.yaml"
    config_path.write_text(yaml.safe_dump({"model": "m", "data_root": "old", "tasks": [
        {"type": "coco_captioning", "karpathy_json": "coco/dataset_coco.json", "image_dir": "coco"}]}))
    monkeypatch.chdir(tmp_path)
    default = load_eval_config(config_path)
    assert default.tasks[0]["karpathy_json"] == str(tmp_path / "cfg" / "old" / "coco" / "dataset_coco.json")
    moved = load_eval_config(config_path, sets=["data_root=new", "tasks.0.image_dir=imgs"])
    assert moved.data_root == str(tmp_path / "new")
    assert moved.tasks[0]["karpathy_json"] == str(tmp_path / "new" / "coco" / "dataset_coco.json")
    assert moved.tasks[0]["image_dir"] == "imgs"  # an override's own path is not moved under data_root
