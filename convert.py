#!/usr/bin/env python3
"""convert.py - convert a model to OptiML GGUF (a thin wrapper over the C tool).

    python convert.py --outfile OUT.gguf WEIGHTS [PREDICTOR]

WEIGHTS is a Hugging Face Llama directory (config.json, *.safetensors,
tokenizer.model or tokenizer.json) or a llama2.c checkpoint (.bin), whose
tokenizer is --tokenizer, else tokenizer.bin or the only tok*.bin next to it.
The work is done by optiml-convert: $OPTIML_CONVERT if set, else
build/bin/optiml-convert, which is built with cmake first if it is missing.
Standard library only.
"""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
PREDICTOR_MSG = "predictor conversion arrives with the activation-locality work (issue 5)"


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Hugging Face Llama directory or a llama2.c checkpoint to "
                    "OptiML GGUF (runs optiml-convert).")
    ap.add_argument("--outfile", required=True, help="the GGUF file to write")
    ap.add_argument("--outtype", choices=["f32", "f16", "bf16"],
                    help="matrix type (default: f32 for llama2.c, the checkpoint's for HF)")
    ap.add_argument("--name", help="general.name (default: the input's name)")
    ap.add_argument("--tokenizer", help="llama2.c tokenizer.bin (llama2.c checkpoints only)")
    ap.add_argument("weights", help="HF model directory or llama2.c checkpoint (.bin)")
    ap.add_argument("predictor", nargs="?", help="activation predictor (not supported yet)")
    args = ap.parse_args(argv)

    if args.predictor is not None:
        fail(PREDICTOR_MSG, code=2)
    weights = pathlib.Path(args.weights)
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
    return subprocess.run([find_tool(), *cmd]).returncode


if __name__ == "__main__":
    sys.exit(main())
