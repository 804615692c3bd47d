"""optiml-perplexity against a perplexity computed independently with
Hugging Face transformers on the same token ids and the same windows
(non-overlapping windows of n_ctx tokens, BOS in place of each window's
first token, the second half of each window scored)."""
import math
import re

import numpy as np
import pytest

from conftest import DATA, MODELS, run, tool

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

from test_hf_logits import make_model  # noqa: E402  (a tiny random HF Llama)


def reference_ppl(model, ids, n_ctx, bos=1):
    """bos: put in place of each window's first token (None: the text's own)."""
    nll, count = 0.0, 0
    for c in range(len(ids) // n_ctx):
        w = list(ids[c * n_ctx:(c + 1) * n_ctx])
        w_in = w if bos is None else [bos] + w[1:]
        with torch.no_grad():
            logits = model(torch.tensor([w_in])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= float(logp[j, w[j + 1]])
            count += 1
    return math.exp(nll / count), count


def parse(stdout):
    m = re.search(r"PPL = ([0-9.]+) \+/- ([0-9.]+) \((\d+) tokens scored\)", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2)), int(m.group(3))


def test_perplexity_matches_transformers(tmp_path):
    model, d = make_model(tmp_path, "silu-gqa")
    gguf = tmp_path / "m.gguf"
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(gguf)])
    assert r.returncode == 0, r.stderr
    text = (DATA / "tinystory.txt").read_text()
    ids = spm.SentencePieceProcessor(model_file=str(DATA / "llama2-tokenizer.model")).encode(text)
    n_ctx = 64
    ref, ref_count = reference_ppl(model, ids, n_ctx)
    r = run([tool("optiml-perplexity"), "-m", str(gguf), "-f", str(DATA / "tinystory.txt"),
             "-c", str(n_ctx), "-b", "16", "-t", "2"])
    assert r.returncode == 0, r.stderr
    ppl, err, count = parse(r.stdout)
    print(f"ours {ppl:.6f} +/- {err:.4f} over {count} tokens, transformers {ref:.6f} over {ref_count}")
    assert count == ref_count
    assert abs(ppl - ref) / ref < 1e-4
    assert err > 0
    assert "ETA" in r.stderr


def test_perplexity_stories(tmp_path):
    """The shipped model on the shipped story: a finite estimate well below
    the uniform-guess perplexity (the vocabulary size, 512)."""
    r = run([tool("optiml-perplexity"), "-m", str(MODELS / "stories260K.gguf"),
             "-f", str(DATA / "tinystory.txt"), "-c", "256"])
    assert r.returncode == 0, r.stderr
    ppl, err, count = parse(r.stdout)
    assert count > 0 and math.isfinite(ppl) and 1.0 < ppl < 512 / 4


@pytest.mark.parametrize("args,needle", [
    (["-c", "100000"], "need at least"),
    (["-c", "x"], "invalid value 'x'"),
    (["--bogus", "1"], "unknown option '--bogus'"),
])
def test_perplexity_errors(args, needle):
    r = run([tool("optiml-perplexity"), "-m", str(MODELS / "stories260K.gguf"),
             "-f", str(DATA / "tinystory.txt")] + args)
    assert r.returncode != 0
    assert needle in r.stderr
