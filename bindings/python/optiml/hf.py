"""transformers-style API: AutoTokenizer, AutoModelForCausalLM and
BatchEncoding over GGUF files, so code written for Hugging Face transformers
runs with ``optiml.`` in front of the class names.

Ids come back as lists, or as torch tensors (return_tensors="pt", when
torch is installed) or numpy arrays (return_tensors="np"). Batches are
padded on the left, as transformers pads for generation; the pad token is
the model's EOS token unless set.
"""
from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .core import Model
from .llama import _TEMPLATE_STOPS, Llama

__all__ = ["AutoTokenizer", "AutoModelForCausalLM", "BatchEncoding", "Tokenizer", "CausalLM"]

PathLike = Union[str, os.PathLike]


def _gguf_path(path: PathLike) -> str:
    """A GGUF file, or the first *.gguf of a directory."""
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"{p}: no .gguf file in this directory")
        return str(files[0])
    return str(p)


def _to_list(x: Any) -> Any:
    """Lists from torch tensors and numpy arrays; anything else unchanged."""
    return x.tolist() if hasattr(x, "tolist") else x


def _as_tensor(rows: List[List[int]], kind: Optional[str]) -> Any:
    if kind is None:
        return rows
    if kind == "pt":
        import torch  # raises ImportError when torch is missing, as transformers does
        return torch.tensor(rows, dtype=torch.long)
    if kind == "np":
        import numpy as np
        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors={kind!r}: use None, 'pt' or 'np'")


class BatchEncoding(dict):
    """A dict of input_ids and attention_mask with attribute access and
    .to(device), like transformers.BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> "BatchEncoding":
        """Move tensors to a torch device (lists stay as they are)."""
        for k, v in self.items():
            if hasattr(v, "to") and callable(v.to):
                self[k] = v.to(device)
        return self


# ---- tokenizer -------------------------------------------------------------------


class Tokenizer:
    """The tokenizer of a GGUF model, transformers style (see
    AutoTokenizer.from_pretrained)."""

    padding_side: str = "left"

    def __init__(self, model: Model, name_or_path: str) -> None:
        self._model = model
        self.name_or_path = name_or_path
        self.bos_token_id: Optional[int] = model.token_bos if model.token_bos >= 0 else None
        self.eos_token_id: Optional[int] = model.token_eos if model.token_eos >= 0 else None
        self.pad_token_id: Optional[int] = self.eos_token_id
        self.chat_template: Optional[str] = model.chat_template
        self.vocab_size: int = model.n_vocab

    def _piece(self, tok: Optional[int]) -> Optional[str]:
        return None if tok is None else self._model.token_to_piece(tok, special=True).decode("utf-8", "replace")

    @property
    def bos_token(self) -> Optional[str]:
        return self._piece(self.bos_token_id)

    @property
    def eos_token(self) -> Optional[str]:
        return self._piece(self.eos_token_id)

    @property
    def pad_token(self) -> Optional[str]:
        return self._piece(self.pad_token_id)

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> List[int]:
        """Token ids of one text (BOS first when add_special_tokens and the
        model adds one). Special-token text such as "<s>" becomes its token."""
        return self._model.tokenize(text, add_bos=add_special_tokens and self._model.add_bos, special=True)

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True,
                 padding: Union[bool, str] = False, truncation: bool = False, max_length: Optional[int] = None,
                 return_tensors: Optional[str] = None, return_attention_mask: bool = True,
                 **kwargs: Any) -> BatchEncoding:
        """Tokenize a text or a list of texts.

        padding: False, True / "longest" (pad to the longest row) or
        "max_length"; pads on the side padding_side names ("left").
        truncation with max_length keeps the first max_length tokens.
        return_tensors: None (lists), "pt" (torch) or "np" (numpy); a single
        text then becomes a batch of one row."""
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max((len(r) for r in rows), default=0)
            if padding == "max_length" and max_length is not None:
                width = max(width, max_length)
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            for i, r in enumerate(rows):
                n = width - len(r)
                if self.padding_side == "left":
                    rows[i], masks[i] = [pad] * n + r, [0] * n + masks[i]
                else:
                    rows[i], masks[i] = r + [pad] * n, masks[i] + [0] * n
        if return_tensors is not None and len({len(r) for r in rows}) > 1:
            raise ValueError("rows of different lengths: pass padding=True to make a tensor")
        if single and return_tensors is None:
            out = BatchEncoding(input_ids=rows[0])
            if return_attention_mask:
                out["attention_mask"] = masks[0]
            return out
        out = BatchEncoding(input_ids=_as_tensor(rows, return_tensors))
        if return_attention_mask:
            out["attention_mask"] = _as_tensor(masks, return_tensors)
        return out

    # -- decoding
    def decode(self, token_ids: Union[int, Iterable[int], Any], skip_special_tokens: bool = False,
               **kwargs: Any) -> str:
        """Text of token ids (list, tensor or array); control tokens are
        left out with skip_special_tokens. The first token's leading space
        is dropped, as SentencePiece decoding does."""
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        m = self._model
        out, prev = [], None
        for t in ids:
            if skip_special_tokens and (t == self.pad_token_id or t == self.bos_token_id or m.is_eog(t)):
                continue
            out.append(m.token_to_piece(t, lstrip=prev is None or prev == self.bos_token_id,
                                        special=not skip_special_tokens))
            prev = t
        return b"".join(out).decode("utf-8", "replace")

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = False, **kwargs: Any) -> List[str]:
        """decode() of every row."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in _to_list(sequences)]

    # -- chat
    def apply_chat_template(self, conversation: Sequence[Dict[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = False, return_tensors: Optional[str] = None,
                            chat_template: Optional[str] = None, return_dict: bool = False,
                            **kwargs: Any) -> Any:
        """Render chat messages with the model's chat template (defaults as in
        transformers: tokenize=True, add_generation_prompt=False).

        chat_template: template text or a built-in name ("chatml",
        "llama2", "llama3", "mistral", "gemma", "phi3"). When neither it
        nor the model has a template, the library's built-in guess is used,
        with a warning (transformers raises instead).

        tokenize=False returns the text; tokenize=True the ids (no BOS added:
        templates write their own), as a list or, with return_tensors, a
        tensor of one row; return_dict=True wraps them in a BatchEncoding."""
        tmpl = chat_template if chat_template is not None else self.chat_template
        if tmpl is None:
            warnings.warn(f"{self.name_or_path} has no chat template: using the library's built-in format",
                          stacklevel=2)
        text = self._model.apply_chat_template(conversation, tmpl, add_generation_prompt)
        if not tokenize:
            return text
        ids = self._model.tokenize(text, add_bos=False, special=True)
        if return_dict:
            return BatchEncoding(input_ids=_as_tensor([ids], return_tensors) if return_tensors else ids,
                                 attention_mask=_as_tensor([[1] * len(ids)], return_tensors) if return_tensors
                                 else [1] * len(ids))
        return _as_tensor([ids], return_tensors) if return_tensors else ids


class AutoTokenizer:
    """transformers.AutoTokenizer for GGUF files."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: PathLike, **kwargs: Any) -> Tokenizer:
        """Load the tokenizer of a GGUF file (or of the first .gguf in a
        directory). Other transformers arguments are accepted and ignored."""
        path = _gguf_path(pretrained_model_name_or_path)
        return Tokenizer(Model(path), path)


# ---- model -------------------------------------------------------------------------


class _Config(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CausalLM:
    """A GGUF causal language model, transformers style (see
    AutoModelForCausalLM.from_pretrained)."""

    def __init__(self, llama: Llama) -> None:
        self._llama = llama
        m = llama.model
        self.name_or_path = llama.model_path
        self.device = "cpu"
        self.dtype = None
        self.config = _Config(vocab_size=m.n_vocab, hidden_size=m.n_embd, num_hidden_layers=m.n_layer,
                              max_position_embeddings=m.n_ctx_train,
                              bos_token_id=m.token_bos if m.token_bos >= 0 else None,
                              eos_token_id=m.token_eos if m.token_eos >= 0 else None)

    @property
    def llama(self) -> Llama:
        """The underlying Llama object."""
        return self._llama

    def eval(self) -> "CausalLM":
        """No-op (inference only), for transformers compatibility."""
        return self

    def close(self) -> None:
        """Free the model now."""
        self._llama.close()

    def generate(self, input_ids: Any = None, attention_mask: Any = None, max_new_tokens: Optional[int] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 repetition_penalty: float = 1.0, eos_token_id: Union[None, int, List[int]] = None,
                 pad_token_id: Optional[int] = None, max_length: Optional[int] = None, min_p: float = 0.0,
                 seed: Optional[int] = None, **kwargs: Any) -> Any:
        """Continue each row of input_ids; returns prompt + generated ids per
        row (the end-of-generation token included when one ended the row;
        shorter rows padded on the right with pad_token_id), as a torch
        tensor or numpy array if input_ids was one, else a list of lists.

        Rows are generated one after the other; positions where
        attention_mask is 0 (left padding) are left out of the prompt.
        do_sample=False is greedy; otherwise temperature, top_p, top_k,
        min_p and repetition_penalty shape the sampling (seed makes it
        reproducible). max_new_tokens defaults to 20 - len(prompt) through
        max_length=20, as in transformers. Other transformers arguments
        are accepted and ignored."""
        if input_ids is None:
            raise ValueError("generate: input_ids is required")
        kind = "pt" if type(input_ids).__module__.startswith("torch") else \
            "np" if type(input_ids).__module__.startswith("numpy") else None
        rows = _to_list(input_ids)
        if rows and isinstance(rows[0], int):
            rows = [rows]
        masks = _to_list(attention_mask) if attention_mask is not None else [[1] * len(r) for r in rows]
        if masks and isinstance(masks[0], int):
            masks = [masks]
        stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        m = self._llama.model
        pad = pad_token_id if pad_token_id is not None else (m.token_eos if m.token_eos >= 0 else 0)
        outs = []
        for row, mask in zip(rows, masks):
            prompt = [t for t, k in zip(row, mask) if k]
            limit = max_new_tokens if max_new_tokens is not None else max((max_length or 20) - len(row), 0)
            gen: List[int] = []
            if limit > 0:
                it = self._llama.generate(prompt, top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                                          min_p=min_p if do_sample else 0.0, temp=temperature if do_sample else 0.0,
                                          repeat_penalty=repetition_penalty, repeat_last_n=self._llama.n_ctx(),
                                          seed=seed)
                for tok in it:
                    gen.append(tok)
                    if m.is_eog(tok) or tok in stop_ids or len(gen) >= limit:
                        break
                it.close()
            outs.append(list(row) + gen)
        width = max(len(o) for o in outs)
        outs = [o + [pad] * (width - len(o)) for o in outs]
        return _as_tensor(outs, kind)

    def chat(self, tokenizer: Tokenizer, query: str, history: Optional[List[Dict[str, str]]] = None,
             max_new_tokens: int = 256, **gen_kwargs: Any) -> str:
        """Reply to one user message (after the history messages, if any)
        through the chat template; returns the reply text."""
        messages = list(history or []) + [{"role": "user", "content": query}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text)["input_ids"]
        out = self.generate([ids], max_new_tokens=max_new_tokens, **gen_kwargs)[0]
        reply = tokenizer.decode(out[len(ids):], skip_special_tokens=True)
        for stops in _TEMPLATE_STOPS.values():
            for s in stops:
                if s in text and s in reply:
                    reply = reply[:reply.index(s)]
        return reply.strip()


class AutoModelForCausalLM:
    """transformers.AutoModelForCausalLM for GGUF files."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: PathLike, torch_dtype: Any = None, device_map: Any = None,
                        n_ctx: int = 0, n_threads: Optional[int] = None, n_gpu_layers: Optional[int] = None,
                        **kwargs: Any) -> CausalLM:
        """Load a GGUF file (or the first .gguf in a directory).

        torch_dtype is accepted and ignored: the weights keep the GGUF
        file's types. device_map="cuda"/"auto" (or a device like "cuda:0")
        puts every layer on the GPU in GPU builds (n_gpu_layers overrides);
        CPU builds warn and run on the CPU. n_ctx defaults to the model's
        training context; n_threads to every core. Other transformers
        arguments (dtype, trust_remote_code, ...) are accepted and ignored."""
        path = _gguf_path(pretrained_model_name_or_path)
        if n_gpu_layers is None:
            wants_gpu = isinstance(device_map, str) and (device_map == "auto" or device_map.startswith("cuda"))
            n_gpu_layers = 1 << 16 if wants_gpu else 0
        return CausalLM(Llama(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers))
