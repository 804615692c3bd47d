"""optiml-server under load (bounded, loopback only): rounds of 32
concurrent streaming clients against 8 slots. Every request must complete
or be cleanly rejected (503 with an OpenAI-shaped error), the server must
not crash, its resident memory must stay flat across rounds, and 8 slots
must share decode steps (continuous batching). Prints the aggregate rates
with 1 and 8 slots for bench/RESULTS.md (bench/server_load.sh)."""
import concurrent.futures
import http.client
import json
import time

import pytest

from conftest import run, tool
from test_server import Server

N_CLIENTS = 32
N_PREDICT = 48
ROUNDS = 3


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    """Random weights, big enough that decoding, not HTTP, is the cost."""
    out = tmp_path_factory.mktemp("load") / "load.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(out), "--n-embd", "512", "--n-layer", "4",
             "--n-ff", "1536", "--n-head", "8", "--n-head-kv", "8", "--n-vocab", "1024", "--ctx", "512"])
    assert r.returncode == 0, r.stderr
    return out


def stream_one(port, i):
    """One streaming /v1/completions request; returns (status, tokens)."""
    body = json.dumps({"prompt": [1, 300 + i % 50, 400 + i], "max_tokens": N_PREDICT, "stream": True,
                       "ignore_eos": True, "temperature": 0.7, "seed": i,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        err = json.loads(r.read())["error"]
        assert r.status == 503 and err["code"] == 503 and err["message"], err
        return r.status, 0
    tokens, done = 0, False
    for raw in r:
        line = raw.decode().rstrip("\n")
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    conn.close()
    assert done and tokens == N_PREDICT
    return 200, tokens


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load_round(s, n_clients):
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as ex:
        results = list(ex.map(lambda i: stream_one(s.port, i), range(n_clients)))
    dt = time.time() - t0
    assert s.proc.poll() is None, "the server died"
    return results, dt


def test_load_32_streams(bench_model):
    rates = {}
    for n_slots in (1, 8):
        s = Server("--parallel", str(n_slots), "-c", str(512 * n_slots), "--queue", "64", model=bench_model)
        try:
            n_clients = N_CLIENTS if n_slots == 8 else 8
            rss, round_rates = [], []
            for _ in range(ROUNDS if n_slots == 8 else 1):
                results, dt = load_round(s, n_clients)
                ok = [t for st, t in results if st == 200]
                assert len(ok) + sum(st == 503 for st, _ in results) == n_clients
                assert len(ok) >= n_clients // 2, results  # the queue holds 64: nearly all run
                round_rates.append(sum(ok) / dt)
                rss.append(rss_kib(s.proc.pid))
            m = s.metrics()
            assert m["optiml_requests_processing"] == 0 and m["optiml_requests_deferred"] == 0
            rates[n_slots] = max(round_rates)
            if n_slots == 8:
                print(f"\nRSS after each round (KiB): {rss}")
                # no leak: memory after the last round within 4 MiB of the first
                assert rss[-1] - rss[0] < 4096, rss
                mean_batch = m['optiml_batch_tokens_total'] / m['optiml_decode_steps_total']
                print(f"mean batch: {mean_batch:.2f} tokens")
                # continuous batching: 32 streams on 8 slots share decode steps
                # (a structural check; the speed-up itself is a benchmark)
                assert mean_batch >= 4, mean_batch
        finally:
            assert s.stop() == 0
            s.close()
    # The 3x target of issue 6 is a benchmark figure (bench/RESULTS.md,
    # bench/server_load.sh), not a timed assertion that a busy CI machine
    # could fail.
    print(f"aggregate generation: 1 slot {rates[1]:.0f} tokens/s, 8 slots {rates[8]:.0f} tokens/s "
          f"({rates[8] / rates[1]:.1f}x)")
