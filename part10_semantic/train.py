"""Part 10's headline experiment: a Large Concept Model that plans in a space of sentence embeddings.

Part 10 is a chapter of lessons, one script each (see the README's table); `python part10_semantic/train.py`
runs the headline one, lcm.py: it trains the chapter's sentence encoder and decoder first if they are missing
(concepts.py, "mini-SONAR"), then a Base-LCM and a diffusion LCM over the sentences of Shakespeare's scenes,
and reports the paper's metrics on held-out scenes (Barrault et al. 2024, https://arxiv.org/abs/2412.08821).
Every flag is lcm.py's:

    python part10_semantic/train.py          # the same as python part10_semantic/lcm.py
    python part10_semantic/train.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

from part10_semantic.lcm import main  # noqa: E402
from shared.config import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
