"""optiml-synth: a small synthetic ReLU-sparse model loads and generates, and
its measured activations follow what was asked for.

tests/sparse_tool (C) runs 512 random tokens through the model's dense FFN
and counts, per layer, the neurons with h != 0 (sparsity), the share of
activations on the 20% most active neurons, how many of the active neurons
the model's own predictor (fc1/fc2, scalar) predicts (recall), and compares
the counted frequencies with the file's ffn_act_freq; it also hashes the
FFN tensors with libxxhash and decodes in predictor mode. The construction
(tools/synth.c) varies the active share x0.75..x1.25 and the hot share
+0.05..-0.05 from the first layer to the last.
"""
import json
import subprocess

import pytest

from conftest import run, tool

N_LAYER = 4


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "synth.gguf"
    r = run([tool("optiml-synth"), "--outfile", str(out), "--shape", "tiny", "--n-layer", str(N_LAYER),
             "--vocab", "512", "--type", "q8_0", "--sparsity", "0.9", "--hot-share", "0.8", "--seed", "3"])
    assert r.returncode == 0, r.stderr
    return out


def measure(path):
    r = run([tool("sparse_tool"), str(path), "512"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    return rows[:-1], rows[-1]


def test_generates(synth_model):
    # bytes: the synthetic vocabulary's byte tokens need not form UTF-8
    r = subprocess.run([tool("optiml-cli"), "-m", str(synth_model), "-p", "hello", "-n", "16", "--temp", "0"],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b" t") + r.stdout.count(b"\xe2\x96\x81t") >= 8, r.stdout  # pieces "t<id>" generated


def test_activation_statistics(synth_model):
    layers, summary = measure(synth_model)
    assert len(layers) == N_LAYER
    for i, row in enumerate(layers):
        f = i / (N_LAYER - 1)
        want_sparsity = 1 - 0.1 * (0.75 + 0.5 * f)
        want_share = 0.8 + 0.1 * (0.5 - f)
        print(row, "want sparsity %.3f hot share %.3f" % (want_sparsity, want_share))
        assert abs(row["sparsity"] - want_sparsity) < 0.02, row
        assert abs(row["hot_share"] - want_share) < 0.05, row
        assert row["recall"] > 0.98 and row["mass_recall"] > 0.995, row
        assert row["precision"] > 0.5, row
        assert row["freq_err"] < 0.03, row  # ffn_act_freq against the counted frequencies
    mean_sparsity = sum(r["sparsity"] for r in layers) / N_LAYER
    assert abs(mean_sparsity - 0.9) < 0.015
    # the weights hash key is the XXH64 of the FFN tensors
    assert summary["hash"] == summary["key"] and len(summary["key"]) == 16, summary
    # predictor mode computes a few neurons and stays close to dense
    assert 0.0 < summary["sparse_active"] < 0.15, summary
    assert summary["dense_logits_diff"] < 0.1, summary


def test_other_sparsity(tmp_path):
    out = tmp_path / "s.gguf"
    r = run([tool("optiml-synth"), "--outfile", str(out), "--shape", "tiny", "--n-layer", "2", "--vocab", "512",
             "--type", "q4_0", "--sparsity", "0.7", "--hot-share", "0.6"])
    assert r.returncode == 0, r.stderr
    layers, summary = measure(out)
    mean_sparsity = sum(r["sparsity"] for r in layers) / len(layers)
    assert abs(mean_sparsity - 0.7) < 0.03, layers
    assert all(r["recall"] > 0.98 for r in layers), layers
    assert summary["hash"] == summary["key"]


def test_bad_flags(tmp_path):
    r = run([tool("optiml-synth"), "--outfile", str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert r.returncode != 0 and "--type" in r.stderr
    r = run([tool("optiml-synth"), "--outfile", str(tmp_path / "x.gguf"), "--n-embd", "100"])
    assert r.returncode != 0 and "multiple" in r.stderr
