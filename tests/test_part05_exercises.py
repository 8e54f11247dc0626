"""Part 5 exercises: each check compares against an independent reference and rejects plausible slips."""
import math

import torch
from torch.nn import functional as F

from part05_moe import exercises, solutions
from tests.harness import Exercise, exercise_tests


def router_logits(n_tokens: int = 12, n_expert: int = 6, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(n_tokens, n_expert, generator=torch.Generator().manual_seed(seed))


def gate_by_hand(logits: torch.Tensor, k: int):
    """Token by token from the definition: sort the probabilities, keep k, renormalise when k > 1."""
    weights, experts = [], []
    for row in logits:
        probs = torch.exp(row - row.max()) / torch.exp(row - row.max()).sum()
        order = sorted(range(len(row)), key=lambda e: -probs[e].item())[:k]
        chosen = probs[order]
        weights.append(chosen / chosen.sum() if k > 1 else chosen)
        experts.append(order)
    return torch.stack(weights), torch.tensor(experts)


# --- ex01: top-k gating ------------------------------------------------------------------------------


def check_ex01_top_k_gating(fn):
    logits = router_logits()
    for k in (1, 2, 3):
        weights, experts = fn(logits, k)
        want_w, want_e = gate_by_hand(logits, k)
        assert tuple(weights.shape) == tuple(experts.shape) == (12, k), f"k={k}: shapes {tuple(weights.shape)}, " \
                                                                         f"{tuple(experts.shape)}, expected (12, {k})"
        assert torch.equal(experts.long(), want_e), f"k={k}: experts {experts[:2].tolist()}..., expected " \
                                                    f"{want_e[:2].tolist()}... (the k most probable, best first)"
        assert torch.allclose(weights, want_w, atol=1e-6), (
            f"k={k}: weights {weights[0].tolist()}, expected {want_w[0].tolist()}"
            + (" (top-k weights must be renormalised to sum to 1)" if k > 1 else
               " (top-1 keeps the raw softmax probability, not 1)"))


def _gating_not_renormalised(logits, k):
    return torch.topk(F.softmax(logits, dim=-1), k, dim=-1)


def _gating_always_renormalised(logits, k):
    weights, experts = torch.topk(F.softmax(logits, dim=-1), k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def _gating_softmax_wrong_axis(logits, k):
    weights, experts = torch.topk(F.softmax(logits, dim=0), k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if k > 1 else weights), experts


# --- ex02: load-balancing loss --------------------------------------------------------------------------


def balancing_loss_by_hand(probs, expert_index, n_expert) -> float:
    assignments = expert_index.flatten().tolist()
    return n_expert * sum((assignments.count(i) / len(assignments)) * probs[:, i].mean().item()
                          for i in range(n_expert))


def check_ex02_load_balancing_loss(fn):
    # perfectly uniform: exactly 1, for top-1 and top-2
    for k in (1, 2):
        uniform = torch.full((8, 4), 0.25)
        index = (torch.arange(8 * k) % 4).view(8, k)
        got = fn(uniform, index, 4)
        assert torch.is_tensor(got) and got.dim() == 0, f"return a 0-d tensor, got {got!r}"
        assert abs(got.item() - 1.0) < 1e-6, f"uniform routing with top-{k} should give exactly 1, got {got.item()}"
    collapsed = fn(F.one_hot(torch.zeros(5, dtype=torch.long), 4).float(), torch.zeros(5, 1, dtype=torch.long), 4)
    assert abs(collapsed.item() - 4.0) < 1e-6, f"everything to one expert with probability 1: expected 4, got " \
                                                f"{collapsed.item()}"
    probs = F.softmax(router_logits(), dim=-1).requires_grad_()
    index = torch.topk(probs, 2, dim=-1).indices
    got = fn(probs, index, 6)
    want = balancing_loss_by_hand(probs.detach(), index, 6)
    assert abs(got.item() - want) < 1e-5, f"random routing: got {got.item():.6f}, expected {want:.6f}"
    got.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0, "the loss must be differentiable through probs"


def _balancing_without_n_expert(probs, expert_index, n_expert):
    return solutions.ex02_load_balancing_loss(probs, expert_index, n_expert) / n_expert


def _balancing_fraction_per_token(probs, expert_index, n_expert):  # counts / N instead of / (N * k)
    fraction = torch.bincount(expert_index.flatten(), minlength=n_expert).float() / expert_index.size(0)
    return n_expert * (fraction * probs.mean(dim=0)).sum()


def _balancing_sum_not_mean(probs, expert_index, n_expert):
    fraction = torch.bincount(expert_index.flatten(), minlength=n_expert).float() / expert_index.numel()
    return n_expert * (fraction * probs.sum(dim=0)).sum()


# --- ex03: router z-loss -----------------------------------------------------------------------------------


def check_ex03_router_z_loss(fn):
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]])
    want = (math.log(3) ** 2 + math.log(math.exp(1) + math.exp(-2) + math.exp(3)) ** 2) / 2
    got = fn(logits)
    assert torch.is_tensor(got) and got.dim() == 0, f"return a 0-d tensor, got {got!r}"
    assert abs(got.item() - want) < 1e-5, f"z-loss {got.item():.6f}, expected {want:.6f}"
    big = fn(torch.tensor([[200.0, 0.0]]))
    assert torch.isfinite(big) and abs(big.item() - 200.0**2) < 1e-2, "large logits overflow: use torch.logsumexp"


def _z_loss_not_squared(logits):
    return torch.logsumexp(logits, dim=-1).mean()


def _z_loss_squared_logits(logits):
    return logits.pow(2).mean()


def _z_loss_naive(logits):
    return torch.log(torch.exp(logits).sum(-1)).pow(2).mean()


# --- ex04: the vectorised MoE forward ----------------------------------------------------------------------


def make_experts(n_expert: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(width, width, generator=gen) / width**0.5 for _ in range(n_expert)]
    return [lambda h, m=m: torch.tanh(h @ m) for m in mats]


def check_ex04_moe_forward(fn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=gen)
    router_weight = torch.randn(5, 8, generator=gen)
    experts = make_experts(5, 8)
    for k in (1, 2):
        weights, chosen = gate_by_hand(x @ router_weight.t(), k)
        want = torch.stack([sum(w * experts[e](x[t : t + 1])[0] for w, e in zip(weights[t], chosen[t].tolist()))
                            for t in range(20)])  # token by token
        got = fn(x, router_weight, experts, k)
        assert tuple(got.shape) == (20, 8), f"k={k}: shape {tuple(got.shape)}, expected (20, 8)"
        assert torch.allclose(got, want, atol=1e-5), f"k={k}: output differs from the token-by-token definition " \
                                                     f"by up to {(got - want).abs().max().item():.3g}"


def _moe_unweighted(x, router_weight, experts, k):
    _, chosen = solutions.ex01_top_k_gating(x @ router_weight.t(), k)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token_ids = (chosen == e).nonzero(as_tuple=True)[0]
        out.index_add_(0, token_ids, expert(x[token_ids]))
    return out


def _moe_not_renormalised(x, router_weight, experts, k):
    weights, chosen = torch.topk(F.softmax(x @ router_weight.t(), dim=-1), k, dim=-1)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token_ids, slot = (chosen == e).nonzero(as_tuple=True)
        out.index_add_(0, token_ids, expert(x[token_ids]) * weights[token_ids, slot][:, None])
    return out


# --- ex05: capacity -----------------------------------------------------------------------------------------


def keep_mask_by_hand(expert_index, capacity):
    seen, keep = {}, []
    for e in expert_index.tolist():
        seen[e] = seen.get(e, 0) + 1
        keep.append(seen[e] <= capacity)
    return keep


def check_ex05_capacity_keep_mask(fn):
    example = fn(torch.tensor([0, 1, 0, 0, 1]), 2, 2)
    assert example.dtype == torch.bool, f"return a bool tensor, got {example.dtype}"
    assert example.tolist() == [True, True, True, False, True], f"docstring example: got {example.tolist()}"
    gen = torch.Generator().manual_seed(0)
    for capacity in (0, 1, 3, 10):
        index = torch.randint(4, (30,), generator=gen)
        got = fn(index, 4, capacity).tolist()
        want = keep_mask_by_hand(index, capacity)
        assert got == want, f"capacity {capacity}, experts {index.tolist()}: kept {got}, expected {want}"


def _keep_off_by_one(expert_index, n_expert, capacity):
    return solutions.ex05_capacity_keep_mask(expert_index, n_expert, capacity + 1)


def _keep_the_last(expert_index, n_expert, capacity):
    return solutions.ex05_capacity_keep_mask(expert_index.flip(0), n_expert, capacity).flip(0)


def _keep_global_capacity(expert_index, n_expert, capacity):
    return torch.arange(expert_index.numel()) < capacity * n_expert


# --- ex06: parameter counts --------------------------------------------------------------------------------


def module_params(*shapes) -> int:
    """Parameters of bias-free Linear layers (in, out), built on the meta device: counted, never allocated."""
    return sum(p.numel() for i, o in shapes for p in torch.nn.Linear(i, o, bias=False, device="meta").parameters())


def check_ex06_moe_param_counts(fn):
    for args in [(4096, 14336, 8, 2, 0), (128, 168, 8, 2, 0), (64, 32, 16, 4, 2), (10, 7, 1, 1, 0)]:
        n_embd, hidden, n_expert, top_k, n_shared = args
        expert = module_params((n_embd, hidden), (n_embd, hidden), (hidden, n_embd))  # gate, up, down
        router = module_params((n_embd, n_expert))
        want = (router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert)
        got = tuple(fn(*args))
        assert got == want, f"moe_param_counts{args} = {got}, expected (total, active) = {want}"


def _counts_forget_router(n_embd, hidden, n_expert, top_k, n_shared):
    total, active = solutions.ex06_moe_param_counts(n_embd, hidden, n_expert, top_k, n_shared)
    return total - n_expert * n_embd, active - n_expert * n_embd


def _counts_two_matrices(n_embd, hidden, n_expert, top_k, n_shared):  # a GELU MLP, not SwiGLU
    router, expert = n_expert * n_embd, 2 * n_embd * hidden
    return router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert


def _counts_forget_shared_in_active(n_embd, hidden, n_expert, top_k, n_shared):
    total, active = solutions.ex06_moe_param_counts(n_embd, hidden, n_expert, top_k, n_shared)
    return total, active - n_shared * 3 * n_embd * hidden


CASES = [
    Exercise("ex01_top_k_gating", check_ex01_top_k_gating,
             wrong=[_gating_not_renormalised, _gating_always_renormalised, _gating_softmax_wrong_axis]),
    Exercise("ex02_load_balancing_loss", check_ex02_load_balancing_loss,
             wrong=[_balancing_without_n_expert, _balancing_fraction_per_token, _balancing_sum_not_mean]),
    Exercise("ex03_router_z_loss", check_ex03_router_z_loss,
             wrong=[_z_loss_not_squared, _z_loss_squared_logits, _z_loss_naive]),
    Exercise("ex04_moe_forward", check_ex04_moe_forward, wrong=[_moe_unweighted, _moe_not_renormalised]),
    Exercise("ex05_capacity_keep_mask", check_ex05_capacity_keep_mask,
             wrong=[_keep_off_by_one, _keep_the_last, _keep_global_capacity]),
    Exercise("ex06_moe_param_counts", check_ex06_moe_param_counts,
             wrong=[_counts_forget_router, _counts_two_matrices, _counts_forget_shared_in_active]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
