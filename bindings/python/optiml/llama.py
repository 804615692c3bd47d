"""High-level API in the style of llama-cpp-python: ``Llama`` with
completions, chat completions, streaming and stop sequences.

Results have llama-cpp-python's (OpenAI's) dict shapes. Text is assembled
from token bytes; streaming never splits a UTF-8 character and never emits
any part of a stop sequence (text that could be the start of one is held
back until it is known not to be). Between calls the KV cache of the
previous prompt and completion is kept and reused up to the first token
where the new prompt differs.
"""
from __future__ import annotations

import os
import random
import time
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from . import _lib
from .core import Context, Model, Sampler

__all__ = ["Llama", "CHAT_FORMATS"]

# llama-cpp-python chat_format names -> optiml_chat_apply_template names
CHAT_FORMATS = {
    "llama-2": "llama2", "llama2": "llama2", "llama-3": "llama3", "llama3": "llama3",
    "chatml": "chatml", "mistral-instruct": "mistral", "mistral": "mistral", "gemma": "gemma",
    "phi3": "phi3", "phi-3": "phi3",
}
# text that ends an assistant turn in the built-in formats (besides EOG tokens)
_TEMPLATE_STOPS = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "gemma": ["<end_of_turn>"],
                   "phi3": ["<|end|>"]}

Completion = Dict[str, Any]


def _utf8_complete(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside an
    incomplete UTF-8 sequence (a lead byte still waiting for continuation
    bytes)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        c = data[n - back]
        if c < 0x80:
            return n
        if c >= 0xC0:  # lead byte: how many bytes does it need?
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return n - back if need > back else n
    return n  # only continuation bytes: cannot complete anything


def _stop_holdback(data: bytes, stops: Sequence[bytes]) -> int:
    """Length of the longest suffix of data that is a proper prefix of a
    stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(data)), best, -1):
            if data.endswith(s[:k]):
                best = k
                break
    return best


class _TextAssembler:
    """Turns token bytes into text chunks that never end inside a UTF-8
    character nor inside a possible stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops if s]
        self.pending = b""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add bytes; return the text now safe to emit (sets .stopped when a
        stop sequence was found: nothing after it is emitted)."""
        self.pending += data
        cut = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            out, self.pending, self.stopped = self.pending[:cut], b"", True
            return out.decode("utf-8", "replace")
        n = len(self.pending) - _stop_holdback(self.pending, self.stops)
        n = _utf8_complete(self.pending[:n])
        out, self.pending = self.pending[:n], self.pending[n:]
        return out.decode("utf-8", "replace")

    def flush(self) -> str:
        out, self.pending = self.pending, b""
        return out.decode("utf-8", "replace")


class Llama:
    """A model and one context, llama-cpp-python style.

    Args:
        model_path: GGUF file.
        n_ctx: context length in tokens (0: the model's training context).
        n_threads: CPU threads (None: every core).
        n_gpu_layers: layers on the GPU (GPU builds).
        vram_budget: GiB of GPU memory to fill (GPU builds), or None.
        seed: sampling seed; None, -1 or 0xFFFFFFFF picks a random one. Calls without
            their own seed draw successive seeds from it.
        verbose: library log lines from DEBUG up (else WARN and up).
        n_batch: most prompt tokens decoded at once.
        chat_format: llama-cpp-python format name ("chatml", "llama-2",
            "llama-3", "mistral-instruct", "gemma", "phi3") for chat.
        chat_template: template text or built-in name; overrides
            chat_format. Without either, the model's own template is used
            (or, when it has none, the library's built-in guess).
        use_mmap: map the model file.
        repack: repack q4_0 and q4_k weights at load for the CPU (llama.cpp's
            --no-repack is repack=False).
    """

    def __init__(self, model_path: Union[str, os.PathLike], n_ctx: int = 512, n_threads: Optional[int] = None,
                 n_gpu_layers: int = 0, vram_budget: Optional[float] = None, seed: Optional[int] = None,
                 verbose: bool = False, n_batch: int = 512, chat_format: Optional[str] = None,
                 chat_template: Optional[str] = None, use_mmap: bool = True, repack: bool = True,
                 **kwargs: Any) -> None:
        _lib.set_verbosity(verbose)
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        self._model = Model(self.model_path, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget,
                            use_mmap=use_mmap, repack=repack)
        try:
            n_ctx = int(n_ctx) if n_ctx else self._model.n_ctx_train
            self._ctx = Context(self._model, n_ctx=n_ctx, n_batch=max(1, min(int(n_batch), n_ctx)),
                                n_threads=n_threads)
        except BaseException:
            self._model.close()
            raise
        self._cache: List[int] = []  # the tokens whose K/V are in the cache (sequence 0)
        # None, -1 and llama-cpp-python's LLAMA_DEFAULT_SEED (0xFFFFFFFF) mean a random seed
        self._rng = random.Random(None if seed is None or seed < 0 or seed == 0xFFFFFFFF else seed)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat_format {chat_format!r} (known: {', '.join(sorted(CHAT_FORMATS))})")
        self.chat_format = chat_format
        self.chat_template = chat_template if chat_template is not None else (
            CHAT_FORMATS[chat_format] if chat_format else None)

    # ---- life cycle and properties
    def close(self) -> None:
        """Free the context and the model now."""
        self._ctx.close()
        self._model.close()

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def model(self) -> Model:
        return self._model

    @property
    def ctx(self) -> Context:
        return self._ctx

    def n_ctx(self) -> int:
        return self._ctx.n_ctx

    def n_vocab(self) -> int:
        return self._model.n_vocab

    def token_bos(self) -> int:
        return self._model.token_bos

    def token_eos(self) -> int:
        return self._model.token_eos

    @property
    def n_tokens(self) -> int:
        """Tokens currently in the KV cache."""
        return len(self._cache)

    def reset(self) -> None:
        """Forget the cached prompt."""
        self._ctx.kv_clear(-1)
        self._cache = []

    # ---- tokens
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of text (bytes or str)."""
        return self._model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """Bytes of tokens (see Model.detokenize)."""
        return self._model.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    # ---- evaluation and generation
    def eval(self, tokens: Sequence[int]) -> None:
        """Make the cache hold exactly tokens, reusing the longest cached
        prefix; the logits of the last token are computed."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("eval: no tokens")
        if len(tokens) > self._ctx.n_ctx:
            raise ValueError(f"prompt of {len(tokens)} tokens does not fit the context of {self._ctx.n_ctx}")
        n_common = 0
        for a, b in zip(self._cache, tokens):
            if a != b:
                break
            n_common += 1
        n_keep = min(n_common, len(tokens) - 1)  # the last token is decoded again for its logits
        self._ctx.kv_truncate(0, n_keep)
        self._cache = self._cache[:n_keep]
        try:
            self._ctx.eval(tokens[n_keep:], pos=n_keep)
        except BaseException:
            self.reset()
            raise
        self._cache.extend(tokens[n_keep:])

    def _next_seed(self, seed: Optional[int]) -> int:
        return int(seed) if seed is not None and seed >= 0 else self._rng.getrandbits(64)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 temp: float = 0.80, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: Optional[int] = None, reset: bool = True) -> Iterator[int]:
        """Yield sampled tokens after the prompt tokens, forever (the caller
        stops on EOG or a length; the generator ends when the context is
        full). temp <= 0 is greedy."""
        del reset  # the prefix cache decides what to re-evaluate
        tokens = list(tokens)
        self.eval(tokens)
        with Sampler(self._model.n_vocab, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                     repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                     seed=self._next_seed(seed)) as smpl:
            for t in tokens:
                smpl.accept(t)
            while True:
                tok = smpl.sample(self._ctx)
                yield tok
                smpl.accept(tok)
                if len(self._cache) >= self._ctx.n_ctx:
                    return
                self._ctx.eval([tok], pos=len(self._cache))
                self._cache.append(tok)

    # ---- completions
    def _prompt_tokens(self, prompt: Union[str, bytes, Sequence[int]], special: bool = True) -> List[int]:
        if isinstance(prompt, (str, bytes)):
            data = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
            bos_text = self._model.token_to_piece(self._model.token_bos, special=True) \
                if self._model.token_bos >= 0 else b""
            add_bos = self._model.add_bos and not (special and bos_text and data.startswith(bos_text))
            toks = self._model.tokenize(data, add_bos=add_bos, special=special)
        else:
            toks = [int(t) for t in prompt]
        if not toks:
            raise ValueError("the prompt is empty and the model has no BOS token")
        return toks

    def _completion_chunks(self, prompt: Union[str, bytes, Sequence[int]], max_tokens: Optional[int],
                           temperature: float, top_p: float, top_k: int, min_p: float, repeat_penalty: float,
                           seed: Optional[int], stop: Union[None, str, List[str]], echo: bool,
                           stats: Dict[str, Any], special: bool = True) -> Iterator[Dict[str, Any]]:
        """Yield {"text", "finish_reason"} pieces; fills stats with token counts."""
        toks = self._prompt_tokens(prompt, special)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stats["prompt_tokens"], stats["completion_tokens"] = len(toks), 0
        if echo:
            text = prompt if isinstance(prompt, str) else \
                (prompt if isinstance(prompt, bytes) else self._model.detokenize(toks)).decode("utf-8", "replace")
            if text:
                yield {"text": text, "finish_reason": None}
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else None
        asm = _TextAssembler(stops)
        finish = "length"
        prev = toks[-1]
        bos = self._model.token_bos
        gen = self.generate(toks, top_k=top_k, top_p=top_p, min_p=min_p, temp=temperature,
                            repeat_penalty=repeat_penalty, seed=seed)
        try:
            for tok in gen:
                if self._model.is_eog(tok):
                    finish = "stop"
                    break
                stats["completion_tokens"] += 1
                text = asm.push(self._model.token_to_piece(tok, lstrip=prev == bos))
                prev = tok
                if text:
                    yield {"text": text, "finish_reason": None}
                if asm.stopped:
                    finish = "stop"
                    break
                if limit is not None and stats["completion_tokens"] >= limit:
                    break
        finally:
            gen.close()
        text = asm.flush()
        if text:
            yield {"text": text, "finish_reason": None}
        yield {"text": "", "finish_reason": finish}

    def create_completion(self, prompt: Union[str, bytes, Sequence[int]], max_tokens: Optional[int] = 16,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          repeat_penalty: float = 1.0, seed: Optional[int] = None,
                          stop: Union[None, str, List[str]] = None, stream: bool = False, echo: bool = False,
                          **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        """Complete a prompt (text or token ids).

        max_tokens None or <= 0 generates until an end-of-generation token
        or a full context; temperature <= 0 is greedy. Returns a
        "text_completion" dict, or with stream=True an iterator of chunks of
        the same shape whose texts concatenate to the full text (the last
        chunk carries finish_reason, "stop" or "length")."""
        cmpl_id, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        stats: Dict[str, Any] = {}
        pieces = self._completion_chunks(prompt, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                         seed, stop, echo, stats)

        def chunk(text: str, finish: Optional[str]) -> Completion:
            return {"id": cmpl_id, "object": "text_completion", "created": created, "model": self.model_path,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if stream:
            return (chunk(p["text"], p["finish_reason"]) for p in pieces)
        texts, finish = [], None
        for p in pieces:
            texts.append(p["text"])
            finish = p["finish_reason"] or finish
        out = chunk("".join(texts), finish)
        out["usage"] = {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                        "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}
        return out

    def __call__(self, prompt: Union[str, bytes, Sequence[int]], **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        """Same as create_completion()."""
        return self.create_completion(prompt, **kwargs)

    # ---- chat
    def _chat_template_name(self) -> Optional[str]:
        """The template passed to the library: text, a built-in name, or None
        for the model's own (or the library's guess)."""
        if self.chat_template is None and self._model.chat_template is None and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"{self.model_path} has no chat template: using the library's built-in guess "
                          "(pass chat_format= to choose one)", stacklevel=3)
        return self.chat_template

    def apply_chat_template(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat messages render to."""
        return self._model.apply_chat_template(messages, self._chat_template_name(), add_generation_prompt)

    def create_chat_completion(self, messages: Sequence[Dict[str, str]], temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, stream: bool = False,
                               stop: Union[None, str, List[str]] = None, seed: Optional[int] = None,
                               max_tokens: Optional[int] = None, repeat_penalty: float = 1.0,
                               **kwargs: Any) -> Union[Completion, Iterator[Completion]]:
        """Answer chat messages ([{"role", "content"}]) through the chat
        template. Returns a "chat.completion" dict, or with stream=True
        "chat.completion.chunk" dicts: a first delta with the role, deltas
        with content, and a last empty delta with finish_reason."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stops += _TEMPLATE_STOPS.get(self.chat_template or "", [])
        if self.chat_template is None and self._model.chat_template is None:
            stops += [s for v in _TEMPLATE_STOPS.values() for s in v if s in prompt]
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        stats: Dict[str, Any] = {}
        pieces = self._completion_chunks(prompt, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                         seed, stops, False, stats)

        def chunk(delta: Dict[str, str], finish: Optional[str]) -> Completion:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_path,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if stream:
            def chunks() -> Iterator[Completion]:
                yield chunk({"role": "assistant"}, None)
                for p in pieces:
                    if p["finish_reason"] is not None:
                        yield chunk({}, p["finish_reason"])
                    elif p["text"]:
                        yield chunk({"content": p["text"]}, None)
            return chunks()
        texts, finish = [], None
        for p in pieces:
            texts.append(p["text"])
            finish = p["finish_reason"] or finish
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_path,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                          "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}}

