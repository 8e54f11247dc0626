"""The instruction tasks of the post-training chapters (parts 6-9): data, held-out split, verifiers,
preference pairs and JSONL loading, all offline and deterministic.

    from shared.tasks import TASKS, get_examples, get_preferences, verify

    train = get_examples("train")                  # list[Example(task, prompt, gold, meta)]
    heldout = get_examples("heldout", task="add")  # one task only
    verify(heldout[0], "579")                      # the reward: a float in [0, 1]
    pairs = get_preferences("train")               # list[Preference(task, prompt, chosen, rejected, failure_mode)]

    python -m shared.tasks list
    python -m shared.tasks show --task add --n 3
    python -m shared.tasks export --split train --kind sft --out data/sft_train.jsonl

The tasks
---------
A ~1M-parameter model with a 128-token context (part 4's BPE, vocab 2048) is trained on these, so
every prompt + answer is short (at most 300 characters, ~100 tokens at ~3 bytes per token). The
prompt is plain instruction text ("Who speaks this line, HAMLET or HORATIO?\\n<line>"); the chat
template with its special tokens is part 6's lesson. The gold answer is bare ("HAMLET").

Three tasks are grounded in the corpus (shared.data.iter_speeches), six are synthetic skills:

    speaker    who speaks this line (two names to choose from, both speakers of the same scene)
    play       which play is this line from (two plays to choose from)
    next_line  continue the verse: the next line of the same speech (scored by token F1)
    add        3-digit addition
    sub        2-digit subtraction with a non-negative result
    count      count one letter in a short spaced-out sequence ("b a c a a")   <- part 9's headroom task
    reverse    reverse a list of 3-5 words
    sort       sort 3-5 numbers ascending
    date       rewrite "3 March 1599" as "1599-03-03"

The mix spans difficulty on purpose. Part 6's default SFT run (part06_sft/README.md has the table and
the command) learns the copying and lookup tasks well (date 100%, reverse 96% held-out exact match),
leaves `count` mediocre (35%): the headroom part 9 (GRPO) is meant to use, since the verifier rewards
every right count and the model already gets a third of them, so sampled answers are right often enough
to learn from. The arithmetic tasks stay near 0 at this scale (add 1%, sub 4%, sort 2%): what SFT cannot
fix in a few minutes with a 1M-parameter model. `next_line` stays near 0 exact match (token F1 ~0.09);
its F1 reward still gives a learning signal. `speaker` and `play` are two-way choices, 50% by guessing.
The held-out split is *in distribution*: the synthetic held-out problems come from the same ranges as
training (an out-of-distribution split, e.g. longer sequences, could not be helped by RL), drawn with
a different seed, and never equal to a training problem.

The held-out split cannot leak
------------------------------
* Corpus tasks: about 1 scene in 10 of every play is held out whole (scenes, not plays, because
  `play` must have seen every play). Only lines that occur exactly once in the whole corpus are
  used, so a held-out line never appears in a training prompt or answer. (Part 4's base model
  was pretrained on most of the corpus, so these tasks measure recall as well as skill; the
  synthetic tasks are the clean test of generalisation.)
* Synthetic tasks: training and held-out examples are drawn with different seeds from the same
  ranges; a held-out draw that equals a training problem (an addition pair in either order, the
  same set of numbers to sort, the same date, ...) is rejected.

Verifiers and normalisation
---------------------------
`verify(example, response_text) -> float in [0, 1]` is part 6's metric and the verifiable reward
of parts 8 and 9. The response is first cut to its answer by `answer_text`: keep what comes before
the first newline or the first special-token marker "<|" (the end-of-answer marker of a chat
template), collapse runs of whitespace, strip, and drop one trailing full stop. Then, per task:

* exact (speaker, play, date): equal to the gold, ignoring case.
* numeric (add, sub, count): the whole answer is an integer ("579", "+579", "0579") equal to the gold;
  "The answer is: 579" scores 0: the format is part of the task.
* list (reverse): comma-separated items, spaces around commas ignored, compared ignoring case;
  (sort): whitespace-separated integers, compared in order.
* token F1 (next_line): SQuAD-style F1 over lower-cased words (punctuation dropped), since
  a near miss of a verse line deserves partial credit.

`exact_match(example, response)` is `verify(...) == 1.0`, for every task.

Preference pairs (part 7)
-------------------------
Every example gives one pair: chosen = the gold answer; rejected = a plausible failure, one of
FAILURE_MODES: "wrong_answer" (the other name, a digit off by one, the list not reversed, ...),
"truncated" (cut short), "repeated" (the answer looping: said twice), "off_format" (right content,
wrong shape: "The answer is: 579"), "off_topic" (the answer to another task). Modes rotate over
the examples, and every rejected answer verifies strictly lower than its chosen one.

Nothing is cached on disk: building everything takes a second or two (once per process).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from random import Random

from shared.config import run_cli
from shared.data import iter_speeches

SEED = 1234  # every random choice below comes from Random(f"{SEED}:<what>"): the same on every machine
SPLITS = ("train", "heldout")
N_TRAIN = 4000  # training examples per task (sub has fewer: see SYNTHETIC)
N_HELDOUT = 500  # held-out examples per task; 9 tasks -> 4,500 held-out prompts
MAX_CHARS = 300  # prompt + gold; ~100 BPE tokens at ~3 bytes per token, inside a 128-token context
HELDOUT_SCENE_FRACTION = 0.1
FAILURE_MODES = ("wrong_answer", "truncated", "repeated", "off_format", "off_topic")


@dataclass(frozen=True)
class Example:
    """One instruction: `prompt` is the user's text, `gold` the bare correct answer. `meta` holds
    where it came from (play/scene/speaker, or the operands); treat it as read-only."""

    task: str
    prompt: str
    gold: str
    meta: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Preference:
    """A prompt with a better (`chosen`) and a worse (`rejected`) response, for a reward model."""

    task: str
    prompt: str
    chosen: str
    rejected: str
    failure_mode: str = ""


# --------------------------------------------------------------------------------------
# Verifiers
# --------------------------------------------------------------------------------------


def answer_text(response: str) -> str:
    """The answer part of a model's response (the normalisation every verifier starts with)."""
    response = response.split("\n", 1)[0].split("<|", 1)[0]  # stop at a newline or a special token
    text = " ".join(response.split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _verify_exact(example: Example, response: str) -> float:
    return float(answer_text(response).casefold() == answer_text(example.gold).casefold())


def _verify_integer(example: Example, response: str) -> float:
    text = answer_text(response)
    return float(re.fullmatch(r"[+-]?\d+", text) is not None and int(text) == int(example.gold))


def _verify_comma_list(example: Example, response: str) -> float:
    def items(text: str) -> list[str]:
        return [item.strip().casefold() for item in answer_text(text).split(",")]

    return float(items(response) == items(example.gold))


def _verify_number_list(example: Example, response: str) -> float:
    words = answer_text(response).split()
    if not all(re.fullmatch(r"[+-]?\d+", w) for w in words):
        return 0.0
    return float([int(w) for w in words] == [int(w) for w in example.gold.split()])


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style F1 between the words of two strings (a multiset overlap)."""
    pred, ref = _words(prediction), _words(gold)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _verify_f1(example: Example, response: str) -> float:
    return token_f1(answer_text(response), example.gold)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    verify: Callable[[Example, str], float]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("speaker", "who speaks this line? (two names of the same scene to choose from)", _verify_exact),
        Task("play", "which play is this line from? (two plays to choose from)", _verify_exact),
        Task("next_line", "continue the verse with the next line of the speech (token F1)", _verify_f1),
        Task("add", "3-digit addition", _verify_integer),
        Task("sub", "2-digit subtraction, non-negative result", _verify_integer),
        Task("count", "how many times a letter appears in a spaced-out sequence; the GRPO headroom task",
             _verify_integer),
        Task("reverse", "reverse a comma-separated list of 3-5 words", _verify_comma_list),
        Task("sort", "sort 3-5 numbers from smallest to largest", _verify_number_list),
        Task("date", "rewrite a date like '3 March 1599' as YYYY-MM-DD", _verify_exact),
    ]
}


def verify(example: Example, response: str) -> float:
    """Score a response in [0, 1] with the example's task verifier. Examples of a task this module
    does not know (e.g. loaded from a user's JSONL file) are scored by exact match."""
    task = TASKS.get(example.task)
    return (task.verify if task else _verify_exact)(example, response)


def exact_match(example: Example, response: str) -> bool:
    return verify(example, response) == 1.0


_SHAPES = {"add": r"[+-]?\d+", "sub": r"[+-]?\d+", "count": r"[+-]?\d+", "sort": r"[+-]?\d+( [+-]?\d+)*",
           "reverse": r"[^,]+(,[^,]+)+", "date": r"\d{4}-\d{2}-\d{2}", "next_line": r".+"}


def well_formed(example: Example, response: str) -> bool:
    """Whether the answer has the shape the task asks for, right or wrong: an integer, a list, a date,
    one of the offered names (speaker, play). Part 6 reports it as the format-compliance rate."""
    text = answer_text(response)
    choices = example.meta.get("choices")
    if choices:
        return text.casefold() in {c.casefold() for c in choices}
    shape = _SHAPES.get(example.task, r".+")
    return re.fullmatch(shape, text) is not None


# --------------------------------------------------------------------------------------
# Corpus tasks: speaker, play, next_line
# --------------------------------------------------------------------------------------

MIN_WORDS = 4  # a line shorter than this ("Ay, my lord.") says too little about who speaks it


def _heldout_scenes(speeches) -> set[tuple[str, str, str]]:
    """About 1 scene in 10 of every play (at least one), chosen by a seeded draw."""
    scenes_of_play: dict[str, dict[tuple[str, str, str], None]] = defaultdict(dict)  # ordered sets
    for s in speeches:
        scenes_of_play[s.play][(s.play, s.act, s.scene)] = None
    heldout = set()
    for play, scenes in scenes_of_play.items():
        k = max(1, round(HELDOUT_SCENE_FRACTION * len(scenes)))
        heldout.update(Random(f"{SEED}:scenes:{play}").sample(list(scenes), k))
    return heldout


def _corpus_examples() -> dict[str, dict[str, list[Example]]]:
    """{split: {task: examples}} for the three corpus tasks."""
    speeches = list(iter_speeches())
    heldout_scenes = _heldout_scenes(speeches)
    # Only lines that occur once in the whole corpus: such a line cannot be in both splits, and
    # cannot have two right answers (two speakers, two plays).
    line_count = Counter(line for s in speeches for line in s.lines)
    plays = sorted({s.play for s in speeches})
    speakers_of_scene: dict[tuple, dict[str, None]] = defaultdict(dict)  # ordered sets of names
    for s in speeches:
        speakers_of_scene[(s.play, s.act, s.scene)][s.speaker] = None

    # Candidates in corpus order: (speech, index of the line in the speech); `pairs` also have a
    # usable next line in the same speech.
    lines = {split: [] for split in SPLITS}
    pairs = {split: [] for split in SPLITS}
    for s in speeches:
        split = "heldout" if (s.play, s.act, s.scene) in heldout_scenes else "train"
        for i, line in enumerate(s.lines):
            if line_count[line] == 1 and len(line.split()) >= MIN_WORDS:
                lines[split].append((s, i))
                nxt = s.lines[i + 1] if i + 1 < len(s.lines) else None
                if nxt is not None and line_count[nxt] == 1 and len(nxt.split()) >= MIN_WORDS - 1:
                    pairs[split].append((s, i))
    return {split: _corpus_tasks(split, lines[split], pairs[split], plays, speakers_of_scene)
            for split in SPLITS}


def _corpus_tasks(split, lines, pairs, plays, speakers_of_scene) -> dict[str, list[Example]]:
    n = N_TRAIN if split == "train" else N_HELDOUT
    out: dict[str, list[Example]] = {}

    rng = Random(f"{SEED}:speaker:{split}")
    out["speaker"] = []
    for s, i in rng.sample(lines, len(lines)):
        others = [name for name in speakers_of_scene[(s.play, s.act, s.scene)] if name != s.speaker]
        if not others:
            continue  # a monologue scene (a chorus, a prologue): no second name to choose from
        choices = [s.speaker, rng.choice(others)]
        rng.shuffle(choices)
        prompt = f"Who speaks this line, {choices[0]} or {choices[1]}?\n{s.lines[i]}"
        meta = dict(play=s.play, act=s.act, scene=s.scene, line=s.lines[i], choices=choices)
        out["speaker"].append(Example("speaker", prompt, s.speaker, meta))
        if len(out["speaker"]) == n:
            break

    rng = Random(f"{SEED}:play:{split}")
    out["play"] = []
    for s, i in rng.sample(lines, n):
        choices = [s.play, rng.choice([p for p in plays if p != s.play])]
        rng.shuffle(choices)
        prompt = f"Which play is this line from, {choices[0]} or {choices[1]}?\n{s.lines[i]}"
        meta = dict(play=s.play, act=s.act, scene=s.scene, line=s.lines[i], choices=choices)
        out["play"].append(Example("play", prompt, s.play, meta))

    rng = Random(f"{SEED}:next_line:{split}")
    out["next_line"] = [
        Example("next_line", f"Continue this verse:\n{s.lines[i]}", s.lines[i + 1],
                dict(play=s.play, act=s.act, scene=s.scene, speaker=s.speaker, line=s.lines[i]))
        for s, i in rng.sample(pairs, n)
    ]
    return out


# --------------------------------------------------------------------------------------
# Synthetic tasks: each generator draws (key, Example); the key says when two draws are the same
# problem, so that no held-out problem is a training problem.
# --------------------------------------------------------------------------------------


def _add(rng: Random):
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    # a + b and b + a are the same problem: the key is the unordered pair
    return (min(a, b), max(a, b)), Example("add", f"What is {a} + {b}?", str(a + b), dict(a=a, b=b))


def _sub(rng: Random):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    return (a, b), Example("sub", f"What is {a} - {b}?", str(a - b), dict(a=a, b=b))


COUNT_ALPHABET = "abcde"


def _count(rng: Random):
    letters = [rng.choice(COUNT_ALPHABET) for _ in range(rng.randint(4, 9))]
    target = rng.choice(COUNT_ALPHABET)
    sequence = " ".join(letters)  # spaced out: one BPE token per letter, so counting is possible
    prompt = f"How many times does the letter {target} appear?\n{sequence}"
    return (target, sequence), Example("count", prompt, str(letters.count(target)), dict(letter=target))


# Short words that part 4's Shakespeare BPE knows well.
WORDS = (
    "king queen lord lady sword crown rose heart night day love death blood fool ghost storm moon "
    "star ring horse ship gold bread wine fire water earth heaven grave hand eye tongue head letter "
    "castle field forest sea wind rain bell book candle knife cup door friend enemy father mother "
    "son daughter brother sister"
).split()


def _reverse(rng: Random):
    items = rng.sample(WORDS, rng.randint(3, 5))
    prompt = "Reverse this list:\n" + ", ".join(items)
    return tuple(items), Example("reverse", prompt, ", ".join(reversed(items)), {})


def _sort(rng: Random):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    prompt = "Sort these numbers from smallest to largest:\n" + " ".join(map(str, numbers))
    # the same numbers in another order are the same problem: the key is the set
    return frozenset(numbers), Example("sort", prompt, " ".join(map(str, sorted(numbers))), {})


MONTHS = ("January February March April May June July August September October November December").split()


def _date(rng: Random):
    start, end = datetime.date(1564, 1, 1), datetime.date(1616, 12, 31)  # Shakespeare's lifetime
    day = start + datetime.timedelta(days=rng.randrange((end - start).days + 1))
    prompt = f"Write {day.day} {MONTHS[day.month - 1]} {day.year} as YYYY-MM-DD."
    return day, Example("date", prompt, day.isoformat(), {})


SYNTHETIC = {"add": (_add, N_TRAIN), "sub": (_sub, 3000), "count": (_count, N_TRAIN),
             "reverse": (_reverse, N_TRAIN), "sort": (_sort, N_TRAIN), "date": (_date, N_TRAIN)}
# sub: only 4,095 pairs exist (10 <= b <= a <= 99); 3,000 train + 500 held-out leaves room for both


def _synthetic_examples(task: str) -> dict[str, list[Example]]:
    make, n_train = SYNTHETIC[task]
    out, train_keys = {}, set()
    for split, n in (("train", n_train), ("heldout", N_HELDOUT)):
        rng, keys, examples = Random(f"{SEED}:{task}:{split}"), set(), []
        while len(examples) < n:
            key, example = make(rng)
            if key in keys or key in train_keys:
                continue  # a repeat within the split, or a held-out draw equal to a training problem
            keys.add(key)
            examples.append(example)
        out[split], train_keys = examples, keys
    return out


# --------------------------------------------------------------------------------------
# Building the splits
# --------------------------------------------------------------------------------------


def build_examples() -> dict[str, list[Example]]:
    """Build both splits from scratch: {"train": [...], "heldout": [...]}, tasks in TASKS order."""
    by_task = _corpus_examples()
    for task in SYNTHETIC:
        for split, examples in _synthetic_examples(task).items():
            by_task[split][task] = examples
    out = {split: [ex for task in TASKS for ex in by_task[split][task]] for split in SPLITS}
    for ex in out["train"] + out["heldout"]:
        if len(ex.prompt) + len(ex.gold) > MAX_CHARS:  # a change to a template or a range went too far
            raise RuntimeError(f"{ex.task} example longer than {MAX_CHARS} characters: {ex.prompt!r}")
    return out


@lru_cache(maxsize=1)
def _cached_examples() -> dict[str, tuple[Example, ...]]:
    return {split: tuple(examples) for split, examples in build_examples().items()}


def _check_split(split: str, task: str | None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def get_examples(split: str, task: str | None = None) -> list[Example]:
    """The examples of one split ("train" or "heldout"), of every task or of one."""
    _check_split(split, task)
    return [ex for ex in _cached_examples()[split] if task is None or ex.task == task]


# --------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------


def _wrong_answer(ex: Example, rng: Random, others: list[Example]) -> str | None:
    gold = ex.gold
    if ex.task in ("speaker", "play"):
        return next(c for c in ex.meta["choices"] if c != gold)  # the other name offered
    if ex.task == "next_line":
        return rng.choice(others).gold  # a line, but not the next one
    if ex.task in ("add", "sub"):
        value = int(gold)
        wrong = value + rng.choice([-1, 1]) * 10 ** rng.randrange(len(gold))  # one digit off by one
        return str(wrong) if wrong >= 0 else str(value + 1)
    if ex.task == "count":
        return str(int(gold) + 1 if gold == "0" or rng.random() < 0.5 else int(gold) - 1)
    if ex.task == "reverse":
        return ex.prompt.split("\n", 1)[1]  # the list as given: forgot to reverse it
    if ex.task == "sort":
        numbers = gold.split()
        i = rng.randrange(len(numbers) - 1)
        numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]  # two neighbours swapped
        return " ".join(numbers)
    if ex.task == "date":
        year, month, day = gold.split("-")
        if day != month and int(day) <= 12:
            return f"{year}-{day}-{month}"  # day and month swapped
        return f"{int(year) + 1}-{month}-{day}"  # the year off by one
    return None


def _truncated(ex: Example, rng: Random, others: list[Example]) -> str | None:
    gold = ex.gold
    for separator in (", ", " ", "-"):  # cut a list, a line or a date at an item boundary
        parts = gold.split(separator)
        if len(parts) > 1:
            return separator.join(parts[: max(1, len(parts) // 2)])
    return gold[: len(gold) // 2]  # one word or number: cut in half ("579" -> "5", "7" -> "")


def _repeated(ex: Example, rng: Random, others: list[Example]) -> str | None:
    return f"{ex.gold} {ex.gold}"  # the model loops on its own answer, on the same line


def _off_format(ex: Example, rng: Random, others: list[Example]) -> str | None:
    if ex.task == "reverse":
        return ex.gold.replace(", ", " ")  # the items without their commas
    if ex.task == "sort":
        return ex.gold.replace(" ", ", ")  # commas where the task asks for spaces
    if ex.task == "date":
        year, month, day = ex.gold.split("-")
        return f"{day}/{month}/{year}"
    return f"The answer is: {ex.gold}"  # a sentence where the bare answer was asked for


def _off_topic(ex: Example, rng: Random, others: list[Example]) -> str | None:
    return rng.choice(others).gold  # the answer to another task's question


FAILURES = {"wrong_answer": _wrong_answer, "truncated": _truncated, "repeated": _repeated,
            "off_format": _off_format, "off_topic": _off_topic}


def build_preferences(examples: list[Example]) -> list[Preference]:
    """One pair per example: chosen = gold, rejected = a failure. The modes rotate; a mode that
    does not apply, or does not score lower than the gold, gives way to the next one."""
    by_task = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    pairs = []
    for task, task_examples in by_task.items():
        rng = Random(f"{SEED}:preferences:{task}")
        same_task = task_examples
        other_tasks = [ex for ex in examples if ex.task != task] or task_examples
        for i, ex in enumerate(task_examples):
            for k in range(len(FAILURE_MODES)):
                mode = FAILURE_MODES[(i + k) % len(FAILURE_MODES)]
                rejected = FAILURES[mode](ex, rng, other_tasks if mode == "off_topic" else same_task)
                if rejected is not None and verify(ex, rejected) < verify(ex, ex.gold):
                    pairs.append(Preference(task, ex.prompt, ex.gold, rejected, mode))
                    break
    return pairs


@lru_cache(maxsize=2)
def _cached_preferences(split: str) -> tuple[Preference, ...]:
    return tuple(build_preferences(get_examples(split)))


def get_preferences(split: str, task: str | None = None) -> list[Preference]:
    """Preference pairs of one split (one per example), of every task or of one."""
    _check_split(split, task)
    return [p for p in _cached_preferences(split) if task is None or p.task == task]


# --------------------------------------------------------------------------------------
# JSONL in and out
# --------------------------------------------------------------------------------------


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming file and line otherwise."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _get_str(row: dict, key: str, path, number: int, expected: str, default: str | None = None) -> str:
    if key not in row:
        if default is not None:
            return default
        raise ValueError(f"{path}:{number}: missing key {key!r} (expected {expected})")
    if not isinstance(row[key], str):
        raise ValueError(f"{path}:{number}: {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def load_sft_jsonl(path) -> list[Example]:
    """Read instruction rows: {"task"?, "prompt", "gold"} (what `export` writes) or Alpaca's
    {"instruction", "input"?, "output"} (the input, if any, goes on the line below the instruction).
    Rows without a task get task "user", verified by exact match."""
    examples = []
    for number, row in read_jsonl(path):
        if "instruction" in row:
            expected = '{"instruction", "input", "output"}'
            instruction = _get_str(row, "instruction", path, number, expected)
            extra = _get_str(row, "input", path, number, expected, default="")
            prompt = f"{instruction}\n{extra}" if extra else instruction
            gold = _get_str(row, "output", path, number, expected)
        else:
            expected = '{"prompt", "gold"} or {"instruction", "input", "output"}'
            prompt = _get_str(row, "prompt", path, number, expected)
            gold = _get_str(row, "gold", path, number, expected)
        task = _get_str(row, "task", path, number, "a string", default="user")
        examples.append(Example(task, prompt, gold))
    return examples


ASSISTANT_TURN = "\n\nAssistant:"


def load_preference_jsonl(path) -> list[Preference]:
    """Read preference rows {"prompt", "chosen", "rejected", "task"?, "failure_mode"?}. Anthropic
    HH-RLHF rows, which hold two whole dialogues and no prompt, are split at the last
    "\\n\\nAssistant:" they share: the dialogue up to it is the prompt."""
    expected = '{"prompt", "chosen", "rejected"}'
    pairs = []
    for number, row in read_jsonl(path):
        chosen = _get_str(row, "chosen", path, number, expected)
        rejected = _get_str(row, "rejected", path, number, expected)
        if "prompt" not in row and ASSISTANT_TURN in chosen:
            cut = chosen.rfind(ASSISTANT_TURN) + len(ASSISTANT_TURN)
            if rejected[:cut] == chosen[:cut]:
                row = dict(row, prompt=chosen[:cut], chosen=chosen[cut:].strip(), rejected=rejected[cut:].strip())
        prompt = _get_str(row, "prompt", path, number, expected)
        task = _get_str(row, "task", path, number, "a string", default="user")
        failure_mode = _get_str(row, "failure_mode", path, number, "a string", default="")
        pairs.append(Preference(task, prompt, row["chosen"], row["rejected"], failure_mode))
    return pairs


def export_rows(split: str, kind: str, task: str | None = None) -> list[dict]:
    """The rows `export` writes: SFT rows {task, prompt, gold}; preference rows {task, prompt,
    chosen, rejected, failure_mode}."""
    if kind == "sft":
        return [dict(task=ex.task, prompt=ex.prompt, gold=ex.gold) for ex in get_examples(split, task)]
    if kind == "preference":
        return [dict(task=p.task, prompt=p.prompt, chosen=p.chosen, rejected=p.rejected,
                     failure_mode=p.failure_mode) for p in get_preferences(split, task)]
    raise ValueError(f"kind must be 'sft' or 'preference', got {kind!r}")


def write_jsonl(rows: list[dict], path) -> None:
    """Write one JSON object per line, atomically (a temp file renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _per_task(rows) -> str:
    counts = Counter(row["task"] for row in rows)
    return ", ".join(f"{task} {n}" for task, n in counts.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.tasks", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m shared.tasks list\n  python -m shared.tasks show --task add --n 3\n"
               "  python -m shared.tasks export --split heldout --kind sft --out data/sft_heldout.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the tasks with their sizes")
    show = commands.add_parser("show", help="print a few examples and preference pairs of a task")
    show.add_argument("--task", choices=list(TASKS), required=True)
    show.add_argument("--split", choices=SPLITS, default="train", help="(default: %(default)s)")
    show.add_argument("--n", type=int, default=3, help="how many (default: %(default)s)")
    export = commands.add_parser("export", help="write a split as JSONL (SFT rows or preference pairs)")
    export.add_argument("--split", choices=SPLITS, required=True)
    export.add_argument("--kind", choices=("sft", "preference"), required=True,
                        help="sft: task, prompt, gold; preference: task, prompt, chosen, rejected, failure_mode")
    export.add_argument("--out", required=True, help="the .jsonl file to write")
    export.add_argument("--task", choices=list(TASKS), default=None, help="one task only (default: all)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, task in TASKS.items():
            sizes = "  ".join(f"{split} {len(get_examples(split, name)):5d}" for split in SPLITS)
            print(f"{name:10s} {sizes}  {task.description}")
    elif args.command == "show":
        pairs = get_preferences(args.split, args.task)  # one per example, in the same order
        for ex, pair in list(zip(get_examples(args.split, args.task), pairs))[: args.n]:
            print(json.dumps(dict(prompt=ex.prompt, gold=ex.gold, rejected=pair.rejected,
                                  failure_mode=pair.failure_mode), ensure_ascii=False))
    else:
        rows = export_rows(args.split, args.kind, args.task)
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} {args.kind} rows ({args.split}) to {args.out}: {_per_task(rows)}")


if __name__ == "__main__":
    run_cli(main)
