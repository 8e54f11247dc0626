"""Part 8 reference solutions. Try exercises.py first; `pytest tests/test_part08_exercises.py -rs` checks both.

train.py has the same pieces (response_logprobs, kl_per_token, token_rewards, gae, whiten, ppo_losses); they are
written out again here, one function per exercise.
"""
import torch
import torch.nn.functional as F


def ex01_response_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int,
                           temperature: float = 1.0) -> torch.Tensor:
    # the logits at t - 1 predict the token at t: the R response tokens are scored by positions P-1 .. T-2
    logp = F.log_softmax(logits[:, prompt_len - 1 : -1].float() / temperature, dim=-1)  # (B, R, vocab)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)  # (B, R): each sampled token's log-prob


def ex02_kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs  # log pi / pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":  # r = pi_ref / pi = exp(-log_ratio); (r - 1) - log r = expm1(-log_ratio) + log_ratio
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def ex03_token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    mask = response_mask.float()
    rewards = -kl_coef * kl.float() * mask  # a new tensor: the inputs stay as they were; 0 after the answer
    last = mask.sum(1).long() - 1  # (B,): the index of each answer's last token
    rewards[torch.arange(len(scores)), last] += scores.float()
    return rewards


def ex04_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
             lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask.float()
    rewards, values = rewards * mask, values * mask  # garbage after the end -> 0: V after the last token is 0
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # A_{t+1}, per row
    next_value = torch.zeros_like(rewards[:, 0])  # V_{t+1}, per row
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask  # positions after the end got deltas of 0 - 0, but keep it explicit
    return advantages, advantages + values


def ex05_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n  # over the answer tokens only
    var = (((x - mean) * mask) ** 2).sum() / n  # divide by n: the population variance
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ex06_clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    mask = mask.float()
    ratio = (logprobs - old_logprobs).exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))  # the worse
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def ex07_clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                            mask: torch.Tensor, clip_range_value: float) -> torch.Tensor:
    mask = mask.float()
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)  # the worse of the two
    return (loss * mask).sum() / mask.sum().clamp(min=1)
