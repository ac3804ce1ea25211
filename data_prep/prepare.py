"""Prepare a corpus: documents -> tokenizer -> token shards + manifest, as independent tasks.

    python -m data_prep.prepare                                   # default: python_stdlib
    python -m data_prep.prepare data=local_text data.path=~/texts data.file_pattern='*.md'
    python -m data_prep.prepare data=local_jsonl data.path='corpus/*.jsonl' data.vocab_size=32000
    python -m data_prep.prepare data=hf_hub data.path=roneneldan/TinyStories data.streaming=true
    python -m data_prep.prepare data.force=true                   # rebuild

    # the same in stages, e.g. as SLURM jobs (launch/prepare.sbatch, data_prep/README.md):
    python -m data_prep.prepare --plan     data=local_jsonl data.path=... data.num_tasks=64
    python -m data_prep.prepare --task 17  data=local_jsonl data.path=... data.num_tasks=64
    python -m data_prep.prepare --finalize data=local_jsonl data.path=... data.num_tasks=64

The config is composed from `conf/prepare.yaml`, which holds only the `conf/data/` group that
`train.py` uses too, so `train.py data=<preset>` reads what this wrote (`data.out_dir`, default
`data/<name>` under the launch directory). From Python: `prepare(data_cfg) -> Path` and, for
the trainer, `ensure_prepared(data_cfg) -> DataMeta` (no-op when the output is complete).

Stages, all in the work directory `.<out_dir name>.work` next to `out_dir`:
1) plan (one process): list and fingerprint the inputs (`sources.make_plan`), decide the
   train/val split rule, train a sentencepiece BPE model on a sample of train documents
   (`train_tokenizer.py`), copy `data.tokenizer_model`, or take a Hugging Face tokenizer
   (`data.tokenizer`, checked lossless on the first documents; stored as `tokenizer.json`);
   write `plan.json`. A plan with the same config is reused.
2) tasks (`tasks.py`): task k of `data.num_tasks` encodes its contiguous range of documents
   into shards of about `data.shard_tokens` tokens, EOS after every document, and writes its
   completion marker; a rerun runs only the tasks without one.
3) finalize: gather the markers into `meta.json` (the manifest, see
   `deepseek_moe/data/meta.py`) and rename the work directory to `out_dir`: no token is
   copied or re-read, and `out_dir` never looks complete before it is.
Tasks take contiguous documents in source order and a document's split never depends on the
number of tasks, so the concatenated shards are the same for any `data.num_tasks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data_prep.sources import Plan, head_texts, make_plan, train_texts
from data_prep.tasks import CACHE_DIR, PLAN_FILE, TASKS_DIR, marker_path, read_stamp, run_task, run_tasks
from data_prep.train_tokenizer import sample_lines, train_sentencepiece
from deepseek_moe.atomic import atomic_write_bytes, replace_dir
from deepseek_moe.config.data import TRAINING_ONLY_FIELDS, DataConfig
from deepseek_moe.data.meta import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataMeta,
    ShardMeta,
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
    load_tokenizer,
)
from deepseek_moe.errors import ConfigError, DataError, config_error_from_hydra, report_user_errors

# Names a preparation writes into out_dir (`*.bin`: the single-file format of version 1).
OUR_FILES = {META_FILE, TOKENIZER_FILE, HF_TOKENIZER_FILE, PLAN_FILE, TASKS_DIR, CACHE_DIR, *SPLITS} | {
    f"{s}.bin" for s in SPLITS
}
# An HF tokenizer must give back every one of this many training documents byte for byte.
ROUND_TRIP_DOCUMENTS = 256
# Fields that do not change the output files (so a no-op re-run may differ in them).
# num_tasks and shard_tokens change how the token stream is cut into files, never its tokens.
_NOT_CONTENT = {"name", "out_dir", "force", "num_proc", "num_tasks", "shard_tokens", *TRAINING_ONLY_FIELDS}


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


def _hf_tokenizer(cfg: DataConfig, plan: Plan, cache: Path) -> HFTokenizer:
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
    check_round_trip(tok, head_texts(plan, cfg, ROUND_TRIP_DOCUMENTS, cache))
    return tok


def _tokenizer(cfg: DataConfig, plan: Plan, cache: Path) -> Tokenizer:
    if cfg.tokenizer is not None:
        return _hf_tokenizer(cfg, plan, cache)
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
    lines = sample_lines(train_texts(plan, cfg, cache), cfg.tokenizer_sentences)
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


def work_dir(out: Path) -> Path:
    """Where the stages of a preparation of `out` write until finalize renames it to `out`."""
    return out.parent / f".{out.name}.work"


def _num_tasks(cfg: DataConfig) -> int:
    return cfg.num_tasks if cfg.num_tasks is not None else cfg.num_proc


def _stamp_key(cfg: DataConfig) -> dict:
    """What a plan must match to be reused (and a task or finalize to run on it)."""
    return {
        "prepare_config": _prepare_config(cfg),
        "num_tasks": _num_tasks(cfg),
        "shard_tokens": cfg.shard_tokens,
    }


def _check_stamp(work: Path, cfg: DataConfig) -> dict:
    """The plan of `work` for a task or finalize stage; it must exist and match `cfg`."""
    if not (work / PLAN_FILE).is_file():
        raise DataError(
            f"{work / PLAN_FILE} is missing: run `python -m data_prep.prepare --plan ...` with the "
            "same data.* overrides first"
        )
    stamp = read_stamp(work)
    want = _stamp_key(cfg)
    diff = [k for k in ("num_tasks", "shard_tokens") if stamp[k] != want[k]]
    diff += [k for k, v in want["prepare_config"].items() if stamp["prepare_config"].get(k) != v]
    if diff:
        raise DataError(
            f"{work} was planned with other data.* values ({', '.join(f'data.{k}' for k in diff)}); "
            "pass the plan's overrides, or re-plan with `--plan`"
        )
    return stamp


def plan_stage(cfg: DataConfig) -> Path:
    """Stage 1: plan and tokenizer into the work directory (reused if it matches `cfg`)."""
    out = resolve_out_dir(cfg)
    work = work_dir(out)
    if (work / PLAN_FILE).is_file() and not cfg.force:
        stamp = read_stamp(work)
        if {k: stamp[k] for k in _stamp_key(cfg)} == _stamp_key(cfg):
            return work
    if cfg.source == "hf_hub" and cfg.streaming and _num_tasks(cfg) != 1:
        raise ConfigError(
            f"data.streaming=true reads a hub dataset as one stream: set data.num_tasks=1 "
            f"(got {_num_tasks(cfg)}), or data.streaming=false to split it into tasks"
        )
    shutil.rmtree(work, ignore_errors=True)  # another config's plan: its tasks are void
    work.mkdir(parents=True)
    cache = work / CACHE_DIR / "plan"
    try:
        plan = make_plan(cfg, cache)
        tok = _tokenizer(cfg, plan, cache)
        tokenizer_file = HF_TOKENIZER_FILE if isinstance(tok, HFTokenizer) else TOKENIZER_FILE
        atomic_write_bytes(work / tokenizer_file, tok.model_bytes)
        stamp = {
            **_stamp_key(cfg),
            "plan": dataclasses.asdict(plan),
            "tokenizer_file": tokenizer_file,
            "special_ids": {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id},
            "dtype": dtype_for_vocab(tok.vocab_size),
        }
        shutil.rmtree(cache, ignore_errors=True)
        atomic_write_bytes(work / PLAN_FILE, (json.dumps(stamp, indent=1) + "\n").encode())
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming before the plan exists
        raise
    return work


def finalize_stage(cfg: DataConfig) -> Path:
    """Stage 3: the markers -> meta.json, then the work directory becomes `out_dir`."""
    out = resolve_out_dir(cfg)
    work = work_dir(out)
    stamp = _check_stamp(work, cfg)
    num_tasks = stamp["num_tasks"]
    missing = [k for k in range(num_tasks) if not marker_path(work, k).is_file()]
    if missing:
        ids = ",".join(map(str, missing[:20])) + ("..." if len(missing) > 20 else "")
        raise DataError(
            f"{len(missing)} of {num_tasks} tasks of {work} are unfinished ({ids}); run them "
            f"first (`--task N`, or sbatch --array={ids} launch/prepare.sbatch ...)"
        )
    markers = [json.loads(marker_path(work, k).read_text()) for k in range(num_tasks)]
    plan = Plan(**stamp["plan"])
    skipped = dict(plan.skipped)
    for m in markers:
        for reason, count in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    splits = {}
    for split in SPLITS:
        shards = [ShardMeta(**h) for m in markers for h in m["shards"][split]]
        splits[split] = SplitMeta(
            num_tokens=sum(h.num_tokens for h in shards),
            num_documents=sum(h.num_documents for h in shards),
            shards=shards,
        )
        if splits[split].num_documents == 0:
            shutil.rmtree(work, ignore_errors=True)  # a config problem: a rerun would do the same
            raise DataError(
                f"the {split} split is empty (val_fraction={cfg.val_fraction}); add documents "
                "or change data.val_fraction"
            )
    tok = load_tokenizer(work / stamp["tokenizer_file"], stamp["special_ids"])
    meta = DataMeta(
        format_version=FORMAT_VERSION,
        name=cfg.name,
        source=cfg.source,
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        unk_id=tok.unk_id,
        dtype=stamp["dtype"],
        splits=splits,
        tokenizer_file=stamp["tokenizer_file"],
        tokenizer_sha256=tok.sha256,
        source_fingerprint=plan.fingerprint,
        skipped_documents=skipped,
        text_escape=TEXT_ESCAPE,
        prepare_config=_prepare_config(cfg),
        num_tasks=num_tasks,
        shard_tokens=stamp["shard_tokens"],
    )
    meta.fingerprint = meta.compute_fingerprint()
    shutil.rmtree(work / CACHE_DIR, ignore_errors=True)
    atomic_write_bytes(work / META_FILE, meta.to_json().encode())  # last: marks completion
    _swap_in(work, out)
    # The plan and the markers are spent once out_dir is complete.
    (out / PLAN_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / TASKS_DIR, ignore_errors=True)
    return out


def prepare(cfg: DataConfig) -> Path:
    """Prepare `cfg` into its out_dir and return that directory (a no-op if already complete).

    Runs the three stages here, the unfinished tasks `data.num_proc` at a time; an
    interrupted run resumes from its work directory (finished tasks are kept)."""
    out = resolve_out_dir(cfg)
    if not cfg.force and _complete_meta(out, cfg) is not None:
        print(f"[prepare] {out} is complete; nothing to do (data.force=true rebuilds)", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    work = plan_stage(cfg)
    t1 = time.perf_counter()
    run_tasks(work, cfg, cfg.num_proc)
    t2 = time.perf_counter()
    meta = load_meta(finalize_stage(cfg))
    tr, va = meta.splits["train"], meta.splits["val"]
    print(
        f"[prepare] {out}: train {tr.num_tokens:,} tokens / {tr.num_documents} docs in "
        f"{len(tr.shards)} shards, val {va.num_tokens:,} tokens / {va.num_documents} docs, vocab "
        f"{meta.vocab_size}, skipped {meta.skipped_documents}; plan+tokenizer {t1 - t0:.1f}s, "
        f"{meta.num_tasks} tasks {t2 - t1:.1f}s, total {time.perf_counter() - t0:.1f}s",
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
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = argparse.ArgumentParser(add_help=False)
    group = stage.add_mutually_exclusive_group()
    group.add_argument("--plan", action="store_true")
    group.add_argument("--task", type=int)
    group.add_argument("--finalize", action="store_true")
    opts, overrides = stage.parse_known_args(argv)
    if opts.plan:
        action = plan_stage
    elif opts.task is not None:
        action = lambda cfg: _task_stage(cfg, opts.task)  # noqa: E731
    elif opts.finalize:
        action = finalize_stage
    else:
        action = prepare
    run_data_cli("data_prep.prepare", __doc__, overrides, action)


def _task_stage(cfg: DataConfig, task: int) -> None:
    """Stage 2 for one task (a SLURM array element); a no-op if its marker exists."""
    out = resolve_out_dir(cfg)
    if not work_dir(out).exists() and (out / META_FILE).is_file():
        print(f"[prepare] {out} is complete; task {task} has nothing to do", flush=True)
        return
    _check_stamp(work_dir(out), cfg)
    run_task(work_dir(out), cfg, task)


if __name__ == "__main__":
    main()
