"""The activation-locality pipeline end to end on a real ReLU Llama.

models/stories260K-relu.gguf is stories260K (a real TinyStories Llama) with
ReLU in place of SiLU in its FFN, fine-tuned by tools/relufy_llama2c.py.
From it: optiml-profile on a calibration text (dumping samples) ->
optiml-train-predictor (99% recall of the activation mass) -> the model with
predictors, then on a held-out text:
  - the ReLU model is a working language model: its dense perplexity is
    close to the original SiLU stories260K's on the same text;
  - perplexity with the predictors (sparse_mode 3, one token per decode so
    every token uses its own predicted set) is within 2% of the dense run
    of the same file, while the FFN computes a minority of its neurons;
  - the oracle (the exact active set) gives the dense perplexity;
  - greedy generation with the predictors follows the dense generation.
The texts (tests/data/stories260K_calib.txt, stories260K_eval.txt) were
sampled from the original model with disjoint seeds; run with -s to see the
per-layer recall, the sparsity and the perplexities.
"""
import re

import pytest

from conftest import DATA, MODELS, run, tool

gguf = pytest.importorskip("gguf")

RELU = MODELS / "stories260K-relu.gguf"
CALIB, EVAL = DATA / "stories260K_calib.txt", DATA / "stories260K_eval.txt"
CTX = 256


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """profile -> train: (profiled model without predictors, model with
    predictors, the trainer's per-layer rows)."""
    work = tmp_path_factory.mktemp("relu")
    prof, samples, pred = work / "profiled.gguf", work / "samples.bin", work / "pred.gguf"
    r = run([tool("optiml-profile"), "-m", str(RELU), "-f", str(CALIB), "-c", str(CTX), "-t", "2", "-o", str(prof),
             "--dump-samples", str(samples), "--sample-rate", "1"])
    assert r.returncode == 0, r.stderr
    print("\noptiml-profile:\n" + r.stdout)
    r = run([tool("optiml-train-predictor"), "-m", str(prof), "--samples", str(samples), "-o", str(pred),
             "--recall", "0.99", "--rank", "32", "--epochs", "20", "-t", "2"])
    assert r.returncode == 0, r.stderr
    print("optiml-train-predictor:\n" + r.stdout)
    rows = {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if f and f[0] == "layer":
            rows[int(f[1])] = {f[i]: float(f[i + 1]) for i in range(2, len(f) - 1, 2)}
    return prof, pred, rows


def perplexity(model, mode, text=EVAL):
    r = run([tool("optiml-perplexity"), "-m", str(model), "-f", str(text), "-c", str(CTX), "-b", "1", "-t", "1",
             "--sparse-mode", str(mode)])
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"PPL = ([0-9.]+)", r.stdout).group(1))
    m = re.search(r"FFN active = ([0-9.]+)", r.stdout)
    return ppl, float(m.group(1)) if m else None


def test_the_model_is_a_relu_llama():
    r = gguf.GGUFReader(str(RELU))
    assert r.fields["optiml.ffn_activation"].contents() == "relu"
    assert r.fields["general.architecture"].contents() == "llama"
    assert not any(t.name.endswith(("fc1.weight", "fc2.weight")) for t in r.tensors)


def test_relu_model_is_close_to_the_original():
    """The ReLU model, dense, against the SiLU stories260K it came from."""
    relu, _ = perplexity(RELU, 1)
    silu, _ = perplexity(MODELS / "stories260K.gguf", 1)
    print(f"\ndense perplexity on {EVAL.name}: relu {relu:.4f}, original silu {silu:.4f}")
    assert relu < 1.1 * silu


def test_predictors_reach_their_recall(pipeline):
    _, pred, rows = pipeline
    n_layer = int(gguf.GGUFReader(str(RELU)).fields["llama.block_count"].contents())
    assert sorted(rows) == list(range(n_layer))
    for il, row in rows.items():
        assert row["recall"] >= 0.99, (il, row)
        # over half the neurons are zero per token, and the predictor leaves
        # out most of them
        assert row["sparsity"] > 0.5 and row["pred_sparsity"] > 0.3, (il, row)


def test_sparse_perplexity_within_2_percent(pipeline):
    prof, pred, rows = pipeline
    dense, none = perplexity(pred, 1)
    sparse, active = perplexity(pred, 3)
    oracle, oracle_active = perplexity(pred, 2)
    print(f"\nperplexity on {EVAL.name}, one token per decode: dense {dense:.4f}, predictor {sparse:.4f} "
          f"({100 * (sparse / dense - 1):+.2f}%, FFN active {active:.3f}), oracle {oracle:.4f} "
          f"(FFN active {oracle_active:.3f})")
    print("per layer: " + "; ".join(f"L{il} recall {r['recall']:.4f} pred_sparsity {r['pred_sparsity']:.3f} "
                                    f"sparsity {r['sparsity']:.3f}" for il, r in sorted(rows.items())))
    assert none is None  # the dense run computed every neuron
    assert abs(sparse / dense - 1) < 0.02
    # the predictor's sets are used: a layer whose set exceeds 60% of n_ff
    # runs dense and counts every neuron, so this bounds how often that happens
    mean_pred = sum(1 - r["pred_sparsity"] for r in rows.values()) / len(rows)
    assert active < 0.75 and active < mean_pred + 0.1
    # the oracle computes exactly the active neurons: dense to rounding
    assert oracle == pytest.approx(dense, rel=1e-4)
    assert oracle_active < active
    # the model without predictors (the profiled file) runs dense in auto mode
    auto, auto_active = perplexity(prof, 0)
    assert auto_active is None and auto == pytest.approx(dense, rel=1e-6)


def generate(model, prompt, n=48):
    r = run([tool("optiml-cli"), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "-s", "1", "-t", "1",
             "--show-ids"])
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_sparse_generation_follows_dense(pipeline):
    prof, pred, _ = pipeline
    for prompt in ("Once upon a time, there was a little girl named Lily.", "Tom and his dog went to the park."):
        dense, sparse = generate(prof, prompt), generate(pred, prompt)
        print(f"\ndense:  {dense!r}\nsparse: {sparse!r}")
        assert dense.startswith(prompt) and sparse.startswith(prompt)
        dw, sw = dense[len(prompt):].split(), sparse[len(prompt):].split()
        same = next((i for i, (a, b) in enumerate(zip(dw, sw)) if a != b), min(len(dw), len(sw)))
        assert len(dw) >= 20 and same >= 15, (same, dense, sparse)
