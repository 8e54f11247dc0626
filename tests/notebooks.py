"""Execute a chapter notebook in its fast setting (used by each chapter's notebook test).

Notebooks are committed without outputs. A notebook reads `FAST = os.environ.get("NOTEBOOK_FAST") == "1"`
in its first code cell and shrinks its runs when FAST is set, so the whole notebook executes in
seconds here; a learner running it in Jupyter gets the full version.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(path: str | os.PathLike, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell (from the repository root, with NOTEBOOK_FAST=1); raises on the first error."""
    nb = nbformat.read(ROOT / path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path} is committed with outputs: clear them"
    os.environ["NOTEBOOK_FAST"] = "1"  # inherited by the kernel process
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("NOTEBOOK_FAST", None)
    return nb
