"""Part 5 exercises: the pieces of a mixture-of-experts layer.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part05_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (a token-by-token loop, the formula written
out, the dense MLP, parameters counted on the meta device, hand-computed cases) and, where the lesson
is vectorisation, checks that the work does not grow with a Python loop over the tokens; ex07 is an
experiment whose result must land in the range the reference measured. The reference answers are in
solutions.py (try first, then peek).
"""
from typing import Callable

import torch
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_top_k_gating(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice: for router logits (N, n_expert), each token's k experts and their weights.

    probs = softmax(logits) over the experts; each token keeps its k most probable experts, best first.
    - k = 1 (Switch Transformer, Fedus et al. 2021, https://arxiv.org/abs/2101.03961): the weight is the
      chosen expert's probability, as it is. (Renormalised it would always be exactly 1, and the
      language-model loss could not teach the router anything.)
    - k > 1 (GShard, Mixtral): the k probabilities are renormalised to sum to 1 per token, so a token's
      output has the scale of one expert's output.
    Return (weights (N, k) float, experts (N, k) long).
    """
    raise NotImplementedError


def ex02_router_losses(logits: torch.Tensor, expert_index: torch.Tensor, n_expert: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The router's two auxiliary losses, from its logits (N, n_expert) and the experts each token was
    sent to, expert_index (N, k). Return (balancing_loss, z_loss), two 0-d tensors, both differentiable
    with respect to the logits.

    - The load-balancing loss of the Switch Transformer (Fedus et al. 2021, equation 4), extended to top-k:
          n_expert * sum_i f_i * P_i
      f_i: the fraction of the N * k token->expert assignments that went to expert i (no gradient);
      P_i: the mean over the N tokens of the router probability of expert i (softmax of the logits).
      With perfectly uniform routing it is exactly 1; when every token goes to one expert with
      probability 1 it is n_expert.
    - The router z-loss of ST-MoE (Zoph et al. 2022, https://arxiv.org/abs/2202.08906, equation 5): the
      mean over the tokens of the squared log-sum-exp of the token's logits. It keeps the logits small,
      where the softmax is numerically well-behaved, and must itself stay finite for logits in the hundreds.
    """
    raise NotImplementedError


def ex03_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: list[Callable], k: int) -> torch.Tensor:
    """A mixture-of-experts layer on N tokens x (N, C), with vectorised dispatch.

    Router logits = x @ router_weight.T, (N, n_expert) (router_weight: (n_expert, C)); gate them as in
    ex01. Each expert e is a function (M, C) -> (M, C) that works on any number M of tokens at once;
    token t's output is the sum over its k chosen experts of weight * experts[e](x[t]). Return (N, C).

    The point is the dispatch: call each expert at most once per forward, on all of its tokens at once,
    and let no Python loop run over the tokens (a loop over the n_expert experts is fine). The check
    counts the calls to each expert, and the Python lines your function runs for 40 and for 400 tokens.
    """
    raise NotImplementedError


def ex04_capacity_keep_mask(expert_index: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    """Expert capacity (GShard, Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668; Switch): which
    assignments an expert with room for `capacity` tokens keeps.

    expert_index: (N,) long, the expert of each assignment, in priority order (earlier = more
    important). Each expert keeps its first `capacity` assignments and drops the rest (the dropped
    tokens skip the layer through the residual connection). Return a bool tensor (N,): True = kept.
    Example: expert_index [0, 1, 0, 0, 1], capacity 2 -> [True, True, True, False, True].

    No Python loop over the assignments: the check counts the Python lines your function runs for 30
    and for 300 assignments.
    """
    raise NotImplementedError


def ex05_moe_param_counts(n_embd: int, hidden: int, n_expert: int, top_k: int, n_shared: int) -> tuple[int, int]:
    """Parameters of one MoE layer, (total, active per token), without biases.

    Each expert, routed or shared, is a SwiGLU MLP with hidden size `hidden`: three matrices, gate and up
    (hidden x n_embd) and down (n_embd x hidden). The router is one (n_expert x n_embd) matrix. A token
    uses the router, its top_k routed experts and all n_shared shared experts: that is its "active"
    count, what its compute scales with. Example: Mixtral 8x7B's layers (n_embd 4096, hidden 14336,
    8 experts, top-2) hold 8 experts but each token pays for 2.
    """
    raise NotImplementedError


def ex06_split_mlp_into_experts(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                                n_expert: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Turn a trained dense SwiGLU MLP into n_expert smaller experts (MoEfication, Zhang et al. 2022,
    https://arxiv.org/abs/2110.01786).

    The dense MLP: mlp(x) = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T, with w_gate, w_up (hidden, C)
    and w_down (C, hidden) in nn.Linear's layout. Goal: return n_expert experts, each a tuple
    (gate, up, down) of a SwiGLU MLP of hidden // n_expert units (shapes (hidden // n_expert, C) twice
    and (C, hidden // n_expert)), such that the sum of all experts' outputs equals mlp(x) for every x.
    Together they hold exactly the dense MLP's parameters, so a router that picks the k most useful of
    them computes k / n_expert of the MLP. (Sparse upcycling, Komatsuzaki et al. 2022, instead copies
    the whole MLP into every expert.) hidden is a multiple of n_expert.
    """
    raise NotImplementedError


def ex07_dropped_fraction(capacity_factor: float) -> float:
    """Experiment: how many tokens does an expert capacity drop?

    Route N = 4096 tokens through a random router: tokens x with standard-normal entries, shape (N, 64);
    router weight with entries drawn from N(0, 1/64), shape (8, 64); top-1 routing (each token to the
    expert with the largest logit). Each expert keeps its first capacity = ceil(capacity_factor * N / 8)
    tokens, in token order, and drops the rest (ex04). Return the fraction of the N tokens dropped,
    averaged over at least 5 independent draws of the tokens and the router.

    Then compare capacity factors 1.0, 1.25 (the Switch Transformer's choice for training) and 2.0.
    Why does even a random router, whose experts are equally likely in expectation, overflow some
    experts? What does that predict for a trained router without the balancing loss?
    """
    raise NotImplementedError
