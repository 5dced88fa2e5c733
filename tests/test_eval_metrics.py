"""Metrics against hand-computed values and an independent CIDEr-D implementation."""

import math
from collections import Counter

import pytest

from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from flamingo_vlm.evaluation.metrics import (
    bleu4,
    cider,
    exact_match_accuracy,
    java_available,
    ptb_tokenize,
    ptb_tokenize_python,
    roc_auc,
    top_k_accuracy,
    vqa_accuracy,
    vqa_normalize,
)

needs_java = pytest.mark.skipif(not java_available(), reason="no java / CoreNLP jar")


# ---- VQA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("the cat", "cat"),  # article
        ("A man and an apple", "man and apple"),
        ("dont", "don't"),  # contraction map
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # comma between digits: punctuation removed, not spaced
        ("yes!", "yes"),  # punctuation not next to a space -> space
        ("black/white", "black white"),
        ("red , blue", "red blue"),  # punctuation next to a space -> removed
        ("3.5", "3.5"),  # a period between digits stays
        ("ten", "10"),
        ("none", "0"),
        ("  Yes\n", "yes"),
    ],
)
def test_vqa_normalize(raw, normalized):
    assert vqa_normalize(raw) == normalized


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    # by hand: leaving out a matching answer leaves matches-1, a non-matching one leaves matches;
    # 2 matches -> (2 * min(1, 1/3) + 8 * min(1, 2/3)) / 10 = 0.6
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_when_annotators_disagree():
    answers = ["2"] * 5 + ["two"] * 4 + ["Two."]
    assert vqa_accuracy("two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("the 2", answers) == pytest.approx(1.0)


def test_vqa_accuracy_official_quirk_when_annotators_agree():
    # the official code normalises only when the 10 answers differ: "two" does not match ten "2"s
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10, normalize_always=True) == 1.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # whitespace is always stripped


# ---- ROC-AUC / top-k -----------------------------------------------------------------------------
def test_roc_auc_by_hand():
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # ties count one half: pos {0.5, 0.9} vs neg {0.5, 0.1}: 0.5 + 1 + 1 + 1 = 3.5 of 4
    assert roc_auc([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.9])


def test_top_k_and_exact_match():
    scores = [{"a": 0.1, "b": 0.5, "c": 0.3}, {"a": 0.9, "b": 0.5, "c": 0.3}]
    assert top_k_accuracy(scores, ["b", "c"], k=1) == 0.5
    assert top_k_accuracy(scores, ["c", "c"], k=2) == 0.5
    assert top_k_accuracy(scores, ["a", "c"], k=3) == 1.0
    assert exact_match_accuracy(["Two", "cat"], ["2", "dog"], normalize=vqa_normalize) == 0.5


# ---- BLEU / CIDEr --------------------------------------------------------------------------------
def test_bleu4_brevity_penalty_by_hand():
    # every n-gram of the candidate is in the reference: precisions 1; BP = exp(1 - 8/5)
    assert bleu4(["a b c d e"], [["a b c d e f g h"]], tokenizer="none") == pytest.approx(math.exp(1 - 8 / 5), abs=1e-6)
    assert bleu4(["a b c d"], [["a b c d"]], tokenizer="none") == pytest.approx(1.0, abs=1e-6)
    # no matching 4-gram: pycocoevalcap smooths the zero count to 1e-15, so
    # BLEU-4 = (3/4 * 2/3 * 1/2 * 1e-15) ** (1/4)
    assert bleu4(["a b c e"], [["a b c d"]], tokenizer="none") == pytest.approx((0.25e-15) ** 0.25, rel=1e-5)


def test_cider_by_hand():
    # two images; each candidate equals its only reference. Unigrams and the bigram occur in one image
    # of two: idf = log 2 for each, so the n=1,2 cosines are 1; no 3-/4-grams -> 0. CIDEr-D =
    # 10 * mean(1, 1, 0, 0) = 5 per image.
    assert cider(["a b", "c d"], [["a b"], ["c d"]], tokenizer="none") == pytest.approx(5.0)
    # an n-gram in every image's references has idf 0: identical corpora score 0
    assert cider(["a b", "a b"], [["a b"], ["a b"]], tokenizer="none") == pytest.approx(0.0)


def _cider_d_reference(candidates, references, n=4, sigma=6.0):
    """CIDEr-D from its definition (Vedantam et al. 2015, sec. 3 and the -D variant): tf-idf n-gram vectors
    with document frequencies over each image's references, clipped products, Gaussian length penalty, x10."""

    def grams(sentence, k):
        w = sentence.split()
        return Counter(tuple(w[i : i + k]) for i in range(len(w) - k + 1))

    df = Counter()
    for refs in references:
        df.update({g for r in refs for k in range(1, n + 1) for g in grams(r, k)})
    log_images = math.log(len(references))

    def tfidf(sentence, k):
        return {g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in grams(sentence, k).items()}

    total = 0.0
    for cand, refs in zip(candidates, references):
        per_image = 0.0
        for ref in refs:
            penalty = math.exp(-((len(cand.split()) - len(ref.split())) ** 2) / (2 * sigma**2))
            for k in range(1, n + 1):
                gc, gr = tfidf(cand, k), tfidf(ref, k)
                nc, nr = math.sqrt(sum(v * v for v in gc.values())), math.sqrt(sum(v * v for v in gr.values()))
                if nc and nr:
                    dot = sum(min(v, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, v in gc.items())
                    per_image += penalty * dot / (nc * nr) / n
        total += 10.0 * per_image / len(refs)
    return total / len(candidates)


CAPTIONS = [
    ("a man riding a wave on top of a surfboard", ["a man riding a wave on a surfboard", "a surfer rides a large wave", "man surfing on a big wave in the ocean"]),
    ("two dogs playing in the snow", ["two dogs play in the snow", "a pair of dogs running through snow", "dogs playing outside in winter"]),
    ("a plate of food with broccoli", ["a plate with rice and broccoli", "food on a white plate", "a dish of broccoli and chicken on a plate"]),
    ("a red bus on the street", ["a red double decker bus driving down a street", "a bus parked on the side of the road"]),
]


def test_cider_matches_an_independent_implementation():
    preds, refs = [c for c, _ in CAPTIONS], [r for _, r in CAPTIONS]
    expected = _cider_d_reference(preds, refs)
    assert expected > 0.1
    assert cider(preds, refs, tokenizer="none") == pytest.approx(expected, rel=1e-9)


# ---- PTB tokenisation ----------------------------------------------------------------------------
def test_python_ptb_tokenizer_cases():
    assert ptb_tokenize_python("A man's dog isn't running, quickly.") == "a man 's dog is n't running quickly"
    assert ptb_tokenize_python('He said "hi" (twice)...') == "he said hi -lrb- twice -rrb-"
    assert ptb_tokenize_python("U.S. soldiers can't march; 5,000 of them!") == "u.s. soldiers ca n't march 5,000 of them"


SENTENCES = [
    "A man riding a wave on top of a surfboard.", "Two dogs, one black and one white, play in the snow.",
    "A woman's hand holding a cell phone.", "The cat isn't on the mat; it's on the couch!", "There are 3.5 apples and 5,000 people.",
    "A close-up of a pizza with pepperoni and cheese", "What is this?", "A group of people standing around a table (outside).",
    "He said \"hello\" to the kids.", "", "U.S. soldiers march.", "The dogs' toys are everywhere...", "Mr. Smith can't go",
    "I'm sure they'll come; we've seen you're there", "a b.",
]


@needs_java
def test_python_ptb_tokenizer_equals_java_on_captions():
    assert ptb_tokenize(SENTENCES, "python") == ptb_tokenize(SENTENCES, "java")


@needs_java
def test_cider_same_with_java_and_python_tokenisation():
    preds = ["A man riding a wave, on top of a surfboard.", "Two dogs playing in the snow!", "A plate of food with broccoli.", "A red bus on the street"]
    refs = [r for _, r in CAPTIONS]
    assert cider(preds, refs, tokenizer="java") == pytest.approx(cider(preds, refs, tokenizer="python"))
    # and tokenisation matters: the raw strings (punctuation attached) score differently
    assert cider(preds, refs, tokenizer="none") != pytest.approx(cider(preds, refs, tokenizer="python"))
