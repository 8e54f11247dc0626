"""Part 10 notebook: it runs top to bottom in its fast setting (NOTEBOOK_FAST=1), draws its figures and prints the
tables its text discusses."""
from tests.notebooks import run_notebook


def test_notebook_runs():
    nb = run_notebook("part10_semantic/notebook.ipynb")
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 6, f"the notebook should draw its 6 figures, drew {figures}"
    printed = "".join(o.get("text", "") for o in outputs
                      if o.get("output_type") == "stream" and o.get("name") == "stdout")
    for expected in ("MAP", "x ⊕ y", "bytes/token", "monotonic:", "bits/byte"):
        assert expected in printed, f"the notebook's printed output lacks {expected!r}"
