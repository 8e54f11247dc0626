"""The exercise harness itself: stub -> skipped, right answer -> pass, wrong answer -> fail."""
import types

import pytest
import torch

from tests.harness import Exercise, TorchCalls, exercise_tests, is_untouched_stub, python_lines


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


def outcome(test, *args) -> tuple[str, str]:
    """Run one generated test and say how it ended, as pytest would report it: passed, skipped or failed."""
    try:
        test(*args)
    except pytest.skip.Exception as err:
        return "skipped", str(err)
    except pytest.fail.Exception as err:
        return "failed", str(err)
    return "passed", ""


def test_stub_is_reported_as_not_attempted():
    with pytest.raises(pytest.skip.Exception, match="not attempted yet"):
        _tests(stub).test_exercise("ex01_square")


def stub_with_message(x):
    """Return x squared."""
    # TODO: your code here
    raise NotImplementedError("fill me in")


def raise_left_in(x):
    """Return x squared."""
    if x > 100:
        return x * x
    raise NotImplementedError


def unfinished_helper(x):
    raise NotImplementedError("complex numbers are not supported on this backend")


def filled_in_calling_unfinished_code(x):
    """Return x squared."""
    return unfinished_helper(x) * x


def ex01_square(x):  # the stub of a two-exercise chapter ...
    """Return x squared."""
    raise NotImplementedError


def ex02_cube(x):  # ... whose second exercise is filled in, and calls the first one
    """Return x cubed."""
    return ex01_square(x) * x


def test_stub_detection():
    assert is_untouched_stub(stub) and is_untouched_stub(stub_with_message)
    assert not is_untouched_stub(right)
    assert not is_untouched_stub(filled_in_calling_unfinished_code)
    assert not is_untouched_stub(unfinished_helper.__call__)  # no source: counts as attempted
    assert not is_untouched_stub(lambda x: x)


def test_stub_with_a_message_and_comments_is_not_attempted():
    status, message = outcome(_tests(stub_with_message).test_exercise, "ex01_square")
    assert status == "skipped" and "not attempted yet" in message, (status, message)


def test_filled_in_answer_raising_not_implemented_fails():
    # Fails on the old harness, which skipped every NotImplementedError as "not attempted yet":
    # a learner whose own code calls something unfinished was told to start, not what broke.
    status, message = outcome(_tests(filled_in_calling_unfinished_code).test_exercise, "ex01_square")
    assert status == "failed", f"a filled-in answer that raises NotImplementedError was {status}: {message}"
    assert "raised NotImplementedError in unfinished_helper" in message, message
    assert "complex numbers are not supported" in message, message


def test_a_raise_left_in_filled_in_code_is_named():
    status, message = outcome(_tests(raise_left_in).test_exercise, "ex01_square")
    assert status == "failed" and "still raises NotImplementedError itself" in message, (status, message)


def test_filled_in_answer_calling_a_stub_names_the_stub():
    exercises = _module("fake_exercises_2", ex01_square=ex01_square, ex02_cube=ex02_cube)
    solutions = _module("fake_solutions_2", ex01_square=right, ex02_cube=lambda x: x**3)
    tests = exercise_tests(exercises, solutions, [
        Exercise("ex01_square", check_square, wrong=[wrong]),
        Exercise("ex02_cube", lambda fn: fn(2), wrong=[]),
    ])
    assert outcome(tests.test_exercise, "ex01_square")[0] == "skipped"
    status, message = outcome(tests.test_exercise, "ex02_cube")
    assert status == "failed", f"ex02 is filled in but was {status}: {message}"
    assert "calls fake_exercises_2.ex01_square, which is still a stub" in message, message


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


def test_numbering_gaps_are_caught():
    exercises = _module("e3", ex01_square=stub, ex03_cube=stub)
    solutions = _module("s3", ex01_square=right, ex03_cube=right)
    tests = exercise_tests(exercises, solutions, [Exercise("ex01_square", check_square, wrong=[wrong]),
                                                  Exercise("ex03_cube", check_square, wrong=[wrong])])
    with pytest.raises(AssertionError, match="without gaps"):
        tests.test_every_exercise_is_checked()


def test_torch_calls_forbids_and_counts():
    with TorchCalls() as calls:
        torch.ones(3).sum()
    assert calls.count == 2  # torch.ones and Tensor.sum
    with pytest.raises(AssertionError, match="do not call torch.softmax here: write it yourself"):
        with TorchCalls(forbidden={torch.softmax: "write it yourself"}):
            torch.softmax(torch.ones(3), dim=0)
    only_dim_0 = {torch.softmax: lambda args, kwargs: kwargs.get("dim") == 0 and "not over dim 0"}
    with TorchCalls(forbidden=only_dim_0):
        torch.softmax(torch.ones(2, 3), dim=1)  # allowed
    with pytest.raises(AssertionError, match="not over dim 0"):
        with TorchCalls(forbidden=only_dim_0):
            torch.softmax(torch.ones(2, 3), dim=0)


def total_by_loop(values):
    total = 0
    for v in values:
        total += v
    return total


def test_python_lines_grow_with_a_loop_only():
    result, small = python_lines(total_by_loop, list(range(10)))
    assert result == 45
    _, big = python_lines(total_by_loop, list(range(100)))
    assert big > 5 * small  # a loop: the lines run grow with the input
    _, vectorised_small = python_lines(lambda t: t.sum(), torch.arange(10))
    _, vectorised_big = python_lines(lambda t: t.sum(), torch.arange(1000))
    assert vectorised_small == vectorised_big
