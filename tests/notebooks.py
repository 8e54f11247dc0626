"""Execute a chapter notebook in its fast setting (used by each chapter's notebook test).

Notebooks are committed without outputs. A notebook reads `FAST = os.environ.get("NOTEBOOK_FAST") == "1"`
in its first code cell and shrinks its runs when FAST is set, so the whole notebook executes in
seconds here; a learner running it in Jupyter gets the full version.

The notebooks share one Jupyter kernel: a new kernel per notebook spent ~4 s of each run starting Python and
importing torch and matplotlib again, 11 times per `pytest`. Before each notebook the shared kernel is put
back into the state of a new one: its variables deleted (`%reset -f`, so a notebook that forgets an import
still fails), figures closed, the working directory and torch's thread count as a new process has them, and
torch reseeded at random, as a new process is.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

import nbformat
import torch
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync

ROOT = Path(__file__).resolve().parents[1]
# what a new Python process has (read at collection, before any test changes them)
_NEW_PROCESS_THREADS = torch.get_num_threads()
# runs first in the shared kernel, as its own cell; the names it uses die with the function
_FRESH_STATE = f"""%reset -f
def _fresh_state():
    import os, torch, matplotlib.pyplot as plt
    plt.close("all")
    os.chdir({str(ROOT)!r})
    torch.set_num_threads({_NEW_PROCESS_THREADS})
    torch.seed()  # a new random seed, as a new process draws
_fresh_state()
del _fresh_state"""

_kernel: AsyncKernelManager | None = None


def _shared_kernel() -> AsyncKernelManager:
    global _kernel
    if _kernel is None or not run_sync(_kernel.is_alive)():
        _kernel = AsyncKernelManager(kernel_name="python3")  # the kind nbclient drives (its timeouts work)
        run_sync(_kernel.start_kernel)(cwd=str(ROOT), env={**os.environ, "NOTEBOOK_FAST": "1"})
    return _kernel


def _drop_kernel() -> None:
    """Shut the shared kernel down: the next notebook gets a new one, whatever state this one was in."""
    global _kernel
    if _kernel is not None:
        run_sync(_kernel.shutdown_kernel)(now=True)
        _kernel = None


atexit.register(_drop_kernel)  # the shared kernel ends with pytest


def run_notebook(path: str | os.PathLike, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell (in the shared kernel, from the repository root, with NOTEBOOK_FAST=1); raises on the first
    error. Returns the executed notebook, without the reset cell."""
    nb = nbformat.read(ROOT / path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path} is committed with outputs: clear them"
    nb.cells.insert(0, nbformat.v4.new_code_cell(_FRESH_STATE))
    try:
        NotebookClient(nb, km=_shared_kernel(), timeout=timeout).execute()
    except CellExecutionError:  # an error in a cell: the kernel is fine, the next notebook's reset will do
        raise
    except BaseException:  # a timeout, a dead kernel, Ctrl-C: the kernel may be stuck
        _drop_kernel()
        raise
    finally:
        nb.cells.pop(0)
    return nb
