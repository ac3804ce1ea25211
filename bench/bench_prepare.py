"""Benchmark: end-to-end preparation (read, tokenize, write) against the tokenizer's own ceiling.

    python bench/bench_prepare.py                          # 2 processes, corpora of 16 and 64 MB
    python bench/bench_prepare.py --procs 2 --sizes-mb 16 64 --repeats 3

For each corpus size (jsonl files of `--file-mb` of Python stdlib source; a sentencepiece
BPE tokenizer of 8192 pieces trained once, outside the timings):
1. ours: `prepare()` of the `local_jsonl` preset with `data.tokenizer_model` given, `procs`
   processes, `2 x procs` tasks: plan (listing), tasks (stream the rows, encode in batches,
   write uint16 shards + .idx), finalize (manifest). Wall time from the call to its return.
2. ceiling: the same texts, already in memory, encoded by the same sentencepiece model's batch
   call (`SentencePieceProcessor.encode(list)`, batches of 256 documents, as ours) in `procs`
   forked processes, each a contiguous half of the documents; nothing read or written.
   Ratio = ceiling time / our time (target >= 0.7). Runs alternate ours / ceiling, best of
   `--repeats` each.
3. resources, in separate processes as on a cluster (`--plan`, `--task k` one at a time,
   `--finalize`): peak RSS of each task process (its VmHWM at exit) and peak scratch = the
   largest size of the work + output directories sampled every 20 ms, against the final
   output size (target <= 1.3x; memory per task must not grow with the corpus). Printed next
   to it: the peak RSS of a process that only imports the preparation code, and the same
   measurement for the largest corpus as one file in one task.
4. launch: `load_meta` + `PackedTokens` (every rank, every launch) over a simulated manifest of
   `--manifest-shards` shards of 2^28 uint32 tokens (sparse files: sizes without data).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.prepare import prepare  # noqa: E402
from data_prep.sources import stdlib_dir  # noqa: E402
from deepseek_moe.config.data import DataConfig  # noqa: E402
from deepseek_moe.data.meta import load_meta  # noqa: E402
from deepseek_moe.data.tokenizer import Tokenizer, escape_text  # noqa: E402

BATCH = 256


def write_corpus(out: Path, size_mb: int, file_mb: float) -> list[str]:
    """jsonl files of ~file_mb of stdlib documents (seeded order, cycled) totalling ~size_mb of text; returns
    the texts."""
    docs = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(stdlib_dir().rglob("*.py"))[:4000]]
    docs = [d for d in docs if 200 < len(d) < 200_000]
    # A seeded order: every corpus size draws from the same mix of document lengths.
    docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    texts, total, i = [], 0, 0
    while total < size_mb << 20:
        d = docs[i % len(docs)]
        texts.append(d)
        total += len(d.encode())
        i += 1
    out.mkdir(parents=True)
    num_files = max(1, round(size_mb / file_mb))
    per = -(-len(texts) // num_files)
    for f in range(num_files):
        with open(out / f"part{f:03d}.jsonl", "w") as fh:
            for t in texts[f * per : (f + 1) * per]:
                fh.write(json.dumps({"text": t}) + "\n")
    return texts


def _encode_chunk(args) -> int:
    model, texts = args
    sp = Tokenizer(model).sp
    n = 0
    for a in range(0, len(texts), BATCH):
        n += sum(len(ids) for ids in sp.encode(texts[a : a + BATCH]))
    return n


def ceiling(model: bytes, texts: list[str], procs: int) -> tuple[float, int]:
    """Seconds for `procs` processes to batch-encode `texts` (escaped as ours), total tokens."""
    texts = [escape_text(t) for t in texts]  # ours encodes escaped text: the same strings
    chunks = [texts[k * len(texts) // procs : (k + 1) * len(texts) // procs] for k in range(procs)]
    with get_context("fork").Pool(procs) as pool:
        pool.map(_encode_chunk, [(model, ["x"]) for _ in range(procs)])  # start the workers
        t0 = time.perf_counter()
        n = sum(pool.map(_encode_chunk, [(model, c) for c in chunks]))
        return time.perf_counter() - t0, n


def dir_bytes(*dirs: Path) -> int:
    total = 0
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:  # renamed or deleted while walking
                    pass
    return total


class ScratchSampler:
    """Largest total size of `dirs` seen by a thread sampling every 20 ms."""

    def __init__(self, *dirs: Path):
        self.dirs, self.peak, self._stop = dirs, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, dir_bytes(*self.dirs))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, dir_bytes(*self.dirs))


def overrides(corpus: Path, out: Path, model: Path, tasks: int) -> list[str]:
    return [
        "data=local_jsonl",
        f"data.path={corpus}",
        f"data.tokenizer_model={model}",
        f"data.out_dir={out}",
        f"data.num_tasks={tasks}",
        "data.num_proc=1",
        "data.val_fraction=0.05",
    ]


def run_staged(corpus: Path, out: Path, model: Path, tasks: int) -> tuple[list[float], int, int]:
    """--plan, each --task k in its own process, --finalize: (peak RSS MB per task, peak
    scratch bytes, output bytes)."""
    args = overrides(corpus, out, model, tasks)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from data_prep.prepare import main; main(sys.argv[1:])"
    work = out.parent / f".{out.name}.work"
    with ScratchSampler(work, out) as scratch:
        _run_hwm(code, ["--plan", *args], env)
        rss = [_run_hwm(code, ["--task", str(k), *args], env) for k in range(tasks)]
        _run_hwm(code, ["--finalize", *args], env)
    return rss, scratch.peak, dir_bytes(out)


# Peak RSS from the process itself (VmHWM, reset by exec): wait4's ru_maxrss would count the
# parent's pages the child shares between fork and exec.
_HWM = (
    "import atexit, sys; atexit.register(lambda: print('VmHWM', next(l.split()[1] for l in "
    "open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)); "
)


def _run_hwm(code: str, args: list[str], env: dict) -> float:
    """Run `python -c _HWM + code args...`; its peak RSS in MB."""
    res = subprocess.run(
        [sys.executable, "-c", _HWM + code, *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(f"{code} {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return int(res.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024


def import_rss_mb() -> float:
    """Peak RSS of a process that only imports the preparation code (torch, datasets, ...)."""
    return _run_hwm("import data_prep.prepare", [], {**os.environ, "PYTHONPATH": str(ROOT)})


def launch_cost(tmp: Path, num_shards: int, shard_tokens: int) -> None:
    """load_meta + PackedTokens (what every rank does at launch) over a simulated manifest of
    `num_shards` uint32 shards of `shard_tokens` tokens: sparse files of the right size."""
    from deepseek_moe.data.meta import FORMAT_VERSION, DataMeta, ShardMeta, SplitMeta
    from deepseek_moe.data.packed import PackedTokens

    out = tmp / "manifest"
    splits = {}
    for split, n in (("train", num_shards), ("val", 2)):
        (out / split).mkdir(parents=True)
        shards = []
        for j in range(n):
            name = f"{split}/{j // 16:05d}-{j % 16:05d}"
            with open(out / f"{name}.bin", "wb") as f:
                f.truncate(4 * shard_tokens)
            shards.append(
                ShardMeta(
                    file=f"{name}.bin",
                    num_tokens=shard_tokens,
                    num_documents=shard_tokens // 1000,
                    sha256="0" * 64,
                )
            )
        splits[split] = SplitMeta(
            num_tokens=n * shard_tokens, num_documents=n * (shard_tokens // 1000), shards=shards
        )
    (out / "tokenizer.model").write_bytes(b"-")
    meta = DataMeta(
        format_version=FORMAT_VERSION, name="sim", source="json", vocab_size=102400, bos_id=1, eos_id=2,
        pad_id=3, unk_id=0, dtype="uint32", splits=splits, tokenizer_file="tokenizer.model",
        tokenizer_sha256="-", source_fingerprint="-",
    )  # fmt: skip
    meta.fingerprint = meta.compute_fingerprint()
    (out / "meta.json").write_text(meta.to_json())
    t0 = time.perf_counter()
    packed = PackedTokens(load_meta(out), "train")
    dt = time.perf_counter() - t0
    print(
        f"launch: load_meta + PackedTokens over {num_shards} shards = {len(packed) / 1e12:.2f}T tokens: "
        f"{dt:.2f}s (meta.json {(out / 'meta.json').stat().st_size / 2**20:.1f} MB)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--file-mb", type=float, default=1.0, help="size of each jsonl file (a task's unit)")
    p.add_argument(
        "--manifest-shards", type=int, default=7500, help="simulated launch: 7500 x 2^28 = 2T tokens"
    )
    args = p.parse_args()
    procs, tasks = args.procs, 2 * args.procs
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        tok_dir = prepare(
            DataConfig(out_dir=str(tmp / "tok"), max_documents=400, tokenizer_sentences=50_000, num_proc=1)
        )
        model_path = tok_dir / "tokenizer.model"
        model = model_path.read_bytes()
        print(
            f"tokenizer: sentencepiece BPE {load_meta(tok_dir).vocab_size} pieces ({time.perf_counter() - t0:.0f}s)"
        )
        print(f"{procs} processes, {tasks} tasks, jsonl files of {args.file_mb} MB, best of {args.repeats}")
        print(f"peak RSS of a process that only imports data_prep.prepare: {import_rss_mb():.0f} MB")
        launch_cost(tmp, args.manifest_shards, 1 << 28)
        header = (
            f"{'corpus':>8} {'tokens':>12} {'ours s':>8} {'ceiling s':>10} {'ratio':>6} "
            f"{'MB/s ours':>10} {'output MB':>10} {'peak scratch':>13} {'task RSS MB (max)':>18}"
        )
        print(header)
        for size in args.sizes_mb:
            corpus = tmp / f"corpus{size}"
            texts = write_corpus(corpus, size, args.file_mb)
            ours, ceil, n_ceil = [], [], 0
            for r in range(args.repeats):
                out = tmp / f"out{size}_{r}"
                t = time.perf_counter()
                prepare(
                    DataConfig(
                        name="bench",
                        source="json",
                        path=str(corpus),
                        tokenizer_model=str(model_path),
                        out_dir=str(out),
                        num_tasks=tasks,
                        num_proc=procs,
                    )
                )
                ours.append(time.perf_counter() - t)
                meta = load_meta(out)
                n_ours = meta.splits["train"].num_tokens + meta.splits["val"].num_tokens
                c, n_ceil = ceiling(model, texts, procs)
                ceil.append(c)
            # ours adds one EOS per document; the ceiling encodes the same documents
            assert n_ours == n_ceil + len(texts), (n_ours, n_ceil, len(texts))
            rss, peak, output = run_staged(corpus, tmp / f"staged{size}", model_path, tasks)
            mb = sum(len(t.encode()) for t in texts) / 2**20
            print(
                f"{size:>6}MB {n_ours:>12,} {min(ours):>8.2f} {min(ceil):>10.2f} "
                f"{min(ceil) / min(ours):>6.2f} {mb / min(ours):>10.2f} {output / 2**20:>10.1f} "
                f"{peak / output:>12.2f}x {max(rss):>18.0f}"
            )
            print(
                f"         per-task peak RSS MB: {[round(x) for x in rss]}; all times s: ours {ours}, ceiling {ceil}"
            )
        # The largest corpus as one file in one task: the reader holds one batch, not the file.
        one = tmp / "one_file"
        write_corpus(one, max(args.sizes_mb), max(args.sizes_mb))
        rss, peak, output = run_staged(one, tmp / "staged_one", model_path, 1)
        print(
            f"one {max(args.sizes_mb)} MB file, 1 task: peak RSS {rss[0]:.0f} MB, peak scratch "
            f"{peak / output:.2f}x the output ({output / 2**20:.1f} MB)"
        )


if __name__ == "__main__":
    main()
