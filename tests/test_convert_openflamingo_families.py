"""Every LM family OpenFlamingo released converts exactly: Llama (v1 OpenFlamingo-9B), MPT (OpenFlamingo-9B-vitl-mpt7b;
transformers' native ``mpt``) and GPT-NeoX (OpenFlamingo-4B, RedPajama-INCITE-3B).

Fixtures: tests/fixtures/openflamingo[-<family>], made by scripts/openflamingo/make_fixture.py in OpenFlamingo's
own environment (transformers 4.46), with randomised bridges (gates open). MPT and GPT-NeoX have padded
vocabularies (20 rows past the tokenizer, cut off by OpenFlamingo's resize); GPT-NeoX's head is ``embed_out``
in OpenFlamingo's checkpoint and ``lm_head`` in transformers 5; MPT's forward drops the media context's keyword
argument in transformers 5 (relayed to its blocks, see ``modeling.lm.route_context``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flamingo_vlm import load_flamingo
from flamingo_vlm.cli import main
from flamingo_vlm.convert import clip_vision_from_open_clip, export_openflamingo, load_openflamingo

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = {"llama": FIXTURES / "openflamingo", "mpt": FIXTURES / "openflamingo-mpt", "gpt_neox": FIXTURES / "openflamingo-gpt_neox"}
TOL = 1e-5


class Fixture:
    def __init__(self, family: str) -> None:
        self.family, self.dir = family, FAMILIES[family]
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.tensors = load_file(self.dir / "tensors.safetensors")
        self.checkpoint = torch.load(self.dir / "checkpoint.pt", map_location="cpu", weights_only=True)

    def vision(self):
        return clip_vision_from_open_clip(self.dir / "vision.safetensors", head_width=self.meta["vision_cfg"]["head_width"], quick_gelu=True)

    def convert(self, checkpoint=None):
        return load_openflamingo(
            self.dir / "checkpoint.pt" if checkpoint is None else checkpoint, str(self.dir / "lm"), self.vision(),
            vision_post_norm=self.meta["vision_tokens_ln_post"], lm_kwargs={"dtype": torch.float32},
        )

    def pixels(self) -> torch.Tensor:
        return torch.cat([self.tensors["vision_x"][b, :n] for b, n in enumerate(self.meta["images_per_row"])])

    def logits(self, model) -> torch.Tensor:
        """Our logits with the positions OpenFlamingo's forward used (0..L-1, pads included)."""
        ids = self.tensors["input_ids"]
        with torch.no_grad():
            return model(
                input_ids=ids, attention_mask=self.tensors["attention_mask"], pixel_values=self.pixels(),
                position_ids=torch.arange(ids.shape[1]).expand_as(ids),
            ).logits

    def max_diff(self, logits, reference) -> float:
        real = self.tensors["attention_mask"].bool()
        return float((logits[real] - reference[real]).abs().max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request):
    fixture = Fixture(request.param)
    return fixture, *fixture.convert()


def test_fixture_is_the_family_with_its_vocabulary(converted):
    fixture, model, _, _ = converted
    if fixture.family == "llama":
        return  # the original fixture (see test_convert_openflamingo.py)
    assert type(model.lm).__name__ == fixture.meta["lm_class"]
    rows = fixture.meta["tokenizer_length_before"] + fixture.meta["vocab_padding_rows"]
    assert model.lm.get_input_embeddings().base.weight.shape[0] == rows  # padded past the tokenizer
    assert fixture.meta["tokenizer_length_after"] < rows  # and OpenFlamingo's resize cut the padding off


def test_logits_match_openflamingo(converted):
    fixture, model, _, _ = converted
    logits = fixture.logits(model)
    assert logits.shape == fixture.tensors["logits_a"].shape  # the tokenizer's vocabulary, as OpenFlamingo resizes it
    assert fixture.max_diff(logits, fixture.tensors["logits_a"]) < TOL
    with torch.no_grad():  # the gates are open: without the images the logits move far
        ids, mask = fixture.tensors["input_ids"], fixture.tensors["attention_mask"]
        blind = model(input_ids=ids, attention_mask=mask, visual_tokens=torch.zeros(6, 64, 8), position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    assert fixture.max_diff(blind, fixture.tensors["logits_a"]) > 0.1


def test_every_block_receives_the_media(converted):
    """Fails for a family whose decoder layers do not get the media context (MPT's forward drops it)."""
    fixture, model, _, _ = converted
    calls = []
    hooks = [block.register_forward_hook(lambda m, args, out: calls.append((id(m), len(args)))) for block in model.xattn_blocks]
    try:
        fixture.logits(model)
    finally:
        for h in hooks:
            h.remove()
    assert len(model.xattn_blocks) == len(fixture.meta["xattn_layers"])
    assert sorted(calls) == sorted((id(b), 3) for b in model.xattn_blocks)


def test_greedy_generation_matches_openflamingo(converted):
    fixture, model, _, _ = converted
    t = fixture.tensors
    for use_cache in (None, True):  # the LM's default (MPT's config: no KV cache), and with the KV cache
        out = model.generate(
            t["input_ids"], t["attention_mask"], pixel_values=fixture.pixels(), max_new_tokens=fixture.meta["max_new_tokens"],
            do_sample=False, num_beams=1, eos_token_id=fixture.meta["token_ids"]["<|endofchunk|>"], suppress_tokens=None,
            **({} if use_cache is None else {"use_cache": use_cache}),
        )
        assert torch.equal(out, t["generated"]), use_cache


def test_processor_tokenizes_like_openflamingo(converted):
    fixture, _, processor, _ = converted
    pixels = fixture.pixels()[:, 0]
    counts = fixture.meta["images_per_row"]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    batch = processor(text=fixture.meta["prompts"], images=[[pixels[i] for i in range(s, s + n)] for s, n in zip(starts, counts)])
    assert torch.equal(batch["input_ids"], fixture.tensors["input_ids"])
    assert torch.equal(batch["attention_mask"], fixture.tensors["attention_mask"])


def test_export_reproduces_the_checkpoint_under_openflamingo_names(converted):
    """Export writes OpenFlamingo's names (GPT-NeoX's head as embed_out, which OpenFlamingo's strict=False load would
    otherwise drop) and every tensor of the original checkpoint bit for bit; converting it again is exact."""
    fixture, model, _, _ = converted
    exported = export_openflamingo(model)
    assert set(exported) <= set(fixture.meta["openflamingo_model_keys"]) | {"perceiver.latents"}
    for key, value in fixture.checkpoint.items():
        if key in exported or key != "lang_encoder.lm_head.weight":  # MPT's tied head: the checkpoint holds it twice
            assert torch.equal(exported[key], value.float()), key
    if fixture.family == "gpt_neox":
        assert "lang_encoder.embed_out.weight" in exported and "lang_encoder.lm_head.weight" not in exported
    again, _, report = fixture.convert(exported)
    assert report.lm_head_new_rows_from_checkpoint
    assert torch.equal(fixture.logits(again), fixture.logits(model))


@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_convert_commands_round_trip(family, tmp_path, capsys):
    fixture = Fixture(family)
    out = tmp_path / "converted"
    assert main([
        "convert", "openflamingo", str(fixture.dir / "checkpoint.pt"), "--lm", str(fixture.dir / "lm"),
        "--vision", str(fixture.dir / "vision.safetensors"), "--vision-head-width", "4", "--vision-post-norm", "--out", str(out),
    ]) == 0
    model, _ = load_flamingo(out)
    assert fixture.max_diff(fixture.logits(model), fixture.tensors["logits_a"]) < TOL
    assert main(["convert", "to-openflamingo", str(out), "--out", str(tmp_path / "checkpoint.pt")]) == 0
    exported = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(exported[k], v.float()) for k, v in fixture.checkpoint.items() if k in exported)
    assert set(fixture.checkpoint) - set(exported) <= {"lang_encoder.lm_head.weight"}


# ---- the converter's papercuts -------------------------------------------------------------------------------
def _convert_args(fixture: Fixture, out, **changes) -> list[str]:
    args = {"--lm": str(fixture.dir / "lm"), "--vision": str(fixture.dir / "vision.safetensors"), "--vision-head-width": "4", "--out": str(out), **changes}
    return ["convert", "openflamingo", changes.pop("checkpoint", str(fixture.dir / "checkpoint.pt")), *[x for kv in args.items() for x in kv]]


def test_a_vision_typo_says_file_not_found_and_leaves_nothing(tmp_path, capsys):
    fixture = Fixture("gpt_neox")
    out = tmp_path / "out"
    assert main(_convert_args(fixture, out, **{"--vision": str(fixture.dir / "vison.safetensors")})) == 2
    err = capsys.readouterr().err
    assert "vison.safetensors" in err and "no such file" in err and "cannot tell" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_conversion_leaves_no_partial_output(tmp_path, capsys):
    """The vision model is written before the LM is found not to fit: none of it may remain."""
    fixture = Fixture("gpt_neox")
    out = tmp_path / "out"
    assert main(_convert_args(fixture, out, **{"--lm": str(FAMILIES["mpt"] / "lm")})) == 2
    assert "wrong --lm" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (out / "old").mkdir(parents=True)  # a non-empty --out is refused, not merged into
    assert main(_convert_args(fixture, out)) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old"]


def test_dtype_is_recorded_and_the_model_reloads_in_it(tmp_path):
    fixture = Fixture("mpt")
    out = tmp_path / "bf16"
    assert main(_convert_args(fixture, out, **{"--dtype": "bfloat16"})) == 0
    assert json.loads((out / "flamingo_config.json").read_text())["lm_dtype"] == "bfloat16"
    model, _ = load_flamingo(out)  # the LM's checkpoint is float32: without the record it would load so
    assert model.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    model, _ = load_flamingo(out, lm_kwargs={"dtype": torch.float32})  # an explicit choice still wins
    assert model.lm.get_input_embeddings().weight.dtype == torch.float32


def test_saved_tokenizers_name_a_class_openflamingos_transformers_has(tmp_path):
    """transformers 5 writes tokenizer_class "TokenizersBackend", which transformers < 4.47 cannot load (checked in
    OpenFlamingo's env: PreTrainedTokenizerFast loads there with the same ids)."""
    from transformers import AutoTokenizer

    fixture = Fixture("llama")
    out = tmp_path / "converted"
    assert main(_convert_args(fixture, out)) == 0
    assert main(["convert", "to-openflamingo", str(out), "--out", str(tmp_path / "export" / "checkpoint.pt")]) == 0
    for directory in (out, tmp_path / "export" / "checkpoint_tokenizer"):
        assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer(fixture.meta["prompts"][0])["input_ids"]
        assert ids == [i for i in fixture.tensors["input_ids"][0].tolist() if i != fixture.meta["token_ids"]["<PAD>"]]
