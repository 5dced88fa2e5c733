"""``flamingo demo``: the whole pipeline on the built-in toy world, offline, on a laptop CPU.

1. build (or reuse from the cache) the toy world and its backbones: a tiny Llama-style LM and a tiny CLIP,
   trained here and loaded back with ``from_pretrained``;
2. train a Flamingo bridge on the mixture (interleaved documents + image-text pairs + video-text pairs)
   through the training pipeline, backbones frozen;
3. evaluate few-shot through the evaluation harness at 0, 4 and 8 shots: captioning (CIDEr), VQA,
   classification, video QA, and two held-out tasks that only the shots can teach;
4. print a table, write ``results.json`` and ``few_shot.png``, and show a few generations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import build_flamingo
from ..evaluation import Classification, CocoCaptioning, VideoQA, VQATask, evaluate, format_results_table, summarize
from .cache import SHIPPED, build_info, ensure_toyworld
from .tasks import LabelMappingTask, NewFormatTask

# The bridge trained by the demo (~0.7M parameters): small, so it trains in minutes on two cores.
BRIDGE = dict(
    resampler_depth=2, resampler_num_latents=16, resampler_heads=4, resampler_dim_head=32, resampler_ff_mult=2,
    xattn_heads=4, xattn_dim_head=32, xattn_ff_mult=2, cross_attn_every_n_layers=1, max_num_frames=8,
    # the toy CLIP's 8x8 patch features say little of where they are: without these, "where is it?" is guessed
    resampler_spatial_positions=64,
)


@dataclass
class DemoSettings:
    steps: int = 1800
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_steps: int = 200  # the rate is constant until the last decay_steps, then falls linearly to 0 (schedule wsd)
    interleaved_batch: int = 8
    interleaved_max_images: int = 9  # an 8-shot prompt holds 9 images: train on as many
    interleaved_max_tokens: int = 192
    # each step's documents, pairs and videos packed end to end in rows of this many tokens, one forward for all
    # (None: one padded batch per dataset); the same objective, ~25% less time a step (docs/toyworld.md "Time")
    pack_length: int | None = 192
    pairs_batch: int = 12
    video_batch: int = 4
    shots: tuple[int, ...] = (0, 4, 8)
    queries: int = 200  # per task (the held-out tasks need at least 200)
    vqa_queries: int = 600  # VQA's 0/1 answers need more to show a change of a few points (WorldSizes.vqa_queries)
    eval_batch_size: int = 32
    eval_seeds: int = 2  # shot samplings per setting (seed, seed + 1, ...): the table gives their mean
    # during training, every probe_every steps: the colour label mapping at the most shots on probe_queries
    # queries, to watch in-context learning appear (0: none; it leaves the training as it would be without)
    probe_every: int = 500
    probe_queries: int = 100

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(steps=600, decay_steps=100, queries=60, vqa_queries=60)

    @classmethod
    def tiny(cls) -> "DemoSettings":
        """For tests: a few steps and queries, end to end."""
        return cls(steps=6, warmup_steps=2, decay_steps=2, interleaved_batch=2, pairs_batch=2, video_batch=1, shots=(0, 2), queries=4, vqa_queries=4, eval_batch_size=4, eval_seeds=1,
                   probe_every=3, probe_queries=4)


def toy_tasks(world: Path) -> list:
    """The evaluation tasks, reading the toy world's files in the official benchmark formats. The held-out tasks
    come first: they are the quickest to score, so the demo's first numbers are on screen soon after training."""
    ev = world / "eval"
    scenes = str(ev / "heldout" / "scenes.json")
    return [
        # words bound to colours (the training mixture's naming documents bind colours: the format is trained,
        # the words are new), and to sizes, which no training document binds to a word (docs/toyworld.md)
        LabelMappingTask("label_mapping_colour", scenes_json=scenes, attribute="colour"),
        LabelMappingTask("heldout_label_mapping_size", scenes_json=scenes, attribute="size"),
        NewFormatTask("heldout_new_format", scenes_json=scenes),
        CocoCaptioning("captioning", ev / "coco" / "dataset_coco.json", ev / "coco", split="test", support_split="train", num_beams=3),
        VQATask(
            "vqa", ev / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json", ev / "vqa" / "v2_mscoco_val2014_annotations.json",
            ev / "vqa" / "images", ev / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json",
            ev / "vqa" / "v2_mscoco_train2014_annotations.json",
        ),
        Classification(
            "classification", ev / "classification" / "val.txt", ev / "classification" / "classnames.txt",
            image_root=ev / "classification", support_list_file=ev / "classification" / "train.txt",
            support_image_root=ev / "classification",
        ),
        VideoQA("video_qa", ev / "videoqa" / "test_qa.json", ev / "videoqa" / "videos", ev / "videoqa" / "train_qa.json"),
    ]


def training_probe(model, processor, task, *, shots: int, every: int, steps: int, queries: int, seed: int, batch_size: int,
                   start: float) -> Callable[[dict], None]:
    """A ``train`` callback that scores ``task`` at ``shots`` on ``queries`` queries every ``every`` steps (not at the
    last: the full evaluation follows) and prints it. The training goes on exactly as without it: the model's
    mode and torch's random state are put back, and evaluation keeps no gradient."""
    from tqdm.auto import tqdm

    def probe(record: dict) -> None:
        step = record["step"]
        if not every or step % every or step >= steps:
            return
        rng = torch.random.get_rng_state()
        model.eval()
        try:
            result = evaluate(model, processor, [task], shots=[shots], seeds=[seed], limit=queries, batch_size=batch_size, progress=False)
        finally:
            model.train()
            torch.random.set_rng_state(rng)
        [row] = result["summary"]
        tqdm.write(f"  step {step}: {task.name} at {shots} shots {row['mean']:.1f}% on {queries} queries (chance 50%)"
                   f"   ({time.time() - start:.0f} s)")

    return probe


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def lm_text_loss(model, processor, texts: list[str]) -> tuple[float, float]:
    """(Flamingo's, the bare LM's) mean token loss over the LM's own vocabulary on text-only inputs.

    Both from their logits through the same loss function, so equal logits give bit-equal losses.
    """
    from ..modeling import IGNORE_INDEX, causal_lm_loss

    enc = processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, processor.tokenizer.eos_token_id)
    labels = ids.masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    vocab = model.config.new_token_ids[0] if model.config.new_token_ids else None
    with torch.no_grad():
        logits = model(ids, enc["attention_mask"]).logits[..., :vocab]
        ours = causal_lm_loss(logits, labels).item()
        from transformers import AutoModelForCausalLM

        bare = AutoModelForCausalLM.from_pretrained(model.config.lm_name_or_path).eval()
        ref = causal_lm_loss(bare(input_ids=ids, attention_mask=enc["attention_mask"]).logits, labels).item()
    return ours, ref


def lm_is_unchanged(model) -> bool:
    """Whether every frozen LM weight equals, bit for bit, the cached backbone on disk."""
    from transformers import AutoModelForCausalLM

    cached = AutoModelForCausalLM.from_pretrained(model.config.lm_name_or_path).state_dict()
    ours = {k.replace(".decoder_layer.", ".").replace(".base.", "."): v for k, v in model.lm.state_dict().items()}
    return all(torch.equal(v, ours[k].cpu()) for k, v in cached.items() if k in ours) and set(cached) <= set(ours)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    tasks = list(dict.fromkeys(row["task"] for row in summary))  # in evaluation order
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = sorted((r for r in summary if r["task"] == task), key=lambda r: r["shots"])
        ax.errorbar([r["shots"] for r in rows], [r["mean"] for r in rows], yerr=[r.get("std") or 0 for r in rows], marker="o")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("shots")
        ax.set_ylabel(rows[0]["metric"])
        ax.set_xticks([r["shots"] for r in rows])
        ax.grid(alpha=0.3)
    fig.suptitle("Flamingo on the toy world: few-shot performance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples_text(results: dict, k: int = 3) -> str:
    lines, shown = [], set()
    for run in results["runs"]:
        if run["task"] in ("captioning", "vqa", "heldout_new_format") and run["shots"] == max(r["shots"] for r in results["runs"]):
            if run["task"] in shown:  # one shot sampling (seed) per task is enough to read
                continue
            shown.add(run["task"])
            lines.append(f"{run['task']} ({run['shots']}-shot):")
            for rec in run["predictions"][:k]:
                ref = rec["reference"]
                ref = ref[0] if isinstance(ref, list) else ref
                lines.append(f"  prediction: {rec['prediction']!r:45}  truth: {ref!r}")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "flamingo-demo", *, quick: bool = False, seed: int = 0, cache_dir: str | Path | None = None,
             settings: DemoSettings | None = None, world_preset: str | None = None, progress: bool = True, rebuild: bool = False) -> dict:
    """Run the whole demo; returns the results dict also written to ``out_dir/results.json``.

    rebuild: generate the world and pretrain the toy backbones here even where the package ships them.
    """
    from ..training import DatasetConfig, TrainConfig, train

    _quiet_transformers()
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    paths = ensure_toyworld(cache_dir, preset=world_preset or ("quick" if quick else "full"), progress=progress, rebuild=rebuild)
    world = paths["world"]
    built = time.time()
    shipped = paths["lm"].parent == SHIPPED
    print(f"toy backbones: {'shipped with the package' if shipped else 'pretrained here'} ({paths['lm'].parent}); world: {world}")
    lm_info = build_info(paths["lm"])
    if "text_binding_accuracy" in lm_info:  # the label-mapping task needs the LM to look words up in its context
        print(f"toy LM: in-context binding in text {100 * lm_info['text_binding_accuracy']:.0f}% (chance 50%)")

    torch.manual_seed(seed)
    model, processor = build_flamingo(str(paths["lm"]), str(paths["clip"]), **BRIDGE)
    corpus = (world / "text" / "lm_corpus.txt").read_text().split("\n\n")[:8]
    init_loss, lm_loss = lm_text_loss(model, processor, corpus)
    print(f"bridge: {sum(p.numel() for _, p in model.trainable_parameters()):,} trainable parameters; "
          f"at initialisation the text loss is {init_loss:.6f} (the LM alone: {lm_loss:.6f})")

    shards = lambda name: [str(p) for p in sorted((world / name).glob("shard-*.tar"))]  # noqa: E731
    config = TrainConfig(
        datasets=[
            DatasetConfig(name="interleaved", format="mmc4", paths=shards("interleaved"), batch_size=settings.interleaved_batch,
                          loss_weight=1.0, max_tokens=settings.interleaved_max_tokens, max_images=settings.interleaved_max_images),
            DatasetConfig(name="pairs", format="pairs", paths=shards("pairs"), batch_size=settings.pairs_batch, loss_weight=0.2, max_tokens=32),
            DatasetConfig(name="video", format="video", paths=shards("videos"), batch_size=settings.video_batch, loss_weight=0.1,
                          max_tokens=32, num_frames=8),
        ],
        steps=settings.steps, lr=settings.lr, warmup_steps=settings.warmup_steps, weight_decay=0.0, output_dir=str(out / "train"),
        schedule="wsd", decay_steps=settings.decay_steps,  # a decay at the end, after the skills form (docs/toyworld.md "Time")
        gate_lr_multiplier=10.0,  # minutes of training, not 500k steps: the gates must open faster
        checkpoint_every=settings.steps, seed=seed, pack_length=settings.pack_length,
        cache_vision_features=True,  # 3.6 epochs of the documents, ~6 of the videos: each frame is encoded once
    )
    tasks = toy_tasks(world)
    colour_mapping = next(t for t in tasks if t.name == "label_mapping_colour")
    probe = training_probe(model, processor, colour_mapping, shots=max(settings.shots), every=settings.probe_every, steps=settings.steps,
                           queries=settings.probe_queries, seed=seed, batch_size=settings.eval_batch_size, start=start)
    trained = train(model, processor, config, progress=progress, callback=probe)
    unchanged = lm_is_unchanged(model)
    print(f"trained {settings.steps} steps; LM weights bit-identical to the cached backbone: {'yes' if unchanged else 'NO'}")
    model.save_pretrained(out / "model", training=config.to_dict())  # the model card names the toy-world training
    processor.save_pretrained(out / "model")
    trained_at = time.time()

    limits = {t.name: settings.vqa_queries if t.name == "vqa" else settings.queries for t in tasks}
    runs_per_task = len(settings.shots) * settings.eval_seeds

    def show_task(run: dict, results: dict) -> None:
        """A task's main metric as soon as its last run is scored: the first numbers come before the last task."""
        mine = sorted((s for s in summarize(results["runs"]) if s["task"] == run["task"]), key=lambda s: s["shots"])
        if sum(len(s["seeds"]) for s in mine) == runs_per_task:
            cells = "".join(f"{s['mean']:>10.2f}" if s["mean"] is not None else f"{'n/a':>10}" for s in mine)
            print(f"  {run['task']:<28}{mine[0]['metric']:<14}{cells}   ({time.time() - start:.0f} s)", flush=True)

    header = "".join(f"{f'{n}-shot':>10}" for n in settings.shots)
    print(f"few-shot evaluation, mean over {settings.eval_seeds} shot samplings:\n  {'task':<28}{'metric':<14}{header}")
    results = evaluate(
        model, processor, tasks, shots=list(settings.shots), seeds=[seed + i for i in range(settings.eval_seeds)], limit=limits,
        batch_size=settings.eval_batch_size, results_path=out / "eval.json", resume=False, progress=False,
        model_name="flamingo-toyworld", config={"bridge": BRIDGE, "demo": asdict(settings)}, on_run=show_task,
    )
    table = format_results_table(results)
    print("\n" + table + "\n")
    print(examples_text(results))
    plot_curves(results, out / "few_shot.png")
    summary = {
        "seed": seed, "quick": quick, "settings": asdict(settings), "bridge": BRIDGE, "backbones": "shipped" if shipped else "pretrained here",
        "init_text_loss": init_loss, "lm_text_loss": lm_loss, "lm_unchanged": unchanged,
        "lm_text_binding_accuracy": lm_info.get("text_binding_accuracy"),
        "train": {"final": trained.history[-1] if trained.history else None, "losses": [h["loss"] for h in trained.history]},
        "seconds": {"backbones": built - start, "train": trained_at - built, "eval": time.time() - trained_at, "total": time.time() - start},
        "summary": results["summary"],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.txt").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'few_shot.png'} ({summary['seconds']['total'] / 60:.1f} min)")
    return summary
