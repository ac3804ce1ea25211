"""Train a lossless sentencepiece BPE model on the training documents.

Sentencepiece trains on "sentences"; we give it the non-empty lines of the training documents
(newlines themselves become `<0x0A>` byte pieces, which is lossless and costs one token per
line). We sample whole documents ourselves (seeded order, see `sample_lines`) instead of relying
on sentencepiece's internal shuffle, so the model depends only on (documents, config);
sentencepiece then uses all the lines it is given (`input_sentence_size=0`). Lines longer than
`tokenizer_max_sentence_length` bytes are left out of training only.

Options and why:
- identity normalisation, no dummy prefix, no extra-whitespace removal: text is kept as is.
- byte_fallback: any character outside the vocab becomes UTF-8 byte pieces (no <unk>).
- split_digits: numbers are spelled digit by digit (no arbitrary number merges).
- allow_whitespace_only_pieces: runs of indentation spaces become single pieces.
- ids: unk=0, bos=1, eos=2, pad=3.
"""

from __future__ import annotations

import io
import re
from typing import Iterable

import sentencepiece as spm

from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.tokenizer import escape_text
from deepseek_moe.errors import DataError

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def sample_lines(texts: Iterable[str], limit: int) -> list[str]:
    """The first `limit` non-empty lines of `texts` (escaped as they will be encoded).

    Callers pass the training documents in a seeded random order (map-style sources) or in
    stream order (streaming sources), so this samples whole documents without materialising
    the corpus.
    """
    lines: list[str] = []
    for text in texts:
        if text:
            lines += [line for line in escape_text(text).split("\n") if line]
            if len(lines) >= limit:
                break
    return lines[:limit]


def train_sentencepiece(lines: list[str], cfg: DataConfig) -> bytes:
    """Train a BPE model on `lines`; returns the serialized model. Errors name the fix."""
    if not lines:
        raise DataError(
            "the training documents hold no text to train a tokenizer on; check "
            "data.path, or pass an existing data.tokenizer_model"
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=cfg.tokenizer_max_sentence_length,
            num_threads=cfg.tokenizer_threads,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as e:
        msg = str(e)
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        large = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
        if small:
            raise DataError(
                f"data.vocab_size={cfg.vocab_size} is too small for this corpus: "
                f"its characters and special pieces need {small.group(2)}; set "
                f"data.vocab_size >= {small.group(2)}"
            ) from e
        if large:
            raise DataError(
                f"data.vocab_size={cfg.vocab_size} is too large for this corpus "
                f"({len(lines)} training lines support at most {large.group(2)} "
                f"pieces); set data.vocab_size <= {large.group(2)} or add data"
            ) from e
        raise
    return model.getvalue()
