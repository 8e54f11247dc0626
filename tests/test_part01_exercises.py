"""Part 1 exercises: each check compares with an outside reference and rejects plausible mistakes."""
import math

import torch
import torch.nn.functional as F

from part01_transformer import exercises, solutions
from tests.harness import Exercise, TorchCalls, exercise_tests


def assert_close(actual, expected, what: str, atol: float = 1e-5, rtol: float = 1e-5):
    """Shape first, then values, with a message that says what differs and by how much."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual = actual.detach().to(expected.dtype)
    assert not torch.isnan(actual).any(), f"{what}: contains NaN (a row masked out entirely?)"
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual - expected).abs()
        at = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{what}: values differ, largest difference {diff.max().item():.3g} at index {at} "
                             f"(got {actual[at].item():.5f}, expected {expected[at].item():.5f}; "
                             f"tolerance atol={atol}, rtol={rtol})")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- ex01: the shift matrix of the sinusoidal positions ---------------------------------------


def sinusoid_table(n_positions, n_embd):
    """The paper's formula in float64, independent of model.py."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float64)[None, :]
    angle = pos / 10000.0 ** (two_i / n_embd)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).view(n_positions, n_embd)  # sin, cos interleaved


def check_ex01(fn):
    for k, n_embd in [(1, 8), (5, 16), (0, 6), (37, 12)]:
        table = sinusoid_table(64 + k, n_embd)
        M = fn(k, n_embd)
        assert isinstance(M, torch.Tensor) and M.shape == (n_embd, n_embd), (
            f"shift_matrix({k}, {n_embd}): expected a ({n_embd}, {n_embd}) tensor, got "
            f"{tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__}")
        shifted = table[:64] @ M.double().T  # row pos: M @ PE[pos]
        assert_close(shifted, table[k:], f"M @ PE[pos] vs PE[pos + {k}] for pos 0..63, n_embd={n_embd}", atol=1e-5)


def shift_backwards(k, n_embd):  # the rotation transposed: moves k positions back
    return solutions.ex01_position_shift_matrix(-k, n_embd)


def shift_with_i_not_2i(k, n_embd):
    M = torch.zeros(n_embd, n_embd)
    for i in range(n_embd // 2):
        a = k / 10000 ** (i / n_embd)
        rotation = [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor(rotation)
    return M


# --- ex02: attention with masks ------------------------------------------------------------------

NO_SDPA = {F.scaled_dot_product_attention: "the exercise is to write attention by hand"}


def visible_mask(*shape, seed):
    """A random bool mask where every query row keeps at least one key (its first)."""
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[..., 0] = True
    return mask


ATTENTION_CASES = [  # (what, q shape, k shape, v shape, mask)
    ("no mask, unbatched", (6, 16), (6, 16), (6, 16), None),
    ("a causal mask, (B, heads, T, d)", (2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8),
     torch.ones(5, 5, dtype=torch.bool).tril()),
    ("cross-attention: 4 queries, 7 keys, values of size 5, a mask broadcast over heads", (2, 3, 4, 8),
     (2, 3, 7, 8), (2, 3, 7, 5), visible_mask(2, 1, 4, 7, seed=9)),
    ("a decode step: 1 query, 6 keys", (2, 1, 8), (2, 6, 8), (2, 6, 8), None),
]


def check_ex02(fn):
    for i, (what, q_shape, k_shape, v_shape, mask) in enumerate(ATTENTION_CASES):
        q, k, v = randn(*q_shape, seed=3 * i), randn(*k_shape, seed=3 * i + 1), randn(*v_shape, seed=3 * i + 2)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        with TorchCalls(forbidden=NO_SDPA):
            got = fn(q, k, v, mask)
        assert_close(got, want, f"{what} (vs F.scaled_dot_product_attention)")


def attention_variant(scale=None, softmax_dim=-1, masked_value=float("-inf"), invert_mask=False, use_mask=True,
                      always_causal=False):
    """A family of plausible mistakes."""

    def attention(q, k, v, mask):
        scores = q @ k.transpose(-2, -1) / (scale(q, v) if scale else math.sqrt(q.size(-1)))
        if always_causal:
            mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril()
        if mask is not None and use_mask:
            scores = scores.masked_fill(mask if invert_mask else ~mask, masked_value)
        return torch.softmax(scores, dim=softmax_dim) @ v

    return attention


def attention_zeroing_after_softmax(q, k, v, mask):  # hides keys but does not renormalise
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
    return (weights if mask is None else weights * mask) @ v


# --- ex03: multi-head attention vs nn.MultiheadAttention --------------------------------------------

NO_MHA = {F.multi_head_attention_forward: "the exercise is to write multi-head attention yourself"}


def check_ex03(fn):
    for C, n_head, T, seed in [(12, 3, 5, 0), (16, 4, 7, 1), (8, 1, 4, 2)]:
        torch.manual_seed(seed)
        mha = torch.nn.MultiheadAttention(C, n_head, batch_first=True)
        with torch.no_grad():  # PyTorch starts the biases at 0; random ones show where they go
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        x = randn(2, T, C, seed=seed + 10)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = not allowed
        with torch.no_grad():
            want = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
            weights = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
            with TorchCalls(forbidden=NO_MHA):
                got = fn(x, *weights, n_head)
        assert_close(got, want, f"C={C}, n_head={n_head}, T={T} (vs torch.nn.MultiheadAttention, causal)", atol=1e-5)


def mha_variant(split="view", out_proj=True, causal=True, scale_by_C=False, order=(0, 1, 2)):
    def mha(x, in_w, in_b, out_w, out_b, n_head):
        B, T, C = x.shape
        qkv = (x @ in_w.T + in_b).split(C, dim=-1)
        q, k, v = (qkv[i] for i in order)

        def heads(t):
            if split == "view":  # right
                return t.view(B, T, n_head, C // n_head).transpose(1, 2)
            if split == "plain":  # right shape, tokens and heads mixed up
                return t.reshape(B, n_head, T, C // n_head)
            return t.view(B, T, C // n_head, n_head).permute(0, 3, 1, 2)  # interleaved channels

        mask = torch.ones(T, T, dtype=torch.bool).tril() if causal else None
        q, k, v = heads(q), heads(k), heads(v)
        if scale_by_C:
            q = q * math.sqrt(C // n_head) / math.sqrt(C)
        y = solutions.ex02_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, C)
        return y @ out_w.T + out_b if out_proj else y

    return mha


# --- ex04: LayerNorm forward and backward --------------------------------------------------------

NO_AUTOGRAD = {
    F.layer_norm: "write the forward pass yourself",
    torch.layer_norm: "write the forward pass yourself",
    torch.Tensor.backward: "work the gradients out by hand, not with autograd",
    torch.autograd.grad: "work the gradients out by hand, not with autograd",
}


def check_ex04(fn):
    C = 6  # small C: dividing by C - 1 instead of C is a 20% difference in the variance
    x = 3.0 + 2.0 * randn(3, 4, C, seed=9, dtype=torch.float64)
    x[0, 0] = 1e-3 * randn(C, seed=10, dtype=torch.float64)  # a nearly constant token: here eps matters
    weight = 1.0 + 0.5 * randn(C, seed=11, dtype=torch.float64)
    bias = randn(C, seed=12, dtype=torch.float64)
    grad_out = randn(3, 4, C, seed=13, dtype=torch.float64)
    # the reference: nn.LayerNorm and autograd, in float64
    ln = torch.nn.LayerNorm(C, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(weight)
        ln.bias.copy_(bias)
    x_ref = x.clone().requires_grad_()
    want_out = ln(x_ref)
    want_out.backward(grad_out)
    with TorchCalls(forbidden=NO_AUTOGRAD):
        result = fn(x.clone(), weight.clone(), bias.clone(), grad_out.clone(), 1e-5)
    assert isinstance(result, tuple) and len(result) == 4, "return a tuple (out, grad_x, grad_weight, grad_bias)"
    out, grad_x, grad_weight, grad_bias = result
    assert_close(out, want_out.detach(), "out (vs torch.nn.LayerNorm)", atol=1e-6)
    assert_close(grad_weight, ln.weight.grad, "grad_weight (vs autograd)", atol=1e-6)
    assert_close(grad_bias, ln.bias.grad, "grad_bias (vs autograd)", atol=1e-6)
    assert_close(grad_x, x_ref.grad, "grad_x (vs autograd)", atol=1e-6)


def ln_backward_variant(grad_x_terms="full", unbiased=False, weight_from_x=False, bias_mean=False,
                        no_weight_in_grad_x=False):
    def ln_backward(x, weight, bias, grad_out, eps=1e-5):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=unbiased)
        inv_std = 1.0 / torch.sqrt(var + eps)
        x_hat = (x - mean) * inv_std
        dims = tuple(range(x.dim() - 1))
        g = grad_out if no_weight_in_grad_x else grad_out * weight
        if grad_x_terms == "naive":  # as if the mean and variance were constants
            grad_x = g * inv_std
        elif grad_x_terms == "no_variance":  # forgets that the variance depends on x too
            grad_x = inv_std * (g - g.mean(dim=-1, keepdim=True))
        else:
            grad_x = inv_std * (g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))
        grad_weight = (grad_out * (x if weight_from_x else x_hat)).sum(dim=dims)
        grad_bias = grad_out.mean(dim=dims) if bias_mean else grad_out.sum(dim=dims)
        return x_hat * weight + bias, grad_x, grad_weight, grad_bias

    return ln_backward


# --- ex05: the attention-peakiness experiment ------------------------------------------------------

# The reference draws 2,000 queries with 32 keys each. It measured a mean largest weight of 0.164 with
# the scale at every head size (4 to 256: the scaled scores always have variance 1), and without it
# 0.630 at head_size 16 and 0.909 at 256 (the scores' spread grows like sqrt(head_size), so the softmax
# saturates). With 1,000+ queries the sampling error of these means is below 0.005; the ranges allow
# +-0.025 (+-0.05 for the wider unscaled spread at 16) for other random draws. Dividing by head_size
# instead of its square root gives 0.05 and 0.036, a causal mask or the mean weight other values still.
PEAKINESS_RANGES = {16: ((0.14, 0.19), (0.58, 0.68)), 256: ((0.14, 0.19), (0.87, 0.95))}


def check_ex05(fn):
    for head_size, ((lo_s, hi_s), (lo_u, hi_u)) in PEAKINESS_RANGES.items():
        result = fn(head_size)
        assert isinstance(result, tuple) and len(result) == 2, "return (with the scale, without the scale)"
        scaled, unscaled = (float(r) for r in result)
        assert lo_s <= scaled <= hi_s, (
            f"head_size {head_size}, with the 1/sqrt(head_size) scale: mean largest weight {scaled:.3f}, the "
            f"reference measured 0.164 (accepted {lo_s}..{hi_s}); 32 keys, standard-normal q and k, no mask")
        assert lo_u <= unscaled <= hi_u, (
            f"head_size {head_size}, without the scale: mean largest weight {unscaled:.3f}, accepted "
            f"{lo_u}..{hi_u} (the reference measured {0.630 if head_size == 16 else 0.909})")


def peakiness_variant(scale, statistic="max", causal=False):
    def experiment(head_size):
        g = torch.Generator().manual_seed(1)
        q, k = torch.randn(1000, 32, head_size, generator=g), torch.randn(1000, 32, head_size, generator=g)
        scores = q @ k.transpose(-2, -1)
        if causal:
            scores = scores.masked_fill(~torch.ones(32, 32, dtype=torch.bool).tril(), float("-inf"))

        def stat(w):
            return (w.amax(dim=-1) if statistic == "max" else w.mean(dim=-1)).mean().item()

        return stat(torch.softmax(scores / scale(head_size), -1)), stat(torch.softmax(scores, -1))

    return experiment


CASES = [
    Exercise("ex01_position_shift_matrix", check_ex01, wrong=[
        shift_backwards, shift_with_i_not_2i,
        lambda k, n_embd: solutions.ex01_position_shift_matrix(k + 1, n_embd),  # off by one position
        lambda k, n_embd: torch.eye(n_embd),  # "the table repeats"
    ]),
    Exercise("ex02_attention", check_ex02, wrong=[
        attention_variant(scale=lambda q, v: 1.0),  # no 1/sqrt(d)
        attention_variant(scale=lambda q, v: q.size(-1)),  # 1/d instead of 1/sqrt(d)
        attention_variant(scale=lambda q, v: math.sqrt(v.size(-1))),  # the values' size, not the keys'
        attention_variant(invert_mask=True),  # True read as "hidden"
        attention_variant(masked_value=0.0),  # a score of 0 is not "hidden"
        attention_variant(softmax_dim=-2),  # normalised over the queries
        attention_variant(use_mask=False),  # the mask ignored
        attention_variant(always_causal=True),  # a causal mask whatever was asked
        attention_zeroing_after_softmax,
    ]),
    Exercise("ex03_multi_head_attention", check_ex03, wrong=[
        mha_variant(split="plain"), mha_variant(split="interleaved"), mha_variant(out_proj=False),
        mha_variant(causal=False), mha_variant(scale_by_C=True), mha_variant(order=(1, 0, 2)),
    ]),
    Exercise("ex04_layer_norm_backward", check_ex04, wrong=[
        ln_backward_variant(grad_x_terms="naive"), ln_backward_variant(grad_x_terms="no_variance"),
        ln_backward_variant(unbiased=True), ln_backward_variant(weight_from_x=True),
        ln_backward_variant(bias_mean=True), ln_backward_variant(no_weight_in_grad_x=True),
    ]),
    Exercise("ex05_attention_peakiness", check_ex05, wrong=[
        peakiness_variant(scale=lambda d: d),  # 1/d instead of 1/sqrt(d)
        peakiness_variant(scale=math.sqrt, statistic="mean"),  # the mean weight is always 1/32
        peakiness_variant(scale=math.sqrt, causal=True),  # early queries see few keys
        lambda head_size: solutions.ex05_attention_peakiness(head_size)[::-1],  # the two swapped
    ]),
]

(test_solution, test_exercise, test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(
    exercises, solutions, CASES)
