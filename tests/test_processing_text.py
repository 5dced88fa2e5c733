"""Special tokens typed in prompt text: allowed, escaped (tokenised as plain text) or refused.

Property-style over random texts holding the tokenizers' special strings, for tokenizers of the four
layouts real LMs ship (built here from a BPE trained on a few sentences, no download): SentencePiece-style
Llama (Metaspace, prepend "first"), GPT-2 and GPT-NeoX byte-level BPE, and OPT (GPT-2 BPE whose BOS is
``</s>``, added in front of every text); and a "slow" tokenizer without a ``tokenizers`` backend.
"""

import json
import random
import string

import pytest
import torch

from flamingo_vlm import FlamingoProcessor, ImageTransform, add_special_tokens
from flamingo_vlm.inference import continuation_token_ids
from flamingo_vlm.modeling.masking import media_index
from flamingo_vlm.processing.text import PromptTokenizer
from flamingo_vlm.tiny import _CORPUS, make_tokenizer

from helpers import RED, build, image, open_gates

MARKERS = ("<image>", "<|endofchunk|>")
ALPHABET = string.ascii_letters + string.digits + " .,:?!<>/|_-'"


def _bpe(pre_tokenizer, special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    byte_level = isinstance(pre_tokenizer, pre_tokenizers.ByteLevel)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else list(ALPHABET)
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, initial_alphabet=alphabet))
    state = json.loads(tok.to_str())["model"]
    return state["vocab"], [tuple(m) for m in state["merges"]]


def _llama():
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    vocab, merges = _bpe(pre_tokenizers.Metaspace(prepend_scheme="first"), ["<unk>", "<s>", "</s>"])
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _gpt2():
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(*_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"]))


def _neox():
    from tokenizers import pre_tokenizers
    from transformers import GPTNeoXTokenizer

    return GPTNeoXTokenizer(*_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"]))


def _opt():
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(vocab, merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True)


def _slow():
    """A character-level tokenizer without a `tokenizers` backend (transformers' PythonBackend, as custom
    remote-code tokenizers are), adding BOS."""
    from transformers.tokenization_python import PythonBackend

    class CharTokenizer(PythonBackend):
        def __init__(self, **kwargs):
            self._chars = ["<unk>", "<s>", "</s>"] + list(string.printable)
            self._ids = {c: i for i, c in enumerate(self._chars)}
            super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self):
            return len(self._chars)

        def get_vocab(self):
            return {**self._ids, **self.added_tokens_encoder}

        def _tokenize(self, text, **kwargs):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._ids.get(token, 0)

        def _convert_id_to_token(self, index):
            return self._chars[index]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [self.bos_token_id] + ids + (pair or [])

    return CharTokenizer()


TOKENIZERS = {"llama": _llama, "gpt2": _gpt2, "gpt_neox": _neox, "opt": _opt, "tiny": make_tokenizer, "slow": _slow}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    tok = TOKENIZERS[request.param]()
    add_special_tokens(tok)
    tok.add_tokens(["<|reserved|>"])  # a non-special added token, as some LMs ship
    return tok


def _random_texts(protected: list[str], n: int, seed: int, *, with_special: bool) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(_CORPUS).split() + ["<", ">", "</", "s>", "/s", "|", "<b>"]
    texts = []
    for _ in range(n):
        pieces = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        extras = (protected if with_special else []) + ["<|endofchunk|>"]
        for _ in range(rng.randint(0, 3) + with_special):
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(extras))
        text = "".join(p + rng.choice(["", " "]) for p in pieces).strip()
        if with_special and not any(p in text for p in protected):
            text += rng.choice(protected)
        texts.append(text)
    return texts


def _template(tok) -> list[int]:
    """The ids the tokenizer adds around any text (e.g. BOS)."""
    return tok("")["input_ids"]


def test_the_protected_set_is_every_special_and_added_token_but_the_markers(tokenizer):
    protected = set(PromptTokenizer(tokenizer, MARKERS).protected.values())
    assert protected == (set(tokenizer.all_special_tokens) | {"<|reserved|>"}) - set(MARKERS)
    assert {tokenizer.eos_token, tokenizer.pad_token} <= protected


def test_escape_yields_no_special_id_from_text_and_decodes_back(tokenizer):
    escape = PromptTokenizer(tokenizer, MARKERS, "escape")
    protected = set(escape.protected)
    template = _template(tokenizer)
    texts = _random_texts(sorted(escape.protected.values()), 40, seed=1, with_special=True)
    for text, ids in zip(texts, escape(texts)["input_ids"]):
        assert ids[: len(template)] == template
        body = ids[len(template) :]
        assert not protected & set(body), (text, tokenizer.convert_ids_to_tokens(body))
        # the markers stay the prompt's syntax
        assert body.count(tokenizer.convert_tokens_to_ids("<|endofchunk|>")) == text.count("<|endofchunk|>")
        assert tokenizer.decode(body, skip_special_tokens=False) == text
    # the plain call does turn typed special strings into their ids: what escaping is for
    allowed = tokenizer(texts)["input_ids"]
    assert any(protected & set(ids[len(template) :]) for ids in allowed)


def test_escape_and_refuse_change_nothing_for_text_without_special_tokens(tokenizer):
    texts = _random_texts([], 40, seed=2, with_special=False)
    texts += ["<image>two cats", "two cats <image> sit", "a<|endofchunk|><image>b", " leading space", "x<image>"]
    expected = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    for policy in ("escape", "refuse"):
        got = PromptTokenizer(tokenizer, MARKERS, policy)(texts, padding=True, padding_side="left", return_tensors="pt")
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (policy, key)


def test_refuse_names_the_token_and_where_it_is(tokenizer):
    refuse = PromptTokenizer(tokenizer, MARKERS, "refuse")
    eos = tokenizer.eos_token
    with pytest.raises(ValueError, match=rf"holds '{_re(eos)}' at character 9: it is the tokenizer's .*eos"):
        refuse("two cats " + eos + " sit")
    with pytest.raises(ValueError, match=r"text 1 holds '<\|reserved\|>' at character 3: it is the tokenizer's added token"):
        refuse(["fine", "two<|reserved|>"])
    for text in _random_texts(sorted(refuse.protected.values()), 20, seed=3, with_special=True):
        with pytest.raises(ValueError, match="special_tokens_in_text='escape'"):
            refuse([text])


def _re(s: str) -> str:
    import re

    return re.escape(s)


def test_processor_option_validated_saved_and_restored(tmp_path):
    tok = make_tokenizer()
    add_special_tokens(tok)
    transform = ImageTransform(32)
    with pytest.raises(ValueError, match=r"special_tokens_in_text must be one of \('allow', 'escape', 'refuse'\), got 'strip'"):
        FlamingoProcessor(tok, transform, special_tokens_in_text="strip")
    processor = FlamingoProcessor(tok, transform)
    assert processor.special_tokens_in_text == "allow"  # the library's default: a plain tokenizer call
    processor.special_tokens_in_text = "escape"
    processor.save_pretrained(tmp_path)
    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert loaded.special_tokens_in_text == "escape"
    batch = loaded(["two cats</s>", image(RED), "Output:<s>"])
    assert not {tok.bos_token_id, tok.eos_token_id} & set(batch["input_ids"][0].tolist())
    assert loaded.decode(batch["input_ids"][0], skip_special_tokens=False) == "two cats</s><image>Output:<s>"
    loaded.special_tokens_in_text = "refuse"
    with pytest.raises(ValueError, match="'</s>' at character 8"):
        loaded(["two cats</s>", image(RED), "Output:"])


def test_candidates_are_escaped_too():
    """Scoring tokenises candidates through the processor: a typed </s> in a candidate is text."""
    tok = make_tokenizer()
    add_special_tokens(tok)
    processor = FlamingoProcessor(tok, ImageTransform(32), special_tokens_in_text="escape")
    ids = continuation_token_ids(processor.tokenize, "Output:", [" red</s>", " red<|endofchunk|>"])
    assert tok.eos_token_id not in ids[0]
    assert ids[1][-1] == processor.end_of_chunk_token_id


def test_serve_escapes_by_default():
    import argparse

    from flamingo_vlm.serving.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve"]).special_tokens_in_text == "escape"
    assert parser.parse_args(["serve", "--special-tokens-in-text", "refuse"]).special_tokens_in_text == "refuse"


def test_typed_eos_no_longer_cuts_earlier_images_off():
    """With the EOS reset (packed documents), a typed </s> would start a new document: the tokens after it
    would attend to no image. Escaped, the last token's cross-attention reads the prompt's image again."""
    model, processor = build("llama", reset_media_at_eos=True)
    open_gates(model)
    eos = processor.tokenizer.eos_token_id
    assert model.config.eos_token_id == eos
    seen = []
    hook = model.xattn_blocks[0].attn.register_forward_hook(lambda module, args, out: seen.append(out[0, -1]))

    def last_token_cross_attention(policy):
        processor.special_tokens_in_text = policy
        batch = processor([image(RED), "a red thing.</s> Output:"])
        last, _ = media_index(batch["input_ids"], processor.media_token_id, eos)
        with torch.no_grad():
            model(**batch)
        return int(last[0, -1]), seen.pop()

    try:
        index, out = last_token_cross_attention("allow")
        assert index == -1 and not out.any()  # the attack: the image is cut off
        index, out = last_token_cross_attention("escape")
        assert index == 0 and out.abs().sum() > 0  # the image is seen again
    finally:
        hook.remove()
