"""The sentencepiece tokenizer, wrapped so that decode(encode(text)) == text for any text.

Our models are trained with identity normalisation, no dummy prefix, no whitespace folding and
byte fallback, so sentencepiece keeps spaces, tabs, newlines, CR and any Unicode as pieces or
`<0xNN>` bytes. One character it cannot keep: U+2581 "▁", its internal stand-in for a space,
decodes to " ". We therefore escape it (and our escape character) before encoding:

    U+E000 -> U+E000 "0"        U+2581 -> U+E000 "1"

and undo it after decoding. Both characters are rare (zero files in the Python stdlib outside
site-packages), so this never changes the tokens of ordinary text. Use `Tokenizer.decode`
(not the raw `SentencePieceProcessor`) to get documents back byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional, Union

import sentencepiece as spm

ESCAPE = "\ue000"
_SPM_SPACE = "\u2581"
_UNESCAPE_RE = re.compile(ESCAPE + "([01])")
TEXT_ESCAPE = "e000-2581-v1"
"""Recorded in meta.json: the escape scheme the shards were encoded with."""


def escape_text(text: str) -> str:
    if ESCAPE not in text and _SPM_SPACE not in text:
        return text
    return text.replace(ESCAPE, ESCAPE + "0").replace(_SPM_SPACE, ESCAPE + "1")


def unescape_text(text: str) -> str:
    if ESCAPE not in text:
        return text
    return _UNESCAPE_RE.sub(lambda m: ESCAPE if m.group(1) == "0" else _SPM_SPACE, text)


class Tokenizer:
    """A sentencepiece model (file path or serialized bytes) with lossless encode/decode."""

    def __init__(self, model: Union[str, os.PathLike, bytes]):
        self.model_bytes = model if isinstance(model, bytes) else open(model, "rb").read()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self.sp.encode(escape_text(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode([escape_text(t) for t in texts])

    def decode(self, ids) -> str:
        """Inverse of `encode`; special ids (BOS/EOS/PAD) decode to nothing."""
        return unescape_text(self.sp.decode([int(i) for i in ids]))

    def __getstate__(self):  # for datasets.map workers: ship the bytes, not the C++ object
        return {"model_bytes": self.model_bytes}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"])


HF_TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`, the `tokenizers` library) with the
    interface of `Tokenizer`: no special tokens are added by `encode`, special ids decode to
    nothing. Whether it is lossless depends on the tokenizer (byte-level BPEs such as
    DeepSeek's are); data preparation checks it on the corpus (`check_round_trip`).

    `special_ids`: {"bos", "eos", "pad", "unk"} -> id (-1 = none), as `from_dir` reads them
    from `tokenizer_config.json`."""

    def __init__(self, model: Union[str, os.PathLike, bytes], special_ids: dict[str, int]):
        from tokenizers import Tokenizer as _Backend

        self.model_bytes = model if isinstance(model, bytes) else open(model, "rb").read()
        self.tok = _Backend.from_str(self.model_bytes.decode("utf-8"))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {k: int(special_ids.get(k, -1)) for k in _SPECIAL_NAMES}
        self.bos_id, self.eos_id = self.special_ids["bos"], self.special_ids["eos"]
        self.pad_id, self.unk_id = self.special_ids["pad"], self.special_ids["unk"]
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "HFTokenizer":
        """Read `<path>/tokenizer.json`; special tokens from `tokenizer_config.json` (strings or
        {"content": ...} entries), ids looked up in the vocab."""
        import json

        directory = os.fspath(path)
        tok_json = os.path.join(directory, HF_TOKENIZER_FILE)
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        tok = cls(tok_json, {})
        ids = {}
        for name in _SPECIAL_NAMES:
            token = config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            found = tok.tok.token_to_id(token) if isinstance(token, str) else None
            ids[name] = -1 if found is None else found
        return cls(tok.model_bytes, ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __getstate__(self):
        return {"model_bytes": self.model_bytes, "special_ids": self.special_ids}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"], state["special_ids"])


def check_round_trip(tokenizer, texts) -> None:
    """Raise ValueError at the first text that `decode(encode(text))` does not give back."""
    for i, text in enumerate(texts):
        back = tokenizer.decode(tokenizer.encode(text))
        if back != text:
            at = next((j for j, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            raise ValueError(
                f"the tokenizer is not lossless on document {i}: at character {at} "
                f"{text[at : at + 20]!r} came back as {back[at : at + 20]!r}; use a "
                "lossless (byte-level or byte-fallback) tokenizer"
            )


def load_tokenizer(path: Union[str, os.PathLike], special_ids: Optional[dict[str, int]] = None):
    """The tokenizer stored in a prepared data directory: `tokenizer.model` (sentencepiece) or
    `tokenizer.json` (Hugging Face; pass the special ids recorded in meta.json)."""
    if os.fspath(path).endswith(".json"):
        return HFTokenizer(path, special_ids or {})
    return Tokenizer(path)
