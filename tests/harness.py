"""The exercise harness every chapter's exercise tests use.

A chapter's test file describes each exercise once: its name, a `check(fn)` that raises
AssertionError (with a helpful message) when `fn` is wrong, and plausible wrong answers the
check must reject. `exercise_tests` turns that into four pytest tests:

- test_solution[exNN]            the reference in solutions.py passes the check
- test_exercise[exNN]            the learner's exercises.py: skipped "not attempted yet" while the
                                 function is still the untouched stub (docstring + raise
                                 NotImplementedError), then pass/fail with the message
- test_check_rejects_wrong[exNN] the check fails each plausible wrong answer (so it *can* fail)
- test_every_exercise_is_checked exercises.py, solutions.py and the cases list agree

Usage, in tests/test_partNN_exercises.py:

    from tests.harness import Exercise, exercise_tests
    from partNN_x import exercises, solutions

    def check_ex01_perplexity(fn):
        assert abs(fn(0.0) - 1.0) < 1e-6, "perplexity of loss 0 should be 1"

    CASES = [Exercise("ex01_perplexity", check_ex01_perplexity, wrong=[lambda loss: 2 ** loss])]
    (test_solution, test_exercise,
     test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)

Two tools for checks: `TorchCalls` forbids calling the library function an exercise asks you to write
(and counts torch calls), `python_lines` counts the Python lines an answer runs, so a check can tell a
vectorised answer from a loop without timing anything. An experiment exercise returns a measured number,
and its check accepts the range the reference measured (with the reasoning for the range beside it).

Run one chapter's exercises with `pytest tests/test_partNN_exercises.py -rs` (-rs lists the skipped ones).
"""
from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, NamedTuple

import pytest
from torch.overrides import TorchFunctionMode


@dataclass
class Exercise:
    name: str  # function name in exercises.py / solutions.py, e.g. "ex01_param_count"
    check: Callable[[Callable], None]  # raises AssertionError with a helpful message if fn is wrong
    wrong: list[Callable] = field(default_factory=list)  # plausible wrong answers check must reject


class ExerciseTests(NamedTuple):
    test_solution: Callable
    test_exercise: Callable
    test_check_rejects_wrong: Callable
    test_every_exercise_is_checked: Callable


def exercise_names(module: ModuleType) -> list[str]:
    """The exercise functions a module defines (ex01_..., ex02_..., in order)."""
    return sorted(
        name
        for name, obj in vars(module).items()
        if name[:2] == "ex" and name[2:4].isdigit() and inspect.isfunction(obj) and obj.__module__ == module.__name__
    )


class TorchCalls(TorchFunctionMode):
    """Watch the torch functions a piece of code calls (tensor methods and indexing included).

        with TorchCalls(forbidden={F.scaled_dot_product_attention: "write attention by hand"}) as calls:
            fn(...)
        calls.count       # how many torch functions ran (calls nested inside one of them are not counted)

    A forbidden function raises AssertionError with its message, so a check fails with a clear reason. The
    message may instead be a function of (args, kwargs) returning a message or None (None: this call is fine),
    to forbid only some uses, e.g. {F.scaled_dot_product_attention: lambda a, kw: kw.get("enable_gqa") and "..."}.
    (To tell a vectorised answer from a Python loop, count lines with python_lines: a loop over a list made
    with .tolist() calls no torch function at all.)
    """

    def __init__(self, forbidden: dict | None = None):
        super().__init__()
        self.forbidden = forbidden or {}
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.forbidden:
            reason = self.forbidden[func]
            reason = reason(args, kwargs or {}) if callable(reason) else reason
            if reason:
                name = getattr(func, "__qualname__", str(func))
                name = f"torch.{func.__name__}" if name.startswith("_") else name  # torch.multinomial, not _Variable...
                raise AssertionError(f"do not call {name} here: {reason}")
        self.count += 1
        return func(*args, **(kwargs or {}))


def python_lines(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """Call fn(*args, **kwargs); return its result and the number of Python lines it ran in its own source
    file (its helpers in that file included, library code not).

    A Python loop over N items runs a number of lines that grows with N, on any machine: a check calls fn
    on a small and a big input and compares the counts, to tell a vectorised answer from a loop without
    timing anything.
    """
    filename = fn.__code__.co_filename
    count = 0

    def count_lines(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return count_lines

    def trace_calls(frame, event, arg):
        return count_lines if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.settrace(previous)
    return result, count


def is_untouched_stub(fn: Callable) -> bool:
    """True while fn is still the stub exercises.py ships: an optional docstring, then only
    `raise NotImplementedError` (with or without a message). Comments do not matter.

    Only this counts as "not attempted". A filled-in answer that raises NotImplementedError from
    something it calls (an unfinished helper, a library) has been attempted, and fails.
    """
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):  # no source to read (built in, made at run time): attempted
        return False
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    body = tree.body[0].body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].cause is not None:
        return False
    exc = body[0].exc
    if isinstance(exc, ast.Call):
        exc = exc.func
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _not_implemented_message(name: str, fn: Callable, exercises: ModuleType, err: NotImplementedError) -> str:
    """Say where a filled-in answer hit a NotImplementedError, and what to do about it."""
    frames = traceback.extract_tb(err.__traceback__)
    last = frames[-1] if frames else None
    stub = getattr(exercises, last.name, None) if last else None
    if stub is not None and last.name != name and is_untouched_stub(stub):
        return (f"{name} calls {exercises.__name__}.{last.name}, which is still a stub (raise NotImplementedError): "
                f"fill in {last.name} first, or write {name} without it.")
    if last is not None and last.name == fn.__code__.co_name:  # code written around a raise that is still there
        return (f"{name} still raises NotImplementedError itself ({last.filename}:{last.lineno}): delete that "
                "line of the stub once your code is in place.")
    where = f" in {last.name} ({last.filename}:{last.lineno})" if last else ""
    return (f"{name} raised NotImplementedError{where}{': ' + str(err) if str(err) else ''}. Your answer is filled "
            f"in, so this is not skipped: something it calls is not implemented (yet) for these inputs.")


def exercise_tests(exercises: ModuleType, solutions: ModuleType, cases: list[Exercise]) -> ExerciseTests:
    by_name = {case.name: case for case in cases}
    ids = [case.name for case in cases]
    parametrize = pytest.mark.parametrize("name", ids)

    @parametrize
    def test_solution(name):
        case = by_name[name]
        case.check(getattr(solutions, name))

    @parametrize
    def test_exercise(name):
        case = by_name[name]
        fn = getattr(exercises, name)
        if is_untouched_stub(fn):  # only the untouched stub is skipped, not any NotImplementedError
            pytest.skip(f"{name}: not attempted yet (fill in {exercises.__name__}.{name})")
        try:
            case.check(fn)
        except NotImplementedError as err:  # raised by something the filled-in answer calls
            pytest.fail(_not_implemented_message(name, fn, exercises, err), pytrace=False)
        except AssertionError as err:
            pytest.fail(f"{name} is not right yet: {err}\nHint: read the docstring of "
                        f"{exercises.__name__}.{name} again.", pytrace=False)

    @parametrize
    def test_check_rejects_wrong(name):
        case = by_name[name]
        assert case.wrong, f"{name}: give at least one plausible wrong answer, to show the check can fail"
        for wrong in case.wrong:
            with pytest.raises(AssertionError):
                case.check(wrong)

    def test_every_exercise_is_checked():
        stubs, refs = exercise_names(exercises), exercise_names(solutions)
        assert stubs, f"{exercises.__name__} defines no exNN_ functions"
        assert stubs == refs, f"exercises.py and solutions.py differ: {stubs} vs {refs}"
        assert sorted(ids) == stubs, f"the tests check {sorted(ids)} but exercises.py has {stubs}"
        numbers = [int(name[2:4]) for name in stubs]
        assert numbers == list(range(1, len(stubs) + 1)), f"number the exercises ex01, ex02, ... without gaps: {stubs}"
        for name in stubs:
            a = inspect.signature(getattr(exercises, name))
            b = inspect.signature(getattr(solutions, name))
            assert a == b, f"{name}: exercise signature {a} differs from solution {b}"
            assert getattr(exercises, name).__doc__, f"{name}: the stub needs a docstring with the task"

    return ExerciseTests(test_solution, test_exercise, test_check_rejects_wrong, test_every_exercise_is_checked)
