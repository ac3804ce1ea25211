"""Prepare a corpus: documents -> sentencepiece tokenizer -> packed train.bin / val.bin.

    python -m data_prep.prepare                                   # default: python_stdlib
    python -m data_prep.prepare data=local_text data.path=~/texts data.file_pattern='*.md'
    python -m data_prep.prepare data=local_jsonl data.path='corpus/*.jsonl' data.vocab_size=32000
    python -m data_prep.prepare data=hf_hub data.path=roneneldan/TinyStories data.streaming=true
    python -m data_prep.prepare data.force=true                   # rebuild

The config is composed from `conf/prepare.yaml`, which holds only the `conf/data/` group that
`train.py` uses too, so `train.py data=<preset>` reads what this wrote (`data.out_dir`, default
`data/<name>` under the launch directory). From Python: `prepare(data_cfg) -> Path` and, for
the trainer, `ensure_prepared(data_cfg) -> DataMeta` (no-op when the output is complete).

Steps: 1) read documents (`sources.py`), 2) split them by document into train/val with
`split_seed`, 3) train a sentencepiece BPE model on train documents (`train_tokenizer.py`), copy
`data.tokenizer_model`, or take a Hugging Face tokenizer (`data.tokenizer`, checked lossless on
the first documents; stored as `tokenizer.json`), 4) tokenise with `datasets.map(batched=True, num_proc=...)`,
appending EOS to every document, 5) write `train.bin`, `val.bin`, `tokenizer.model` and
`meta.json` (see `deepseek_moe/data/meta.py`) into `.<out_dir>.tmp-<pid>` and rename it to
`out_dir` only when all is written: an interrupted run never leaves a complete-looking
directory. datasets' cache lives inside that temp dir and is deleted with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from data_prep.sources import Source, load_documents
from data_prep.train_tokenizer import sample_lines, train_sentencepiece
from deepseek_moe.atomic import replace_dir
from deepseek_moe.config.data import TRAINING_ONLY_FIELDS, DataConfig
from deepseek_moe.data.meta import (
    DTYPES,
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataMeta,
    SplitMeta,
    dtype_for_vocab,
    load_meta,
    resolve_out_dir,
    resolve_path,
)
from deepseek_moe.data.packed import PackedTokens
from deepseek_moe.data.tokenizer import (
    HF_TOKENIZER_FILE,
    TEXT_ESCAPE,
    HFTokenizer,
    Tokenizer,
    check_round_trip,
)
from deepseek_moe.errors import ConfigError, DataError, config_error_from_hydra, report_user_errors

OUR_FILES = {META_FILE, TOKENIZER_FILE, HF_TOKENIZER_FILE} | {f"{s}.bin" for s in SPLITS}
# An HF tokenizer must give back every one of this many training documents byte for byte.
ROUND_TRIP_DOCUMENTS = 256
# Fields that do not change the output files (so a no-op re-run may differ in them).
_NOT_CONTENT = {"name", "out_dir", "force", "num_proc", *TRAINING_ONLY_FIELDS}


def _prepare_config(cfg: DataConfig) -> dict:
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in _NOT_CONTENT}
    d["exclude_dirs"] = cfg.excluded_dirs()
    if cfg.path is not None and cfg.source != "hf_hub":
        d["path"] = str(resolve_path(cfg.path))
    for key in ("tokenizer_model", "tokenizer"):
        if getattr(cfg, key) is not None:
            d[key] = str(resolve_path(getattr(cfg, key)))
    return d


def _complete_meta(out: Path, cfg: DataConfig) -> Optional[DataMeta]:
    """The meta of a complete preparation at `out` matching `cfg`, or None if there is none."""
    if not (out / META_FILE).is_file():
        return None
    meta = load_meta(out)
    for split in SPLITS:
        PackedTokens(meta, split)  # raises on missing / truncated files
    want = _prepare_config(cfg)
    diff = {k: (meta.prepare_config.get(k), v) for k, v in want.items() if meta.prepare_config.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise DataError(
            f"{out} was prepared with a different data config ({changes}); "
            "set data.force=true to rebuild it, or choose another data.out_dir"
        )
    return meta


def _split_is_val(n: int, cfg: DataConfig) -> np.ndarray:
    """Boolean [n]: which documents go to val (exactly max(1, round(n * val_fraction)))."""
    if n < 2:
        raise DataError(
            f"the source has {n} usable document(s); a train/val split needs at "
            "least 2. Add documents (check data.path / data.max_documents)"
        )
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(cfg.split_seed).permutation(n)[:n_val]] = True
    return is_val


def _hash_is_val(index: int, cfg: DataConfig) -> bool:
    """Streaming split: a seeded hash of the document index (no length known in advance)."""
    digest = hashlib.sha256(f"{cfg.split_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < cfg.val_fraction * 2.0**64


class _EncodeWithEOS:
    """datasets.map function: text -> ids + [EOS]; empty text -> [] (dropped when written)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        texts = [t or "" for t in batch["text"]]
        eos = self.tokenizer.eos_id
        return {"ids": [ids + [eos] if ids else [] for ids in self.tokenizer.encode_batch(texts)]}


class _SplitWriter:
    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = path, np.dtype(DTYPES[dtype])
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.num_tokens = self.num_documents = 0

    def write(self, ids: np.ndarray, num_documents: int) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.num_tokens += len(ids)
        self.num_documents += num_documents

    def close(self) -> SplitMeta:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return SplitMeta(
            file=self.path.name,
            num_tokens=self.num_tokens,
            num_documents=self.num_documents,
            sha256=self.sha.hexdigest(),
        )


def _write_splits(
    tokenized, is_val, cfg: DataConfig, tmp: Path, dtype: str, total: Optional[int]
) -> tuple[dict[str, SplitMeta], int]:
    """Stream tokenized documents into train.bin / val.bin in source order.

    `is_val`: a boolean array over document indices, or None to use the streaming hash.
    Returns the split metas and the number of empty documents dropped.
    """
    writers = {s: _SplitWriter(tmp / f"{s}.bin", dtype) for s in SPLITS}
    empty = index = 0
    arrow = isinstance(tokenized, datasets.Dataset)
    batches = (
        tokenized.with_format("arrow").iter(batch_size=2048) if arrow else tokenized.iter(batch_size=256)
    )
    with tqdm(total=total, desc="write shards", unit="doc", mininterval=2) as bar:
        for batch in batches:
            col = batch.column("ids") if arrow else pa.array(batch["ids"], pa.list_(pa.int64()))
            n = len(col)
            val = (
                is_val[index : index + n]
                if is_val is not None
                else np.array([_hash_is_val(i, cfg) for i in range(index, index + n)])
            )
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            empty += int((lengths == 0).sum())
            for split, mask in (("train", ~val), ("val", val)):
                rows = col.filter(pa.array(mask))
                ids = pc.list_flatten(rows).to_numpy(zero_copy_only=False)
                writers[split].write(ids, int(((lengths > 0) & mask).sum()))
            index += n
            bar.update(n)
    metas = {s: w.close() for s, w in writers.items()}
    for split, m in metas.items():
        if m.num_documents == 0:
            raise DataError(
                f"the {split} split is empty ({index} documents, val_fraction="
                f"{cfg.val_fraction}); add documents or change data.val_fraction"
            )
    return metas, empty


def _hf_tokenizer(cfg: DataConfig, source: Source) -> HFTokenizer:
    """`data.tokenizer`: a Hugging Face tokenizer directory, checked lossless on the corpus."""
    path = resolve_path(cfg.tokenizer)
    if not (path / HF_TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"data.tokenizer={path} has no {HF_TOKENIZER_FILE}; give a "
            "Hugging Face tokenizer directory, or null to train one"
        )
    try:
        tok = HFTokenizer.from_dir(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file, said in one line
        raise ValueError(f"data.tokenizer={path}: {HF_TOKENIZER_FILE} does not load ({e})") from e
    if tok.eos_id < 0:
        raise ValueError(
            f"data.tokenizer={path} names no eos_token in tokenizer_config.json; "
            "packing needs EOS between documents: add one"
        )
    texts = (
        (row["text"] for row in source.dataset.take(ROUND_TRIP_DOCUMENTS))
        if cfg.streaming
        else source.dataset.select(range(min(ROUND_TRIP_DOCUMENTS, len(source.dataset))))["text"]
    )
    check_round_trip(tok, (t for t in texts if t))
    return tok


def _tokenizer(cfg: DataConfig, source: Source, is_val) -> Tokenizer:
    if cfg.tokenizer is not None:
        return _hf_tokenizer(cfg, source)
    if cfg.tokenizer_model is not None:
        path = resolve_path(cfg.tokenizer_model)
        if not path.is_file():
            raise DataError(
                f"data.tokenizer_model={path} does not exist; give the path "
                "of a sentencepiece .model file, or null to train one"
            )
        try:
            tok = Tokenizer(path)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"data.tokenizer_model={path} is not a sentencepiece model ({e}); "
                "give a .model file, or null to train one"
            ) from e
        if tok.eos_id < 0:
            raise DataError(
                f"data.tokenizer_model={path} defines no EOS piece, which packing "
                "needs between documents; train one with an eos_id"
            )
        return tok
    ds = source.dataset
    if is_val is None:  # streaming: the train documents at the head of the stream
        texts = (row["text"] for i, row in enumerate(ds) if not _hash_is_val(i, cfg))
    else:  # a seeded random order of the train documents, so the sample spans the corpus
        train_idx = np.flatnonzero(~is_val)
        order = np.random.default_rng(cfg.split_seed + 1).permutation(train_idx)
        texts = (t for b in ds.select(order).iter(batch_size=256) for t in b["text"])
    lines = sample_lines(texts, cfg.tokenizer_sentences)
    print(f"[prepare] training sentencepiece BPE (vocab {cfg.vocab_size}) on {len(lines)} lines", flush=True)
    return Tokenizer(train_sentencepiece(lines, cfg))


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp`, refusing to delete a directory that holds files we did not write."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUR_FILES)
        if foreign:
            raise DataError(
                f"refusing to replace {out}: it holds files a preparation does not "
                f"write ({foreign[:5]}); choose another data.out_dir or remove it"
            )
    replace_dir(tmp, out)


def prepare(cfg: DataConfig) -> Path:
    """Prepare `cfg` into its out_dir and return that directory (a no-op if already complete)."""
    out = resolve_out_dir(cfg)
    if not cfg.force and _complete_meta(out, cfg) is not None:
        print(f"[prepare] {out} is complete; nothing to do (data.force=true rebuilds)", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        source = load_documents(cfg, tmp / "cache")
        n = None if cfg.streaming else len(source.dataset)
        is_val = None if cfg.streaming else _split_is_val(n, cfg)
        t1 = time.perf_counter()
        tok = _tokenizer(cfg, source, is_val)
        tokenizer_file = HF_TOKENIZER_FILE if isinstance(tok, HFTokenizer) else TOKENIZER_FILE
        (tmp / tokenizer_file).write_bytes(tok.model_bytes)
        t2 = time.perf_counter()
        dtype = dtype_for_vocab(tok.vocab_size)
        encode = _EncodeWithEOS(tok)
        columns = source.dataset.column_names or ["text"]
        if cfg.streaming:  # lazy: runs while _write_splits iterates, in this process
            tokenized = source.dataset.map(encode, batched=True, remove_columns=columns)
        else:
            tokenized = source.dataset.map(
                encode,
                batched=True,
                batch_size=64,
                remove_columns=columns,
                desc="tokenize",
                num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                cache_file_name=str(tmp / "cache" / "tokenized.arrow"),
                new_fingerprint=tok.sha256[:32],
            )  # datasets caps fingerprints at 64 chars
        splits, empty = _write_splits(tokenized, is_val, cfg, tmp, dtype, n)
        t3 = time.perf_counter()
        skipped = dict(source.skipped)
        skipped["empty"] = skipped.get("empty", 0) + empty
        meta = DataMeta(
            format_version=FORMAT_VERSION,
            name=cfg.name,
            source=cfg.source,
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            unk_id=tok.unk_id,
            dtype=dtype,
            splits=splits,
            tokenizer_file=tokenizer_file,
            tokenizer_sha256=tok.sha256,
            source_fingerprint=source.fingerprint,
            skipped_documents=skipped,
            text_escape=TEXT_ESCAPE,
            prepare_config=_prepare_config(cfg),
        )
        meta.fingerprint = meta.compute_fingerprint()
        del source, tokenized  # release datasets' memory-mapped cache files before deleting them
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        (tmp / META_FILE).write_text(meta.to_json())  # last: its presence marks completion
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tr, va = splits["train"], splits["val"]
    print(
        f"[prepare] {out}: train {tr.num_tokens:,} tokens / {tr.num_documents} docs, val "
        f"{va.num_tokens:,} tokens / {va.num_documents} docs, vocab {tok.vocab_size}, skipped "
        f"{skipped}; read {t1 - t0:.1f}s, tokenizer {t2 - t1:.1f}s, tokenize+write "
        f"{t3 - t2:.1f}s, total {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return out


def ensure_prepared(cfg: DataConfig) -> DataMeta:
    """For the trainer: prepare if needed (call on one rank first), then return the meta.

    `data.force` is ignored here: a training launch (or a requeued one) never rebuilds a
    complete directory under ranks that may already read it; rebuild with the prepare CLI.
    """
    if cfg.force:
        print(
            "[prepare] data.force is ignored by training; rebuild with "
            "`python -m data_prep.prepare ... data.force=true`",
            flush=True,
        )
        cfg = dataclasses.replace(cfg, force=False)
    return load_meta(prepare(cfg))


@dataclass(kw_only=True)
class PrepareConfig:
    """Root of conf/prepare.yaml: just the data group."""

    data: DataConfig = field(default_factory=DataConfig)


def compose_data_config(overrides: list[str]) -> DataConfig:
    """Compose `conf/prepare.yaml` (the data group only) with CLI overrides into a DataConfig."""
    from omegaconf import OmegaConf

    from deepseek_moe.config.compose import compose, register

    register("prepare_schema", PrepareConfig)
    return OmegaConf.to_object(compose("prepare", overrides)).data


def run_data_cli(prog: str, doc: str, argv: Optional[list[str]], action) -> None:
    """The shell shared by the data_prep commands: `-h/--help` prints `doc`; the remaining
    arguments are Hydra overrides of the data group, composed into a `DataConfig` for
    `action(cfg)`. A user error (bad value, missing file, bad override) exits with one line,
    no traceback (see `deepseek_moe.errors`)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return
    report_user_errors(_compose_and_run, prog, argv, action)


def _compose_and_run(prog: str, argv: list[str], action) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_data_config(argv)
    except (HydraException, OmegaConfBaseException) as e:  # misspelt key, wrong type, preset
        raise config_error_from_hydra(
            e, f"`python -m {prog} --help` lists the data presets and conf/data/*.yaml their keys"
        ) from None
    except ValueError as e:  # a DataConfig check
        raise ConfigError(str(e)) from None
    action(cfg)


def main(argv: Optional[list[str]] = None) -> None:
    run_data_cli("data_prep.prepare", __doc__, argv, prepare)


if __name__ == "__main__":
    main()
