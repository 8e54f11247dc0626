"""The notebook runner: the notebooks share one kernel, so each must start as if the kernel were new."""
import subprocess
import sys

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from tests.notebooks import ROOT, run_notebook


def write_notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def new_process(code: str) -> str:
    """What a new Python process prints: the reference for a new kernel."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_a_notebook_starts_in_a_new_kernels_state_whatever_ran_before(tmp_path):
    threads = new_process("import torch; print(torch.get_num_threads())")
    messy = write_notebook(tmp_path / "messy.ipynb",
                           "import json, os, torch\nx = 1",
                           "torch.set_num_threads(1); torch.manual_seed(0); os.chdir('/')")
    clean = write_notebook(tmp_path / "clean.ipynb",
                           "import os, torch",
                           "assert 'x' not in globals() and 'json' not in globals(), 'variables of the last notebook'",
                           f"assert os.getcwd() == {str(ROOT)!r}, os.getcwd()",
                           f"assert torch.get_num_threads() == {threads}, torch.get_num_threads()",
                           "assert torch.initial_seed() != 0, 'the seed of the last notebook'",  # a new one is random
                           "assert os.environ['NOTEBOOK_FAST'] == '1'")
    run_notebook(messy)
    run_notebook(clean)


def test_a_missing_import_fails_although_an_earlier_notebook_imported_it(tmp_path):
    run_notebook(write_notebook(tmp_path / "imports.ipynb", "import json"))
    with pytest.raises(CellExecutionError, match="NameError"):
        run_notebook(write_notebook(tmp_path / "forgets.ipynb", "json.dumps(1)"))


def test_after_a_failing_notebook_the_next_one_runs(tmp_path):
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        run_notebook(write_notebook(tmp_path / "fails.ipynb", "import os\nos.chdir('/')\n1 / 0"))
    nb = run_notebook(write_notebook(tmp_path / "runs.ipynb", "import os\nprint(os.getcwd())"))
    assert nb.cells[0].outputs[0]["text"].strip() == str(ROOT)  # the reset cell is not among the cells


def test_a_notebook_committed_with_outputs_is_refused(tmp_path):
    path = write_notebook(tmp_path / "outputs.ipynb", "print(1)")
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nbformat.write(nb, path)
    with pytest.raises(AssertionError, match="clear them"):
        run_notebook(path)


def test_a_notebook_that_times_out_does_not_hold_up_the_next(tmp_path):
    """The stuck kernel is replaced: else the next notebook would run after the stuck cell, in its kernel."""
    woke = tmp_path / "woke"  # written by the stuck cell if it ever wakes up
    with pytest.raises(TimeoutError):
        run_notebook(write_notebook(tmp_path / "stuck.ipynb", f"import time\ntime.sleep(20)\nopen({str(woke)!r}, 'w')"),
                     timeout=2)
    run_notebook(write_notebook(tmp_path / "next.ipynb", f"import os\nassert not os.path.exists({str(woke)!r})"))
    assert not woke.exists()
