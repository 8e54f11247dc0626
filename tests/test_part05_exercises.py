"""Part 5 exercises: each check compares against an outside reference and rejects plausible slips."""
import functools
import math

import torch
from torch.nn import functional as F

from part05_moe import exercises, solutions
from tests.harness import Exercise, exercise_tests, python_lines


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


# --- ex02: the router's losses ------------------------------------------------------------------------


def balancing_loss_by_hand(probs, expert_index, n_expert) -> float:
    assignments = expert_index.flatten().tolist()
    return n_expert * sum((assignments.count(i) / len(assignments)) * probs[:, i].mean().item()
                          for i in range(n_expert))


def check_ex02_router_losses(fn):
    # perfectly uniform: exactly 1, for top-1 and top-2
    for k in (1, 2):
        index = (torch.arange(8 * k) % 4).view(8, k)
        result = fn(torch.zeros(8, 4), index, 4)
        assert isinstance(result, tuple) and len(result) == 2, "return (balancing_loss, z_loss)"
        balancing, z = result
        assert torch.is_tensor(balancing) and balancing.dim() == 0, f"return 0-d tensors, got {balancing!r}"
        assert abs(balancing.item() - 1.0) < 1e-6, (f"uniform routing with top-{k} should give a balancing loss of "
                                                    f"exactly 1, got {balancing.item()}")
        assert abs(z.item() - math.log(4) ** 2) < 1e-5, f"z-loss of all-zero logits over 4 experts: (ln 4)^2, got {z}"
    all_to_expert_0 = F.one_hot(torch.zeros(5, dtype=torch.long), 4).float() * 50
    collapsed, _ = fn(all_to_expert_0, torch.zeros(5, 1, dtype=torch.long), 4)
    assert abs(collapsed.item() - 4.0) < 1e-5, (f"everything to one expert with probability 1: a balancing loss of 4 "
                                                f"(n_expert), got {collapsed.item()}")
    # random routing, against the definitions written out
    logits = router_logits().requires_grad_()
    index = torch.topk(logits, 2, dim=-1).indices
    balancing, z = fn(logits, index, 6)
    want = balancing_loss_by_hand(F.softmax(logits.detach(), dim=-1), index, 6)
    assert abs(balancing.item() - want) < 1e-5, f"balancing loss with random routing: got {balancing.item():.6f}, " \
                                                f"expected {want:.6f}"
    rows = logits.detach().double()
    want_z = sum(math.log(sum(math.exp(v) for v in row.tolist())) ** 2 for row in rows) / len(rows)
    assert abs(z.item() - want_z) < 1e-4, f"z-loss: got {z.item():.6f}, expected {want_z:.6f}"
    (balancing + z).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0, "both losses must be differentiable in the logits"
    logits.grad = None
    balancing = fn(logits, index, 6)[0]
    assert balancing.requires_grad, "the balancing loss must be differentiable in the logits (through P_i)"
    balancing.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0, "the balancing loss must reach the logits (P_i)"
    big = fn(torch.tensor([[200.0, 0.0]]), torch.zeros(1, 1, dtype=torch.long), 2)[1]
    assert torch.isfinite(big) and abs(big.item() - 200.0**2) < 1e-2, (
        f"z-loss of logits [200, 0] should be about 200^2 = 40000, got {big.item()} (exp(200) overflows float32)")


def _router_losses_variant(balancing="right", z="right"):
    def losses(logits, expert_index, n_expert):
        good_b, good_z = solutions.ex02_router_losses(logits, expert_index, n_expert)
        probs = F.softmax(logits, dim=-1)
        counts = torch.bincount(expert_index.flatten(), minlength=n_expert).float()
        b = {"right": good_b,
             "no_n_expert": good_b / n_expert,
             "per_token": n_expert * (counts / expert_index.size(0) * probs.mean(dim=0)).sum(),  # / N, not / (N k)
             "sum_not_mean": n_expert * (counts / expert_index.numel() * probs.sum(dim=0)).sum(),
             "no_gradient": good_b.detach()}[balancing]
        zz = {"right": good_z,
              "not_squared": torch.logsumexp(logits, dim=-1).mean(),
              "squared_logits": logits.pow(2).mean(),
              "naive": torch.log(torch.exp(logits).sum(-1)).pow(2).mean()}[z]
        return b, zz

    return losses


# --- ex03: the vectorised MoE forward ----------------------------------------------------------------------


def make_experts(n_expert: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(width, width, generator=gen) / width**0.5 for _ in range(n_expert)]
    return [lambda h, m=m: torch.tanh(h @ m) for m in mats]


def counted(experts):
    """The experts, wrapped to count how often each one is called."""
    calls = [0] * len(experts)

    def wrap(e):
        def expert(h):
            calls[e] += 1
            return experts[e](h)
        return expert

    return [wrap(e) for e in range(len(experts))], calls


def check_ex03_moe_forward(fn):
    gen = torch.Generator().manual_seed(0)
    router_weight = torch.randn(5, 8, generator=gen)
    experts = make_experts(5, 8)
    for k in (1, 2):
        lines = {}
        for n_tokens in (40, 400):
            x = torch.randn(n_tokens, 8, generator=gen)
            weights, chosen = gate_by_hand(x @ router_weight.t(), k)
            want = torch.stack([sum(w * experts[e](x[t : t + 1])[0] for w, e in zip(weights[t], chosen[t].tolist()))
                                for t in range(n_tokens)])  # token by token, the definition
            watched, calls = counted(experts)
            got, lines[n_tokens] = python_lines(fn, x, router_weight, watched, k)
            assert tuple(got.shape) == (n_tokens, 8), f"k={k}: shape {tuple(got.shape)}, expected ({n_tokens}, 8)"
            assert torch.allclose(got, want, atol=1e-5), (
                f"k={k}, {n_tokens} tokens: the output differs from the token-by-token definition by up to "
                f"{(got - want).abs().max().item():.3g}")
            assert max(calls) <= 1, (f"k={k}, {n_tokens} tokens: the experts were called {calls} times: call each "
                                     "expert once, on all of its tokens at once")
        assert lines[400] <= 2 * lines[40] + 10, (
            f"k={k}: your function ran {lines[40]} Python lines for 40 tokens and {lines[400]} for 400: a Python "
            "loop over the tokens? Dispatch them with tensor operations (a loop over the experts is fine)")


def _moe_per_token_loop(x, router_weight, experts, k):  # right numbers, but one expert call per token and slot
    weights, chosen = solutions.ex01_top_k_gating(x @ router_weight.t(), k)
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        for w, e in zip(weights[t], chosen[t].tolist()):
            out[t] += w * experts[e](x[t : t + 1])[0]
    return out


def _moe_per_token_scatter(x, router_weight, experts, k):  # one call per expert, then a loop to scatter back
    weights, chosen = solutions.ex01_top_k_gating(x @ router_weight.t(), k)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token_ids, slot = (chosen == e).nonzero(as_tuple=True)
        if token_ids.numel():
            y = expert(x[token_ids]) * weights[token_ids, slot][:, None]
            for row, t in enumerate(token_ids.tolist()):
                out[t] += y[row]
    return out


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


# --- ex04: capacity -----------------------------------------------------------------------------------------


def keep_mask_by_hand(expert_index, capacity):
    seen, keep = {}, []
    for e in expert_index.tolist():
        seen[e] = seen.get(e, 0) + 1
        keep.append(seen[e] <= capacity)
    return keep


def check_ex04_capacity_keep_mask(fn):
    example = fn(torch.tensor([0, 1, 0, 0, 1]), 2, 2)
    assert example.dtype == torch.bool, f"return a bool tensor, got {example.dtype}"
    assert example.tolist() == [True, True, True, False, True], f"docstring example: got {example.tolist()}"
    gen = torch.Generator().manual_seed(0)
    for capacity in (0, 1, 3, 10):
        index = torch.randint(4, (30,), generator=gen)
        got = fn(index, 4, capacity).tolist()
        want = keep_mask_by_hand(index, capacity)
        assert got == want, f"capacity {capacity}, experts {index.tolist()}: kept {got}, expected {want}"
    lines = {}
    for n in (30, 300):
        index = torch.randint(4, (n,), generator=gen)
        got, lines[n] = python_lines(fn, index, 4, n // 8)
        assert got.tolist() == keep_mask_by_hand(index, n // 8), f"{n} assignments, capacity {n // 8}: wrong mask"
    assert lines[300] <= 2 * lines[30] + 10, (
        f"your function ran {lines[30]} Python lines for 30 assignments and {lines[300]} for 300: a Python loop "
        "over the assignments? Find each assignment's place in its expert's queue with tensor operations")


def _keep_off_by_one(expert_index, n_expert, capacity):
    return solutions.ex04_capacity_keep_mask(expert_index, n_expert, capacity + 1)


def _keep_the_last(expert_index, n_expert, capacity):
    return solutions.ex04_capacity_keep_mask(expert_index.flip(0), n_expert, capacity).flip(0)


def _keep_global_capacity(expert_index, n_expert, capacity):
    return torch.arange(expert_index.numel()) < capacity * n_expert


def _keep_by_python_loop(expert_index, n_expert, capacity):  # right mask, one Python step per assignment
    return torch.tensor(keep_mask_by_hand(expert_index, capacity))


# --- ex05: parameter counts --------------------------------------------------------------------------------


def module_params(*shapes) -> int:
    """Parameters of bias-free Linear layers (in, out), built on the meta device: counted, never allocated."""
    return sum(p.numel() for i, o in shapes for p in torch.nn.Linear(i, o, bias=False, device="meta").parameters())


def check_ex05_moe_param_counts(fn):
    for args in [(4096, 14336, 8, 2, 0), (128, 168, 8, 2, 0), (64, 32, 16, 4, 2), (10, 7, 1, 1, 0)]:
        n_embd, hidden, n_expert, top_k, n_shared = args
        expert = module_params((n_embd, hidden), (n_embd, hidden), (hidden, n_embd))  # gate, up, down
        router = module_params((n_embd, n_expert))
        want = (router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert)
        got = tuple(fn(*args))
        assert got == want, f"moe_param_counts{args} = {got}, expected (total, active) = {want}"


def _counts_forget_router(n_embd, hidden, n_expert, top_k, n_shared):
    total, active = solutions.ex05_moe_param_counts(n_embd, hidden, n_expert, top_k, n_shared)
    return total - n_expert * n_embd, active - n_expert * n_embd


def _counts_two_matrices(n_embd, hidden, n_expert, top_k, n_shared):  # a GELU MLP, not SwiGLU
    router, expert = n_expert * n_embd, 2 * n_embd * hidden
    return router + (n_expert + n_shared) * expert, router + (top_k + n_shared) * expert


def _counts_forget_shared_in_active(n_embd, hidden, n_expert, top_k, n_shared):
    total, active = solutions.ex05_moe_param_counts(n_embd, hidden, n_expert, top_k, n_shared)
    return total, active - n_shared * 3 * n_embd * hidden


# --- ex06: MoEfication ----------------------------------------------------------------------------------------


def dense_swiglu(x, w_gate, w_up, w_down):
    gate = x @ w_gate.T
    return (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ w_down.T


def check_ex06_split_mlp_into_experts(fn):
    gen = torch.Generator().manual_seed(0)
    for C, hidden, n_expert in [(8, 24, 4), (6, 12, 3), (5, 8, 1)]:
        w_gate, w_up = torch.randn(hidden, C, generator=gen), torch.randn(hidden, C, generator=gen)
        w_down = torch.randn(C, hidden, generator=gen) / hidden**0.5
        x = torch.randn(10, C, generator=gen)
        experts = fn(w_gate.clone(), w_up.clone(), w_down.clone(), n_expert)
        assert len(experts) == n_expert, f"n_expert={n_expert}: got {len(experts)} experts"
        h = hidden // n_expert
        for i, (g, u, d) in enumerate(experts):
            shapes = (tuple(g.shape), tuple(u.shape), tuple(d.shape))
            assert shapes == ((h, C), (h, C), (C, h)), (
                f"expert {i}: shapes {shapes}, expected {((h, C), (h, C), (C, h))}: {h} hidden units each, the "
                f"dense MLP's {hidden} shared out")
        total = sum(dense_swiglu(x, g, u, d) for g, u, d in experts)
        want = dense_swiglu(x, w_gate, w_up, w_down)
        assert torch.allclose(total, want, atol=1e-5), (
            f"C={C}, hidden={hidden}, n_expert={n_expert}: the experts' outputs sum to something that differs from "
            f"the dense MLP's by up to {(total - want).abs().max().item():.3g}")


def _split_down_by_rows(w_gate, w_up, w_down, n_expert):  # the down projection cut along the wrong axis
    C, hidden = w_down.shape
    downs = w_down.reshape(-1).chunk(n_expert)
    return [(g, u, d.reshape(C, hidden // n_expert)) for g, u, d in zip(w_gate.chunk(n_expert), w_up.chunk(n_expert),
                                                                      downs)]


def _split_up_interleaved(w_gate, w_up, w_down, n_expert):  # gate rows in blocks, up rows strided: units mismatched
    ups = [w_up[i::n_expert] for i in range(n_expert)]
    return list(zip(w_gate.chunk(n_expert), ups, w_down.chunk(n_expert, dim=1)))


def _split_scaled_copies(w_gate, w_up, w_down, n_expert):  # upcycling: the sum is right, but n full-size copies
    return [(w_gate, w_up, w_down / n_expert) for _ in range(n_expert)]


def _split_averaging_down(w_gate, w_up, w_down, n_expert):  # splits, then divides by n as if averaging
    return [(g, u, d / n_expert) for g, u, d in solutions.ex06_split_mlp_into_experts(w_gate, w_up, w_down, n_expert)]


# --- ex07: the capacity experiment ------------------------------------------------------------------------------

# The reference averages 10 random routers: 6.2% of the tokens dropped at capacity factor 1.0 (single routers
# ranged from 4.3% to 7.7%: random weight vectors of different lengths favour some experts), 0.2% at 1.25
# and none at 2.0. An average over 5 or more routers lands within about +-1.5 points of 6.2%; the ranges
# allow more. The kept fraction (94%), a capacity of capacity_factor * N forgetting the 8 experts (0%),
# or the drop rate measured per expert slot rather than per token fall outside.
DROPPED_RANGES = {1.0: (0.062, 0.04, 0.09), 1.25: (0.002, 0.0, 0.02), 2.0: (0.0, 0.0, 0.001)}  # reference, low, high


def check_ex07_dropped_fraction(fn):
    for capacity_factor, (reference, low, high) in DROPPED_RANGES.items():
        got = fn(capacity_factor)
        assert isinstance(got, float), f"return a float (the fraction of tokens dropped), got {type(got).__name__}"
        assert low <= got <= high, (f"capacity factor {capacity_factor}: {got:.4f} of the tokens dropped; the "
                                    f"reference measured {reference:.3f} and accepts {low}..{high}")


@functools.cache
def _solution_dropped(capacity_factor):
    return solutions.ex07_dropped_fraction(capacity_factor)


def _dropped_without_the_experts(capacity_factor):  # capacity = capacity_factor * N: nobody is ever dropped
    return _solution_dropped(capacity_factor * 8)


CASES = [
    Exercise("ex01_top_k_gating", check_ex01_top_k_gating,
             wrong=[_gating_not_renormalised, _gating_always_renormalised, _gating_softmax_wrong_axis]),
    Exercise("ex02_router_losses", check_ex02_router_losses, wrong=[
        _router_losses_variant(balancing="no_n_expert"), _router_losses_variant(balancing="per_token"),
        _router_losses_variant(balancing="sum_not_mean"), _router_losses_variant(balancing="no_gradient"),
        _router_losses_variant(z="not_squared"), _router_losses_variant(z="squared_logits"),
        _router_losses_variant(z="naive")]),
    Exercise("ex03_moe_forward", check_ex03_moe_forward, wrong=[
        _moe_per_token_loop, _moe_per_token_scatter, _moe_unweighted, _moe_not_renormalised]),
    Exercise("ex04_capacity_keep_mask", check_ex04_capacity_keep_mask,
             wrong=[_keep_off_by_one, _keep_the_last, _keep_global_capacity, _keep_by_python_loop]),
    Exercise("ex05_moe_param_counts", check_ex05_moe_param_counts,
             wrong=[_counts_forget_router, _counts_two_matrices, _counts_forget_shared_in_active]),
    Exercise("ex06_split_mlp_into_experts", check_ex06_split_mlp_into_experts,
             wrong=[_split_down_by_rows, _split_up_interleaved, _split_scaled_copies, _split_averaging_down]),
    Exercise("ex07_dropped_fraction", check_ex07_dropped_fraction, wrong=[
        lambda capacity_factor: 1 - _solution_dropped(capacity_factor),  # the kept fraction
        _dropped_without_the_experts,
        lambda capacity_factor: _solution_dropped(capacity_factor) / 8,  # per expert slot, not per token
    ]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
