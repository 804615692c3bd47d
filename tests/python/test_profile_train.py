"""optiml-profile and optiml-train-predictor on a small random ReLU model.

The profile is checked against a forward pass of the same model in numpy
(float64): the per-neuron firing counts, the sampled FFN inputs, masks and
|h|, the statistics printed, the weights hash (XXH64 written out below in
Python) and that the output file keeps every key and tensor of the input
byte for byte. The trained predictors are read back and evaluated with
numpy on the held-out samples: the recall, precision and predicted sparsity
the trainer printed must be reproduced, and the recall must reach the
target. Neurons whose gate or up value lies within EPS of zero are counted
as ambiguous (float32 against float64 may decide them either way).
"""
import struct

import numpy as np
import pytest

from conftest import DATA, run, tool

gguf = pytest.importorskip("gguf")

N_EMBD, N_LAYER, N_FF, N_HEAD, N_VOCAB = 64, 2, 200, 4, 300  # n_ff: mask bytes not a multiple of 8
CTX, MAX_TOKENS, RATE = 64, 2000, 0.6
EPS = 1e-3


# ---- an independent XXH64 (the reference of optiml.sparse.weights_hash) ----

P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
M64 = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc, lane):
    return (_rotl((acc + lane * P2) & M64, 31) * P1) & M64


def xxh64(data: bytes, seed: int = 0) -> int:
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        lanes = np.frombuffer(data[: n // 32 * 32], dtype="<u8").reshape(-1, 4).tolist()
        for row in lanes:
            v = [_round(v[k], row[k]) for k in range(4)]
        i = n // 32 * 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for k in range(4):
            h = (((h ^ _round(0, v[k])) * P1) + P4) & M64
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        h = ((_rotl(h ^ _round(0, int.from_bytes(data[i:i + 8], "little")), 27) * P1) + P4) & M64
        i += 8
    if i + 4 <= n:
        h = ((_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * P1 & M64), 23) * P2) + P3) & M64
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * P5 & M64), 11) * P1) & M64
        i += 1
    h = ((h ^ (h >> 33)) * P2) & M64
    h = ((h ^ (h >> 29)) * P3) & M64
    return h ^ (h >> 32)


def test_xxh64_reference_vectors():
    # published XXH64 values (xxhash's sanity test)
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


# ---- the model and its numpy forward pass ----

def tensors(path):
    """Every tensor as an array, quantized ones (q8_0 predictors) dequantized by gguf-py."""
    r = gguf.GGUFReader(str(path))
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    return r, {t.name: np.array(t.data) if t.tensor_type in plain else gguf.quants.dequantize(t.data, t.tensor_type)
               for t in r.tensors}


def rmsnorm(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, n_head, base=10000.0):
    """Adjacent pairs (2i, 2i+1) of each head rotated by pos * base^(-2i/hd)."""
    t, d = x.shape
    hd = d // n_head
    x = x.reshape(t, n_head, hd // 2, 2)
    ang = np.arange(t)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0], x[..., 1]
    return np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(t, d)


def forward(w, toks, cut=0.0):
    """Per layer: the FFN's normed input, gate, up of one window; cut: the
    FATReLU threshold (gate values <= cut become 0)."""
    x = w["token_embd.weight"][toks].astype(np.float64)
    t, hd = len(toks), N_EMBD // N_HEAD
    causal = np.triu(np.full((t, t), -np.inf), 1)
    out = []
    for il in range(N_LAYER):
        g = lambda n: w[f"blk.{il}.{n}.weight"].astype(np.float64)  # noqa: E731
        xn = rmsnorm(x, g("attn_norm"))
        q, k, v = rope(xn @ g("attn_q").T, N_HEAD), rope(xn @ g("attn_k").T, N_HEAD), xn @ g("attn_v").T
        att = np.empty_like(q)
        for h in range(N_HEAD):
            sl = slice(h * hd, (h + 1) * hd)
            s = q[:, sl] @ k[:, sl].T / np.sqrt(hd) + causal
            p = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, sl] = (p / p.sum(axis=1, keepdims=True)) @ v[:, sl]
        x = x + att @ g("attn_output").T
        xn = rmsnorm(x, g("ffn_norm"))
        gate, up = xn @ g("ffn_gate").T, xn @ g("ffn_up").T
        out.append((xn, gate, up))
        x = x + (np.where(gate > cut, gate, 0) * up) @ g("ffn_down").T
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def model(work):
    path = work / "relu.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(path), "--n-embd", str(N_EMBD), "--n-layer",
             str(N_LAYER), "--n-ff", str(N_FF), "--n-head", str(N_HEAD), "--n-vocab", str(N_VOCAB),
             "--ctx", "256", "--act", "relu", "--seed", "7"])
    assert r.returncode == 0, r.stderr
    return path


def reference_pass(model, cut=0.0):
    """The evaluated tokens as optiml-profile documents them (BOS, then the
    next CTX-1 text tokens, per window; at most MAX_TOKENS), per layer the
    numpy FFN input, gate and up of every one of them."""
    r = run([tool("optiml-tokenize"), "-m", str(model), "-f", str(DATA / "tinystory.txt"), "--no-bos"])
    assert r.returncode == 0, r.stderr
    text = [int(t) for t in r.stdout.split()]
    reader, w = tensors(model)
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].parts[-1][0])
    windows, n = [], 0
    for i in range(0, len(text), CTX - 1):
        win = [bos] + text[i:i + CTX - 1]
        win = win[:MAX_TOKENS - n]
        windows.append(win)
        n += len(win)
        if n >= MAX_TOKENS:
            break
    layers = [forward(w, win, cut) for win in windows]
    return [tuple(np.concatenate([lay[il][k] for lay in layers]) for k in range(3)) for il in range(N_LAYER)]


@pytest.fixture(scope="module")
def reference(model):
    return reference_pass(model)


@pytest.fixture(scope="module")
def profiled(work, model):
    out, samples = work / "profiled.gguf", work / "samples.bin"
    r = run([tool("optiml-profile"), "-m", str(model), "-f", str(DATA / "tinystory.txt"), "-c", str(CTX),
             "-t", "2", "--max-tokens", str(MAX_TOKENS), "-o", str(out), "--dump-samples", str(samples),
             "--sample-rate", str(RATE)])
    assert r.returncode == 0, r.stderr
    assert "ETA" in r.stderr
    return out, samples, r.stdout


def active_and_ambiguous(gate, up, cut=0.0):
    act = (gate > cut) & (up != 0)
    amb = (np.abs(gate - cut) < EPS) | ((gate > cut) & (np.abs(up) < EPS))
    return act, amb


def check_counts(out, reference, cut=0.0):
    reader, w = tensors(out)
    n_tok = len(reference[0][0])
    assert int(reader.fields["optiml.sparse.calib_tokens"].parts[-1][0]) == n_tok == MAX_TOKENS
    n_amb = 0
    for il, (_, gate, up) in enumerate(reference):
        freq = w[f"blk.{il}.ffn_act_freq"]
        assert freq.dtype == np.float32 and freq.shape == (N_FF,)
        assert np.all((freq >= 0) & (freq <= 1))
        act, amb = active_and_ambiguous(gate, up, cut)
        ours = np.rint(freq.astype(np.float64) * n_tok)
        diff = np.abs(ours - act.sum(axis=0))
        bad = np.nonzero(diff > amb.sum(axis=0))[0]
        assert len(bad) == 0, f"layer {il}: neurons {bad[:10]} differ by {diff[bad[:10]]}"
        n_amb += amb.sum()
    assert n_amb < 0.01 * n_tok * N_FF * N_LAYER  # the comparison is not vacuous
    return reader


def test_profile_counts_match_numpy(profiled, reference):
    check_counts(profiled[0], reference)


def test_profile_fatrelu_threshold(work, model):
    """--act-threshold: the forward pass cuts gate values <= T (FATReLU), and
    the file records T."""
    out = work / "fatrelu.gguf"
    r = run([tool("optiml-profile"), "-m", str(model), "-f", str(DATA / "tinystory.txt"), "-c", str(CTX),
             "--max-tokens", str(MAX_TOKENS), "-o", str(out), "--act-threshold", "0.5"])
    assert r.returncode == 0, r.stderr
    reader = check_counts(out, reference_pass(model, 0.5), 0.5)
    assert reader.fields["optiml.sparse.act_threshold"].parts[-1][0] == 0.5


def power_law(counts):
    c = np.sort(counts)[::-1].astype(np.float64)
    cum = np.cumsum(c)
    k = int(np.searchsorted(cum, 0.8 * cum[-1] - 1e-9)) + 1
    return k / len(c), c[: (len(c) + 9) // 10].sum() / cum[-1]


def test_profile_statistics(profiled):
    out, _, stdout = profiled
    _, w = tensors(out)
    rows = {"".join(ln.split()[:2]) if ln.startswith("layer ") else "model": ln.split()
            for ln in stdout.splitlines() if ln.startswith(("layer ", "model "))}
    freqs = [w[f"blk.{il}.ffn_act_freq"].astype(np.float64) for il in range(N_LAYER)]
    for il, f in enumerate(freqs):
        sp, hot80, top10, dead = map(float, rows[f"layer{il}"][2:6])
        assert sp == pytest.approx(np.mean(1 - f), abs=1e-4)
        ref_hot, ref_top = power_law(f)
        assert hot80 == pytest.approx(ref_hot, abs=1e-4) and top10 == pytest.approx(ref_top, abs=1e-4)
        assert dead == pytest.approx(np.mean(f == 0), abs=1e-4)
    sp, hot80, top10, _ = map(float, rows["model"][1:5])
    assert sp == pytest.approx(np.mean([np.mean(1 - f) for f in freqs]), abs=1e-4)
    ref_hot, ref_top = power_law(np.concatenate(freqs))
    assert hot80 == pytest.approx(ref_hot, abs=1e-4) and top10 == pytest.approx(ref_top, abs=1e-4)


def assert_copy_keeps(src, dst, replaced=()):
    """Every key and tensor of src is in dst byte for byte (except replaced)."""
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    for name, f in a.fields.items():
        if name.startswith("GGUF.") or name in replaced:
            continue
        assert name in b.fields, name
        g = b.fields[name]
        assert f.types == g.types and b"".join(p.tobytes() for p in f.parts) == \
            b"".join(p.tobytes() for p in g.parts), name
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        if t.name in replaced:
            continue
        u = tb[t.name]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), t.name
        assert np.asarray(t.data).tobytes() == np.asarray(u.data).tobytes(), t.name


def ffn_hash(reader):
    by = {t.name: t for t in reader.tensors}
    data = b"".join(np.asarray(by[f"blk.{il}.{r}.weight"].data).tobytes()
                    for il in range(N_LAYER) for r in ("ffn_gate", "ffn_up", "ffn_down"))
    return xxh64(data)


def test_profile_output_keeps_the_model(model, profiled):
    out = profiled[0]
    assert_copy_keeps(model, out)
    r = gguf.GGUFReader(str(out))
    assert int(r.fields["optiml.sparse.version"].parts[-1][0]) == 1
    assert bytes(r.fields["optiml.sparse.weights_hash"].parts[-1]).decode() == f"{ffn_hash(r):016x}"
    added = {t.name for t in r.tensors} - {t.name for t in gguf.GGUFReader(str(model)).tensors}
    assert added == {f"blk.{il}.ffn_act_freq" for il in range(N_LAYER)}


# ---- the sample file (docs/FORMAT.md, "Predictor samples") ----

def read_samples(path):
    raw = path.read_bytes()
    assert raw[:4] == b"OMSP"
    version, n_layer, n_embd, n_ff, flags = struct.unpack_from("<5I", raw, 4)
    n_samples, rec, whash = struct.unpack_from("<3Q", raw, 24)
    act_thr, rate = struct.unpack_from("<2f", raw, 48)
    (n_tokens,) = struct.unpack_from("<Q", raw, 56)
    mb = (n_ff + 7) // 8
    body = np.frombuffer(raw, np.uint8, offset=64).reshape(n_layer, n_samples, rec)
    tok = body[:, :, :8].copy().view("<u8")[..., 0]
    x = body[:, :, 8:8 + 4 * n_embd].copy().view("<f4")
    mask = np.unpackbits(body[:, :, 8 + 4 * n_embd:8 + 4 * n_embd + mb], axis=-1, bitorder="little")[..., :n_ff]
    off = 8 + 4 * n_embd + mb
    mag = body[:, :, off:off + 2 * n_ff].copy().view("<f2").astype(np.float32) if flags & 1 else None
    assert body[:, :, off + (2 * n_ff if flags & 1 else 0):].max(initial=0) == 0  # padding is zero
    hdr = dict(version=version, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, flags=flags, n_samples=n_samples,
               rec=rec, hash=whash, act_thr=act_thr, rate=rate, n_tokens=n_tokens)
    return hdr, tok, x, mask.astype(bool), mag


def test_samples_match_numpy(profiled, reference, model):
    hdr, tok, x, mask, mag = read_samples(profiled[1])
    assert (hdr["version"], hdr["n_layer"], hdr["n_embd"], hdr["n_ff"], hdr["flags"]) == (1, N_LAYER, N_EMBD, N_FF, 1)
    assert hdr["rec"] % 8 == 0 and hdr["n_tokens"] == MAX_TOKENS and hdr["act_thr"] == 0
    assert hdr["hash"] == ffn_hash(gguf.GGUFReader(str(model)))
    n = hdr["n_samples"]
    sd = np.sqrt(MAX_TOKENS * RATE * (1 - RATE))
    assert abs(n - MAX_TOKENS * RATE) < 5 * sd
    assert np.all(tok == tok[0]) and np.all(np.diff(tok[0].astype(np.int64)) > 0) and tok[0, -1] < MAX_TOKENS
    for il, (xn, gate, up) in enumerate(reference):
        t = tok[il].astype(np.int64)
        np.testing.assert_allclose(x[il], xn[t], rtol=1e-4, atol=1e-4)
        act, amb = active_and_ambiguous(gate[t], up[t])
        assert np.all((mask[il] == act) | amb)
        h = np.abs(np.maximum(gate[t], 0) * up[t])
        np.testing.assert_allclose(mag[il], h, rtol=2e-3, atol=1e-3)
        assert np.all((mag[il] > 0) <= mask[il])


# ---- training ----

def train(work, profiled, name, *extra):
    out = work / f"{name}.gguf"
    r = run([tool("optiml-train-predictor"), "-m", str(profiled[0]), "--samples", str(profiled[1]), "-o",
             str(out), "--epochs", "20", "--batch", "64", *extra])
    assert r.returncode == 0, r.stderr
    assert "epoch 20/20" in r.stderr and "held-out" in r.stderr
    rows = {}
    for ln in r.stdout.splitlines():
        f = ln.split()
        if f[0] == "layer":
            rows[int(f[1])] = {f[i]: float(f[i + 1]) for i in range(2, len(f) - 1, 2)}
    assert sorted(rows) == list(range(N_LAYER)), r.stdout
    return out, rows


@pytest.mark.parametrize("measure,target,extra", [("mass", 0.99, ["--rank", "16", "-t", "2"]),
                                                   ("count", 0.95, ["--rank-per-layer", "--rank", "16",
                                                                    "--type", "f32", "-t", "1"]),
                                                   ("mass", 0.99, ["--rank-per-layer", "--type", "q8_0", "-t", "2"])])
def test_trained_predictor_reproduces_its_recall(work, profiled, measure, target, extra):
    out, rows = train(work, profiled, f"pred-{measure}-{extra[-3]}", "--recall", str(target), "--recall-of", measure,
                      *extra)
    assert_copy_keeps(profiled[0], out)
    hdr, _, x, mask, mag = read_samples(profiled[1])
    reader, w = tensors(out)
    f = reader.fields["optiml.sparse.layer_threshold"]
    thr = np.array([f.parts[i][0] for i in f.data], dtype=np.float32)
    assert thr.shape == (N_LAYER,)
    hold = np.arange(hdr["n_samples"]) % 10 == 9
    for il in range(N_LAYER):
        fc1, fc2 = w[f"blk.{il}.fc1.weight"].astype(np.float64), w[f"blk.{il}.fc2.weight"].astype(np.float64)
        r = int(rows[il]["rank"])
        assert fc1.shape == (r, N_EMBD) and fc2.shape == (N_FF, r)
        assert thr[il] == pytest.approx(rows[il]["threshold"], rel=1e-6, abs=1e-9)
        logits = np.maximum(x[il][hold] @ fc1.T, 0) @ fc2.T
        pred, act = logits > thr[il], mask[il][hold]
        weight = mag[il][hold] if measure == "mass" else act.astype(np.float64)
        recall = (weight * (pred & act)).sum() / (weight * act).sum()
        assert rows[il]["recall"] >= target
        assert recall == pytest.approx(rows[il]["recall"], abs=2e-3) and recall >= target - 2e-3
        assert (pred & act).sum() / act.sum() == pytest.approx(rows[il]["recall_count"], abs=2e-3)
        assert (pred & act).sum() / pred.sum() == pytest.approx(rows[il]["precision"], abs=2e-3)
        assert 1 - pred.mean() == pytest.approx(rows[il]["pred_sparsity"], abs=2e-3)
        assert 1 - act.mean() == pytest.approx(rows[il]["sparsity"], abs=1e-4)
        # a predictor that learned something predicts fewer than all neurons
        assert pred.mean() < 0.85, pred.mean()


def test_training_does_not_depend_on_threads(work, profiled):
    a, _ = train(work, profiled, "t1", "--rank", "8", "-t", "1")
    b, _ = train(work, profiled, "t2", "--rank", "8", "-t", "2")
    assert a.read_bytes() == b.read_bytes()


def test_samples_of_other_weights_are_refused(work, profiled):
    other = work / "other.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(other), "--n-embd", str(N_EMBD), "--n-layer",
             str(N_LAYER), "--n-ff", str(N_FF), "--n-head", str(N_HEAD), "--n-vocab", str(N_VOCAB),
             "--act", "relu", "--seed", "8"])
    assert r.returncode == 0, r.stderr
    r = run([tool("optiml-train-predictor"), "-m", str(other), "--samples", str(profiled[1]), "-o",
             str(work / "never.gguf")])
    assert r.returncode != 0 and "other FFN weights" in r.stderr
    assert not (work / "never.gguf").exists()


def test_q8_0_rank_must_fill_blocks(work, profiled):
    out = work / "never-q8.gguf"
    r = run([tool("optiml-train-predictor"), "-m", str(profiled[0]), "--samples", str(profiled[1]), "-o", str(out),
             "--rank", "16", "--type", "q8_0"])
    assert r.returncode != 0 and "multiple of 32" in r.stderr, r.stderr
    assert not out.exists()
