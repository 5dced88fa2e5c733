"""The toy world's own backbones, trained here and saved with ``save_pretrained``.

- a byte-level BPE tokenizer trained with ``tokenizers`` on the toy text;
- a tiny Llama-style causal LM pretrained on the toy text corpus;
- a tiny CLIP (``CLIPModel``) trained contrastively on the toy image-text pairs.

They are loaded back by ``from_pretrained``, exactly the path a real backbone takes.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..processing import ImageTransform
from ..training import autocast_context, fused_adamw_supported
from .text import HELDOUT_NONCE_WORDS, caption, spread
from .world import COLOURS, IMAGE_SIZE, Scene

TOY_MEAN = (0.5, 0.5, 0.5)
TOY_STD = (0.25, 0.25, 0.25)


@dataclass
class BackboneSizes:
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_steps: int = 3200  # well past the point where the induction heads form (docs/toyworld.md)
    lm_batch: int = 16
    lm_seq_len: int = 128
    lm_lr: float = 2e-3
    # rows of each batch that are random token runs, each followed by itself: only copying from the
    # context predicts their second halves, so the LM forms induction heads (Olsson et al., 2022)
    lm_repeat_fraction: float = 0.5
    vocab_size: int = 1024
    clip_hidden: int = 96
    clip_layers: int = 4
    # shapes are learned last (colour, size and position much earlier): it trains until a linear probe of
    # its embedding reads them (docs/toyworld.md)
    clip_steps: int = 1500
    clip_batch: int = 128

    @classmethod
    def quick(cls) -> "BackboneSizes":
        return cls(lm_steps=500, clip_steps=800)

    @classmethod
    def tiny(cls) -> "BackboneSizes":
        return cls(lm_hidden=32, lm_layers=2, lm_heads=2, lm_steps=5, lm_batch=4, lm_seq_len=32, vocab_size=400,
                   clip_hidden=32, clip_layers=1, clip_steps=3, clip_batch=8)


def _device() -> torch.device:
    """Where the backbones train: a GPU when there is one (minutes become seconds), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mixed_precision(device: torch.device):
    """bf16 autocast where the hardware computes in bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32,
    through the training loop's :func:`~flamingo_vlm.training.distributed.autocast_context`.

    Weights and optimizer state stay fp32 (what is saved is fp32). Native bf16 roughly halves a step of
    either backbone on CPU (with eager attention, :func:`_for_training`); on a CPU without it the emulation
    would be slower than fp32. Timings: docs/toyworld.md.
    """
    native = True  # on CUDA, autocast_context itself falls back to fp32 where the GPU lacks bf16
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU feature checks
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return autocast_context("bf16" if native else "fp32", device)


def _for_training(model, device: torch.device):
    """The model on ``device`` with eager attention: for these short sequences and 24-32-wide heads it is faster
    on CPU than SDPA's flash kernel, most of all under bf16. Not saved: ``from_pretrained`` gives the default
    attention back."""
    model.set_attn_implementation("eager")
    return model.to(device)


def _adamw(model, **kwargs) -> torch.optim.AdamW:
    params = list(model.parameters())
    return torch.optim.AdamW(params, fused=fused_adamw_supported(params), **kwargs)


def read_corpus(world: Path) -> list[str]:
    return [d for d in (world / "text" / "lm_corpus.txt").read_text().split("\n\n") if d.strip()]


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE with Llama-style BOS prepended, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _packed_batches(token_ids: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    n = (len(token_ids) - 1) // seq_len
    rows = token_ids[: n * seq_len].view(n, seq_len)
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch):
            if len(idx) == batch:
                yield rows[idx]


def repeated_random_rows(rows: int, seq_len: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, seq_len] token ids: random runs of 4-15 ids in [low, high), each run followed by itself."""
    out = torch.empty(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        row: list[int] = []
        while len(row) < seq_len:
            run = torch.randint(low, high, (int(torch.randint(4, 16, (1,), generator=gen)),), generator=gen).tolist()
            row += run + run
        out[r] = torch.tensor(row[:seq_len])
    return out


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _lr_constant_then_decay(step: int, total: int, peak: float, warmup: int, decay: float = 0.1) -> float:
    """Linear warmup, constant, linear decay over the last ``decay`` of the steps. A cosine schedule would
    lower the rate before the induction heads form (late in the LM's pretraining) and can stall them."""
    start = int(total * (1 - decay))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak if step < start else peak * (total - step) / max(total - start, 1)


def pretrain_lm(world: Path, out_dir: Path, sizes: BackboneSizes, seed: int = 0, progress: bool = True) -> dict:
    """Train the tokenizer and a Llama-style LM on the toy text; save both to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    corpus = read_corpus(world)
    tokenizer = train_tokenizer(corpus, sizes.vocab_size)
    ids = tokenizer(corpus, add_special_tokens=True)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.lm_hidden, intermediate_size=3 * sizes.lm_hidden,
        num_hidden_layers=sizes.lm_layers, num_attention_heads=sizes.lm_heads, num_key_value_heads=sizes.lm_heads,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    device = _device()
    model = _for_training(LlamaForCausalLM(config), device)
    opt = _adamw(model, lr=sizes.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    precision = _mixed_precision(device)
    gen = torch.Generator().manual_seed(seed)
    repeats = round(sizes.lm_batch * sizes.lm_repeat_fraction)
    batches = _packed_batches(stream, sizes.lm_seq_len, sizes.lm_batch - repeats, gen)
    first_word_id = len(tokenizer.all_special_ids)  # special tokens first, then the learned vocabulary
    model.train()
    bar = tqdm(range(sizes.lm_steps), desc="pretrain toy LM", disable=not progress)
    losses = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_constant_then_decay(step, sizes.lm_steps, sizes.lm_lr, min(50, max(1, sizes.lm_steps // 20)))
        x = torch.cat([next(batches), repeated_random_rows(repeats, sizes.lm_seq_len, first_word_id, len(tokenizer), gen)])
        x = x.to(device)
        with precision:
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "params": sum(p.numel() for p in model.parameters()),
            "text_binding_accuracy": text_binding_accuracy(model, tokenizer)}


@torch.no_grad()
def text_binding_accuracy(model, tokenizer, trials: int = 100, shots: int = 8, seed: int = 0) -> float:
    """How often the LM continues "red gorp. blue jiba. ... red" with the word bound to the key in the prompt.

    Two colours, two held-out words (never in the training text), ``shots`` bindings in random order; the
    bound word's first token must beat the other word's. Chance is 0.5: an LM without induction heads
    cannot do better, and neither can a Flamingo built on it (the label-mapping task needs this lookup).
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    right = 0.0
    for _ in range(trials):
        colours = rng.sample(tuple(COLOURS), 2)
        words = dict(zip(colours, rng.sample(HELDOUT_NONCE_WORDS, 2)))
        query = rng.choice(colours)
        # every key with its leading space: " red" at the start is the same token as " red" at the end
        prompt = "".join(f" {c} {words[c]}." for c in spread(rng, colours, shots)) + f" {query}"
        ids = tokenizer(prompt)["input_ids"]
        first = [tokenizer(f"{prompt} {words[c]}")["input_ids"][len(ids)] for c in colours]
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
        mine, other = (first[0], first[1]) if query == colours[0] else (first[1], first[0])
        right += 0.5 if mine == other or logits[mine] == logits[other] else float(logits[mine] > logits[other])  # ties: half
    return right / trials


def _pairs(world: Path):
    """(PIL image, caption) from the webdataset pair shards, the caption in plain colour and size words.

    The pairs' own captions name colours and sizes in each writer's words (``text.WORDS``); the toy CLIP
    learns from what the picture shows, named one way (as a real CLIP is trained on its own data, not on the
    Flamingo mixture); trained on the writers' words it reads shapes less well (docs/toyworld.md).
    """
    shards = sorted(str(p) for p in (world / "pairs").glob("shard-*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        scene = Scene(**json.loads(sample["json"]))
        yield Image.open(io.BytesIO(sample["png"])).convert("RGB"), caption(scene)


def _clip_text(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ending in EOS (CLIP pools its text at the first EOS), padded with EOS: [N, max_length] x2."""
    eos = tokenizer.eos_token_id
    rows = [ids[: max_length - 1] + [eos] for ids in tokenizer(texts)["input_ids"]]
    input_ids = torch.full((len(rows), max_length), eos)
    attention_mask = torch.zeros(len(rows), max_length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def pretrain_clip(world: Path, out_dir: Path, tokenizer, sizes: BackboneSizes, seed: int = 0, progress: bool = True) -> dict:
    """Train a tiny ``CLIPModel`` contrastively on the toy pairs; save it (+ preprocessor config) to ``out_dir``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    transform = ImageTransform(size=IMAGE_SIZE, mean=TOY_MEAN, std=TOY_STD)
    images, texts = [], []
    for img, cap in _pairs(world):
        images.append(transform(img))
        texts.append(cap)
    pixels = torch.stack(images)
    input_ids, attention_mask = _clip_text(tokenizer, texts, max_length=24)
    h = sizes.clip_hidden
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=sizes.clip_layers, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=h,
    )
    device = _device()
    model = _for_training(CLIPModel(config), device)
    pixels, input_ids, attention_mask = pixels.to(device), input_ids.to(device), attention_mask.to(device)
    opt = _adamw(model, lr=2e-3, weight_decay=0.05)
    precision = _mixed_precision(device)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(sizes.clip_steps), desc="pretrain toy CLIP", disable=not progress)
    n = len(pixels)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, sizes.clip_steps, 2e-3, max(1, sizes.clip_steps // 20))
        idx = torch.randint(0, n, (sizes.clip_batch,), generator=gen).to(device)
        with precision:
            out = model(input_ids=input_ids[idx], attention_mask=attention_mask[idx], pixel_values=pixels[idx], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "size": {"shortest_edge": IMAGE_SIZE}, "image_mean": list(TOY_MEAN), "image_std": list(TOY_STD),
        "do_resize": True, "do_center_crop": True, "do_normalize": True, "resample": 3,
    }, indent=2))
    return {"final_loss": out.loss.item(), "params": sum(p.numel() for p in model.vision_model.parameters())}
