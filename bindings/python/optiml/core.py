"""Low-level objects over the C API: Model, Context, Batch, Sampler.

Each object owns one C handle. ``close()`` (or leaving a ``with`` block)
frees it at once; otherwise garbage collection frees it. A Context keeps its
Model alive, and closing a Model that contexts still use only frees it once
the last of them is closed.

Logits come back as a numpy array viewing the context's own buffer (no copy)
when numpy is installed, else as a list of floats. The view is overwritten
by the next decode of that context: copy it (``.copy()``) to keep it.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from . import _lib
from ._lib import ChatMessage, SamplerParams, check, lib

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - exercised in the numpy-less venv
    _np = None

__all__ = ["Model", "Context", "Batch", "Sampler", "Logits", "BUILTIN_CHAT_TEMPLATES"]

TextLike = Union[str, bytes]
Logits = Any  # numpy.ndarray of float32 when numpy is installed, else List[float]

# Names optiml_chat_apply_template() knows (besides template text).
BUILTIN_CHAT_TEMPLATES = ("llama2", "llama3", "chatml", "mistral", "gemma", "phi3")


def _to_bytes(text: TextLike) -> bytes:
    if isinstance(text, bytes):
        return text
    if isinstance(text, str):
        return text.encode("utf-8")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def _finalizing() -> bool:
    try:
        return sys.is_finalizing()
    except Exception:  # modules already torn down
        return True


class _Handle:
    """Owns one C pointer and the function that frees it."""

    _ptr: Optional[int] = None

    def _release(self) -> None:  # overridden
        raise NotImplementedError

    def close(self) -> None:
        """Free the C resources now (idempotent)."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if _finalizing():  # the process is going away: let the OS reclaim it
            return
        try:
            self._release()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        """True once the C object was freed."""
        return self._ptr is None

    def _handle(self) -> int:
        if self._ptr is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._ptr


# ---- model --------------------------------------------------------------------


class Model(_Handle):
    """A loaded GGUF model (weights and vocabulary), shareable by contexts on
    several threads.

    Args:
        path: the GGUF file.
        n_gpu_layers: layers to put on the GPU (GPU builds; the CPU build
            ignores it with a warning in the log).
        vram_budget: GiB of GPU memory to fill (GPU builds), or None.
        use_mmap: map the file instead of reading it.
        repack: repack the q4_0 and q4_k matrices the CPU multiplies at load (8
            rows interleaved, faster decode); False multiplies the file's
            rows.

    Raises:
        ModelNotFoundError: the file does not exist.
        OptimlIOError, FormatError, UnsupportedError: see their docs.
    """

    def __init__(self, path: Union[str, os.PathLike], n_gpu_layers: int = 0,
                 vram_budget: Optional[float] = None, use_mmap: bool = True, repack: bool = True) -> None:
        self.path = os.fspath(path)
        self._lock = threading.RLock()  # re-entrant: a GC-run __del__ may detach inside _attach
        self._users = 0
        self._close_requested = False
        params = lib.optiml_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vram_budget_gib = float(vram_budget or 0.0)
        params.use_mmap = bool(use_mmap)
        params.repack = bool(repack)
        out = ctypes.c_void_p()
        st = lib.optiml_model_load(self.path.encode(), ctypes.byref(params), ctypes.byref(out))
        check(st, path=self.path)
        self._free_fn = lib.optiml_model_free
        self._ptr = out.value
        self.n_vocab: int = lib.optiml_model_n_vocab(self._ptr)
        self.n_embd: int = lib.optiml_model_n_embd(self._ptr)
        self.n_layer: int = lib.optiml_model_n_layer(self._ptr)
        self.n_ctx_train: int = lib.optiml_model_n_ctx_train(self._ptr)
        self.token_bos: int = lib.optiml_token_bos(self._ptr)
        self.token_eos: int = lib.optiml_token_eos(self._ptr)
        self.add_bos: bool = bool(lib.optiml_token_add_bos(self._ptr))
        self._piece_cache: Dict[tuple, bytes] = {}

    # -- life cycle
    def _attach(self) -> None:
        with self._lock:
            self._handle()
            if self._close_requested:
                raise ValueError("Model is closed")
            self._users += 1

    def _detach(self) -> None:
        with self._lock:
            self._users -= 1
            free = self._close_requested and self._users == 0
        if free:
            self._free_now()

    def _free_now(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._free_fn(ptr)

    def _release(self) -> None:
        with self._lock:
            self._close_requested = True
            free = self._users == 0
        if free:
            self._free_now()

    # -- metadata
    @property
    def size(self) -> int:
        """Bytes of weight data."""
        return int(lib.optiml_model_size(self._handle()))

    @property
    def n_params(self) -> int:
        """Number of weight parameters."""
        return int(lib.optiml_model_n_params(self._handle()))

    @property
    def desc(self) -> str:
        """Short description, e.g. "llama 64d 5L f32"."""
        buf = ctypes.create_string_buffer(256)
        n = lib.optiml_model_desc(self._handle(), buf, 256)
        if n >= 256:
            buf = ctypes.create_string_buffer(n + 1)
            lib.optiml_model_desc(self._handle(), buf, n + 1)
        return buf.value.decode("utf-8", "replace")

    def meta(self, key: str) -> Optional[str]:
        """A metadata string value of the GGUF file, or None."""
        v = lib.optiml_model_meta_str(self._handle(), key.encode())
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def chat_template(self) -> Optional[str]:
        """The model's chat template (tokenizer.chat_template), or None."""
        return self.meta("tokenizer.chat_template")

    def is_eog(self, token: int) -> bool:
        """True for tokens that end generation (EOS, EOT, ...)."""
        return bool(lib.optiml_token_is_eog(self._handle(), int(token)))

    # -- tokenizer
    def tokenize(self, text: TextLike, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of text. add_bos prepends BOS (when the vocabulary has
        one); special lets control-token text such as "<s>" become that
        token."""
        data = _to_bytes(text)
        h = self._handle()
        n_max = len(data) + 2
        while True:
            buf = (ctypes.c_int32 * n_max)()
            n = lib.optiml_tokenize(h, data, len(data), buf, n_max, bool(add_bos), bool(special))
            if n == -(2**31):
                _lib.raise_last_error(_lib.OPTIML_ERR_INVALID_ARG, "tokenize")
            if n >= 0:
                return buf[:n]
            n_max = -n

    def token_to_piece(self, token: int, lstrip: bool = False, special: bool = False) -> bytes:
        """The bytes of one token. lstrip drops the leading space that
        SentencePiece pieces carry; control tokens are b"" unless special."""
        key = (int(token), bool(lstrip), bool(special))
        piece = self._piece_cache.get(key)
        if piece is not None:
            return piece
        h = self._handle()
        buf = ctypes.create_string_buffer(64)
        n = lib.optiml_token_to_piece(h, key[0], buf, 64, key[1], key[2])
        if n == -(2**31):
            _lib.raise_last_error(_lib.OPTIML_ERR_INVALID_ARG, "token_to_piece")
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.optiml_token_to_piece(h, key[0], buf, -n, key[1], key[2])
        piece = buf.raw[:n]
        if len(self._piece_cache) < 1 << 20:
            self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: Iterable[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """Bytes of a token sequence. The leading space of a token is dropped
        when it starts the text (no prev_tokens) or follows BOS, as
        SentencePiece decoding does."""
        prev = prev_tokens[-1] if prev_tokens else None
        first = not prev_tokens
        out = []
        for t in tokens:
            out.append(self.token_to_piece(t, lstrip=first or prev == self.token_bos, special=special))
            prev, first = t, False
        return b"".join(out)

    # -- chat templates
    def apply_chat_template(self, messages: Sequence[Dict[str, str]], template: Optional[str] = None,
                            add_generation_prompt: bool = True) -> str:
        """Render chat messages ({"role", "content"} dicts) into a prompt.

        template: None for the model's own template (or the library's guess
        when it has none), template text, or a built-in name (see
        BUILTIN_CHAT_TEMPLATES).

        Raises NotImplementedError when the loaded library predates
        optiml_chat_apply_template().
        """
        if not _lib.has_function("optiml_chat_apply_template"):
            raise NotImplementedError(
                f"{_lib.library_path} has no optiml_chat_apply_template(): rebuild liboptiml "
                "from a newer source tree to use chat templates")
        msgs = (ChatMessage * max(1, len(messages)))()
        keep = []
        for i, m in enumerate(messages):
            role, content = _to_bytes(m["role"]), _to_bytes(m.get("content") or "")
            keep += [role, content]
            msgs[i].role, msgs[i].content = role, content
        tmpl = None if template is None else _to_bytes(template)
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.optiml_chat_apply_template(self._handle(), tmpl, msgs, len(messages),
                                               bool(add_generation_prompt), buf, size)
            if n == -(2**31):
                _lib.raise_last_error(_lib.OPTIML_ERR_INVALID_ARG, "chat template")
            if n < size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1


# ---- batch and context ---------------------------------------------------------


class Batch(_Handle):
    """A batch of up to n_max tokens for Context.decode(): entry i is a token
    at a position of a sequence, optionally asking for its logits."""

    def __init__(self, n_max: int) -> None:
        if n_max <= 0:
            raise ValueError("Batch: n_max must be positive")
        self.n_max = int(n_max)
        self._free_fn = lib.optiml_batch_free
        self._b = lib.optiml_batch_init(self.n_max)
        if not self._b.token:
            raise _lib.OutOfMemoryError(f"Batch: out of memory for {n_max} tokens", _lib.OPTIML_ERR_NOMEM)
        self._ptr = ctypes.addressof(self._b)

    def _release(self) -> None:
        if self._ptr is not None:
            self._ptr = None
            self._free_fn(self._b)

    @property
    def n_tokens(self) -> int:
        return int(self._b.n_tokens)

    def clear(self) -> None:
        """Remove every entry."""
        self._b.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int = 0, logits: bool = False) -> None:
        """Append one entry."""
        self._handle()
        i = self._b.n_tokens
        if i >= self.n_max:
            raise IndexError(f"Batch is full ({self.n_max} tokens)")
        self._b.token[i] = token
        self._b.pos[i] = pos
        self._b.seq_id[i] = seq_id
        self._b.logits[i] = 1 if logits else 0
        self._b.n_tokens = i + 1


class Context(_Handle):
    """KV cache, scratch buffers and logits for one model; used by one thread
    at a time (different contexts may run on different threads at once).

    Args:
        model: the Model (kept alive by this context).
        n_ctx: KV-cache cells; 0 = the model's training context.
        n_batch: most tokens one decode takes.
        n_seq_max: distinct sequence ids (1..64).
        n_threads: CPU threads; None = every core.
    """

    def __init__(self, model: Model, n_ctx: int = 0, n_batch: int = 512, n_seq_max: int = 1,
                 n_threads: Optional[int] = None) -> None:
        model._attach()
        self.model = model
        try:
            params = lib.optiml_context_default_params()
            params.n_ctx = int(n_ctx)
            params.n_batch = int(n_batch)
            params.n_seq_max = int(n_seq_max)
            params.n_threads = int(n_threads or 0)
            out = ctypes.c_void_p()
            check(lib.optiml_context_init(model._handle(), ctypes.byref(params), ctypes.byref(out)))
        except BaseException:
            model._detach()
            raise
        self._free_fn = lib.optiml_context_free
        self._ptr = out.value
        self.n_ctx: int = int(lib.optiml_context_n_ctx(self._ptr))
        self.n_batch = int(n_batch)
        self._n_last = 0
        self._batch: Optional[Batch] = None

    def _release(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._free_fn(ptr)
            if self._batch is not None:
                self._batch.close()
            self.model._detach()

    # -- decoding
    def decode(self, batch: Batch) -> None:
        """Run the model over a batch (the GIL is released meanwhile).
        Raises ContextFullError when the KV cache has no room."""
        st = lib.optiml_decode(self._handle(), ctypes.byref(batch._b))
        check(st)
        self._n_last = batch.n_tokens

    def eval(self, tokens: Sequence[int], pos: Optional[int] = None, seq_id: int = 0,
             logits_all: bool = False) -> None:
        """Decode tokens of one sequence from position pos (default: right
        after the sequence's cached entries), in chunks of n_batch; logits of
        the last token (or of all tokens of the last chunk with logits_all)."""
        if pos is None:
            pos = self.kv_pos_max(seq_id) + 1
        if self._batch is None:
            self._batch = Batch(self.n_batch)
        b = self._batch
        n = len(tokens)
        for start in range(0, n, self.n_batch):
            b.clear()
            chunk = tokens[start:start + self.n_batch]
            for j, t in enumerate(chunk):
                b.add(t, pos + start + j, seq_id, logits_all or start + j == n - 1)
            self.decode(b)

    def logits_ptr(self, i: int = -1) -> "ctypes._Pointer":
        """Raw pointer to the n_vocab logits of entry i of the last decode."""
        if i < 0:
            i += self._n_last
        p = lib.optiml_get_logits_ith(self._handle(), i)
        if not p:
            raise IndexError(f"entry {i} of the last batch has no logits")
        return p

    def logits(self, i: int = -1) -> Logits:
        """Logits of entry i (negative: from the end) of the last decode: a
        float32 numpy array viewing the context's buffer (overwritten by the
        next decode) when numpy is installed, else a list of floats."""
        p = self.logits_ptr(i)
        n = self.model.n_vocab
        arr = ctypes.cast(p, ctypes.POINTER(ctypes.c_float * n)).contents
        if _np is None:
            return list(arr)
        arr._owner = self  # the view keeps the context (and its buffer) alive
        return _np.ctypeslib.as_array(arr)

    # -- KV cache
    def kv_clear(self, seq_id: int = -1) -> None:
        """Forget the cache of a sequence (-1: all)."""
        lib.optiml_kv_seq_clear(self._handle(), seq_id)

    def kv_truncate(self, seq_id: int, pos_start: int) -> None:
        """Forget positions >= pos_start of a sequence (-1: all)."""
        lib.optiml_kv_seq_truncate(self._handle(), seq_id, pos_start)

    def kv_copy(self, src: int, dst: int) -> None:
        """Make the cached entries of sequence src also belong to dst."""
        lib.optiml_kv_seq_copy(self._handle(), src, dst)

    def kv_pos_max(self, seq_id: int = 0) -> int:
        """Largest cached position of a sequence, -1 if empty."""
        return int(lib.optiml_kv_seq_pos_max(self._handle(), seq_id))


# ---- sampler -------------------------------------------------------------------


class Sampler(_Handle):
    """Token sampler: temperature (<= 0: greedy), top-k, top-p, min-p and a
    repetition penalty over the last repeat_last_n accepted tokens."""

    def __init__(self, n_vocab: Union[int, Model], temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int = 0) -> None:
        self.n_vocab = n_vocab.n_vocab if isinstance(n_vocab, Model) else int(n_vocab)
        p = SamplerParams(temp=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                          repeat_penalty=float(repeat_penalty), repeat_last_n=int(repeat_last_n),
                          seed=int(seed) & (2**64 - 1))
        ptr = lib.optiml_sampler_init(ctypes.byref(p), self.n_vocab)
        if not ptr:
            _lib.raise_last_error(_lib.OPTIML_ERR_INVALID_ARG, "Sampler")
        self._free_fn = lib.optiml_sampler_free
        self._ptr = ptr

    def _release(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._free_fn(ptr)

    def sample(self, logits: Union[Context, Logits, "ctypes._Pointer"], i: int = -1) -> int:
        """Pick a token from a context's logits of entry i, from a pointer, a
        numpy array or a list of n_vocab floats."""
        if isinstance(logits, Context):
            ptr = logits.logits_ptr(i)
        elif isinstance(logits, ctypes._Pointer):
            ptr = logits
        elif _np is not None and isinstance(logits, _np.ndarray):
            a = _np.ascontiguousarray(logits, dtype=_np.float32)
            if a.size != self.n_vocab:
                raise ValueError(f"expected {self.n_vocab} logits, got {a.size}")
            ptr = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            return int(lib.optiml_sampler_sample(self._handle(), ptr))
        else:
            vals = list(logits)
            if len(vals) != self.n_vocab:
                raise ValueError(f"expected {self.n_vocab} logits, got {len(vals)}")
            ptr = (ctypes.c_float * self.n_vocab)(*vals)
        return int(lib.optiml_sampler_sample(self._handle(), ptr))

    def accept(self, token: int) -> None:
        """Record a token of the history the repetition penalty looks at."""
        lib.optiml_sampler_accept(self._handle(), int(token))

    def reset(self) -> None:
        """Forget the history and re-seed."""
        lib.optiml_sampler_reset(self._handle())
