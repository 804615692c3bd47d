"""optiml-server's web UI in a real browser: Debian's headless chromium
driven by playwright (PyPI). Types messages and watches streamed replies
arrive, presses stop mid-reply (the server must free the slot), checks the
conversation survives a reload (localStorage) and that the markdown
renderer escapes HTML. Screenshots go to build/ (their paths are printed)."""
import json
import os
import shutil
import time

import pytest

from conftest import ROOT
from test_server import Server, slow_model  # noqa: F401 (slow_model: a fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def srv():
    s = Server("--parallel", "2", "-c", "1024", "--chat-template", "chatml")
    yield s
    assert s.stop() == 0
    s.close()


def new_page(browser):
    # bypass_csp: playwright evaluates its wait conditions as strings, which
    # the page's Content-Security-Policy (no eval) would refuse
    page = browser.new_page(viewport={"width": 1100, "height": 720}, bypass_csp=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def screenshot(page, name):
    shot = ROOT / "build" / name
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nweb UI screenshot: {shot}")


def test_chat_streams_and_keeps_history(browser, srv):
    page, errors = new_page(browser)
    page.goto(srv.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'stories260K.gguf'")
    page.click("#toggle-settings")
    page.fill("#s-system", "You tell short stories.")
    page.fill("#s-max_tokens", "120")
    page.click("#toggle-settings")
    chunks = []
    page.on("response", lambda r: chunks.append(r.headers.get("content-type", "")) if "chat/completions" in r.url else None)

    page.fill("#input", "Tell me a story about a cat.")
    page.click("#send")
    page.wait_for_selector(".msg.user")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                           "!document.getElementById('send').disabled", timeout=60000)
    first = page.inner_text(".msg.assistant")
    assert len(first) > 20 and "Error" not in first, first
    assert chunks and chunks[0].startswith("text/event-stream")
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.getElementById('send').disabled", timeout=60000)
    second = page.inner_text(".msg.assistant >> nth=1")
    assert len(second) > 20 and "Error" not in second, second
    screenshot(page, "server_webui.png")

    # the conversation is kept across a reload (localStorage)
    page.reload()
    page.wait_for_selector(".msg.assistant >> nth=1")
    assert page.locator(".msg.user").count() == 2
    assert page.inner_text(".msg.user >> nth=0") == "Tell me a story about a cat."
    assert page.inner_text(".msg.assistant >> nth=0") == first
    assert not errors, errors
    page.close()


def test_stop_button(browser, slow_model):
    """A model slow enough that the reply is still streaming when we press
    stop; the request gets ignore_eos so it cannot end early."""
    s = Server("--chat-template", "chatml", model=slow_model)
    try:
        page, errors = new_page(browser)

        def add_ignore_eos(route):
            body = json.loads(route.request.post_data)
            body["ignore_eos"] = True
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", add_ignore_eos)
        page.goto(s.url + "/")
        page.click("#toggle-settings")
        page.fill("#s-max_tokens", "900")
        page.click("#toggle-settings")
        page.fill("#input", "t1 t2 t3")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                               "document.querySelector('.msg.assistant').innerText.length > 10", timeout=60000)
        partial = page.inner_text(".msg.assistant")
        page.wait_for_function(f"document.querySelector('.msg.assistant').innerText.length > {len(partial)}",
                               timeout=60000)  # the reply grows: it streams
        page.click("#stop")
        page.wait_for_function("!document.getElementById('send').disabled")
        assert "stopped" in page.inner_text(".msg.assistant .meta")
        assert not page.is_enabled("#stop")
        screenshot(page, "server_webui_stopped.png")
        # the server noticed the aborted fetch and freed the slot
        deadline = time.time() + 10
        while time.time() < deadline and s.metrics()["optiml_requests_processing"] != 0:
            time.sleep(0.05)
        m = s.metrics()
        assert m["optiml_requests_processing"] == 0 and m["optiml_requests_cancelled_total"] == 1
        assert not errors, errors
        page.close()
    finally:
        assert s.stop() == 0
        s.close()


def test_markdown_renderer_is_safe(browser, srv):
    page = browser.new_page(bypass_csp=True)
    page.goto(srv.url + "/")
    html = page.evaluate("""() => renderMarkdown(
        "**bold** and *it* `<b>x</b>`\\n\\n- one\\n- two\\n\\n1. first\\n\\n" +
        "```\\n<script>alert(1)</script>\\n```\\n" +
        "[ok](https://example.com/a?b=1&c=2) [bad](javascript:alert(1)) <img src=x onerror=alert(1)>")""")
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>&lt;b&gt;x&lt;/b&gt;</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert "<pre><code>&lt;script&gt;alert(1)&lt;/script&gt;</code></pre>" in html
    assert '<a href="https://example.com/a?b=1&amp;c=2"' in html
    assert "javascript:" not in html.split("[bad]")[0] and 'href="javascript' not in html
    assert "<img" not in html and "&lt;img" in html
    page.close()
