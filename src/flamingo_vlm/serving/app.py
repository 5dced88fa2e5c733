"""The HTTP API and web page of ``flamingo serve``, as a FastAPI app around one loaded model.

    POST /v1/generate   interleaved prompt + generation parameters -> {"text", "timings", ...}
    POST /v1/score      interleaved prompt + candidate answers -> candidates ranked by log-likelihood
    GET  /v1/model      backbones, config, limits;  GET /healthz;  GET /v1/presets (example prompts, if given)
    GET  /              the web page

Every client error is a JSON ``{"error": {"status", "message"}}`` with a 4xx status; a server error is a 500
whose message holds no exception text (that goes to the log, under the id the message gives). The model runs
in one worker thread behind a :class:`~flamingo_vlm.serving.batching.Batcher`; media are decoded in request
threads under the memory and decoding budgets of :mod:`flamingo_vlm.serving.budget`. ``/docs`` (Swagger UI)
is served from files installed with the package (``swagger-ui-bundle``): it works offline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..inference import rank_scores
from .batching import BatchInfo, Batcher
from .budget import DecodeSlots, MemoryBudget
from .errors import RequestError, too_large
from .prompts import PromptReader
from .runner import SCORE_KEY, ModelRunner, generation_key
from .schemas import GenerateRequest, Limits, ScoreRequest, parse_json, validate


log = logging.getLogger("flamingo_vlm.serving")


@asynccontextmanager
async def _timeout(seconds: float | None):
    """``asyncio.timeout`` (Python 3.11+: no task per chunk), or ``wait_for``'s cancellation on 3.10."""
    if seconds is None:
        yield
    elif hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            yield
    else:  # Python 3.10
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        handle = loop.call_later(seconds, task.cancel)
        try:
            yield
        except asyncio.CancelledError:
            raise TimeoutError from None
        finally:
            handle.cancel()


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is over ``max_bytes`` (declared or streamed), and with
    408 when the client stalls over ``timeout_s`` seconds between chunks (the connection is then closed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(f"the request body is {int(declared):,} bytes, over the server's limit of {max_bytes:,}")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            async with _timeout(timeout_s):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestError(408, f"the request body stalled: nothing received for {timeout_s:g} s") from None
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


def public_name(name: Any) -> Any:
    """A backbone or model location as the API shows it: a local path by its last part only (no filesystem
    layout leaves the server); a hub name (``org/name``) as it is."""
    if isinstance(name, str) and (os.path.isabs(name) or os.path.exists(name)):
        return Path(name).name
    return name


def _json_body(model: Any) -> dict:
    """OpenAPI ``requestBody`` of a route that reads its JSON itself (to parse it strictly)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


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
    # Large frames take turns decoding (two of the largest at once), small ones fit beside them.
    slots = DecodeSlots(2 * limits.max_image_pixels + 2**22)
    budget = MemoryBudget(limits.decode_budget_bytes, wait_s=limits.decode_wait_s)
    reader = PromptReader(processor, limits, max_positions=getattr(lm_config, "max_position_embeddings", None), decode_slots=slots)
    batcher = Batcher(ModelRunner(model, processor), max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000, max_queue=limits.max_queue)
    request_ids = itertools.count(1)  # a seeded sampling request's own batch key
    error_ids = itertools.count(1)  # what a 500's message and its log line share

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="flamingo-vlm", summary="Few-shot interleaved image/video + text prompting of a Flamingo model", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.budget = budget

    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="flamingo-vlm API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"Connection": "close"} if exc.status == 408 else None  # the stalled body is never read
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: same JSON shape
        return JSONResponse(RequestError(exc.status_code, str(exc.detail)).to_json(), status_code=exc.status_code)

    # Exception text may hold paths, tensor shapes or library internals: it goes to the log, not to the client.
    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:  # raised by the model path on bad input
        n = next(error_ids)
        log.error("request error %d (%s %s): %s", n, request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse(RequestError(422, f"the model could not run this request (error {n} in the server log)").to_json(),
                            status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # the server keeps serving
        n = next(error_ids)
        log.error("internal error %d (%s %s)", n, request.method, request.url.path, exc_info=exc)
        return JSONResponse(RequestError(500, f"internal error {n} (details in the server log)").to_json(), status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "waiting": batcher.waiting, "batches_run": batcher.batches_run, "requests_run": batcher.requests_run}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return {
            "name": public_name(model_name) or "flamingo",
            "lm": public_name(config.lm_name_or_path), "vision": public_name(config.vision_name_or_path), "vision_type": config.vision_type,
            "image_size": processor.image_transform.size, "device": str(model.device),
            "trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters()),
            "config": {k: public_name(v) if k.endswith("name_or_path") else v for k, v in config.to_dict().items()},
            "limits": asdict(limits),
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

    async def read_request(request: Request, model: Any) -> Any:
        req = validate(model, parse_json(await read_body(request, limits.max_body_bytes, limits.body_timeout_s)))
        req.check_limits(limits)
        return req

    @app.post("/v1/generate", openapi_extra=_json_body(GenerateRequest))
    async def generate(request: Request) -> dict:
        start = time.perf_counter()
        req: GenerateRequest = await read_request(request, GenerateRequest)
        plan = await run_in_threadpool(reader.plan, req, new_tokens=req.max_new_tokens)
        async with budget.reserve(plan.cost_bytes):  # held until the answer: the decoded frames live until then
            prompt = await run_in_threadpool(reader.decode, plan)
            kwargs = req.generate_kwargs()
            text, info = await batcher.submit(generation_key(kwargs, req.seed, next(request_ids)), prompt.items)
        return {"text": _cut_at_stops(text, req.stop).strip(), "prompt_tokens": prompt.num_tokens, "media": prompt.num_media,
                "timings": _timings(start, info)}

    @app.post("/v1/score", openapi_extra=_json_body(ScoreRequest))
    async def score(request: Request) -> dict:
        start = time.perf_counter()
        req: ScoreRequest = await read_request(request, ScoreRequest)
        reader.check_candidates(req.candidates)
        longest = max(await run_in_threadpool(reader.count_tokens, req.candidates))
        plan = await run_in_threadpool(reader.plan, req, new_tokens=longest)
        async with budget.reserve(plan.cost_bytes):
            prompt = await run_in_threadpool(reader.decode, plan)
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

