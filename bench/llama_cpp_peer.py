"""Peer benchmark: llama.cpp (through PyPI's llama-cpp-python, which builds
llama.cpp from source at install) on a GGUF file, a prompt of P tokens (64
unless given) in one batch and 32 decode steps, best of 3, for comparison
with optiml-bench -p P -n 32 on the same file and machine.
Usage: python bench/llama_cpp_peer.py MODEL.gguf THREADS [P]"""
import sys, time
from llama_cpp import Llama
if len(sys.argv) not in (3, 4):
    sys.exit(__doc__)
path = sys.argv[1]; threads = int(sys.argv[2]); n_prompt = int(sys.argv[3]) if len(sys.argv) == 4 else 64
if n_prompt < 1:
    sys.exit("llama_cpp_peer.py: P must be at least 1")
llm = Llama(model_path=path, n_ctx=max(256, n_prompt + 64), n_threads=threads, n_threads_batch=threads,
            verbose=False, n_batch=max(128, n_prompt))
# prompt: n_prompt tokens, decode: 32 tokens (greedy)
toks = [1] + [ (i * 7919) % 30000 + 300 for i in range(n_prompt - 1)]
best_pp = best_tg = 0
for rep in range(3):
    llm.reset()
    t0 = time.time(); llm.eval(toks); pp = len(toks) / (time.time() - t0)
    t0 = time.time()
    for i in range(32):
        llm.eval([ (i * 31) % 30000 + 300 ])
    tg = 32 / (time.time() - t0)
    best_pp = max(best_pp, pp); best_tg = max(best_tg, tg)
print(f"llama.cpp {path} t={threads}: pp{n_prompt} {best_pp:.2f} t/s, tg32 {best_tg:.2f} t/s (best of 3)")
