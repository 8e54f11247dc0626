"""The exercise harness itself: stub -> skipped, right answer -> pass, wrong answer -> fail."""
import types

import pytest

from tests.harness import Exercise, exercise_tests


def _module(name, **functions):
    module = types.ModuleType(name)
    for fn_name, fn in functions.items():
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn_name)  # each module owns its copy
        copy.__module__, copy.__doc__ = name, fn.__doc__
        setattr(module, fn_name, copy)
    return module


def stub(x):
    """Return x squared."""
    raise NotImplementedError


def right(x):
    """Return x squared."""
    return x * x


def wrong(x):
    """Return x squared."""
    return 2 * x


def check_square(fn):
    assert fn(3) == 9, f"square(3) should be 9, got {fn(3)}"


def _tests(learner):
    exercises = _module("fake_exercises", ex01_square=learner)
    solutions = _module("fake_solutions", ex01_square=right)
    return exercise_tests(exercises, solutions, [Exercise("ex01_square", check_square, wrong=[wrong])])


def test_stub_is_reported_as_not_attempted():
    with pytest.raises(pytest.skip.Exception, match="not attempted yet"):
        _tests(stub).test_exercise("ex01_square")


def test_right_answer_passes():
    tests = _tests(right)
    tests.test_exercise("ex01_square")
    tests.test_solution("ex01_square")
    tests.test_check_rejects_wrong("ex01_square")
    tests.test_every_exercise_is_checked()


def test_wrong_answer_fails_with_the_check_message():
    with pytest.raises(pytest.fail.Exception, match="should be 9, got 6"):
        _tests(wrong).test_exercise("ex01_square")


def test_a_check_that_cannot_fail_is_caught():
    lenient = Exercise("ex01_square", lambda fn: None, wrong=[wrong])
    tests = exercise_tests(_module("e", ex01_square=stub), _module("s", ex01_square=right), [lenient])
    with pytest.raises(pytest.fail.Exception):  # pytest.raises(AssertionError) reports "DID NOT RAISE"
        tests.test_check_rejects_wrong("ex01_square")


def test_unchecked_exercise_is_caught():
    exercises = _module("e2", ex01_square=stub, ex02_cube=stub)
    solutions = _module("s2", ex01_square=right, ex02_cube=right)
    tests = exercise_tests(exercises, solutions, [Exercise("ex01_square", check_square, wrong=[wrong])])
    with pytest.raises(AssertionError, match="ex02_cube"):
        tests.test_every_exercise_is_checked()
