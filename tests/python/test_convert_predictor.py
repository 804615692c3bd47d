"""convert.py WEIGHTS PREDICTOR_DIR: a Hugging Face ReLU Llama plus
PowerInfer-style predictors (model_N.pt with fc1.weight / fc2.weight,
activation_N.pt counts, config.json sparse_threshold) -> OptiML GGUF.

A tiny random LlamaForCausalLM with hidden_act "relu" is built so that about
one FFN neuron in eight fires (embeddings share a positive offset, each gate
row points against it, as tests/test_sparse.c does), with random norms; the
predictors and counts are random torch tensors saved with torch.save. The
output is read back with the `gguf` PyPI package and checked against torch:
fc1 = fc1.weight / ffn_norm per input column (torch's float32 division),
fc2, ffn_down_t = down_proj.T and ffn_down = down_proj bit for bit,
ffn_act_freq = counts / --calib-tokens, the threshold key just below 0.
Then the engine loads it (ctypes over the public API): dense logits match
transformers (2e-4 relative), oracle sparse decode (sparse_mode 2) equals
dense to float rounding (1e-4) with the sparse path really running, and the
predictor mode runs. Error paths: missing model_N.pt, wrong shapes."""
import ctypes
import json
import sys

import numpy as np
import pytest

from conftest import DATA, ROOT, bin_dir, run, tool

torch = pytest.importorskip("torch", reason="needs torch")
transformers = pytest.importorskip("transformers", reason="needs transformers")
gguf = pytest.importorskip("gguf", reason="needs gguf (an independent GGUF reader)")

N_EMBD, N_FF, N_LAYER, N_VOCAB, RANK = 64, 128, 2, 300, 24
TOKENS = [1, 17, 200, 45, 280, 99, 7]


def make_relu_model(path):
    from test_convert_hf import bpe_tokenizer_json
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=N_EMBD, intermediate_size=N_FF, num_hidden_layers=N_LAYER, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, vocab_size=N_VOCAB,
        hidden_act="relu", bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in n:
                p.normal_(0.0, 0.8).add_(0.6)
            elif "gate_proj" in n:  # noise minus c_i times the mean direction: sparse
                p.normal_(0.0, 1.0 / 16)
                p.sub_(p.mean(dim=1, keepdim=True))
                p.sub_((1.7 + 0.5 * (2 * torch.rand(N_FF, 1) - 1)) / N_EMBD)
            elif "down_proj" in n:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    (path / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json()))
    return model


def make_predictors(path, threshold=None, counts_dir=None):
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    preds = []
    for i in range(N_LAYER):
        sd = {"fc1.weight": torch.randn(RANK, N_EMBD, generator=g) * 0.1,
              "fc2.weight": torch.randn(N_FF, RANK, generator=g) * 0.1}
        torch.save(sd, path / f"model_{i}.pt")
        preds.append(sd)
    if threshold is not None:
        (path / "config.json").write_text(json.dumps({"sparse_threshold": threshold}))
    counts = []
    adir = counts_dir or path
    adir.mkdir(parents=True, exist_ok=True)
    for i in range(N_LAYER):
        c = torch.randint(0, 1000, (N_FF,), generator=g).to(torch.float32)
        torch.save(c, adir / f"activation_{i}.pt")
        counts.append(c)
    return preds, counts


def convert_py(*args):
    import os
    env = dict(os.environ, OPTIML_CONVERT=tool("optiml-convert"))
    return run([sys.executable, str(DATA.parent.parent / "convert.py"), *args], env=env)


def tensors(path):
    rd = gguf.GGUFReader(str(path))
    return rd, {t.name: np.array(t.data) for t in rd.tensors}


def field(rd, key):
    f = rd.fields[key]
    vals = [f.parts[i] for i in f.data]
    return [np.array(v).reshape(-1)[0] for v in vals] if len(vals) > 1 or key.endswith("threshold") else vals[0][0]


# ---- the engine through ctypes (sparse_mode is not in the Python API) -------

def logits_of(path, mode):
    import os
    # the package from the source tree, over the library of the build under test
    os.environ.setdefault("OPTIML_LIBRARY", str(bin_dir().parent / "lib" / "liboptiml.so"))
    if str(ROOT / "bindings" / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import optiml
    from optiml import _lib
    lib = _lib.lib
    lib.optiml_context_ffn_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                             ctypes.POINTER(ctypes.c_uint64)]
    lib.optiml_context_ffn_stats.restype = None
    with optiml.Model(str(path)) as m:
        p = lib.optiml_context_default_params()
        p.n_ctx, p.n_batch, p.n_threads, p.sparse_mode = 64, 64, 2, mode
        ctx = ctypes.c_void_p()
        _lib.check(lib.optiml_context_init(m._handle(), ctypes.byref(p), ctypes.byref(ctx)))
        out, act, tot = [], 0, 0
        b = optiml.Batch(1)
        try:
            for pos, t in enumerate(TOKENS):  # one token per decode: the generation path
                b.clear()
                b.add(t, pos, 0, True)
                _lib.check(lib.optiml_decode(ctx, ctypes.byref(b._b)))
                row = lib.optiml_get_logits_ith(ctx, 0)
                out.append(np.ctypeslib.as_array(row, shape=(N_VOCAB,)).copy())
                a, n = ctypes.c_uint64(), ctypes.c_uint64()
                lib.optiml_context_ffn_stats(ctx, ctypes.byref(a), ctypes.byref(n))
                act, tot = act + a.value, tot + n.value
        finally:
            b.close()
            lib.optiml_context_free(ctx)
    return np.stack(out), (act / tot if tot else None)


def rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


def test_convert_with_predictors(tmp_path):
    model = make_relu_model(tmp_path / "m")
    preds, counts = make_predictors(tmp_path / "pred", threshold=0.0, counts_dir=tmp_path / "pred" / "activation")
    out = tmp_path / "out.gguf"
    r = convert_py("--outfile", str(out), "--calib-tokens", "1000", str(tmp_path / "m"), str(tmp_path / "pred"))
    assert r.returncode == 0, r.stderr

    rd, t = tensors(out)
    sd = model.state_dict()
    assert int(field(rd, "optiml.sparse.version")) == 1
    thr = field(rd, "optiml.sparse.layer_threshold")
    assert len(thr) == N_LAYER and all(np.float32(v) == -np.float32(np.finfo(np.float32).smallest_subnormal)
                                       for v in thr)
    assert int(field(rd, "optiml.sparse.calib_tokens")) == 1000
    for i in range(N_LAYER):
        w = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
        fc1 = (preds[i]["fc1.weight"] / w[None, :]).numpy()
        np.testing.assert_array_equal(t[f"blk.{i}.fc1.weight"].reshape(RANK, N_EMBD), fc1)
        np.testing.assert_array_equal(t[f"blk.{i}.fc2.weight"].reshape(N_FF, RANK), preds[i]["fc2.weight"].numpy())
        down = sd[f"model.layers.{i}.mlp.down_proj.weight"].numpy()  # (n_embd, n_ff)
        np.testing.assert_array_equal(t[f"blk.{i}.ffn_down_t.weight"].reshape(N_FF, N_EMBD), down.T)
        np.testing.assert_array_equal(t[f"blk.{i}.ffn_down.weight"].reshape(N_EMBD, N_FF), down)
        np.testing.assert_array_equal(t[f"blk.{i}.ffn_act_freq"].reshape(-1),
                                      (counts[i].double() / 1000).float().numpy())

    # the engine: dense against transformers, oracle sparse against dense
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS])).logits[0].float().numpy()
    dense, share_d = logits_of(out, 1)
    assert share_d is None
    assert rel(dense, ref) < 2e-4, rel(dense, ref)
    oracle, share = logits_of(out, 2)
    assert rel(oracle, dense) < 1e-4, rel(oracle, dense)
    assert share is not None and 0.0 < share < 0.35, f"the sparse path did not run: active share {share}"
    pred, share_p = logits_of(out, 3)  # random predictors: runs, other logits
    assert np.isfinite(pred).all() and share_p is not None


def test_convert_f16_and_default_frequencies(tmp_path):
    make_relu_model(tmp_path / "m")
    preds, counts = make_predictors(tmp_path / "pred")
    out = tmp_path / "out.gguf"
    r = convert_py("--outfile", str(out), "--outtype", "f16", str(tmp_path / "m"), str(tmp_path / "pred"))
    assert r.returncode == 0, r.stderr
    rd, t = tensors(out)
    assert "optiml.sparse.calib_tokens" not in rd.fields
    fc2 = t["blk.0.fc2.weight"]
    assert fc2.dtype == np.float16
    np.testing.assert_array_equal(fc2.reshape(N_FF, RANK), preds[0]["fc2.weight"].half().numpy())
    c = counts[1].double()
    np.testing.assert_array_equal(t["blk.1.ffn_act_freq"].reshape(-1), (c / c.max()).float().numpy())
    dense, _ = logits_of(out, 1)
    oracle, share = logits_of(out, 2)
    assert rel(oracle, dense) < 1e-3 and 0.0 < share < 0.35


def test_errors(tmp_path):
    make_relu_model(tmp_path / "m")
    make_predictors(tmp_path / "pred")
    out = tmp_path / "out.gguf"
    (tmp_path / "pred" / "model_1.pt").unlink()
    r = convert_py("--outfile", str(out), str(tmp_path / "m"), str(tmp_path / "pred"))
    assert r.returncode == 1 and "model_1.pt" in r.stderr
    torch.save({"fc1.weight": torch.zeros(4, N_EMBD + 1), "fc2.weight": torch.zeros(N_FF, 4)},
               tmp_path / "pred" / "model_1.pt")
    r = convert_py("--outfile", str(out), str(tmp_path / "m"), str(tmp_path / "pred"))
    assert r.returncode == 1 and "expected (r, 64)" in r.stderr
    r = convert_py("--outfile", str(out), "--calib-tokens", "5", str(tmp_path / "m"))
    assert r.returncode == 2 and "need a predictor directory" in r.stderr
    assert not out.exists()
