"""Shared fixtures of the Python tests: where the built tools and the
shipped data are. The tools come from OPTIML_BIN_DIR, else build/bin."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
MODELS = ROOT / "models"


def bin_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("OPTIML_BIN_DIR", ROOT / "build" / "bin"))


def tool(name: str) -> str:
    path = bin_dir() / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build the project first (see README.md)")
    return str(path)


def gpt2_byte_chars() -> dict:
    """GPT-2's byte -> character table of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def run(args, **kw):
    """Run a command, capturing text output; never raises on exit codes."""
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


@pytest.fixture(scope="session")
def stories_gguf(tmp_path_factory) -> pathlib.Path:
    """stories260K converted afresh from the llama2.c checkpoint."""
    out = tmp_path_factory.mktemp("stories") / "stories260K.gguf"
    r = run([tool("optiml-convert"), "--llama2c", str(MODELS / "stories260K.bin"),
             "--tokenizer", str(MODELS / "tok512.bin"), "--outfile", str(out)])
    assert r.returncode == 0, r.stderr
    return out
