"""optiml-quantize end to end: a random-weight model quantized to every
type keeps its metadata and untouched tensors (read back with gguf-py), and
its logits stay close to the f32 model's; stories260K in q8_0 still
reproduces llama2.c's greedy ids; bad input fails with one line."""
import numpy as np
import pytest
from gguf import GGUFReader
from gguf import GGMLQuantizationType as T

from conftest import DATA, MODELS, run, tool

IDS = ["1", "300", "301", "302", "400", "500", "600", "700", "800", "900", "999", "5", "17"]
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# Relative RMS error of the logits against the f32 model. Measured on this
# 2-layer model it is about 4x the weight round-trip error of the type (the
# errors of about nine quantized matmuls in series add up, plus 8-bit
# activations); the bound is 6x the round-trip bound of tests/test_quant.c,
# capped at 0.9 (uncorrelated logits of the same scale would give about 1.4).
# Mixtures use their base type's bound. f16/bf16: rounding of the weights
# only (relative 2^-11 / 2^-8 per weight, a few times that in the logits).
ROUND_TRIP = {"q4_0": 0.085, "q4_1": 0.085, "q5_0": 0.042, "q5_1": 0.042, "q8_0": 0.005,
              "q2_k": 0.42, "q3_k": 0.16, "q4_k": 0.085, "q5_k": 0.042, "q6_k": 0.021}
MIXTURES = {"q3_k_m": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k"}
BOUND = {t: min(0.9, 6 * b) for t, b in ROUND_TRIP.items()}
BOUND.update({m: BOUND[b] for m, b in MIXTURES.items()})
BOUND.update({"f16": 0.003, "bf16": 0.02, "f32": 0.0})
# llama.cpp's general.file_type numbers
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
             "q3_k": 11, "q3_k_m": 12, "q4_k": 14, "q4_k_s": 14, "q4_k_m": 15, "q5_k": 16, "q5_k_s": 16,
             "q5_k_m": 17, "q6_k": 18, "bf16": 32}
# Against the same quantized weights dequantized to f32 (optiml-quantize
# --type f32, whose dequantizers equal gguf-py's: test_quant_formats.py),
# only the 8-bit activations differ: 0.4% relative per q8 row, about 2% in
# the logits after the ~15 quantized matmul inputs of this model.
ACT_BOUND = 0.04


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits(tmp_path, model, *extra):
    out = tmp_path / (model.stem + "".join(extra) + ".f32")
    r = run([tool("optiml-dump-logits"), "-m", str(model), "-o", str(out), "-t", "2", *extra, *IDS])
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype=np.float32)


def quantize(src, dst, qtype):
    r = run([tool("optiml-quantize"), "--input", str(src), "--output", str(dst), "--type", qtype,
             "--threads", "2"])
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    path = d / "random.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(path), "--n-embd", "256", "--n-layer", "2",
             "--n-ff", "512", "--n-head", "4", "--n-vocab", "1000"])
    assert r.returncode == 0, r.stderr
    return path, logits(d, path)


def expected_type(qtype, name):
    """Type a tensor of the random model should get (its rows are 256 or
    512 long, so no fallbacks)."""
    base = MIXTURES.get(qtype, qtype)
    if name in ("token_embd.weight", "output.weight"):
        return "q6_k" if qtype in MIXTURES else base
    layer, role = int(name.split(".")[1]), name.split(".")[2]
    if qtype in ("q4_k_m", "q5_k_m") and role in ("attn_v", "ffn_down"):
        n = 2  # llama.cpp's rule for the layers that get more bits
        more = layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2
        return "q6_k" if more else base
    if qtype == "q3_k_m" and role in ("attn_v", "ffn_down", "attn_output"):
        return "q5_k" if role == "attn_v" and layer < 2 else "q4_k"
    return base


@pytest.mark.parametrize("qtype", list(BOUND))
def test_quantize_random_model(tmp_path, random_model, qtype):
    src, ref = random_model
    dst = tmp_path / f"m-{qtype}.gguf"
    quantize(src, dst, qtype)

    a, b = GGUFReader(str(src)), GGUFReader(str(dst))
    fa, fb = a.fields, b.fields
    for key, field in fa.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert key in fb, key
        assert field.types == fb[key].types, key
        assert all(np.array_equal(field.parts[i], fb[key].parts[i]) for i in field.data), key
    assert int(fb["general.file_type"].parts[-1][0]) == FILE_TYPE[qtype]
    ta = {t.name: t for t in a.tensors}
    for t in b.tensors:
        s = ta.pop(t.name)
        assert list(t.shape) == list(s.shape), t.name
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == T.F32 and np.array_equal(t.data, s.data), t.name
        else:
            assert t.tensor_type.name.lower() == expected_type(qtype, t.name), t.name
    assert not ta, f"tensors missing from the output: {sorted(ta)}"

    got = logits(tmp_path, dst)
    err = rel(got, ref)
    print(f"{qtype}: logits relative RMS error {err:.4f} (bound {BOUND[qtype]})")
    assert err <= BOUND[qtype]
    # quantized: decode (dot_q) and the prompt GEMM sum the same products in
    # another order; a last-bit difference may move an 8-bit activation of
    # a later matmul by one step (test_long_batch_matches_decode), ~1-2% here
    one = logits(tmp_path, dst, "--one-by-one")
    tol = 1e-4 if qtype in ("f16", "bf16", "f32") else 5e-2
    assert np.max(np.abs(one - got)) <= tol * np.max(np.abs(got)), "decode and prompt paths disagree"
    if qtype in ("f16", "bf16", "f32"):
        return
    deq = tmp_path / f"m-{qtype}-f32.gguf"
    quantize(dst, deq, "f32")
    act_err = rel(got, logits(tmp_path, deq))
    print(f"{qtype}: against its dequantized weights {act_err:.4f} (bound {ACT_BOUND})")
    assert act_err <= ACT_BOUND


def greedy_reference():
    text = (DATA / "stories260K_greedy.txt").read_text()
    line = next(l for l in text.splitlines() if l.startswith("generated_ids:"))
    return [int(x) for x in line.split()[1:]]


def test_stories260k_q8_0_greedy(tmp_path):
    """q8_0 weights (ffn_down, 172 wide, falls back to f16) and 8-bit
    activations perturb the logits by ~1%; greedy decoding follows the f32
    reference for a long stretch (114 tokens when measured): the first 64
    ids must be identical."""
    dst = tmp_path / "stories-q8_0.gguf"
    r = quantize(MODELS / "stories260K.gguf", dst, "q8_0")
    assert r.stderr.count("using f16") == 5  # the five ffn_down matrices
    ref = greedy_reference()
    r = run([tool("optiml-cli"), "-m", str(dst), "-p", "", "--temp", "0", "-n", str(len(ref)), "--show-ids"])
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stderr.splitlines() if l.startswith("generated_ids:"))
    got = [int(x) for x in line.split()[1:]]
    assert got[:64] == ref[:64]


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q2_k", "q4_k_m", "q6_k"])
def test_stories260k_fallbacks_load(tmp_path, qtype):
    """Rows of 64 and 172 values: k-quants fall back (to q4_0/q5_0/q5_1/
    q8_0, then f16 for 172); the result loads and generates."""
    dst = tmp_path / f"stories-{qtype}.gguf"
    r = quantize(MODELS / "stories260K.gguf", dst, qtype)
    assert "not a multiple" in r.stderr
    r = run([tool("optiml-cli"), "-m", str(dst), "-p", "Once upon a time", "--temp", "0", "-n", "16"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > 20


@pytest.mark.parametrize("args", [
    ["--type", "q4_0"],                                   # no input/output
    ["--input", "/nonexistent.gguf", "--output", "x.gguf", "--type", "q4_0"],
    ["--input", str(MODELS / "stories260K.gguf"), "--output", "x.gguf", "--type", "q7_z"],
    ["--input", str(MODELS / "stories260K.gguf"), "--output", "x.gguf", "--type", "q4_0", "--threads", "0"],
    ["--bogus", "1"],
])
def test_bad_input(tmp_path, args):
    r = run([tool("optiml-quantize"), *args], cwd=tmp_path)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("optiml-quantize: ")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_repacked_matches_file_rows(tmp_path, qtype):
    """The CPU multiplies q4_0 and q4_k matrices from a copy repacked at load, 8
    rows interleaved (cpu/ops.h's x8 panels); rows past the last full 8
    (here 3 of the 1003-row head) from the file. --no-repack multiplies
    every row from the file. One token at a time the panels' kernel and the
    row kernel add the same exact integer block sums in float in another
    order, so they agree to rounding (3.5e-7 and 3.2e-7 of the largest
    logit, q4_0 and q4_k, when written); a batch goes through the prompt
    GEMM, whose panel is the same
    from either (bit for bit in test_ops). A dropped or misplaced row would
    move logits by far more than 1e-3."""
    f32 = tmp_path / "odd.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(f32), "--n-embd", "256", "--n-layer", "2",
             "--n-ff", "512", "--n-head", "4", "--n-vocab", "1003"])
    assert r.returncode == 0, r.stderr
    q = tmp_path / f"odd-{qtype}.gguf"
    quantize(f32, q, qtype)
    assert all(t.tensor_type.name.lower() == qtype for t in GGUFReader(str(q)).tensors
               if t.name.endswith("_q.weight") or t.name == "output.weight")
    ids = [str(3 + (i * 37) % 997) for i in range(24)]
    for mode in (["--batch"], ["--one-by-one"]):
        outs = []
        for extra in ([], ["--no-repack"]):
            out = tmp_path / f"odd{mode[0]}{''.join(extra)}.f32"
            r = run([tool("optiml-dump-logits"), "-m", str(q), "-o", str(out), "-t", "2", *mode, *extra, *ids])
            assert r.returncode == 0, r.stderr
            outs.append(np.fromfile(out, dtype=np.float32))
        assert outs[0].size == 24 * 1003
        top = np.max(np.abs(outs[1]))
        diff = np.max(np.abs(outs[0] - outs[1]))
        print(f"{mode[0]}: repacked against file rows, max difference {diff / top:.2e} of the largest logit")
        assert diff <= 1e-3 * top, mode


@pytest.mark.parametrize("qtype", ["q4_k_m", "q4_0", "q8_0"])
def test_long_batch_matches_decode(tmp_path, random_model, qtype):
    """A 300-token batch quantizes its activations on the thread pool (more
    than 65536 values per matmul); batches of 20 quantize inline. Both go
    through the prompt GEMM, whose result for a token does not depend on
    its batch, so they agree to float summation order (1e-4 of the largest
    logit). One-at-a-time decode takes dot_q instead: the same products
    summed in another order (last bits); the 8-bit requantization of the
    next matmul's input turns such a difference into a one-step change of
    an activation now and then, which this random model's attention
    carries to all later tokens: about 1-2% of the largest logit here, so
    that comparison allows 5%."""
    src, _ = random_model
    dst = tmp_path / f"long-{qtype}.gguf"
    quantize(src, dst, qtype)
    ids = [str(3 + (i * 37) % 997) for i in range(300)]
    outs = []
    for mode in (["--batch"], ["--chunk", "20"], ["--one-by-one"]):
        out = tmp_path / f"long{mode[0]}.f32"
        r = run([tool("optiml-dump-logits"), "-m", str(dst), "-o", str(out), "-t", "2", *mode, *ids])
        assert r.returncode == 0, r.stderr
        outs.append(np.fromfile(out, dtype=np.float32))
    assert outs[0].size == 300 * 1000
    top = np.max(np.abs(outs[2]))
    assert np.max(np.abs(outs[0] - outs[1])) <= 1e-4 * top
    assert np.max(np.abs(outs[0] - outs[2])) <= 5e-2 * top
