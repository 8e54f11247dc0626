"""Show what a chapter changed: the unified diff of two chapters' files.

    python -m shared.diff 02 03             # model.py and train.py
    python -m shared.diff 02 03 model.py    # one file
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chapter_dir(number: str) -> Path:
    matches = sorted(ROOT.glob(f"part{int(number):02d}_*"))
    if not matches:
        raise SystemExit(f"no chapter folder part{int(number):02d}_* in {ROOT}")
    return matches[0]


def chapter_diff(old: str, new: str, files: list[str]) -> str:
    a, b = chapter_dir(old), chapter_dir(new)
    out = []
    for name in files:
        fa, fb = a / name, b / name
        la = fa.read_text().splitlines(keepends=True) if fa.exists() else []
        lb = fb.read_text().splitlines(keepends=True) if fb.exists() else []
        out.extend(difflib.unified_diff(la, lb, f"{a.name}/{name}", f"{b.name}/{name}"))
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="chapter number, e.g. 02")
    parser.add_argument("new", help="chapter number, e.g. 03")
    parser.add_argument("files", nargs="*", default=["model.py", "train.py"], help="files to compare")
    args = parser.parse_args(argv)
    sys.stdout.write(chapter_diff(args.old, args.new, args.files) or "(no differences)\n")


if __name__ == "__main__":
    main()
