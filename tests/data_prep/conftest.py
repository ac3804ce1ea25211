"""A small local corpus: real stdlib files plus hand-written edge cases, with the expected
documents listed independently of the code under test."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from deepseek_moe.config.data import DataConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = [
    "abc.py",
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "dataclasses.py",
    "fnmatch.py",
    "functools.py",
    "heapq.py",
    "json/__init__.py",
    "json/decoder.py",
    "keyword.py",
    "numbers.py",
    "operator.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
    "types.py",
    "weakref.py",
    "email/utils.py",
    "collections/__init__.py",
    "logging/handlers.py",
]

# name -> content; every one of these must come back byte for byte.
EDGE_CASES = {
    "edge/crlf_tabs.py": "def f():\r\n\treturn 1  \r\n\r\n# trailing spaces   \n\n\n",
    "edge/unicode.py": "s = '\u2581 and \ue000 and \ue0001 and \ue0000\u2581' # é 中文 😀\n\x00\x0b\x0c"
    "</s><s><unk><pad> ▁▁x\n",
    "edge/no_final_newline.py": "x = 1",
    "edge/whitespace_only.py": "   \n\t\n",
    "edge/leading_space.py": "  indented first line\n",
    "edge/digits.py": "n = 1234567890 + 3.14e-10\n",
    "copy_of_keyword.py": (STDLIB / "keyword.py").read_text(encoding="utf-8"),  # a duplicate
}
SKIPPED = {"empty.py": b"", "latin1.py": b"# caf\xe9 = 1\n"}
IGNORED = {"notes.txt": b"not a .py file\n", "skipme/hidden.py": b"excluded directory\n"}


def write_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under `root`; returns the documents a preparation must keep."""
    expected = {}
    for name in REAL_FILES:
        expected[name] = (STDLIB / name).read_text(encoding="utf-8")
    expected.update(EDGE_CASES)
    for name, text in expected.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))  # bytes: no newline translation
    for name, raw in {**SKIPPED, **IGNORED}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)
    return expected


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


def corpus_config(root: Path, out_dir: Path, **overrides) -> DataConfig:
    kw = dict(
        name="tiny",
        source="local_text",
        path=str(root),
        file_pattern="*.py",
        exclude_dirs=["skipme"],
        vocab_size=512,
        val_fraction=0.1,
        num_proc=2,
        out_dir=str(out_dir),
    )
    kw.update(overrides)
    return DataConfig(**kw)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    """(config, out_dir, expected docs) of one preparation shared by the read-only tests."""
    from data_prep.prepare import prepare

    root, expected = corpus
    cfg = corpus_config(root, tmp_path_factory.mktemp("prepared") / "out")
    return cfg, prepare(cfg), expected


@pytest.fixture(scope="session")
def jsonl_corpus(corpus, tmp_path_factory):
    """Two jsonl files whose "content" column holds the corpus documents, plus empty rows."""
    _, expected = corpus
    docs = [expected[k] for k in sorted(expected)]
    root = tmp_path_factory.mktemp("jsonl")
    for part, chunk in enumerate((docs[:15], docs[15:])):
        rows = [{"content": d, "id": i} for i, d in enumerate(chunk)]
        rows.insert(3, {"content": "", "id": -1})
        rows.insert(5, {"content": None, "id": -2})
        (root / f"part{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "readme.md").write_text("not data")
    return root, docs


def jsonl_config(root, out, **kw) -> DataConfig:
    base = dict(
        name="js",
        source="json",
        path=str(root),
        text_column="content",
        vocab_size=512,
        val_fraction=0.2,
        num_proc=1,
        out_dir=str(out),
    )
    base.update(kw)
    return DataConfig(**base)
