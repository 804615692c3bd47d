#!/usr/bin/env python3
"""convert.py - convert a model to OptiML GGUF (a thin wrapper over the C tool).

    python convert.py --outfile OUT.gguf WEIGHTS [PREDICTOR_DIR]

WEIGHTS is a Hugging Face Llama directory (config.json, *.safetensors,
tokenizer.model or tokenizer.json) or a llama2.c checkpoint (.bin), whose
tokenizer is --tokenizer, else tokenizer.bin or the only tok*.bin next to it.
The work is done by optiml-convert: $OPTIML_CONVERT if set, else
build/bin/optiml-convert, which is built with cmake first if it is missing.

PREDICTOR_DIR (with a Hugging Face ReLU model) holds PowerInfer-style
predictors, as PowerInfer's own convert.py takes them: model_N.pt per layer,
a torch state dict with fc1.weight (r, n_embd) and fc2.weight (n_ff, r),
optionally config.json with "sparse_threshold", and activation counts
activation_N.pt (a tensor of n_ff per-neuron counts; looked for in
--activation, PREDICTOR_DIR/activation, PREDICTOR_DIR, WEIGHTS/activation).
They are turned into OptiML's sparse keys and tensors (docs/FORMAT.md,
"PowerInfer files"): fc1 divided by the layer's ffn_norm weight per input
column (PowerInfer's predictor reads the residual before the norm, ours the
normed input: the same active set, see src/powerinfer.h), threshold t ->
optiml.sparse.layer_threshold = the largest float32 below t (PowerInfer
fires on score >= t; default t = 0), counts -> ffn_act_freq = counts /
--calib-tokens (else counts / the largest count). They go to optiml-convert
--sparse as a small GGUF; optiml-convert writes the model, its ffn_down_t
and these. Needs torch and numpy; without a predictor, the standard
library is enough.
"""
import argparse
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent


def fail(msg, code=1):
    print(f"convert.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


def find_tool() -> str:
    """optiml-convert: $OPTIML_CONVERT, else build/bin/ (built if missing)."""
    env = os.environ.get("OPTIML_CONVERT")
    if env:
        if not os.access(env, os.X_OK):
            fail(f"OPTIML_CONVERT={env} is not an executable file")
        return env
    tool = ROOT / "build" / "bin" / "optiml-convert"
    if tool.exists():
        return str(tool)
    if not shutil.which("cmake"):
        fail(f"{tool} is missing and cmake is not installed to build it")
    print(f"convert.py: building {tool} with cmake", file=sys.stderr)
    build = ROOT / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "--target", "optiml-convert", "-j",
                 str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, stdout=sys.stderr)
        if r.returncode != 0:
            fail(f"building optiml-convert failed: {' '.join(cmd)}")
    if not tool.exists():
        fail(f"the build did not produce {tool}")
    return str(tool)


def find_tokenizer(ckpt: pathlib.Path) -> pathlib.Path:
    """tokenizer.bin next to the checkpoint, else the only tok*.bin there."""
    here = ckpt.parent
    if (here / "tokenizer.bin").is_file():
        return here / "tokenizer.bin"
    found = sorted(p for p in here.glob("tok*.bin") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        fail(f"no tokenizer.bin or tok*.bin next to {ckpt}: pass --tokenizer TOK.bin")
    fail(f"several tokenizers next to {ckpt} ({', '.join(p.name for p in found)}): "
         "pass --tokenizer TOK.bin")


# ---- PowerInfer-style predictors -> a GGUF for optiml-convert --sparse ------

def write_side_gguf(path, kvs, tensors):
    """A minimal GGUF v3: kvs = [(key, gguf value type, value)], tensors =
    [(name, float32 or float16 numpy array)], aligned to 32."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    for key, typ, val in kvs:
        out.append(s(key) + struct.pack("<I", typ))
        if typ == 4:  # uint32
            out.append(struct.pack("<I", val))
        elif typ == 10:  # uint64
            out.append(struct.pack("<Q", val))
        elif typ == 9:  # array of float32
            out.append(struct.pack("<IQ", 6, len(val)) + struct.pack(f"<{len(val)}f", *val))
    offset, blobs = 0, []
    for name, arr in tensors:
        typ = {"float32": 0, "float16": 1}[arr.dtype.name]
        dims = arr.shape[::-1]  # GGUF: ne[0] is the row length
        out.append(s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                   + struct.pack("<IQ", typ, offset))
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    head = b"".join(out)
    head += b"\0" * (-len(head) % 32)
    with open(path, "wb") as f:
        f.write(head)
        for b in blobs:
            f.write(b)


def hf_norm_weights(weights, n_layer):
    """post_attention_layernorm (the FFN's RMSNorm) weight of every layer, f32."""
    from safetensors import safe_open
    want = {f"model.layers.{i}.post_attention_layernorm.weight": i for i in range(n_layer)}
    found = {}
    for f in sorted(weights.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k in want:
                    found[want[k]] = st.get_tensor(k).float().numpy()
    missing = [i for i in range(n_layer) if i not in found]
    if missing:
        fail(f"{weights}: no post_attention_layernorm.weight for layers {missing}")
    return [found[i] for i in range(n_layer)]


def load_pt(path):
    import torch
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        fail(f"{path}: cannot read: {e}")


def activation_dir(args, pred, weights):
    dirs = [pathlib.Path(args.activation)] if args.activation else [
        pred / "activation", pred, weights / "activation"]
    for d in dirs:
        if (d / "activation_0.pt").is_file():
            return d
    if args.activation:
        fail(f"{args.activation}: no activation_0.pt")
    return None


def predictor_side_file(args, weights, pred, path):
    """Read the predictor directory, write the --sparse GGUF to path."""
    import json
    import numpy as np
    cfg = json.loads((weights / "config.json").read_text())
    n_layer, n_embd, n_ff = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    if cfg.get("hidden_act") not in ("relu",):
        print(f"convert.py: warning: {weights} has hidden_act {cfg.get('hidden_act')!r}: "
              "PowerInfer's predictors are for ReLU models", file=sys.stderr)
    norms = hf_norm_weights(weights, n_layer)
    tensors = []
    for i in range(n_layer):
        f = pred / f"model_{i}.pt"
        if not f.is_file():
            fail(f"{pred}: no model_{i}.pt (the model has {n_layer} layers)")
        sd = load_pt(f)
        if not isinstance(sd, dict) or "fc1.weight" not in sd or "fc2.weight" not in sd:
            fail(f"{f}: expected a state dict with fc1.weight and fc2.weight")
        fc1 = sd["fc1.weight"].float().numpy()
        fc2 = sd["fc2.weight"].float().numpy()
        if fc1.ndim != 2 or fc1.shape[1] != n_embd or fc2.shape != (n_ff, fc1.shape[0]):
            fail(f"{f}: fc1.weight {tuple(fc1.shape)}, fc2.weight {tuple(fc2.shape)}: expected "
                 f"(r, {n_embd}) and ({n_ff}, r)")
        w = norms[i]
        if (w == 0).any():
            print(f"convert.py: warning: layer {i}: {int((w == 0).sum())} ffn_norm weights are 0: "
                  "the predictor cannot see those inputs", file=sys.stderr)
        safe = np.where(w == 0, 1.0, w).astype(np.float32)
        folded = np.where(w == 0, 0.0, fc1 / safe[None, :]).astype(np.float32)
        tensors += [(f"blk.{i}.fc1.weight", folded), (f"blk.{i}.fc2.weight", fc2.astype(np.float32))]

    t = args.sparse_threshold
    if t is None and (pred / "config.json").is_file():
        t = json.loads((pred / "config.json").read_text()).get("sparse_threshold")
    t = np.float32(0.0 if t is None else t)
    if t != 0:
        print(f"convert.py: warning: sparse_threshold {t}: PowerInfer applies it to scores of the "
              "un-normed input; OptiML's predictor reads the normed input, so it is exact only "
              "for 0", file=sys.stderr)
    thr = float(np.nextafter(t, np.float32(-np.inf)))
    kvs = [("optiml.sparse.version", 4, 1), ("optiml.sparse.layer_threshold", 9, [thr] * n_layer)]

    adir = activation_dir(args, pred, weights)
    if adir is None:
        print("convert.py: no activation_N.pt found: no ffn_act_freq", file=sys.stderr)
    else:
        for i in range(n_layer):
            f = adir / f"activation_{i}.pt"
            if not f.is_file():
                fail(f"{adir}: no activation_{i}.pt (the model has {n_layer} layers)")
            counts = load_pt(f)
            counts = np.asarray(counts.double().numpy() if hasattr(counts, "double") else counts,
                                dtype=np.float64).reshape(-1)
            if counts.shape != (n_ff,) or not np.isfinite(counts).all() or (counts < 0).any():
                fail(f"{f}: expected {n_ff} finite counts >= 0, got shape {counts.shape}")
            den = float(args.calib_tokens) if args.calib_tokens else max(float(counts.max()), 1.0)
            if args.calib_tokens and counts.max() > args.calib_tokens:
                fail(f"{f}: a count of {counts.max():g} exceeds --calib-tokens {args.calib_tokens}")
            tensors.append((f"blk.{i}.ffn_act_freq", (counts / den).astype(np.float32)))
        if args.calib_tokens:
            kvs.append(("optiml.sparse.calib_tokens", 10, int(args.calib_tokens)))
    write_side_gguf(path, kvs, tensors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Hugging Face Llama directory (with PowerInfer-style predictors) "
                    "or a llama2.c checkpoint to OptiML GGUF (runs optiml-convert).")
    ap.add_argument("--outfile", required=True, help="the GGUF file to write")
    ap.add_argument("--outtype", choices=["f32", "f16", "bf16"],
                    help="matrix type (default: f32 for llama2.c, the checkpoint's for HF)")
    ap.add_argument("--name", help="general.name (default: the input's name)")
    ap.add_argument("--tokenizer", help="llama2.c tokenizer.bin (llama2.c checkpoints only)")
    ap.add_argument("--activation", help="directory of activation_N.pt (default: searched)")
    ap.add_argument("--calib-tokens", type=int,
                    help="tokens the activation counts were taken over (default: unknown, "
                         "frequencies relative to the most active neuron)")
    ap.add_argument("--sparse-threshold", type=float,
                    help="PowerInfer's predictor threshold (default: PREDICTOR_DIR/config.json's "
                         "sparse_threshold, else 0)")
    ap.add_argument("weights", help="HF model directory or llama2.c checkpoint (.bin)")
    ap.add_argument("predictor", nargs="?",
                    help="directory of PowerInfer-style predictors model_N.pt (HF models)")
    args = ap.parse_args(argv)

    weights = pathlib.Path(args.weights)
    if args.predictor is not None and not weights.is_dir():
        fail("a predictor directory goes with a Hugging Face model directory", code=2)
    if args.predictor is None and (args.activation or args.calib_tokens or
                                   args.sparse_threshold is not None):
        fail("--activation, --calib-tokens and --sparse-threshold need a predictor directory", code=2)
    if weights.is_dir():
        if args.tokenizer:
            fail("--tokenizer is for llama2.c checkpoints; a HF directory brings its own")
        cmd = ["--hf", str(weights)]
    elif weights.is_file():
        tok = pathlib.Path(args.tokenizer) if args.tokenizer else find_tokenizer(weights)
        cmd = ["--llama2c", str(weights), "--tokenizer", str(tok)]
    else:
        fail(f"{weights}: no such file or directory")
    cmd += ["--outfile", args.outfile]
    if args.outtype:
        cmd += ["--outtype", args.outtype]
    if args.name:
        cmd += ["--name", args.name]
    tool = find_tool()
    if args.predictor is None:
        return subprocess.run([tool, *cmd]).returncode
    pred = pathlib.Path(args.predictor)
    if not pred.is_dir():
        fail(f"{pred}: not a directory")
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        fail(f"reading predictors needs torch and numpy ({e})")
    with tempfile.TemporaryDirectory(prefix="optiml-convert-") as tmp:
        side = pathlib.Path(tmp) / "sparse.gguf"
        predictor_side_file(args, weights, pred, side)
        return subprocess.run([tool, *cmd, "--sparse", str(side)]).returncode


if __name__ == "__main__":
    sys.exit(main())
