#!/usr/bin/env python3
"""relufy_llama2c.py - make a real ReLU Llama from a llama2.c checkpoint.

    python tools/relufy_llama2c.py [--ckpt models/stories260K.bin]
        [--template models/stories260K.gguf] [--out models/stories260K-relu.gguf]
        [--calib-out tests/data/stories260K_calib.txt]
        [--eval-out tests/data/stories260K_eval.txt]
        [--steps 500] [--l1 0.2] [--threads 2] [--seed 1] [--cache FILE] [--texts-only]

What it does, all on the CPU with PyTorch (float32):

1. Loads the llama2.c legacy checkpoint (format in tools/convert_llama2c.c)
   into a small PyTorch Llama (RMSNorm, RoPE on adjacent pairs, grouped
   KV heads, gated FFN h = act(x W1^T) * (x W3^T), classifier shared with
   the embedding), the teacher, with its own SiLU. (Its logits match
   optiml-dump-logits on models/stories260K.gguf to 3e-5.)
2. Samples streams of --seq 256 tokens from BOS at temperature 0.8, as
   llama2.c's run.c does (BOS separates stories inside a stream): --n-train
   1024 training streams (torch.manual_seed(seed * 10^6 + i), i the batch of
   256 streams), 64 held-out streams (seeds from seed * 10^6 + 10^5), and 48
   streams each for the calibration (+ 2 * 10^5) and evaluation (+ 3 * 10^5)
   texts. This is the model's own (TinyStories-like) distribution; no other
   data set is needed. --cache keeps the streams in a file for reruns.
3. The student is a copy of the teacher whose FFN uses ReLU in place of
   SiLU: h = relu(x W1^T) * (x W3^T) (ReluLLaMA's "relufication"). It is
   fine-tuned on random --crop 64-token windows of the training streams with
       loss = KL(teacher || student), mean over positions
              + l1 * ramp * mean over layers of mean(relu(g)) / rms(g)
   (g the gate pre-activations; distillation onto the teacher's full
   next-token distribution; the second term, a ProSparse-like L1 of the
   gate's positive part measured in units of the gate's scale so that
   shrinking the gate does not pay, pushes neurons to exactly zero; ramp
   goes 0 -> 1 over the first half) with AdamW (lr 3e-3, cosine decay, no
   weight decay), --batch 16 windows, every parameter trained.
4. Reports the teacher's and the student's perplexity on the held-out
   streams, and the student's share of zero FFN neurons per layer.
5. Writes the student as a GGUF: every key and tensor of --template (the
   same model converted by optiml-convert, f32), with the new weights,
   optiml.ffn_activation = relu and general.name stories260K-relu; and the
   calibration and evaluation texts (decoded with the template's vocabulary,
   a newline where a story ends) for tests/python/test_relu_pipeline.py.

The defaults made models/stories260K-relu.gguf (held-out perplexity 2.56
for the original, 2.77 for the ReLU model; 55-67% of neurons zero per layer)
in about 15 minutes on 2 busy CPU cores (sampling 2-7 minutes, training 0.7
to 3 s a step). PyTorch's sampling and kernels may differ across versions
and machines, so a rerun gives a model of the same quality, not the same
bytes.
"""
import argparse
import math
import pathlib
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOS = 1


# ---- the model --------------------------------------------------------------

class Llama(torch.nn.Module):
    def __init__(self, cfg, act):
        super().__init__()
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv, self.vocab, self.seq_len = cfg
        self.hd = self.dim // self.n_heads
        self.act = act
        P = torch.nn.Parameter
        L, D, H, KV, V = self.n_layers, self.dim, self.hidden, self.n_kv * self.hd, self.vocab
        self.emb = P(torch.zeros(V, D))
        self.rms_att = P(torch.ones(L, D))
        self.wq = P(torch.zeros(L, D, D))
        self.wk = P(torch.zeros(L, KV, D))
        self.wv = P(torch.zeros(L, KV, D))
        self.wo = P(torch.zeros(L, D, D))
        self.rms_ffn = P(torch.ones(L, D))
        self.w1 = P(torch.zeros(L, H, D))
        self.w2 = P(torch.zeros(L, D, H))
        self.w3 = P(torch.zeros(L, H, D))
        self.rms_final = P(torch.ones(D))
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        ang = torch.arange(self.seq_len).float()[:, None] * inv[None, :]
        self.register_buffer("cos", torch.cos(ang), persistent=False)
        self.register_buffer("sin", torch.sin(ang), persistent=False)

    @staticmethod
    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(self, x, pos0):
        """x (B, T, heads, hd): adjacent pairs (2i, 2i+1) rotated by pos * theta_i."""
        t = x.shape[1]
        c, s = self.cos[pos0:pos0 + t, None, :], self.sin[pos0:pos0 + t, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    def ffn_h(self, il, xn):
        g, u = xn @ self.w1[il].T, xn @ self.w3[il].T
        self.gates.append(g)
        return (F.silu(g) if self.act == "silu" else F.relu(g)) * u

    def forward(self, toks, cache=None, pos0=0):
        """Logits (B, T, V) and the FFN activations h of every layer. cache:
        per layer [k, v] tensors (B, n_kv, seq_len, hd) filled at pos0.."""
        B, T = toks.shape
        x = self.emb[toks]
        hs, self.gates = [], []
        rep = self.n_heads // self.n_kv
        for il in range(self.n_layers):
            xn = self.rmsnorm(x, self.rms_att[il])
            q = self.rope((xn @ self.wq[il].T).view(B, T, self.n_heads, self.hd), pos0).transpose(1, 2)
            k = self.rope((xn @ self.wk[il].T).view(B, T, self.n_kv, self.hd), pos0).transpose(1, 2)
            v = (xn @ self.wv[il].T).view(B, T, self.n_kv, self.hd).transpose(1, 2)
            if cache is not None:
                cache[il][0][:, :, pos0:pos0 + T] = k
                cache[il][1][:, :, pos0:pos0 + T] = v
                k, v = cache[il][0][:, :, :pos0 + T], cache[il][1][:, :, :pos0 + T]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # KV head j serves q heads j*rep..
            o = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or T > 1)
            x = x + o.transpose(1, 2).reshape(B, T, self.dim) @ self.wo[il].T
            h = self.ffn_h(il, self.rmsnorm(x, self.rms_ffn[il]))
            hs.append(h)
            x = x + h @ self.w2[il].T
        return self.rmsnorm(x, self.rms_final) @ self.emb.T, hs


NAMES = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]


def load_llama2c(path, act):
    raw = pathlib.Path(path).read_bytes()
    cfg = list(struct.unpack_from("<7i", raw, 0))
    if cfg[5] <= 0:
        sys.exit(f"{path}: only checkpoints whose classifier is the embedding (vocab_size > 0) are handled")
    m = Llama(cfg, act)
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    off = 0
    for name in NAMES:
        p = getattr(m, name)
        n = p.numel()
        p.data.copy_(torch.from_numpy(data[off:off + n].copy()).view_as(p))
        off += n
    off += 2 * cfg[6] * (cfg[0] // cfg[3]) // 2  # freq_cis_real, freq_cis_imag: unused
    if off != data.size:
        sys.exit(f"{path}: {data.size} floats, expected {off}")
    return m


# ---- sampling ----------------------------------------------------------------

@torch.no_grad()
def sample_streams(model, n, seq, temp, seed, batch=256):
    """n streams of seq tokens, each BOS then samples at temperature temp;
    stream i draws from torch.manual_seed(seed + i // batch)."""
    out = []
    for b0 in range(0, n, batch):
        torch.manual_seed(seed + b0 // batch)
        B = min(batch, n - b0)
        cache = [[torch.zeros(B, model.n_kv, model.seq_len, model.hd) for _ in range(2)]
                 for _ in range(model.n_layers)]
        toks = torch.full((B, seq), BOS, dtype=torch.long)
        for p in range(seq - 1):
            logits, _ = model(toks[:, p:p + 1], cache, p)
            probs = torch.softmax(logits[:, -1] / temp, dim=-1)
            toks[:, p + 1] = torch.multinomial(probs, 1)[:, 0]
        out.append(toks)
    return torch.cat(out)


def detokenize(streams, pieces):
    """Text of the streams: a newline where a story ends (BOS or EOS); the
    space SentencePiece pieces carry (U+2581) after it is dropped."""
    stories = []
    for s in streams.tolist():
        cur = []
        for t in s[1:]:
            if t in (0, 1, 2):
                if cur:
                    stories.append("".join(cur).replace("\u2581", " ").strip())
                cur = []
                continue
            p = pieces[t]
            if p.startswith("<0x") and p.endswith(">") and len(p) == 6:
                p = chr(int(p[3:5], 16)) if int(p[3:5], 16) < 128 else ""
            cur.append(p)
        if cur:  # the story the end of the stream cut
            stories.append("".join(cur).replace("\u2581", " ").strip())
    return "\n".join(s for s in stories if s) + "\n"


# ---- training ------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, teacher, streams):
    """Perplexity (of the stream's own next tokens), KL to the teacher per
    token, and per layer the share of FFN neurons with h == 0."""
    nll, kl, zeros, n = 0.0, 0.0, None, 0
    for b0 in range(0, len(streams), 64):
        x = streams[b0:b0 + 64]
        logits, hs = model(x)
        lt, _ = teacher(x)
        lp = F.log_softmax(logits[:, :-1], -1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        kl += F.kl_div(lp, F.log_softmax(lt[:, :-1], -1), log_target=True, reduction="sum").item()
        z = torch.stack([(h == 0).float().mean(dim=(0, 1)).mean() * x.shape[0] for h in hs])
        zeros = z if zeros is None else zeros + z
        n += x[:, 1:].numel()
    return math.exp(nll / n), kl / n, (zeros / len(streams)).tolist()


def finetune(student, teacher, train, held, a):
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for pg in opt.param_groups:
            pg["lr"] = lr
        rows = torch.randint(len(train), (a.batch,), generator=g)
        start = torch.randint(train.shape[1] - a.crop + 1, (1,), generator=g).item()
        x = train[rows, start:start + a.crop]
        with torch.no_grad():
            lt, _ = teacher(x)
        logits, hs = student(x)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")
        kl = kl / x.shape[1]
        # L1 of relu(gate) in units of the gate's RMS (so shrinking the gate
        # does not pay: the gate must turn negative), per layer
        l1 = torch.stack([F.relu(g).mean() / g.pow(2).mean().sqrt() for g in student.gates]).mean()
        loss = kl + a.l1 * min(1.0, 2 * step / a.steps) * l1  # the L1 weight ramps up over the first half
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            el = time.time() - t0
            msg = f"step {step + 1}/{a.steps} kl {kl.item():.4f} l1 {l1.item():.4f} lr {lr:.2e} {el:.0f} s"
            if step % 200 == 0 or step == a.steps - 1:
                ppl, hkl, z = evaluate(student, teacher, held)
                msg += f" | held-out ppl {ppl:.4f} kl {hkl:.4f} zeros " + " ".join(f"{v:.2f}" for v in z)
            print(msg, file=sys.stderr, flush=True)


# ---- output ----------------------------------------------------------------------

def write_gguf(model, template, out):
    import gguf
    r = gguf.GGUFReader(str(template))
    w = gguf.GGUFWriter(str(out), arch=None)
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        val = f.contents()
        if name == "optiml.ffn_activation":
            val = "relu"
        elif name == "general.name":
            val = "stories260K-relu"
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, val, f.types[0], sub_type=sub)
    if "optiml.ffn_activation" not in r.fields:
        w.add_string("optiml.ffn_activation", "relu")
    p = {n: getattr(model, n).detach().numpy().astype(np.float32) for n in NAMES}
    glob = {"token_embd.weight": p["emb"], "output_norm.weight": p["rms_final"]}
    per = {"attn_norm": "rms_att", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
           "ffn_norm": "rms_ffn", "ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}
    for t in r.tensors:
        if t.name in glob:
            arr = glob[t.name]
        else:
            _, il, kind, _ = t.name.split(".")
            arr = p[per[kind]][int(il)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == list(arr.shape[::-1]), t.name
        w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in r.fields["tokenizer.ggml.tokens"].data]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=str(ROOT / "models/stories260K.bin"))
    ap.add_argument("--template", default=str(ROOT / "models/stories260K.gguf"))
    ap.add_argument("--out", default=str(ROOT / "models/stories260K-relu.gguf"))
    ap.add_argument("--calib-out", default=str(ROOT / "tests/data/stories260K_calib.txt"))
    ap.add_argument("--eval-out", default=str(ROOT / "tests/data/stories260K_eval.txt"))
    ap.add_argument("--n-train", type=int, default=1024, help="training streams")
    ap.add_argument("--n-held", type=int, default=64, help="held-out streams (evaluation)")
    ap.add_argument("--n-text", type=int, default=48, help="streams each of the calibration and evaluation texts")
    ap.add_argument("--seq", type=int, default=256, help="tokens per stream")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=64, help="training window: a random crop of the streams")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--l1", type=float, default=0.2, help="weight of the sparsity penalty (mean relu(gate) / rms(gate))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--texts-only", action="store_true", help="write the calibration and evaluation texts only")
    ap.add_argument("--cache", help="keep the sampled streams in this file (reused when it exists)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()

    teacher = load_llama2c(a.ckpt, "silu").requires_grad_(False)
    student = load_llama2c(a.ckpt, "relu")
    # disjoint seed ranges: training, held-out, calibration text, evaluation text
    if a.cache and pathlib.Path(a.cache).exists():
        train, held, calib, evals = torch.load(a.cache)
    else:
        train = sample_streams(teacher, a.n_train, a.seq, a.temp, a.seed * 1000000)
        held = sample_streams(teacher, a.n_held, a.seq, a.temp, a.seed * 1000000 + 100000)
        calib = sample_streams(teacher, a.n_text, a.seq, a.temp, a.seed * 1000000 + 200000)
        evals = sample_streams(teacher, a.n_text, a.seq, a.temp, a.seed * 1000000 + 300000)
        if a.cache:
            torch.save((train, held, calib, evals), a.cache)
    print(f"sampled {len(train) + len(held) + 2 * a.n_text} streams of {a.seq} in {time.time() - t0:.0f} s",
          file=sys.stderr)

    if a.texts_only:
        import gguf
        f = gguf.GGUFReader(a.template).fields["tokenizer.ggml.tokens"]
        write_texts(a, calib, evals, [bytes(f.parts[i]).decode() for i in f.data])
        return
    ppl_t, _, z_t = evaluate(teacher, teacher, held)
    ppl_s0, kl_s0, z_s0 = evaluate(student, teacher, held)
    print(f"teacher (silu) held-out ppl {ppl_t:.4f}", file=sys.stderr)
    print(f"student before fine-tuning (relu swap) ppl {ppl_s0:.4f} kl {kl_s0:.4f} zeros "
          + " ".join(f"{v:.2f}" for v in z_s0), file=sys.stderr)
    finetune(student, teacher, train, held, a)
    ppl_s, kl_s, z_s = evaluate(student, teacher, held)
    print(f"teacher ppl {ppl_t:.4f}; relu student ppl {ppl_s:.4f} ({100 * (ppl_s / ppl_t - 1):+.2f}%), "
          f"kl {kl_s:.4f}, zero share per layer " + " ".join(f"{v:.3f}" for v in z_s)
          + f"; {time.time() - t0:.0f} s in all")

    pieces = write_gguf(student, a.template, a.out)
    write_texts(a, calib, evals, pieces)


def write_texts(a, calib, evals, pieces):
    pathlib.Path(a.calib_out).write_text(detokenize(calib, pieces))
    pathlib.Path(a.eval_out).write_text(detokenize(evals, pieces))


if __name__ == "__main__":
    main()
