"""optiml-cli end to end: greedy generation reproduces the llama2.c
reference output (tests/data/stories260K_greedy.txt, produced by llama2.c's
run.c), standard output carries only text, errors are one line and
non-zero."""
import re

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
    (["-f", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
])
def test_errors_are_one_line(args, needle):
    r = run([tool("optiml-cli")] + args)
    assert r.returncode != 0
    assert r.stdout == ""
    assert needle in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("optiml-cli:")]) == 1


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    r = run([tool("optiml-cli"), "-m", str(bad)])
    assert r.returncode != 0 and r.stdout == ""
    assert str(bad) in r.stderr


def test_context_limit():
    r = run([tool("optiml-cli"), "-p", "Once upon a time", "-n", "-1", "-c", "32", "--temp", "0"])
    assert r.returncode == 0, r.stderr
    assert "context of 32 tokens is full" in r.stderr
