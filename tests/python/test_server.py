"""optiml-server end to end: the real binary on a loopback port with the
shipped stories260K model, driven by curl, the `openai` client from PyPI and
raw sockets. Greedy generation must reproduce llama2.c's reference tokens
(tests/data/stories260K_greedy.txt), batched results must equal solo ones,
and errors must come in OpenAI's shape with the right status codes."""
import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import MODELS, bin_dir, run, tool
from test_cli import reference_cases

# ---- the server under test (also used by test_server_webui.py, test_server_load.py)

STORIES = MODELS / "stories260K.gguf"


def server_binary() -> str:
    path = bin_dir() / "optiml-server"
    if not path.exists():
        pytest.fail(f"{path} is missing: install libmicrohttpd-dev and rebuild (see README.md)")
    return str(path)


class Server:
    def __init__(self, *args, model=STORIES):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="optiml-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([server_binary(), "-m", str(model), "--port", "0", "-t", "1", *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 60
        while True:
            text = pathlib.Path(self.log.name).read_text()
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"optiml-server did not start:\n{text}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, parsed JSON or text) of one request; never raises on HTTP errors."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, (json.loads(raw) if ctype.startswith("application/json") else raw.decode())

    def metrics(self, headers=None):
        status, text = self.request("GET", "/metrics", headers=headers)
        assert status == 200
        return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l and not l.startswith("#")}

    def stop(self, timeout=30):
        """SIGTERM; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def log_text(self):
        return pathlib.Path(self.log.name).read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)




@pytest.fixture(scope="module")
def srv():
    s = Server("--parallel", "4", "-c", "2048", "--chat-template", "chatml", "--body-limit", "65536")
    yield s
    assert s.stop() == 0
    s.close()


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random-weight model large enough that generation takes seconds
    (for disconnects and shutdown mid-stream)."""
    out = tmp_path_factory.mktemp("slow") / "slow.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(out), "--n-embd", "512", "--n-layer", "6",
             "--n-ff", "1536", "--n-head", "8", "--n-head-kv", "8", "--n-vocab", "1024", "--ctx", "1024"])
    assert r.returncode == 0, r.stderr
    return out


def client(s, key="none"):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw_http(port, data: bytes, timeout=10):
    """Send raw bytes, read the whole answer; returns (status, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                b = sock.recv(65536)
                if not b:
                    break
                chunks.append(b)
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                if b"content-length:" in head.lower():
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(body) >= n:
                        break
        except (ConnectionResetError, socket.timeout):
            pass
    resp = b"".join(chunks)
    status = int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.") else 0
    return status, resp.partition(b"\r\n\r\n")[2]


def assert_error(status, body, want_status, param=None, text=None):
    assert status == want_status, body
    err = body["error"] if isinstance(body, dict) else json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == want_status
    if param is not None:
        assert err["param"] == param, err
    if text is not None:
        assert text in err["message"], err


# ---- basic endpoints with curl ------------------------------------------------------

def curl(*args):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_curl_endpoints(srv):
    code, body = curl(srv.url + "/health")
    assert code == 200 and json.loads(body) == {"status": "ok"}
    code, body = curl(srv.url + "/props")
    props = json.loads(body)
    assert code == 200 and props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 512
    code, body = curl(srv.url + "/v1/models")
    assert code == 200 and json.loads(body)["data"][0]["id"] == "stories260K.gguf"
    code, body = curl(srv.url + "/tokenize", "-d", '{"content": "Once upon a time", "add_special": true}')
    case = reference_cases()[1]
    assert code == 200 and json.loads(body)["tokens"] == case["prompt_ids"]
    code, body = curl(srv.url + "/detokenize", "-d", json.dumps({"tokens": case["prompt_ids"]}))
    assert code == 200 and json.loads(body)["content"] == "Once upon a time"
    code, body = curl(srv.url + "/metrics")
    assert code == 200 and "# TYPE optiml_requests_total counter" in body
    code, body = curl(srv.url + "/")
    assert code == 200 and "<title>OptiML chat</title>" in body and "http://" not in body.split("<script>")[0]
    code, body = curl("-N", srv.url + "/completion", "-d",
                      '{"prompt": "Once upon a time", "n_predict": 8, "stream": true, "temperature": 0}')
    events = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: ")]
    assert code == 200 and events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 8
    assert all(not e["stop"] for e in events[:-1])


@pytest.mark.parametrize("case", reference_cases(), ids=["bos-only", "once-upon-a-time"])
def test_completion_matches_llama2c(srv, case):
    status, r = srv.request("POST", "/completion", {"prompt": case["prompt"], "temperature": 0,
                                                    "n_predict": len(case["generated_ids"]), "return_tokens": True})
    assert status == 200, r
    assert r["tokens"] == case["generated_ids"]
    assert r["tokens_evaluated"] == len(case["prompt_ids"])
    assert case["prompt"] + r["content"] == case["text"]
    # token ids as the prompt give the same continuation
    status, r2 = srv.request("POST", "/completion", {"prompt": case["prompt_ids"], "temperature": 0,
                                                     "n_predict": 16, "return_tokens": True, "n_probs": 3})
    assert status == 200 and r2["tokens"] == case["generated_ids"][:16]
    probs = r2["completion_probabilities"]
    assert len(probs) == 16 and all(p["probs"][0]["id"] == p["id"] for p in probs)  # greedy = most likely


# ---- the openai client ----------------------------------------------------------------

def test_openai_chat(srv):
    c = client(srv)
    msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me a story."}]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 24 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the prompt is the chatml rendering, tokenized with BOS
    rendered = ("<|im_start|>system\nYou tell stories.<|im_end|>\n<|im_start|>user\nTell me a story.<|im_end|>\n"
                "<|im_start|>assistant\n")
    _, tok = srv.request("POST", "/tokenize", {"content": rendered, "add_special": True})
    assert r.usage.prompt_tokens == len(tok["tokens"])
    stream = c.chat.completions.create(model="x", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_openai_completions(srv):
    c = client(srv)
    r = c.completions.create(model="x", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    assert r.usage.prompt_tokens == 5
    ref = reference_cases()[1]["text"][len("Once upon a time"):]
    assert ref.startswith(r.choices[0].text) and len(r.choices[0].text) > 20
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="x", prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True) if ch.choices)
    assert streamed == r.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(srv, stream):
    c = client(srv)
    full = c.completions.create(model="x", prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text
    stop = full[25:31]  # a stop string in the middle, usually across tokens
    first = full.index(stop)
    if stream:
        chunks = list(c.completions.create(model="x", prompt="Once upon a time", max_tokens=40, temperature=0,
                                           stop=[stop, "zzzz"], stream=True))
        text = "".join(ch.choices[0].text for ch in chunks)
        # no chunk ever carried a part of the stop string beyond the cut
        assert all(stop not in ch.choices[0].text for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = c.completions.create(model="x", prompt="Once upon a time", max_tokens=40, temperature=0,
                                 stop=[stop, "zzzz"])
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:first] and finish == "stop"
    status, r = srv.request("POST", "/completion", {"prompt": "Once upon a time", "temperature": 0,
                                                    "n_predict": 40, "stop": [stop]})
    assert r["content"] == full[:first] and r["stop_type"] == "word" and r["stopping_word"] == stop


# ---- errors ----------------------------------------------------------------------------

def test_bad_requests(srv):
    s = srv
    assert_error(*s.request("POST", "/completion", b"{not json"), 400, text="invalid JSON")
    assert_error(*s.request("POST", "/completion", b'{"prompt": "a", "prompt": "b"}'), 400, text="duplicate")
    assert_error(*s.request("POST", "/completion", b'{"prompt": "\xff\xfe"}'), 400, text="invalid JSON")
    assert_error(*s.request("POST", "/completion", b"[1, 2]"), 400, text="JSON object")
    assert_error(*s.request("POST", "/completion", {"prompt": "x", "temperature": "hot"}), 400, "temperature")
    assert_error(*s.request("POST", "/completion", {"prompt": "x", "n_predict": 1.5}), 400, "n_predict")
    assert_error(*s.request("POST", "/completion", {"prompt": "x", "stop": [1]}), 400, "stop")
    assert_error(*s.request("POST", "/completion", {"prompt": [1, 99999]}), 400, "prompt")
    assert_error(*s.request("POST", "/completion", {}), 400, "prompt")
    assert_error(*s.request("POST", "/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    assert_error(*s.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "response_format": {"type": "json_object"}}),
                 400, "response_format", "not supported yet")
    assert_error(*s.request("POST", "/v1/completions", {"prompt": "x", "n": 2}), 400, "n")
    assert_error(*s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    assert_error(*s.request("POST", "/tokenize", {"content": 5}), 400, "content")
    assert_error(*s.request("POST", "/detokenize", {"tokens": ["a"]}), 400, "tokens")
    assert_error(*s.request("GET", "/nope"), 404)
    assert_error(*s.request("GET", "/completion"), 405)
    # a prompt longer than a slot's context (512 tokens)
    status, body = s.request("POST", "/completion", {"prompt": "Once upon a time " * 200})
    assert_error(status, body, 400, "prompt", "a slot's context holds 512")
    # the openai client surfaces the same errors as exceptions
    with pytest.raises(openai.BadRequestError):
        client(s).completions.create(model="x", prompt="x", temperature=-1)


def test_raw_socket_malformed_and_oversized(srv):
    port = srv.port
    # libmicrohttpd answers 400 or just closes the connection
    for junk in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nBad header line\r\n\r\n",
                 b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /health HTTP/9.9\r\n\r\n"):
        status, _ = raw_http(port, junk, timeout=2)
        assert status in (0, 400, 505), (junk, status)
        assert srv.request("GET", "/health")[0] == 200
    # declared too large: refused before the body is read
    status, body = raw_http(port, b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                                  b"Content-Type: application/json\r\n\r\n{")
    assert_error(status, body, 413)
    # chunked body that grows past the limit (65536)
    chunk = b"x" * 8192
    data = b"POST /completion HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    data += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 10 + b"0\r\n\r\n"
    status, body = raw_http(port, data)
    assert_error(status, body, 413)
    # a body cut short by the client: the server must stay up
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"prompt\":")
    assert srv.request("GET", "/health")[0] == 200


def test_api_key():
    s = Server("--api-key", "sekrit", "--chat-template", "chatml")
    try:
        assert s.request("GET", "/health")[0] == 200
        assert s.request("GET", "/")[0] == 200  # the page itself holds no data
        for path in ("/props", "/metrics", "/v1/models"):
            assert_error(*s.request("GET", path), 401)
            assert_error(*s.request("GET", path, headers={"Authorization": "Bearer wrong"}), 401)
            assert s.request("GET", path, headers={"Authorization": "Bearer sekrit"})[0] == 200
        assert_error(*s.request("POST", "/completion", {"prompt": "x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        r = client(s, "sekrit").chat.completions.create(model="x", max_tokens=4,
                                                        messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 4
    finally:
        assert s.stop() == 0
        s.close()


# ---- concurrency, disconnects, shutdown ---------------------------------------------------

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird", "The sun was",
           "Tim had a red ball", "Mom said", "There was a big tree"]


def test_parallel_matches_solo(srv):
    body = lambda p: {"prompt": p, "temperature": 0, "n_predict": 48, "return_tokens": True, "cache_prompt": False}
    solo = [srv.request("POST", "/completion", body(p))[1]["tokens"] for p in PROMPTS]
    before = srv.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda p: srv.request("POST", "/completion", body(p)), PROMPTS))
    after = srv.metrics()
    assert all(status == 200 for status, _ in results)
    assert [r["tokens"] for _, r in results] == solo
    steps = after["optiml_decode_steps_total"] - before["optiml_decode_steps_total"]
    toks = after["optiml_batch_tokens_total"] - before["optiml_batch_tokens_total"]
    assert toks / steps > 1.5, (toks, steps)  # sequences really shared decode steps
    assert after["optiml_requests_processing"] == 0 and after["optiml_slots_idle"] == 4


def test_prefix_reuse(srv):
    p = "Once upon a time, there was a little girl named Lily."
    srv.request("POST", "/completion", {"prompt": p, "n_predict": 2})
    status, r = srv.request("POST", "/completion", {"prompt": p + " She", "n_predict": 2})
    assert status == 200 and r["tokens_cached"] >= 10


def test_queue_full_is_rejected(slow_model):
    s = Server("--parallel", "1", "--queue", "1", model=slow_model)
    try:
        body = {"prompt": [1, 300, 301], "n_predict": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(s.request, "POST", "/completion", body) for _ in range(4)]
            statuses = sorted(f.result()[0] for f in futs)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        assert s.metrics()["optiml_requests_rejected_total"] >= 1
    finally:
        assert s.stop() == 0
        s.close()


def test_disconnect_frees_slot(slow_model):
    s = Server("--parallel", "1", model=slow_model)
    try:
        req = json.dumps({"prompt": [1, 300, 301, 302], "n_predict": 900, "ignore_eos": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(req) + req)
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(4096)
        assert s.metrics()["optiml_requests_processing"] == 1
        sock.close()  # mid-stream
        deadline = time.time() + 10
        while time.time() < deadline:
            m = s.metrics()
            if m["optiml_requests_processing"] == 0:
                break
            time.sleep(0.05)
        assert m["optiml_requests_cancelled_total"] == 1 and m["optiml_requests_processing"] == 0
        assert m["optiml_tokens_predicted_total"] < 900
        # a client that hangs up while waiting for a non-streamed answer
        sock = socket.create_connection(("127.0.0.1", s.port))
        req = json.dumps({"prompt": [1, 300, 301], "n_predict": 900, "ignore_eos": True}).encode()
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(req) + req)
        while s.metrics()["optiml_requests_processing"] != 1:
            time.sleep(0.02)
        sock.close()
        deadline = time.time() + 10
        while time.time() < deadline and s.metrics()["optiml_requests_cancelled_total"] != 2:
            time.sleep(0.05)
        m = s.metrics()
        assert m["optiml_requests_cancelled_total"] == 2 and m["optiml_requests_processing"] == 0
        t0 = time.time()
        status, r = s.request("POST", "/completion", {"prompt": [1, 300], "n_predict": 4, "ignore_eos": True})
        assert status == 200 and r["tokens_predicted"] == 4 and time.time() - t0 < 10
    finally:
        assert s.stop() == 0
        s.close()


def test_timeout(slow_model):
    s = Server("--parallel", "1", "--timeout", "0.5", model=slow_model)
    try:
        status, body = s.request("POST", "/completion", {"prompt": [1, 300], "n_predict": 900, "ignore_eos": True})
        assert_error(status, body, 504, text="timed out")
        assert s.metrics()["optiml_requests_timeout_total"] == 1
    finally:
        assert s.stop() == 0
        s.close()


def test_sigterm_during_stream(slow_model):
    s = Server("--parallel", "2", "--grace", "1", "--chat-template", "chatml", model=slow_model)
    try:
        c = client(s)
        stream = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "t1"}],
                                           max_tokens=900, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it), next(it)
        t0 = time.time()
        s.proc.send_signal(15)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert s.proc.wait(timeout=20) == 0
        assert time.time() - t0 < 15
        assert "stopped" in s.log_text()
        with pytest.raises(ConnectionError):
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
    finally:
        s.close()
