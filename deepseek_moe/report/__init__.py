"""`python -m deepseek_moe.report RUN_DIR [RUN_DIR ...] [--out report.html]`: one self-contained
HTML page (plots embedded as PNG, opens offline) of one run or several overlaid.

    build_report([Path("runs/a"), Path("runs/b")]) -> str     build.py
    read_run(Path("runs/a")) -> Run                          runs.py
"""

from deepseek_moe.report.build import build_report
from deepseek_moe.report.runs import Run, read_run

__all__ = ["Run", "build_report", "read_run"]
