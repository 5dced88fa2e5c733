"""Protocol presets: ``paper`` (default) and ``openflamingo``. Under ``openflamingo`` the prompts, the
post-processing, the metric's normalisation, the query subset and the random-shot pool are checked against
references written here from OpenFlamingo's eval code (open_flamingo/eval: evaluate.py, utils.py,
models/open_flamingo.py, vqa_metric.py), not by calling ours."""

import argparse
import json
import math
import re

import numpy as np
import pytest
import yaml

from eval_fixtures import solid, write_all
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from helpers import build, open_gates
from flamingo_vlm.evaluation import RICES, Example, Prediction, build_prompt, build_task, evaluate
from flamingo_vlm.evaluation.cli import add_eval_parser, load_eval_config
from flamingo_vlm.evaluation.protocol import PROTOCOLS, get_protocol
from flamingo_vlm.evaluation.tasks import TextVQA
from flamingo_vlm.inference import MediaEncoder, continuation_token_ids

EOC = "<|endofchunk|>"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = build("llama", max_num_frames=4)
    open_gates(model, 0.5)
    return model, processor


def _text(items: list) -> str:
    """A prompt's items as OpenFlamingo writes them: each medium is an "<image>" tag."""
    return "".join(x if isinstance(x, str) else "<image>" for x in items)


def _vqa_example(i: int, answers: list[str], mc: str) -> Example:
    return Example(i, [solid(i)], {"question": f"what is {i}?", "answers": answers, "answer": mc})


# ---- prompts --------------------------------------------------------------------------------------
def test_openflamingo_prompts_are_its_eval_code_prompts(specs):
    shots = [_vqa_example(1, ["Red ", "red", "red"], "red"), _vqa_example(2, ["two", "2", "2"], "2")]
    query = _vqa_example(3, ["x"], "x")
    task = build_task(specs["vqav2"]).use_protocol("openflamingo")
    # evaluate_vqa: "".join(get_vqa_prompt(question=x["question"], answer=x["answers"][0]) + "\n") + get_vqa_prompt(q)
    of = lambda q, a=None: f"<image>Question:{q} Short answer:{a if a is not None else ''}{EOC if a is not None else ''}"
    expected = "".join(of(s.fields["question"], s.fields["answers"][0]) + "\n" for s in shots) + of(query.fields["question"])
    assert _text(build_prompt(task, query, shots)) == expected
    # 0 shots: the two text examples keep their text and newlines, their <image> tags removed
    assert _text(build_prompt(task, query, shots, text_only_shots=True)) == expected.replace("<image>", "", 2)
    assert task.max_new_tokens == 5 and task.length_penalty == 0.0 and task.normalize_always
    task.use_protocol("paper")  # the paper: the annotators' most common answer, a space, no newline
    assert _text(build_prompt(task, query, shots)) == (
        f"<image>Question: what is 1? Answer: red{EOC}<image>Question: what is 2? Answer: 2{EOC}<image>Question: what is 3? Answer:")
    assert task.length_penalty is None and not task.normalize_always


def test_openflamingo_caption_classification_and_memes_prompts(specs):
    coco = build_task(specs["coco_captioning"]).use_protocol("openflamingo")
    shots, query = coco.support()[:2], coco.queries()[0]
    of = lambda c=None: f"<image>Output:{c if c is not None else ''}{EOC if c is not None else ''}"
    assert _text(build_prompt(coco, query, shots)) == "".join(of(s.fields["captions"][0].strip()) + "\n" for s in shots) + of()
    assert coco.postprocess(' a "red" cat\non a mat Output: a dog') == 'a red cat\non a mat'  # split at "Output", quotes out, no newline cut
    assert build_task(specs["coco_captioning"]).postprocess(' a "red" cat\non a mat') == 'a "red" cat'  # paper

    memes = build_task(specs["hateful_memes"]).use_protocol("openflamingo")
    shots, query = memes.support()[:2], memes.queries()[0]
    # evaluate_classification: no newline between classification examples
    hm = lambda t, label=None: f"<image>is an image with: '{t}' written on it. Is it hateful? Answer:{label if label is not None else ''}{EOC if label is not None else ''}"
    assert _text(build_prompt(memes, query, shots)) == "".join(
        hm(s.fields["text"], "yes" if s.fields["label"] == 1 else "no") for s in shots) + hm(query.fields["text"])
    assert memes.continuation("yes") == "yes"  # the class name alone: no leading space, no <|endofchunk|>
    paper = build_task(specs["hateful_memes"])
    assert paper.continuation("yes") == " yes" + EOC and paper.prompt.startswith('is an image with written: "')

    imagenet = build_task(specs["imagenet"]).use_protocol("openflamingo")
    shots, query = imagenet.support()[:2], imagenet.queries()[0]
    assert _text(build_prompt(imagenet, query, shots)) == "".join(of(imagenet.answer(s)) for s in shots) + of()
    assert imagenet.continuation("red thing") == "red thing" and imagenet.tokenize_candidates_alone


def test_textvqa_generates_ten_tokens_under_openflamingo(specs):
    task = build_task(specs["textvqa"])
    assert isinstance(task, TextVQA) and task.max_new_tokens == 5
    assert task.use_protocol("openflamingo").max_new_tokens == 10  # evaluate.py: max_generation_length=10
    assert task.use_protocol("paper").max_new_tokens == 5


def test_settings_given_to_a_task_are_kept(specs):
    task = build_task({**specs["vqav2"], "prompt": "Q: {question} A:", "max_new_tokens": 3, "shot_answer": "multiple_choice"})
    task.use_protocol("openflamingo")
    assert (task.prompt, task.max_new_tokens, task.shot_answer) == ("Q: {question} A:", 3, "multiple_choice")
    assert task.shot_separator == "\n" and task.normalize_always  # the rest follows the protocol
    with pytest.raises(ValueError, match="shot_answer"):
        build_task({**specs["vqav2"], "shot_answer": "last"})
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("lmms")


# ---- the metric: same predictions, OpenFlamingo's numbers --------------------------------------------
# The official VQA answer processing (vqa_metric.py's VQAEval), written from its definition.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _ref_punct(text):
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or re.search(r"(\d)(,)(\d)", text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=re.UNICODE)


def _ref_digit_article(text):
    words = [_NUMBERS.get(w, w) for w in text.lower().split() if w not in ("a", "an", "the")]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _openflamingo_vqa_accuracy(raw_outputs, annotations):
    """evaluate_vqa: postprocess_vqa_generation on each decoded output, then VQAEval.evaluate, which in
    OpenFlamingo normalises prediction and answers always; leave-one-out over answer dicts (with answer_id)."""
    accs = []
    for raw, ann in zip(raw_outputs, annotations):
        pred = re.split("Question|Answer|Short", raw, maxsplit=1)[0]
        pred = re.split(", ", pred, maxsplit=1)[0]
        pred = _ref_digit_article(_ref_punct(pred.replace("\n", " ").replace("\t", " ").strip()))
        gts = [{"answer": _ref_digit_article(_ref_punct(a["answer"].replace("\n", " ").replace("\t", " ").strip())),
                "answer_id": a["answer_id"]} for a in ann]
        per = [min(1, len([o for o in gts if o != g and o["answer"] == pred]) / 3) for g in gts]
        accs.append(sum(per) / len(per))
    return 100.0 * sum(accs) / len(accs)


def test_same_vqa_predictions_give_openflamingos_accuracy(specs):
    answer_sets = [
        ["Yes."] * 10,  # unanimous but written with a capital and a period: normalised only by OpenFlamingo
        ["red"] * 10,
        ["two"] * 4 + ["2"] * 3 + ["Two dogs"] * 3,
        ["the cat"] * 2 + ["cat"] * 8,
        ["1,000"] * 10,
    ]
    raws = [" yes\nQuestion: is it?", " red\nblue", " 2, 3", " The Cat Short answer: no", " 1,000"]
    annotations = [[{"answer": a, "answer_id": j + 1} for j, a in enumerate(s)] for s in answer_sets]
    examples = [_vqa_example(i, s, s[0]) for i, s in enumerate(answer_sets)]
    task = build_task(specs["vqav2"])
    expected = _openflamingo_vqa_accuracy(raws, annotations)
    of = task.use_protocol("openflamingo").score([task.postprocess(r) for r in raws], examples)["vqa_accuracy"]
    assert of == pytest.approx(expected, abs=1e-9)
    for i, (raw, ex) in enumerate(zip(raws, examples)):  # each answer alone, under both protocols
        expected = _openflamingo_vqa_accuracy([raw], [annotations[i]])
        assert task.use_protocol("openflamingo").score([task.postprocess(raw)], [ex])["vqa_accuracy"] == pytest.approx(expected)
        paper = task.use_protocol("paper").score([task.postprocess(raw)], [ex])["vqa_accuracy"]
        # the paper's official rule: "Yes." unanimous is not normalised; the answer is cut at its first newline
        assert (paper == pytest.approx(expected)) == (i not in (0, 1))


def test_same_meme_scores_give_openflamingos_roc_auc(specs):
    task = build_task(specs["hateful_memes"]).use_protocol("openflamingo")
    examples = task.queries() * 2
    rows = [(-0.2, -1.5), (-2.0, -0.1), (-0.7, -0.7), (-0.3, -0.9), (-1.1, -0.4), (-0.5, -2.5), (-0.6, -0.8), (-1.4, -1.3)]
    preds = [Prediction("no" if n >= y else "yes", scores={"no": n, "yes": y}) for n, y in rows]
    # evaluate_classification: pred_score = P(top class) from a softmax of the mean log-probs, flipped for "no"
    scores = []
    for (n, y), p in zip(rows, preds):
        top = math.exp(max(n, y) - math.log(math.exp(n) + math.exp(y)))
        scores.append(top if str(p) == "yes" else 1 - top)
    labels = [ex.fields["label"] for ex in examples]
    pos = [s for s, l in zip(scores, labels) if l == 1]
    neg = [s for s, l in zip(scores, labels) if l == 0]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))  # sklearn's roc_auc_score
    assert task.score(preds, examples)["roc_auc"] == pytest.approx(100.0 * auc)


def test_candidates_are_tokenised_alone(model_and_processor):
    tokenizer = model_and_processor[1].tokenizer
    context, names = "Answer:", ["yes", "no", "red thing"]
    alone = continuation_token_ids(tokenizer, context, names, alone=True)
    # get_rank_classifications: tokenizer(class_name, add_special_tokens=False), appended to the prompt's ids
    assert alone == [tokenizer(c, add_special_tokens=False)["input_ids"] for c in names]


def test_rank_scores_are_the_class_name_alone_averaged_over_its_tokens(model_and_processor):
    """get_rank_classifications: the prompt's ids, then tokenizer(class_name) ids; the mean log-prob of those."""
    import torch

    from flamingo_vlm.inference import candidate_log_likelihoods, rank_scores

    model, processor = model_and_processor
    prompt = [solid(0), f"Output:red thing{EOC}", solid(1), "Output:"]
    names = ["red thing", "green thing", "no"]
    got = rank_scores(candidate_log_likelihoods(model, processor, [prompt], [names], tokenize_alone=True), True)[0]
    batch = processor(prompt)
    for name, score in zip(names, got.tolist()):
        tokens = processor.tokenizer(name, add_special_tokens=False)["input_ids"]
        ids = torch.cat([batch["input_ids"], torch.tensor([tokens])], dim=1)
        with torch.no_grad():
            logprobs = model(ids, pixel_values=batch["pixel_values"]).logits[0].float().log_softmax(-1)
        start = batch["input_ids"].shape[1] - 1
        assert score == pytest.approx(sum(float(logprobs[start + i, t]) for i, t in enumerate(tokens)) / len(tokens), abs=1e-4)


# ---- the runner: queries, shot pool, 0-shot retrieval, results ---------------------------------------
def _openflamingo_draws(num_test, num_train, num_samples, seed, query_set_size=2048):
    """evaluate.py: np.random.seed(seed); prepare_eval_samples (np.random.choice of num_samples, or of the
    whole test set when num_samples <= 0); get_query_set (np.random.choice of query_set_size)."""
    np.random.seed(seed)
    test = np.random.choice(num_test, num_samples if num_samples > 0 else num_test, replace=False)
    pool = np.random.choice(num_train, query_set_size, replace=False)
    return test.tolist(), pool.tolist()


@pytest.mark.parametrize("limit", [None, 37])
@pytest.mark.parametrize("seed", [0, 2])
def test_openflamingo_query_subset_and_shot_pool(limit, seed):
    queries, pool = PROTOCOLS["openflamingo"].subsets(500, 5000, limit, seed)
    assert (queries, pool) == _openflamingo_draws(500, 5000, limit or 0, seed)
    assert PROTOCOLS["paper"].subsets(500, 5000, limit, seed) == (list(range(limit or 500)), None)


def test_openflamingo_run_records_the_protocol(specs, model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    seen = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw.get("length_penalty")) or original(**kw))
    task = build_task({**specs["vqav2"], "max_new_tokens": 2})
    path = tmp_path / "r.json"
    results = evaluate(model, processor, [task], shots=[2], seeds=[1], limit=2, results_path=path, progress=False, protocol="openflamingo")
    run = results["runs"][0]
    queries, pool = _openflamingo_draws(3, 5, 2, 1, query_set_size=5)
    assert [r["id"] for r in run["predictions"]] == [task.queries()[i].id for i in queries]
    assert set(seen) == {0.0}
    assert run["protocol"] == "openflamingo" and run["protocol_settings"]["prompt"] == "Question:{question} Short answer:"
    saved = json.loads(path.read_text())
    assert saved["config"]["protocol"] == "openflamingo" and saved["protocol"]["shot_pool_size"] == 2048
    paper = evaluate(model, processor, [task], shots=[2], seeds=[1], limit=2, progress=False)
    assert [r["id"] for r in paper["runs"][0]["predictions"]] == [ex.id for ex in task.queries()[:2]]
    assert paper["runs"][0]["protocol"] == "paper" and seen[-1] is None


def test_zero_shot_text_examples_are_retrieved_under_rices(specs, model_and_processor):
    model, processor = model_and_processor
    task = build_task({**specs["imagenet"], "name": "cls"})
    results = evaluate(model, processor, [task], shots=[0], selection="rices", progress=False, protocol="openflamingo")
    rices = RICES(task, MediaEncoder(model, processor), support=task.support(), progress=False)
    run = results["runs"][0]
    queries = {q.id: q for q in task.queries()}
    evaluated = [queries[r["id"]] for r in run["predictions"]]  # a seeded order of the queries (OpenFlamingo's subset)
    expected = [[s.id for s in shots] for shots in rices.select(evaluated, 2)]
    assert [r["shots"] for r in run["predictions"]] == expected and run["zero_shot_text_examples"]
    # the paper: drawn at random, so not the two most similar for every query
    paper = evaluate(model, processor, [task], shots=[0], selection="rices", progress=False)["runs"][0]["predictions"]
    assert [r["shots"] for r in paper] != [[s.id for s in shots] for shots in rices.select(task.queries(), 2)]


def test_protocol_from_the_config_and_the_command_line(tmp_path):
    config = {"model": "m", "protocol": "openflamingo", "tasks": [{"type": "vqav2"}]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_eval_config(path).protocol == "openflamingo"
    assert load_eval_config(path, {"protocol": "paper"}).protocol == "paper"
    path.write_text(yaml.safe_dump({**config, "protocol": "lmms"}))
    with pytest.raises(ValueError, match="protocol"):
        load_eval_config(path)
    parser = argparse.ArgumentParser(prog="flamingo")
    add_eval_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["eval", str(path), "--protocol", "openflamingo"]).protocol == "openflamingo"
    path.write_text(yaml.safe_dump({"model": "m", "tasks": [{"type": "vqav2"}]}))
    assert load_eval_config(path).protocol == "paper"  # the default
