"""Part 5 reference solutions. Try exercises.py first; `pytest tests/test_part05_exercises.py -rs` checks both."""
import math
from typing import Callable

import torch
from torch.nn import functional as F


def ex01_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k) each, best first
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def ex02_router_losses(logits: torch.Tensor, expert_index: torch.Tensor, n_expert: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    probs = F.softmax(logits, dim=-1)
    fraction = torch.bincount(expert_index.flatten(), minlength=n_expert).float() / expert_index.numel()  # f_i
    balancing = n_expert * (fraction * probs.mean(dim=0)).sum()  # the gradient flows through P_i only
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()  # logsumexp never exponentiates a big number
    return balancing, z_loss


def ex03_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: list[Callable], k: int) -> torch.Tensor:
    weights, chosen = ex01_top_k_gating(x @ router_weight.t(), k)  # (N, k) each
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):  # a loop over the experts, never over the tokens
        token_ids, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that picked expert e
        if token_ids.numel():
            out.index_add_(0, token_ids, expert(x[token_ids]) * weights[token_ids, slot][:, None])
    return out


def ex04_capacity_keep_mask(expert_index: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    order = torch.argsort(expert_index, stable=True)  # grouped by expert, priority order kept within each
    counts = torch.bincount(expert_index, minlength=n_expert)
    start = torch.cumsum(counts, 0) - counts  # where each expert's run begins in the sorted list
    rank_sorted = torch.arange(expert_index.numel()) - start[expert_index[order]]  # place in its expert's queue
    keep = torch.empty_like(expert_index, dtype=torch.bool)
    keep[order] = rank_sorted < capacity  # back to the original order
    return keep


def ex05_moe_param_counts(n_embd: int, hidden: int, n_expert: int, top_k: int, n_shared: int) -> tuple[int, int]:
    expert = 3 * n_embd * hidden
    router = n_expert * n_embd
    return router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert


def ex06_split_mlp_into_experts(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                                n_expert: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    # Hidden unit j computes silu(x . gate_j) * (x . up_j) and writes it to the output through column j of
    # w_down: the MLP is a sum over its hidden units. Any partition of the units, with each unit's gate
    # row, up row and down column kept together, is a set of experts whose outputs sum to the MLP's.
    gates, ups = w_gate.chunk(n_expert, dim=0), w_up.chunk(n_expert, dim=0)  # rows: hidden units
    downs = w_down.chunk(n_expert, dim=1)  # columns: the same hidden units
    return list(zip(gates, ups, downs))


def ex07_dropped_fraction(capacity_factor: float) -> float:
    n_tokens, n_expert, n_embd = 4096, 8, 64
    capacity = math.ceil(capacity_factor * n_tokens / n_expert)
    dropped = []
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n_tokens, n_embd, generator=generator)
        router_weight = torch.randn(n_expert, n_embd, generator=generator) / math.sqrt(n_embd)
        expert_index = (x @ router_weight.T).argmax(dim=-1)  # top-1
        keep = ex04_capacity_keep_mask(expert_index, n_expert, capacity)
        dropped.append(1 - keep.float().mean().item())
    return sum(dropped) / len(dropped)
