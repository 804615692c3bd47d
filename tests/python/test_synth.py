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


def test_thread_count_does_not_change_the_file(tmp_path):
    # rows are split over threads, every value from its own key: the bytes must not depend on --threads
    outs = []
    for n in (1, 3):
        out = tmp_path / f"t{n}.gguf"
        r = run([tool("optiml-synth"), "--outfile", str(out), "--shape", "tiny", "--n-layer", "2", "--vocab", "512",
                 "--type", "q4_0", "--threads", str(n), "--seed", "5"])
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert len(outs[0]) > 1_000_000 and outs[0] == outs[1]
    r = run([tool("optiml-synth"), "--outfile", str(tmp_path / "x.gguf"), "--threads", "0"])
    assert r.returncode != 0 and "--threads" in r.stderr


def test_bad_flags(tmp_path):
    r = run([tool("optiml-synth"), "--outfile", str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert r.returncode != 0 and "--type" in r.stderr
    r = run([tool("optiml-synth"), "--outfile", str(tmp_path / "x.gguf"), "--n-embd", "100"])
    assert r.returncode != 0 and "multiple" in r.stderr


def test_predictor_types_and_hot_first(synth_model, tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    # default: q8_0 predictors, rank 2 * 64 + 2 padded with zero rows to the 32-value block
    t = {x.name: x for x in gguf.GGUFReader(str(synth_model)).tensors}
    assert t["blk.0.fc1.weight"].tensor_type == q8 and t["blk.0.fc2.weight"].tensor_type == q8
    assert list(t["blk.0.fc2.weight"].shape) == [160, 1024]
    fc1 = gguf.quants.dequantize(t["blk.0.fc1.weight"].data, q8)
    assert fc1.shape == (160, 256) and np.all(fc1[130:] == 0) and np.any(fc1[:130] != 0)
    # f16 predictors (rank unpadded) and the neurons stored hottest first
    out = tmp_path / "hot.gguf"
    r = run([tool("optiml-synth"), "--outfile", str(out), "--shape", "tiny", "--n-layer", "2", "--vocab", "512",
             "--type", "q4_0", "--pred-type", "f16", "--hot-first"])
    assert r.returncode == 0, r.stderr
    t = {x.name: x for x in gguf.GGUFReader(str(out)).tensors}
    for il in range(2):
        assert t[f"blk.{il}.fc2.weight"].tensor_type == f16 and list(t[f"blk.{il}.fc2.weight"].shape) == [130, 1024]
        freq = np.array(t[f"blk.{il}.ffn_act_freq"].data, dtype=np.float64)
        assert np.all(np.diff(freq) <= 0) and freq[0] > 10 * freq[-1], freq
    layers, summary = measure(out)
    assert all(row["recall"] > 0.98 for row in layers), layers  # counted on the dense FFN's activations
    assert abs(sum(row["sparsity"] for row in layers) / 2 - 0.9) < 0.03, layers
    assert 0.0 < summary["sparse_active"] < 0.15, summary
