"""Part 9 reference solutions. Try exercises.py first; `pytest tests/test_part09_exercises.py -rs` checks both.

train.py has the same pieces (group_advantages, kl_per_token, aggregate, grpo_loss); they are written out
again here, one function per exercise, plus pass@k and the expected fraction of flat groups.
"""
import math

import torch


def ex01_group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True,
                          eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    groups = scores.view(-1, group_size)  # (prompts, G): one group per row, its answers consecutive
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # the sample std (divide by G - 1)
    advantages = groups - mean  # a new tensor: scores stay as they were
    if scale:
        advantages = advantages / (std + eps)  # a flat group: 0 / eps = 0
    return advantages.view(-1), std.squeeze(1) == 0


def ex02_k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = logprobs - ref_logprobs  # log pi / pi_ref = -log r
    return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, with r - 1 exact for tiny log-ratios


def ex03_aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> torch.Tensor:
    mask = mask.float()
    masked = torch.where(mask.bool(), per_token, 0.0)  # garbage (even inf or NaN) after the end -> 0
    if how == "token":
        return masked.sum() / mask.sum().clamp(min=1)
    per_answer = masked.sum(1)  # (B,): each answer's sum over its own tokens
    if how == "sequence":
        return (per_answer / mask.sum(1).clamp(min=1)).mean()
    if how == "constant":
        return (per_answer / max_new_tokens).mean()
    raise ValueError(f"unknown loss aggregation {how!r}; use sequence, token or constant")


def ex04_grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, clip_range: float, kl_coef: float,
                   loss_agg: str = "sequence", max_new_tokens: int = 32) -> torch.Tensor:
    ratio = (logprobs - old_logprobs).exp()
    A = advantages[:, None]  # (B, 1): every token of an answer shares its advantage
    policy = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))  # the worse of the two
    kl = ex02_k3_kl(logprobs, ref_logprobs)  # gradient flows through logprobs
    return ex03_aggregate(policy + kl_coef * kl, mask, loss_agg, max_new_tokens)


def ex05_pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"c = {c} right answers out of n = {n}: need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} from n = {n} samples: need 1 <= k <= n")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # math.comb(m, k) = 0 when k > m: pass@k = 1


def ex06_flat_group_fraction(success_rates: torch.Tensor, group_size: int) -> float:
    p = success_rates.double()
    return (p**group_size + (1 - p) ** group_size).mean().item()  # all right, or all wrong; then over prompts
