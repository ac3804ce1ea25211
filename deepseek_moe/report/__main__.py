"""Write the HTML report of one or several runs.

    python -m deepseek_moe.report runs/default                         # -> runs/default/report.html
    python -m deepseek_moe.report runs/a runs/b --out ablation.html    # overlaid

Works on a running job (it reads what the run has written so far), a finished one, or a mix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from deepseek_moe.atomic import atomic_write_bytes
from deepseek_moe.errors import report_user_errors


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_moe.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (run_dir=... of train.py)")
    parser.add_argument("--out", type=Path, default=None, help="the HTML file (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    from deepseek_moe.report.build import build_report

    page = build_report(args.run_dirs)
    out = args.out or args.run_dirs[0] / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    print(f"report: {out.absolute()} ({len(page) / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    report_user_errors(main, sys.argv[1:])
