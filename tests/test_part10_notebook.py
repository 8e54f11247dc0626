"""Part 10 notebook: it runs top to bottom in its fast setting (NOTEBOOK_FAST=1), draws its figures, shows the
lessons' committed plots and prints the tables and checks its text discusses."""
import re

from tests.notebooks import run_notebook


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"the notebook's printed output lacks a line matching {pattern!r}"
    return float(match.group(1))


def test_notebook_runs():
    nb = run_notebook("part10_semantic/notebook.ipynb")
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    # 8 drawn here (sections 1-8) and the 3 committed plots of section 10
    assert figures >= 11, f"the notebook should show its 11 figures, showed {figures}"
    printed = "".join(o.get("text", "") for o in outputs
                      if o.get("output_type") == "stream" and o.get("name") == "stdout")
    for expected in ("MAP", "x ⊕ y", "bytes/token", "monotonic:", "bits/byte"):
        assert expected in printed, f"the notebook's printed output lacks {expected!r}"
    # Section 7: the robust scaler keeps the typical entries at unit spread; mean/std scaling squashes them
    robust = _number(r"typical entries have spread ([0-9.]+)", printed)
    squashed = _number(r"mean/std scaling squashes them to ([0-9.]+)", printed)
    assert 0.8 < robust < 1.2 and squashed < 0.5, (robust, squashed)
    # Section 8: DDIM with the ideal x0-predictor ends on the data points, not at their mean
    landed = _number(r"(\d+) of 300 samples end within 0.05 of a data point", printed)
    assert landed >= 280, f"only {landed:.0f} of 300 DDIM samples reached a data point"
    assert _number(r"largest distance to it ([0-9.e+-]+)", printed) < 1e-9  # the first x0 prediction is the mean
    # Section 9: the lesson's KV-cached continuous_forward equals the loop by hand
    assert _number(r"continuous_forward \(KV cache\) vs the loop by hand: largest difference ([0-9.e+-]+)",
                   printed) < 1e-5
