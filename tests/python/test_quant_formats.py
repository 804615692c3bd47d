"""Our GGUF block formats against gguf-py's independent numpy implementation
(gguf.quants): random blocks dequantized by our reference C code must equal
gguf-py's dequantization exactly, and our quantizers of the 32-value types
must produce gguf-py's bytes exactly (gguf-py follows ggml's reference
rounding for them). gguf-py cannot quantize the k-quants; for those our
quantizer's output, dequantized by gguf-py, must be within the type's
round-trip error (the bounds of tests/test_quant.c)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from conftest import run, tool

# type -> byte offsets of its f16 scales inside a block
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
# relative RMS round-trip bounds for x uniform in [-1, 1) (tests/test_quant.c)
ROUND_TRIP = {T.Q2_K: 0.42, T.Q3_K: 0.16, T.Q4_K: 0.085, T.Q5_K: 0.042, T.Q6_K: 0.021}


def quant_tool(tmp_path, mode, qtype, data: np.ndarray) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    data.tofile(src)
    r = run([tool("quant_tool"), mode, qtype.name.lower(), str(src), str(dst)])
    assert r.returncode == 0, r.stderr
    return np.fromfile(dst, dtype=np.float32 if mode == "dequantize" else np.uint8)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    block, size = quants.GGML_QUANT_SIZES[qtype]
    n_blocks = 300
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:  # sane scales: f16 of magnitude 1e-4..1, either sign
        scale = (rng.uniform(1e-4, 1.0, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    ours = quant_tool(tmp_path, "dequantize", qtype, raw)
    ref = quants.dequantize(raw, qtype).reshape(-1)
    assert ours.shape == ref.shape == (n_blocks * block,)
    assert np.array_equal(ours, ref), f"{qtype.name}: {np.sum(ours != ref)} values differ, " \
        f"max {np.max(np.abs(ours - ref))}"


def random_rows(rng, n_blocks, block):
    x = rng.standard_normal((n_blocks, block)).astype(np.float32)
    x[::7] *= 1000.0          # large blocks
    x[3::11] *= 1e-3          # small blocks
    x[5] = 0.0                # an all-zero block
    x[6] = 0.25               # a constant block
    x[8, :4] = [1.0, -1.0, 1.0, -1.0]  # ties on the largest magnitude
    x[8, 4:] = 0.5
    return x


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_quantize_bit_exact(tmp_path, qtype):
    rng = np.random.default_rng(100 + int(qtype))
    x = random_rows(rng, 512, 32)
    ours = quant_tool(tmp_path, "quantize", qtype, x)
    ref = quants.quantize(x, qtype).reshape(-1)
    assert ours.shape == ref.shape
    diff = np.nonzero(ours != ref)[0]
    assert diff.size == 0, f"{qtype.name}: {diff.size} bytes differ, first at byte {diff[0]}"


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda t: t.name)
def test_kquant_round_trip_through_gguf_py(tmp_path, qtype):
    rng = np.random.default_rng(200 + int(qtype))
    x = rng.uniform(-1, 1, size=(64, 256)).astype(np.float32)
    blocks = quant_tool(tmp_path, "quantize", qtype, x)
    _, size = quants.GGML_QUANT_SIZES[qtype]
    y = quants.dequantize(blocks.reshape(-1, size), qtype).reshape(x.shape)
    err = np.sqrt(np.sum((y - x) ** 2) / np.sum(x ** 2))
    print(f"{qtype.name}: relative RMS error {err:.4f} (bound {ROUND_TRIP[qtype]})")
    assert err <= ROUND_TRIP[qtype]
