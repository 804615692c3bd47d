"""optiml-bench: the llama-bench-like table and JSON, the decode floor and
its arithmetic, the per-run bandwidth pairing (--probe-each), and clear
errors for bad arguments.

The bytes a decode step reads are checked against the GGUF's own tensor
sizes read with the `gguf` package (PyPI), not against our loader.
"""
import json
import re

import gguf

from conftest import MODELS, run, tool

MODEL = str(MODELS / "stories260K.gguf")


def bench(*args):
    return run([tool("optiml-bench"), "-m", MODEL, *args], timeout=120)


def decode_bytes_reference(path):
    """Every tensor once, the token embedding only one row unless no
    separate output head exists (then it is the head and read whole)."""
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            total += t.n_bytes // int(t.shape[1])  # one row of n_vocab
        else:
            total += t.n_bytes
    return total


def test_markdown_table_and_floor():
    r = bench("-p", "8", "-n", "8", "-r", "2", "-t", "1,2")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| llama")]
    tests = [(int(row.split("|")[5]), row.split("|")[7].strip()) for row in rows]
    assert tests == [(1, "pp8"), (1, "tg8"), (2, "pp8"), (2, "tg8")]
    for row in rows:
        mean = float(row.split("|")[8].split("±")[0])
        assert mean > 0
    floors = re.findall(r"decode floor, (\d+) threads: ([\d.]+) MiB read per token / ([\d.]+) GB/s measured = "
                        r"([\d.]+) tokens/s", r.stdout)
    assert [int(f[0]) for f in floors] == [1, 2]
    want_mib = decode_bytes_reference(MODEL) / 1048576.0
    for _, mib, gbs, tps in floors:
        assert abs(float(mib) - want_mib) < 0.01
        assert float(gbs) > 0
        # floor = bandwidth / bytes per token (rounded as printed)
        assert abs(float(tps) - float(gbs) * 1e9 / (want_mib * 1048576.0)) <= 0.01 * float(tps) + 0.01
    # a 1 MiB model is not paired unless asked
    assert "run by run" not in r.stdout


def test_json_and_probe_each():
    r = bench("-p", "0", "-n", "8", "-r", "3", "-t", "1", "--probe-each", "-o", "json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res) == 1
    e = res[0]
    assert e["test"] == "tg8" and e["n_threads"] == 1 and e["n_gpu_layers"] == 0
    assert e["decode_bytes"] == decode_bytes_reference(MODEL)
    assert e["t_s"] > 0 and e["read_bw_gbs"] > 0
    assert e["paired_runs"] == 3
    lo, hi = e["paired_read_bw_gbs"]
    assert 0 < lo <= hi
    slo, shi = e["paired_share_range"]
    assert 0 < slo <= e["paired_share"] <= shi
    # each run's share is its tokens/s x bytes / its pass's bandwidth: the
    # mean share lies within what the extremes of t_s and bandwidth allow
    assert e["paired_share"] <= (e["t_s"] + 3 * e["t_s_sd"]) * e["decode_bytes"] / (lo * 1e9) * 1.0001


def test_sparse_modes_take_turns():
    """--sparse-mode 1,2 on the shipped ReLU model: one row per mode and
    test, in the listed order; the second mode's tokens/s over the first's,
    round by round (mean within its range), and the oracle's share of FFN
    neurons in its test name."""
    relu = str(MODELS / "stories260K-relu.gguf")
    r = run([tool("optiml-bench"), "-m", relu, "-p", "8", "-n", "8", "-r", "3", "-t", "1", "--sparse-mode", "1,2",
             "-o", "json"], timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [(e["test"].split()[0], e["sparse_mode"]) for e in res] == [("pp8", 1), ("pp8", 2), ("tg8", 1), ("tg8", 2)]
    for first, second in ((res[0], res[1]), (res[2], res[3])):
        assert "vs_first_mode" not in first
        lo, hi = second["vs_first_mode_range"]
        assert 0 < lo <= second["vs_first_mode"] <= hi
        # a mean of per-round ratios against the ratio of the means: equal
        # when the rounds are, and never outside what the rounds' spread allows
        m1, s1, m2, s2 = first["t_s"], first["t_s_sd"], second["t_s"], second["t_s_sd"]
        assert (m2 - 3 * s2) / (m1 + 3 * s1) * 0.999 <= second["vs_first_mode"] <= (m2 + 3 * s2) / max(m1 - 3 * s1, 1e-9) * 1.001
    assert res[2]["test"] == "tg8 sparse1 dense"
    share = float(res[3]["test"].split()[2].rstrip("%"))
    assert 0 < share < 100 and abs(share / 100 - res[3]["ffn_active"]) < 1e-3
    r = run([tool("optiml-bench"), "-m", relu, "-p", "0", "-n", "8", "-r", "2", "-t", "1", "--sparse-mode", "1,2"],
            timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"tg8 sparse2 [\d.]+%, 1 threads: [\d.]+x the first mode's tokens/s, round by round "
                     r"\([\d.]+-[\d.]+\)", r.stdout), r.stdout


def test_no_floor():
    r = bench("-p", "0", "-n", "4", "-r", "1", "-t", "1", "--no-floor")
    assert r.returncode == 0, r.stderr
    assert "decode floor" not in r.stdout and "run by run" not in r.stdout
    r = bench("-p", "0", "-n", "4", "-r", "1", "-t", "1", "--no-floor", "-o", "json")
    assert json.loads(r.stdout)[0]["read_bw_gbs"] == 0


def test_bad_arguments():
    r = run([tool("optiml-bench"), "-p", "8"])
    assert r.returncode == 1 and "-m MODEL is required" in r.stderr
    for args, want in ((["-t", "0"], "invalid value '0' for -t"), (["-r", "x"], "invalid value 'x' for -r"),
                       (["--frobnicate"], "unknown option")):
        r = bench(*args)
        assert r.returncode == 1, args
        assert want in r.stderr, (args, r.stderr)
    r = run([tool("optiml-bench"), "-m", str(MODELS / "no-such-model.gguf")])
    assert r.returncode == 1 and "optiml-bench:" in r.stderr
