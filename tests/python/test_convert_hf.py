"""optiml-convert --hf against Hugging Face transformers, read back with the
`gguf` PyPI package (an independent GGUF reader).

Tiny random LlamaForCausalLM checkpoints (hidden 64, 2 layers, 4 heads,
2 KV heads, FFN 96) are saved with save_pretrained (single file and
sharded), converted, and every tensor is compared with the state dict: the
Q/K rows permuted for interleaved RoPE by numpy here, the values rounded to
the output type by torch (f32 exact, f16 and bf16 bit-exact round to nearest
even). Metadata, the Llama 3 rope_freqs divisors (against transformers' own
ROPE_INIT_FUNCTIONS["llama3"]), the SentencePiece vocabulary (against
llama.cpp's vocab GGUF of the same tokenizer) and a byte-level BPE
tokenizer.json are checked, and so are the error paths."""
import gzip
import json
import shutil

import numpy as np
import pytest

from conftest import DATA, gpt2_byte_chars, run, tool

torch = pytest.importorskip("torch", reason="the HF converter tests need torch (pip install torch)")
transformers = pytest.importorskip(
    "transformers", reason="the HF converter tests need transformers (pip install transformers)")
gguf = pytest.importorskip("gguf", reason="the HF converter tests need gguf (pip install gguf)")

SPM_VOCAB = 32000  # tests/data/llama2-tokenizer.model

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}


# ---- building checkpoints ---------------------------------------------------

def bpe_tokenizer_json(n_merges=24):
    """A tiny byte-level BPE tokenizer.json with Llama 3's pre-tokenizer:
    256 byte tokens, n_merges merges, 4 added tokens."""
    table = gpt2_byte_chars()
    byte_chars = [table[b] for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
             ("o", "n"), ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "w"),
             ("o", "r"), ("i", "t"), ("Ġ", "c"), ("i", "s"), ("Ġ", "f"), ("o", "u"),
             ("e", "d"), ("Ġ", "b"), ("a", "n"), ("i", "ng"), ("n", "g"), ("Ġ", "o")]
    merges = []
    for a, b in pairs[:n_merges]:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}" if len(merges) % 2 == 0 else [a, b])  # both spellings
    added = []
    for text, special in [("<|begin_of_text|>", True), ("<|end_of_text|>", True),
                          ("<|eot_id|>", True), ("<extra>", False)]:
        added.append({"id": len(vocab) + len(added), "content": text, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": special})
    regex = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
             "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": True, "vocab": vocab, "merges": merges},
    }


def make_model(path, dtype="f32", tokenizer="spm", seed=0, shard=False, vocab_size=None, **cfg):
    """Save a random LlamaForCausalLM to path; return its state dict (f32
    numpy) and config."""
    torch.manual_seed(seed)
    if vocab_size is None:
        vocab_size = SPM_VOCAB if tokenizer == "spm" else 300
    kw = dict(BASE, vocab_size=vocab_size)
    kw.update(cfg)
    config = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so a norm stored as ones proves nothing
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5)
    model = model.to(TORCH_DTYPES[dtype])
    model.save_pretrained(path, safe_serialization=True,
                          **({"max_shard_size": "300KB"} if shard else {}))
    if tokenizer == "spm":
        shutil.copy(DATA / "llama2-tokenizer.model", path / "tokenizer.model")
    elif tokenizer == "bpe":
        (path / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json()))
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return sd, config


def convert(src, out, *extra, ok=True):
    r = run([tool("optiml-convert"), "--hf", str(src), "--outfile", str(out), *extra])
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout == "", "optiml-convert must print nothing on stdout"
    return r


# ---- reading GGUF ------------------------------------------------------------

def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tensors(reader):
    """name -> (type name, numpy array in PyTorch shape, as stored)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data = np.asarray(t.data)
        if t.tensor_type.name == "BF16":
            data = data.view(np.uint16)
        out[t.name] = (t.tensor_type.name, data.reshape(shape))
    return out


def permute(w, n_head):
    """Hugging Face rotate-half rows -> interleaved pairs, per head: output
    row 2i takes row i, row 2i+1 takes row i + head_dim/2."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def rounded(x, typ):
    """x (f32) as the converter must store it: f32, f16 or bf16 bits."""
    if typ == "F32":
        return x.astype(np.float32)
    if typ == "F16":
        return torch.from_numpy(x).to(torch.float16).numpy()
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def expected_tensors(sd, config):
    """GGUF name -> f32 array the converter must store (before rounding)."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    exp = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if not config.tie_word_embeddings:
        exp["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for l in range(config.num_hidden_layers):
        for hf, ours in names.items():
            w = sd[f"model.layers.{l}.{hf}.weight"]
            if ours == "attn_q":
                w = permute(w, n_head)
            elif ours == "attn_k":
                w = permute(w, n_kv)
            exp[f"blk.{l}.{ours}.weight"] = w
    return exp


def check_tensors(path, sd, config, outtype):
    r = gguf.GGUFReader(str(path))
    got = tensors(r)
    exp = expected_tensors(sd, config)
    extra = set(got) - set(exp) - {"rope_freqs.weight"}
    assert not extra, f"unexpected tensors {sorted(extra)}"
    assert not set(exp) - set(got), f"missing tensors {sorted(set(exp) - set(got))}"
    for name, want in exp.items():
        typ, data = got[name]
        want_typ = "F32" if want.ndim == 1 else outtype.upper()
        assert typ == want_typ, f"{name}: stored as {typ}, expected {want_typ}"
        assert data.shape == want.shape, f"{name}: shape {data.shape} != {want.shape}"
        ref = rounded(want, typ)
        assert np.array_equal(data.view(np.uint8), ref.view(np.uint8)), \
            f"{name}: {np.count_nonzero(data != ref)} elements differ"
    assert field(r, "general.file_type") == FILE_TYPES[outtype]
    return r


# ---- tensors -----------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_tensors_from_f32(tmp_path, outtype):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe")
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out, "--outtype", outtype)
    check_tensors(out, sd, config, outtype)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_default_outtype_is_checkpoint_dtype(tmp_path, dtype):
    sd, config = make_model(tmp_path / "m", dtype=dtype, tokenizer="bpe", seed=1)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    check_tensors(out, sd, config, dtype)


def test_half_to_other_half(tmp_path):
    """bf16 checkpoint -> f16 and f16 -> bf16: through f32, rounded once."""
    sd, config = make_model(tmp_path / "b", dtype="bf16", tokenizer="bpe", seed=2)
    convert(tmp_path / "b", tmp_path / "b.gguf", "--outtype", "f16")
    check_tensors(tmp_path / "b.gguf", sd, config, "f16")
    sd, config = make_model(tmp_path / "h", dtype="f16", tokenizer="bpe", seed=3)
    convert(tmp_path / "h", tmp_path / "h.gguf", "--outtype", "bf16")
    check_tensors(tmp_path / "h.gguf", sd, config, "bf16")


def test_sharded_checkpoint(tmp_path):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", seed=4, shard=True)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    convert(tmp_path / "m", tmp_path / "m.gguf")
    check_tensors(tmp_path / "m.gguf", sd, config, "f32")


def test_single_oddly_named_file(tmp_path):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", seed=5)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "weights.safetensors")
    convert(tmp_path / "m", tmp_path / "m.gguf")
    check_tensors(tmp_path / "m.gguf", sd, config, "f32")


def test_tied_embeddings(tmp_path):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", tie_word_embeddings=True)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = check_tensors(out, sd, config, "f32")
    assert "output.weight" not in tensors(r)


# ---- metadata ----------------------------------------------------------------

@pytest.mark.parametrize("act,ours", [("silu", "silu"), ("relu", "relu"), ("relu2", "relu2"),
                                      ("gelu_pytorch_tanh", "gelu")])
def test_metadata(tmp_path, act, ours):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", hidden_act=act, rms_norm_eps=3e-6,
                            rope_theta=123456.0, max_position_embeddings=333)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out, "--name", "tiny-test")
    r = gguf.GGUFReader(str(out))
    want = {
        "general.architecture": "llama", "general.name": "tiny-test",
        "llama.context_length": 333, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": 300, "optiml.ffn_activation": ours,
    }
    for k, v in want.items():
        assert field(r, k) == v, f"{k} = {field(r, k)!r}, expected {v!r}"
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(3e-6, rel=1e-6)
    assert field(r, "llama.rope.freq_base") == pytest.approx(123456.0)
    assert field(r, "llama.rope.scaling.type") is None
    assert "rope_freqs.weight" not in tensors(r)


def test_default_name_is_directory(tmp_path):
    make_model(tmp_path / "Tiny-3.2-1B", tokenizer="bpe")
    out = tmp_path / "m.gguf"
    convert(tmp_path / "Tiny-3.2-1B", out)
    assert field(gguf.GGUFReader(str(out)), "general.name") == "Tiny-3.2-1B"


def test_head_dim_not_hidden_over_heads(tmp_path):
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", head_dim=8)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = check_tensors(out, sd, config, "f32")
    assert field(r, "llama.rope.dimension_count") == 8


def test_linear_rope_scaling(tmp_path):
    make_model(tmp_path / "m", tokenizer="bpe", rope_scaling={"rope_type": "linear", "factor": 4.0})
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = gguf.GGUFReader(str(out))
    assert field(r, "llama.rope.scaling.type") == "linear"
    assert field(r, "llama.rope.scaling.factor") == pytest.approx(4.0)


def test_llama3_rope_freqs(tmp_path):
    """rope_freqs.weight[i] = inv_freq[i] / inv_freq_llama3[i], with both
    inverse frequencies from transformers itself."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    sd, config = make_model(tmp_path / "m", tokenizer="bpe", rope_theta=500000.0,
                            rope_scaling=scaling)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = check_tensors(out, sd, config, "f32")
    typ, freqs = tensors(r)["rope_freqs.weight"]
    assert typ == "F32" and freqs.shape == (8,)
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    d = config.head_dim
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    ref = (inv / inv_llama3).numpy()
    print("rope_freqs", freqs, "reference", ref)
    assert np.allclose(freqs, ref, rtol=1e-5), (freqs, ref)
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(8.0)
    assert np.any((freqs > 1.0) & (freqs < 8.0)), "no frequency in the smooth band"


# ---- tokenizers --------------------------------------------------------------

def test_spm_vocab_matches_llama_cpp(tmp_path):
    """tokenizer.model -> the same tokens, scores and types as llama.cpp's
    vocab GGUF of the same Llama 2 tokenizer."""
    make_model(tmp_path / "m", tokenizer="spm", num_hidden_layers=1)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = gguf.GGUFReader(str(out))
    ref = gguf.GGUFReader(str(DATA / "ggml-vocab-llama-spm.gguf"))
    assert field(r, "tokenizer.ggml.model") == "llama"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert field(r, key) == field(ref, key), key
    assert np.array_equal(np.array(field(r, "tokenizer.ggml.scores"), dtype=np.float32),
                          np.array(field(ref, "tokenizer.ggml.scores"), dtype=np.float32))
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        assert field(r, "tokenizer.ggml." + key) == field(ref, "tokenizer.ggml." + key), key
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_space_prefix") is True


def test_spm_vocab_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed")
    make_model(tmp_path / "m", tokenizer="spm", num_hidden_layers=1, vocab_size=SPM_VOCAB + 5)
    out = tmp_path / "m.gguf"
    convert(tmp_path / "m", out)
    r = gguf.GGUFReader(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(DATA / "llama2-tokenizer.model"))
    toks = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    scores = field(r, "tokenizer.ggml.scores")
    assert len(toks) == SPM_VOCAB + 5  # padded up to the model's vocab_size
    for i in range(SPM_VOCAB):
        assert toks[i] == sp.id_to_piece(i)
        assert scores[i] == pytest.approx(sp.get_score(i), abs=0)
        want = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        assert types[i] == want, (i, toks[i])
    assert toks[SPM_VOCAB:] == [f"[PAD{i}]" for i in range(SPM_VOCAB, SPM_VOCAB + 5)]
    assert types[SPM_VOCAB:] == [5] * 5


def test_spm_with_added_tokens(tmp_path):
    """tokenizer.json's added tokens beyond the SentencePiece pieces are kept;
    those inside it do not override the model's pieces."""
    d = tmp_path / "m"
    make_model(d, tokenizer="spm", num_hidden_layers=1, vocab_size=SPM_VOCAB + 4)
    added = [{"id": 1, "content": "<s>", "special": True},
             {"id": SPM_VOCAB, "content": "<|im_start|>", "special": True},
             {"id": SPM_VOCAB + 1, "content": "<tool>", "special": False}]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"type": "BPE"}}))
    out = tmp_path / "m.gguf"
    convert(d, out)
    r = gguf.GGUFReader(str(out))
    toks, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert toks[1] == "<s>" and types[1] == 3
    assert toks[SPM_VOCAB:] == ["<|im_start|>", "<tool>", f"[PAD{SPM_VOCAB + 2}]",
                                f"[PAD{SPM_VOCAB + 3}]"]
    assert types[SPM_VOCAB:] == [3, 4, 5, 5]


def test_unparsable_tokenizer_model_falls_back_to_json(tmp_path):
    d = tmp_path / "m"
    make_model(d, tokenizer="bpe")
    (d / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken format, not protobuf
    out = tmp_path / "m.gguf"
    r = convert(d, out)
    assert "using tokenizer.json instead" in r.stderr
    assert field(gguf.GGUFReader(str(out)), "tokenizer.ggml.model") == "gpt2"


def test_bpe_tokenizer(tmp_path):
    d = tmp_path / "m"
    make_model(d, tokenizer="bpe", bos_token_id=None, eos_token_id=None)
    cfg = json.loads((DATA / "llama3-tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"],
         "chat_template": cfg["chat_template"], "add_bos_token": True}))
    out = tmp_path / "m.gguf"
    convert(d, out)
    r = gguf.GGUFReader(str(out))
    tj = bpe_tokenizer_json()
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = tj["added_tokens"]
    n_real = len(vocab) + len(added)
    toks = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "llama-bpe"
    assert toks[:len(vocab)] == [t for t, _ in vocab]
    assert toks[len(vocab):n_real] == [a["content"] for a in added]
    assert types[:len(vocab)] == [1] * len(vocab)
    assert types[len(vocab):n_real] == [3, 3, 3, 4]
    assert toks[n_real:] == [f"[PAD{i}]" for i in range(n_real, 300)]
    assert types[n_real:] == [5] * (300 - n_real)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges
    assert field(r, "tokenizer.ggml.scores") is None
    assert field(r, "tokenizer.ggml.bos_token_id") == toks.index("<|begin_of_text|>")
    assert field(r, "tokenizer.ggml.eos_token_id") == toks.index("<|end_of_text|>")
    assert field(r, "tokenizer.ggml.eot_token_id") == toks.index("<|eot_id|>")
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.chat_template") == cfg["chat_template"]


def test_bpe_default_pre_tokenizer(tmp_path):
    d = tmp_path / "m"
    make_model(d, tokenizer=None)
    tj = bpe_tokenizer_json()
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                           "use_regex": True}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "m.gguf"
    convert(d, out)
    r = gguf.GGUFReader(str(out))
    assert field(r, "tokenizer.ggml.pre") == "default"
    assert field(r, "tokenizer.ggml.bos_token_id") == 1  # from config.json


def test_real_llama3_tokenizer(tmp_path):
    """Meta's Llama 3 tokenizer.json (shipped gzip-compressed in tests/data)."""
    d = tmp_path / "m"
    make_model(d, dtype="bf16", tokenizer=None, vocab_size=128256, num_hidden_layers=1,
               tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128009])
    with gzip.open(DATA / "llama3-tokenizer.json.gz", "rb") as src:
        (d / "tokenizer.json").write_bytes(src.read())
    shutil.copy(DATA / "llama3-tokenizer_config.json", d / "tokenizer_config.json")
    out = tmp_path / "m.gguf"
    convert(d, out)
    r = gguf.GGUFReader(str(out))
    tj = json.loads((d / "tokenizer.json").read_text())
    toks = field(r, "tokenizer.ggml.tokens")
    assert len(toks) == 128256
    for t, i in list(tj["model"]["vocab"].items())[:2000]:
        assert toks[i] == t
    assert toks[128000] == "<|begin_of_text|>"
    assert field(r, "tokenizer.ggml.pre") == "llama-bpe"
    assert len(field(r, "tokenizer.ggml.merges")) == len(tj["model"]["merges"])
    assert field(r, "tokenizer.ggml.bos_token_id") == 128000
    assert field(r, "tokenizer.ggml.eos_token_id") == 128001
    assert field(r, "tokenizer.ggml.eot_token_id") == 128009
    assert field(r, "tokenizer.chat_template").startswith("{% set loop_messages")


# ---- errors ------------------------------------------------------------------

def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def expect_error(d, out, *needles):
    r = convert(d, out, ok=False)
    assert r.returncode == 1, r.stderr
    assert not out.exists(), "a failed conversion must leave no output file"
    err = [l for l in r.stderr.splitlines() if l.startswith("optiml-convert: error: ")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_errors(tmp_path):
    d = tmp_path / "m"
    make_model(d, tokenizer="bpe")
    out = tmp_path / "x.gguf"

    expect_error(tmp_path / "nope", out, "config.json")

    edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    expect_error(d, out, "yarn")
    edit_config(d, rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    expect_error(d, out, "dynamic")
    edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

    edit_config(d, hidden_act="swiglu_oai")
    expect_error(d, out, "hidden_act", "swiglu_oai")
    edit_config(d, hidden_act="silu")

    edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    expect_error(d, out, "GPT2LMHeadModel")
    edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")

    edit_config(d, hidden_size=128)
    expect_error(d, out, "model.embed_tokens.weight", "shape")
    edit_config(d, hidden_size=64)

    (d / "tokenizer.json").rename(d / "tok.json")
    expect_error(d, out, "tokenizer")
    (d / "tok.json").rename(d / "tokenizer.json")

    # a checkpoint without one layer's tensor
    from safetensors.numpy import load_file, save_file
    w = load_file(str(d / "model.safetensors"))
    w.pop("model.layers.1.mlp.up_proj.weight")
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    expect_error(d, out, "model.layers.1.mlp.up_proj.weight")

    # a truncated shard
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(d, out, "model.safetensors")

    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(out), "--outtype", "q4"])
    assert r.returncode == 1 and "q4" in r.stderr


def test_unknown_tensor_warns(tmp_path):
    d = tmp_path / "m"
    sd, config = make_model(d, tokenizer="bpe")
    from safetensors.numpy import load_file, save_file
    w = load_file(str(d / "model.safetensors"))
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, dtype=np.float32)
    w["model.extra_thing.weight"] = np.ones(3, dtype=np.float32)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    r = convert(d, out)
    assert "model.extra_thing.weight" in r.stderr
    assert "inv_freq" not in r.stderr
    check_tensors(out, sd, config, "f32")


# ---- convert.py (the stdlib wrapper at the repo root) -----------------------

def convert_py(*args, **env):
    import os
    import sys
    e = dict(os.environ, OPTIML_CONVERT=tool("optiml-convert"), **env)
    return run([sys.executable, str(DATA.parent.parent / "convert.py"), *args], env=e)


def test_convert_py_dispatch(tmp_path):
    from conftest import MODELS
    # llama2.c: the tokenizer is found next to the checkpoint (tok512.bin)
    out = tmp_path / "s.gguf"
    r = convert_py("--outfile", str(out), "--outtype", "f16", str(MODELS / "stories260K.bin"))
    assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(str(out))
    assert field(rd, "general.file_type") == 1
    assert len(field(rd, "tokenizer.ggml.tokens")) == 512
    # a directory is a Hugging Face model
    sd, config = make_model(tmp_path / "m", tokenizer="bpe")
    r = convert_py("--outfile", str(tmp_path / "m.gguf"), "--name", "w", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert field(check_tensors(tmp_path / "m.gguf", sd, config, "f32"), "general.name") == "w"


def test_convert_py_errors(tmp_path):
    from conftest import MODELS
    out = tmp_path / "x.gguf"
    r = convert_py("--outfile", str(out), str(MODELS / "stories260K.bin"), "predictor.bin")
    assert r.returncode == 2
    assert "a predictor directory goes with a Hugging Face model directory" in r.stderr
    lone = tmp_path / "lone.bin"
    shutil.copy(MODELS / "stories260K.bin", lone)
    r = convert_py("--outfile", str(out), str(lone))
    assert r.returncode == 1 and "--tokenizer" in r.stderr
    r = convert_py("--outfile", str(out), "--tokenizer", str(MODELS / "tok512.bin"), str(lone))
    assert r.returncode == 0, r.stderr
    r = convert_py("--outfile", str(out), str(tmp_path / "missing"))
    assert r.returncode == 1 and "missing" in r.stderr
