"""Part 9 notebook: it runs top to bottom in its fast setting (NOTEBOOK_FAST=1) and leaves no temp folder behind."""
import tempfile
from pathlib import Path

from tests.notebooks import run_notebook


def test_notebook_runs():
    before = set(Path(tempfile.gettempdir()).glob("part09_notebook_*"))
    run_notebook("part09_grpo/notebook.ipynb")
    assert set(Path(tempfile.gettempdir()).glob("part09_notebook_*")) == before, "the notebook left a temp folder"
