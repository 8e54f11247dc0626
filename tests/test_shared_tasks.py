"""Tests for shared/tasks.py: the post-training tasks, their held-out split, verifiers, preference
pairs, JSONL export and loading.

Expected answers are computed here from the prompt text (int arithmetic, sorted(), datetime, an
index of the corpus), never from the generator's own variables.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from shared import tasks
from shared.data import iter_speeches
from shared.tasks import Example, Preference, verify

CORPUS_TASKS = ("speaker", "play", "next_line")


@pytest.fixture(scope="module")
def train():
    return tasks.get_examples("train")


@pytest.fixture(scope="module")
def heldout():
    return tasks.get_examples("heldout")


def _by_task(examples):
    out = defaultdict(list)
    for ex in examples:
        out[ex.task].append(ex)
    return out


# --------------------------------------------------------------------------------------
# Sizes, determinism, lengths
# --------------------------------------------------------------------------------------


def test_counts_per_task_and_split(train, heldout):
    train_by, heldout_by = _by_task(train), _by_task(heldout)
    assert set(train_by) == set(heldout_by) == set(tasks.TASKS)
    for task in tasks.TASKS:
        assert len(train_by[task]) >= 3000, task  # thousands per task
        assert len(heldout_by[task]) >= 100, task
    assert len(heldout) >= 500
    assert tasks.get_examples("heldout", task="add") == heldout_by["add"]


def test_build_is_deterministic(train, heldout):
    assert tasks.build_examples() == {"train": train, "heldout": heldout}  # a second, fresh build
    assert tasks.build_preferences(heldout) == tasks.get_preferences("heldout")


def test_prompt_and_gold_are_short_and_well_formed(train, heldout):
    for ex in train + heldout:
        assert len(ex.prompt) + len(ex.gold) <= 300, ex  # ~100 BPE tokens at ~3 bytes per token
        assert ex.gold and ex.gold == ex.gold.strip(), ex
        # the verifiers cut a response at its first newline or "<|": a gold answer never has one
        assert "\n" not in ex.gold and "<|" not in ex.gold, ex
        assert "<|" not in ex.prompt, ex
        assert verify(ex, ex.gold) == 1.0, ex


def test_bad_split_or_task_is_a_clear_error():
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        tasks.get_examples("val")
    with pytest.raises(ValueError, match="unknown task 'addition'"):
        tasks.get_preferences("train", task="addition")


# --------------------------------------------------------------------------------------
# The held-out split cannot leak
# --------------------------------------------------------------------------------------


def test_no_heldout_prompt_in_train(train, heldout):
    train_prompts = {ex.prompt for ex in train}
    heldout_prompts = [ex.prompt for ex in heldout]
    assert len(set(heldout_prompts)) == len(heldout_prompts)  # no duplicates inside a split either
    assert len(train_prompts) == len(train)
    assert not train_prompts & set(heldout_prompts)


def test_corpus_heldout_lines_never_seen_in_training(train, heldout):
    seen = set()  # every line of every training prompt and answer, corpus tasks or not
    for ex in train:
        seen.update(ex.prompt.split("\n"))
        seen.add(ex.gold)
    for ex in heldout:
        if ex.task in CORPUS_TASKS:
            source = ex.prompt.split("\n", 1)[1]
            assert source not in seen, ex
            if ex.task == "next_line":
                assert ex.gold not in seen, ex
    # and the held-out scenes are whole scenes that no training example comes from
    scene = lambda ex: (ex.meta["play"], ex.meta["act"], ex.meta["scene"])  # noqa: E731
    train_scenes = {scene(ex) for ex in train if ex.task in CORPUS_TASKS}
    assert not train_scenes & {scene(ex) for ex in heldout if ex.task in CORPUS_TASKS}


ARITHMETIC = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def _problems(examples, task):
    """The problem each prompt poses, parsed from its text (unordered for +, a set for sort)."""
    out = []
    for ex in examples:
        if ex.task != task:
            continue
        if task in ("add", "sub"):
            a, op, b = ARITHMETIC.fullmatch(ex.prompt).groups()
            out.append(frozenset((int(a), int(b))) if op == "+" else (int(a), int(b)))
        elif task == "sort":
            out.append(frozenset(ex.prompt.split("\n")[1].split()))
        else:
            out.append(ex.prompt)
    return out


@pytest.mark.parametrize("task", ["add", "sub", "sort", "count", "reverse", "date"])
def test_synthetic_heldout_problems_unseen_in_training(train, heldout, task):
    train_problems = set(_problems(train, task))
    heldout_problems = _problems(heldout, task)
    assert not train_problems & set(heldout_problems)
    if task == "add":  # in distribution: the same operand ranges in both splits
        for problems in (train_problems, heldout_problems):
            operands = [x for pair in problems for x in pair]
            assert min(operands) < 110 and max(operands) > 990


# --------------------------------------------------------------------------------------
# The gold answers are right (checked independently of the generators)
# --------------------------------------------------------------------------------------


def test_synthetic_golds_are_right(train, heldout):
    for ex in train + heldout:
        body = ex.prompt.split("\n")
        if ex.task in ("add", "sub"):
            a, op, b = ARITHMETIC.fullmatch(ex.prompt).groups()
            assert int(ex.gold) == (int(a) + int(b) if op == "+" else int(a) - int(b)), ex
            assert ex.task != "sub" or int(ex.gold) >= 0
        elif ex.task == "count":
            letter = re.fullmatch(r"How many times does the letter (\w) appear\?", body[0]).group(1)
            assert int(ex.gold) == body[1].split().count(letter), ex
        elif ex.task == "reverse":
            assert ex.gold.split(", ") == body[1].split(", ")[::-1], ex
        elif ex.task == "sort":
            assert [int(x) for x in ex.gold.split()] == sorted(int(x) for x in body[1].split()), ex
        elif ex.task == "date":
            text = re.fullmatch(r"Write (.+) as YYYY-MM-DD\.", ex.prompt).group(1)
            assert ex.gold == datetime.datetime.strptime(text, "%d %B %Y").date().isoformat(), ex


def test_corpus_golds_are_right(train, heldout):
    who = defaultdict(set)  # line -> {(play, speaker)}, from an independent pass over the corpus
    follows = set()  # (line, next line of the same speech)
    for s in iter_speeches():
        for i, line in enumerate(s.lines):
            who[line].add((s.play, s.speaker))
            if i + 1 < len(s.lines):
                follows.add((line, s.lines[i + 1]))
    for ex in train + heldout:
        if ex.task not in CORPUS_TASKS:
            continue
        question, line = ex.prompt.split("\n")
        if ex.task == "next_line":
            assert (line, ex.gold) in follows, ex
            continue
        pattern = r"Who speaks this line, (.+) or (.+)\?" if ex.task == "speaker" else \
            r"Which play is this line from, (.+) or (.+)\?"
        choices = re.fullmatch(pattern, question).groups()
        assert ex.gold in choices and choices[0] != choices[1], ex
        answers = {speaker if ex.task == "speaker" else play for play, speaker in who[line]}
        assert answers == {ex.gold}, ex  # the line is spoken by exactly this speaker / in this play


# --------------------------------------------------------------------------------------
# Verifiers against hand-written cases
# --------------------------------------------------------------------------------------

ADD = Example("add", "What is 123 + 456?", "579")
SPEAKER = Example("speaker", "Who speaks this line, HAMLET or HORATIO?\nTo be, or not to be", "HAMLET")
PLAY = Example("play", "Which play is this line from, Hamlet or Henry IV, Part I?\nx y z w", "Henry IV, Part I")
REVERSE = Example("reverse", "Reverse this list:\nking, rose, sword", "sword, rose, king")
SORT = Example("sort", "Sort these numbers from smallest to largest:\n42 7 19", "7 19 42")
DATE = Example("date", "Write 3 March 1599 as YYYY-MM-DD.", "1599-03-03")
COUNT = Example("count", "How many times does the letter a appear?\nb a c a a", "3")
NEXT = Example("next_line", "Continue this verse:\nPirates may make cheap pennyworths of their pillage",
               "And purchase friends and give to courtezans,")

CASES = [
    (ADD, "579", 1.0), (ADD, " 579 \nand more", 1.0), (ADD, "579<|end|>", 1.0), (ADD, "579.", 1.0),
    (ADD, "+579", 1.0), (ADD, "0579", 1.0), (ADD, "\n579", 0.0), (ADD, "578", 0.0), (ADD, "5790", 0.0),
    (ADD, "57 9", 0.0), (ADD, "The answer is 579", 0.0), (ADD, "579 579", 0.0), (ADD, "", 0.0),
    (ADD, "five hundred seventy-nine", 0.0),
    (SPEAKER, "HAMLET", 1.0), (SPEAKER, "hamlet", 1.0), (SPEAKER, "  Hamlet.\nHORATIO", 1.0),
    (SPEAKER, "HORATIO", 0.0), (SPEAKER, "HAMLET HAMLET", 0.0), (SPEAKER, "HAM", 0.0),
    (SPEAKER, "HAMLET or HORATIO", 0.0),
    (PLAY, "Henry IV,  Part I", 1.0), (PLAY, "Henry IV", 0.0), (PLAY, "Hamlet", 0.0),
    (REVERSE, "sword, rose, king", 1.0), (REVERSE, "sword,rose , King", 1.0), (REVERSE, "king, rose, sword", 0.0),
    (REVERSE, "sword rose king", 0.0), (REVERSE, "sword, rose", 0.0),
    (SORT, "7 19 42", 1.0), (SORT, "7  19 42.", 1.0), (SORT, "7, 19, 42", 0.0), (SORT, "19 7 42", 0.0),
    (SORT, "7 19 42 42", 0.0), (SORT, "7 19", 0.0),
    (DATE, "1599-03-03", 1.0), (DATE, "03/03/1599", 0.0), (DATE, "1599-3-3", 0.0), (DATE, "1599-03-04", 0.0),
    (COUNT, "3", 1.0), (COUNT, "2", 0.0), (COUNT, "three", 0.0),
    (NEXT, "And purchase friends and give to courtezans,", 1.0),
    (NEXT, "and purchase friends and give to courtezans", 1.0),  # case and punctuation do not count
    (NEXT, "And purchase friends", 0.6),  # overlap 3 of 7 gold words: P = 1, R = 3/7, F1 = 0.6
    (NEXT, "Whereto the climbing of my sword", 0.0),
    (NEXT, "And purchase friends and give to courtezans, and", 14 / 15),  # P = 7/8, R = 1
    (Example("user", "Say hi.", "Hi"), "hi", 1.0), (Example("user", "Say hi.", "Hi"), "Hello", 0.0),
]


@pytest.mark.parametrize("example,response,expected", CASES)
def test_verifier_hand_written_cases(example, response, expected):
    assert verify(example, response) == pytest.approx(expected)
    assert tasks.exact_match(example, response) == (expected == 1.0)


def test_answer_text_normalisation():
    assert tasks.answer_text("  a   b \t c. \nnext") == "a b c"
    assert tasks.answer_text("HAMLET<|end|> trailing") == "HAMLET"
    assert tasks.answer_text("1.5") == "1.5"  # only a final full stop is dropped


# --------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_preferences_are_verifiably_ordered(split):
    examples = {ex.prompt: ex for ex in tasks.get_examples(split)}
    pairs = tasks.get_preferences(split)
    assert len(pairs) == len(examples)
    modes = defaultdict(set)
    for pair in pairs:
        ex = examples[pair.prompt]
        assert pair.task == ex.task and pair.chosen == ex.gold
        assert verify(ex, pair.chosen) == 1.0
        assert verify(ex, pair.rejected) < 1.0, pair
        assert pair.rejected != pair.chosen
        modes[pair.task].add(pair.failure_mode)
    for task in tasks.TASKS:
        assert modes[task] == set(tasks.FAILURE_MODES), task  # every mode, in every task


def test_failure_modes_look_like_their_names():
    pairs = {(p.task, p.failure_mode): p for p in tasks.get_preferences("heldout")}
    add_wrong = pairs["add", "wrong_answer"]
    a, _, b = ARITHMETIC.fullmatch(add_wrong.prompt).groups()
    # one digit off by one: the difference is a power of ten
    assert abs(int(add_wrong.rejected) - (int(a) + int(b))) in (1, 10, 100, 1000)
    assert pairs["add", "truncated"].chosen.startswith(pairs["add", "truncated"].rejected)
    assert pairs["next_line", "repeated"].rejected == " ".join([pairs["next_line", "repeated"].chosen] * 2)
    assert pairs["speaker", "off_format"].chosen in pairs["speaker", "off_format"].rejected
    reverse_wrong = pairs["reverse", "wrong_answer"]
    assert reverse_wrong.rejected == reverse_wrong.prompt.split("\n")[1]  # not reversed at all
    off_topic = pairs["add", "off_topic"]
    assert not re.fullmatch(r"\d+", off_topic.rejected) or off_topic.rejected in {
        ex.gold for ex in tasks.get_examples("heldout") if ex.task != "add"}


# --------------------------------------------------------------------------------------
# Export CLI and JSONL loading
# --------------------------------------------------------------------------------------


def test_export_round_trip_through_the_loaders(tmp_path, capsys):
    sft = tmp_path / "out" / "sft.jsonl"  # a missing folder is created
    tasks.main(["export", "--split", "heldout", "--kind", "sft", "--out", str(sft)])
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "4500 sft rows" in summary and "add 500" in summary and "next_line 500" in summary
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    assert set(rows[0]) == {"task", "prompt", "gold"}
    loaded = tasks.load_sft_jsonl(sft)
    fields = lambda examples: [(e.task, e.prompt, e.gold) for e in examples]  # noqa: E731 (meta is not exported)
    assert fields(loaded) == fields(tasks.get_examples("heldout"))
    assert verify(loaded[0], loaded[0].gold) == 1.0  # the task name travels, so does its verifier

    pref = tmp_path / "pref.jsonl"
    tasks.main(["export", "--split", "train", "--kind", "preference", "--task", "sort", "--out", str(pref)])
    assert "sort 4000" in capsys.readouterr().out
    rows = [json.loads(line) for line in pref.read_text().splitlines()]
    assert set(rows[0]) == {"task", "prompt", "chosen", "rejected", "failure_mode"}
    assert tasks.load_preference_jsonl(pref) == tasks.get_preferences("train", task="sort")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loaders_accept_the_usual_shapes(tmp_path):
    sft = _write(tmp_path / "alpaca.jsonl", [
        json.dumps({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}),
        json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi"}),
        "",  # blank lines are skipped
        json.dumps({"instruction": "Say bye.", "output": "Bye"}),
        json.dumps({"prompt": "What is 1 + 1?", "gold": "2"}),
        json.dumps({"task": "add", "prompt": "What is 2 + 2?", "gold": "4"}),
    ])
    assert tasks.load_sft_jsonl(sft) == [
        Example("user", "Add the numbers.\n2 3", "5"), Example("user", "Say hi.", "Hi"),
        Example("user", "Say bye.", "Bye"), Example("user", "What is 1 + 1?", "2"),
        Example("add", "What is 2 + 2?", "4"),
    ]
    prefs = _write(tmp_path / "prefs.jsonl", [
        json.dumps({"prompt": "Say hi.", "chosen": "Hi", "rejected": "Go away"}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "task": "add", "failure_mode": "truncated"}),
        # Anthropic HH-RLHF: two whole dialogues, no prompt
        json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}),
    ])
    assert tasks.load_preference_jsonl(prefs) == [
        Preference("user", "Say hi.", "Hi", "Go away"), Preference("add", "p", "a", "b", "truncated"),
        Preference("user", "\n\nHuman: Hi?\n\nAssistant:", "Hello!", "Go."),
    ]


@pytest.mark.parametrize("loader,bad_row,message", [
    (tasks.load_sft_jsonl, '{"prompt": "p", "gold": "g"', "not valid JSON"),
    (tasks.load_sft_jsonl, '{"prompt": "p"}', "missing key 'gold'"),
    (tasks.load_sft_jsonl, '{"prompt": "p", "gold": 4}', "'gold' must be a string, got int"),
    (tasks.load_sft_jsonl, '{"instruction": "i", "input": "x"}', "missing key 'output'"),
    (tasks.load_sft_jsonl, '["p", "g"]', "expected a JSON object, got list"),
    (tasks.load_preference_jsonl, '{"prompt": "p", "chosen": "a"}', "missing key 'rejected'"),
    (tasks.load_preference_jsonl, '{"chosen": "a", "rejected": "b"}', "missing key 'prompt'"),
    (tasks.load_preference_jsonl, '{"prompt": "p", "chosen": "a", "rejected": null}', "'rejected' must be a string"),
])
def test_malformed_row_names_file_and_line(tmp_path, loader, bad_row, message):
    good = '{"prompt": "p", "gold": "g"}' if loader is tasks.load_sft_jsonl else \
        '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path = _write(tmp_path / "rows.jsonl", [good, "", bad_row, good])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        loader(path)


def test_empty_or_missing_file(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl has no rows"):
        tasks.load_sft_jsonl(empty)
    with pytest.raises(FileNotFoundError):
        tasks.load_preference_jsonl(tmp_path / "missing.jsonl")


def test_cli_help_and_one_line_errors(tmp_path, capsys):
    done = subprocess.run([sys.executable, "-m", "shared.tasks", "export", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--split" in done.stdout and "preference" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        tasks.main(["export", "--split", "val", "--kind", "sft", "--out", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2 and "invalid choice: 'val'" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:  # run_cli: an OSError becomes "error: ..."
        tasks.run_cli(tasks.main, ["export", "--split", "heldout", "--kind", "sft", "--out", str(blocker / "x.jsonl")])
    assert str(exit_info.value.code).startswith("error: ") and "a_file" in str(exit_info.value.code)
