"""Differential tests: our metrics against the official evaluators, re-written here from their definitions.

- vqaEval.py (VQAv2, VizWiz, and OK-VQA after stemming): normalise answers and prediction only when the
  annotators disagree; for each annotation record g, min(1, #(other records equal to the prediction) / 3),
  where "other" means every record that is not *equal* to g (dicts compared whole).
- TextVQA's TextVQAAccuracyEvaluator (pythia/mmf, EvalAI's answer processor): always normalise, with
  commas and "?" deleted and "'s" split first; leave-one-out over answer positions.
- CIDEr-D over captions PTB-tokenised one caption per Java call (so no caption can shift another).
The answer sets are adversarial: case, punctuation, number words, articles, commas, identical records.
"""

import random
import re
import subprocess

import pytest

from eval_fixtures import one_torch_thread, write_all  # noqa: F401  (autouse)
from flamingo_vlm.evaluation.metrics import PTB_PUNCTUATIONS, _corenlp_jar, cider, java_available, roc_auc, textvqa_accuracy, vqa_accuracy
from flamingo_vlm.evaluation.stemming import okvqa_stem
from test_eval_metrics import _cider_d_reference

# ---- the official normalisation, from vqaEval.py (contractions: only the ones the answer pool uses) ----
_CONTR = {"dont": "don't", "isnt": "isn't", "whats": "what's", "cant": "can't", "its": "its"}
_NUMS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
         "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _punctuation(text, comma_strip=re.compile(r"(\d)(\,)(\d)")):
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(comma_strip, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out, re.UNICODE)


def _digit_article(text):
    words = [_NUMS.get(w, w) for w in text.lower().split() if _NUMS.get(w, w) not in ("a", "an", "the")]
    return " ".join(_CONTR.get(w, w) for w in words)


def official_vqa(pred, records):
    records = [dict(r, answer=r["answer"].replace("\n", " ").replace("\t", " ").strip()) for r in records]
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = _digit_article(_punctuation(r["answer"]))
        pred = _digit_article(_punctuation(pred))
    accs = []
    for g in records:
        others = [r for r in records if r != g]
        accs.append(min(1, len([r for r in others if r["answer"] == pred]) / 3))
    return sum(accs) / len(accs)


def official_textvqa(pred, answers):
    def process(a):
        a = a.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        a = a.replace("\n", " ").replace("\t", " ").strip()
        return _digit_article(_punctuation(a, comma_strip=re.compile(r"(?<=\d)(\,)+(?=\d)")))

    gts = list(enumerate(process(a) for a in answers))
    scores = {}
    for u in {a for _, a in gts}:
        accs = [min(1, len([o for o in gts if o != g and o[1] == u]) / 3) for g in gts]
        scores[u] = sum(accs) / len(accs)
    return scores.get(process(pred), 0.0)


POOL = ["Two", "2", "two.", "the cat", "Cat", "cat!", "1,000", "1000", "a,b", "ab", "yes", "Yes.", "dont", "don't",
        "STOP.", "stop", "man's hat", "mans hat", "3.5", "red, blue", "red blue", "unanswerable", "none", "0",
        "black/white", "what's up?", "an apple", "10", "ten"]


def _question(rng, with_id):
    # few distinct answers per question, so that agreement (and ties between records) is common
    picks = rng.sample(POOL, rng.choice([1, 2, 3]))
    answers = [rng.choice(picks) for _ in range(10)]
    conf = [rng.choice(["yes", "yes", "maybe"]) for _ in range(10)]
    if with_id:
        return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(zip(answers, conf))]
    return [{"answer": a, "answer_confidence": c} for a, c in zip(answers, conf)]


@pytest.mark.parametrize("with_id", [True, False], ids=["vqav2-answer_id", "vizwiz-no-answer_id"])
def test_vqa_accuracy_equals_official_on_adversarial_answers(with_id):
    rng = random.Random(0)
    n_diff_from_strings = 0
    for _ in range(400):
        records = _question(rng, with_id)
        for pred in rng.sample(POOL, 4) + [records[0]["answer"]]:
            assert vqa_accuracy(pred, records) == pytest.approx(official_vqa(pred, records)), (pred, records)
            n_diff_from_strings += vqa_accuracy(pred, records) != vqa_accuracy(pred, [r["answer"] for r in records])
    # the records matter exactly when they have no answer_id (VizWiz): the test set exercises that
    assert (n_diff_from_strings > 0) == (not with_id)


def test_vizwiz_unanimous_answer_scores_official_zero():
    records = [{"answer": "blue", "answer_confidence": "yes"}] * 10
    assert vqa_accuracy("blue", records) == official_vqa("blue", records) == 0.0
    mixed = [{"answer": "blue", "answer_confidence": c} for c in ["yes"] * 7 + ["maybe"] * 3]
    # holding out a "yes" leaves the 3 "maybe" records (1.0); holding out a "maybe" leaves the 7 "yes" (1.0)
    assert vqa_accuracy("blue", mixed) == official_vqa("blue", mixed) == 1.0


def test_textvqa_accuracy_equals_its_official_evaluator():
    rng = random.Random(1)
    for _ in range(400):
        answers = [r["answer"] for r in _question(rng, False)]
        for pred in rng.sample(POOL, 4) + [answers[0]]:
            assert textvqa_accuracy(pred, answers) == pytest.approx(official_textvqa(pred, answers)), (pred, answers)
    # the case: unanimous answers written with a capital and a period
    assert textvqa_accuracy("stop", ["STOP."] * 10) == 1.0 and vqa_accuracy("stop", ["STOP."] * 10) == 0.0


# OK-VQA v1.1 stems (the dataset's "answers" next to its "raw_answers"), by hand from its stemming rules
OKVQA_STEMS = {"jeans": "jean", "gloves": "glove", "leaves": "leaf", "riding": "ride", "dogs": "dog", "skiing": "ski",
               "surfing": "surf", "umbrellas": "umbrella", "bus": "bus", "tennis": "tennis", "christmas": "christmas",
               "yes": "yes", "clothes": "cloth", "swimming": "swim", "horses": "horse", "buses": "bus", "police": "police"}


@pytest.mark.parametrize("raw, stem", sorted(OKVQA_STEMS.items()))
def test_okvqa_stemming(raw, stem):
    assert okvqa_stem(raw) == stem
    # scored as OK-VQA scores it: stemmed prediction against the stemmed answers, vqaEval's accuracy
    answers = [{"answer": stem, "answer_id": i} for i in range(4)] + [{"answer": "other", "answer_id": 9}]
    assert vqa_accuracy(okvqa_stem(raw), answers) == pytest.approx(official_vqa(stem, answers)) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("benchmarks"))


def test_okvqa_task_stems_predictions(specs):
    from flamingo_vlm.evaluation import build_task
    from flamingo_vlm.evaluation.task import Example

    task = build_task(specs["ok_vqa"])
    ex = Example(id=1, fields={"answers": ["glove"] * 10, "answer_records": [{"answer": "glove", "answer_id": i} for i in range(10)]})
    assert task.score(["gloves"], [ex])["vqa_accuracy"] == 100.0
    assert build_task({**specs["ok_vqa"], "stem": False}).score(["gloves"], [ex])["vqa_accuracy"] == 0.0


def test_roc_auc_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1, 1, 0], [0.1, float("nan"), 0.9, 0.3])


# ---- CIDEr with CoreNLP's line-separator characters ---------------------------------------------
needs_java = pytest.mark.skipif(not java_available(), reason="no java / CoreNLP jar")


def _java_alone(caption, tmp_path):
    """pycocoevalcap's tokenisation of one caption in its own Java call (separators are whitespace in it)."""
    f = tmp_path / "one.txt"
    f.write_text(re.sub("[\n\r\x0b\x0c\u2028\u2029]", " ", caption), encoding="utf-8")
    cmd = ["java", "-cp", _corenlp_jar(), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(f)]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8").strip()
    return " ".join(w for w in out.split() if w not in PTB_PUNCTUATIONS)


ADVERSARIAL = [
    ("a man\u2028riding a wave on a surfboard.", ["A man riding a wave on a surfboard.", "a surfer\x0brides a big wave"]),
    ("two dogs\x0cplaying in the snow", ["Two dogs play in the snow!", "a pair of dogs\u2029running in snow"]),
    ("a plate of food", ["A plate with rice and broccoli.", "food on a plate"]),
    ("a red bus on the street", ["a red bus driving down a street", "A bus parked on the road."]),
]


@needs_java
def test_java_cider_with_line_separators_equals_per_caption_reference(tmp_path):
    preds, refs = [p for p, _ in ADVERSARIAL], [r for _, r in ADVERSARIAL]
    tok_preds = [_java_alone(p, tmp_path) for p in preds]
    tok_refs = [[_java_alone(r, tmp_path) for r in rs] for rs in refs]
    expected = _cider_d_reference(tok_preds, tok_refs)
    assert expected > 0.5
    assert cider(preds, refs, tokenizer="java") == pytest.approx(expected, rel=1e-9)
    assert cider(preds, refs, tokenizer="python") == pytest.approx(expected, rel=1e-9)


PUNCT_EMOJI = ["a dog 😀 on grass", "a+b=c", "a “quoted” word", "it’s fine", "a \\ b", "a ‘single’ quote", "50% off!",
               "price $5 today", "e-mail and he/she", "two dogs... ", "a man\u2028riding\x0ba wave"]


@needs_java
def test_python_ptb_fallback_equals_java_on_punctuation_and_emoji(tmp_path):
    from flamingo_vlm.evaluation.metrics import ptb_tokenize_python

    assert [ptb_tokenize_python(s) for s in PUNCT_EMOJI] == [_java_alone(s, tmp_path) for s in PUNCT_EMOJI]


# ---- test(-dev) splits: read without answers, written as EvalAI result files -----------------------
def test_vqa_test_dev_reads_without_answers_and_writes_evalai_files(tmp_path):
    import json

    from flamingo_vlm.evaluation.tasks.vqa import VizWiz, VQATask, write_evalai_results

    (tmp_path / "img").mkdir()
    questions = {"data_subtype": "test2015", "questions": [{"question_id": 7, "image_id": 42, "question": "what?"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    task = VQATask("vqav2", tmp_path / "q.json", None, tmp_path / "img")
    [ex] = task.queries()
    assert ex.fields["answers"] is None and ex.media[0].name == "COCO_test2015_000000000042.jpg"
    assert task.score(["red"], [ex])["vqa_accuracy"] != task.score(["red"], [ex])["vqa_accuracy"]  # NaN
    out = write_evalai_results(tmp_path / "res.json", ["red"], [ex])
    assert json.loads(out.read_text()) == [{"question_id": 7, "answer": "red"}]

    (tmp_path / "vw.json").write_text(json.dumps([{"image": "VizWiz_test_00000000.jpg", "question": "what?"}]))
    [vx] = VizWiz("vizwiz", tmp_path / "vw.json", None, tmp_path / "img").queries()
    write_evalai_results(tmp_path / "vw_res.json", ["blue"], [vx])
    assert json.loads((tmp_path / "vw_res.json").read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "blue"}]
