"""OptiML: Python bindings of liboptiml, an LLM inference engine in C.

Three layers, all over the public C API (include/optiml.h) through ctypes:

- low level: Model, Context, Batch, Sampler (optiml.core);
- llama-cpp-python style: Llama (optiml.llama);
- transformers style: AutoTokenizer, AutoModelForCausalLM (optiml.hf).

Errors of the C library raise OptimlError subclasses carrying its message.
"""
from ._lib import (BackendError, ContextFullError, FormatError, InternalError, InvalidArgumentError, ModelNotFoundError,
                   OptimlError, OptimlIOError, OutOfMemoryError, UnsupportedError, has_function,
                   library_path, set_verbosity)
from ._lib import lib as _clib
from .core import BUILTIN_CHAT_TEMPLATES, Batch, Context, Model, Sampler
from .hf import AutoModelForCausalLM, AutoTokenizer, BatchEncoding
from .llama import CHAT_FORMATS, Llama

__version__ = "0.1.0"


def library_version() -> str:
    """optiml_version() of the loaded library."""
    return _clib.optiml_version().decode()


def cpu_features() -> str:
    """The CPU kernels the library picked, e.g. "avx2 fma f16c"."""
    return _clib.optiml_cpu_features().decode()


__all__ = [
    "Model", "Context", "Batch", "Sampler", "Llama", "AutoTokenizer", "AutoModelForCausalLM", "BatchEncoding",
    "OptimlError", "InvalidArgumentError", "OptimlIOError", "ModelNotFoundError", "FormatError",
    "UnsupportedError", "OutOfMemoryError", "ContextFullError", "InternalError", "BackendError", "BUILTIN_CHAT_TEMPLATES",
    "CHAT_FORMATS", "library_path", "library_version", "cpu_features", "has_function", "set_verbosity",
]
