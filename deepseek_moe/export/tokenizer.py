"""The run's tokenizer as Hugging Face files (`tokenizer.json`, `tokenizer_config.json`).

A sentencepiece model of ours (BPE, byte fallback, identity normalisation, no dummy prefix) is
rebuilt as a `tokenizers` BPE with the same pieces: the merges ranked by the merged piece's id
(sentencepiece orders BPE pieces by score, and merges the highest-scoring pair first), a
normalizer that writes spaces as U+2581 "▁" and byte fallback to `<0xNN>` pieces; the decoder
undoes both. No BOS/EOS is added by `encode` (as in our data, where only EOS follows a document).

The one character that encodes differently: U+2581 "▁" itself. Our tokenizer escapes it (and
its escape character U+E000, see deepseek_moe/data/tokenizer.py) so that it round-trips; the
Hugging Face tokenizer encodes it like a space. Text without these two characters gets the
same ids. (Like any Hugging Face tokenizer, the special-token strings "<s>", "</s>", "<unk>",
"<pad>" typed in text map to their special ids.)

A Hugging Face tokenizer used for the data (`data.tokenizer`) is written back as it came.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepseek_moe.data.meta import DataMeta
from deepseek_moe.errors import ExportError

_SPM_SPACE = "\u2581"


def sentencepiece_to_tokenizers(model_bytes: bytes):
    """A `tokenizers.Tokenizer` with the same ids as our sentencepiece model on ordinary text."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=generate_merges(vocab),
            unk_token=sp.id_to_piece(sp.unk_id()),
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def special_ids(meta: DataMeta) -> dict[str, int]:
    """{"bos", "eos", "pad", "unk"} -> id, for those the tokenizer defines (id >= 0)."""
    ids = {"bos": meta.bos_id, "eos": meta.eos_id, "pad": meta.pad_id, "unk": meta.unk_id}
    return {k: v for k, v in ids.items() if v is not None and v >= 0}


def write_tokenizer(meta: DataMeta, out: Path) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` (+ special tokens) into `out`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = meta.tokenizer_path
    if path.suffix == ".model":
        tok = sentencepiece_to_tokenizers(path.read_bytes())
    elif path.suffix == ".json":
        tok = Tokenizer.from_file(str(path))
    else:
        raise ExportError(f"{path}: unknown tokenizer file type (expected .model or .json)")
    names = {f"{k}_token": tok.id_to_token(v) for k, v in special_ids(meta).items()}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=int(1e30), **names
    )
    hf.save_pretrained(str(out))
    # transformers 5 writes its own class name; the generic fast class loads in every version
    # (and in inference servers that bring their own transformers).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
