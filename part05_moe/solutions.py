"""Part 5 reference solutions. Try exercises.py first; `pytest tests/test_part05_exercises.py -rs` checks both."""
from typing import Callable

import torch
from torch.nn import functional as F


def ex01_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k) each, best first
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def ex02_load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, n_expert: int) -> torch.Tensor:
    fraction = torch.bincount(expert_index.flatten(), minlength=n_expert).float() / expert_index.numel()
    return n_expert * (fraction * probs.mean(dim=0)).sum()


def ex03_router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def ex04_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: list[Callable], k: int) -> torch.Tensor:
    weights, chosen = ex01_top_k_gating(x @ router_weight.t(), k)  # (N, k) each
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token_ids, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that picked expert e
        if token_ids.numel():
            out.index_add_(0, token_ids, expert(x[token_ids]) * weights[token_ids, slot][:, None])
    return out


def ex05_capacity_keep_mask(expert_index: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    order = torch.argsort(expert_index, stable=True)
    counts = torch.bincount(expert_index, minlength=n_expert)
    start = torch.cumsum(counts, 0) - counts  # where each expert's run begins in the sorted list
    rank_sorted = torch.arange(expert_index.numel()) - start[expert_index[order]]
    keep = torch.empty_like(expert_index, dtype=torch.bool)
    keep[order] = rank_sorted < capacity  # back to the original order
    return keep


def ex06_moe_param_counts(n_embd: int, hidden: int, n_expert: int, top_k: int, n_shared: int) -> tuple[int, int]:
    expert = 3 * n_embd * hidden
    router = n_expert * n_embd
    return router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert
