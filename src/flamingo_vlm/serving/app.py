"""The HTTP API and web page of ``flamingo serve``, as a FastAPI app around one loaded model.

    POST /v1/generate   interleaved prompt + generation parameters -> {"text", "timings", ...}
    POST /v1/score      interleaved prompt + candidate answers -> candidates ranked by log-likelihood
    GET  /v1/model      backbones, config, limits;  GET /healthz;  GET /v1/presets (example prompts, if given)
    GET  /              the web page

Every client error is a JSON ``{"error": {"status", "message"}}`` with a 4xx status; the model runs in one
worker thread behind a :class:`~flamingo_vlm.serving.batching.Batcher`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..inference import rank_scores
from .batching import BatchInfo, Batcher
from .errors import RequestError, too_large
from .prompts import PromptReader
from .runner import SCORE_KEY, ModelRunner, generation_key
from .schemas import GenerateRequest, Limits, ScoreRequest, parse_json, validate


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is over ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(f"the request body is {int(declared):,} bytes, over the server's limit of {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"the request body is over the server's limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _timings(start: float, info: BatchInfo) -> dict:
    total = time.perf_counter() - start
    return {
        "total_ms": round(total * 1000, 2), "queue_ms": round(info.queue_s * 1000, 2),
        "model_ms": round(info.compute_s * 1000, 2), "batch_size": info.batch_size,
    }


def _cut_at_stops(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def create_app(model, processor, *, limits: Limits | None = None, max_batch_size: int = 8, max_wait_ms: float = 10.0,
               model_name: str | None = None, presets: Callable[[], list[dict]] | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a :class:`FlamingoModel`) with its ``processor``.

    presets: makes the web page's example prompts, ``[{name, description, examples: [{image, text}], query:
    {image, text}, answer}]`` with images as data URLs (e.g. :func:`flamingo_vlm.toyworld.presets.toy_presets`);
    called once, on the first request for them. None: the page offers none.
    """
    limits = limits or Limits()
    config = model.config
    lm_config = getattr(model.lm, "config", None)
    reader = PromptReader(processor, limits, max_positions=getattr(lm_config, "max_position_embeddings", None))
    batcher = Batcher(ModelRunner(model, processor), max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000, max_queue=limits.max_queue)
    request_ids = itertools.count(1)  # a seeded sampling request's own batch key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="flamingo-vlm", summary="Few-shot interleaved image/video + text prompting of a Flamingo model", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: same JSON shape
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).to_json(), status_code=exc.status_code)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:  # raised by the model path on bad input
        return JSONResponse(RequestError(422, str(exc)).to_json(), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # logged by the server; it keeps serving
        return JSONResponse(RequestError(500, f"internal error: {type(exc).__name__}: {exc}").to_json(), status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "waiting": batcher.waiting, "batches_run": batcher.batches_run, "requests_run": batcher.requests_run}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return {
            "name": model_name or "flamingo",
            "lm": config.lm_name_or_path, "vision": config.vision_name_or_path, "vision_type": config.vision_type,
            "image_size": processor.image_transform.size, "device": str(model.device),
            "trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters()),
            "config": config.to_dict(), "limits": asdict(limits),
            "batching": {"max_batch_size": batcher.max_batch_size, "max_wait_ms": max_wait_ms},
        }

    preset_list: list[list[dict]] = []  # filled on first use: making them may take a while

    def cached_presets() -> list[dict]:
        if not preset_list:
            preset_list.append(presets() if presets is not None else [])
        return preset_list[0]

    @app.get("/v1/presets")
    async def get_presets() -> list[dict]:
        return await run_in_threadpool(cached_presets)

    @app.post("/v1/generate")
    async def generate(request: Request) -> dict:
        start = time.perf_counter()
        req: GenerateRequest = validate(GenerateRequest, parse_json(await read_body(request, limits.max_body_bytes)))
        req.check_limits(limits)
        prompt = await run_in_threadpool(reader.read, req, new_tokens=req.max_new_tokens)
        kwargs = req.generate_kwargs()
        text, info = await batcher.submit(generation_key(kwargs, req.seed, next(request_ids)), prompt.items)
        return {"text": _cut_at_stops(text, req.stop).strip(), "prompt_tokens": prompt.num_tokens, "media": prompt.num_media,
                "timings": _timings(start, info)}

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        start = time.perf_counter()
        req: ScoreRequest = validate(ScoreRequest, parse_json(await read_body(request, limits.max_body_bytes)))
        req.check_limits(limits)
        longest = max(await run_in_threadpool(reader.count_tokens, req.candidates))
        prompt = await run_in_threadpool(reader.read, req, new_tokens=longest)
        (total, count), info = await batcher.submit(SCORE_KEY, (prompt.items, req.candidates))
        scores = rank_scores([(total, count)], req.length_normalize)[0]
        ranked = sorted(
            ({"text": c, "score": s, "log_likelihood": t, "num_tokens": n}
             for c, s, t, n in zip(req.candidates, scores.tolist(), total.tolist(), count.tolist())),
            key=lambda r: -r["score"],
        )
        return {"best": ranked[0]["text"], "candidates": ranked, "prompt_tokens": prompt.num_tokens, "media": prompt.num_media,
                "timings": _timings(start, info)}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    return app

