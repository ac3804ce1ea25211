"""The ablation ladder's corpus: the English prose of the Linux kernel's documentation.

    python bench/ablation/corpus.py --out data_src/linux_doc      # apt-get download + extract

Debian's `linux-doc-6.1` package holds the kernel's Documentation/ tree as gzipped
reStructuredText and plain text: ~3,000 English documents, ~25 MB (about 6M tokens with the
ladder's 8192-token BPE), so a ladder run of a few million tokens sees no document twice.
The translations/ subtree (Chinese, Japanese, Korean, Italian, Spanish) is left out, and so
are the generated HTML pages. Each document becomes one `.txt` file under `--out`, which
`python -m data_prep.prepare data=local_text data.path=OUT` reads (one document per file).

The package is fetched with `apt-get download` (no root needed), or read from `--deb PATH`.
The output is written to a temporary directory and renamed, so an interrupted run leaves no
half corpus; a complete output is reused (a `DONE` marker lists the package and file count).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "linux-doc-6.1"
_DOC_ROOT = Path("usr/share/doc") / PACKAGE / "Documentation"
_SUFFIXES = (".rst.gz", ".txt.gz")
_MARKER = "DONE"


class CorpusError(Exception):
    """A one-line, user-facing problem with fetching or extracting the corpus."""


def fetch_deb(workdir: Path) -> Path:
    """`apt-get download` the package into `workdir`; its path."""
    try:
        subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=workdir, check=True, capture_output=True, text=True
        )
    except FileNotFoundError as err:
        raise CorpusError(f"apt-get not found: download {PACKAGE}_*.deb by hand and pass --deb PATH") from err
    except subprocess.CalledProcessError as err:
        last = (err.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(
            f"apt-get download {PACKAGE} failed ({last[0]}); run `apt-get update`, or pass --deb PATH"
        ) from err
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise CorpusError(f"apt-get download {PACKAGE} wrote no .deb into {workdir}; pass --deb PATH")
    return debs[-1]


def english_documents(root: Path) -> list[Path]:
    """The gzipped .rst/.txt files under Documentation/, without translations/, sorted."""
    docs = root / _DOC_ROOT
    if not docs.is_dir():
        raise CorpusError(f"the package holds no {_DOC_ROOT}: is it {PACKAGE}?")
    return sorted(
        p
        for p in docs.rglob("*")
        if p.name.endswith(_SUFFIXES) and "translations" not in p.relative_to(docs).parts
    )


def extract(deb: Path, out: Path) -> dict:
    """Unpack `deb` and write each English document as `out/<relative path>.txt`."""
    with tempfile.TemporaryDirectory(prefix=".corpus-", dir=out.parent) as tmp:
        unpacked, staged = Path(tmp) / "deb", Path(tmp) / "out"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        n_files = n_bytes = 0
        for src in english_documents(unpacked):
            rel = src.relative_to(unpacked / _DOC_ROOT)
            text = gzip.decompress(src.read_bytes()).decode("utf-8", errors="replace")
            if not text.strip():
                continue
            dst = staged / rel.parent / (rel.name[: -len(".gz")] + ".txt")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
            n_files, n_bytes = n_files + 1, n_bytes + len(text.encode("utf-8"))
        summary = {"package": deb.name, "documents": n_files, "bytes": n_bytes}
        (staged / _MARKER).write_text(json.dumps(summary) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return summary


def ensure_corpus(out: Path, deb: Path | None = None) -> dict:
    """The corpus under `out` (extracted once; reused when complete)."""
    out = out.absolute()
    if (out / _MARKER).is_file():
        return json.loads((out / _MARKER).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    if deb is None:
        with tempfile.TemporaryDirectory(prefix=".deb-", dir=out.parent) as tmp:
            return extract(fetch_deb(Path(tmp)), out)
    if not deb.is_file():
        raise CorpusError(f"--deb {deb} does not exist; pass the path of {PACKAGE}_*.deb")
    return extract(deb, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data_src/linux_doc"))
    parser.add_argument("--deb", type=Path, default=None, help=f"a local {PACKAGE}_*.deb instead of apt-get")
    args = parser.parse_args(argv)
    try:
        summary = ensure_corpus(args.out, args.deb)
    except CorpusError as err:
        sys.exit(f"corpus: {err}")
    print(
        f"{args.out}: {summary['documents']:,} documents, {summary['bytes'] / 1e6:.1f} MB ({summary['package']})"
    )


if __name__ == "__main__":
    main()
