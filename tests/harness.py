"""The exercise harness every chapter's exercise tests use.

A chapter's test file describes each exercise once: its name, a `check(fn)` that raises
AssertionError (with a helpful message) when `fn` is wrong, and plausible wrong answers the
check must reject. `exercise_tests` turns that into four pytest tests:

- test_solution[exNN]            the reference in solutions.py passes the check
- test_exercise[exNN]            the learner's exercises.py: skipped "not attempted yet" while the
                                 stub raises NotImplementedError, then pass/fail with the message
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

Run one chapter's exercises with `pytest tests/test_partNN_exercises.py -rs` (-rs lists the skipped ones).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, NamedTuple

import pytest


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
        try:
            case.check(fn)
        except NotImplementedError:
            pytest.skip(f"{name}: not attempted yet (fill in {exercises.__name__}.{name})")
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
        for name in stubs:
            a = inspect.signature(getattr(exercises, name))
            b = inspect.signature(getattr(solutions, name))
            assert a == b, f"{name}: exercise signature {a} differs from solution {b}"
            assert getattr(exercises, name).__doc__, f"{name}: the stub needs a docstring with the task"

    return ExerciseTests(test_solution, test_exercise, test_check_rejects_wrong, test_every_exercise_is_checked)
