"""Benchmark metrics, computed the way the papers and their official tools compute them.

- CIDEr (pycocoevalcap's CIDEr-D) and BLEU-4 (pycocoevalcap) on PTB-tokenised captions: the Stanford PTB
  tokenizer through Java when Java is present (what pycocoevalcap does), else :func:`ptb_tokenize_python`.
- VQA accuracy: the official VQA evaluation (vqaEval.py): answer normalisation, then the mean over the 10
  leave-one-out subsets of min(1, #matches / 3).
- ROC-AUC (HatefulMemes), top-1 / exact match.

Functions return fractions (CIDEr: its raw value); tasks report them x100, as papers do.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Sequence

# ---- VQA normalisation (verbatim rules of the official VQA evaluation, vqaEval.py) ------------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
# The official regexes, typos included ("(?!<=\d)" is a look-ahead, not a look-behind): results must match.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: the official code passes re.UNICODE as `count`


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalisation: punctuation, number words -> digits, articles, contractions.

    "Two dogs." -> "2 dogs"; "the cat's toy" -> "cat's toy"; "dont" -> "don't"; "1,000" -> "1000".
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_always: bool = False) -> float:
    """Official VQA accuracy of one prediction against its (usually 10) human answers, in [0, 1].

    Mean over leaving each human answer out of min(1, #other answers equal to the prediction / 3).
    As in the official code, answers and prediction are normalised only when the humans disagree
    (``normalize_always=True`` normalises always, e.g. for data sets with a single repeated answer).
    """
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(answers)) > 1 or normalize_always:
        answers = [_process_digit_article(_process_punctuation(a)) for a in answers]
        pred = _process_digit_article(_process_punctuation(pred))
    matches = sum(a == pred for a in answers)
    # leaving out answer i: the others hold `matches - (answers[i] == pred)` matching answers
    return sum(min(1.0, (matches - (a == pred)) / 3.0) for a in answers) / len(answers)


# ---- accuracy / ROC-AUC ----------------------------------------------------------------------------
def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str], normalize: Callable[[str], str] | None = None) -> float:
    """Fraction of predictions equal to their reference (after ``normalize`` of both, if given): top-1."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    norm = normalize or (lambda s: s)
    return sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / len(predictions)


def top_k_accuracy(scores: Sequence[dict[str, float]], references: Sequence[str], k: int = 1) -> float:
    """Fraction of examples whose reference is among the k best-scored candidates."""
    if not scores:
        return 0.0
    hits = 0
    for s, ref in zip(scores, references):
        best = sorted(s, key=s.__getitem__, reverse=True)[:k]
        hits += ref in best
    return hits / len(scores)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative (ties 1/2).

    Computed from average ranks (Mann-Whitney U), O(n log n).
    """
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative example")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # ties share their average rank
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


# ---- PTB tokenisation ------------------------------------------------------------------------------
# pycocoevalcap drops these tokens after PTB tokenisation. With -lowerCase the bracket tokens come out as
# "-lrb-" etc., which this (upper-case) list does not catch: they stay, in Java and here alike.
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ABBREVIATIONS = {
    "mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "ltd.", "prof.", "mt.", "ft.", "no.",
    "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "oct.", "nov.", "dec.", "corp.", "gen.",
}
_PTB_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_CLITICS = ("n't", "'s", "'m", "'d", "'ll", "'re", "'ve")


def _ptb_word(token: str) -> list[str]:
    """One whitespace-delimited, lower-cased token -> PTB tokens (see :func:`ptb_tokenize_python`)."""
    lead: list[str] = []
    trail: list[str] = []
    while token and token[0] in "\"'`" and token not in _CLITICS:  # opening quotes
        lead.append("``" if token[0] == '"' else "`")
        token = token[1:]
    while token:  # closing punctuation, innermost last
        if token.endswith("..."):
            trail.insert(0, "...")
            token = token[:-3]
        elif token[-1] in ",;:?!%\"'" and token not in _CLITICS:
            trail.insert(0, {'"': "''"}.get(token[-1], token[-1]))
            token = token[:-1]
        elif token[-1] == "." and token not in _PTB_ABBREVIATIONS and not re.fullmatch(r"([a-z]\.)+", token):
            trail.insert(0, ".")
            token = token[:-1]
        else:
            break
    words: list[str] = []
    for part in re.split(r"(&|--)", token):
        if part in _PTB_SPLIT_WORDS:
            words += _PTB_SPLIT_WORDS[part]
        elif part:
            clitic = next((c for c in _CLITICS if part.endswith(c) and len(part) > len(c)), None)
            words += [part[: -len(clitic)], clitic] if clitic else [part]
    return lead + words + trail


def ptb_tokenize_python(sentence: str) -> str:
    """A pure-Python approximation of ``PTBTokenizer -preserveLines -lowerCase`` + pycocoevalcap's punctuation removal.

    Lower-cases; splits off quotes, ``, ; : ? ! % ...``, a sentence-final period (kept on abbreviations such
    as "mr." or "u.s."), ``&`` and ``--``, and the clitics n't 's 'm 'd 'll 're 've ("can't" -> "ca n't");
    brackets become -lrb- etc. (kept, as pycocoevalcap keeps them); hyphenated words, decimals and
    "5,000" stay whole; then drops pycocoevalcap's punctuation tokens. It equals Java's output on ordinary
    captions (tested); on unusual text (URLs, emoticons, rare abbreviations) the two may differ slightly.
    """
    text = sentence.replace("\n", " ").lower()
    for bracket, name in _PTB_BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"\$(?=\d)", "$ ", text)
    tokens = [t for word in text.split() for t in _ptb_word(word)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)


def _corenlp_jar() -> str | None:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return None
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    return jar if os.path.isfile(jar) else None


def java_available() -> bool:
    return shutil.which("java") is not None and _corenlp_jar() is not None


def ptb_tokenize_java(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP through Java), without writing into site-packages."""
    jar = _corenlp_jar()
    if jar is None or shutil.which("java") is None:
        raise RuntimeError("the Java PTB tokenizer needs `java` on PATH and pycocoevalcap's CoreNLP jar")
    lines = [s.replace("\n", " ").replace("\r", " ") for s in sentences]
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ptb-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode("utf-8")
    finally:
        os.remove(path)
    tokenized = out.split("\n")
    tokenized += [""] * (len(lines) - len(tokenized))  # trailing empty lines may not come back
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS) for line in tokenized[: len(lines)]]


def ptb_tokenize(sentences: Sequence[str], backend: str = "auto") -> list[str]:
    """PTB-tokenise captions as pycocoevalcap does. backend: "auto" (Java if present), "java", "python", "none"."""
    if backend == "auto":
        backend = "java" if java_available() else "python"
    if backend == "java":
        return ptb_tokenize_java(sentences)
    if backend == "python":
        return [ptb_tokenize_python(s) for s in sentences]
    if backend == "none":
        return list(sentences)
    raise ValueError(f"unknown tokenizer backend {backend!r}: expected auto, java, python or none")


def _tokenized_sets(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference caption")
    flat = ptb_tokenize([*predictions, *(c for refs in references for c in refs)], tokenizer)  # one JVM start
    preds, rest = flat[: len(predictions)], flat[len(predictions) :]
    gts, res, k = {}, {}, 0
    for i, refs in enumerate(references):
        gts[i], k = rest[k : k + len(refs)], k + len(refs)
        res[i] = [preds[i]]
    return gts, res


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenizer: str = "auto") -> float:
    """Corpus CIDEr-D (pycocoevalcap; document frequencies from this set's references). 1.0 = "100" in papers."""
    if not predictions:
        return 0.0
    from pycocoevalcap.cider.cider import Cider

    gts, res = _tokenized_sets(predictions, references, tokenizer)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]], *, tokenizer: str = "auto") -> float:
    """Corpus BLEU-4 (pycocoevalcap: closest reference length for the brevity penalty)."""
    if not predictions:
        return 0.0
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _tokenized_sets(predictions, references, tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        scores, _ = Bleu(4).compute_score(gts, res)
    return float(scores[3])


__all__ = [
    "bleu4", "cider", "exact_match_accuracy", "java_available", "ptb_tokenize", "ptb_tokenize_java",
    "ptb_tokenize_python", "roc_auc", "top_k_accuracy", "vqa_accuracy", "vqa_normalize",
]
