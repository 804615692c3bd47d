"""The Python package (bindings/python) end to end.

A session fixture creates a fresh virtual environment (no numpy, no torch)
and installs bindings/python into it with a regular `pip install`, with
OPTIML_LIBRARY unset, so the install step has to find (or build) liboptiml
itself. Every check then runs as a small script inside that environment.
Checks that need torch/transformers run with this interpreter (build/pyenv)
and the fresh environment's site-packages on PYTHONPATH. A second fresh
environment checks the editable install.

References: optiml-cli's greedy ids and text (whose own test compares them
with llama2.c's), Hugging Face transformers' tokenizer and chat-template
rendering on the same tokenizer files, and the model's own full-text
decoding for streaming."""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import DATA, MODELS, ROOT, bin_dir, run, tool

STORIES = MODELS / "stories260K.gguf"
PKG = ROOT / "bindings" / "python"


def library_under_test() -> str:
    """The liboptiml.so of the build the tests were pointed at."""
    return str((bin_dir().parent / "lib" / "liboptiml.so").resolve())


def make_venv(path: pathlib.Path, editable: bool) -> pathlib.Path:
    """python -m venv (without pip: this interpreter's pip installs into it
    through --python, which is much faster than bootstrapping pip), then
    pip install bindings/python with OPTIML_LIBRARY unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPTIML_LIBRARY", "PYTHONPATH", "PIP_USER")}
    env["OPTIML_PY_BUILD_DIR"] = str(path.parent / "setuptools-build")  # not in the shared source tree
    target = ["-e", str(PKG)] if editable else [str(PKG)]
    r = run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(path)], timeout=120)
    assert r.returncode == 0, r.stderr
    r = run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q",
             "--disable-pip-version-check"] + target, env=env, timeout=600)
    if r.returncode != 0 and "--python" in r.stderr:  # pip older than 22.3: bootstrap pip in the venv
        r = run([sys.executable, "-m", "venv", "--clear", str(path)], timeout=300)
        assert r.returncode == 0, r.stderr
        r = run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"] + target,
                env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return path


@pytest.fixture(scope="session")
def venv(tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with a regular install of bindings/python."""
    return make_venv(tmp_path_factory.mktemp("venv") / "env", editable=False)


def site_packages(env: pathlib.Path) -> str:
    r = run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def py(env: pathlib.Path, code: str, *, library: bool = True, python: str = None, timeout: int = 300,
       check: bool = True):
    """Run code with the environment's python (or `python` with the
    environment's packages on PYTHONPATH) in the repository root; the last
    stdout line is parsed as JSON. library: point OPTIML_LIBRARY at the
    tested build (else the package finds its own copy)."""
    e = {k: v for k, v in os.environ.items() if k not in ("OPTIML_LIBRARY", "PYTHONPATH")}
    if library:
        e["OPTIML_LIBRARY"] = library_under_test()
    if python:
        e["PYTHONPATH"] = site_packages(env)
    r = subprocess.run([python or str(env / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if not check:
        return r
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- installation -----------------------------------------------------------------


def test_regular_install_ships_the_library(venv):
    out = py(venv, """
        import importlib.util, json, optiml
        m = optiml.Model("models/stories260K.gguf")
        print(json.dumps({"lib": str(optiml.library_path), "pkg": optiml.__file__,
                          "numpy": importlib.util.find_spec("numpy") is not None, "n_vocab": m.n_vocab}))
    """, library=False)
    assert out["lib"].startswith(str(venv)) and out["pkg"].startswith(str(venv)), out
    assert not out["numpy"] and out["n_vocab"] == 512  # no dependency beyond the standard library


def test_editable_install(tmp_path):
    env = make_venv(tmp_path / "editable", editable=True)
    out = py(env, """
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=64)
        print(json.dumps({"pkg": optiml.__file__, "lib": str(optiml.library_path),
                          "text": llm("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]}))
    """, library=False)
    assert out["pkg"] == str(PKG / "optiml" / "__init__.py")
    assert out["lib"] in (str(ROOT / "build" / "lib" / "liboptiml.so"), str(PKG / "optiml" / "liboptiml.so"))
    assert out["text"] == ", there was a little girl"


# ---- greedy generation against optiml-cli -------------------------------------------


def greedy_cases():
    cases, cur = [], None
    for line in (DATA / "stories260K_greedy.txt").read_text().split("\n"):
        m = re.match(r"# prompt: (.*?), greedy", line)
        if m:
            cur = {"prompt": "" if m.group(1).startswith("(empty") else m.group(1)}
            cases.append(cur)
        elif line.startswith("generated_ids:"):
            cur["n"] = len(line.split()) - 1
    assert len(cases) == 2
    return cases


@pytest.mark.parametrize("case", greedy_cases(), ids=["bos-only", "once-upon-a-time"])
def test_greedy_equals_cli(venv, case):
    r = run([tool("optiml-cli"), "-m", str(STORIES), "-p", case["prompt"], "--temp", "0", "-n", str(case["n"]),
             "--show-ids", "-t", "1"])
    assert r.returncode == 0, r.stderr
    ids = {l.split(":")[0]: [int(x) for x in l.split()[1:]] for l in r.stderr.splitlines()
           if l.startswith(("prompt_ids:", "generated_ids:"))}
    out = py(venv, f"""
        import itertools, json, optiml
        prompt, n = {case["prompt"]!r}, {case["n"]}
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=512, n_threads=1)
        toks = llm.tokenize(prompt.encode())
        gen = list(itertools.islice(llm.generate(toks, temp=0), n))
        text = llm(prompt, max_tokens=n, temperature=0, echo=True)["choices"][0]["text"]
        tok = optiml.AutoTokenizer.from_pretrained("models/stories260K.gguf")
        model = optiml.AutoModelForCausalLM.from_pretrained("models/stories260K.gguf", n_ctx=512)
        hf = model.generate(tok(prompt)["input_ids"], max_new_tokens=n, do_sample=False)[0]
        print(json.dumps({{"prompt_ids": toks, "gen": gen, "text": text, "hf": hf}}))
    """)
    assert out["prompt_ids"] == ids["prompt_ids"]
    assert out["gen"] == ids["generated_ids"]
    assert out["hf"] == ids["prompt_ids"] + ids["generated_ids"]
    assert out["text"] == r.stdout


# ---- completions: shape, streaming, stop sequences, prefix reuse -----------------------


def test_completion_shape_and_streaming(venv):
    out = py(venv, """
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=256, seed=1)
        full = llm("Once upon a time", max_tokens=40, temperature=0.8, seed=7)
        chunks = list(llm("Once upon a time", max_tokens=40, temperature=0.8, seed=7, stream=True))
        again = llm.create_completion("Once upon a time", max_tokens=40, temperature=0.8, seed=7)
        other = llm("Once upon a time", max_tokens=40, temperature=0.8, seed=8)
        print(json.dumps({"full": full, "chunks": chunks, "again": again, "other": other}))
    """)
    full, chunks = out["full"], out["chunks"]
    assert set(full) == {"id", "object", "created", "model", "choices", "usage"}
    assert full["object"] == "text_completion" and full["model"] == "models/stories260K.gguf"
    c = full["choices"][0]
    assert set(c) == {"text", "index", "logprobs", "finish_reason"} and c["index"] == 0 and c["logprobs"] is None
    assert c["finish_reason"] == "length"
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
    assert len(chunks) > 10
    assert all(ch["object"] == "text_completion" and len(ch["choices"]) == 1 for ch in chunks)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["text"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "length"
    assert out["again"]["choices"][0]["text"] == c["text"]  # same seed, same text
    assert out["other"]["choices"][0]["text"] != c["text"]


def test_streaming_never_splits_utf8(venv):
    """At a high temperature stories260K emits many single-byte tokens
    (<0x80>..<0xFF>); the streamed chunks must be whole characters: their
    concatenation equals the decoding of all generated bytes at once."""
    out = py(venv, """
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=512)
        kw = dict(temp=100.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
        prompt = llm.tokenize(b"Once")
        ids = []
        for t in llm.generate(prompt, **kw):
            if llm.model.is_eog(t) or len(ids) == 300:
                break
            ids.append(t)
        ref = llm.detokenize(ids, prev_tokens=prompt)
        chunks = [c["choices"][0]["text"] for c in llm("Once", max_tokens=len(ids), temperature=100.0, top_k=0,
                  top_p=1.0, min_p=0.0, seed=3, stream=True)]
        lone = sum(1 for t in ids if len(llm.detokenize([t], [1])) == 1 and llm.detokenize([t], [1])[0] >= 0x80)
        print(json.dumps({"ref": ref.decode("utf-8", "replace"), "chunks": chunks, "lone": lone,
                          "ref_hex": ref.hex()}))
    """)
    assert out["lone"] >= 10, "the sample has too few single non-ASCII bytes to test anything"
    assert "".join(out["chunks"]) == out["ref"]
    # no chunk boundary falls inside a multi-byte character of the reference
    ref = bytes.fromhex(out["ref_hex"])
    valid = ref.decode("utf-8", "replace")
    assert "".join(out["chunks"]) == valid


def test_text_assembler_splits(venv):
    """UTF-8 and stop-sequence hold-back on hand-made byte streams."""
    out = py(venv, """
        import json
        from optiml.llama import _TextAssembler
        res = []
        for stops, pieces in [([], [b"caf", b"\\xc3", b"\\xa9 ", b"\\xf0\\x9f", b"\\x98", b"\\x80!"]),
                              (["\\u00e9!"], [b"ab\\xc3", b"\\xa9", b"!cd"]),
                              (["STOP"], [b"xS", b"T", b"O", b"x", b"ST", b"OP", b"tail"]),
                              (["ab", "b"], [b"xa", b"b"])]:
            a = _TextAssembler(stops)
            chunks = []
            for p in pieces:
                chunks.append(a.push(p))
                if a.stopped:
                    break
            chunks.append(a.flush())
            res.append({"chunks": chunks, "stopped": a.stopped})
        print(json.dumps(res))
    """)
    assert out[0] == {"chunks": ["caf", "", "\u00e9 ", "", "", "\U0001F600!", ""], "stopped": False}
    assert out[1] == {"chunks": ["ab", "", "", ""], "stopped": True}
    assert out[2] == {"chunks": ["x", "", "", "STOx", "", "", ""], "stopped": True}  # "tail" never comes
    assert out[3] == {"chunks": ["x", "", ""], "stopped": True}  # the earliest stop wins: "x" + "ab"


def test_stop_sequences(venv):
    out = py(venv, """
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=256)
        res = {}
        for name, stop in [("none", None), ("lily", ["Lily"]), ("span", "girl named"), ("two", [".", "park"]),
                           ("never", ["little boy"])]:
            r = llm("Once upon a time", max_tokens=60, temperature=0, stop=stop)
            s = list(llm("Once upon a time", max_tokens=60, temperature=0, stop=stop, stream=True))
            res[name] = {"text": r["choices"][0]["text"], "finish": r["choices"][0]["finish_reason"],
                         "stream": [c["choices"][0]["text"] for c in s],
                         "stream_finish": s[-1]["choices"][0]["finish_reason"]}
        print(json.dumps(res))
    """)
    full = out["none"]["text"]
    assert full.startswith(", there was a little girl named Lily. She loved to play outside in the park.")
    for name, stop in [("lily", "Lily"), ("span", "girl named"), ("two", ".")]:
        r = out[name]
        assert r["finish"] == r["stream_finish"] == "stop"
        assert r["text"] == full[:full.index(stop)]
        assert "".join(r["stream"]) == r["text"]
        assert not any(stop[:k] in c for c in r["stream"] for k in range(2, len(stop) + 1)), r["stream"]
    # a prefix of a stop that never completes is held back, then released
    assert out["never"]["text"] == full and "".join(out["never"]["stream"]) == full
    assert out["never"]["finish"] == "length"


def test_prefix_reuse(venv):
    out = py(venv, """
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=256)
        a = llm("Once upon a time, there was", max_tokens=20, temperature=0)["choices"][0]["text"]
        n_after_a = llm.n_tokens
        b = llm("Once upon a time, there was", max_tokens=20, temperature=0)["choices"][0]["text"]
        c = llm("Once upon a time, the", max_tokens=20, temperature=0)["choices"][0]["text"]
        fresh = optiml.Llama("models/stories260K.gguf", n_ctx=256)
        c_ref = fresh("Once upon a time, the", max_tokens=20, temperature=0)["choices"][0]["text"]
        print(json.dumps({"a": a, "b": b, "c": c, "c_ref": c_ref, "n_after_a": n_after_a,
                          "pos_max": llm.ctx.kv_pos_max(0), "n": llm.n_tokens}))
    """)
    assert out["a"] == out["b"] and out["c"] == out["c_ref"]
    assert out["n_after_a"] > 20  # the prompt and the completion stay cached
    assert out["pos_max"] == out["n"] - 1


# ---- chat ------------------------------------------------------------------------------

CHATML = ("<|im_start|>system\nYou tell stories.<|im_end|>\n<|im_start|>user\nTell me about Lily."
          "<|im_end|>\n<|im_start|>assistant\n")
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about Lily."}]


def test_chat_completion(venv):
    out = py(venv, f"""
        import json, optiml
        llm = optiml.Llama("models/stories260K.gguf", n_ctx=256, chat_format="chatml")
        msgs = {MESSAGES!r}
        prompt = llm.apply_chat_template(msgs)
        r = llm.create_chat_completion(msgs, max_tokens=24, temperature=0)
        s = list(llm.create_chat_completion(msgs, max_tokens=24, temperature=0, stream=True))
        t = optiml.Llama("models/stories260K.gguf", n_ctx=256, chat_template="chatml").apply_chat_template(msgs)
        tok = optiml.AutoTokenizer.from_pretrained("models/stories260K.gguf")
        model = optiml.AutoModelForCausalLM.from_pretrained("models/stories260K.gguf")
        reply = model.chat(tok, "Tell me about Lily.", max_new_tokens=20)
        print(json.dumps({{"prompt": prompt, "r": r, "s": s, "t": t, "reply": reply}}))
    """)
    assert out["prompt"] == CHATML and out["t"] == CHATML
    r = out["r"]
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str) and msg["content"]
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["usage"]["completion_tokens"] <= 24
    s = out["s"]
    assert all(c["object"] == "chat.completion.chunk" for c in s)
    assert s[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert s[-1]["choices"][0]["delta"] == {} and s[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in s) == msg["content"]
    assert isinstance(out["reply"], str) and out["reply"]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    code = next(b for b in blocks if "AutoModelForCausalLM" in b)
    return code


def test_readme_example(venv):
    code = readme_example() + "\nimport json\nprint(json.dumps(response))\n"
    r = py(venv, code, check=False)
    assert r.returncode == 0, r.stderr
    response = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(response, str) and response.strip()


# ---- errors ------------------------------------------------------------------------------


def test_missing_and_corrupt_files(venv, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(STORIES.read_bytes()[:100000])
    missing = tmp_path / "missing.gguf"
    out = py(venv, f"""
        import json, optiml
        res = {{}}
        for name, path in [("missing", {str(missing)!r}), ("bad", {str(bad)!r}), ("trunc", {str(trunc)!r})]:
            for api, load in [("Model", optiml.Model), ("Llama", optiml.Llama),
                              ("Auto", optiml.AutoModelForCausalLM.from_pretrained)]:
                try:
                    load(path)
                    res[name + api] = None
                except optiml.OptimlError as e:
                    res[name + api] = [type(e).__name__, str(e), e.status, isinstance(e, FileNotFoundError),
                                       isinstance(e, ValueError)]
        print(json.dumps(res))
    """)
    for api in ("Model", "Llama", "Auto"):
        cls, msg, status, fnf, _ = out["missing" + api]
        assert cls == "ModelNotFoundError" and fnf and status == 2 and str(missing) in msg
        for name, path in (("bad", bad), ("trunc", trunc)):
            cls, msg, status, fnf, val = out[name + api]
            assert cls == "FormatError" and status == 3 and val and not fnf, out[name + api]
            assert str(path) in msg


def test_use_mmap_false_reads_the_file(venv, tmp_path):
    """use_mmap=False reads the weights into memory instead of mapping the
    file: the same logits; a truncated file fails the same way."""
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(STORIES.read_bytes()[:100000])
    out = py(venv, f"""
        import json, optiml
        res = []
        for mm in (True, False):
            with optiml.Model("models/stories260K.gguf", use_mmap=mm) as m, \\
                 optiml.Context(m, n_ctx=64, n_threads=1) as c:
                c.eval(m.tokenize("Once upon a time"))
                res.append(list(c.logits()))
        try:
            optiml.Model({str(trunc)!r}, use_mmap=False)
            err = None
        except optiml.OptimlError as e:
            err = [type(e).__name__, str(e)]
        print(json.dumps({{"logits": res, "err": err}}))
    """)
    assert len(out["logits"][0]) == 512 and out["logits"][0] == out["logits"][1]
    assert out["err"][0] == "FormatError" and str(trunc) in out["err"][1]


def test_repack_false_multiplies_the_file_rows(venv, tmp_path):
    """repack (optiml_model_params.repack) reaches the library: stories260K
    in q4_0 gives the same next-token logits from the repacked copy and
    from the file's rows, to float rounding (the prompt GEMM's panel is the
    same either way; decode sums in another order), and Llama takes it."""
    q = tmp_path / "stories-q4_0.gguf"
    r = run([tool("optiml-quantize"), "--input", str(STORIES), "--output", str(q), "--type", "q4_0"])
    assert r.returncode == 0, r.stderr
    out = py(venv, f"""
        import json, optiml
        res = []
        for rp in (True, False):
            with optiml.Model({str(q)!r}, repack=rp) as m, optiml.Context(m, n_ctx=64, n_threads=1) as c:
                c.eval(m.tokenize("Once upon a time"))
                c.eval([m.tokenize(" there")[-1]])
                res.append(list(c.logits()))
        llm = optiml.Llama({str(q)!r}, n_ctx=64, repack=False)
        text = llm("Once upon a time", max_tokens=4, temperature=0)["choices"][0]["text"]
        print(json.dumps({{"logits": res, "text": text}}))
    """)
    a, b = out["logits"]
    top = max(abs(v) for v in b)
    assert len(a) == 512 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-3 * top
    assert out["text"].strip()


# ---- low level --------------------------------------------------------------------------


def test_low_level_batches_and_kv_cache(venv):
    """Two sequences sharing a prefix (kv_copy) decoded in one batch give the
    logits of each sequence decoded alone; truncate/clear/pos_max."""
    out = py(venv, """
        import json, optiml
        with optiml.Model("models/stories260K.gguf") as m:
            ctx = optiml.Context(m, n_ctx=128, n_batch=64, n_seq_max=2)
            prefix = m.tokenize("Once upon a time")
            a, b = m.tokenize(" there", add_bos=False), m.tokenize(" the cat", add_bos=False)
            ctx.eval(prefix, pos=0, seq_id=0)
            ctx.kv_copy(0, 1)
            batch = optiml.Batch(16)
            n = len(prefix)
            for i, t in enumerate(a):
                batch.add(t, n + i, 0, i == len(a) - 1)
            for i, t in enumerate(b):
                batch.add(t, n + i, 1, i == len(b) - 1)
            ctx.decode(batch)
            la, lb = ctx.logits(len(a) - 1), ctx.logits(-1)
            pos = [ctx.kv_pos_max(0), ctx.kv_pos_max(1)]
            alone = []
            for cont in (a, b):
                ctx.kv_clear()
                ctx.eval(prefix + cont)
                alone.append(ctx.logits())
            ctx.kv_truncate(0, 3)
            pos.append(ctx.kv_pos_max(0))
            ctx.kv_clear(-1)
            pos.append(ctx.kv_pos_max(0))
            smpl = optiml.Sampler(m, temperature=0)
            greedy = smpl.sample(alone[0])
            errs = []
            try:
                ctx.logits(5)
            except IndexError as e:
                errs.append(str(e))
            try:
                optiml.Sampler(m, repeat_penalty=0)
            except optiml.InvalidArgumentError as e:
                errs.append(str(e))
            ctx.close()
            d = lambda x, y: max(abs(p - q) for p, q in zip(x, y))
            print(json.dumps({"type": type(la).__name__, "n": len(la), "lens": [len(prefix), len(a), len(b)], "da": d(la, alone[0]), "db": d(lb, alone[1]),
                              "pos": pos, "greedy": greedy, "argmax": max(range(len(la)), key=alone[0].__getitem__),
                              "errs": errs}))
    """)
    assert out["type"] == "list" and out["n"] == 512  # no numpy in the fresh environment
    assert out["da"] < 1e-4 and out["db"] < 1e-4, out
    n_prefix, n_a, n_b = out["lens"]
    assert n_prefix == 5 and n_b > n_a
    assert out["pos"] == [n_prefix + n_a - 1, n_prefix + n_b - 1, 2, -1]
    assert out["greedy"] == out["argmax"]
    assert len(out["errs"]) == 2 and "sampler" in out["errs"][1]


def test_numpy_logits_view_and_torch_tensors(venv):
    """With numpy/torch installed (this interpreter): logits are a float32
    view of the context's buffer, tokenizer/generate speak torch tensors."""
    out = py(venv, """
        import json, numpy as np, torch, optiml
        m = optiml.Model("models/stories260K.gguf")
        ctx = optiml.Context(m, n_ctx=64)
        ctx.eval(m.tokenize("Once upon a time"))
        v = ctx.logits()
        p = ctx.logits_ptr(-1)
        import ctypes
        shares = v.ctypes.data == ctypes.addressof(p.contents)
        del ctx, m  # the view keeps the context alive
        ok_after_del = bool(np.isfinite(v).all())
        tok = optiml.AutoTokenizer.from_pretrained("models/stories260K.gguf")
        model = optiml.AutoModelForCausalLM.from_pretrained("models/stories260K.gguf", torch_dtype=torch.float16)
        enc = tok(["Once upon a time", "Lily"], padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        rows = [model.generate(tok(t)["input_ids"], max_new_tokens=6)[0] for t in ["Once upon a time", "Lily"]]
        print(json.dumps({"dtype": str(v.dtype), "shape": list(v.shape), "shares": bool(shares), "ok": ok_after_del,
                          "ids": enc["input_ids"].tolist(), "mask": enc["attention_mask"].tolist(),
                          "out_type": type(out).__name__, "out": out.tolist(), "rows": rows,
                          "text": tok.batch_decode(out, skip_special_tokens=True)}))
    """, python=sys.executable)
    assert out["dtype"] == "float32" and out["shape"] == [512] and out["shares"] and out["ok"]
    assert out["out_type"] == "Tensor"
    ids, mask = out["ids"], out["mask"]
    n_pad = mask[1].count(0)
    assert n_pad == len(ids[0]) - len(out["rows"][1]) + 6 and mask[1] == [0] * n_pad + [1] * (len(ids[1]) - n_pad)
    assert out["out"][0] == out["rows"][0]
    assert out["out"][1][n_pad:] == out["rows"][1]  # left padding does not change the result
    assert out["text"][0].startswith("Once upon a time")


# ---- threads and leaks --------------------------------------------------------------------


def test_two_models_in_two_threads(venv, tmp_path):
    """Two models generating at once in two threads: same tokens as one after
    the other, the two runs overlap in time, and a long decode in a thread
    lets the main thread run (the GIL is released during decode)."""
    big = tmp_path / "random.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(big), "--n-embd", "256", "--n-layer", "4", "--n-ff", "768",
             "--n-head", "4", "--n-head-kv", "4", "--n-vocab", "512", "--ctx", "1024"])
    assert r.returncode == 0, r.stderr
    out = py(venv, f"""
        import itertools, json, threading, time, optiml
        paths = ["models/stories260K.gguf", {str(big)!r}]
        llms = [optiml.Llama(p, n_ctx=512, n_threads=1) for p in paths]
        prompt = llms[0].tokenize(b"Once upon a time")

        def work(i, res):
            t0 = time.perf_counter()
            llms[i].reset()
            res[i] = (list(itertools.islice(llms[i].generate(prompt, temp=0.9, seed=5), 150)), t0, time.perf_counter())

        seq = {{}}
        for i in range(2):
            work(i, seq)
        par = {{}}
        ts = [threading.Thread(target=work, args=(i, par)) for i in range(2)]
        for t in ts: t.start()
        for t in ts: t.join()
        overlap = min(par[0][2], par[1][2]) - max(par[0][1], par[1][1])

        # GIL: count main-thread loop turns during one long decode in a thread
        ctx = llms[1].ctx
        ctx.kv_clear()
        toks = [(i * 7) % 500 + 3 for i in range(512)]
        done = threading.Event()
        def long_decode():
            t0 = time.perf_counter()
            ctx.eval(toks, pos=0)
            long_decode.dt = time.perf_counter() - t0
            done.set()
        th = threading.Thread(target=long_decode)
        turns, t_end = 0, time.perf_counter() + 0.2
        while time.perf_counter() < t_end:
            turns += 1
        rate = turns / 0.2  # loop turns per second with the GIL to itself
        turns = 0
        th.start()
        while not done.is_set():
            turns += 1
        th.join()
        print(json.dumps({{"same": [seq[i][0] == par[i][0] for i in range(2)], "overlap": overlap,
                          "durations": [par[i][2] - par[i][1] for i in range(2)], "turns": turns, "rate": rate,
                          "decode_s": long_decode.dt}}))
    """)
    print(out)
    assert out["same"] == [True, True]
    assert out["overlap"] > 0, out
    # a GIL held through the decode would stop the main loop for its whole
    # duration (it would get at most a switch interval or two, ~1%)
    assert out["decode_s"] > 0.05 and out["turns"] > 0.25 * out["rate"] * out["decode_s"], out


def test_no_leak_over_1000_cycles(venv):
    out = py(venv, """
        import gc, json, optiml
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        def cycle(i):
            if i % 2:
                with optiml.Model("models/stories260K.gguf") as m, optiml.Context(m, n_ctx=64, n_threads=1) as c:
                    c.eval(m.tokenize("Once"))
            else:  # freed by garbage collection
                c = optiml.Context(optiml.Model("models/stories260K.gguf"), n_ctx=64, n_threads=1)
                s = optiml.Sampler(512, seed=i)
                c.eval(c.model.tokenize("Once"))
                s.sample(c)
                del c, s
        for i in range(100):
            cycle(i)
        gc.collect()
        before = rss()
        for i in range(1000):
            cycle(i)
        gc.collect()
        print(json.dumps({"growth": rss() - before, "before": before}))
    """)
    print(out)
    assert out["growth"] < 4 << 20, out


# ---- transformers reference ---------------------------------------------------------------


@pytest.fixture(scope="session")
def llama2_tokenizer_model(tmp_path_factory):
    """A tiny HF Llama directory with the Llama 2 tokenizer, and its GGUF."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf-tok")
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.model").write_bytes((DATA / "llama2-tokenizer.model").read_bytes())
    gguf = d / "model.gguf"
    # transformers reads the tokenizer from its own directory: the Llama 2
    # tokenizer.model with Llama 2's (legacy SentencePiece) settings
    tok = d / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes((DATA / "llama2-tokenizer.model").read_bytes())
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "clean_up_tokenization_spaces": False}))
    r = run([tool("optiml-convert"), "--hf", str(d), "--outfile", str(gguf)])
    assert r.returncode == 0, r.stderr
    return tok, gguf


TEXTS = ["Hello world", " Hello world", "Hello  world", "  leading and trailing  ", "The quick brown fox.\n\nNew line",
         "numbers 1234567890 3.14159", "café naïve résumé", "日本語のテキスト", "emoji 😀👍🏽", "tabs\tand\ttabs",
         "a", "", "<s> not special? </s>", "I'm can't won't", "x" * 300]


def test_tokenizer_matches_transformers(venv, llama2_tokenizer_model):
    d, gguf = llama2_tokenizer_model
    out = py(venv, f"""
        import json, transformers, optiml
        texts = {TEXTS!r}
        hf = transformers.AutoTokenizer.from_pretrained({str(d)!r})
        ours = optiml.AutoTokenizer.from_pretrained({str(gguf)!r})
        hf.pad_token = hf.eos_token
        hf.padding_side = "left"
        res = {{"hf": [hf(t)["input_ids"] for t in texts], "ours": [ours(t)["input_ids"] for t in texts],
               "hf_batch": hf(texts[:4], padding=True, return_tensors="pt")["input_ids"].tolist(),
               "ours_batch": ours(texts[:4], padding=True, return_tensors="pt")["input_ids"].tolist(),
               "hf_mask": hf(texts[:4], padding=True)["attention_mask"],
               "ours_mask": ours(texts[:4], padding=True)["attention_mask"],
               "ids": [ours.bos_token_id, ours.eos_token_id, hf.bos_token_id, hf.eos_token_id]}}
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file={str(d / "tokenizer.model")!r})
        res["spm"] = [[1] + sp.encode(t) for t in texts]
        ids = [ours(t)["input_ids"] for t in texts[:10]]
        res["hf_dec"] = hf.batch_decode(ids, skip_special_tokens=True)
        res["ours_dec"] = ours.batch_decode(ids, skip_special_tokens=True)
        chatml = ("{{% for m in messages %}}{{{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                  "'<|im_end|>' + '\\n' }}}}{{% endfor %}}{{% if add_generation_prompt %}}"
                  "{{{{ '<|im_start|>assistant\\n' }}}}{{% endif %}}")
        msgs = [{{"role": "system", "content": "Be brief."}}, {{"role": "user", "content": "Hi there"}},
                {{"role": "assistant", "content": "Hello!"}}, {{"role": "user", "content": "café?"}}]
        llama3 = json.load(open({str(DATA / "llama3-tokenizer_config.json")!r}))["chat_template"]
        res["chat"] = [[hf.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=g, chat_template=t),
                        ours.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=g,
                                                 chat_template=o)]
                       for n in (2, 4) for g in (False, True) for t, o in ((chatml, "chatml"), (llama3, llama3))]
        ids = lambda x: list(x["input_ids"] if hasattr(x, "keys") else x)
        res["chat_ids"] = [ids(hf.apply_chat_template(msgs, add_generation_prompt=True, chat_template=chatml)),
                           ours.apply_chat_template(msgs, add_generation_prompt=True, chat_template="chatml")]
        print(json.dumps(res))
    """, python=sys.executable)
    for t, h, o, s in zip(TEXTS, out["hf"], out["ours"], out["spm"]):
        assert o == h, f"{t!r}: ours {o} transformers {h}"
        assert o == s or "<s>" in t, f"{t!r}: ours {o} sentencepiece {s}"
    assert out["ours_batch"] == out["hf_batch"] and out["ours_mask"] == out["hf_mask"]
    assert out["ids"] == [1, 2, 1, 2]
    assert out["ours_dec"] == out["hf_dec"]
    assert len(out["chat"]) == 8
    for h, o in out["chat"]:
        assert o == h
    assert out["chat_ids"][0] == out["chat_ids"][1]
