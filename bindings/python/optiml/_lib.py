"""ctypes declarations of the public C API (include/optiml.h) and the loader
that finds liboptiml.so.

The library is looked for, in this order:

1. the path in the environment variable ``OPTIML_LIBRARY``;
2. next to this package (the install step copies it there);
3. ``<repo>/build/lib`` relative to the package source (editable installs
   and running from a checkout).

Only functions and structs of include/optiml.h are declared here; nothing
reaches into the library's internals. Every call goes through
``ctypes.CDLL``, which releases the GIL for the duration of the call, so
decoding in one thread lets other Python threads run.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import sys
import threading
from typing import List, Optional

__all__ = [
    "OptimlError", "InvalidArgumentError", "OptimlIOError", "ModelNotFoundError", "FormatError",
    "UnsupportedError", "OutOfMemoryError", "ContextFullError", "InternalError",
    "lib", "library_path", "check", "raise_last_error", "ModelParams", "ContextParams", "BatchStruct",
    "SamplerParams", "ChatMessage", "LIBRARY_NAME",
]

LIBRARY_NAME = "liboptiml.so" if sys.platform != "darwin" else "liboptiml.dylib"

# ---- status codes and exceptions --------------------------------------------

OPTIML_OK = 0
OPTIML_ERR_INVALID_ARG = 1
OPTIML_ERR_IO = 2
OPTIML_ERR_FORMAT = 3
OPTIML_ERR_UNSUPPORTED = 4
OPTIML_ERR_NOMEM = 5
OPTIML_ERR_CONTEXT_FULL = 6
OPTIML_ERR_INTERNAL = 7
OPTIML_ERR_BACKEND = 8


class OptimlError(Exception):
    """An error reported by the C library.

    Attributes:
        status: the optiml_status code (an int, 0 never appears here).
        message: the library's one-line reason (optiml_last_error()).
    """

    def __init__(self, message: str, status: int = OPTIML_ERR_INTERNAL) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(OptimlError, ValueError):
    """OPTIML_ERR_INVALID_ARG: a NULL or out-of-range argument."""


class OptimlIOError(OptimlError, OSError):
    """OPTIML_ERR_IO: opening, reading or mapping a file failed."""

    def __init__(self, message: str, status: int = OPTIML_ERR_IO) -> None:
        OptimlError.__init__(self, message, status)


class ModelNotFoundError(OptimlIOError, FileNotFoundError):
    """OPTIML_ERR_IO for a file that does not exist."""


class FormatError(OptimlError, ValueError):
    """OPTIML_ERR_FORMAT: the file is truncated or corrupt."""


class UnsupportedError(OptimlError, NotImplementedError):
    """OPTIML_ERR_UNSUPPORTED: a valid file using a feature OptiML lacks."""


class OutOfMemoryError(OptimlError, MemoryError):
    """OPTIML_ERR_NOMEM: an allocation failed."""


class ContextFullError(OptimlError):
    """OPTIML_ERR_CONTEXT_FULL: no free KV-cache cell for a batch token."""


class InternalError(OptimlError):
    """OPTIML_ERR_INTERNAL: a bug in the library."""


class BackendError(OptimlError):
    """OPTIML_ERR_BACKEND: the GPU backend failed (driver, out of VRAM)."""


_STATUS_EXC = {
    OPTIML_ERR_INVALID_ARG: InvalidArgumentError,
    OPTIML_ERR_IO: OptimlIOError,
    OPTIML_ERR_FORMAT: FormatError,
    OPTIML_ERR_UNSUPPORTED: UnsupportedError,
    OPTIML_ERR_NOMEM: OutOfMemoryError,
    OPTIML_ERR_CONTEXT_FULL: ContextFullError,
    OPTIML_ERR_INTERNAL: InternalError,
    OPTIML_ERR_BACKEND: BackendError,
}

# ---- structs ----------------------------------------------------------------

c_token = ctypes.c_int32


class ModelParams(ctypes.Structure):
    """optiml_model_params."""
    _fields_ = [("n_gpu_layers", ctypes.c_int32), ("vram_budget_gib", ctypes.c_double),
                ("use_mmap", ctypes.c_bool), ("repack", ctypes.c_bool)]


class ContextParams(ctypes.Structure):
    """optiml_context_params."""
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_seq_max", ctypes.c_uint32),
                ("n_threads", ctypes.c_int32), ("sparse_mode", ctypes.c_int32)]


class BatchStruct(ctypes.Structure):
    """optiml_batch."""
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(c_token)),
                ("pos", ctypes.POINTER(ctypes.c_int32)), ("seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


class SamplerParams(ctypes.Structure):
    """optiml_sampler_params."""
    _fields_ = [("temp", ctypes.c_float), ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float),
                ("min_p", ctypes.c_float), ("repeat_penalty", ctypes.c_float),
                ("repeat_last_n", ctypes.c_int32), ("seed", ctypes.c_uint64)]


class ChatMessage(ctypes.Structure):
    """optiml_chat_message."""
    _fields_ = [("role", ctypes.c_char_p), ("content", ctypes.c_char_p)]


LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# ---- finding and loading the library ----------------------------------------

_PKG_DIR = pathlib.Path(__file__).resolve().parent


def _candidates() -> List[pathlib.Path]:
    out = []
    env = os.environ.get("OPTIML_LIBRARY")
    if env:
        out.append(pathlib.Path(env))
    out.append(_PKG_DIR / LIBRARY_NAME)
    # bindings/python/optiml -> repository root
    repo = _PKG_DIR.parent.parent.parent
    out.append(repo / "build" / "lib" / LIBRARY_NAME)
    return out


def _find_library() -> pathlib.Path:
    env = os.environ.get("OPTIML_LIBRARY")
    if env and not pathlib.Path(env).is_file():
        raise ImportError(f"OPTIML_LIBRARY={env!r} is not a file")
    for c in _candidates():
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in _candidates())
    raise ImportError(f"optiml: cannot find {LIBRARY_NAME} (tried {tried}); build it with "
                      "'cmake -B build && cmake --build build --target optiml_shared' in the "
                      "repository, or set OPTIML_LIBRARY to its path")


def _declare(cdll: ctypes.CDLL) -> None:
    P = ctypes.POINTER
    vp = ctypes.c_void_p
    sigs: dict = {
        "optiml_status_str": (ctypes.c_char_p, [ctypes.c_int]),
        "optiml_last_error": (ctypes.c_char_p, []),
        "optiml_log_set": (None, [LOG_FN, vp, ctypes.c_int]),
        "optiml_model_default_params": (ModelParams, []),
        "optiml_model_load": (ctypes.c_int, [ctypes.c_char_p, P(ModelParams), P(vp)]),
        "optiml_model_free": (None, [vp]),
        "optiml_model_n_vocab": (ctypes.c_int32, [vp]),
        "optiml_model_n_embd": (ctypes.c_int32, [vp]),
        "optiml_model_n_layer": (ctypes.c_int32, [vp]),
        "optiml_model_n_ctx_train": (ctypes.c_int32, [vp]),
        "optiml_model_size": (ctypes.c_uint64, [vp]),
        "optiml_model_n_params": (ctypes.c_uint64, [vp]),
        "optiml_model_desc": (ctypes.c_int32, [vp, ctypes.c_char_p, ctypes.c_size_t]),
        "optiml_model_meta_str": (ctypes.c_char_p, [vp, ctypes.c_char_p]),
        "optiml_token_bos": (c_token, [vp]),
        "optiml_token_eos": (c_token, [vp]),
        "optiml_token_is_eog": (ctypes.c_bool, [vp, c_token]),
        "optiml_token_add_bos": (ctypes.c_bool, [vp]),
        "optiml_tokenize": (ctypes.c_int32, [vp, ctypes.c_char_p, ctypes.c_int32, P(c_token), ctypes.c_int32,
                                             ctypes.c_bool, ctypes.c_bool]),
        "optiml_token_to_piece": (ctypes.c_int32, [vp, c_token, ctypes.c_char_p, ctypes.c_int32, ctypes.c_bool,
                                                   ctypes.c_bool]),
        "optiml_context_default_params": (ContextParams, []),
        "optiml_context_init": (ctypes.c_int, [vp, P(ContextParams), P(vp)]),
        "optiml_context_free": (None, [vp]),
        "optiml_context_n_ctx": (ctypes.c_uint32, [vp]),
        "optiml_batch_init": (BatchStruct, [ctypes.c_int32]),
        "optiml_batch_free": (None, [BatchStruct]),
        "optiml_decode": (ctypes.c_int, [vp, P(BatchStruct)]),
        "optiml_get_logits_ith": (P(ctypes.c_float), [vp, ctypes.c_int32]),
        "optiml_kv_seq_clear": (None, [vp, ctypes.c_int32]),
        "optiml_kv_seq_truncate": (None, [vp, ctypes.c_int32, ctypes.c_int32]),
        "optiml_kv_seq_copy": (None, [vp, ctypes.c_int32, ctypes.c_int32]),
        "optiml_kv_seq_pos_max": (ctypes.c_int32, [vp, ctypes.c_int32]),
        "optiml_sampler_default_params": (SamplerParams, []),
        "optiml_sampler_init": (vp, [P(SamplerParams), ctypes.c_int32]),
        "optiml_sampler_free": (None, [vp]),
        "optiml_sampler_sample": (c_token, [vp, P(ctypes.c_float)]),
        "optiml_sampler_accept": (None, [vp, c_token]),
        "optiml_sampler_reset": (None, [vp]),
        "optiml_version": (ctypes.c_char_p, []),
        "optiml_time_us": (ctypes.c_int64, []),
        "optiml_cpu_features": (ctypes.c_char_p, []),
        # optional: arrives with the chat-template work; absent in older builds
        "optiml_chat_apply_template": (ctypes.c_int32, [vp, ctypes.c_char_p, P(ChatMessage), ctypes.c_size_t,
                                                        ctypes.c_bool, ctypes.c_char_p, ctypes.c_int32]),
    }
    for name, (res, args) in sigs.items():
        if not hasattr(cdll, name):
            continue
        fn = getattr(cdll, name)
        fn.restype = res
        fn.argtypes = args


_path = _find_library()
lib = ctypes.CDLL(str(_path))
_declare(lib)
library_path: pathlib.Path = _path

# ---- errors -----------------------------------------------------------------

# The library's last error is per thread; ctypes calls run on the calling
# thread, so reading it right after a failing call is race-free.


def last_error() -> str:
    """optiml_last_error() of this thread, decoded."""
    msg = lib.optiml_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def raise_last_error(status: int, context: Optional[str] = None, path: Optional[str] = None) -> None:
    """Raise the exception matching a non-zero status with optiml_last_error()."""
    msg = last_error() or lib.optiml_status_str(status).decode()
    if context:
        msg = f"{context}: {msg}"
    cls = _STATUS_EXC.get(status, OptimlError)
    if cls is OptimlIOError and path is not None and not os.path.exists(path):
        cls = ModelNotFoundError
    raise cls(msg, status)


def check(status: int, context: Optional[str] = None, path: Optional[str] = None) -> None:
    """Raise for a non-OK optiml_status."""
    if status != OPTIML_OK:
        raise_last_error(status, context, path)


# ---- logging ----------------------------------------------------------------

_log_lock = threading.Lock()


def set_verbosity(verbose: bool) -> None:
    """Route the library's log lines to standard error from DEBUG (verbose)
    or WARN (default) upwards."""
    with _log_lock:
        lib.optiml_log_set(LOG_FN(), None, 0 if verbose else 2)


def has_function(name: str) -> bool:
    """Whether the loaded library exports this public function."""
    return hasattr(lib, name)
