"""Part 8 exercises: each check compares against an outside reference and rejects plausible slips."""
import math
import statistics

import torch
from torch.nn import functional as F

from part08_ppo import exercises, solutions
from part08_ppo.model import GPT, GPTConfig
from tests.harness import Exercise, exercise_tests


def _lengths_mask(lengths: list[int], R: int, dtype=torch.float) -> torch.Tensor:
    """A response mask (B, R): row b is True for its first lengths[b] positions."""
    return torch.tensor([[t < n for t in range(R)] for n in lengths], dtype=dtype)


def _r(t: torch.Tensor, digits: int = 4) -> list:
    """A tensor as (nested) lists of rounded numbers, for messages."""
    return torch.round(t.double(), decimals=digits).tolist()


def _scalar_with_grad(got, what: str) -> None:
    assert torch.is_tensor(got) and got.dim() == 0, (
        f"{what}: return a scalar (0-dim) tensor, the mean over the answer tokens; got "
        f"{tuple(got.shape) if torch.is_tensor(got) else got!r}")
    assert got.requires_grad, f"{what}: no gradient flows through the loss: keep the computation in torch"


# --- ex01: the log-probs of the response tokens ---------------------------------------------------------------


def logprobs_by_hand(logits, ids, prompt_len, temperature):
    """Position by position in float64: log softmax(logits[b, t - 1] / temperature)[ids[b, t]]."""
    B, T, _ = logits.shape
    out = [[0.0] * (T - prompt_len) for _ in range(B)]
    for b in range(B):
        for t in range(prompt_len, T):
            row = [v / temperature for v in logits[b, t - 1].double().tolist()]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            out[b][t - prompt_len] = row[ids[b, t].item()] - log_z
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def sample_without_cache(model, prompts: torch.Tensor, n_new: int, temperature: float):
    """The rollout written plainly: the whole sequence through the model at every step (no KV cache, no
    padding), sample from softmax(logits / temperature), keep the sampled token's log-prob."""
    ids, logprobs = prompts, []
    for _ in range(n_new):
        logp = torch.log_softmax(model(ids)[0][:, -1].double() / temperature, dim=-1)
        token = torch.multinomial(logp.exp(), 1)
        logprobs.append(logp.gather(-1, token))
        ids = torch.cat((ids, token), dim=1)
    return ids, torch.cat(logprobs, dim=1)


def check_ex01_response_logprobs(fn):
    g = torch.Generator().manual_seed(0)
    B, T, V, P = 3, 9, 11, 4
    logits = torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(V, (B, T), generator=g)
    for temperature in (1.0, 0.7, 2.0):
        got = fn(logits.clone(), ids.clone(), P, temperature)
        assert torch.is_tensor(got) and tuple(got.shape) == (B, T - P), (
            f"expected (B, R) = ({B}, {T - P}): one log-prob per response token, got "
            f"{tuple(got.shape) if torch.is_tensor(got) else got!r}")
        want = logprobs_by_hand(logits, ids, P, temperature)
        assert torch.allclose(got.double(), want, atol=1e-5), (
            f"temperature {temperature}: your log-probs differ from log softmax(logits[b, t - 1] / temperature)"
            f"[ids[b, t]] (written out position by position) by up to {(got.double() - want).abs().max():.4f}. "
            "Is it the shift (the logits at t - 1 score the token at t), the temperature, or log-softmax over "
            "the vocabulary?")
    # The same numbers from torch's own loss: -cross_entropy of the shifted, tempered logits
    want = -F.cross_entropy(logits[:, P - 1 : -1].transpose(1, 2) / 0.7, ids[:, P:], reduction="none")
    assert torch.allclose(fn(logits, ids, P, 0.7).float(), want, atol=1e-5), "differs from -F.cross_entropy"
    # The default temperature is 1
    assert torch.allclose(fn(logits, ids, P).double(), logprobs_by_hand(logits, ids, P, 1.0), atol=1e-5), (
        "called without a temperature: the default is 1.0")
    # In a model: the log-probs a rollout sampled with, recomputed in one forward pass over the finished text
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)  # a peaked distribution: the temperature matters
    prompts = torch.randint(40, (4, 6))
    for temperature in (1.0, 0.6):
        ids, sampled = sample_without_cache(model, prompts, 7, temperature)
        with torch.no_grad():
            got = fn(model(ids)[0], ids, prompts.size(1), temperature)
        assert torch.allclose(got.double(), sampled, atol=1e-5), (
            f"temperature {temperature}: the log-probs the model sampled its answers with and your recomputed ones "
            f"differ by up to {(got.double() - sampled).abs().max():.4f}: the PPO ratio would not start at 1")


def _logprobs_no_shift(logits, ids, prompt_len, temperature=1.0):  # each token scored by its own position
    logp = F.log_softmax(logits[:, prompt_len:].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


def _logprobs_shift_by_two(logits, ids, prompt_len, temperature=1.0):
    logp = F.log_softmax(logits[:, prompt_len - 2 : -2].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


def _logprobs_untempered(logits, ids, prompt_len, temperature=1.0):  # the distribution not sampled from
    return solutions.ex01_response_logprobs(logits, ids, prompt_len, 1.0)


def _logprobs_times_temperature(logits, ids, prompt_len, temperature=1.0):
    return solutions.ex01_response_logprobs(logits * temperature * temperature, ids, prompt_len, temperature)


def _logprobs_softmax_over_positions(logits, ids, prompt_len, temperature=1.0):  # the wrong axis
    logp = F.log_softmax(logits[:, prompt_len - 1 : -1].float() / temperature, dim=1)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


def _logprobs_probabilities(logits, ids, prompt_len, temperature=1.0):  # probabilities, not their logs
    return solutions.ex01_response_logprobs(logits, ids, prompt_len, temperature).exp()


# --- ex02: the KL estimators ------------------------------------------------------------------------------------


KL_PAIRS = [  # (pi, pi_ref): small categorical distributions, the policy's and the reference's
    ([0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]),
    ([0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]),
    ([0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]),
    ([0.96, 0.01, 0.01, 0.02], [0.9, 0.05, 0.03, 0.02]),
]


def exact_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def check_ex02_kl_per_token(fn):
    # By hand: pi = 0.5, pi_ref = 0.25 and the other way round
    logp, logq = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    hand = {"k1": [math.log(2), -math.log(2)],  # log pi - log pi_ref
            "k3": [(0.5 - 1) + math.log(2), (2 - 1) - math.log(2)]}  # r = pi_ref / pi = 0.5, then 2
    for estimator, want in hand.items():
        got = fn(logp.clone(), logq.clone(), estimator)
        assert torch.is_tensor(got) and got.shape == logp.shape, f"{estimator}: return one estimate per token"
        assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), (
            f"{estimator}, pi = (0.5, 0.25), pi_ref = (0.25, 0.5): expected {[round(w, 6) for w in want]}, got "
            f"{[round(v, 6) for v in got.tolist()]}")
    assert torch.allclose(fn(logp, logq), torch.tensor(hand["k1"]), atol=1e-6), "the default estimator is k1"
    # Unbiased: the expectation over tokens sampled from pi is KL(pi || pi_ref), summed exactly in float64
    for p, q in KL_PAIRS:
        want = exact_kl(p, q)
        for estimator in ("k1", "k3"):
            per_token = fn(torch.tensor(p).log(), torch.tensor(q).log(), estimator).double().tolist()
            expectation = sum(pi * k for pi, k in zip(p, per_token))
            assert abs(expectation - want) < 1e-5, (
                f"{estimator}, pi = {p}, pi_ref = {q}: the expectation of your estimate under pi is {expectation:.6f}, "
                f"but KL(pi || pi_ref) = sum pi log(pi / pi_ref) = {want:.6f}: the estimator is biased")
    # k3 is never negative; k1 is, for tokens that the reference likes more than the policy does
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 50, generator=g) * 2, dim=-1)
    logq = torch.log_softmax(torch.randn(3, 50, generator=g) * 2, dim=-1)
    k3 = fn(logp, logq, "k3")
    assert k3.shape == (3, 50), f"inputs (3, 50): return (3, 50), got {tuple(k3.shape)}"
    assert (k3 >= -1e-6).all(), f"k3 = (r - 1) - log r is never negative, yours reaches {k3.min():.4f}"
    # Unknown estimators are refused
    try:
        fn(logp, logq, "k2")
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001  (say which exception it was)
        raise AssertionError(f"an unknown estimator should raise ValueError, not {type(err).__name__}") from err
    else:
        raise AssertionError("estimator 'k2' is not one of k1, k3: raise ValueError instead of returning a value")


def _kl_k1_reversed(logprobs, ref_logprobs, estimator="k1"):  # log pi_ref - log pi: the expectation is -KL
    if estimator == "k1":
        return ref_logprobs - logprobs
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, estimator)


def _kl_k3_ratio_upside_down(logprobs, ref_logprobs, estimator="k1"):  # r = pi / pi_ref: >= 0, but biased
    if estimator == "k3":
        log_r = logprobs - ref_logprobs
        return torch.expm1(log_r) - log_r
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, estimator)


def _kl_k3_is_k2(logprobs, ref_logprobs, estimator="k1"):  # 0.5 log_ratio^2: low variance, biased
    if estimator == "k3":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, estimator)


def _kl_k3_without_minus_one(logprobs, ref_logprobs, estimator="k1"):  # r - log r: off by 1 everywhere
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return log_r.exp() - log_r
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, estimator)


def _kl_k1_absolute(logprobs, ref_logprobs, estimator="k1"):  # |log ratio|: never negative, and biased
    if estimator == "k1":
        return (logprobs - ref_logprobs).abs()
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, estimator)


def _kl_anything_else_is_k3(logprobs, ref_logprobs, estimator="k1"):  # an unknown name silently accepted
    return solutions.ex02_kl_per_token(logprobs, ref_logprobs, "k1" if estimator == "k1" else "k3")


# --- ex03: the per-token rewards --------------------------------------------------------------------------------


def rewards_by_hand(scores, kl, lengths, kl_coef):
    B, R = kl.shape
    out = [[0.0] * R for _ in range(B)]
    for b in range(B):
        for t in range(lengths[b]):
            out[b][t] = -kl_coef * kl[b, t].item() + (scores[b].item() if t == lengths[b] - 1 else 0.0)
    return torch.tensor(out)


def check_ex03_token_rewards(fn):
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.2, 7.0, 9.0], [0.2, 0.2, 0.2, 0.2]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    lengths = [3, 2, 4]  # the last row fills every column
    # written out: -0.5 kl at the answer's tokens, the score added at its last token, 0 after it
    want = torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25, 0.1 - 1.0, 0.0, 0.0], [-0.1, -0.1, -0.1, -0.1 + 0.5]])
    for dtype in (torch.bool, torch.float):
        mask = _lengths_mask(lengths, 4, dtype)
        kl_in, scores_in, mask_in = kl.clone(), scores.clone(), mask.clone()
        got = fn(scores_in, kl_in, mask_in, 0.5)
        assert torch.is_tensor(got) and tuple(got.shape) == (3, 4), (
            f"expected (B, R) = (3, 4), got {tuple(got.shape) if torch.is_tensor(got) else got!r}")
        assert torch.equal(kl_in, kl) and torch.equal(scores_in, scores) and torch.equal(mask_in, mask), (
            "your function changed its inputs in place: build a new tensor")
        assert torch.allclose(got.float(), want, atol=1e-6), (
            f"scores {_r(scores)}, kl {_r(kl)}, answer lengths {lengths} ({dtype} mask), kl_coef 0.5: "
            f"expected {_r(want)}, got {_r(got)} (the score goes to each answer's last token, -kl_coef * kl to every "
            "answer token, nothing after the answer)")
    # Random rows, against a loop over positions
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 4, 7, 2, 5]
    kl, scores = torch.randn(6, 7, generator=g), torch.randn(6, generator=g) * 3
    got = fn(scores, kl, _lengths_mask(lengths, 7), 0.1)
    want = rewards_by_hand(scores, kl, lengths, 0.1)
    assert torch.allclose(got.float(), want, atol=1e-6), (
        f"answer lengths {lengths}: differs from a loop over positions by up to {(got - want).abs().max():.4f}")


def _rewards_score_in_last_column(scores, kl, response_mask, kl_coef):  # a short answer ends before it
    rewards = -kl_coef * kl * response_mask.float()
    rewards[:, -1] += scores
    return rewards


def _rewards_score_one_past_the_end(scores, kl, response_mask, kl_coef):  # mask.sum() is a count, not an index
    rewards = -kl_coef * kl * response_mask.float()
    last = response_mask.float().sum(1).long().clamp(max=kl.size(1) - 1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def _rewards_score_everywhere(scores, kl, response_mask, kl_coef):
    return (-kl_coef * kl + scores[:, None]) * response_mask.float()


def _rewards_unmasked_penalty(scores, kl, response_mask, kl_coef):  # garbage KL after the end is charged
    rewards = -kl_coef * kl.clone()
    rewards[torch.arange(len(scores)), response_mask.float().sum(1).long() - 1] += scores
    return rewards


def _rewards_penalty_sign(scores, kl, response_mask, kl_coef):  # a bonus for drifting away
    return solutions.ex03_token_rewards(scores, -kl, response_mask, kl_coef)


def _rewards_score_at_first_token(scores, kl, response_mask, kl_coef):
    rewards = -kl_coef * kl * response_mask.float()
    rewards[:, 0] += scores
    return rewards


# --- ex04: GAE ------------------------------------------------------------------------------------------------


def gae_by_hand(rewards, values, lengths, gamma, lam):
    """The sum A_t = sum_k (gamma lam)^k delta_{t+k}, term by term, with V = 0 after each answer's end."""
    B, R = rewards.shape
    advantages, returns = [[0.0] * R for _ in range(B)], [[0.0] * R for _ in range(B)]
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            returns[b][t] = advantages[b][t] + v[t]
    return torch.tensor(advantages), torch.tensor(returns)


def _pair(got, what):
    assert isinstance(got, tuple) and len(got) == 2 and all(torch.is_tensor(x) for x in got), (
        f"{what}: return a tuple (advantages, returns) of two tensors, got {type(got).__name__}")
    return got


def check_ex04_gae(fn):
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [0.1, 0.6, 7.0]])  # row 2 ends after 2 tokens: its 5.0 and 7.0 are garbage
    mask = _lengths_mask([3, 2], 3)
    # gamma 0.9, lam 0.5, so gamma lam = 0.45
    # row 1: delta = [0 + .9 .4 - .5, 0 + .9 .8 - .4, 1 - .8] = [-.14, .32, .2]; A = [-.14 + .45 .41, .32 + .45 .2, .2]
    # row 2: delta = [0 + .9 .6 - .1, 2 - .6] = [.44, 1.4] (V after the end is 0); A = [.44 + .45 1.4, 1.4, 0]
    want_a = torch.tensor([[0.0445, 0.41, 0.2], [1.07, 1.4, 0.0]])
    want_r = torch.tensor([[0.5445, 0.81, 1.0], [1.17, 2.0, 0.0]])  # A + V, 0 after the end
    for dtype in (torch.float, torch.bool):
        advantages, returns = _pair(fn(rewards.clone(), values.clone(), mask.to(dtype), 0.9, 0.5), "gamma 0.9, lam 0.5")
        assert torch.allclose(advantages, want_a, atol=1e-5), (
            f"rewards {_r(rewards)}, values {_r(values)}, answer lengths [3, 2], gamma 0.9, lam 0.5 "
            f"({dtype} mask): advantages worked out by hand {_r(want_a)}, got {_r(advantages)}")
        assert torch.allclose(returns, want_r, atol=1e-5), (
            f"the same case: returns = advantages + values = {_r(want_r)} (0 after the end), got {_r(returns)}")
    # lam = 1, gamma = 1: Monte Carlo, the rewards still to come minus the value
    advantages, _ = _pair(fn(rewards, values, mask, 1.0, 1.0), "gamma 1, lam 1")
    want = torch.tensor([[1 - 0.5, 1 - 0.4, 1 - 0.8], [2 - 0.1, 2 - 0.6, 0.0]])
    assert torch.allclose(advantages, want, atol=1e-5), (
        f"gamma = lam = 1: A_t = (sum of the rewards from t on) - V_t = {_r(want)}, got {_r(advantages)}")
    # lam = 0: the one-step TD errors
    advantages, _ = _pair(fn(rewards, values, mask, 1.0, 0.0), "gamma 1, lam 0")
    want = torch.tensor([[0.4 - 0.5, 0.8 - 0.4, 1 - 0.8], [0.6 - 0.1, 2 - 0.6, 0.0]])
    assert torch.allclose(advantages, want, atol=1e-5), (
        f"lam = 0: A_t = delta_t = r_t + V_(t+1) - V_t = {_r(want)}, got {_r(advantages)}")
    # Random rows with garbage after each end, against the sum written out term by term
    g = torch.Generator().manual_seed(0)
    lengths = [9, 1, 4, 7, 2]
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    outside = ~_lengths_mask(lengths, 9, torch.bool)
    rewards[outside], values[outside] = 50.0, -30.0  # what the policy generated after stopping: must not count
    want_a, want_r = gae_by_hand(rewards, values, lengths, 0.97, 0.8)
    advantages, returns = _pair(fn(rewards, values, _lengths_mask(lengths, 9), 0.97, 0.8), "random case")
    assert torch.allclose(advantages, want_a, atol=1e-4), (
        f"answer lengths {lengths}, gamma 0.97, lam 0.8: the advantages differ from sum_k (gamma lam)^k "
        f"delta_(t+k) by up to {(advantages - want_a).abs().max():.4f}")
    assert torch.allclose(returns, want_r, atol=1e-4), (
        f"the same case: the returns differ from advantages + values by up to {(returns - want_r).abs().max():.4f}")


def _gae_raw_rewards(rewards, values, mask, gamma, lam):  # no credit assignment at all
    mask = mask.float()
    return rewards * mask, (rewards + values) * mask


def _gae_rewards_to_go(rewards, values, mask, gamma, lam):  # Monte Carlo returns, no baseline V subtracted
    mask = mask.float()
    go = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] * mask[:, t] + gamma * running
        go[:, t] = running
    return go * mask, (go + values) * mask


def _gae_unmasked(rewards, values, mask, gamma, lam):  # bootstraps from the garbage value after the end
    mask = mask.float()
    advantages = torch.zeros_like(rewards)
    next_advantage, next_value = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages * mask, (advantages + values) * mask


def _gae_lam_only(rewards, values, mask, gamma, lam):  # discounts the advantages by lam, not gamma lam
    return solutions.ex04_gae(rewards, values, mask, gamma, lam / gamma if gamma else lam)


def _gae_returns_are_advantages(rewards, values, mask, gamma, lam):  # the value head would learn A, not V
    advantages, _ = solutions.ex04_gae(rewards, values, mask, gamma, lam)
    return advantages, advantages


# --- ex05: whitening ----------------------------------------------------------------------------------------


def check_ex05_whiten(fn):
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -100.0]])
    lengths = [3, 3]
    kept = [1.0, 2.0, 3.0, 4.0, 5.0, -7.0]
    mean, std = statistics.fmean(kept), statistics.pstdev(kept)  # population std: divide by n
    want = torch.tensor([[(v - mean) / std for v in kept[:3]] + [0.0], [(v - mean) / std for v in kept[3:]] + [0.0]])
    for dtype in (torch.float, torch.bool):
        got = fn(x.clone(), _lengths_mask(lengths, 4, dtype))
        assert torch.is_tensor(got) and got.shape == x.shape, "return a tensor the shape of x"
        assert torch.allclose(got, want, atol=1e-5), (
            f"x {_r(x)}, answer lengths {lengths} ({dtype} mask): over the answer tokens {kept} the mean is "
            f"{mean:.4f} and the std (divide by n) {std:.4f}, so the result is {_r(want)}; got {_r(got)}")
        assert (got[:, 3] == 0).all(), f"the padding must come out as 0, got {_r(got[:, 3])}"
    # Random rows, against statistics over the answer tokens in float64
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 8, 3]
    x = torch.randn(4, 8, generator=g) * 3 + 2
    x[~_lengths_mask(lengths, 8, torch.bool)] = 1000.0  # garbage in the padding
    kept = [x[b, t].item() for b, n in enumerate(lengths) for t in range(n)]
    mean, std = statistics.fmean(kept), statistics.pstdev(kept)
    got = fn(x, _lengths_mask(lengths, 8))
    for b, n in enumerate(lengths):
        for t in range(8):
            want = (x[b, t].item() - mean) / std if t < n else 0.0
            assert abs(got[b, t].item() - want) < 1e-4, (
                f"answer lengths {lengths}: entry [{b}, {t}] should be {want:.5f}, got {got[b, t].item():.5f} (mean "
                f"{mean:.4f} and std {std:.4f} are over the {len(kept)} answer tokens only)")
    # All answer tokens equal: every advantage is 0 (the 1e-8 keeps 0 / 0 away)
    got = fn(torch.full((2, 3), 4.0), _lengths_mask([3, 1], 3))
    assert torch.isfinite(got).all() and got.abs().max() < 1e-6, (
        f"every answer token 4.0: whitened, they are all 0; got {_r(got)} (add 1e-8 to the variance)")


def _whiten_with_padding(x, mask):  # the padding's values move the mean and the std
    mask = mask.float()
    return (x - x.mean()) / (x.var(unbiased=False) + 1e-8).sqrt() * mask


def _whiten_unbiased(x, mask):  # torch.var's default: divide by n - 1
    kept = x[mask.bool()]
    return (x - kept.mean()) / (kept.var() + 1e-8).sqrt() * mask.float()


def _whiten_padding_kept(x, mask):  # the masked positions come out as garbage instead of 0
    kept = x[mask.bool()]
    return (x - kept.mean()) / (kept.var(unbiased=False) + 1e-8).sqrt()


def _whiten_not_centred(x, mask):  # every advantage keeps its sign: all pushed up, or all down
    kept = x[mask.bool()]
    return x / (kept.var(unbiased=False) + 1e-8).sqrt() * mask.float()


# --- ex06: the clipped surrogate -----------------------------------------------------------------------------


def policy_loss_by_hand(logp, old, adv, lengths, eps):
    """In float64, token by token: max(-A r, -A clip(r)) over the answer tokens, and d loss / d logp."""
    total, n, grads = 0.0, sum(lengths), torch.zeros_like(logp, dtype=torch.float64)
    for b, length in enumerate(lengths):
        for t in range(length):
            r, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
            clipped = min(max(r, 1 - eps), 1 + eps)
            total += max(-a * r, -a * clipped)
            # the unclipped term decides unless the clip is active and helps the objective: then the gradient is 0
            grads[b, t] = -a * r / n if -a * r >= -a * clipped else 0.0
    return total / n, grads


def check_ex06_clipped_policy_loss(fn):
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    got = fn(old.clone().requires_grad_(), old, adv, mask, 0.2)
    _scalar_with_grad(got, "ratio 1")
    assert abs(got.item() + 2 / 3) < 1e-6, f"ratio 1 everywhere: the loss is -mean(A) = -0.6667, got {got.item():.4f}"
    # ratios 1.5, 0.5, 1.1: token 1 (A > 0) clipped to 1.2, token 2 (A < 0) to 0.8, token 3 inside the range
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    want = (-1 * 1.2 + 1 * 0.8 - 2 * 1.1) / 3
    got = fn(logp.clone().requires_grad_(), old, adv, mask, 0.2).item()
    assert abs(got - want) < 1e-6, (
        f"ratios [1.5, 0.5, 1.1], advantages [1, -1, 2], clip 0.2: the clipped ratios are [1.2, 0.8, 1.1], so the "
        f"loss is (-1.2 + 0.8 - 2.2) / 3 = {want:.4f}; got {got:.4f}")
    cases = [  # (ratio, advantage, the loss of the one token): the clip only applies where it helps
        (0.5, 1.0, -0.5, "A > 0, ratio 0.5: the probability fell, the unclipped -0.5 is the worse loss"),
        (1.5, -1.0, 1.5, "A < 0, ratio 1.5: the probability rose, the unclipped 1.5 is the worse loss"),
        (1.15, 1.0, -1.15, "A > 0, ratio 1.15: inside [0.8, 1.2], nothing to clip"),
    ]
    for ratio, a, want, why in cases:
        got = fn(torch.tensor([[math.log(ratio)]]), torch.zeros(1, 1), torch.tensor([[a]]), torch.ones(1, 1), 0.2)
        assert abs(got.item() - want) < 1e-6, f"{why}; got {got.item():.4f}"
    # Masked tokens count for nothing, whatever they hold
    got = fn(logp, old, adv, torch.tensor([[1.0, 0.0, 0.0]]), 0.2).item()
    assert abs(got + 1.2) < 1e-6, f"only the first token is an answer token: the loss is -1.2, got {got:.4f}"
    # Random tokens, against the loss and its gradient worked out token by token
    g = torch.Generator().manual_seed(0)
    lengths = [6, 2, 4, 1]
    old = torch.randn(4, 6, generator=g) - 2
    logp = old + torch.randn(4, 6, generator=g) * 0.3  # ratios from about 0.4 to 2.5
    adv = torch.randn(4, 6, generator=g)
    logp[~_lengths_mask(lengths, 6, torch.bool)] = 5.0  # garbage after the end: a ratio of e^7
    for eps in (0.2, 0.1):
        want, want_grad = policy_loss_by_hand(logp, old, adv, lengths, eps)
        for dtype in (torch.float, torch.bool):
            x = logp.clone().requires_grad_()
            got = fn(x, old, adv, _lengths_mask(lengths, 6, dtype), eps)
            _scalar_with_grad(got, "random case")
            assert abs(got.item() - want) < 1e-5, (
                f"answer lengths {lengths}, clip {eps} ({dtype} mask): loss {got.item():.6f}, worked out token by "
                f"token {want:.6f}")
            got.backward()
            assert torch.allclose(x.grad.double(), want_grad, atol=1e-6), (
                f"clip {eps}: d loss / d logprobs differs from the hand-derived gradient (-A ratio / n where the "
                f"unclipped term is the worse one, 0 where the clip took over) by up to "
                f"{(x.grad.double() - want_grad).abs().max():.2e}")


def _policy_unclipped(logprobs, old_logprobs, advantages, mask, clip_range):  # vanilla policy gradient
    mask = mask.float()
    return (-advantages * (logprobs - old_logprobs).exp() * mask).sum() / mask.sum()


def _policy_min(logprobs, old_logprobs, advantages, mask, clip_range):  # the optimistic bound
    mask, ratio = mask.float(), (logprobs - old_logprobs).exp()
    loss = torch.min(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return (loss * mask).sum() / mask.sum()


def _policy_clamps_log_ratio(logprobs, old_logprobs, advantages, mask, clip_range):  # e^0.2 = 1.2214, not 1.2
    mask, log_ratio = mask.float(), logprobs - old_logprobs
    ratio, clipped = log_ratio.exp(), log_ratio.clamp(-clip_range, clip_range).exp()
    return (torch.max(-advantages * ratio, -advantages * clipped) * mask).sum() / mask.sum()


def _policy_log_ratio_as_ratio(logprobs, old_logprobs, advantages, mask, clip_range):  # forgot the exp
    mask, ratio = mask.float(), logprobs - old_logprobs
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return (loss * mask).sum() / mask.sum()


def _policy_mean_with_padding(logprobs, old_logprobs, advantages, mask, clip_range):  # divides by B * R
    ratio = (logprobs - old_logprobs).exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return (loss * mask.float()).mean()


def _policy_sign(logprobs, old_logprobs, advantages, mask, clip_range):  # gradient ascent on the loss
    return -solutions.ex06_clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)


# --- ex07: the clipped value loss ------------------------------------------------------------------------------


def value_loss_by_hand(values, old, returns, lengths, eps):
    total, n, grads = 0.0, sum(lengths), torch.zeros_like(values, dtype=torch.float64)
    for b, length in enumerate(lengths):
        for t in range(length):
            v, o, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            clipped = o + min(max(v - o, -eps), eps)
            plain, clip = (v - ret) ** 2, (clipped - ret) ** 2
            total += 0.5 * max(plain, clip)
            # the clipped term is constant in v once the clip is active: no gradient when it is the larger one
            grads[b, t] = (v - ret) / n if plain >= clip else 0.0
    return total / n, grads


def check_ex07_clipped_value_loss(fn):
    one = torch.ones(1, 1)
    cases = [  # (new value, old value, return, the loss worked out by hand, why)
        (0.9, 0.0, 1.0, 0.5 * 0.8**2, "the step 0.9 counts as 0.2: max(0.1^2, 0.8^2) / 2 = 0.32"),
        (0.1, 0.0, 1.0, 0.5 * 0.9**2, "a step of 0.1 is inside the clip: (0.1 - 1)^2 / 2 = 0.405"),
        (0.5, 0.0, -1.0, 0.5 * 1.5**2, "moving away from the return: the unclipped (0.5 + 1)^2 / 2 = 1.125 is larger"),
        (1.5, 0.0, 1.0, 0.5 * 0.8**2, "overshooting to 1.5: the clipped value 0.2 is further off, (0.2 - 1)^2 / 2"),
        (2.3, 2.0, 1.0, 0.5 * 1.3**2, "old value 2: new 2.3 clips to 2.2; (2.3 - 1)^2 / 2 = 0.845 is the larger"),
        (2.5, 2.0, 3.0, 0.5 * 0.8**2, "old value 2, return 3: new 2.5 counts as 2.2, (2.2 - 3)^2 / 2 = 0.32"),
    ]
    for new, old, ret, want, why in cases:
        got = fn(torch.tensor([[new]], requires_grad=True), old * one, ret * one, one, 0.2)
        _scalar_with_grad(got, "one token")
        assert abs(got.item() - want) < 1e-6, (
            f"new value {new}, old value {old}, return {ret}, clip 0.2: {why}; got {got.item():.4f}")
    # Random tokens, with garbage after the end, against the loss and its gradient worked out token by token
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 3]
    old = torch.randn(3, 5, generator=g)
    values = old + torch.randn(3, 5, generator=g) * 0.4
    returns = torch.randn(3, 5, generator=g)
    values[~_lengths_mask(lengths, 5, torch.bool)] = 40.0
    for eps in (0.2, 0.5):
        want, want_grad = value_loss_by_hand(values, old, returns, lengths, eps)
        for dtype in (torch.float, torch.bool):
            x = values.clone().requires_grad_()
            got = fn(x, old, returns, _lengths_mask(lengths, 5, dtype), eps)
            _scalar_with_grad(got, "random case")
            assert abs(got.item() - want) < 1e-5, (
                f"answer lengths {lengths}, clip {eps} ({dtype} mask): loss {got.item():.6f}, worked out token by "
                f"token {want:.6f}")
            got.backward()
            assert torch.allclose(x.grad.double(), want_grad, atol=1e-6), (
                f"clip {eps}: d loss / d values differs from the hand-derived gradient by up to "
                f"{(x.grad.double() - want_grad).abs().max():.2e}")


def _value_min(values, old_values, returns, mask, clip_range_value):  # the optimistic bound
    mask = mask.float()
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    loss = 0.5 * torch.min((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum()


def _value_clipped_only(values, old_values, returns, mask, clip_range_value):
    mask = mask.float()
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    return (0.5 * (clipped - returns) ** 2 * mask).sum() / mask.sum()


def _value_clamps_values(values, old_values, returns, mask, clip_range_value):  # clamps the value, not its step
    mask = mask.float()
    clipped = values.clamp(-clip_range_value, clip_range_value)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum()


def _value_without_half(values, old_values, returns, mask, clip_range_value):
    return 2 * solutions.ex07_clipped_value_loss(values, old_values, returns, mask, clip_range_value)


def _value_mean_with_padding(values, old_values, returns, mask, clip_range_value):  # divides by B * R
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    return (0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask.float()).mean()


CASES = [
    Exercise("ex01_response_logprobs", check_ex01_response_logprobs, wrong=[
        _logprobs_no_shift, _logprobs_shift_by_two, _logprobs_untempered, _logprobs_times_temperature,
        _logprobs_softmax_over_positions, _logprobs_probabilities]),
    Exercise("ex02_kl_per_token", check_ex02_kl_per_token, wrong=[
        _kl_k1_reversed, _kl_k3_ratio_upside_down, _kl_k3_is_k2, _kl_k3_without_minus_one, _kl_k1_absolute,
        _kl_anything_else_is_k3]),
    Exercise("ex03_token_rewards", check_ex03_token_rewards, wrong=[
        _rewards_score_in_last_column, _rewards_score_one_past_the_end, _rewards_score_everywhere,
        _rewards_unmasked_penalty, _rewards_penalty_sign, _rewards_score_at_first_token]),
    Exercise("ex04_gae", check_ex04_gae, wrong=[
        _gae_raw_rewards, _gae_rewards_to_go, _gae_unmasked, _gae_lam_only, _gae_returns_are_advantages]),
    Exercise("ex05_whiten", check_ex05_whiten, wrong=[
        _whiten_with_padding, _whiten_unbiased, _whiten_padding_kept, _whiten_not_centred]),
    Exercise("ex06_clipped_policy_loss", check_ex06_clipped_policy_loss, wrong=[
        _policy_unclipped, _policy_min, _policy_clamps_log_ratio, _policy_log_ratio_as_ratio,
        _policy_mean_with_padding, _policy_sign]),
    Exercise("ex07_clipped_value_loss", check_ex07_clipped_value_loss, wrong=[
        _value_min, _value_clipped_only, _value_clamps_values, _value_without_half, _value_mean_with_padding]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
