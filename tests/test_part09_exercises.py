"""Part 9 exercises: each check compares against an outside reference and rejects plausible slips."""
import itertools
import math
import statistics
from fractions import Fraction

import torch

from part09_grpo import exercises, solutions
from tests.harness import Exercise, exercise_tests


def _lengths_mask(lengths: list[int], R: int, dtype=torch.float) -> torch.Tensor:
    """A response mask (B, R): row b is True for its first lengths[b] positions."""
    return torch.tensor([[t < n for t in range(R)] for n in lengths], dtype=dtype)


def _r(t, digits: int = 4) -> list:
    """A tensor as (nested) lists of rounded numbers, for messages."""
    return torch.round(torch.as_tensor(t).double(), decimals=digits).tolist()


def _scalar_with_grad(got, what: str) -> None:
    assert torch.is_tensor(got) and got.dim() == 0, (
        f"{what}: return a scalar (0-dim) tensor; got {tuple(got.shape) if torch.is_tensor(got) else got!r}")
    assert got.requires_grad, f"{what}: no gradient flows through the loss: keep the computation in torch"


# --- ex01: group-relative advantages ------------------------------------------------------------------------


def advantages_by_hand(scores: list[float], group_size: int, scale: bool, eps: float):
    """Group by group with the statistics module (float64): the sample std, as statistics.stdev defines it."""
    advantages, flat = [], []
    for start in range(0, len(scores), group_size):
        group = scores[start : start + group_size]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        advantages += [(x - mean) / (std + eps) if scale else x - mean for x in group]
        flat.append(len(set(group)) == 1)
    return torch.tensor(advantages, dtype=torch.float64), flat


def _advantages_pair(got, n: int, groups: int, what: str):
    assert isinstance(got, tuple) and len(got) == 2 and all(torch.is_tensor(x) for x in got), (
        f"{what}: return a tuple (advantages, flat) of two tensors, got {type(got).__name__}")
    advantages, flat = got
    assert tuple(advantages.shape) == (n,), (
        f"{what}: advantages should be ({n},), one per answer, got {tuple(advantages.shape)}")
    assert tuple(flat.shape) == (groups,), (
        f"{what}: flat should be ({groups},), one flag per group (prompt), got {tuple(flat.shape)}")
    assert flat.dtype == torch.bool, f"{what}: flat should be a bool tensor, got {flat.dtype}"
    assert torch.isfinite(advantages).all(), (
        f"{what}: some advantages are not finite: {_r(advantages)} (a flat group has std 0: add eps to the std)")
    return advantages, flat


def check_ex01_group_advantages(fn):
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.0])  # 3 groups of 4
    kept = scores.clone()
    # By hand: the first group's mean is 0.5 and its sample std sqrt(1/3) = 0.5774; 0.5 / (0.5774 + 1e-4) = 0.8659
    advantages, flat = _advantages_pair(fn(scores, 4), 12, 3, "3 groups of 4")
    assert torch.equal(scores, kept), "your function changed scores in place: build a new tensor"
    first = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(advantages[:4].double(), torch.tensor([first, -first, -first, first], dtype=torch.float64),
                          atol=1e-5), (
        f"scores [1, 0, 0, 1] (one group): the mean is 0.5 and the sample std sqrt(1/3) = 0.5774 (divide by G - 1), "
        f"so the advantages are +-0.5 / (0.5774 + 1e-4) = +-{first:.4f}; got {_r(advantages[:4])}")
    assert flat.tolist() == [False, True, False], (
        f"scores {scores.tolist()} in groups of 4: only the middle group (all 1) is flat; got flat = {flat.tolist()}")
    assert torch.equal(advantages[4:8].float(), torch.zeros(4)), (
        f"the middle group scored [1, 1, 1, 1]: every advantage is exactly 0 (0 / (0 + eps)); "
        f"got {_r(advantages[4:8])}")
    want, _ = advantages_by_hand(scores.tolist(), 4, True, 1e-4)
    assert torch.allclose(advantages.double(), want, atol=1e-5), (
        f"scores {scores.tolist()}, groups of 4: statistics.mean and statistics.stdev group by group give "
        f"{_r(want)}, got {_r(advantages)}")
    # Dr. GRPO: centred, not scaled
    advantages, _ = _advantages_pair(fn(scores, 4, scale=False), 12, 3, "scale=False")
    want = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.125, -0.125, 0.375, -0.125]
    assert torch.allclose(advantages.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), (
        f"scale=False (Dr. GRPO): only the group's mean is subtracted, {want}; got {_r(advantages)}")
    # The eps argument is the one added to the std
    advantages, _ = _advantages_pair(fn(scores, 4, eps=0.5), 12, 3, "eps=0.5")
    want, _ = advantages_by_hand(scores.tolist(), 4, True, 0.5)
    assert torch.allclose(advantages.double(), want, atol=1e-5), (
        f"eps=0.5: the first group's advantages are +-0.5 / (0.5774 + 0.5) = +-0.4641; got {_r(advantages[:4])}")
    # A nearly flat group is not flat, and eps keeps its advantages small: 7.5e-7 / (5e-7 + 1e-4) = 0.0075
    near = torch.tensor([0.0, 0.0, 0.0, 1e-6, 1.0, 0.0, 1.0, 0.0])
    advantages, flat = _advantages_pair(fn(near, 4), 8, 2, "a nearly flat group")
    assert flat.tolist() == [False, False], (
        f"scores [0, 0, 0, 1e-6] differ (std 5e-7): not flat; got flat = {flat.tolist()}")
    assert abs(advantages[3].item() - 7.5e-7 / (5e-7 + 1e-4)) < 1e-4, (
        f"scores [0, 0, 0, 1e-6]: the std is 5e-7, so the last advantage is 7.5e-7 / (5e-7 + 1e-4) = 0.0075 (eps "
        f"dominates); got {advantages[3].item():.4f}")
    # Random groups (verifier rewards, -1 for an unfinished answer, plus a reward model's score), against statistics
    g = torch.Generator().manual_seed(0)
    for G, prompts in ((6, 5), (2, 7), (8, 3)):
        scores = torch.randint(-1, 2, (prompts * G,), generator=g).double()
        scores[:G] = 1.0  # one flat group at least
        scores[-G:] += torch.randn(G, generator=g, dtype=torch.float64)  # and one with a continuous reward
        for scale in (True, False):
            advantages, flat = _advantages_pair(fn(scores.clone(), G, scale=scale), prompts * G, prompts,
                                                f"{prompts} groups of {G}")
            want, want_flat = advantages_by_hand(scores.tolist(), G, scale, 1e-4)
            assert torch.allclose(advantages.double(), want, atol=1e-5), (
                f"{prompts} groups of {G} consecutive answers, scale={scale}: statistics.mean and statistics.stdev "
                f"group by group differ from yours by up to {(advantages.double() - want).abs().max():.4f}. A group "
                "is G consecutive answers; the std is the sample std (G - 1)")
            assert flat.tolist() == want_flat, (
                f"{prompts} groups of {G}: flat should be {want_flat}, got {flat.tolist()}")


def _adv_population_std(scores, group_size, scale=True, eps=1e-4):  # divides by G, not G - 1
    groups = scores.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True, unbiased=False)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    return (advantages / (std + eps) if scale else advantages).view(-1), std.squeeze(1) == 0


def _adv_wrong_stride(scores, group_size, scale=True, eps=1e-4):  # every prompts-th answer taken as a group
    groups = scores.view(group_size, -1).T
    std = groups.std(dim=1, keepdim=True)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    advantages = advantages / (std + eps) if scale else advantages
    return advantages.T.reshape(-1), std.squeeze(1) == 0


def _adv_whole_batch(scores, group_size, scale=True, eps=1e-4):  # one baseline for every prompt
    advantages = scores - scores.mean()
    flat = scores.view(-1, group_size).std(dim=1) == 0
    return (advantages / (scores.std() + eps) if scale else advantages), flat


def _adv_no_eps(scores, group_size, scale=True, eps=1e-4):  # 0 / 0 for a flat group
    return solutions.ex01_group_advantages(scores, group_size, scale, eps=0.0)


def _adv_ignores_eps(scores, group_size, scale=True, eps=1e-4):
    return solutions.ex01_group_advantages(scores, group_size, scale, eps=1e-4)


def _adv_ignores_scale(scores, group_size, scale=True, eps=1e-4):  # Dr. GRPO still divided
    return solutions.ex01_group_advantages(scores, group_size, True, eps)


def _adv_flag_per_answer(scores, group_size, scale=True, eps=1e-4):
    advantages, flat = solutions.ex01_group_advantages(scores, group_size, scale, eps)
    return advantages, flat.repeat_interleave(group_size)


def _adv_flag_all_wrong_only(scores, group_size, scale=True, eps=1e-4):  # an all-right group flagged as not flat
    advantages, _ = solutions.ex01_group_advantages(scores, group_size, scale, eps)
    return advantages, (scores.view(-1, group_size) == 0).all(dim=1)


# --- ex02: the k3 estimator -----------------------------------------------------------------------------------


KL_PAIRS = [  # (pi, pi_ref): small categorical distributions, the policy's and the reference's
    ([0.85, 0.1, 0.04, 0.01], [0.25, 0.25, 0.25, 0.25]),
    ([0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]),
    ([0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]),
    ([0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]),
    ([0.96, 0.01, 0.01, 0.02], [0.9, 0.05, 0.03, 0.02]),
]


def exact_kl(p: list[float], q: list[float]) -> float:
    return math.fsum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def check_ex02_k3_kl(fn):
    # By hand: pi = 0.5, pi_ref = 0.25 (r = 0.5), and the other way round (r = 2)
    logp, logq = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    want = [(0.5 - 1) + math.log(2), (2 - 1) - math.log(2)]
    got = fn(logp.clone(), logq.clone())
    assert torch.is_tensor(got) and got.shape == logp.shape, "return one estimate per token, the inputs' shape"
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), (
        f"pi = (0.5, 0.25), pi_ref = (0.25, 0.5): r = pi_ref / pi = (0.5, 2), so k3 = (r - 1) - log r = "
        f"{[round(w, 6) for w in want]}; got {[round(v, 6) for v in got.tolist()]}")
    # Unbiased: the expectation over tokens sampled from pi is KL(pi || pi_ref), summed exactly in float64
    for p, q in KL_PAIRS:
        want = exact_kl(p, q)
        per_token = fn(torch.tensor(p, dtype=torch.float64).log(), torch.tensor(q, dtype=torch.float64).log())
        expectation = math.fsum(pi * k for pi, k in zip(p, per_token.double().tolist()))
        assert abs(expectation - want) < 1e-9, (
            f"pi = {p}, pi_ref = {q}: the expectation of your estimate under pi is {expectation:.6f}, but "
            f"KL(pi || pi_ref) = sum pi log(pi / pi_ref) = {want:.6f}: the estimator is biased")
    # Never negative, on random distributions over 50 tokens (float32, as training computes it)
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 50, generator=g) * 2, dim=-1)
    logq = torch.log_softmax(torch.randn(3, 50, generator=g) * 2, dim=-1)
    k3 = fn(logp, logq)
    assert k3.shape == (3, 50), f"inputs (3, 50): return (3, 50), got {tuple(k3.shape)}"
    assert (k3 >= 0).all(), f"k3 = (r - 1) - log r is never negative, yours reaches {k3.min():.4g}"
    # The policy a step away from the reference, in float32: log-ratios of +-1e-3 and +-1e-4, k3 ~ log_ratio^2 / 2
    log_ratio = torch.tensor([1e-3, -1e-3, 1e-4, -1e-4, 3e-4])
    logq = torch.tensor([-2.0, -0.5, -3.0, -1.0, -0.1])
    got = fn(logq + log_ratio, logq)
    x = (logq + log_ratio - logq).double()  # the log-ratios as float32 represents them
    want = torch.expm1(-x) + x
    assert (got >= 0).all() and torch.allclose(got.double(), want, rtol=0.02, atol=0), (
        f"log pi - log pi_ref = {log_ratio.tolist()} (float32): k3 ~ log_ratio^2 / 2 = "
        f"{[f'{w:.3g}' for w in want.tolist()]}, "
        f"got {[f'{v:.3g}' for v in got.tolist()]}. exp(x) - 1 rounds away what is left of a tiny x: use torch.expm1")


def _k3_swapped(logprobs, ref_logprobs):  # r = pi / pi_ref: still >= 0, but the expectation is not the KL
    return solutions.ex02_k3_kl(ref_logprobs, logprobs)


def _k3_is_k1(logprobs, ref_logprobs):  # unbiased, but negative for some tokens
    return logprobs - ref_logprobs


def _k3_is_k2(logprobs, ref_logprobs):  # 0.5 log_ratio^2: low variance, biased
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _k3_without_minus_one(logprobs, ref_logprobs):  # r - log r: off by 1 everywhere
    log_r = ref_logprobs - logprobs
    return log_r.exp() - log_r


def _k3_naive_exp(logprobs, ref_logprobs):  # exp(x) - 1 in float32: rounding noise for tiny log-ratios
    log_r = ref_logprobs - logprobs
    return log_r.exp() - 1 - log_r


# --- ex03: loss aggregation -------------------------------------------------------------------------------


def aggregate_by_hand(per_token, lengths, how, max_new_tokens):
    """In float64, answer by answer and token by token."""
    rows = [[per_token[b, t].item() for t in range(n)] for b, n in enumerate(lengths)]
    if how == "sequence":
        return math.fsum(math.fsum(row) / len(row) for row in rows) / len(rows)
    if how == "token":
        return math.fsum(v for row in rows for v in row) / sum(lengths)
    return math.fsum(math.fsum(row) / max_new_tokens for row in rows) / len(rows)


def check_ex03_aggregate(fn):
    per_token = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 100.0, 100.0, 100.0]])  # 50 and the 100s: garbage
    hand = {"sequence": (2.0 + 4.0) / 2, "token": (1 + 2 + 3 + 4) / 4, "constant": (6 / 4 + 4 / 4) / 2}
    for dtype in (torch.float, torch.bool):
        mask = _lengths_mask([3, 1], 4, dtype)
        for how, want in hand.items():
            x = per_token.clone().requires_grad_()
            got = fn(x, mask, how, 4)
            _scalar_with_grad(got, how)
            assert abs(got.item() - want) < 1e-6, (
                f"per_token [[1, 2, 3, x], [4, x, x, x]], answer lengths [3, 1] ({dtype} mask), max_new_tokens 4: "
                f"{how} gives {want} (sequence: (2 + 4) / 2; token: 10 / 4; constant: (6/4 + 4/4) / 2); "
                f"got {got.item():.4f}")
    # Random rows with garbage after each end, against loops in float64; and the weight of every token (gradient)
    g = torch.Generator().manual_seed(0)
    lengths = [6, 1, 3, 6, 2]
    per_token = torch.randn(5, 6, generator=g)
    per_token[~_lengths_mask(lengths, 6, torch.bool)] = 1000.0
    total = sum(lengths)
    for how in ("sequence", "token", "constant"):
        for max_new_tokens in (6, 10):
            want = aggregate_by_hand(per_token, lengths, how, max_new_tokens)
            x = per_token.clone().requires_grad_()
            got = fn(x, _lengths_mask(lengths, 6), how, max_new_tokens)
            _scalar_with_grad(got, how)
            assert abs(got.item() - want) < 1e-5, (
                f"answer lengths {lengths}, max_new_tokens {max_new_tokens}: {how} should be {want:.6f} (a loop over "
                f"the answers' own tokens), got {got.item():.6f}")
            got.backward()
            weight = {"sequence": lambda n: 1 / (len(lengths) * n), "token": lambda n: 1 / total,
                      "constant": lambda n: 1 / (len(lengths) * max_new_tokens)}[how]
            rule = {"sequence": "1 / (B L)", "token": "1 / (all answer tokens)",
                    "constant": "1 / (B max_new_tokens)"}[how]
            want_grad = torch.tensor([[weight(n) if t < n else 0.0 for t in range(6)] for n in lengths])
            assert torch.allclose(x.grad, want_grad, atol=1e-7), (
                f"{how}, answer lengths {lengths}: each token's weight (the gradient) should be {rule} and 0 after "
                f"the end; got {_r(x.grad)}")
    # An unknown mode is refused
    try:
        fn(per_token, _lengths_mask(lengths, 6), "mean", 6)
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001  (say which exception it was)
        raise AssertionError(f"an unknown loss_agg should raise ValueError, not {type(err).__name__}") from err
    else:
        raise AssertionError("how = 'mean' is not one of sequence, token, constant: raise ValueError")


def _agg_always_token(per_token, mask, how, max_new_tokens):  # the token mean when sequence was asked
    return solutions.ex03_aggregate(per_token, mask, "token", max_new_tokens)


def _agg_sequence_over_all_columns(per_token, mask, how, max_new_tokens):  # the padding counts in each row's mean
    if how == "sequence":
        return (per_token * mask.float()).mean(1).mean()
    return solutions.ex03_aggregate(per_token, mask, how, max_new_tokens)


def _agg_constant_by_length(per_token, mask, how, max_new_tokens):  # that is the sequence mean again
    return solutions.ex03_aggregate(per_token, mask, "sequence" if how == "constant" else how, max_new_tokens)


def _agg_constant_no_batch_mean(per_token, mask, how, max_new_tokens):  # summed over the batch
    if how == "constant":
        return (per_token * mask.float()).sum() / max_new_tokens
    return solutions.ex03_aggregate(per_token, mask, how, max_new_tokens)


def _agg_unmasked(per_token, mask, how, max_new_tokens):  # garbage after the end counted
    lengths = mask.float().sum(1)
    if how == "token":
        return per_token.sum() / lengths.sum()
    if how == "sequence":
        return (per_token.sum(1) / lengths).mean()
    return (per_token.sum(1) / max_new_tokens).mean()


def _agg_unknown_accepted(per_token, mask, how, max_new_tokens):  # an unknown name silently becomes the token mean
    if how not in ("sequence", "constant"):
        how = "token"
    return solutions.ex03_aggregate(per_token, mask, how, max_new_tokens)


# --- ex04: the GRPO loss ------------------------------------------------------------------------------------


def grpo_loss_by_hand(logp, old, ref, adv, lengths, eps, beta, how, max_new_tokens):
    """In float64, token by token: the clipped surrogate plus beta k3, aggregated; and d loss / d logp."""
    B = len(lengths)
    total = sum(lengths)
    weight = {"sequence": lambda n: 1 / (B * n), "token": lambda n: 1 / total,
              "constant": lambda n: 1 / (B * max_new_tokens)}[how]
    loss, grads = 0.0, torch.zeros(logp.shape, dtype=torch.float64)
    for b, n in enumerate(lengths):
        a = adv[b].item()
        for t in range(n):
            r = math.exp(logp[b, t].item() - old[b, t].item())
            r_ref = math.exp(ref[b, t].item() - logp[b, t].item())  # pi_ref / pi
            clipped = min(max(r, 1 - eps), 1 + eps)
            policy = max(-a * r, -a * clipped)
            k3 = (r_ref - 1) - math.log(r_ref)
            loss += weight(n) * (policy + beta * k3)
            # the unclipped term decides unless the clip is active and the clipped term is the worse one
            d_policy = -a * r if -a * r >= -a * clipped else 0.0
            grads[b, t] = weight(n) * (d_policy + beta * (1 - r_ref))  # d k3 / d log pi = 1 - pi_ref / pi
    return loss, grads


def check_ex04_grpo_loss(fn):
    mask = torch.ones(2, 3)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
    adv = torch.tensor([1.0, -2.0])
    # Ratio 1 and the policy = the reference: -mean A, no KL
    got = fn(old.clone().requires_grad_(), old, old, adv, mask, 0.2, 0.1)
    _scalar_with_grad(got, "ratio 1")
    assert abs(got.item() - 0.5) < 1e-6, (
        f"ratio 1, policy = reference, advantages [1, -2]: the loss is -mean(A) = 0.5 (k3 = 0); got {got.item():.4f}")
    # Ratio 1.5 for answer 1 (A = 1: clipped at 1.2), 0.5 for answer 2 (A = -2: clipped at 0.8), no KL term
    new = old + torch.log(torch.tensor([[1.5], [0.5]]))
    got = fn(new.clone().requires_grad_(), old, new, adv, mask, 0.2, 0.0).item()
    assert abs(got - (-1.2 + 2 * 0.8) / 2) < 1e-6, (
        f"ratios 1.5 (A = +1) and 0.5 (A = -2), clip 0.2: both clipped, (-1.2 + 2 x 0.8) / 2 = 0.2; got {got:.4f}")
    got = fn(new.clone().requires_grad_(), old, new, -adv, mask, 0.2, 0.0).item()
    assert abs(got - (1.5 - 2 * 0.5) / 2) < 1e-6, (
        f"ratios 1.5 (A = -1) and 0.5 (A = +2): the probabilities moved the wrong way, nothing is clipped, "
        f"(1.5 - 2 x 0.5) / 2 = 0.25 (the worse, larger loss); got {got:.4f}")
    # The KL term: the reference gives every token half the policy's probability, r = 0.5
    k3 = 0.5 - 1 - math.log(0.5)
    got = fn(old.clone().requires_grad_(), old, old + math.log(0.5), adv, mask, 0.2, 0.1).item()
    assert abs(got - (0.5 + 0.1 * k3)) < 1e-6, (
        f"pi_ref = pi / 2 at every token, beta 0.1: the loss is 0.5 + 0.1 x k3 with k3 = (0.5 - 1) - log 0.5 = "
        f"{k3:.4f}, so {0.5 + 0.1 * k3:.4f}; got {got:.4f}")
    # One update per rollout: REINFORCE with the group baseline, d loss / d log pi = -A x (the token's weight)
    lengths, B, R = [4, 2, 1], 3, 4
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, R, generator=g) - 1.5
    adv = torch.tensor([0.7, -1.1, 0.4])
    weight = {"sequence": lambda n: 1 / (B * n), "token": lambda n: 1 / sum(lengths), "constant": lambda n: 1 / (B * 8)}
    for how in ("sequence", "token", "constant"):
        x = logp.clone().requires_grad_()
        got = fn(x, logp, logp, adv, _lengths_mask(lengths, R), 0.2, 0.05, how, 8)
        _scalar_with_grad(got, f"one update, {how}")
        got.backward()
        want = torch.tensor([[-adv[b].item() * weight[how](n) if t < n else 0.0 for t in range(R)]
                             for b, n in enumerate(lengths)])
        assert torch.allclose(x.grad, want, atol=1e-6), (
            f"one update ({how}, max_new_tokens 8, answer lengths {lengths}, advantages {adv.tolist()}): ratio 1, "
            f"pi = pi_ref, so d loss / d log pi(token) = -A x weight (REINFORCE; the KL's gradient 1 - r is 0): "
            f"{_r(want)}; got {_r(x.grad)}")
    # Random tokens with garbage after each end, against the loss and its gradient worked out token by token
    lengths = [6, 2, 4, 1]
    old = torch.randn(4, 6, generator=g) - 2
    logp = old + torch.randn(4, 6, generator=g) * 0.3  # ratios from about 0.4 to 2.5
    ref = logp + torch.randn(4, 6, generator=g) * 0.5  # the reference somewhere else
    adv = torch.randn(4, generator=g)
    logp[~_lengths_mask(lengths, 6, torch.bool)] = 5.0  # garbage after the end: a ratio of e^7
    for how in ("sequence", "token", "constant"):
        for eps, beta in ((0.2, 0.1), (0.1, 0.5)):
            want, want_grad = grpo_loss_by_hand(logp, old, ref, adv, lengths, eps, beta, how, 10)
            for dtype in (torch.float, torch.bool):
                x = logp.clone().requires_grad_()
                got = fn(x, old, ref, adv, _lengths_mask(lengths, 6, dtype), eps, beta, how, 10)
                _scalar_with_grad(got, "random case")
                assert abs(got.item() - want) < 1e-5, (
                    f"answer lengths {lengths}, clip {eps}, beta {beta}, {how} ({dtype} mask): loss {got.item():.6f}, "
                    f"worked out token by token {want:.6f}")
                got.backward()
                assert torch.allclose(x.grad.double(), want_grad, atol=1e-6), (
                    f"clip {eps}, beta {beta}, {how}: d loss / d logprobs differs from the hand-derived gradient "
                    f"(weight x (-A ratio, or 0 where the clip took over, + beta (1 - pi_ref / pi))) by up to "
                    f"{(x.grad.double() - want_grad).abs().max():.2e}")
    # The default aggregation is sequence, over max_new_tokens = 32
    got = fn(logp, old, ref, adv, _lengths_mask(lengths, 6), 0.2, 0.1).item()
    want, _ = grpo_loss_by_hand(logp, old, ref, adv, lengths, 0.2, 0.1, "sequence", 32)
    assert abs(got - want) < 1e-5, f"called without loss_agg: the default is sequence; {want:.6f}, got {got:.6f}"


def _loss_min(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef, loss_agg="sequence",
              max_new_tokens=32):  # the optimistic bound
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    policy = torch.min(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = solutions.ex02_k3_kl(logprobs, ref_logprobs)
    return solutions.ex03_aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)


def _loss_kl_swapped(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                     loss_agg="sequence", max_new_tokens=32):  # k3 of the other direction
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    policy = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = solutions.ex02_k3_kl(ref_logprobs, logprobs)
    return solutions.ex03_aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)


def _loss_kl_sign(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef, loss_agg="sequence",
                  max_new_tokens=32):  # a bonus for drifting away
    return solutions.ex04_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, -kl_coef,
                                    loss_agg, max_new_tokens)


def _loss_kl_detached(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                      loss_agg="sequence", max_new_tokens=32):  # the right value, and no pull toward the reference
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    policy = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = solutions.ex02_k3_kl(logprobs.detach(), ref_logprobs)
    return solutions.ex03_aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)


def _loss_always_token(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                       loss_agg="sequence", max_new_tokens=32):  # loss_agg ignored
    return solutions.ex04_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                                    "token", max_new_tokens)


def _loss_kl_token_mean(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                        loss_agg="sequence", max_new_tokens=32):  # the KL averaged apart from the policy term
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    policy = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = solutions.ex02_k3_kl(logprobs, ref_logprobs)
    return (solutions.ex03_aggregate(policy, mask, loss_agg, max_new_tokens)
            + kl_coef * solutions.ex03_aggregate(kl, mask, "token", max_new_tokens))


def _loss_clamps_log_ratio(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                           loss_agg="sequence", max_new_tokens=32):  # e^0.2 = 1.2214, not 1.2
    log_ratio, A = logprobs - old_logprobs, advantages[:, None]
    policy = torch.max(-A * log_ratio.exp(), -A * log_ratio.clamp(-clip_range, clip_range).exp())
    kl = solutions.ex02_k3_kl(logprobs, ref_logprobs)
    return solutions.ex03_aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)


def _loss_kl_is_k1(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef,
                   loss_agg="sequence", max_new_tokens=32):  # log pi - log pi_ref: its gradient is a constant push
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    policy = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    return solutions.ex03_aggregate(policy + kl_coef * (logprobs - ref_logprobs), mask, loss_agg, max_new_tokens)


# --- ex05: pass@k ---------------------------------------------------------------------------------------------


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """Every subset of k of the n samples (the first c right), counted: the fraction that holds a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in subset) for subset in subsets), len(subsets))


def check_ex05_pass_at_k(fn):
    hand = [((4, 1, 1), 0.25, "pass@1 = c / n"), ((4, 1, 2), 0.5, "1 - C(3, 2) / C(4, 2) = 1 - 3/6"),
            ((4, 1, 4), 1.0, "4 draws from 4 samples: the right one is among them"),
            ((5, 0, 3), 0.0, "no right sample: 0"), ((10, 3, 8), 1.0, "only 7 wrong samples: 8 draws hold a right one"),
            ((8, 2, 3), 1 - 20 / 56, "1 - C(6, 3) / C(8, 3) = 1 - 20/56")]
    for (n, c, k), want, why in hand:
        got = fn(n, c, k)
        assert abs(float(got) - want) < 1e-12, f"n {n}, c {c}, k {k}: {why} = {want:.6f}; got {got!r}"
    # Every case up to n = 8, against all the subsets enumerated
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = pass_at_k_by_enumeration(n, c, k)
                got = float(fn(n, c, k))
                assert abs(got - float(want)) < 1e-12, (
                    f"n {n}, c {c}, k {k}: of the C({n}, {k}) = {math.comb(n, k)} subsets of {k} samples, a fraction "
                    f"{float(want):.6f} holds a right answer; got {got:.6f}")
    # Unbiased: if each sample is right with probability p, the expectation over c ~ Binomial(n, p) is 1 - (1 - p)^k
    for n, p, k in ((10, 0.3, 4), (16, 0.05, 8), (20, 0.6, 1), (12, 0.15, 12)):
        expectation = math.fsum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * float(fn(n, c, k)) for c in range(n + 1))
        assert abs(expectation - (1 - (1 - p) ** k)) < 1e-10, (
            f"n {n}, each sample right with probability {p}: the expectation of your pass@{k} over c ~ Binomial(n, p) "
            f"is {expectation:.6f}, but pass@{k} = 1 - (1 - p)^{k} = {1 - (1 - p) ** k:.6f}: the estimator is biased")
    # Large n (HumanEval's 200 samples), against exact fractions
    for n, c, k in ((200, 3, 100), (200, 1, 1), (200, 150, 10), (1000, 7, 500)):
        want = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = float(fn(n, c, k))
        assert math.isfinite(got) and abs(got - float(want)) < 1e-9, (
            f"n {n}, c {c}, k {k}: 1 - C(n - c, k) / C(n, k) = {float(want):.9f} exactly; got {got}")
    # Impossible inputs are refused
    for n, c, k in ((4, 1, 5), (4, 1, 0), (4, 5, 2), (4, -1, 2)):
        try:
            fn(n, c, k)
        except ValueError:
            continue
        except Exception as err:  # noqa: BLE001  (say which exception it was)
            raise AssertionError(f"n {n}, c {c}, k {k}: raise ValueError, not {type(err).__name__}") from err
        raise AssertionError(f"n {n}, c {c}, k {k}: need 0 <= c <= n and 1 <= k <= n; raise ValueError")


def _pass_with_replacement(n, c, k):  # 1 - (1 - c/n)^k: biased low
    solutions.ex05_pass_at_k(n, c, k)  # the same ValueErrors
    return 1 - (1 - c / n) ** k


def _pass_is_pass_at_1(n, c, k):
    solutions.ex05_pass_at_k(n, c, k)
    return c / n


def _pass_any_right(n, c, k):  # part 6's pass@K, right only for k = n
    solutions.ex05_pass_at_k(n, c, k)
    return float(c > 0)


def _pass_comb_typo(n, c, k):  # C(n, c) where C(n, k) belongs
    solutions.ex05_pass_at_k(n, c, k)
    return 1 - math.comb(n - c, k) / math.comb(n, c)


def _pass_accepts_k_above_n(n, c, k):  # pass@5 from 4 samples is not an estimate of anything
    if not 0 <= c <= n or k < 1:
        raise ValueError("bad input")
    return 1.0 - math.comb(n - c, k) / math.comb(n, min(k, n))


# --- ex06: the expected fraction of flat groups ------------------------------------------------------------------


def flat_fraction_by_enumeration(rates: list[float], G: int) -> float:
    """Every one of the 2^G outcomes of a group, with its probability: the chance that all answers agree."""
    per_prompt = []
    for p in rates:
        total = 0.0
        for outcome in itertools.product((0, 1), repeat=G):
            if len(set(outcome)) == 1:
                total += math.prod(p if right else 1 - p for right in outcome)
        per_prompt.append(total)
    return statistics.fmean(per_prompt)


def check_ex06_flat_group_fraction(fn):
    hand = [([0.5], 2, 0.5, "p 0.5, G 2: both right 0.25 + both wrong 0.25"),
            ([0.9], 8, 0.9**8 + 0.1**8, "p 0.9, G 8: 0.9^8 + 0.1^8 = 0.4305"),
            ([0.0, 1.0], 4, 1.0, "never right, always right: every group is flat"),
            ([0.0, 0.5], 2, (1 + 0.5) / 2, "a prompt never solved (flat for sure) and a coin flip (0.5): 0.75")]
    for rates, G, want, why in hand:
        got = float(fn(torch.tensor(rates, dtype=torch.float64), G))
        assert abs(got - want) < 1e-9, f"success rates {rates}, group size {G}: {why}; got {got:.6f}"
    # Prompts of different difficulty, against the 2^G outcomes of each group enumerated
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(7, generator=g, dtype=torch.float64)
    rates[0], rates[1] = 0.0, 0.97
    for G in (2, 3, 5, 8):
        want = flat_fraction_by_enumeration(rates.tolist(), G)
        got = float(fn(rates.clone(), G))
        assert abs(got - want) < 1e-9, (
            f"success rates {_r(rates, 3)}, group size {G}: the 2^{G} outcomes of each group enumerated give a "
            f"flat fraction {want:.6f}, got {got:.6f} (average over prompts the chance that all G agree)")


def _flat_all_right_only(success_rates, group_size):
    return (success_rates**group_size).mean().item()


def _flat_all_wrong_only(success_rates, group_size):
    return ((1 - success_rates) ** group_size).mean().item()


def _flat_is_pass_at_g(success_rates, group_size):  # P(at least one right): the opposite question
    return (1 - (1 - success_rates) ** group_size).mean().item()


def _flat_off_by_one(success_rates, group_size):
    return solutions.ex06_flat_group_fraction(success_rates, group_size - 1)


def _flat_of_the_mean_rate(success_rates, group_size):  # f(mean p), not mean f(p)
    return solutions.ex06_flat_group_fraction(success_rates.mean()[None], group_size)


CASES = [
    Exercise("ex01_group_advantages", check_ex01_group_advantages, wrong=[
        _adv_population_std, _adv_wrong_stride, _adv_whole_batch, _adv_no_eps, _adv_ignores_eps, _adv_ignores_scale,
        _adv_flag_per_answer, _adv_flag_all_wrong_only]),
    Exercise("ex02_k3_kl", check_ex02_k3_kl, wrong=[
        _k3_swapped, _k3_is_k1, _k3_is_k2, _k3_without_minus_one, _k3_naive_exp]),
    Exercise("ex03_aggregate", check_ex03_aggregate, wrong=[
        _agg_always_token, _agg_sequence_over_all_columns, _agg_constant_by_length, _agg_constant_no_batch_mean,
        _agg_unmasked, _agg_unknown_accepted]),
    Exercise("ex04_grpo_loss", check_ex04_grpo_loss, wrong=[
        _loss_min, _loss_kl_swapped, _loss_kl_sign, _loss_kl_detached, _loss_always_token, _loss_kl_token_mean,
        _loss_clamps_log_ratio, _loss_kl_is_k1]),
    Exercise("ex05_pass_at_k", check_ex05_pass_at_k, wrong=[
        _pass_with_replacement, _pass_is_pass_at_1, _pass_any_right, _pass_comb_typo, _pass_accepts_k_above_n]),
    Exercise("ex06_flat_group_fraction", check_ex06_flat_group_fraction, wrong=[
        _flat_all_right_only, _flat_all_wrong_only, _flat_is_pass_at_g, _flat_off_by_one, _flat_of_the_mean_rate]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
