"""Run both sides of ``flamingo bench`` as subprocesses (interleaved), aggregate medians, print and save.

Each (side, workload) runs in a fresh process, so peak memory is that workload's alone; the sides
alternate (ours, peer, ours, peer, ...) so that load from other processes on a shared machine hits both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

from .spec import BenchConfig

PEER_SCRIPT = Path(__file__).with_name("openflamingo_side.py")
# Dense bf16 peak of common accelerators (TFLOP/s), for MFU when the preset gives no peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def _side_command(side: str, peer_python: str | None) -> list[str]:
    if side == "ours":
        return [sys.executable, "-m", "flamingo_vlm.benchmark.ours"]
    return [peer_python, str(PEER_SCRIPT)]


def run_side(side: str, workload: str, spec: dict[str, Any], peer_python: str | None, workdir: Path) -> dict[str, Any]:
    """One subprocess: build ``side``'s model, run ``workload``, return its JSON result."""
    spec_file, out_file = workdir / "spec.json", workdir / f"{side}-{workload}.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    cmd = _side_command(side, peer_python) + ["--spec", str(spec_file), "--workload", workload, "--out", str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"bench side {side!r} failed on {workload!r} (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


def run_bench(
    config: BenchConfig,
    *,
    peer_python: str | None = None,
    log: Callable[[str], None] = print,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every workload of ``config`` on our side (and on OpenFlamingo's when ``peer_python`` is given).

    Returns {"config", "runs": {side: {workload: [run, ...]}}, "summary": {...}}. ``on_run`` gets the
    runs so far after each subprocess (to save partial results of a long benchmark).
    """
    sides = ["ours"] + (["openflamingo"] if peer_python else [])
    if peer_python and not Path(peer_python).exists():
        raise FileNotFoundError(f"--peer-python {peer_python} does not exist (make OpenFlamingo's environment first)")
    spec = config.to_dict()
    spec.setdefault("cache_dir", os.environ.get("FLAMINGO_BENCH_CACHE") or str(Path.home() / ".cache" / "flamingo-vlm" / "bench"))
    runs: dict[str, dict[str, list]] = {s: {w: [] for w in config.workloads} for s in sides}
    with tempfile.TemporaryDirectory(prefix="flamingo-bench-") as tmp:
        for workload in config.workloads:
            for r in range(config.rounds):
                for side in sides:
                    start = time.perf_counter()
                    runs[side][workload].append(run_side(side, workload, spec, peer_python, Path(tmp)))
                    log(f"{side:>12} {workload:<9} round {r + 1}/{config.rounds}: {time.perf_counter() - start:.1f} s")
                    if on_run is not None:
                        on_run({"config": spec, "runs": runs, "partial": True})
    return {"config": spec, "runs": runs, "summary": summarize(runs, config)}


# ---- aggregation ------------------------------------------------------------------------------
def _all(runs: list[dict], get: Callable[[dict], list[float]]) -> list[float]:
    return [x for run in runs for x in get(run)]


def _decode_rate(runs: list[dict], new_tokens: int) -> float | None:
    """Tokens/s past the first: (new - 1) / median over back-to-back pairs of (total - prefill) seconds."""
    decode = median(t - p for run in runs for p, t in zip(run["prefill_s"], run["total_s"]))
    return (new_tokens - 1) / decode if decode > 0 else None  # None: lost in the noise of the prefill


def _memory(runs: list[dict], get: Callable[[dict], float]) -> dict[str, float]:
    """Median peak over runs, absolute and above the process's RSS once torch was imported (CPU)."""
    peak = median(get(run) for run in runs)
    above = median(get(run) - run.get("import_rss_mib", 0.0) for run in runs)
    return {"peak_mib": peak, "peak_above_import_mib": above}


def summarize_side(side_runs: dict[str, list[dict]], config: BenchConfig) -> dict[str, Any]:
    """Medians of one side's runs: train step, generation (prefill / decode) and scaling rows."""
    out: dict[str, Any] = {}
    if side_runs.get("train"):
        runs = side_runs["train"]
        step = median(_all(runs, lambda r: r["times_s"]))
        out["train"] = {"step_s": step, "tokens_per_s": runs[0]["tokens"] / step, **_memory(runs, lambda r: r["peak_mib"])}
        if "flops" in runs[0]:
            out["train"]["flops"] = runs[0]["flops"]
    if side_runs.get("generate"):
        runs = side_runs["generate"]
        new = runs[0]["new_tokens"]
        out["generate"] = {}
        for mode in ("greedy", "beam"):
            out["generate"][mode] = {
                "prefill_s": median(_all(runs, lambda r: r[mode]["prefill_s"])),
                "total_s": median(_all(runs, lambda r: r[mode]["total_s"])),
                "decode_tokens_per_s": _decode_rate([r[mode] for r in runs], new),
                **_memory(runs, lambda r: r[mode]["peak_mib"]),
            }
    if side_runs.get("scaling"):
        runs = side_runs["scaling"]
        rows = []
        for i, first in enumerate(runs[0]["rows"]):
            pick = [run["rows"][i] for run in runs]
            xattn = median(_all(pick, lambda r: r["xattn_s"]))
            rows.append({
                "images": first["images"], "prompt_tokens": first["prompt_tokens"],
                "prefill_s": median(_all(pick, lambda r: r["prefill_s"])),
                "decode_tokens_per_s": _decode_rate(pick, first["new_tokens"]),
                "xattn_us_per_token": 1e6 * xattn / first["prompt_tokens"],
                "vision_s": median(_all(pick, lambda r: r["vision_s"])),
                "peak_mib": median(r["peak_mib"] for r in pick),
            })
        out["scaling"] = rows
    first_run = next(iter(r for runs in side_runs.values() for r in runs), None)
    if first_run:
        out["info"], out["env"] = first_run["info"], first_run["env"]
    return out


def _peak_tflops(config: BenchConfig, env: dict[str, Any]) -> float | None:
    if config.peak_tflops:
        return config.peak_tflops
    gpu = env.get("gpu", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None) if config.precision == "bf16" else None


def summarize(runs: dict[str, dict[str, list]], config: BenchConfig) -> dict[str, Any]:
    """Per side medians; with both sides, ratios (speed-up = OpenFlamingo time / ours; memory = ours / theirs)."""
    summary: dict[str, Any] = {side: summarize_side(side_runs, config) for side, side_runs in runs.items()}
    ours = summary["ours"]
    # MFU: the model FLOPs of our step (the routed attention: no FLOPs spent on masked-out images), for both sides.
    if "train" in ours and "flops" in ours["train"]:
        peak = _peak_tflops(config, ours["env"])
        if peak:
            for side in summary.values():
                if "train" in side:
                    side["train"]["mfu"] = ours["train"]["flops"] / side["train"]["step_s"] / (peak * 1e12)
    peer = summary.get("openflamingo")
    if peer:
        summary["ratios"] = ratios(ours, peer)
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if "train" in ours:
        r["train_speedup"] = peer["train"]["step_s"] / ours["train"]["step_s"]
        r["train_memory"] = ours["train"]["peak_above_import_mib"] / peer["train"]["peak_above_import_mib"]
    if "generate" in ours:
        for mode in ("greedy", "beam"):
            o, p = ours["generate"][mode], peer["generate"][mode]
            r[f"{mode}_total_speedup"] = p["total_s"] / o["total_s"]
            r[f"{mode}_prefill_speedup"] = p["prefill_s"] / o["prefill_s"]
            r[f"{mode}_decode_speedup"] = _ratio(o["decode_tokens_per_s"], p["decode_tokens_per_s"])
            r[f"{mode}_memory"] = o["peak_above_import_mib"] / p["peak_above_import_mib"]
    if "scaling" in ours:
        r["scaling"] = [
            {"images": o["images"], "prefill_speedup": p["prefill_s"] / o["prefill_s"],
             "decode_speedup": _ratio(o["decode_tokens_per_s"], p["decode_tokens_per_s"]),
             "xattn_speedup": p["xattn_us_per_token"] / o["xattn_us_per_token"]}
            for o, p in zip(ours["scaling"], peer["scaling"])
        ]
    return r


# ---- report -----------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    return f"{x:.3g}{unit}"


def table(result: dict[str, Any]) -> str:
    """A Markdown table: metric | ours | OpenFlamingo | ratio."""
    s = result["summary"]
    ours, peer = s["ours"], s.get("openflamingo")
    rows: list[tuple[str, float | None, float | None, float | None]] = []

    def add(label: str, get: Callable[[dict], float], kind: str = "time") -> None:
        """kind "time": ratio = theirs / ours (speed-up); "rate" and "memory": ours / theirs."""
        o, p = get(ours), get(peer) if peer else None
        rows.append((label, o, p, _ratio(p, o) if kind == "time" else _ratio(o, p)))

    if "train" in ours:
        add("train step (s)", lambda x: x["train"]["step_s"])
        add("train tokens/s", lambda x: x["train"]["tokens_per_s"], "rate")
        add("train peak memory (MiB)", lambda x: x["train"]["peak_mib"], "memory")
        add("train peak above torch import (MiB)", lambda x: x["train"]["peak_above_import_mib"], "memory")
        if "mfu" in ours["train"]:
            add("train MFU", lambda x: x["train"]["mfu"], "rate")
    if "generate" in ours:
        for mode in ("greedy", "beam"):
            add(f"{mode}: prefill (s)", lambda x, m=mode: x["generate"][m]["prefill_s"])
            add(f"{mode}: total, all new tokens (s)", lambda x, m=mode: x["generate"][m]["total_s"])
            add(f"{mode}: decode tokens/s", lambda x, m=mode: x["generate"][m]["decode_tokens_per_s"], "rate")
            add(f"{mode}: peak above torch import (MiB)", lambda x, m=mode: x["generate"][m]["peak_above_import_mib"], "memory")
    if "scaling" in ours:
        for i, row in enumerate(ours["scaling"]):
            n = row["images"]
            add(f"{n} images: prefill (s)", lambda x, i=i: x["scaling"][i]["prefill_s"])
            add(f"{n} images: decode tokens/s", lambda x, i=i: x["scaling"][i]["decode_tokens_per_s"], "rate")
            add(f"{n} images: xattn us/token (1 layer)", lambda x, i=i: x["scaling"][i]["xattn_us_per_token"])
            add(f"{n} images: vision+resampler (s)", lambda x, i=i: x["scaling"][i]["vision_s"])
    head = "| metric | ours | OpenFlamingo | ratio |\n|---|---:|---:|---:|"
    body = "\n".join(f"| {label} | {_fmt(o)} | {_fmt(p)} | {_fmt(r, 'x')} |" for label, o, p, r in rows)
    return f"{head}\n{body}"


def write_result(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """results JSON at ``out`` (a .json path, or a directory that gets <name>.json)."""
    path = Path(out)
    if path.suffix != ".json":
        path = path / f"{result['config']['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
