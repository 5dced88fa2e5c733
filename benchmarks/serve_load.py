"""Load test of ``flamingo serve`` on loopback: N requests from C concurrent clients; throughput and latency.

    python benchmarks/serve_load.py --model flamingo-demo/model            # the toy-world model
    python benchmarks/serve_load.py --tiny --max-batch-size 8,1            # a tiny random model; batched vs not

For each ``--max-batch-size`` it starts ``flamingo serve`` in a subprocess on a free port, sends warm-up
requests, then ``--requests`` few-shot toy-world prompts (two shots + a query, captioning and VQA, each
request with its own rendered scenes) from ``--concurrency`` client threads, and prints a table row:
throughput, p50/p95/max latency, mean batch size. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from flamingo_vlm.toyworld.presets import png_data_url
from flamingo_vlm.toyworld.text import caption, question
from flamingo_vlm.toyworld.world import render_scene, sample_scene

EOC = "<|endofchunk|>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(directory: Path) -> Path:
    """A tiny random-init Flamingo saved with save_pretrained (backbones beside it)."""
    import torch

    import transformers

    from flamingo_vlm import build_flamingo
    from flamingo_vlm.tiny import create_tiny_backbones

    transformers.utils.logging.disable_progress_bar()

    lm, vision = create_tiny_backbones(directory / "backbones")
    torch.manual_seed(0)
    model, processor = build_flamingo(lm, vision, cross_attn_every_n_layers=1)
    model.save_pretrained(directory / "model")
    processor.save_pretrained(directory / "model")
    return directory / "model"


def toy_request(rng: random.Random, *, shots: int, max_new_tokens: int, num_beams: int) -> dict:
    """A few-shot prompt of fresh toy-world scenes: captioning or a colour/shape question."""
    kind = rng.choice(("caption", "colour", "shape"))
    items = []
    scenes = [sample_scene(rng) for _ in range(shots + 1)]
    for i, scene in enumerate(scenes):
        prompt, answer = ("Output:", caption(scene)) if kind == "caption" else (
            f"Question: {question(scene, kind)[0]} Answer:", question(scene, kind)[1])
        items.append({"image": png_data_url(render_scene(scene))})
        items.append({"text": f"{prompt} {answer}{EOC}" if i < shots else prompt})
    return {"prompt": items, "max_new_tokens": max_new_tokens, "num_beams": num_beams}


def start_server(model_dir: Path, port: int, max_batch_size: int, max_wait_ms: float, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flamingo_vlm.cli", "serve", str(model_dir), "--port", str(port), "--log-level", "warning",
           "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)]
    with open(log, "w") as f:  # a file, not a pipe nobody reads (a full pipe would block the server)
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /healthz within {timeout:.0f} s")


def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body once from ``concurrency`` threads; latency per request, errors, wall time."""
    latencies, batch_sizes, errors = [], [], []
    lock, next_index = threading.Lock(), iter(range(len(bodies)))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    r = http.post(url + "/v1/generate", json=bodies[i])
                    elapsed = time.perf_counter() - start
                    ok = r.status_code == 200
                    with lock:
                        if ok:
                            latencies.append(elapsed)
                            batch_sizes.append(r.json()["timings"]["batch_size"])
                        else:
                            errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    pct = lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))] if ms else float("nan")  # noqa: E731
    return {
        "requests": len(bodies), "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(pct(0.5), 1), "p95_ms": round(pct(0.95), 1), "max_ms": round(ms[-1], 1) if ms else None,
        "mean_batch_size": round(statistics.mean(batch_sizes), 2) if batch_sizes else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a saved model directory (e.g. flamingo-demo/model from `flamingo demo`)")
    src.add_argument("--tiny", action="store_true", help="a tiny random-init model (no training needed)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch-size", default="8", help="comma-separated: one server run per value")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_model_dir(Path(tmp))
        rng = random.Random(args.seed)
        bodies = [toy_request(rng, shots=args.shots, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
                  for _ in range(args.requests)]
        results = []
        for size in [int(x) for x in args.max_batch_size.split(",")]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = Path(tmp) / f"server-{size}.log"
            proc = start_server(model_dir, port, size, args.max_wait_ms, log)
            try:
                wait_ready(url, proc, log)
                run_load(url, bodies[: 2 * args.concurrency], args.concurrency)  # warm-up: first calls, allocator
                result = {"max_batch_size": size, "max_wait_ms": args.max_wait_ms, "concurrency": args.concurrency, **run_load(url, bodies, args.concurrency)}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            results.append(result)

    print(f"model: {args.model or 'tiny random-init'}; {args.requests} requests from {args.concurrency} clients; "
          f"{args.shots} shots + query per prompt; max_new_tokens={args.max_new_tokens}, num_beams={args.num_beams}\n")
    print("| max batch | requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) | max (ms) | mean batch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['max_batch_size']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['max_ms']} | {r['mean_batch_size']} |")
        for e in r["error_samples"]:
            print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
