"""`data.tokenizer`: a Hugging Face tokenizer directory instead of a trained sentencepiece model
(continued pretraining with a checkpoint's own tokenizer), with the lossless check."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data_prep.prepare import prepare
from deepseek_moe.config.data import DataConfig
from deepseek_moe.data.meta import load_meta
from deepseek_moe.data.tokenizer import load_tokenizer
from tests.data_prep.test_prepare import split_ids
from tests.data_prep.conftest import corpus_config

EOS = "<|end|>"


def _byte_level_bpe(texts, out_dir):
    """A byte-level BPE (lossless on any text) trained with `tokenizers`, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    out_dir.mkdir()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}}))
    return tok


def test_prepares_with_a_hugging_face_tokenizer(corpus, tmp_path):
    root, expected = corpus
    reference = _byte_level_bpe(list(expected.values()), tmp_path / "hf")
    out = prepare(corpus_config(root, tmp_path / "out", tokenizer=str(tmp_path / "hf"), num_proc=1))
    meta = load_meta(out)
    assert meta.tokenizer_file == "tokenizer.json" and meta.tokenizer_path.is_file()
    assert meta.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert meta.eos_id == reference.token_to_id(EOS) and meta.bos_id == -1
    docs = []
    for split in ("train", "val"):
        ids = split_ids(meta, split)
        cuts = np.flatnonzero(ids == meta.eos_id)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        for s, e in zip(starts, cuts):
            text = reference.decode(ids[s:e].tolist())
            assert ids[s:e].tolist() == reference.encode(text).ids  # the tokenizer's own ids
            docs.append(text)
    assert Counter(docs) == Counter(expected.values())  # lossless, every document once
    tok = load_tokenizer(meta.tokenizer_path, {"eos": meta.eos_id})
    assert tok.decode(tok.encode("x = 1\n")) == "x = 1\n"


def test_a_lossy_tokenizer_is_refused(corpus, tmp_path):
    """Our own sentencepiece model in Hugging Face form reads U+2581 as a space (the one
    escaped character, see deepseek_moe/export/tokenizer.py): not lossless on this corpus."""
    from deepseek_moe.export.tokenizer import write_tokenizer

    root, _ = corpus
    spm_meta = load_meta(prepare(corpus_config(root, tmp_path / "spm", num_proc=1)))
    write_tokenizer(spm_meta, tmp_path / "hf")
    with pytest.raises(ValueError, match="not lossless on document .*'\u2581"):
        prepare(corpus_config(root, tmp_path / "out", tokenizer=str(tmp_path / "hf"), num_proc=1))
    assert not (tmp_path / "out").exists()


def test_config_rejects_two_tokenizers():
    with pytest.raises(ValueError, match="keep one"):
        DataConfig(tokenizer="a", tokenizer_model="b.model")
