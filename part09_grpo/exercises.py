"""Part 9 exercises: the pieces of GRPO, from a group's rewards to the loss, and the numbers that judge it.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part09_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (statistics.mean and statistics.stdev group by
group, the exact KL of small categorical distributions summed in float64, loops over the answers' tokens,
numbers worked out by hand and the gradients they imply, every subset of n samples enumerated with
itertools, every outcome of a group enumerated with its probability). The reference answers are in
solutions.py (try first, then peek).

Shapes, as in train.py: B answers (rows), R response positions (columns, the longest answer; shorter answers
are followed by positions that do not belong to them), and a response mask (B, R), True (or 1.0) for the
answer's own tokens: a prefix of each row. A rollout holds N = prompts x G answers, each prompt's G answers
(its group) next to each other: rows 0..G-1 answer the first prompt, rows G..2G-1 the second, and so on.
"""
import torch


def ex01_group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True,
                          eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300): each answer against its group.

    scores (N,): one reward per answer, N = prompts x group_size, each group's answers consecutive (see the
    module's docstring). Return (advantages, flat):
        advantages (N,):  (score - mean of its group) / (std of its group + eps)      with scale=True (GRPO)
                          score - mean of its group                                   with scale=False (Dr. GRPO,
                                                                                      https://arxiv.org/abs/2503.20783)
        flat (prompts,):  bool, True for a group whose scores are all equal (std exactly 0)
    The std is the SAMPLE std of the group's scores (divide by G - 1, as torch.std and statistics.stdev do).
    The mean is the baseline a critic would have to learn, counted instead. A flat group (all right, or all
    wrong) gets advantage 0 for every answer: it teaches nothing. eps keeps 0 / 0 away (0 / eps = 0).
        scores [1, 0, 0, 1,  1, 1, 1, 1], group_size 4  ->  advantages [0.866, -0.866, -0.866, 0.866, 0, 0, 0, 0]
                                                            (std of [1, 0, 0, 1] = sqrt(1/3) = 0.577), flat [F, T]
    Hint: scores.view(-1, group_size) puts one group per row. Do not change scores in place.
    Plausible slips the check catches: the population std (divide by G); groups taken with the wrong
    stride (every prompts-th answer: view(group_size, -1).T); the mean and std of the whole batch; no eps (a
    flat group gives 0 / 0 = NaN); ignoring eps or scale; one flag per answer instead of per group.
    """
    raise NotImplementedError


def ex02_k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(pi || pi_ref) for each sampled token, same shape as the inputs.

    logprobs = log pi(token) (the policy), ref_logprobs = log pi_ref(token) (the frozen SFT model), for tokens
    sampled from pi. With r = pi_ref / pi = exp(ref_logprobs - logprobs):
        k3 = (r - 1) - log r                      (Schulman 2020, http://joschu.net/blog/kl-approx.html)
    Unbiased: E_{token ~ pi}[r] = sum pi_ref = 1, so E[k3] = E[-log r] = E[log pi - log pi_ref] = KL(pi || pi_ref).
    Never negative: log r <= r - 1. GRPO adds beta x k3 of every answer token to the loss (ex04).
        pi = 0.5, pi_ref = 0.25: r = 0.5, k3 = -0.5 + log 2 = 0.1931
    Numerics: near the start the policy IS the reference and the log-ratios are tiny (1e-4); exp(x) - 1 in
    float32 then keeps only rounding noise and k3 can come out negative. torch.expm1(x) computes e^x - 1
    exactly for small x: k3 = expm1(-log_ratio) + log_ratio with log_ratio = logprobs - ref_logprobs.
    Plausible slips the check catches: r = pi / pi_ref (still >= 0, but its expectation is not the KL);
    k1 = log pi - log pi_ref (unbiased, but negative for some tokens); 0.5 log_ratio^2 ("k2", biased);
    r - log r without the -1; exp(...) - 1 instead of expm1 (negative values for tiny log-ratios).
    """
    raise NotImplementedError


def ex03_aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> torch.Tensor:
    """Average a per-token loss (B, R) over the answers' tokens into a scalar, three ways (train.aggregate).

    mask (B, R): bool or 0/1 float; per_token may hold garbage where mask is False, which must not count.
        "sequence":  the mean over each answer's own tokens, then the mean over the B answers (GRPO):
                     a token of an answer of length L weighs 1 / (B L), so long answers' tokens weigh less
        "token":     one mean over every answer token of the batch (DAPO, https://arxiv.org/abs/2503.14476):
                     every token weighs 1 / (total answer tokens)
        "constant":  each answer's SUM over its tokens divided by max_new_tokens, then the mean over answers
                     (Dr. GRPO, https://arxiv.org/abs/2503.20783): every token weighs 1 / (B max_new_tokens)
    Any other `how`: raise ValueError.
        per_token [[1, 2, 3, x], [4, x, x, x]] (x: garbage), lengths [3, 1], max_new_tokens 4:
        sequence (2 + 4) / 2 = 3;  token (1 + 2 + 3 + 4) / 4 = 2.5;  constant (6 / 4 + 4 / 4) / 2 = 1.25
    Return a 0-dim tensor that gradients flow through.
    Plausible slips the check catches: the token mean whatever `how` says; a row mean over all R columns
    (padding included); constant mode divided by each answer's length, or summed over the batch without the
    mean over answers; garbage after an answer's end counted; an unknown `how` silently accepted.
    """
    raise NotImplementedError


def ex04_grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, clip_range: float, kl_coef: float,
                   loss_agg: str = "sequence", max_new_tokens: int = 32) -> torch.Tensor:
    """The GRPO loss, a scalar: part 8's clipped surrogate with one advantage per answer, plus beta x k3.

    logprobs (B, R): log pi(token) from the policy being trained (with gradients); old_logprobs: from the
    rollout that sampled the tokens (fixed); ref_logprobs: from the frozen reference; advantages (B,): one
    per answer (ex01), the same for all its tokens; mask (B, R). Per token, with ratio = exp(logprobs -
    old_logprobs) and A the token's answer's advantage:
        policy = max(-A ratio, -A clamp(ratio, 1 - clip_range, 1 + clip_range))   (the worse, as in part 8)
        kl     = k3 of logprobs against ref_logprobs              (ex02: (r - 1) - log r with r = pi_ref / pi)
        loss   = aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)  (ex03)
    No critic and no value loss: the group's mean was the baseline. No KL in the reward either: it is in the
    loss, and its gradient flows through logprobs (d k3 / d log pi = 1 - r: it pulls pi toward pi_ref).
    With one update per rollout (logprobs == old_logprobs) the ratio is 1, nothing is clipped, and the
    gradient is REINFORCE's with the group baseline: d loss / d log pi(token) = -A / (B L) for "sequence".
    You may call your ex02 and ex03. Return a 0-dim tensor that gradients flow through to logprobs.
    Plausible slips the check catches: min instead of max; k3 with its arguments swapped; -kl_coef;
    the KL term computed from detached log-probs (right value, no pull); the token mean whatever loss_agg
    says; the KL term averaged separately over all tokens while the policy term is averaged per answer.
    """
    raise NotImplementedError


def ex05_pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k from n sampled answers of which c are right: the unbiased estimator of Chen et al. 2021
    (Codex, https://arxiv.org/abs/2107.03374, section 2.1).

    pass@k = P(at least one of k answers is right). From n >= k samples, the chance that k of them drawn
    WITHOUT replacement are all wrong is C(n - c, k) / C(n, k), so
        pass@k = 1 - C(n - c, k) / C(n, k)                       (1 when n - c < k: some draw must be right)
    This is the mean, over all C(n, k) subsets of k of the n samples, of "the subset holds a right answer";
    and if each sample is right with probability p, its expectation over c is exactly 1 - (1 - p)^k.
        n 4, c 1: pass@1 = 1/4, pass@2 = 1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5, pass@4 = 1
    Use math.comb (exact integers), or the product form 1 - prod_{i = n-c+1}^{n} (1 - k / i).
    Raise ValueError unless 0 <= c <= n and 1 <= k <= n.
    Plausible slips the check catches: 1 - (1 - c/n)^k (draws with replacement: biased low); c / n whatever
    k; 1 if c > 0 (that is pass@n only); C(n, c) where C(n, k) belongs; k > n accepted.
    """
    raise NotImplementedError


def ex06_flat_group_fraction(success_rates: torch.Tensor, group_size: int) -> float:
    """The expected fraction of groups that teach nothing: all G answers right, or all G wrong.

    success_rates (P,): for each of P prompts, the probability p that one sampled answer is right (the
    policy's pass@1 on it); the G answers of a group are drawn independently. A group is flat (zero variance,
    advantage 0, no gradient) with probability p^G + (1 - p)^G. Return the mean of that over the P prompts,
    a float. At p = 0.9 and G = 8, 0.9^8 + 0.1^8 = 0.43: almost half the groups of an easy prompt are wasted;
    a prompt the model never solves (p = 0) is wasted every time.
    Plausible slips the check catches: only the all-right case p^G; only the all-wrong case (1 - p)^G;
    1 - (1 - p)^G (that is pass@G); G - 1 for G; the formula applied to the MEAN success rate (prompts
    differ: mean(f(p)) is not f(mean(p))).
    """
    raise NotImplementedError
