"""Build OpenFlamingo's own model on tiny random backbones and record what it computes.

Run with the python of an OpenFlamingo environment (scripts/openflamingo/make_env.sh), not the
project's: OpenFlamingo 2.0.1 needs transformers < 4.47.

    .venv-openflamingo/bin/python scripts/openflamingo/make_fixture.py                    # Llama (v1, OpenFlamingo-9B)
    .venv-openflamingo/bin/python scripts/openflamingo/make_fixture.py --family mpt       # OpenFlamingo-9B-vitl-mpt7b
    .venv-openflamingo/bin/python scripts/openflamingo/make_fixture.py --family gpt_neox  # OpenFlamingo-4B (RedPajama-3B)

One fixture per LM family OpenFlamingo released, under tests/fixtures/openflamingo (Llama) and
tests/fixtures/openflamingo-<family>. MPT is transformers' native ``mpt`` (MosaicML's MPT-7B layout, which
anas-awadalla/mpt-7b has): OpenFlamingo's factory takes it through the same path as the hub's custom MPT
code (layers ``transformer.blocks``). The MPT-1B models' custom ``mosaic_gpt`` code is not available offline
and is not covered. MPT and GPT-NeoX get padded vocabularies (embedding rows past the tokenizer's entries)
as their checkpoints have, which OpenFlamingo's resize cuts off.

Writes, under --out:
    lm/                     a tiny LM of the family (save_pretrained) + a tokenizer in its style (no OpenFlamingo tokens)
    vision.safetensors      the tiny open_clip ViT's visual tower state dict (open_clip key names)
    checkpoint.pt           OpenFlamingo's checkpoint, as its training script saves it
                            (filter_state_dict_to_trainable), in bf16
    embeddings_b.pt         (Llama only) variant B: embedding and LM-head matrices whose *old* rows differ
                            from the LM's
    tensors.safetensors     inputs (input_ids, attention_mask, vision_x), logits_a / logits_b, greedy
                            generations, and the ViT's patch tokens with and without ln_post
    meta.json               prompts, token ids, versions, settings

The bridge is randomised (OpenFlamingo initialises its gates at 0, which would make the test blind to
everything but the LM); all randomised weights are rounded to bf16 so the bf16 checkpoint holds them exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

VISION_MODEL = "of-fixture-tiny-vit"
VISION_CFG = {"image_size": 16, "layers": 2, "width": 8, "head_width": 4, "patch_size": 4, "mlp_ratio": 4.0}
LM_CFG = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.3, rms_norm_eps=1e-5,
)
# family -> (config class, config kwargs, embedding rows past the tokenizer's entries, BOS prepended)
FAMILIES = {
    "llama": ("LlamaConfig", LM_CFG, 0, True),
    # MPT-7B: ALiBi, no biases, tied embeddings, 50432 rows for 50277 tokens
    "mpt": ("MptConfig", dict(
        d_model=16, n_heads=2, n_layers=4, expansion_ratio=2, max_seq_len=128, no_bias=True, initializer_range=0.3,
        attn_config={"alibi": True, "alibi_bias_max": 8}, tie_word_embeddings=True,
    ), 20, False),
    # RedPajama-INCITE-3B / Pythia: rotary on a quarter of each head, parallel attention and MLP, untied
    # head named embed_out (lm_head since transformers 5), 50432 rows for 50277 tokens
    "gpt_neox": ("GPTNeoXConfig", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=128, initializer_range=0.3,
    ), 20, False),
}
CROSS_ATTN_EVERY_N_LAYERS = 2
MAX_NEW_TOKENS = 6
CORPUS = [
    "a red circle and a blue square on a green background",
    "two cats sit on the mat. the dog runs in the park.",
    "Question: what colour is the ball? Answer: red",
    "Output: a small yellow triangle next to a large purple star",
]
# OpenFlamingo's prompt convention: <image> before each image's text, <|endofchunk|> after it.
PROMPTS = [
    "<image>a red circle<|endofchunk|><image>two cats<|endofchunk|><image>Output:",
    "Question: what colour?<image>a ball<|endofchunk|><image>Answer:",
    "<image>Output: a small",
]


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def make_tokenizer(directory: Path, bos: bool = True):
    """A Llama-style tokenizer (byte-level BPE, <s> prepended) or, without ``bos``, a GPT-NeoX-style one (nothing
    prepended); no pad token (OpenFlamingo adds <PAD>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def make_lm(directory: Path, vocab_size: int, family: str = "llama") -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, kwargs, padding, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=vocab_size + padding, bos_token_id=0, eos_token_id=1, **kwargs)
    lm = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 1:  # RMSNorm weights: away from 1 so a missed norm shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
            p.copy_(bf16_exact(p))  # the bf16 checkpoint's old embedding rows then equal the LM's exactly
    lm.save_pretrained(directory)


def register_tiny_vit(directory: Path) -> None:
    import open_clip

    config = {
        "embed_dim": 8,
        "quick_gelu": True,  # as OpenAI's ViT-L-14, the encoder of every released OpenFlamingo model
        "vision_cfg": VISION_CFG,
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 8, "heads": 2, "layers": 1},
    }
    path = directory / f"{VISION_MODEL}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def randomise_bridge(model, new_ids: list[int], vocab_before: int, head_saved: bool = False) -> None:
    """Nonzero gates, random perceiver / xattn weights and new embedding rows, all bf16-exact."""
    bridge = [model.perceiver] + [m for m in model.lang_encoder.gated_cross_attn_layers if m is not None]
    with torch.no_grad():
        for module in bridge:
            for name, p in module.named_parameters():
                if name.endswith("gate"):
                    p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) * (1 if torch.rand(()) > 0.3 else -1))
                elif p.ndim == 1:  # LayerNorm weight / bias
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
                elif name == "latents":
                    p.copy_(torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
                p.copy_(bf16_exact(p))
        embed = model.lang_encoder.get_input_embeddings().weight
        old = embed[:vocab_before]
        embed[new_ids] = bf16_exact(old.mean(0) + old.std() * torch.randn(len(new_ids), embed.shape[1]))
        # The LM head's new rows are never saved by OpenFlamingo for an untied LM (its checkpoint keeps only
        # parameters whose name contains "embed"): a fresh resize_token_embeddings decides them. Recent
        # transformers put them at the mean of the old rows (plus ~1e-9 noise); pin that exactly.
        head = model.lang_encoder.get_output_embeddings().weight
        if head_saved:  # the checkpoint holds the head (GPT-NeoX's embed_out): random rows, loaded from it
            head[new_ids] = bf16_exact(head[:vocab_before].std() * torch.randn(len(new_ids), head.shape[1]))
        elif head is not embed:
            head[new_ids] = head[:vocab_before].mean(0)


def vision_patch_tokens(visual, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ViT's patch tokens as this open_clip gives them (ln_post on them since 2.23.0) and without ln_post
    (open_clip < 2.23.0, with which the released OpenFlamingo models were trained)."""
    visual.output_tokens = True
    with torch.no_grad():
        visual.final_ln_after_pool = False
        with_ln = visual(pixels)[1]
        visual.final_ln_after_pool = True
        without_ln = visual(pixels)[1]
        visual.final_ln_after_pool = False
    return {"vision_tokens_ln_post": with_ln, "vision_tokens_no_ln_post": without_ln}


def greedy_margins(scores: tuple[torch.Tensor, ...]) -> float:
    """The smallest gap between the best and second-best logit over all greedy steps (tie safety)."""
    top2 = torch.stack([s.float().topk(2, dim=-1).values for s in scores])  # [steps, B, 2]
    return float((top2[..., 0] - top2[..., 1]).min())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--out", default=None, help="default: tests/fixtures/openflamingo[-FAMILY]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # open_flamingo.train imports wandb at module level; only its checkpoint filter is needed here
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    from open_flamingo import create_model_and_transforms
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    family = args.family
    out = Path(args.out or ("tests/fixtures/openflamingo" + ("" if family == "llama" else f"-{family}")))
    (out / "lm").mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out / "lm", bos=FAMILIES[family][3])
    vocab_before = len(tokenizer)
    make_lm(out / "lm", vocab_before, family)

    with tempfile.TemporaryDirectory() as tmp:
        register_tiny_vit(Path(tmp))
        model, _, of_tokenizer = create_model_and_transforms(
            clip_vision_encoder_path=VISION_MODEL,
            clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(out / "lm"),
            tokenizer_path=str(out / "lm"),
            cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        )
    model.eval()
    new_ids = list(range(vocab_before, len(of_tokenizer)))
    ids = {t: of_tokenizer.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<PAD>")}
    head_saved = family == "gpt_neox"  # OpenFlamingo's checkpoint filter keeps parameters named *embed*
    randomise_bridge(model, new_ids, vocab_before, head_saved)

    visual = model.vision_encoder
    with torch.no_grad():  # open_clip's init leaves LayerNorms at 1/0: randomise so a missed norm shows
        for name, p in visual.named_parameters():
            if "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(out / "vision.safetensors"))

    # An interleaved, left-padded batch: 3, 2 and 1 images; text before the first image in row 1;
    # OpenFlamingo's vision_x [B, T_img, F=1, C, H, W] holds zero images where a row has fewer.
    of_tokenizer.padding_side = "left"
    enc = of_tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    counts = (input_ids == ids["<image>"]).sum(1).tolist()
    size = VISION_CFG["image_size"]
    vision_x = torch.zeros(len(PROMPTS), max(counts), 1, 3, size, size)
    for b, n in enumerate(counts):
        vision_x[b, :n] = torch.randn(n, 1, 3, size, size)

    with torch.no_grad():
        logits_a = model(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask).logits
        gen = model.generate(
            vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
            num_beams=1, do_sample=False, pad_token_id=of_tokenizer.pad_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
    generated, margin = gen.sequences, greedy_margins(gen.scores)
    if margin < 1e-3:
        raise SystemExit(f"greedy decoding has a near-tie (margin {margin:.2e}): pick another --seed")
    if bool((generated[:, input_ids.shape[1]:] == ids["<image>"]).any()):
        raise SystemExit("the model generated <image> (OpenFlamingo then re-routes media): pick another --seed")

    state = filter_state_dict_to_trainable(model, model.state_dict())
    checkpoint = {k: v.detach().to(torch.bfloat16).clone() for k, v in state.items()}
    torch.save(checkpoint, out / "checkpoint.pt")
    if family != "llama":
        return finish(out, model, visual, of_tokenizer, checkpoint, counts, margin, ids, vocab_before, args.seed, family, {
            "input_ids": input_ids, "attention_mask": attention_mask, "vision_x": vision_x, "logits_a": logits_a.float(),
            "generated": generated, **vision_patch_tokens(visual, vision_x[vision_x.flatten(2).abs().sum(-1) > 0].reshape(-1, 3, size, size)),
        })

    # Variant B: a checkpoint whose old embedding rows differ from the LM's (OpenFlamingo trains the whole
    # input embedding matrix; its FSDP path neither masks those gradients nor spares them weight decay),
    # and which carries the LM head too (as it does for LMs whose head's name contains "embed").
    embed_key = next(k for k in checkpoint if k.endswith("embed_tokens.weight"))
    head_key = "lang_encoder.lm_head.weight"
    with torch.no_grad():
        embed = model.lang_encoder.get_input_embeddings().weight
        head = model.lang_encoder.get_output_embeddings().weight
        rows = torch.randperm(vocab_before)[:20]
        embed[rows] = bf16_exact(embed[rows] + 0.3 * torch.randn(len(rows), embed.shape[1]))
        head[rows[:10]] = bf16_exact(head[rows[:10]] + 0.3 * torch.randn(10, head.shape[1]))
        head[new_ids] = bf16_exact(head[:vocab_before].std() * torch.randn(len(new_ids), head.shape[1]))
        logits_b = model(vision_x=vision_x, lang_x=input_ids, attention_mask=attention_mask).logits
    torch.save({embed_key: embed.detach().to(torch.bfloat16).clone(), head_key: head.detach().to(torch.bfloat16).clone()}, out / "embeddings_b.pt")

    tensors = {
        "input_ids": input_ids, "attention_mask": attention_mask, "vision_x": vision_x,
        "logits_a": logits_a.float(), "logits_b": logits_b.float(), "generated": generated,
        **vision_patch_tokens(visual, vision_x[vision_x.flatten(2).abs().sum(-1) > 0].reshape(-1, 3, size, size)),
    }
    return finish(out, model, visual, of_tokenizer, checkpoint, counts, margin, ids, vocab_before, args.seed, family, tensors)


def finish(out, model, visual, of_tokenizer, checkpoint, counts, margin, ids, vocab_before, seed, family, tensors) -> int:
    """Write tensors.safetensors and meta.json."""
    import open_clip
    import open_flamingo
    import transformers
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))

    of_keys = sorted(k for k in model.state_dict() if k.startswith(("perceiver.", "lang_encoder.")) and "old_decoder_blocks" not in k and "lang_encoder.gated_cross_attn_layers" not in k)
    meta = {
        "versions": {"open_flamingo": getattr(open_flamingo, "__version__", "2.0.1"), "open_clip": open_clip.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "family": family,
        "lm_class": type(model.lang_encoder).__name__,
        "vocab_padding_rows": FAMILIES[family][2],
        "seed": seed,
        "prompts": PROMPTS,
        "token_ids": ids,
        "tokenizer_length_before": vocab_before,
        "tokenizer_length_after": len(of_tokenizer),
        "cross_attn_every_n_layers": CROSS_ATTN_EVERY_N_LAYERS,
        "xattn_layers": [i for i, m in enumerate(model.lang_encoder.gated_cross_attn_layers) if m is not None],
        "vision_cfg": VISION_CFG,
        "vision_quick_gelu": True,
        # open_clip >= 2.23.0 applies ln_post to the patch tokens OpenFlamingo takes (unless final_ln_after_pool)
        "vision_tokens_ln_post": not visual.final_ln_after_pool,
        "images_per_row": counts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy_min_margin": margin,
        "checkpoint_keys": sorted(checkpoint),
        "openflamingo_model_keys": of_keys,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: {len(checkpoint)} checkpoint tensors, greedy margin {margin:.3g}, images per row {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
