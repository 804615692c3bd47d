"""Our forward pass against Hugging Face transformers' LlamaForCausalLM and
Qwen2ForCausalLM.

Tiny randomly initialised models (SiLU, ReLU and squared-ReLU FFNs, GQA,
tied embeddings, Llama 3 rope scaling; Qwen2's q/k/v biases and NeoX RoPE)
are saved as safetensors, converted
with `optiml-convert --hf`, and evaluated by `optiml-dump-logits` on random
token ids, both as one prompt batch and one token at a time. Logits must
match transformers' forward within a relative error of 1e-4 in f32 (error =
max |ours - theirs| / max |theirs|)."""
import shutil

import numpy as np
import pytest

from conftest import DATA, run, tool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 32000  # the Llama 2 SentencePiece vocabulary shipped in tests/data

CONFIGS = {
    "silu-gqa": dict(hidden_act="silu", num_key_value_heads=2),
    "relu-tied": dict(hidden_act="relu", num_key_value_heads=4, tie_word_embeddings=True),
    "relu2-mha": dict(hidden_act="relu2", num_key_value_heads=4),
    "llama3-rope": dict(hidden_act="silu", num_key_value_heads=1, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-rope": dict(hidden_act="silu", num_key_value_heads=2,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # Qwen2ForCausalLM: biases on q, k, v; rotate-half RoPE kept as is
    "qwen2-gqa": dict(arch="qwen2", hidden_act="silu", num_key_value_heads=2, rope_theta=1000000.0),
    "qwen2-tied": dict(arch="qwen2", hidden_act="silu", num_key_value_heads=4, tie_word_embeddings=True),
}


def make_model(tmp_path, name, dtype=torch.float32):
    torch.manual_seed(hash(name) % 1000)
    kw = dict(CONFIGS[name])
    qwen2 = kw.pop("arch", "llama") == "qwen2"
    config, causal_lm = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if qwen2 else
                         (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **kw)
    model = causal_lm(cfg).eval()
    with torch.no_grad():  # random norms and larger weights exercise more than ones
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    d = tmp_path / name
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(DATA / "llama2-tokenizer.model", d / "tokenizer.model")
    return model, d


def ours(gguf, ids, mode):
    out = gguf.with_suffix(f".{mode}.f32")
    r = run([tool("optiml-dump-logits"), "-m", str(gguf), "-o", str(out), mode, "-t", "2"]
            + [str(i) for i in ids])
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), VOCAB)


def theirs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_f32(tmp_path, name):
    model, d = make_model(tmp_path, name)
    gguf = tmp_path / f"{name}.gguf"
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(gguf)])
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, VOCAB, 40).tolist()  # 41 positions: past original_max of llama3
    ref = theirs(model, ids)
    for mode in ("--batch", "--one-by-one"):
        err = rel_err(ours(gguf, ids, mode), ref)
        print(f"{name} {mode}: relative error {err:.2e}")
        assert err < 1e-4, f"{name} {mode}: relative error {err:.3g}"


@pytest.mark.parametrize("outtype,tol", [("f16", 2e-2), ("bf16", 5e-2)])
def test_logits_half(tmp_path, outtype, tol):
    """Half-precision weights: the f32 model's logits within the rounding of
    the weights (f16 keeps ~11 bits, bf16 ~8)."""
    model, d = make_model(tmp_path, "silu-gqa")
    gguf = tmp_path / f"m-{outtype}.gguf"
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(gguf), "--outtype", outtype])
    assert r.returncode == 0, r.stderr
    ids = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]
    err = rel_err(ours(gguf, ids, "--batch"), theirs(model, ids))
    print(f"{outtype}: relative error {err:.2e}")
    assert err < tol


def test_logits_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint converts as bf16 (its own dtype) and matches
    transformers loading the same checkpoint in f32: we compute in f32 on
    exactly upcast weights. (Upcasting the bf16 model object instead would
    also round transformers' RoPE frequencies to bf16.)"""
    _, d = make_model(tmp_path, "relu-tied", dtype=torch.bfloat16)
    gguf = tmp_path / "bf16.gguf"
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(gguf)])
    assert r.returncode == 0, r.stderr
    gguf_reader = pytest.importorskip("gguf")
    types = {t.name: t.tensor_type.name for t in gguf_reader.GGUFReader(str(gguf)).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = [1, 450, 4996, 17354, 1701, 432, 17204]
    ref = theirs(model, ids)
    err = rel_err(ours(gguf, ids, "--batch"), ref)
    print(f"bf16 checkpoint: relative error {err:.2e}")
    assert err < 1e-4
