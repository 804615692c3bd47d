"""optiml-cli end to end: greedy generation reproduces the llama2.c
reference output (tests/data/stories260K_greedy.txt, produced by llama2.c's
run.c), standard output carries only text, errors are one line and
non-zero; the interactive chat (-cnv) reuses its KV cache between turns,
replies as a fresh run over the rendered conversation would, and survives
Ctrl-C during a reply."""
import re
import signal
import subprocess

import pytest

from conftest import DATA, MODELS, run, tool


def reference_cases():
    """[(prompt, prompt_ids, generated_ids, text)] from the reference file."""
    cases, cur = [], None
    lines = (DATA / "stories260K_greedy.txt").read_text().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"# prompt: (.*?), greedy", line)
        if m:
            prompt = m.group(1)
            cur = {"prompt": "" if prompt.startswith("(empty") else prompt}
            cases.append(cur)
        elif line.startswith("prompt_ids:"):
            cur["prompt_ids"] = [int(x) for x in line.split()[1:]]
        elif line.startswith("generated_ids:"):
            cur["generated_ids"] = [int(x) for x in line.split()[1:]]
        elif line.startswith("text:"):
            text = [line[len("text:"):]]
            i += 1
            while i < len(lines) and not lines[i].startswith("# prompt:"):
                text.append(lines[i])
                i += 1
            cur["text"] = "\n".join(text).rstrip("\n")
            continue
        i += 1
    assert len(cases) == 2 and all(len(c) == 4 for c in cases)
    return cases


def ids_from(stderr, label):
    line = next(l for l in stderr.splitlines() if l.startswith(label + ":"))
    return [int(x) for x in line.split()[1:]]


@pytest.mark.parametrize("case", reference_cases(), ids=["bos-only", "once-upon-a-time"])
@pytest.mark.parametrize("which", ["shipped", "fresh"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_greedy_matches_llama2c(case, which, threads, stories_gguf):
    model = MODELS / "stories260K.gguf" if which == "shipped" else stories_gguf
    r = run([tool("optiml-cli"), "-m", str(model), "-p", case["prompt"], "--temp", "0",
             "-n", str(len(case["generated_ids"])), "-t", threads, "--show-ids"])
    assert r.returncode == 0, r.stderr
    assert ids_from(r.stderr, "prompt_ids") == case["prompt_ids"]
    assert ids_from(r.stderr, "generated_ids") == case["generated_ids"]
    assert r.stdout == case["text"]


@pytest.mark.parametrize("case", reference_cases(), ids=["bos-only", "once-upon-a-time"])
def test_no_mmap_matches_llama2c(case):
    """--no-mmap reads the file into memory instead of mapping it: the same
    reference output."""
    r = run([tool("optiml-cli"), "-m", str(MODELS / "stories260K.gguf"), "-p", case["prompt"], "--temp", "0",
             "-n", str(len(case["generated_ids"])), "--no-mmap", "--show-ids"])
    assert r.returncode == 0, r.stderr
    assert ids_from(r.stderr, "generated_ids") == case["generated_ids"]
    assert r.stdout == case["text"]


def test_default_model_and_timings():
    r = run([tool("optiml-cli"), "-p", "Once upon a time", "-n", "16", "-s", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    assert len(r.stdout) > len("Once upon a time")
    for word in ("load:", "prompt:", "generation:", "tokens/s"):
        assert word in r.stderr


def test_seed_reproducible():
    args = [tool("optiml-cli"), "-p", "Once upon a time", "-n", "40", "--temp", "1.0", "--top-k", "0",
            "--top-p", "1", "--min-p", "0"]
    a = run(args + ["-s", "123"])
    b = run(args + ["-s", "123"])
    c = run(args + ["-s", "124"])
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_prompt_file(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("Once upon a time")
    a = run([tool("optiml-cli"), "-f", str(p), "--temp", "0", "-n", "20"])
    b = run([tool("optiml-cli"), "-p", "Once upon a time", "--temp", "0", "-n", "20"])
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("args,needle", [
    (["--bogus"], "unknown option '--bogus'"),
    (["-n"], "needs a value"),
    (["-n", "abc"], "invalid value 'abc'"),
    (["-t", "0"], "invalid value '0'"),
    (["--temp", "nan"], "invalid value 'nan'"),
    (["-m", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--no-mmap", "-m", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--no-mmap", "-m", "/"], "non-regular file"),
    (["-f", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
])
def test_errors_are_one_line(args, needle):
    r = run([tool("optiml-cli")] + args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert needle in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("optiml-cli:")]) == 1


@pytest.mark.parametrize("load", [[], ["--no-mmap"]], ids=["mmap", "no-mmap"])
def test_not_a_gguf(tmp_path, load):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    r = run([tool("optiml-cli"), "-m", str(bad)] + load)
    assert r.returncode != 0 and r.stdout == ""
    assert str(bad) in r.stderr


def test_context_limit():
    r = run([tool("optiml-cli"), "-p", "Once upon a time", "-n", "-1", "-c", "32", "--temp", "0"])
    assert r.returncode == 0, r.stderr
    assert "context of 32 tokens is full" in r.stderr


# ---- interactive chat (-cnv) ----

TURN_RE = re.compile(r"\[turn (\d+): (\d+) new prompt tokens, (\d+) reused from the cache, [0-9.]+ ms; "
                     r"(\d+) tokens generated")


def chat(args, turns, model=None):
    cmd = [tool("optiml-cli"), "-cnv"] + (["-m", str(model)] if model else []) + args
    return run(cmd, input="".join(t + "\n" for t in turns), errors="replace")


def turn_stats(stderr):
    """[(turn, new prompt tokens, reused, generated)] from the per-turn lines."""
    return [tuple(int(g) for g in m.groups()) for m in TURN_RE.finditer(stderr)]


def all_ids(stderr, label):
    """Every "label: ids" line (in chat mode the line follows the "> " prompt)."""
    return [[int(x) for x in ids.split()] for ids in re.findall(r"^(?:> )*" + label + r":([0-9 ]*)$", stderr, re.M)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A small random-weight GGUF that carries a chat template (SmolLM2's)."""
    out = tmp_path_factory.mktemp("chat") / "chat.gguf"
    r = run([tool("optiml-random-model"), "--outfile", str(out), "--n-embd", "256", "--n-layer", "2",
             "--n-ff", "768", "--n-head", "4", "--n-vocab", "1000", "--ctx", "4096",
             "--chat-template", str(DATA / "templates" / "smollm2.jinja")])
    assert r.returncode == 0, r.stderr
    return out


def test_chat_reuses_the_cache_and_replies_as_a_fresh_run():
    """Turn 2 decodes only the new tokens, and its greedy reply equals a
    fresh (non-chat) run over the whole rendered conversation."""
    base = ["--chat-template", "chatml", "--temp", "0", "-n", "24", "--show-ids"]
    one = chat(base, ["Hello there"])
    assert one.returncode == 0, one.stderr
    assert one.stdout.endswith("\n")
    reply1 = one.stdout[:-1]
    two = chat(base, ["Hello there", "", "Tell me a story"])  # empty lines are skipped
    assert two.returncode == 0, two.stderr
    assert two.stdout.startswith(reply1 + "\n") and two.stdout.endswith("\n")
    reply2 = two.stdout[len(reply1) + 1:-1]
    stats = turn_stats(two.stderr)
    assert [s[0] for s in stats] == [1, 2]
    (_, new1, reused1, gen1), (_, new2, reused2, gen2) = stats
    assert reused1 == 0 and gen1 == gen2 == 24
    assert reused2 >= new1, stats  # the first turn's prompt (and more) came from the cache
    assert new2 < reused2 + new2 - new1, stats
    rendered = run([tool("optiml-chat-template"), "chatml", "--gen", "user", "Hello there",
                    "assistant", reply1, "user", "Tell me a story"])
    assert rendered.returncode == 0, rendered.stderr
    fresh = run([tool("optiml-cli"), "-p", rendered.stdout, "--temp", "0", "-n", "24", "--show-ids"])
    assert fresh.returncode == 0, fresh.stderr
    assert all_ids(two.stderr, "prompt_ids")[1] == ids_from(fresh.stderr, "prompt_ids")
    assert all_ids(two.stderr, "generated_ids")[1] == ids_from(fresh.stderr, "generated_ids")
    assert fresh.stdout == rendered.stdout + reply2


def test_chat_system_prompt_and_template_file(tmp_path):
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    r = chat(["--chat-template", str(tmpl), "--system", "Be brief.", "--temp", "0", "-n", "8",
              "--show-ids"], ["Hi"])
    assert r.returncode == 0, r.stderr
    fresh = run([tool("optiml-cli"), "-p", "[system] Be brief.\n[user] Hi\n[assistant] ", "--temp", "0",
                 "-n", "8", "--show-ids"])
    assert all_ids(r.stderr, "prompt_ids")[0] == ids_from(fresh.stderr, "prompt_ids")


def test_chat_uses_the_model_template(chat_model):
    r = chat(["--temp", "0", "-n", "16", "-c", "4096", "--show-ids"], ["Hello", "Again"], model=chat_model)
    assert r.returncode == 0, r.stderr
    assert "no chat template" not in r.stderr and "failed" not in r.stderr
    assert [s[0] for s in turn_stats(r.stderr)] == [1, 2]
    assert turn_stats(r.stderr)[1][2] >= turn_stats(r.stderr)[0][1]
    assert len(r.stdout.split("\n")) >= 3


def test_chat_falls_back_to_a_builtin_format(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% macro turn(m) %}<|im_start|>{{ m.role }}{% endmacro %}")
    r = chat(["--chat-template", str(bad), "--temp", "0", "-n", "8"], ["Hi"])
    assert r.returncode == 0, r.stderr
    assert "unsupported construct: {% macro %}" in r.stderr
    assert "using the built-in chatml format instead" in r.stderr
    assert len(turn_stats(r.stderr)) == 1


def test_chat_without_template_guesses_a_format():
    r = chat(["--temp", "0", "-n", "8"], ["Hi"])
    assert r.returncode == 0, r.stderr
    assert "the model has no chat template; using the built-in llama2 format" in r.stderr


def test_chat_ctrl_c_stops_the_reply_not_the_program(chat_model):
    p = subprocess.Popen([tool("optiml-cli"), "-m", str(chat_model), "-cnv", "--temp", "0", "-n", "400",
                          "-c", "4096", "-t", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"Tell me everything\n")
        p.stdin.flush()
        assert p.stdout.read(1)  # the reply streams
        p.send_signal(signal.SIGINT)
        p.stdin.write(b"Again\n")
        p.stdin.close()
        p.stdin = None  # communicate() would flush it
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    err = err.decode(errors="replace")
    assert p.returncode == 0, err
    assert "[reply interrupted]" in err
    stats = turn_stats(err)
    assert [s[0] for s in stats] == [1, 2], err
    assert stats[0][3] < 400 and stats[1][3] > 0


def test_chat_ctrl_c_at_the_prompt_exits(chat_model):
    p = subprocess.Popen([tool("optiml-cli"), "-m", str(chat_model), "-cnv", "-n", "4"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = b""
        while not got.endswith(b"> "):
            c = p.stderr.read(1)
            assert c, got
            got += c
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and out == b""


@pytest.mark.parametrize("args,needle", [
    (["-cnv", "-p", "hi"], "-cnv takes its turns from standard input"),
    (["--system", "x"], "need -cnv"),
    (["-cnv", "--chat-template", "/nonexistent.jinja"], "neither a built-in format nor a readable file"),
])
def test_chat_argument_errors(args, needle):
    r = run([tool("optiml-cli")] + args, input="")
    assert r.returncode != 0 and r.stdout == ""
    assert needle in r.stderr


def rewrite_stories(path, skip=(), extra=()):
    """stories260K.gguf written again by gguf-py (an independent writer)
    without the tensors named in skip and with the (name, array) pairs of
    extra."""
    gguf = pytest.importorskip("gguf")
    src = gguf.GGUFReader(str(MODELS / "stories260K.gguf"))
    w = gguf.GGUFWriter(str(path), "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        v = f.contents()
        sub = f.types[-1] if isinstance(v, list) else None
        w.add_key_value(f.name, v, f.types[0], sub_type=sub)
    for t in src.tensors:
        if t.name not in skip:
            w.add_tensor(t.name, t.data)
    for name, data in extra:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_tensor_names_file_and_tensor(tmp_path):
    """A GGUF that parses but lacks a weight: one line naming the file and
    the tensor."""
    bad = tmp_path / "missing.gguf"
    rewrite_stories(bad, skip={"blk.3.ffn_up.weight"})
    r = run([tool("optiml-cli"), "-m", str(bad), "-n", "4"])
    assert r.returncode != 0 and r.stdout == ""
    assert f"{bad}: missing tensor blk.3.ffn_up.weight" in r.stderr


def test_bad_bias_shape_names_tensor(tmp_path):
    """An attention bias of the wrong length (blk.1.attn_k.bias one value
    too long) is refused with its name and both shapes."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    src = gguf.GGUFReader(str(MODELS / "stories260K.gguf"))
    n_kv = next(int(t.shape[1]) for t in src.tensors if t.name == "blk.1.attn_k.weight")
    bad = tmp_path / "bias.gguf"
    rewrite_stories(bad, extra=[("blk.1.attn_k.bias", np.zeros(n_kv + 1, dtype=np.float32))])
    r = run([tool("optiml-cli"), "-m", str(bad), "-n", "4"])
    assert r.returncode != 0 and r.stdout == ""
    assert f"tensor blk.1.attn_k.bias has shape ({n_kv + 1}, 1), expected ({n_kv}, 1)" in r.stderr
