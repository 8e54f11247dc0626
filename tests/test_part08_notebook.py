"""Part 8 notebook: it runs top to bottom in its fast setting (NOTEBOOK_FAST=1)."""
from tests.notebooks import run_notebook


def test_notebook_runs():
    run_notebook("part08_ppo/notebook.ipynb")
