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
from typing import Union

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
