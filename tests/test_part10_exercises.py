"""Part 10 exercises: each check compares against an outside reference and rejects plausible slips."""
import copy
import math
import re
import statistics
from collections import Counter

import geoopt
import numpy as np
import torch

from part10_semantic import exercises, solutions
from tests.harness import Exercise, exercise_tests

BALL = geoopt.PoincareBall()  # curvature -1, the ball of the lesson


def _r(t, digits: int = 4) -> list:
    """A tensor as (nested) lists of rounded numbers, for messages."""
    return torch.round(torch.as_tensor(t).double(), decimals=digits).tolist()


def ball_points(shape: tuple, generator: torch.Generator, max_norm: float = 0.95) -> torch.Tensor:
    """Points (float64) with norms spread over [0, max_norm) and uniform directions; shape (..., d)."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    radius = torch.rand(*shape[:-1], 1, generator=generator, dtype=torch.float64) * max_norm
    return x / x.norm(dim=-1, keepdim=True) * radius


def _tensor_of_shape(got, shape: tuple, what: str) -> torch.Tensor:
    assert torch.is_tensor(got), f"{what}: return a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(shape), (
        f"{what}: the result should have shape {tuple(shape)}, got {tuple(got.shape)}")
    return got


# --- ex01: the Poincaré distance -----------------------------------------------------------------------------------


def check_ex01_poincare_distance(fn):
    origin, x = torch.zeros(2, dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64)
    got = _tensor_of_shape(fn(origin, x), (), "two points of shape (2,)")
    assert abs(got.item() - math.log(3)) < 1e-9, (
        f"d(0, (0.5, 0)) = arcosh(1 + 2 * 0.25 / (1 * 0.75)) = arcosh(5/3) = 2 artanh 0.5 = ln 3 = 1.098612; "
        f"got {got.item():.6f}")
    g = torch.Generator().manual_seed(0)
    u, v = ball_points((300, 5), g), ball_points((300, 5), g)
    got = _tensor_of_shape(fn(u, v), (300,), "u, v of shape (300, 5)")
    want = BALL.dist(u, v)
    worst = (got - want).abs().max().item()
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-9), (
        f"300 random pairs in the 5-D ball: geoopt's PoincareBall().dist differs from yours by up to {worst:.3g}")
    # From the origin: 2 artanh |x|, the closed form (the ball's radius, in hyperbolic units)
    got = fn(torch.zeros_like(u), u)
    want = 2 * torch.atanh(u.norm(dim=-1))
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (
        f"from the origin d(0, x) = 2 artanh |x|; yours differs by up to {(got - want).abs().max():.3g}")
    # Broadcasting: (6, 1, 3) against (1, 4, 3) -> every pair, (6, 4)
    a, b = ball_points((6, 1, 3), g), ball_points((1, 4, 3), g)
    got = _tensor_of_shape(fn(a, b), (6, 4), "u (6, 1, 3) against v (1, 4, 3)")
    assert torch.allclose(got, BALL.dist(a, b), rtol=1e-7, atol=1e-9), (
        "u (6, 1, 3) against v (1, 4, 3): the (6, 4) distances differ from geoopt's: reduce over the last "
        "dimension only")


def _dist_no_factor_two(u, v):
    denom = (1 - u.pow(2).sum(-1)) * (1 - v.pow(2).sum(-1))
    return torch.acosh(1 + (u - v).pow(2).sum(-1) / denom)


def _dist_no_denominator(u, v):  # a function of the Euclidean distance alone
    return torch.acosh(1 + 2 * (u - v).pow(2).sum(-1))


def _dist_not_squared(u, v):
    denom = (1 - u.pow(2).sum(-1)) * (1 - v.pow(2).sum(-1))
    return torch.acosh(1 + 2 * (u - v).norm(dim=-1) / denom)


# --- ex02: Möbius addition -----------------------------------------------------------------------------------------


def check_ex02_mobius_add(fn):
    x, y = torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    got = _tensor_of_shape(fn(x, y), (2,), "x, y of shape (2,)")
    want = torch.tensor([0.625 / 1.0625, 0.375 / 1.0625], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-9), (
        f"(0.5, 0) ⊕ (0, 0.5): <x, y> = 0, |x|^2 = |y|^2 = 0.25, so ((1 + 0.25) x + (1 - 0.25) y) / (1 + 0.0625) "
        f"= {_r(want, 6)}; got {_r(got, 6)}")
    g = torch.Generator().manual_seed(1)
    x, y = ball_points((200, 4), g), ball_points((200, 4), g)
    got = _tensor_of_shape(fn(x, y), (200, 4), "x, y of shape (200, 4)")
    want = BALL.mobius_add(x, y, project=False)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (
        f"200 random pairs in the 4-D ball: geoopt's PoincareBall().mobius_add differs from yours by up to "
        f"{(got - want).abs().max():.3g} (x ⊕ y is not y ⊕ x: mind which one is which)")
    zero = torch.zeros_like(x)
    for what, got, want in (("0 ⊕ y = y", fn(zero, y), y), ("x ⊕ 0 = x", fn(x, zero), x),
                            ("x ⊕ (-x) = 0", fn(x, -x), zero),
                            ("the left cancellation law (-x) ⊕ (x ⊕ y) = y", fn(-x, fn(x, y)), y)):
        assert torch.allclose(got, want, atol=1e-9), f"{what} fails: off by up to {(got - want).abs().max():.3g}"
    # Near the boundary the sum stays inside the ball (plain + would not)
    x, y = ball_points((200, 3), g, max_norm=0.999), ball_points((200, 3), g, max_norm=0.999)
    norms = fn(x, y).norm(dim=-1)
    assert (norms < 1).all(), f"x ⊕ y must stay inside the unit ball; a norm reached {norms.max():.4f}"
    a, b = ball_points((5, 1, 3), g), ball_points((1, 4, 3), g)
    got = _tensor_of_shape(fn(a, b), (5, 4, 3), "x (5, 1, 3) with y (1, 4, 3)")
    assert torch.allclose(got, BALL.mobius_add(a, b, project=False), atol=1e-9), (
        "x (5, 1, 3) with y (1, 4, 3): the broadcast result differs from geoopt's (keepdim=True on the sums)")


def _mobius_plain_sum(x, y):
    return x + y


def _mobius_norms_swapped(x, y):  # |x|^2 and |y|^2 traded places in the numerator
    xy = (x * y).sum(-1, keepdim=True)
    xx, yy = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    return ((1 + 2 * xy + xx) * x + (1 - yy) * y) / (1 + 2 * xy + xx * yy)


def _mobius_sign_flipped(x, y):
    xy = (x * y).sum(-1, keepdim=True)
    xx, yy = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    return ((1 - 2 * xy + yy) * x + (1 - xx) * y) / (1 - 2 * xy + xx * yy)


def _mobius_commuted(x, y):  # y ⊕ x
    return solutions.ex02_mobius_add(y, x)


# --- ex03: the Riemannian gradient ---------------------------------------------------------------------------------


def check_ex03_riemannian_grad(fn):
    grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    got = _tensor_of_shape(fn(torch.zeros(2, dtype=torch.float64), grad), (2,), "x, grad of shape (2,)")
    assert torch.allclose(got, grad / 4, atol=1e-12), (
        f"at the origin (1 - 0)^2 / 4 = 1/4: the gradient (1, -2) becomes (0.25, -0.5); got {_r(got, 6)}")
    got = fn(torch.tensor([0.6, 0.0], dtype=torch.float64), grad)
    want = torch.tensor([0.1024, -0.2048], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12), (
        f"x = (0.6, 0): |x|^2 = 0.36, (1 - 0.36)^2 / 4 = 0.1024, so (1, -2) becomes (0.1024, -0.2048); "
        f"got {_r(got, 6)}")
    g = torch.Generator().manual_seed(2)
    x = ball_points((50, 3), g, max_norm=0.99)
    grad = torch.randn(50, 3, generator=g, dtype=torch.float64)
    got = _tensor_of_shape(fn(x, grad), (50, 3), "x, grad of shape (50, 3)")
    want = BALL.egrad2rgrad(x, grad)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (
        f"50 points: geoopt's PoincareBall().egrad2rgrad differs from yours by up to {(got - want).abs().max():.3g}"
        " (one factor per point: |x|^2 over the last dimension of that point)")
    x, grad = ball_points((2, 5, 3), g), torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    got = _tensor_of_shape(fn(x, grad), (2, 5, 3), "x, grad of shape (2, 5, 3)")
    assert torch.allclose(got, BALL.egrad2rgrad(x, grad), rtol=1e-9, atol=1e-12), (
        "x, grad (2, 5, 3): differs from geoopt's egrad2rgrad: one factor for each of the 2 x 5 points")


def _rgrad_no_square(x, euclidean_grad):
    return (1 - x.pow(2).sum(-1, keepdim=True)) / 4 * euclidean_grad


def _rgrad_no_quarter(x, euclidean_grad):
    return (1 - x.pow(2).sum(-1, keepdim=True)).pow(2) * euclidean_grad


def _rgrad_norm_not_squared(x, euclidean_grad):
    return (1 - x.norm(dim=-1, keepdim=True)).pow(2) / 4 * euclidean_grad


def _rgrad_one_factor(x, euclidean_grad):  # the squared norm of the whole batch
    return (1 - x.pow(2).sum()).pow(2) / 4 * euclidean_grad


# --- ex04: one BoundlessBPE supermerge -----------------------------------------------------------------------------

# Letter-only, by a regular expression instead of str methods: at least one letter ([^\W\d_] is a letter in
# Python's re), otherwise letters, spaces, underscores and apostrophes (boundless_bpe.SUPERWORD_PATTERN's rule).
LETTER_ONLY = re.compile(r"(?=.*[^\W\d_])(?:[^\W\d_]|[ _'\u2019])+")


def supermerge_by_brute_force(corpus, counts):
    """Write every sequence out as often as it occurs, count the adjacent whole letter-only pre-tokens one
    occurrence at a time, sort the best pairs, then merge with a skip flag."""
    tally = Counter()
    for sequence, count in zip(corpus, counts):
        for _ in range(count):
            for i in range(len(sequence) - 1):
                a, b = sequence[i], sequence[i + 1]
                if len(a) == 1 and len(b) == 1 and LETTER_ONLY.fullmatch(a[0]) and LETTER_ONLY.fullmatch(b[0]):
                    tally[(a[0], b[0])] += 1
    if not tally:
        return None, [list(s) for s in corpus]
    top = max(tally.values())
    pair = sorted(p for p, n in tally.items() if n == top)[0]
    merged = []
    for sequence in corpus:
        out, skip = [], False
        for i, unit in enumerate(sequence):
            if skip:
                skip = False
                continue
            nxt = sequence[i + 1] if i + 1 < len(sequence) else None
            if unit == (pair[0],) and nxt == (pair[1],):
                out.append((pair[0] + pair[1],))
                skip = True
            else:
                out.append(unit)
        merged.append(out)
    return pair, merged


def _supermerge_result(got, what: str):
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: return a tuple (pair, new_corpus), got {got!r}"
    pair, corpus = got
    assert pair is None or (isinstance(pair, tuple) and len(pair) == 2), (
        f"{what}: the pair should be a tuple (left token, right token) or None, got {pair!r}")
    assert isinstance(corpus, list), f"{what}: new_corpus should be a list of sequences, got {type(corpus).__name__}"
    return pair, [[tuple(unit) for unit in sequence] for sequence in corpus]


def _check_supermerge(fn, corpus, counts, want_pair, want_corpus, why: str):
    before = copy.deepcopy((corpus, counts))
    pair, got = _supermerge_result(fn(corpus, counts), why)
    assert (corpus, counts) == before, f"{why}: your function changed its input: build new lists and tuples"
    assert pair == want_pair, f"{why}: the pair to merge is {want_pair!r}, got {pair!r}"
    assert got == want_corpus, f"{why}: after merging {want_pair!r} the corpus is\n  {want_corpus!r}\ngot\n  {got!r}"


# Pre-tokens as a BPE run at some step has them: the same string always has the same tokens.
VOCAB = [(" the",), (" of",), (" king",), (" qu", "een"), ("I",), (" my",), (",",), (" .",), ("12",), ("'s",),
         ("don",), ("'t",), (" ",), ("\n",), (" lo", "rd"), (" la",), (" caf\u00e9",), (" _x",), ("_",), (" of the",)]


def check_ex04_supermerge_step(fn):
    # The docstring's example
    corpus = [[(" of",), (" the",), (" king",)], [(" of",), (" the",), (",",)], [(" the",), (" qu", "een")]]
    _check_supermerge(fn, corpus, [3, 2, 4], (" of", " the"),
                      [[(" of the",), (" king",)], [(" of the",), (",",)], [(" the",), (" qu", "een")]],
                      "the docstring's example (counts 3, 2, 4: (' of', ' the') 5 times, (' the', ' king') 3)")
    # Counts weigh: (' of', ' the') occurs in one sequence only, 10 times
    corpus = [[(" of",), (" the",)], [(" the",), (" king",)], [(" the",), (" king",), (" of",)]]
    _check_supermerge(fn, corpus, [10, 1, 1], (" of", " the"),
                      [[(" of the",)], [(" the",), (" king",)], [(" the",), (" king",), (" of",)]],
                      "sequences counted 10, 1 and 1: (' of', ' the') occurs 10 times, (' the', ' king') twice")
    # Only whole pre-tokens: " queen" is still (" qu", "een")
    corpus = [[(" my",), (" qu", "een")], [(" good",), (" my",)]]
    _check_supermerge(fn, corpus, [10, 3], (" good", " my"), [[(" my",), (" qu", "een")], [(" good my",)]],
                      "(' my', (' qu', 'een')) occurs 10 times, but ' queen' is not one token yet")
    # Only letter-only pre-tokens: no digits, punctuation, lone spaces or newlines; apostrophes and _ are fine
    corpus = [[("12",), ("34",)], [(" so",), (" .",)], [(" ",), (" so",)], [("\n",), ("I",)], [("don",), ("'t",)],
              [(" so",), (" be",)]]
    _check_supermerge(fn, corpus, [10, 10, 10, 10, 3, 2], ("don", "'t"),
                      [[("12",), ("34",)], [(" so",), (" .",)], [(" ",), (" so",)], [("\n",), ("I",)], [("don't",)],
                       [(" so",), (" be",)]],
                      "digits ('12'), punctuation (' .'), a lone space (' ') and a newline never join (no letter); "
                      "'don' + \"'t\" (3 times) beats (' so', ' be') (twice)")
    # A tie: the smallest (left, right) pair, not the first one seen
    corpus = [[(" b",), (" c",)], [(" a",), (" z",)], [(" b",), (" a",)]]
    _check_supermerge(fn, corpus, [2, 2, 1], (" a", " z"),
                      [[(" b",), (" c",)], [(" a z",)], [(" b",), (" a",)]],
                      "(' b', ' c') and (' a', ' z') both occur twice: the smaller tuple (' a', ' z') wins the tie")
    # Overlaps: three " la" hold the pair twice, and merge left to right; the superword then joins again
    corpus = [[(" la",), (" la",), (" la",)], [(" la",), (" di",)]]
    _check_supermerge(fn, corpus, [1, 1], (" la", " la"), [[(" la la",), (" la",)], [(" la",), (" di",)]],
                      "[' la', ' la', ' la'] counts (' la', ' la') twice and merges it once, from the left")
    _check_supermerge(fn, [[(" la la",), (" la",)], [(" la",), (" di",)]], [2, 1], (" la la", " la"),
                      [[(" la la la",)], [(" la",), (" di",)]],
                      "a superword is one letter-only token: (' la la', ' la') may join (2 times)")
    # Nothing to merge
    corpus = [[("12",), ("34",)], [(" qu", "een"), (" of",)], [(" the",)]]
    _check_supermerge(fn, corpus, [5, 5, 5], None, [[("12",), ("34",)], [(" qu", "een"), (" of",)], [(" the",)]],
                      "no two adjacent whole letter-only pre-tokens: return (None, a copy of the corpus)")
    # Random corpora, three steps in a row each, against writing every sequence out count times
    g = torch.Generator().manual_seed(3)
    for trial in range(25):
        n = int(torch.randint(1, 25, (1,), generator=g))
        corpus = [[VOCAB[int(i)] for i in torch.randint(len(VOCAB), (int(torch.randint(1, 7, (1,), generator=g)),),
                                                        generator=g)] for _ in range(n)]
        counts = torch.randint(1, 6, (n,), generator=g).tolist()
        for step in range(3):
            want_pair, want = supermerge_by_brute_force(corpus, counts)
            pair, got = _supermerge_result(fn(copy.deepcopy(corpus), list(counts)), f"random corpus {trial}")
            assert (pair, got) == (want_pair, want), (
                f"random corpus {trial}, step {step + 1}:\n  corpus {corpus!r}\n  counts {counts}\n"
                f"counting every occurrence one by one gives the pair {want_pair!r} and the corpus\n  {want!r}\n"
                f"got {pair!r} and\n  {got!r}")
            corpus = want


def _super_not_whole(corpus, counts):  # judges the pre-token's text, not whether it is one token yet
    flat = [[("".join(unit),) for unit in sequence] for sequence in corpus]
    return solutions.ex04_supermerge_step(flat, counts)


def _supermerge_judged_by(ok, corpus, counts):
    """The step with another rule for which pre-tokens may join (counts, tie-break and merge as they should be)."""
    tally = Counter()
    for sequence, count in zip(corpus, counts):
        for a, b in zip(sequence, sequence[1:]):
            if ok(a) and ok(b):
                tally[(a[0], b[0])] += count
    if not tally:
        return None, [list(s) for s in corpus]
    pair = min(tally, key=lambda p: (-tally[p], p))
    return pair, supermerge_by_brute_force_merge(corpus, pair)


def _super_any_single_token(corpus, counts):  # digits and punctuation join too
    return _supermerge_judged_by(lambda unit: len(unit) == 1, corpus, counts)


def _super_no_letter_required(corpus, counts):  # " " (spaces only) counts as letter-only
    return _supermerge_judged_by(lambda unit: len(unit) == 1 and all(ch.isalpha() or ch in " _'\u2019"
                                                                     for ch in unit[0]), corpus, counts)


def supermerge_by_brute_force_merge(corpus, pair):
    out = []
    for sequence in corpus:
        new, i = [], 0
        while i < len(sequence):
            if sequence[i : i + 2] == [(pair[0],), (pair[1],)]:
                new.append((pair[0] + pair[1],))
                i += 2
            else:
                new.append(sequence[i])
                i += 1
        out.append(new)
    return out


def _super_ignores_counts(corpus, counts):
    return solutions.ex04_supermerge_step(corpus, [1] * len(corpus))


def _super_first_seen_tie(corpus, counts):  # max(dict, key=dict.get): the first pair seen wins a tie
    tally = {}
    for sequence, count in zip(corpus, counts):
        for a, b in zip(sequence, sequence[1:]):
            if solutions._can_join(a) and solutions._can_join(b):
                tally[(a[0], b[0])] = tally.get((a[0], b[0]), 0) + count
    if not tally:
        return None, [list(s) for s in corpus]
    pair = max(tally, key=tally.get)
    return pair, supermerge_by_brute_force_merge(corpus, pair)


def _super_right_to_left(corpus, counts):  # overlapping occurrences merged from the right
    pair, _ = solutions.ex04_supermerge_step(corpus, counts)
    if pair is None:
        return None, [list(s) for s in corpus]
    reversed_corpus = [list(reversed(s)) for s in corpus]
    merged = supermerge_by_brute_force_merge(reversed_corpus, (pair[1], pair[0]))
    merged = [[(pair[0] + pair[1],) if u == (pair[1] + pair[0],) else u for u in reversed(s)] for s in merged]
    return pair, merged


def _super_in_place(corpus, counts):  # right answer, but the caller's corpus is changed
    pair, merged = solutions.ex04_supermerge_step(corpus, counts)
    corpus[:] = merged
    return pair, corpus


# --- ex05: entropy patching ----------------------------------------------------------------------------------------


def patch_starts_by_loop(row: list[float], threshold: float, monotonic: bool) -> list[bool]:
    starts = []
    for t, h in enumerate(row):
        if t == 0:
            starts.append(True)
        elif monotonic:
            starts.append(h - row[t - 1] > threshold)
        else:
            starts.append(h > threshold)
    return starts


def _starts(got, shape, what: str) -> list:
    _tensor_of_shape(got, shape, what)
    assert got.dtype == torch.bool, f"{what}: return a bool tensor (True where a patch starts), got {got.dtype}"
    return got.tolist()


def check_ex05_entropy_patch_starts(fn):
    H = torch.tensor([2.0, 0.5, 3.0, 2.0, 1.0, 2.5])
    T, F = True, False
    hand = [(H, 2.0, False, [T, F, T, F, F, T], "global threshold 2.0 (H_3 = 2.0 equals it: no start)"),
            (H, 1.0, True, [T, F, T, F, F, T], "monotonic, threshold 1.0 (differences -1.5, 2.5, -1, -1, 1.5)"),
            (torch.tensor([0.5, 1.0, 1.5, 2.5, 2.5, 0.0]), 1.0, True, [T, F, F, F, F, F],
             "monotonic, threshold 1.0: differences 0.5, 0.5, 1.0, 0, -2.5; the jump of exactly 1.0 does not count"),
            (torch.tensor([0.5, 0.5, 0.5]), 1.0, False, [T, F, F], "all below the threshold: one patch, from 0"),
            (torch.tensor([3.0, 3.0, 3.0, 3.0]), 1.0, False, [T, T, T, T], "global: high entropy, every byte starts"),
            (torch.tensor([3.0, 3.0, 3.0, 3.0]), 1.0, True, [T, F, F, F], "monotonic: flat high entropy, one patch"),
            (torch.tensor([4.0, 0.0, 3.0]), 2.0, True, [T, F, T],
             "monotonic: the drop 4 -> 0 (-4) is no start, the rise 0 -> 3 is"),
            (torch.tensor([0.7]), 0.5, False, [T], "a single byte")]
    for entropies, threshold, monotonic, want, why in hand:
        got = _starts(fn(entropies.clone(), threshold, monotonic=monotonic), entropies.shape, why)
        assert got == want, f"entropies {entropies.tolist()}: {why}: starts {want}, got {got}"
    # Random rows in a batch (B, T): each row on its own, against a loop
    g = torch.Generator().manual_seed(4)
    # rounded, so that some values and differences equal the threshold; float64, so that the loop's differences
    # (Python floats) are the same numbers as a tensor's
    entropies = (torch.rand(3, 40, generator=g, dtype=torch.float64) * 4).round(decimals=1)
    for monotonic, threshold in ((False, 2.0), (True, 0.5), (True, 0.0), (False, 0.0)):
        got = _starts(fn(entropies.clone(), threshold, monotonic=monotonic), (3, 40), "a batch (3, 40)")
        want = [patch_starts_by_loop(row, threshold, monotonic) for row in entropies.tolist()]
        for b in range(3):
            bad = [t for t in range(40) if got[b][t] != want[b][t]]
            assert not bad, (
                f"batch row {b}, threshold {threshold}, monotonic={monotonic}: a loop over the row disagrees at "
                f"positions {bad} (entropies there {[round(entropies[b, t].item(), 2) for t in bad]}, previous "
                f"{[round(entropies[b, t - 1].item(), 2) if t else None for t in bad]}); "
                f"yours {[got[b][t] for t in bad]}")


def _patch_greater_equal(entropies, threshold, monotonic=False):
    score = entropies[..., 1:] - entropies[..., :-1] if monotonic else entropies[..., 1:]
    return torch.cat((torch.ones_like(entropies[..., :1], dtype=torch.bool), score >= threshold), dim=-1)


def _patch_no_forced_start(entropies, threshold, monotonic=False):
    if monotonic:
        first = torch.zeros_like(entropies[..., :1], dtype=torch.bool)
        return torch.cat((first, entropies[..., 1:] - entropies[..., :-1] > threshold), dim=-1)
    return entropies > threshold


def _patch_one_late(entropies, threshold, monotonic=False):  # the byte after the surprising one is marked
    starts = solutions.ex05_entropy_patch_starts(entropies, threshold, monotonic)
    return torch.cat((starts[..., :1], starts[..., :-1]), dim=-1)


def _patch_flattened(entropies, threshold, monotonic=False):  # one long row: differences across the rows
    return solutions.ex05_entropy_patch_starts(entropies.reshape(-1), threshold, monotonic).view(entropies.shape)


def _patch_absolute_change(entropies, threshold, monotonic=False):  # |H_t - H_{t-1}|: a drop starts one too
    if not monotonic:
        return solutions.ex05_entropy_patch_starts(entropies, threshold)
    change = (entropies[..., 1:] - entropies[..., :-1]).abs() > threshold
    return torch.cat((torch.ones_like(entropies[..., :1], dtype=torch.bool), change), dim=-1)


# --- ex06: bits per byte -------------------------------------------------------------------------------------------


def check_ex06_bits_per_byte(fn):
    hand = [((1.5, 1000, 3000), 1.5 * 1000 / math.log(2) / 3000,
             "1.5 nats/token x 1000 tokens = 1500 nats = 2164.0 bits, over 3000 bytes: 0.7213"),
            ((math.log(256), 500, 500), 8.0, "uniform over the 256 bytes, one token per byte: 8 bits/byte"),
            ((math.log(2), 100, 100), 1.0, "ln 2 nats = 1 bit per token, one token per byte: 1 bit/byte"),
            ((2.0, 250, 1000), 2.0 * 250 / math.log(2) / 1000,
             "2 nats/token, 4 bytes per token: 2 / ln 2 / 4 = 0.7213 bits/byte"),
            ((0.0, 10, 40), 0.0, "a perfect model: 0 bits/byte")]
    for args, want, why in hand:
        got = fn(*args)
        assert isinstance(got, float), f"return a Python float, got {type(got).__name__}"
        assert abs(got - want) < 1e-9, (
            f"loss {args[0]:.4f} nats/token, {args[1]} tokens, {args[2]} bytes: {why}; got {got:.6f}")
    # A byte-level model: bits/byte = log2(perplexity), whatever the loss
    for loss in (0.3, 1.1, 2.7):
        got = fn(loss, 1234, 1234)
        assert abs(got - math.log2(math.exp(loss))) < 1e-9, (
            f"a byte-level model (tokens = bytes) with loss {loss} nats: bits/byte = log2(perplexity) = "
            f"log2(e^{loss}) = {math.log2(math.exp(loss)):.6f}; got {got:.6f}")


def _bpb_is_bits_per_token(loss_nats_per_token, n_tokens, n_bytes):
    return loss_nats_per_token / math.log(2)


def _bpb_is_nats_per_byte(loss_nats_per_token, n_tokens, n_bytes):
    return loss_nats_per_token * n_tokens / n_bytes


def _bpb_times_ln2(loss_nats_per_token, n_tokens, n_bytes):
    return loss_nats_per_token * n_tokens * math.log(2) / n_bytes


def _bpb_bytes_per_token(loss_nats_per_token, n_tokens, n_bytes):
    return loss_nats_per_token * n_bytes / math.log(2) / n_tokens


# --- ex07: the context gate ----------------------------------------------------------------------------------------


def gated_query_by_loop(q, c, U, v1, v2) -> torch.Tensor:
    """Position by position in Python floats: c_hat = c U, lambda = 1 / (1 + e^-(q.v1 + c_hat.v2))."""
    B, n, d = q.shape
    out = torch.zeros(B, n, d, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            ci = c[b, i if c.shape[1] > 1 else 0].tolist()
            c_hat = [sum(ci[k] * U[k, j].item() for k in range(len(ci))) for j in range(d)]
            logit = sum(q[b, i, j].item() * v1[j].item() + c_hat[j] * v2[j].item() for j in range(d))
            lam = 1 / (1 + math.exp(-logit))
            for j in range(d):
                out[b, i, j] = (1 - lam) * q[b, i, j].item() + lam * c_hat[j]
    return out


def check_ex07_context_gated_query(fn):
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # Random, context of the same width as the queries (d_c = d = 4)
    q, c, U, v1, v2 = randn(2, 5, 4), randn(2, 5, 4), randn(4, 4), randn(4), randn(4)
    got = _tensor_of_shape(fn(q, c, U, v1, v2), (2, 5, 4), "q (2, 5, 4), c (2, 5, 4), U (4, 4)")
    want = gated_query_by_loop(q, c, U, v1, v2)
    assert torch.allclose(got, want, atol=1e-9), (
        f"q (2, 5, 4), c (2, 5, 4): a loop over the positions (c_hat = c U, lambda = sigmoid(q.v1 + c_hat.v2), "
        f"(1 - lambda) q + lambda c_hat) differs from yours by up to {(got - want).abs().max():.3g}")
    # By hand: U the identity, v1 = v2 = 0: lambda = 1/2 everywhere, the mean of q and c
    q, c = randn(1, 3, 4), randn(1, 3, 4)
    zero = torch.zeros(4, dtype=torch.float64)
    got = fn(q, c, torch.eye(4, dtype=torch.float64), zero, zero)
    assert torch.allclose(got, (q + c) / 2, atol=1e-12), (
        "U = identity, v1 = v2 = 0: lambda = sigmoid(0) = 0.5, so q_hat = (q + c) / 2; yours differs by "
        f"{(got - (q + c) / 2).abs().max():.3g}")
    # A gate pushed to 1 by the context: q_hat -> c U
    U = randn(4, 4)
    c_hat = c @ U
    v2 = 50 * c_hat[0, 0] / c_hat[0, 0].norm() ** 2  # c_hat_0 . v2 = 50 at position 0
    got = fn(q[:, :1], c[:, :1], U, zero, v2)
    assert torch.allclose(got, c_hat[:, :1], atol=1e-9), (
        "v1 = 0 and c_hat . v2 = 50: lambda = sigmoid(50) = 1 (to 1e-21), so q_hat = c_hat = c U; got "
        f"{_r(got)} against c U = {_r(c_hat[:, :1])}")
    # Context of another width (d_c = 3), and one global context row (B, 1, d_c) for all positions
    for c_shape in ((2, 6, 3), (2, 1, 3)):
        q, c, U, v1, v2 = randn(2, 6, 4), randn(*c_shape), randn(3, 4), randn(4), randn(4)
        got = _tensor_of_shape(fn(q, c, U, v1, v2), (2, 6, 4), f"q (2, 6, 4), c {c_shape}, U (3, 4)")
        want = gated_query_by_loop(q, c, U, v1, v2)
        assert torch.allclose(got, want, atol=1e-9), (
            f"q (2, 6, 4), c {c_shape}, U (3, 4): the loop differs from yours by up to {(got - want).abs().max():.3g}")


def _gate_swapped(q, c, U, v1, v2):
    c_hat = c @ U
    gate = torch.sigmoid(q @ v1 + c_hat @ v2)[..., None]
    return gate * q + (1 - gate) * c_hat


def _gate_no_sigmoid(q, c, U, v1, v2):
    c_hat = c @ U
    gate = (q @ v1 + c_hat @ v2)[..., None]
    return (1 - gate) * q + gate * c_hat


def _gate_per_channel(q, c, U, v1, v2):
    c_hat = c @ U
    gate = torch.sigmoid(q * v1 + c_hat * v2)
    return (1 - gate) * q + gate * c_hat


def _gate_mixes_raw_context(q, c, U, v1, v2):  # c where c_hat belongs
    c_hat = c @ U
    gate = torch.sigmoid(q @ v1 + c_hat @ v2)[..., None]
    return (1 - gate) * q + gate * c


# --- ex08: contrastive accuracy ------------------------------------------------------------------------------------


def contrastive_accuracy_by_loop(pred, target) -> float:
    P, Tg = pred.tolist(), target.tolist()
    n = len(P)
    total = 0.0
    for i in range(n):
        own = math.dist(P[i], Tg[i])
        total += sum(math.dist(P[i], Tg[j]) > own for j in range(n) if j != i) / (n - 1)
    return total / n


def check_ex08_contrastive_accuracy(fn):
    pred = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    got = fn(pred.clone(), target.clone())
    assert isinstance(got, float), f"return a Python float, got {type(got).__name__}"
    assert abs(got - 2 / 3) < 1e-9, (
        "pred [(0, 0), (0, 2), (2, 0)], target [(1, 0), (0, 1), (3, 0)]: from pred 0 the other targets are at 1 (a "
        "tie: not farther) and 3 -> 1/2; pred 1: sqrt 5 and sqrt 13, both farther than 1 -> 1; pred 2: 1 (a tie) "
        f"and sqrt 5 -> 1/2; the mean is 2/3; got {got:.6f}")
    # l2, not cosine: target 1 = (5, 0) points the same way as pred 0 = (1, 0) but is 4 away, target 0 only 1
    pred, target = torch.tensor([[1.0, 0.0], [5.0, 1.0]]), torch.tensor([[1.0, 1.0], [5.0, 0.0]])
    got = fn(pred, target)
    assert abs(got - 1.0) < 1e-9, (
        "pred [(1, 0), (5, 1)], target [(1, 1), (5, 0)]: each prediction is 1 from its own target and 4 from the "
        "other, so the contrastive accuracy is 1 (in l2 distance; cosine similarity would rank them otherwise); "
        f"got {got:.6f}")
    # Random batches against a loop over every pair (math.dist): predictions near their targets, and unrelated ones
    g = torch.Generator().manual_seed(6)
    for n, d, noise in ((12, 5, 1.0), (7, 3, 0.3), (20, 8, 3.0), (2, 4, 1.0), (30, 6, 1.0)):
        target = torch.randn(n, d, generator=g, dtype=torch.float64)
        pred = target + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        want = contrastive_accuracy_by_loop(pred, target)
        got = fn(pred.clone(), target.clone())
        assert abs(got - want) < 1e-9, (
            f"a random batch of {n} in {d} dimensions: the loop over every (i, j != i) with math.dist gives "
            f"{want:.6f}, got {got:.6f}")
    # Ties with duplicated targets (two sentences with the same embedding)
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    pred = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    want = contrastive_accuracy_by_loop(pred, target)
    got = fn(pred, target)
    assert abs(got - want) < 1e-9, (
        f"targets 0 and 1 are the same point: each is exactly as far from pred 0 (and pred 1) as the other, a tie that"
        f" does not count; the loop gives {want:.6f}, got {got:.6f}")


def _ca_divides_by_n(pred, target):
    n = len(pred)
    return solutions.ex08_contrastive_accuracy(pred, target) * (n - 1) / n


def _ca_ties_count(pred, target):
    dist = torch.cdist(pred.double(), target.double())
    farther = (dist >= dist.diagonal()[:, None]).sum(1) - 1  # j = i left out, ties counted
    return (farther.double() / (len(pred) - 1)).mean().item()


def _ca_cosine(pred, target):
    sim = torch.nn.functional.cosine_similarity(pred[:, None, :].double(), target[None, :, :].double(), dim=-1)
    less_similar = (sim < sim.diagonal()[:, None]).sum(1)
    return (less_similar.double() / (len(pred) - 1)).mean().item()


def _ca_by_column(pred, target):  # each target against the other predictions
    return solutions.ex08_contrastive_accuracy(target, pred)


# --- ex09: the robust scaler ---------------------------------------------------------------------------------------

NORMAL_IQR = statistics.NormalDist().inv_cdf(0.75) - statistics.NormalDist().inv_cdf(0.25)  # 1.34898


def robust_stats_by_numpy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy's quantiles (linear interpolation, its default), column by column: the median and the IQR / 1.349."""
    q25, median, q75 = np.quantile(x.double().numpy(), [0.25, 0.5, 0.75], axis=0)
    scale = (q75 - q25) / NORMAL_IQR
    scale[scale == 0] = 1.0
    return torch.from_numpy(median), torch.from_numpy(scale)


def _robust_result(got, n: int, d: int, what: str):
    assert isinstance(got, tuple) and len(got) == 3, f"{what}: return a tuple (scaled, center, scale), got {got!r}"
    scaled, center, scale = got
    _tensor_of_shape(scaled, (n, d), f"{what}: scaled")
    _tensor_of_shape(center, (d,), f"{what}: center (one per column)")
    _tensor_of_shape(scale, (d,), f"{what}: scale (one per column)")
    return scaled.double(), center.double(), scale.double()


def check_ex09_robust_scale(fn):
    # Random heavy-tailed columns (Student's t with 2 degrees of freedom: a few huge values), N != d
    g = torch.Generator().manual_seed(9)
    for n, d in ((101, 7), (40, 5)):  # an odd and an even number of rows
        x = torch.randn(n, d, generator=g, dtype=torch.float64) / torch.rand(n, d, generator=g,
                                                                              dtype=torch.float64).sqrt()
        x = x * torch.linspace(0.1, 10, d, dtype=torch.float64) + torch.linspace(-5, 5, d, dtype=torch.float64)
        before = x.clone()
        scaled, center, scale = _robust_result(fn(x), n, d, f"x ({n}, {d})")
        assert torch.equal(x, before), "the input x was changed: compute new tensors"
        want_center, want_scale = robust_stats_by_numpy(x)
        assert torch.allclose(center, want_center, rtol=1e-9, atol=1e-9), (
            f"x ({n}, {d}): center should be each column's median, numpy.quantile(x, 0.5, axis=0) = "
            f"{_r(want_center)}; got {_r(center)}" + (" (an even number of rows: the median is the mean of the two "
                                                       "middle values, not torch.median's lower one)" if n % 2 == 0
                                                       else ""))
        assert torch.allclose(scale, want_scale, rtol=1e-4), (
            f"x ({n}, {d}): scale should be each column's (q75 - q25) / 1.349 (numpy.quantile) = {_r(want_scale)}; "
            f"got {_r(scale)}")
        want = (x - want_center) / want_scale
        assert torch.allclose(scaled, want, rtol=1e-4, atol=1e-6), (
            f"x ({n}, {d}): scaled should be (x - median) / scale; yours differs by up to "
            f"{(scaled - want).abs().max():.3g}")
    # By hand: [1, 2, 3, 4, 100] (an outlier), a constant column, [1, 2, 3, 10] padded... one column each
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [100.0, 5.0]], dtype=torch.float64)
    scaled, center, scale = _robust_result(fn(x), 5, 2, "x (5, 2)")
    assert abs(center[0] - 3) < 1e-12 and abs(scale[0] - 2 / NORMAL_IQR) < 1e-4, (
        f"the column [1, 2, 3, 4, 100]: median 3, q25 = 2, q75 = 4, scale 2 / 1.349 = 1.4826 (the mean 22 and the "
        f"standard deviation 43.6 would follow the outlier); got center {center[0]:.4f}, scale {scale[0]:.4f}")
    assert abs(scale[1] - 1) < 1e-12 and torch.allclose(scaled[:, 1], torch.zeros(5, dtype=torch.float64)), (
        f"the constant column [5, 5, 5, 5, 5]: its IQR is 0, so its scale is 1 and it scales to 0; got scale "
        f"{scale[1]:.4g} and {_r(scaled[:, 1])}")
    x = torch.tensor([[1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    _, center, scale = _robust_result(fn(x), 4, 1, "x (4, 1)")
    assert abs(center[0] - 2.5) < 1e-12 and abs(scale[0] - 3 / NORMAL_IQR) < 1e-4, (
        f"the column [1, 2, 3, 10]: median 2.5 (halfway between 2 and 3, not torch.median's 2), q25 = 1.75, "
        f"q75 = 4.75, scale 3 / 1.349 = 2.2239; got center {center[0]:.4f}, scale {scale[0]:.4f}")


def _robust_mean_std(x):
    center, scale = x.mean(0), x.std(0)
    return (x - center) / scale, center, scale


def _robust_no_1349(x):  # the IQR itself as the scale
    q25, center, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=0)
    scale = torch.where(q75 > q25, q75 - q25, torch.ones_like(q75))
    return (x - center) / scale, center, scale


def _robust_per_row(x):  # the statistics of each embedding (row) instead of each dimension (column)
    q25, center, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=1, keepdim=True)
    scale = (q75 - q25) / 1.349
    return (x - center) / scale, center.squeeze(1), scale.squeeze(1)


def _robust_torch_median(x):  # torch.median: the lower middle value of an even count
    scaled, _, scale = solutions.ex09_robust_scale(x)
    center = x.median(dim=0).values
    return (x - center) / scale, center, scale


def _robust_no_guard(x):  # a constant column divided by 0
    q25, center, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=0)
    scale = (q75 - q25) / 1.349
    return (x - center) / scale, center, scale


# --- ex10: the Base-LCM loss and stopping rule ---------------------------------------------------------------------


def base_lcm_by_loop(pred, concepts, eot, s_eot: float, s_prev: float) -> tuple[float, list]:
    """In Python floats: the mean squared error of output i against concept i + 1, and the cosine rules."""
    P, C, E = pred.tolist(), concepts.tolist(), eot.tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    squares = [(p - c) ** 2 for Pb, Cb in zip(P, C) for i in range(len(Pb) - 1) for p, c in zip(Pb[i], Cb[i + 1])]
    stop = [[cos(Pb[i], E) >= s_eot or cos(Pb[i], Cb[i]) >= s_prev for i in range(len(Pb))] for Pb, Cb in zip(P, C)]
    return sum(squares) / len(squares), stop


def _lcm_result(got, shape: tuple, what: str):
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: return a tuple (loss, stop), got {got!r}"
    loss, stop = got
    _tensor_of_shape(loss, (), f"{what}: the loss (a 0-d tensor)")
    _tensor_of_shape(stop, shape, f"{what}: stop (one flag per prediction)")
    assert stop.dtype == torch.bool, f"{what}: stop should be a bool tensor, got {stop.dtype}"
    return loss, stop.tolist()


def check_ex10_base_lcm_loss_and_stop(fn):
    concepts = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    pred = torch.tensor([[[0.0, 2.0], [0.2, 2.0], [-3.0, 0.1]]], dtype=torch.float64)
    eot = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    loss, stop = _lcm_result(fn(pred, concepts, eot), (1, 3), "pred, concepts (1, 3, 2)")
    assert abs(loss.item() - 0.66) < 1e-9, (
        "concepts [(1, 0), (0, 1), (1, 1)], pred [(0, 2), (0.2, 2), (-3, 0.1)]: output 0 aims at concept 1 and "
        "output 1 at concept 2 (the last output has no target): ((0-0)^2 + (2-1)^2 + (0.2-1)^2 + (2-1)^2) / 4 = "
        f"0.66; got {loss.item():.6f}")
    assert stop == [[False, True, True]], (
        "the same, eot (-1, 0): output 0 is orthogonal to eot and to concept 0 (go on); output 1 has cos 0.995 with "
        "concept 1, the one just read (a repetition: stop); output 2 has cos 0.9994 with eot (the end: stop); "
        f"want [[False, True, True]], got {stop}")
    # Random batches with planted stops: outputs that point like eot or like the concept just read, at other norms
    g = torch.Generator().manual_seed(10)
    B, L, d = 3, 6, 5
    concepts = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    eot = torch.randn(d, generator=g, dtype=torch.float64)
    pred = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    pred[0, 1] = 2.5 * eot + 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    pred[1, 3] = 0.3 * eot
    pred[1, 0] = 3.0 * concepts[1, 0] + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    pred[2, 4] = 0.4 * concepts[2, 4]
    pred[2, 2] = 0.5 * concepts[2, 3]  # like the NEXT concept: its target, not a repetition
    pred.requires_grad_(True)
    for s_eot, s_prev in ((0.9, 0.9), (0.5, 0.95), (0.99, 0.3)):
        loss, stop = _lcm_result(fn(pred, concepts, eot, s_eot, s_prev), (B, L), f"pred, concepts {(B, L, d)}")
        want_loss, want_stop = base_lcm_by_loop(pred.detach(), concepts, eot, s_eot, s_prev)
        assert abs(loss.item() - want_loss) < 1e-9, (
            f"a random batch {(B, L, d)}: the mean over b, i < L - 1 and the dimensions of (pred[b, i] - "
            f"concepts[b, i + 1])^2 is {want_loss:.6f} (a loop); got {loss.item():.6f}")
        assert stop == want_stop, (
            f"a random batch {(B, L, d)}, s_eot {s_eot}, s_prev {s_prev}: stop where cos(pred[b, i], eot) >= s_eot or "
            f"cos(pred[b, i], concepts[b, i]) >= s_prev (a loop): want {want_stop}, got {stop}")
    assert loss.requires_grad, "the loss must be differentiable in pred (return the tensor, not a float)"
    (grad,) = torch.autograd.grad(loss, pred)
    want = torch.zeros_like(grad)
    want[:, :-1] = 2 * (pred.detach()[:, :-1] - concepts[:, 1:]) / (B * (L - 1) * d)
    assert torch.allclose(grad, want, atol=1e-12), (
        "the loss's gradient in pred should be 2 (pred[b, i] - concepts[b, i + 1]) / (B (L - 1) d), and 0 for the "
        f"last output; yours differs by up to {(grad - want).abs().max():.3g}")
    # A tie is a stop (>=): cos((3, 4), (1, 0)) = 3/5 exactly
    concepts = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    pred = torch.tensor([[[3.0, 4.0], [-4.0, 3.0]]], dtype=torch.float64)
    _, stop = _lcm_result(fn(pred, concepts, torch.tensor([1.0, 0.0], dtype=torch.float64), 0.6, 0.99),
                          (1, 2), "pred, concepts (1, 2, 2)")
    assert stop == [[True, False]], (
        f"cos((3, 4), eot (1, 0)) = 0.6 exactly, and s_eot = 0.6: a tie stops (>=); want [[True, False]], got {stop}")


def _lcm_no_shift(pred, concepts, eot, s_eot=0.9, s_prev=0.9):  # each output against the concept it has just read
    _, stop = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    return torch.nn.functional.mse_loss(pred, concepts), stop


def _lcm_sum(pred, concepts, eot, s_eot=0.9, s_prev=0.9):
    _, stop = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    return (pred[:, :-1] - concepts[:, 1:]).pow(2).sum(), stop


def _lcm_squared_norm(pred, concepts, eot, s_eot=0.9, s_prev=0.9):  # summed over the dimensions, mean over positions
    _, stop = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    return (pred[:, :-1] - concepts[:, 1:]).pow(2).sum(-1).mean(), stop


def _lcm_euclidean_stop(pred, concepts, eot, s_eot=0.9, s_prev=0.9):  # |a - b|^2 / 2 <= 1 - s: cos for unit vectors
    loss, _ = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    near_end = (pred - eot).pow(2).sum(-1) / 2 <= 1 - s_eot
    near_prev = (pred - concepts).pow(2).sum(-1) / 2 <= 1 - s_prev
    return loss, near_end | near_prev


def _lcm_dot_stop(pred, concepts, eot, s_eot=0.9, s_prev=0.9):  # a.b without the norms
    loss, _ = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    return loss, ((pred * eot).sum(-1) >= s_eot) | ((pred * concepts).sum(-1) >= s_prev)


def _lcm_strict(pred, concepts, eot, s_eot=0.9, s_prev=0.9):
    loss, _ = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    cos = torch.nn.functional.cosine_similarity
    return loss, (cos(pred, eot, dim=-1) > s_eot) | (cos(pred, concepts, dim=-1) > s_prev)


def _lcm_both_rules(pred, concepts, eot, s_eot=0.9, s_prev=0.9):
    loss, _ = solutions.ex10_base_lcm_loss_and_stop(pred, concepts, eot, s_eot, s_prev)
    cos = torch.nn.functional.cosine_similarity
    return loss, (cos(pred, eot, dim=-1) >= s_eot) & (cos(pred, concepts, dim=-1) >= s_prev)


# --- ex11: one DDIM step -------------------------------------------------------------------------------------------


def cosine_schedule(t: int, n_steps: int = 100, s: float = 0.008) -> float:
    """alpha_bar_t of the cosine schedule (Nichol & Dhariwal 2021), in Python floats."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return min(1.0, max(0.0, f(t / n_steps) / f(0)))


def check_ex11_ddim_step(fn):
    got = _tensor_of_shape(fn(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64),
                              0.36, 0.64), (), "x_t, x0_pred of shape ()")
    assert abs(got.item() - 0.925) < 1e-12, (
        "x_t = 1, x0_pred = 0.5, a_t = 0.36, a_prev = 0.64: eps_hat = (1 - sqrt(0.36) 0.5) / sqrt(1 - 0.36) = "
        f"0.7 / 0.8 = 0.875, x_prev = sqrt(0.64) 0.5 + sqrt(0.36) 0.875 = 0.4 + 0.525 = 0.925; got {got.item():.6f}")
    g = torch.Generator().manual_seed(11)
    x_t, x0 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    for t, t_prev in ((100, 90), (60, 30), (12, 11), (5, 0)):
        a, a_prev = cosine_schedule(t), cosine_schedule(t_prev)
        got = _tensor_of_shape(fn(x_t, x0, a, a_prev), (4, 8), "x_t, x0_pred of shape (4, 8)")
        # the same step, rearranged: x0's part, then x_t's residual carried over with the ratio of noise levels
        want = math.sqrt(a_prev) * x0 + math.sqrt((1 - a_prev) / (1 - a)) * (x_t - math.sqrt(a) * x0)
        assert torch.allclose(got, want, atol=1e-10), (
            f"t = {t} -> {t_prev} (a_t = {a:.4f}, a_prev = {a_prev:.4f}): sqrt(a_prev) x0 + sqrt((1 - a_prev) / "
            f"(1 - a_t)) (x_t - sqrt(a_t) x0) differs from yours by up to {(got - want).abs().max():.3g}")
    a = cosine_schedule(40)
    got = fn(x_t, x0, a, 1.0)
    assert torch.allclose(got, x0, atol=1e-12), (
        f"a_prev = 1 (the last step, t_prev = 0): x_prev should be x0_pred itself; off by {(got - x0).abs().max():.3g}")
    got = fn(x_t, x0, a, a)
    assert torch.allclose(got, x_t, atol=1e-12), (
        f"a_prev = a_t: the step should leave x_t as it is; off by {(got - x_t).abs().max():.3g}")
    # A perfect x0 prediction walks back along its own trajectory, down the trailing schedule 100, 90, ..., 10, 0
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    steps = list(range(100, -1, -10))
    x = math.sqrt(cosine_schedule(100)) * x0 + math.sqrt(1 - cosine_schedule(100)) * eps  # pure noise: alpha_bar 0
    for t, t_prev in zip(steps, steps[1:]):
        x = fn(x, x0, cosine_schedule(t), cosine_schedule(t_prev))
        a_prev = cosine_schedule(t_prev)
        want = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        assert torch.allclose(x, want, atol=1e-9), (
            f"x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with x0_pred = x0: the step {t} -> {t_prev} should land on "
            f"sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (the same eps); off by {(x - want).abs().max():.3g}")


def _ddim_eps_no_sqrt(x_t, x0_pred, alpha_bar_t, alpha_bar_prev):  # divided by (1 - a_t)
    eps = (x_t - math.sqrt(alpha_bar_t) * x0_pred) / (1 - alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps


def _ddim_eps_no_sqrt_alpha(x_t, x0_pred, alpha_bar_t, alpha_bar_prev):  # x_t - x0_pred
    eps = (x_t - x0_pred) / math.sqrt(1 - alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps


def _ddim_swapped(x_t, x0_pred, alpha_bar_t, alpha_bar_prev):
    return solutions.ex11_ddim_step(x_t, x0_pred, alpha_bar_prev, alpha_bar_t) if alpha_bar_prev < 1 else x0_pred


def _ddim_noise_no_sqrt(x_t, x0_pred, alpha_bar_t, alpha_bar_prev):  # (1 - a_prev) eps_hat
    eps = (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + (1 - alpha_bar_prev) * eps


# --- ex12: Coconut's continuous-thought forward --------------------------------------------------------------------


class CausalMixer(torch.nn.Module):
    """A small fixed causal model: position t reads its own input and a decaying average of inputs 0..t, so every
    position's hidden state differs, and none depends on a later input."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.U = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.b = torch.nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        t = torch.arange(x.size(1))
        lag = t[:, None] - t[None, :]
        weights = torch.where(lag >= 0, 0.6 ** lag.clamp(min=0).double(), 0.0)  # (T, T), lower triangular
        return torch.tanh(x @ self.W + (weights / weights.sum(1, keepdim=True)) @ x @ self.U + self.b)


def thoughts_by_loop(model, prompt: torch.Tensor, n_thoughts: int) -> torch.Tensor:
    """Row by row, thought by thought: thought k is the model's hidden state at the last position of the sequence
    so far (the prompt and thoughts 1..k-1)."""
    rows = []
    for b in range(prompt.size(0)):
        seq = [prompt[b, t] for t in range(prompt.size(1))]
        for _ in range(n_thoughts):
            hidden = model(torch.stack(seq)[None])  # (1, len(seq), d)
            seq.append(hidden[0, len(seq) - 1])
        rows.append(torch.stack(seq))
    return torch.stack(rows)


def check_ex12_continuous_thought_forward(fn):
    model = CausalMixer(4, seed=12)
    g = torch.Generator().manual_seed(12)
    for B, T, n in ((2, 3, 4), (1, 5, 1), (3, 2, 6)):
        prompt = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
        before = prompt.clone()
        got = _tensor_of_shape(fn(model, prompt, n), (B, T + n, 4), f"a prompt ({B}, {T}, 4) with {n} thoughts")
        assert torch.equal(prompt, before), "prompt_embeds was changed: build new tensors"
        want = thoughts_by_loop(model, prompt, n)
        assert torch.allclose(got[:, :T], prompt, atol=0), "the first T inputs should be the prompt, unchanged"
        assert torch.allclose(got, want, atol=1e-12), (
            f"a prompt ({B}, {T}, 4), {n} thoughts: thought k (input T + k) should be the hidden state at position "
            f"T + k - 1 of the pass over the first T + k inputs (a loop, row by row); yours differ by up to "
            f"{(got - want).abs().max():.3g}")
    got = fn(model, prompt, 0)
    assert torch.equal(got, prompt), "n_thoughts = 0: the inputs are the prompt alone"
    # By hand: model(x) = 2 x doubles each thought
    got = fn(lambda x: 2 * x, torch.tensor([[[1.0]]]), 3)
    assert torch.equal(got, torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])), (
        f"model(x) = 2 x, prompt [[1]], 3 thoughts: [[1], [2], [4], [8]]; got {_r(got.flatten())}")
    # The thoughts stay differentiable: the gradient of the last thought reaches the prompt and the model
    prompt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = fn(model, prompt, 3)
    assert got.requires_grad, "the thoughts must stay differentiable (no .detach(), no torch.no_grad())"
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    leaves = [prompt, *model.parameters()]
    grads = torch.autograd.grad((got[:, -1] * weights).sum(), leaves, allow_unused=True)  # None: no path back
    want = torch.autograd.grad((thoughts_by_loop(model, prompt, 3)[:, -1] * weights).sum(), leaves)
    worst = max((b if a is None else a - b).abs().max().item() for a, b in zip(grads, want))
    assert worst < 1e-10, (
        "the gradient of the last thought in the prompt and the model's weights differs from the loop's by up to "
        f"{worst:.3g}: the gradient must flow back through every thought")


def _thought_input_fed_back(model, prompt_embeds, n_thoughts):  # the last input again, not the hidden state
    inputs = prompt_embeds
    for _ in range(n_thoughts):
        model(inputs)
        inputs = torch.cat((inputs, inputs[:, -1:]), dim=1)
    return inputs


def _thought_first_position(model, prompt_embeds, n_thoughts):
    inputs = prompt_embeds
    for _ in range(n_thoughts):
        inputs = torch.cat((inputs, model(inputs)[:, :1]), dim=1)
    return inputs


def _thought_one_before_last(model, prompt_embeds, n_thoughts):
    inputs = prompt_embeds
    for _ in range(n_thoughts):
        inputs = torch.cat((inputs, model(inputs)[:, -2:-1]), dim=1)
    return inputs


def _thought_one_too_few(model, prompt_embeds, n_thoughts):
    return solutions.ex12_continuous_thought_forward(model, prompt_embeds, max(0, n_thoughts - 1))


def _thought_alone(model, prompt_embeds, n_thoughts):  # after the first pass, the model sees only the new thought
    inputs, last = prompt_embeds, prompt_embeds
    for _ in range(n_thoughts):
        thought = model(last)[:, -1:]
        inputs, last = torch.cat((inputs, thought), dim=1), thought
    return inputs


def _thought_detached(model, prompt_embeds, n_thoughts):
    inputs = prompt_embeds
    for _ in range(n_thoughts):
        inputs = torch.cat((inputs, model(inputs)[:, -1:].detach()), dim=1)
    return inputs


CASES = [
    Exercise("ex01_poincare_distance", check_ex01_poincare_distance, wrong=[
        _dist_no_factor_two, _dist_no_denominator, _dist_not_squared]),
    Exercise("ex02_mobius_add", check_ex02_mobius_add, wrong=[
        _mobius_plain_sum, _mobius_norms_swapped, _mobius_sign_flipped, _mobius_commuted]),
    Exercise("ex03_riemannian_grad", check_ex03_riemannian_grad, wrong=[
        _rgrad_no_square, _rgrad_no_quarter, _rgrad_norm_not_squared, _rgrad_one_factor]),
    Exercise("ex04_supermerge_step", check_ex04_supermerge_step, wrong=[
        _super_not_whole, _super_any_single_token, _super_no_letter_required, _super_ignores_counts,
        _super_first_seen_tie, _super_right_to_left, _super_in_place]),
    Exercise("ex05_entropy_patch_starts", check_ex05_entropy_patch_starts, wrong=[
        _patch_greater_equal, _patch_no_forced_start, _patch_one_late, _patch_flattened, _patch_absolute_change]),
    Exercise("ex06_bits_per_byte", check_ex06_bits_per_byte, wrong=[
        _bpb_is_bits_per_token, _bpb_is_nats_per_byte, _bpb_times_ln2, _bpb_bytes_per_token]),
    Exercise("ex07_context_gated_query", check_ex07_context_gated_query, wrong=[
        _gate_swapped, _gate_no_sigmoid, _gate_per_channel, _gate_mixes_raw_context]),
    Exercise("ex08_contrastive_accuracy", check_ex08_contrastive_accuracy, wrong=[
        _ca_divides_by_n, _ca_ties_count, _ca_cosine, _ca_by_column]),
    Exercise("ex09_robust_scale", check_ex09_robust_scale, wrong=[
        _robust_mean_std, _robust_no_1349, _robust_per_row, _robust_torch_median, _robust_no_guard]),
    Exercise("ex10_base_lcm_loss_and_stop", check_ex10_base_lcm_loss_and_stop, wrong=[
        _lcm_no_shift, _lcm_sum, _lcm_squared_norm, _lcm_euclidean_stop, _lcm_dot_stop, _lcm_strict,
        _lcm_both_rules]),
    Exercise("ex11_ddim_step", check_ex11_ddim_step, wrong=[
        _ddim_eps_no_sqrt, _ddim_eps_no_sqrt_alpha, _ddim_swapped, _ddim_noise_no_sqrt]),
    Exercise("ex12_continuous_thought_forward", check_ex12_continuous_thought_forward, wrong=[
        _thought_input_fed_back, _thought_first_position, _thought_one_before_last, _thought_one_too_few,
        _thought_alone, _thought_detached]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
