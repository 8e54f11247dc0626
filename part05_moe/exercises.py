"""Part 5 exercises: the pieces of a mixture-of-experts layer, one function each.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part05_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Every check compares your function with an independent reference (a token-by-token loop, the formula
written out, hand-computed cases). The reference answers are in solutions.py (try first, then peek);
model.py has the same ideas inside the model (MoE, load_balancing_loss, router_z_loss).
"""
from typing import Callable

import torch
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice: for router logits (N, n_expert), each token's k experts and their weights.

    probs = softmax(logits) over the experts; each token keeps its k most probable experts, best first.
    - k = 1 (Switch Transformer): the weight is the chosen expert's probability, as it is. (Renormalised it
      would always be exactly 1, and the language-model loss could not teach the router anything.)
    - k > 1 (GShard, Mixtral): the k probabilities are renormalised to sum to 1 per token, so a token's
      output has the scale of one expert's output.
    Return (weights (N, k) float, experts (N, k) long).

    Hints: F.softmax(logits, dim=-1); torch.topk(probs, k, dim=-1) returns (values, indices), best first.
    """
    raise NotImplementedError


def ex02_load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, n_expert: int) -> torch.Tensor:
    """The Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4), extended to top-k.

        loss = n_expert * sum_i f_i * P_i
        f_i  = (number of token->expert assignments to expert i) / (number of assignments, N * k)
        P_i  = mean over the N tokens of probs[:, i]

    probs: (N, n_expert) router probabilities; expert_index: (N, k) the experts each token was sent to.
    With perfectly uniform routing (f_i = P_i = 1/n_expert) the loss is exactly 1; if every token goes to
    one expert with probability 1, it is n_expert. Return a 0-d tensor (differentiable through probs).

    Hints: torch.bincount(expert_index.flatten(), minlength=n_expert); f_i needs no gradient.
    """
    raise NotImplementedError


def ex03_router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022, eq. 5): the mean over the N tokens of the squared
    log-sum-exp of that token's router logits (N, n_expert).

        z_loss = mean_t (log sum_i exp(logits[t, i]))^2

    It pushes the logits towards small values, where the softmax stays numerically well-behaved.
    Return a 0-d tensor.

    Hints: torch.logsumexp(logits, dim=-1) is computed stably (never exp of a big number).
    """
    raise NotImplementedError


def ex04_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: list[Callable], k: int) -> torch.Tensor:
    """A mixture-of-experts layer on N tokens x (N, C), vectorised: no Python loop over the tokens.

    Router logits = x @ router_weight.T, (N, n_expert) (router_weight: (n_expert, C)); gate them as in
    ex01 (softmax, top-k, renormalise when k > 1). Each expert e is a function (M, C) -> (M, C); token t's
    output is sum over its k chosen experts of weight * experts[e](x[t]). Return (N, C).

    Run every expert once, on all of its tokens at once: a loop over the n_expert experts is fine,
    a loop over tokens is not. Recipe: for expert e, find the (token, slot) pairs that chose it
    ((experts_chosen == e).nonzero()), gather those tokens, run the expert, multiply by their weights,
    and add the results into the output rows with out.index_add_(0, token_ids, values).
    """
    raise NotImplementedError


def ex05_capacity_keep_mask(expert_index: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    """Expert capacity (GShard, Switch): which assignments an expert with room for `capacity` tokens keeps.

    expert_index: (N,) long, the expert of each assignment, in priority order (earlier = more
    important). Each expert keeps its first `capacity` assignments and drops the rest (the dropped
    tokens skip the layer through the residual connection). Return a bool tensor (N,): True = kept.
    Example: expert_index [0, 1, 0, 0, 1], capacity 2 -> [True, True, True, False, True].

    Vectorise it: sort the assignments by expert (torch.argsort(..., stable=True) keeps the priority order
    within an expert); an assignment's rank in its expert's queue is its position in the sorted list minus
    where that expert's run starts (torch.cumsum of the counts from torch.bincount).
    """
    raise NotImplementedError


def ex06_moe_param_counts(n_embd: int, hidden: int, n_expert: int, top_k: int, n_shared: int) -> tuple[int, int]:
    """Parameters of one MoE layer, (total, active per token), without biases.

    Each expert, routed or shared, is a SwiGLU MLP with hidden size `hidden`: three matrices, gate and up
    (hidden x n_embd) and down (n_embd x hidden). The router is one (n_expert x n_embd) matrix. A token
    uses the router, its top_k routed experts and all n_shared shared experts: that is its "active"
    count, what its compute scales with. Example: Mixtral 8x7B's layers (n_embd 4096, hidden 14336,
    8 experts, top-2) hold 8 experts but each token pays for 2.
    """
    raise NotImplementedError
