"""Workloads and timing shared by both sides of ``flamingo bench``.

This module imports only the standard library and torch, so the OpenFlamingo side runs it inside its
own environment (``openflamingo_side.py`` imports it as a plain module). A *side* is an object that
builds its model and returns callables for each workload (see :class:`Side`); everything that is timed
or measured is done here, the same way for both.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import time
from typing import Any, Callable, Protocol

import torch


class Side(Protocol):
    """What a benchmark side provides. Token ids are built by :func:`interleaved_ids` with its special ids."""

    media_token_id: int
    eoc_token_id: int

    def info(self) -> dict[str, Any]: ...
    def train_step(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]: ...
    def generate(self, input_ids: torch.Tensor, num_images: int, num_beams: int) -> Callable[[int], torch.Tensor]: ...
    def cross_attention(self, input_ids: torch.Tensor, num_images: int) -> Callable[[], None]: ...
    def vision(self, num_images: int) -> Callable[[], None]: ...


# ---- set-up ------------------------------------------------------------------------------------
def setup(spec: dict[str, Any]) -> torch.device:
    """Threads, denormals and seed, the same on both sides; returns the device."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.set_flush_denormal(True)  # random-init weights must not hit slow denormal paths on one side only
    torch.manual_seed(spec["seed"])
    return torch.device(spec["device"])


def autocast(spec: dict[str, Any]):
    """bf16 autocast when the preset asks for bf16, else nothing."""
    if spec["precision"] != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec["device"]).type, dtype=torch.bfloat16)


def random_pixels(num: int, spec: dict[str, Any], device: torch.device) -> torch.Tensor:
    """[num, 3, S, S] normalised-looking pixels."""
    size = spec["vision"]["image_size"]
    g = torch.Generator().manual_seed(spec["seed"] + num)
    return torch.randn(num, 3, size, size, generator=g).to(device)


def interleaved_ids(
    batch: int, length: int, num_images: int, *, media_id: int, eoc_id: int, vocab: int, seed: int, open_end: bool = False
) -> torch.Tensor:
    """[batch, length] token ids: ``num_images`` chunks ``<image> text... <|endofchunk|>`` of near-equal length.

    With ``open_end`` the last chunk has no ``<|endofchunk|>`` (a prompt whose answer is to be generated).
    Text ids are random in [3, vocab) (0..2 are left for bos/eos/unk).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    bounds = [round(i * length / num_images) for i in range(num_images + 1)]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end - start < 2:
            raise ValueError(f"{length} tokens are too few for {num_images} images")
        ids[:, start] = media_id
        if not (open_end and i == num_images - 1):
            ids[:, end - 1] = eoc_id
    return ids


def word_tokenizer(vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids (0 <unk>, 1 <s>, 2 </s>, then words).

    Both sides use it so that the LM keeps its stated vocabulary and the new special tokens follow it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ---- measuring ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call (device synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_median(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """``warmup`` untimed calls, then the seconds of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or the kernel's peak RSS (VmHWM) via /proc/self/clear_refs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        pass  # then the peak is the process's lifetime peak (ru_maxrss), reported as such


def peak_memory_mib(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: ``max_memory_allocated`` on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls/attention, as torch.utils.flop_counter counts them)."""
    from torch.utils import flop_counter

    # torch before 2.12 rejects grouped-query attention's fewer key/value heads ("query/key/value shapes are
    # incompatible"); count them as the kernel broadcasts them, as later torch does.
    query_index = {"sdpa_flop_count": 0, "sdpa_backward_flop_count": 1}  # (q, k, v) and (grad_out, q, k, v)
    saved = {name: getattr(flop_counter, name) for name in query_index}
    for name, count in saved.items():
        setattr(flop_counter, name, _broadcast_kv_heads(count, query_index[name]))
    counter = flop_counter.FlopCounterMode(display=False)
    # Its module tracker puts backward hooks on every module's inputs, which raise inside an autograd.grad run
    # during a forward (the fused head loss runs one per chunk): count for the whole call, without modules.
    counter.mod_tracker = _WholeCall()
    try:
        with counter:
            fn()
    finally:
        for name, count in saved.items():
            setattr(flop_counter, name, count)
    return int(counter.get_total_flops())


class _WholeCall(contextlib.nullcontext):
    """Stands in for FlopCounterMode's module tracker: every FLOP is counted under "Global" alone."""

    parents = ("Global",)


def _broadcast_kv_heads(count: Callable[..., int], query_index: int) -> Callable[..., int]:
    """``count(*shapes)`` with the key and value shapes (the two after the query's) given the query's heads."""

    def counted(*shapes):
        shapes = list(shapes)
        heads = shapes[query_index][1]
        for i in (query_index + 1, query_index + 2):
            shapes[i] = (shapes[i][0], heads, *shapes[i][2:])
        return count(*shapes)

    return counted


# ---- workloads ---------------------------------------------------------------------------------
def run_train(side: Side, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Median seconds of one training step (forward + backward + AdamW), tokens/s, peak memory."""
    b, length, n = spec["train_batch"], spec["train_seq_len"], spec["train_images_per_row"]
    ids = interleaved_ids(b, length, n, media_id=side.media_token_id, eoc_id=side.eoc_token_id,
                          vocab=spec["lm"]["vocab_size"], seed=spec["seed"]).to(device)
    step = side.train_step(ids, n)
    step()  # first step allocates the optimizer state: outside the peak of a steady step
    reset_peak_memory(device)
    base = current_rss_mib() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    times = time_median(step, device, spec["warmup"], spec["repeats"])
    out = {"times_s": times, "tokens": b * length, "images": b * n, "peak_mib": peak_memory_mib(device), "resident_before_mib": base}
    if device.type == "cuda":
        out["flops"] = count_flops(step)
    return out


def time_generation(side: Side, ids: torch.Tensor, num_images: int, num_beams: int, new: int, spec: dict[str, Any],
                    device: torch.device) -> dict[str, Any]:
    """Prefill seconds (generating 1 token) and total seconds (``new`` tokens, forced), interleaved, + peak memory."""
    generate = side.generate(ids, num_images, num_beams)
    generate(new)  # warm-up
    reset_peak_memory(device)
    prefill, total = [], []
    for _ in range(spec["repeats"]):
        prefill.append(time_call(lambda: generate(1), device))
        total.append(time_call(lambda: generate(new), device))
    peak = peak_memory_mib(device)
    made = generate(new).shape[1] - ids.shape[1]
    if made != new:
        raise RuntimeError(f"generation with {num_beams} beam(s) made {made} tokens, expected {new}")
    return {"num_beams": num_beams, "new_tokens": new, "prefill_s": prefill, "total_s": total, "peak_mib": peak}


def run_generate(side: Side, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Greedy and beam: prefill seconds (generate 1 token), total seconds (new_tokens), decode tokens/s."""
    n, new = spec["prompt_images"], spec["new_tokens"]
    ids = interleaved_ids(1, spec["prompt_len"], n, media_id=side.media_token_id, eoc_id=side.eoc_token_id,
                          vocab=spec["lm"]["vocab_size"], seed=spec["seed"] + 1, open_end=True).to(device)
    result: dict[str, Any] = {"prompt_tokens": ids.shape[1], "images": n, "new_tokens": new}
    for mode, beams in (("greedy", 1), ("beam", spec["num_beams"])):
        result[mode] = time_generation(side, ids, n, beams, new, spec, device)
    return result


def run_scaling(side: Side, spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per number of images n: prefill and decode of an n-shot prompt, and one xattn layer's cost per token."""
    rows = []
    new = spec["scaling_new_tokens"]
    for n in spec["scaling_images"]:
        ids = interleaved_ids(1, n * spec["tokens_per_shot"], n, media_id=side.media_token_id, eoc_id=side.eoc_token_id,
                              vocab=spec["lm"]["vocab_size"], seed=spec["seed"] + 2 + n, open_end=True).to(device)
        gen = time_generation(side, ids, n, 1, new, spec, device)
        xattn = time_median(side.cross_attention(ids, n), device, spec["warmup"], spec["repeats"])
        vision = time_median(side.vision(n), device, 0, spec["repeats"])  # warm from the generation above
        rows.append({"images": n, "prompt_tokens": ids.shape[1], "new_tokens": new, "prefill_s": gen["prefill_s"],
                     "total_s": gen["total_s"], "xattn_s": xattn, "vision_s": vision, "peak_mib": gen["peak_mib"]})
    return {"rows": rows}


WORKLOAD_RUNNERS = {"train": run_train, "generate": run_generate, "scaling": run_scaling}


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def worker_main(make_side: Callable[[dict[str, Any], torch.device], Side], argv: list[str] | None = None) -> int:
    """Entry point of a side's subprocess: ``--spec FILE --workload NAME --out FILE``; writes one JSON object."""
    parser = argparse.ArgumentParser(description="one side of flamingo bench (run by flamingo bench)")
    parser.add_argument("--spec", required=True, help="JSON file with the bench config")
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOAD_RUNNERS))
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    device = setup(spec)
    import_rss = current_rss_mib()  # torch loaded: builds differ (CUDA libraries), so peaks are also given above this
    build_start = time.perf_counter()
    side = make_side(spec, device)
    result = {"workload": args.workload, "build_s": time.perf_counter() - build_start, "info": side.info(),
              "env": environment(device), "import_rss_mib": import_rss}
    result.update(WORKLOAD_RUNNERS[args.workload](side, spec, device))
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values)

