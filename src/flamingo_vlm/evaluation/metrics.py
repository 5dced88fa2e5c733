"""Benchmark metrics, computed the way the papers and their official tools compute them.

- CIDEr (pycocoevalcap's CIDEr-D) and BLEU-4 (pycocoevalcap) on PTB-tokenised captions: the Stanford PTB
  tokenizer through Java when Java is present (what pycocoevalcap does), else :func:`ptb_tokenize_python`.
- VQA accuracy: the official VQA evaluation (vqaEval.py): answer normalisation, then the mean over the 10
  leave-one-out subsets of min(1, #matches / 3).
- VizWiz: the same, with its answer records (no ``answer_id``) compared whole, as the official code does.
- TextVQA accuracy: its own evaluator (EvalAI's answer processor, always applied); OK-VQA: the prediction
  stemmed first (:mod:`flamingo_vlm.evaluation.stemming`).
- ROC-AUC (HatefulMemes), top-1 / exact match.

Functions return fractions (CIDEr: its raw value); tasks report them x100, as papers do.
"""

from __future__ import annotations

import contextlib
import io
import math
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


def _strip_ws(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _answer_record(answer: "str | dict", index: int) -> dict:
    # a plain string is one distinct annotation (as VQAv2's answer_id makes each one); a dict is compared
    # whole, as the official code compares its annotation dicts
    return {"answer": answer, "_index": index} if isinstance(answer, str) else dict(answer)


def vqa_accuracy(prediction: str, answers: Sequence["str | dict"], *, normalize_always: bool = False) -> float:
    """Official VQA accuracy of one prediction against its (usually 10) human answers, in [0, 1].

    For each human answer g: min(1, #answers equal to the prediction among those left when g is held out / 3),
    averaged over g. As in the official code (vqaEval.py), "held out" removes every annotation *equal* to g:
    answers given as dicts (the annotation records) are compared whole, so VQAv2's records (each with its
    ``answer_id``) leave out exactly one, while VizWiz's (``{"answer", "answer_confidence"}``, no id) leave
    out all identical ones. Plain strings count as distinct annotations.
    Answers and prediction are normalised only when the humans disagree, as in the official code
    (``normalize_always=True`` normalises always).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    records = [_answer_record(a, i) for i, a in enumerate(answers)]
    for r in records:
        r["answer"] = _strip_ws(r["answer"])
    pred = _strip_ws(prediction)
    if len({r["answer"] for r in records}) > 1 or normalize_always:
        for r in records:
            r["answer"] = _process_digit_article(_process_punctuation(r["answer"]))
        pred = _process_digit_article(_process_punctuation(pred))
    total = 0.0
    for held_out in records:
        matching = sum(r["answer"] == pred for r in records if r != held_out)
        total += min(1.0, matching / 3.0)
    return total / len(records)


def vqa_accuracy_by_type(accuracies: Sequence[float], answer_types: Sequence["str | None"]) -> dict[str, float]:
    """Mean accuracy per answer type ("yes/no", "number", "other"; VizWiz adds "unanswerable"), as the
    official evaluator's ``perAnswerType``. Examples without a type are left out."""
    if len(accuracies) != len(answer_types):
        raise ValueError(f"{len(accuracies)} accuracies for {len(answer_types)} answer types")
    groups: dict[str, list[float]] = {}
    for acc, t in zip(accuracies, answer_types):
        if t is not None:
            groups.setdefault(str(t), []).append(acc)
    return {t: sum(v) / len(v) for t, v in sorted(groups.items())}


# ---- TextVQA (the EvalAI answer processor of pythia/mmf's TextVQAAccuracyEvaluator) ------------------
def textvqa_normalize(answer: str) -> str:
    """TextVQA's answer processing: lower-case, *every* comma and "?" removed, "'s" split off, then VQA's
    punctuation / number / article / contraction rules. "1,000" -> "1000"; "a,b" -> "ab"; "STOP." -> "stop".
    """
    text = _strip_ws(answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())
    # EvalAI's comma regex differs from vqaEval's ((?<=\d)(\,)+(?=\d)), but with every comma already
    # removed neither can match, so vqaEval's punctuation step gives the same result
    return _process_digit_article(_process_punctuation(text))


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy (its own evaluator): prediction and answers are *always* normalised
    (:func:`textvqa_normalize`); leave-one-out over the answers' positions (exactly one left out)."""
    if not answers:
        raise ValueError("textvqa_accuracy needs at least one human answer")
    gts = [textvqa_normalize(a) for a in answers]
    pred = textvqa_normalize(prediction)
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


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
    bad = [i for i, x in enumerate(scores) if math.isnan(x)]
    if bad:  # NaN breaks the sort (it compares false with everything) and so every rank after it
        raise ValueError(f"ROC-AUC of NaN scores (at {bad[:5]}{'...' if len(bad) > 5 else ''})")
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
_PTB_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})  # curly -> ASCII, as Java
_NON_BMP = re.compile("[\U00010000-\U0010ffff]")
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
    text = _JAVA_LINE_BREAKS.sub(" ", sentence).lower().translate(_PTB_QUOTES)
    text = _NON_BMP.sub(" ", text)  # emoji and other astral characters: CoreNLP 3.4.1's lexer drops them
    for bracket, name in _PTB_BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"([+=\\])", r" \1 ", text)  # Java splits these off even inside a word ("a+b" -> a + b)
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


# Characters that CoreNLP's PTBTokenizer -preserveLines ends a line at (besides "\n"): one of them inside a
# caption would split it into two output lines and shift every later caption. Inside a line they are only
# whitespace, so they become spaces. ("\x85" is not among them: Java reads it as an ellipsis.)
_JAVA_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def ptb_tokenize_java(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP through Java), without writing into site-packages.

    One JVM call for all sentences, one line each; the result of each sentence is what it gets tokenised
    alone (line breaks inside a caption become spaces), and a line-count mismatch raises instead of
    shifting captions.
    """
    jar = _corenlp_jar()
    if jar is None or shutil.which("java") is None:
        raise RuntimeError("the Java PTB tokenizer needs `java` on PATH and pycocoevalcap's CoreNLP jar")
    lines = [_JAVA_LINE_BREAKS.sub(" ", s) for s in sentences]
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ptb-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode("utf-8")
    finally:
        os.remove(path)
    tokenized = out.split("\n")
    while len(tokenized) > len(lines) and not tokenized[-1].strip():
        tokenized.pop()  # a final newline
    if len(tokenized) > len(lines):
        raise RuntimeError(f"the Java PTB tokenizer returned {len(tokenized)} lines for {len(lines)} captions")
    # captions at the end that tokenise to nothing may not come back as lines; nothing can shift before them
    tokenized += [""] * (len(lines) - len(tokenized))
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PTB_PUNCTUATIONS) for line in tokenized]


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
    "ptb_tokenize_python", "roc_auc", "textvqa_accuracy", "textvqa_normalize", "top_k_accuracy", "vqa_accuracy",
    "vqa_accuracy_by_type", "vqa_normalize",
]
