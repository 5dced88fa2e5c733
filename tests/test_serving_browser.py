"""The web page of ``flamingo serve`` in headless Chromium (Debian's ``chromium``, driven by Playwright):
upload example images with a file picker, drop the query image, generate, and read the answer from the
page; it must be the API's answer to the same prompt."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time

import httpx
import pytest

from helpers import BLUE, GREEN, RED, image
from serving_fixtures import b64, png_bytes, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# In CI (.ci/run sets CI=true) a missing browser is a failure: these tests must never skip silently there.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
try:
    import playwright.sync_api  # noqa: F401
except ImportError:
    if IN_CI:
        raise
    pytest.skip("the browser test needs Playwright: pip install -e '.[dev]'", allow_module_level=True)
if CHROMIUM is None:
    if IN_CI:
        raise RuntimeError("CI=true but no chromium on PATH: the browser tests of flamingo serve cannot run (.ci/run installs it)")
    pytest.skip("the browser test needs Debian's chromium (apt-get install -y chromium); .ci/run installs it", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EOC = "<|endofchunk|>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    """A real uvicorn server with a tiny model on a free loopback port, in a thread."""
    import uvicorn

    from flamingo_vlm.serving import create_app
    from flamingo_vlm.toyworld.presets import toy_presets

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(*tiny_model(), max_wait_ms=1, presets=toy_presets), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server_url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server_url + "/")
        yield page
        browser.close()
        assert not errors, errors


def _drop_file(page, selector: str, name: str, data: bytes) -> None:
    """Drag-and-drop a PNG file onto an element, as a user dragging it from the desktop does."""
    page.evaluate(
        """([selector, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            document.querySelector(selector).dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        [selector, name, base64.b64encode(data).decode()],
    )


def test_upload_generate_and_read_the_answer(page, server_url, tmp_path):
    red, green, blue = image(RED), image(GREEN), image(BLUE)
    files = []
    for name, img in (("red.png", red), ("green.png", green)):
        files.append(tmp_path / name)
        files[-1].write_bytes(png_bytes(img))
    texts = ["Output: a red circle.", "Output: a green square."]
    for i, (path, text) in enumerate(zip(files, texts)):
        page.click("#add-example")
        card = page.locator(".card.example").nth(i)
        card.locator("input.file").set_input_files(str(path))
        card.locator(".drop img").wait_for()
        card.locator("textarea.text").fill(text)
    _drop_file(page, "#query-drop", "blue.png", png_bytes(blue))
    page.locator("#query-drop img").wait_for()
    page.fill("#query-text", "Output:")
    page.fill("#max-new-tokens", "6")
    page.fill("#num-beams", "2")
    page.click("#generate")
    page.locator('#answer[data-state="done"]').wait_for(timeout=30_000)
    answer = page.locator("#answer").text_content()
    timing = page.locator("#timing").text_content()

    expected = httpx.post(server_url + "/v1/generate", json={
        "prompt": [{"image": b64(red)}, {"text": texts[0] + EOC}, {"image": b64(green)}, {"text": texts[1] + EOC},
                   {"image": b64(blue)}, {"text": "Output:"}],
        "max_new_tokens": 6, "num_beams": 2,
    }, timeout=30).json()
    assert answer == (expected["text"] or "(empty answer)")
    assert "ms on the server" in timing and "3 image(s)" in timing
    assert page.locator("#prompt-view").text_content() == f"<image>{texts[0]}{EOC}<image>{texts[1]}{EOC}<image>Output:"


def test_a_toy_world_preset_generates(page):
    page.select_option("#preset", "colour")
    assert page.locator(".card.example").count() == 3
    assert page.locator("#query-text").input_value() == "Question: what colour is the shape? Answer:"
    assert page.locator("#expected b").text_content()
    page.click("#generate")
    page.locator('#answer[data-state="done"]').wait_for(timeout=30_000)
    assert "batch of 1" in page.locator("#timing").text_content()


def test_a_server_error_is_shown_on_the_page(page):
    page.click("#clear")
    page.fill("#query-text", "Output:")
    page.fill("#max-new-tokens", "100000")  # over the server's limit
    page.click("#generate")
    page.locator('#answer[data-state="error"]').wait_for(timeout=30_000)
    assert "max_new_tokens=100000 is over the server's limit" in page.locator("#answer").text_content()
