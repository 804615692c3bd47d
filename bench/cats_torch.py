"""Training-free FFN sparsity in torch, the independent reference for the
figures of optiml-profile --calibrate-sparsity (bench/RESULTS.md).

    python bench/cats_torch.py MODEL.gguf CUT:SPARSITY[,CUT:SPARSITY...] [-c 128]

transformers loads the GGUF dequantized to f32. Each layer's MLP forward is
replaced by one that zeroes a share SPARSITY of its activations, the
threshold per layer being that quantile of the cut's score over the first
1024 tokens of CPython's LICENSE.txt (the calibration text of
optiml-profile in the tests). CUT is
  plain    |silu(gate)|                      (CATS: up and down rows skipped)
  product  |silu(gate) up| * |down column|   (--cats-product: down rows only)
  teal     |x| of the MLP's input            (TEAL: gate and up columns)
  teal_all teal, then |silu(gate) up| too    (every FFN matrix's input)
Perplexity of tests/data/tinystory.txt over non-overlapping windows of -c
tokens, the second half of each scored (the text's own first token kept:
these models do not add BOS), dense first."""
import argparse
import math
import pathlib
import sysconfig
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUTS = ("plain", "product", "teal", "teal_all")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("runs", help="CUT:SPARSITY,...")
    ap.add_argument("-c", type=int, default=128)
    a = ap.parse_args()
    runs = []
    for item in a.runs.split(","):
        cut, level = item.split(":")
        if cut not in CUTS or not 0.0 < float(level) < 1.0:
            ap.error(f"{item}: CUT is one of {', '.join(CUTS)}, SPARSITY in (0, 1)")
        runs.append((cut, float(level)))
    torch.set_num_threads(2)
    path = pathlib.Path(a.model).resolve()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    calib = tok(pathlib.Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text())["input_ids"][:1024]
    text = tok((ROOT / "tests" / "data" / "tinystory.txt").read_text())["input_ids"]

    state = {"cut": None, "thr": None, "scores": None}

    def make_forward(il, mlp):
        down_norm = mlp.down_proj.weight.norm(dim=0)

        def forward(x):
            cut, thr = state["cut"], state["thr"]
            scores = state["scores"]
            if scores is not None:
                scores[il]["teal"].append(x.abs().flatten())
            if thr is not None and cut in ("teal", "teal_all"):
                x = torch.where(x.abs() > thr[il], x, torch.zeros_like(x))
            g = torch.nn.functional.silu(mlp.gate_proj(x))
            h = g * mlp.up_proj(x)
            by_cut = {"plain": g.abs(), "product": h.abs() * down_norm, "teal_all": h.abs()}
            if scores is not None:
                for k, v in by_cut.items():
                    scores[il][k].append(v.flatten())
            if thr is not None and cut in by_cut:
                thr_h = thr[il] if cut != "teal_all" else state["thr_h"][il]
                h = torch.where(by_cut[cut] > thr_h, h, torch.zeros_like(h))
            return mlp.down_proj(h)
        return forward

    mlps = [layer.mlp for layer in model.model.layers]
    for il, mlp in enumerate(mlps):
        mlp.forward = make_forward(il, mlp)

    def perplexity():
        nll, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(text) - a.c + 1, a.c):
                logp = torch.log_softmax(model(torch.tensor([text[s:s + a.c]])).logits[0].double(), -1)
                for j in range(a.c // 2, a.c - 1):
                    nll -= float(logp[j, text[s + j + 1]])
                    n += 1
        return math.exp(nll / n)

    t0 = time.time()
    dense = perplexity()
    print(f"dense: {dense:.4f} ({len(text)} tokens, -c {a.c})", flush=True)
    state["scores"] = [{k: [] for k in CUTS} for _ in mlps]
    with torch.no_grad():
        for s in range(0, len(calib), 256):
            model(torch.tensor([calib[s:s + 256]]))
    scores = [{k: torch.cat(v) for k, v in layer.items()} for layer in state["scores"]]
    state["scores"] = None

    def quantile(v, q):  # torch.quantile takes at most 2^24 values
        if len(v) >= 1 << 24:
            v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:(1 << 24) - 1]]
        return torch.quantile(v, q).item()

    for cut, level in runs:
        key = "teal" if cut == "teal_all" else cut
        state["cut"] = cut
        state["thr"] = [quantile(layer[key], level) for layer in scores]
        state["thr_h"] = [quantile(layer["teal_all"], level) for layer in scores]
        p = perplexity()
        print(f"{cut} {level:.0%}: {p:.4f} ({p / dense - 1:+.2%}), {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
