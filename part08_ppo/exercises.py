"""Part 8 exercises: the pieces of PPO, from the sampled tokens' log-probs to the two clipped losses.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part08_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (a Python loop over positions in float64, the
log-probs a small model sampled with, -F.cross_entropy, the exact KL of small categorical distributions,
the GAE sum written out term by term, statistics.pstdev over the answer tokens, numbers worked out by hand,
and the gradients those numbers imply). The reference answers are in solutions.py (try first, then peek).

Shapes, as in train.py: B answers (rows), R response positions (columns, the longest answer; shorter answers
are followed by positions that do not belong to them), and a response mask (B, R), True (or 1.0) for the
answer's own tokens: a prefix of each row, up to and including its stop token.
"""
import torch
import torch.nn.functional as F  # noqa: F401  (F.log_softmax)


def ex01_response_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int,
                           temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens ids[:, prompt_len:] under the tempered distribution.

    logits (B, T, vocab): one forward pass of the policy over the whole sequences ids (B, T), the prompt (its
    first prompt_len columns) followed by the R = T - prompt_len response tokens. Return, for every response
    position j, log softmax(logits[b, t - 1] / temperature)[ids[b, t]] with t = prompt_len + j.

    Two things to get right, or the PPO ratio pi / pi_old compares two different numbers:
    - the shift: the logits at position t predict the token at t + 1, so the response token at t is scored
      by the logits at t - 1 (logits[:, prompt_len - 1 : -1]), not by its own position's logits;
    - the temperature: the rollout sampled from softmax(logits / temperature); the log-probs of the ratio
      and of the KL must be of that same distribution. Untempered log-probs are wrong at temperature != 1.
    Log-softmax over the vocabulary (the last dimension), in float32 (.float()), then pick the sampled token
    with .gather(-1, ...). Not log(softmax(...)): it underflows to -inf for unlikely tokens.
    """
    raise NotImplementedError


def ex02_kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref), same shape as the inputs, from tokens sampled from pi.

    logprobs = log pi(token), ref_logprobs = log pi_ref(token) (the frozen SFT model), for the same tokens.
    KL(pi || pi_ref) = E_{token ~ pi}[log pi - log pi_ref]; one sampled token gives an estimate of it
    (Schulman 2020, http://joschu.net/blog/kl-approx.html). With log_ratio = logprobs - ref_logprobs:
        "k1": log_ratio. Unbiased; but a single token's estimate is negative wherever pi_ref > pi.
        "k3": (r - 1) - log r with r = pi_ref / pi = exp(-log_ratio). Unbiased too (E_pi[r] = 1), and never
              negative (log r <= r - 1). Use torch.expm1(-log_ratio) for r - 1: exact for small ratios.
    Any other estimator: raise ValueError.
    Plausible slips the check catches: log_ratio the other way round (pi_ref / pi in k1: the expectation is
    -KL); r = pi / pi_ref in k3 (still >= 0, but biased: its expectation is not the KL); 0.5 log_ratio^2
    ("k2": low variance, biased); (r - log r) without the -1.
    """
    raise NotImplementedError


def ex03_token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """The reward (B, R) of every response token: a KL penalty at each token, the score at the last one.

    scores (B,): the reward model's score of each finished answer. kl (B, R): per-token KL estimates
    (ex02; they may hold garbage after an answer's end). response_mask (B, R): bool or 0/1 float.
        reward[b, t] = -kl_coef * kl[b, t]                 at the answer's tokens
                     + scores[b]                          at the answer's LAST token only
                     = 0                                  after the answer (mask False)
    The last token of row b is at index mask[b].sum() - 1 (its stop token, if it stopped), not the last
    column: a short answer ends before the padding. Do not change the inputs in place. Return float values.
    Plausible slips the check catches: the score in the last column; the score at index mask.sum() (one
    past the end); the score at every token; a penalty after the answer's end (kl not masked); +kl_coef.
    """
    raise NotImplementedError


def ex04_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438): returns
    (advantages, returns), each (B, R).

    rewards, values (B, R): per-token rewards (ex03) and the critic's values V_t; both may hold garbage
    after an answer's end (mask False), which must not leak in. The value after an answer's last token is
    0: the episode is over (there is nothing to bootstrap from).
        delta_t = r_t + gamma * V_{t+1} - V_t                     (V_{t+1} = 0 after the last token)
        A_t     = delta_t + (gamma * lam) * A_{t+1}               (A = 0 after the last token)
                = sum_k (gamma * lam)^k * delta_{t+k}
        returns = A + V                                           (the value head's targets)
    and 0 for both at positions after the answer. lam = 0: one-step TD errors; lam = 1 (gamma = 1): the
    rewards still to come minus V_t. Hint: one loop over t from R - 1 down to 0, vectorised over rows;
    multiply rewards and values by the mask first.
    Plausible slips the check catches: advantages = the raw rewards, or the rewards to go without the
    baseline V; bootstrapping from the garbage value after the end; discounting by lam alone;
    returns = advantages (no + V).
    """
    raise NotImplementedError


def ex05_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage whitening over the answer tokens only: (x - mean) / sqrt(var + 1e-8) there, 0 elsewhere.

    mean and var are over the entries where mask is True (or 1.0), all rows together: var is the mean
    squared deviation (divide by the number of answer tokens, not by one less, as torch.var's default
    does). The padding's values must not count (they are zeros, or garbage) and the output is 0 there.
    Why: the step size stops depending on the rewards' scale, and about half the tokens are pushed up,
    half down.
    Plausible slips the check catches: mean and std over every entry, padding included; the unbiased
    variance; padding left non-zero; dividing by the std without subtracting the mean.
    """
    raise NotImplementedError


def ex06_clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate loss (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), a scalar.

    ratio = pi(token) / pi_old(token) = exp(logprobs - old_logprobs): logprobs from the policy being trained
    (with gradients), old_logprobs from the rollout (fixed). Per token, the loss is the WORSE (larger) of
        -A * ratio     and     -A * clamp(ratio, 1 - clip_range, 1 + clip_range),
    and the result is its mean over the answer tokens (mask): sum(loss * mask) / sum(mask).
    The max of the losses is the min of the objectives ratio * A: a pessimistic bound. Once a token's
    probability has moved by clip_range in the advantage's direction the clipped term wins and its gradient
    is 0; moving in the wrong direction is never clipped.
        A = +1, ratio 1.5 -> 1.2 (clipped)      A = +1, ratio 0.5 -> 0.5 (not clipped: it got worse)
        A = -1, ratio 0.5 -> 0.8 (clipped)      A = -1, ratio 1.5 -> 1.5
    Return a 0-dim tensor that gradients flow through to logprobs.
    Plausible slips the check catches: no clipping; min instead of max (the optimistic bound); clamping
    the log-ratio to +-clip_range instead of the ratio; the log-ratio as the ratio; a mean over every
    position, padding included; the wrong sign.
    """
    raise NotImplementedError


def ex07_clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                            mask: torch.Tensor, clip_range_value: float) -> torch.Tensor:
    """The clipped value loss of PPO implementations (OpenAI baselines' ppo2), a scalar.

    values (B, R): the critic's new predictions (with gradients); old_values: its predictions when the
    rollout was made (fixed); returns: the targets (ex04). The new value may step at most clip_range_value
    from the old one for free:
        clipped = old_values + clamp(values - old_values, -clip_range_value, +clip_range_value)
        loss    = 0.5 * max((values - returns)^2, (clipped - returns)^2)          per token
    and the result is its mean over the answer tokens (mask). Again the larger loss, the pessimistic one.
        old 0, return 1, new 0.9: max(0.1^2, (0.2 - 1)^2) = 0.64, times 0.5 = 0.32
    Return a 0-dim tensor that gradients flow through to values.
    Plausible slips the check catches: min instead of max; the clipped term alone; clamping the values
    themselves to +-clip_range_value (not their step from old_values); no 0.5; padding counted.
    """
    raise NotImplementedError
