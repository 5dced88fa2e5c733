"""`flamingo serve` under hostile requests, on loopback with a real uvicorn server: decompression bombs under
the limits, a 15 MiB text body, non-JSON numbers, lone surrogates, loose types, stalled bodies, SIGTERM
during a long generation. Each is refused with a 4xx naming the problem (or served) while memory stays
bounded and a normal request still answers quickly."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from helpers import RED, image
from serving_fixtures import TEST_LIMITS, b64, tiny_model

from flamingo_vlm.serving import Limits, create_app

JSON = {"content-type": "application/json"}
MEMORY_BUDGET = 1.5 * 2**30  # resident memory the server may add under the bomb load (docs/serving.md)


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model()


@pytest.fixture(scope="module")
def client(model_and_processor):
    with TestClient(create_app(*model_and_processor, limits=TEST_LIMITS, max_wait_ms=1)) as c:
        yield c


def _good():
    return [{"image": b64(image(RED))}, {"text": "Output:"}]


def _sampling(**extra):
    return json.dumps({"prompt": _good(), "do_sample": True, "max_new_tokens": 2, **extra})


# Each used to be a 500 (or a 2xx of a coerced value): now a 4xx naming the field or the problem.
HOSTILE = {
    "tiny temperature": ("/v1/generate", _sampling(temperature=1e-30), 422, "temperature"),
    "huge temperature": ("/v1/generate", _sampling(temperature=1e308), 422, "temperature"),
    "Infinity temperature": ("/v1/generate", _sampling()[:-1] + ', "temperature": Infinity}', 400, "Infinity is not JSON"),
    "NaN": ("/v1/generate", _sampling()[:-1] + ', "top_p": NaN}', 400, "NaN is not JSON"),
    "overflowing number": ("/v1/generate", _sampling()[:-1] + ', "temperature": 1e400}', 400, "1e400 is out of range"),
    "lone surrogate": ("/v1/generate", '{"prompt": [{"text": "a\\ud800b"}]}', 400, "prompt[0].text: the string holds a lone UTF-16 surrogate"),
    "lone surrogate in a candidate": ("/v1/score", json.dumps({"prompt": _good()})[:-1] + ', "candidates": ["ok", "\\udc00"]}', 400,
                                      "candidates[1]: the string holds a lone"),
    "<image> in a candidate": ("/v1/score", json.dumps({"prompt": _good(), "candidates": ["a red <image>"]}), 422,
                               "candidates[0] holds the <image> marker"),
    "huge seed": ("/v1/generate", _sampling(seed=2**70), 422, "seed: Input should be less than or equal to"),
    "negative seed": ("/v1/generate", _sampling(seed=-1), 422, "seed: Input should be greater than or equal to 0"),
    "huge top_k": ("/v1/generate", _sampling(top_k=2**70), 422, "top_k"),
    "string for an int": ("/v1/generate", json.dumps({"prompt": _good(), "max_new_tokens": "5"}), 422, "max_new_tokens: Input should be a valid integer"),
    "string for a bool": ("/v1/generate", json.dumps({"prompt": _good(), "do_sample": "yes"}), 422, "do_sample: Input should be a valid boolean"),
    "bool for an int": ("/v1/generate", json.dumps({"prompt": _good(), "num_beams": True}), 422, "num_beams: Input should be a valid integer"),
    "number for a string": ("/v1/score", json.dumps({"prompt": _good(), "candidates": [5]}), 422, "candidates.0: Input should be a valid string"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_values_get_a_4xx_naming_the_field(client, case):
    url, body, status, message = HOSTILE[case]
    r = client.post(url, content=body.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"], r.json()


def test_sampling_at_the_temperature_bounds_runs(client):
    for t in (0.01, 100.0, 1):  # an int is a valid float
        r = client.post("/v1/generate", json={"prompt": _good(), "do_sample": True, "temperature": t, "max_new_tokens": 2, "seed": 2**63 - 1})
        assert r.status_code == 200, r.text


def test_docs_work_offline_and_document_the_request_bodies(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.replace("https://fastapi.tiangolo.com", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    paths = client.get("/openapi.json").json()["paths"]
    generate = paths["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "temperature", "seed", "max_new_tokens"} <= set(generate["properties"])
    score = paths["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "candidates" in score["properties"]


def test_model_info_holds_no_filesystem_path(tmp_path):
    from flamingo_vlm import build_flamingo
    from flamingo_vlm.tiny import create_tiny_backbones
    from helpers import SMALL_BRIDGE

    lm, clip = create_tiny_backbones(tmp_path / "secret-place")
    model, processor = build_flamingo(lm, clip, **SMALL_BRIDGE)
    with TestClient(create_app(model, processor, model_name=str(tmp_path / "secret-place" / "model"))) as c:
        info = c.get("/v1/model").json()
    text = json.dumps(info)
    assert "secret-place" not in text and str(tmp_path) not in text
    assert info["lm"] == "tiny-llama" and info["vision"] == "tiny-clip" and info["name"] == "model"


# ---- a real server on loopback ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, **config):
    """``app`` served by uvicorn in a thread on a free loopback port; yields (base URL, server)."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(30)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class PeakRSS:
    """The highest resident memory of this process (server + clients) seen while the block runs."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _bomb_frame() -> str:
    """A 4096x4096 1-bit PNG: about 2 KB of base64 that decodes to 16.7M pixels."""
    buf = io.BytesIO()
    Image.new("1", (4096, 4096)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# One client for every request of a test: a client per request would build an SSL context each time, in this
# process, under the GIL the server shares with it.
HTTP = httpx.Client(timeout=60)


def _normal_request(base: str) -> tuple[int, float]:
    body = json.dumps({"prompt": _good(), "max_new_tokens": 2, "num_beams": 1})
    start = time.perf_counter()
    r = HTTP.post(f"{base}/v1/generate", content=body, headers={"content-type": "application/json"})
    return r.status_code, time.perf_counter() - start


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc (Linux)")
def test_bomb_frames_and_a_huge_text_body_leave_memory_bounded_and_normal_requests_fast(model_and_processor):
    limits = Limits()  # the server's defaults: what `flamingo serve` runs with
    app = create_app(*model_and_processor, limits=limits, max_wait_ms=1)
    frame = _bomb_frame()
    with serving(app) as (base, _, _):
        assert _normal_request(base)[0] == 200  # warm-up: first-call costs are not the attack's
        idle = _rss()
        many = {"prompt": [{"video": [frame] * 32}, {"text": "Output:"}], "max_new_tokens": 1, "num_beams": 1}
        allowed = {"prompt": [{"video": [frame] * 2}, {"text": "Output:"}], "max_new_tokens": 1, "num_beams": 1}
        bodies = [many] * 8 + [allowed] * 4 + [{"prompt": [{"video": [frame] * 32}] * 8, "max_new_tokens": 1}] * 2
        encoded = [json.dumps(b) for b in bodies]
        with PeakRSS() as memory, ThreadPoolExecutor(len(bodies) + 1) as pool:
            attacks = [pool.submit(HTTP.post, f"{base}/v1/generate", content=b, headers=JSON) for b in encoded]
            time.sleep(0.05)  # the attack is under way
            status, latency = _normal_request(base)
            answers = [a.result() for a in attacks]
        assert status == 200 and latency < 1.0, (status, latency)
        for body, r in zip(bodies, answers):
            if body is allowed:
                assert r.status_code in (200, 503), r.text  # served, or told to retry when the budget is taken
            else:
                assert r.status_code == 413 and "pixels together, over the server's limit" in r.json()["error"]["message"]
        assert any(r.status_code == 200 for r in answers)  # requests within the limits are served
        assert memory.peak - idle <= MEMORY_BUDGET, f"{(memory.peak - idle) / 2**30:.2f} GiB over idle"

        # a 15 MiB text body: refused before tokenising, in well under a second, without slowing a normal request
        huge = json.dumps({"prompt": [{"text": "a" * (15 * 2**20)}]}).encode()
        with ThreadPoolExecutor(2) as pool:
            start = time.perf_counter()
            refused = pool.submit(HTTP.post, f"{base}/v1/generate", content=huge, headers=JSON)
            status, latency = _normal_request(base)
            r = refused.result()
            refused_in = time.perf_counter() - start
        assert r.status_code == 413 and "whatever its tokenisation" in r.json()["error"]["message"]
        assert refused_in < 0.5, refused_in
        assert status == 200 and latency < 1.0, latency


def test_a_stalled_body_times_out(model_and_processor):
    app = create_app(*model_and_processor, limits=Limits(body_timeout_s=0.3), max_wait_ms=1)
    with serving(app) as (base, _, _):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
            start = time.monotonic()
            response = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                response += chunk
            waited = time.monotonic() - start
        assert response.startswith(b"HTTP/1.1 408") and b"stalled" in response and waited < 5
        assert _normal_request(base)[0] == 200


def test_shutdown_cuts_a_long_generation_after_the_grace_period(model_and_processor):
    model, processor = model_and_processor
    app = create_app(model, processor, limits=Limits(max_new_tokens=256), max_wait_ms=1)
    step = model.lm.forward

    def slow(*args, **kwargs):  # 0.05 s per decoding step: 200 new tokens would take 10 s
        time.sleep(0.05)
        return step(*args, **kwargs)

    model.lm.forward = slow
    try:
        with serving(app, timeout_graceful_shutdown=0.5) as (base, server, thread):
            with ThreadPoolExecutor(1) as pool:
                long = pool.submit(HTTP.post, f"{base}/v1/generate", json={"prompt": _good(), "max_new_tokens": 200, "num_beams": 1})
                time.sleep(0.5)  # generating
                start = time.monotonic()
                server.handle_exit(15, None)  # what SIGTERM does
                thread.join(10)
                took = time.monotonic() - start
                with contextlib.suppress(httpx.HTTPError):
                    long.result()
        assert not thread.is_alive() and took < 0.5 + 2.0, took
    finally:
        del model.lm.forward


def test_special_tokens_typed_in_text_follow_the_processor_policy(model_and_processor):
    model, processor = model_and_processor
    eos = processor.tokenizer.eos_token
    for policy, status in (("escape", 200), ("refuse", 422)):
        processor.special_tokens_in_text = policy
        try:
            with TestClient(create_app(model, processor, limits=TEST_LIMITS, max_wait_ms=1)) as c:
                r = c.post("/v1/generate", json={"prompt": [{"image": b64(image(RED))}, {"text": f"a{eos}Output:"}], "max_new_tokens": 2})
                s = c.post("/v1/score", json={"prompt": _good(), "candidates": ["ok", f"x{eos}"]})
        finally:
            processor.special_tokens_in_text = "allow"
        assert r.status_code == status and s.status_code == status, (policy, r.text, s.text)
        if status == 422:
            assert f"prompt: the text holds {eos!r}" in r.json()["error"]["message"]
            assert f"candidates: text 1 holds {eos!r}" in s.json()["error"]["message"]
