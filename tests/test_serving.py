"""The HTTP API of ``flamingo serve`` on a tiny model: generation and scoring equal the library's, concurrent
requests are batched with results equal to one-at-a-time, and every bad input gets its 4xx and message."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from helpers import BLUE, GREEN, RED, WHITE, image
from serving_fixtures import TEST_LIMITS, b64, data_url, png_bytes, tiny_model

from flamingo_vlm.cli import main
from flamingo_vlm.evaluation import candidate_log_likelihoods, generate_texts
from flamingo_vlm.serving import Batcher, create_app
from flamingo_vlm.toyworld.presets import toy_presets

EOC = "<|endofchunk|>"


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model()


@pytest.fixture(scope="module")
def client(model_and_processor):
    with TestClient(create_app(*model_and_processor, limits=TEST_LIMITS, max_wait_ms=1, presets=toy_presets)) as c:
        yield c


def _prompts():
    """Interleaved prompts as PIL items (for the library) and as API items (for the server)."""
    red, blue, green, white = image(RED), image(BLUE), image(GREEN), image(WHITE)
    prompts = [
        [red, f"Output: a red circle.{EOC}", blue, f"Output: a blue square.{EOC}", white, "Output:"],
        [green, "Question: what colour? Answer:"],  # short: left-padded when batched with the others
        ["the dog runs.", red, "Output:"],
        [blue, "Output:"],
    ]
    return prompts, [[{"text": x} if isinstance(x, str) else {"image": data_url(x)} for x in p] for p in prompts]


def test_generate_equals_the_library(client, model_and_processor):
    model, processor = model_and_processor
    prompts, api = _prompts()
    for prompt, items in zip(prompts[:2], api[:2]):
        r = client.post("/v1/generate", json={"prompt": items, "max_new_tokens": 6, "num_beams": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == generate_texts(model, processor, [prompt], max_new_tokens=6, num_beams=2)[0].strip()
        assert body["media"] == sum(not isinstance(x, str) for x in prompt)
        assert {"total_ms", "queue_ms", "model_ms", "batch_size"} <= set(body["timings"])


def test_placeholder_form_equals_interleaved_form(client):
    red, blue = image(RED), image(BLUE)
    interleaved = client.post("/v1/generate", json={"prompt": [{"image": b64(red)}, {"text": f"Output: red{EOC}"}, {"image": b64(blue)},
                                                                {"text": "Output:"}], "max_new_tokens": 5})
    placeholders = client.post("/v1/generate", json={"text": f"<image>Output: red{EOC}<image>Output:", "images": [b64(red), b64(blue)],
                                                     "max_new_tokens": 5})
    assert interleaved.status_code == placeholders.status_code == 200
    assert interleaved.json()["text"] == placeholders.json()["text"]


def test_video_items_and_seeded_sampling(client):
    frames = [b64(image(c)) for c in (RED, GREEN, BLUE)]
    body = {"prompt": [{"text": "A clip:"}, {"video": frames}, {"text": "Output:"}], "max_new_tokens": 8, "num_beams": 1,
            "do_sample": True, "temperature": 1.5, "top_k": 50, "seed": 7}
    a, b = client.post("/v1/generate", json=body), client.post("/v1/generate", json=body)
    assert a.status_code == 200, a.text
    assert a.json()["media"] == 1
    assert a.json()["text"] == b.json()["text"]  # seeded sampling runs alone, so it reproduces


def test_score_ranks_candidates_by_the_harness_log_likelihood(client, model_and_processor):
    model, processor = model_and_processor
    prompts, api = _prompts()
    candidates = [f" a white circle.{EOC}", " red", f" two blue squares on the mat{EOC}"]
    r = client.post("/v1/score", json={"prompt": api[0], "candidates": candidates, "length_normalize": False})
    assert r.status_code == 200, r.text
    body = r.json()
    (total, count), = candidate_log_likelihoods(model, processor, [prompts[0]], [candidates])
    expected = {c: (t, n) for c, t, n in zip(candidates, total.tolist(), count.tolist())}
    got = body["candidates"]
    assert [c["text"] for c in got] == sorted(candidates, key=lambda c: -expected[c][0])
    for c in got:
        assert c["log_likelihood"] == pytest.approx(expected[c["text"]][0], abs=1e-4)
        assert c["num_tokens"] == expected[c["text"]][1] and c["score"] == c["log_likelihood"]
    assert body["best"] == got[0]["text"]
    normalised = client.post("/v1/score", json={"prompt": api[0], "candidates": candidates}).json()["candidates"]
    assert all(c["score"] == pytest.approx(c["log_likelihood"] / c["num_tokens"], rel=1e-6) for c in normalised)


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(client, model_and_processor):
    _, api = _prompts()
    requests = [("/v1/generate", {"prompt": p, "max_new_tokens": 6, "num_beams": beams}) for p in api for beams in (1, 3)]
    requests += [("/v1/score", {"prompt": p, "candidates": [" red", f" a blue square.{EOC}"]}) for p in api]
    alone = [client.post(url, json=body).json() for url, body in requests]
    assert all(r["timings"]["batch_size"] == 1 for r in alone)
    with TestClient(create_app(*model_and_processor, max_batch_size=16, max_wait_ms=400)) as c:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda req: c.post(req[0], json=req[1]).json(), requests))
        batches = c.get("/healthz").json()["batches_run"]
    sizes = [r["timings"]["batch_size"] for r in together]
    assert max(sizes) > 1, sizes
    assert batches < len(requests)  # grouped: (generate, 1 beam), (generate, 3 beams), score
    for a, b in zip(alone, together):
        if "text" in a:
            assert a["text"] == b["text"]
        else:
            assert [x["text"] for x in a["candidates"]] == [x["text"] for x in b["candidates"]]
            for x, y in zip(a["candidates"], b["candidates"]):
                assert x["log_likelihood"] == pytest.approx(y["log_likelihood"], abs=1e-4)


def test_batcher_groups_by_key_and_isolates_a_failing_request():
    calls = []

    def run(key, payloads):
        calls.append((key, list(payloads)))
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [f"{key}:{p}" for p in payloads]

    async def scenario():
        batcher = Batcher(run, max_batch_size=8, max_wait_s=0.05)
        await batcher.start()
        try:
            jobs = [("a", 1), ("b", 2), ("a", 3), ("a", "bad"), ("b", 4)]
            return await asyncio.gather(*(batcher.submit(k, p) for k, p in jobs), return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [r if isinstance(r, Exception) else r[0] for r in results[:3]] == ["a:1", "b:2", "a:3"]
    assert isinstance(results[3], ValueError) and results[4][0] == "b:4"
    assert calls[0] == ("a", [1, 3, "bad"]) and ("b", [2, 4]) in calls  # one call per key, then "a" retried one by one
    assert ("a", [1]) in calls and ("a", ["bad"]) in calls
    assert results[0][1].batch_size == 1 and results[1][1].batch_size == 2


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (what a decompression bomb looks like to Image.open)."""
    raw = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = bytearray(raw[12:29])  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def _good():
    return [{"image": b64(image(RED))}, {"text": "Output:"}]


BAD_REQUESTS = {
    "malformed json": ("/v1/generate", b'{"prompt": [', 400, "malformed JSON"),
    "not an object": ("/v1/generate", [1, 2], 400, "must be a JSON object"),
    "body too large": ("/v1/generate", {"prompt": [{"text": "x" * 70_000}]}, 413, "request body"),
    "decompression bomb": ("/v1/generate", {"prompt": [{"image": base64.b64encode(_bomb_png(12_000, 12_000)).decode()}]},
                           413, "12000x12000 = 144,000,000 pixels, over the limit of 10,000"),
    "huge decompression bomb": ("/v1/generate", {"prompt": [{"image": base64.b64encode(_bomb_png(100_000, 100_000)).decode()}]},
                                413, "over the limit of 10,000 pixels"),
    "too many pixels": ("/v1/generate", {"prompt": [{"image": b64(image(RED, size=(200, 200)))}]}, 413, "over the limit of 10,000"),
    "too many images": ("/v1/generate", {"prompt": [{"image": b64(image(RED))}] * 5}, 413, "5 images/videos"),
    "too many frames": ("/v1/generate", {"prompt": [{"video": [b64(image(RED))] * 5}]}, 413, "5 frames"),
    "max_new_tokens": ("/v1/generate", {"prompt": _good(), "max_new_tokens": 17}, 422, "max_new_tokens=17 is over the server's limit of 16"),
    "num_beams": ("/v1/generate", {"prompt": _good(), "num_beams": 5}, 422, "num_beams=5"),
    "negative temperature": ("/v1/generate", {"prompt": _good(), "temperature": -1}, 422, "temperature"),
    "wrong type": ("/v1/generate", {"prompt": _good(), "num_beams": "many"}, 422, "num_beams"),
    "unknown field": ("/v1/generate", {"prompt": _good(), "max_tokens": 3}, 422, "max_tokens"),
    "bad base64": ("/v1/generate", {"prompt": [{"image": "not base64!"}]}, 400, "prompt[0].image: not valid base64"),
    "not an image": ("/v1/generate", {"prompt": [{"image": "aGVsbG8gd29ybGQ="}]}, 400, "not a PNG"),
    "truncated image": ("/v1/generate", {"prompt": [{"image": base64.b64encode(png_bytes(image(RED))[:60]).decode()}]},
                        400, "cannot decode the image"),
    "more markers than images": ("/v1/generate", {"text": "<image>a<image>Output:", "images": [b64(image(RED))]}, 422,
                                 "2 <image> marker(s) but 1 image(s)"),
    "marker in a text item": ("/v1/generate", {"prompt": [{"text": "<image>Output:"}]}, 422, "prompt[0].text holds the <image> marker"),
    "unknown item": ("/v1/generate", {"prompt": [{"picture": "x"}]}, 422, "prompt[0]: an item is"),
    "both prompt forms": ("/v1/generate", {"prompt": _good(), "text": "Output:"}, 422, "not both"),
    "empty prompt": ("/v1/generate", {"prompt": []}, 422, "the prompt is empty"),
    "prompt too long": ("/v1/generate", {"prompt": [{"text": "a b " * 2000}]}, 413, "over the server's limit of 400"),
    "prompt too many tokens": ("/v1/generate", {"prompt": [{"text": "a b " * 300}]}, 413, "tokens, over the server's limit of 400"),
    "no candidates": ("/v1/score", {"prompt": _good(), "candidates": []}, 422, "candidates"),
    "too many candidates": ("/v1/score", {"prompt": _good(), "candidates": ["a"] * 6}, 413, "6 candidates"),
    "empty candidate": ("/v1/score", {"prompt": _good(), "candidates": ["a", ""]}, 422, "candidates[1] is empty"),
    "unknown path": ("/v1/generat", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx(client, case):
    url, body, status, message = BAD_REQUESTS[case]
    r = client.post(url, content=body) if isinstance(body, bytes) else client.post(url, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert r.json()["error"]["status"] == status


def test_the_server_keeps_serving_after_bad_requests(client):
    for url, body, _, _ in BAD_REQUESTS.values():
        client.post(url, content=body) if isinstance(body, bytes) else client.post(url, json=body)
    r = client.post("/v1/generate", json={"prompt": _good(), "max_new_tokens": 3})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_model_failure_is_a_json_500_and_the_server_keeps_serving(model_and_processor):
    app = create_app(*model_and_processor, max_wait_ms=1)
    runner, failures = app.state.batcher.run_batch, []

    def failing_once(key, payloads):
        if not failures:
            failures.append(key)
            raise RuntimeError("out of memory")
        return runner(key, payloads)

    app.state.batcher.run_batch = failing_once
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/generate", json={"prompt": _good(), "max_new_tokens": 3})
        message = r.json()["error"]["message"]
        assert r.status_code == 500 and message.startswith("internal error ") and "memory" not in message  # logged, not told
        assert c.post("/v1/generate", json={"prompt": _good(), "max_new_tokens": 3}).status_code == 200


def test_model_info_presets_and_page(client):
    info = client.get("/v1/model").json()
    assert info["lm"] is None or isinstance(info["lm"], str)
    assert info["limits"]["max_new_tokens"] == 16 and info["config"]["media_token"] == "<image>"
    presets = client.get("/v1/presets").json()
    assert {p["name"] for p in presets} >= {"captioning", "colour", "shape"}
    for p in presets:
        assert len(p["examples"]) == 3 and p["answer"]
        assert p["answer"] not in p["query"]["text"]
    colour = next(p for p in presets if p["name"] == "colour")
    assert all(e["text"].startswith("Question: what colour is the shape? Answer: ") for e in colour["examples"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_serve_without_a_model_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "flamingo demo" in err and "flamingo-demo/model" in err
