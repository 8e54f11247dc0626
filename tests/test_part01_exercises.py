"""Part 1 exercises: each check compares with an independent reference and rejects plausible mistakes."""
import math

import torch
import torch.nn.functional as F

from part01_transformer import exercises, solutions
from part01_transformer.model import Block, GPTConfig
from tests.harness import Exercise, exercise_tests


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


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- ex01 sinusoidal positions ----------------------------------------------------------------


def sinusoid_by_formula(block_size, n_embd):
    """The paper's formula, one entry at a time in float64."""
    table = torch.zeros(block_size, n_embd, dtype=torch.float64)
    for pos in range(block_size):
        for i in range(n_embd // 2):
            table[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / n_embd))
            table[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / n_embd))
    return table


def check_ex01(fn):
    for block_size, n_embd in [(16, 8), (5, 6)]:
        assert_close(fn(block_size, n_embd), sinusoid_by_formula(block_size, n_embd),
                     f"sinusoidal_positions({block_size}, {n_embd})", atol=1e-5)


def sin_cos_swapped(block_size, n_embd):
    table = solutions.ex01_sinusoidal_positions(block_size, n_embd)
    return torch.stack([table[:, 1::2], table[:, 0::2]], dim=-1).view(block_size, n_embd)


def frequency_uses_i_not_2i(block_size, n_embd):
    angle = torch.arange(block_size)[:, None] / 10000 ** (torch.arange(n_embd // 2) / n_embd)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).view(block_size, n_embd)


def positions_from_one(block_size, n_embd):
    return solutions.ex01_sinusoidal_positions(block_size + 1, n_embd)[1:]


# --- ex02 causal mask ----------------------------------------------------------------------------


def check_ex02(fn):
    for T in (1, 5):
        mask = fn(T)
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, "return a bool tensor (True = may look)"
        expected = torch.tensor([[s <= t for s in range(T)] for t in range(T)])
        assert mask.shape == (T, T), f"causal_mask({T}): shape {tuple(mask.shape)}, expected ({T}, {T})"
        wrong = (mask != expected).nonzero().tolist()
        assert not wrong, (f"causal_mask({T}) is wrong at [query, key] = {wrong[:4]}: query t may look at keys "
                           f"s <= t (itself included) and not at s > t")


# --- ex03 attention weights, ex04 one head ---------------------------------------------------------


def reference_attention_weights(q, k):
    """F.scaled_dot_product_attention with the identity as values returns the weights themselves."""
    T = q.size(-2)
    return F.scaled_dot_product_attention(q.double(), k.double(), torch.eye(T, dtype=torch.float64), is_causal=True)


def check_ex03(fn):
    for shape in [(6, 16), (2, 3, 5, 8)]:  # unbatched, and (B, n_head, T, head_size)
        q, k = randn(*shape, seed=1), randn(*shape, seed=2)
        weights = fn(q, k)
        assert_close(weights, reference_attention_weights(q, k), f"attention weights for q, k of shape {shape}")


def attention_weights_variant(scale=None, mask_diagonal=0, softmax_dim=-1, causal=True):
    """A family of plausible mistakes in ex03."""

    def weights(q, k):
        T = q.size(-2)
        scores = q @ k.transpose(-2, -1) / (scale(q.size(-1)) if scale else math.sqrt(q.size(-1)))
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(mask_diagonal), float("-inf"))
        return torch.softmax(scores, dim=softmax_dim)

    return weights


def check_ex04(fn):
    x = randn(2, 5, 8, seed=3)
    w_q, w_k, w_v = (randn(8, 4, seed=s) for s in (4, 5, 6))
    expected = F.scaled_dot_product_attention(x @ w_q, x @ w_k, x @ w_v, is_causal=True)
    assert_close(fn(x, w_q, w_k, w_v), expected, "single-head attention output (B, T, head_size)")


def head_without_mask(x, w_q, w_k, w_v):
    return F.scaled_dot_product_attention(x @ w_q, x @ w_k, x @ w_v)


def head_attending_to_keys(x, w_q, w_k, w_v):
    return solutions.ex03_attention_weights(x @ w_q, x @ w_k) @ (x @ w_k)


def head_without_scale(x, w_q, w_k, w_v):
    return attention_weights_variant(scale=lambda d: 1.0)(x @ w_q, x @ w_k) @ (x @ w_v)


# --- ex05 / ex06 split and merge heads ----------------------------------------------------------


def check_ex05(fn):
    x, n_head = randn(2, 5, 12, seed=7), 3
    head_size = 12 // n_head
    expected = torch.stack([x[:, :, h * head_size : (h + 1) * head_size] for h in range(n_head)], dim=1)
    assert_close(fn(x, n_head), expected, "split_heads: (B, n_head, T, head_size), head h = channel block h", atol=0)


def check_ex06(fn):
    y = randn(2, 3, 5, 4, seed=8)
    expected = torch.cat([y[:, h] for h in range(y.size(1))], dim=-1)
    assert_close(fn(y), expected, "merge_heads: (B, T, C), heads concatenated in order", atol=0)


# --- ex07 LayerNorm ------------------------------------------------------------------------------


def check_ex07(fn):
    C = 6  # small C: dividing by C - 1 instead of C is a 20% difference in the variance
    x = 3.0 + 2.0 * randn(3, 4, C, seed=9)
    x[0, 0] = 1e-3 * randn(C, seed=10)  # a nearly constant token: here eps matters
    ln = torch.nn.LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.5 * randn(C, seed=11))
        ln.bias.copy_(randn(C, seed=12))
    expected = ln(x).detach()
    assert_close(fn(x, ln.weight.detach(), ln.bias.detach(), eps=1e-5), expected, "layer_norm vs nn.LayerNorm",
                 atol=1e-5, rtol=1e-4)


def layer_norm_variant(unbiased=False, dim=-1, eps_outside_sqrt=False):
    def layer_norm(x, weight, bias, eps=1e-5):
        mean = x.mean(dim=dim, keepdim=True)
        var = x.var(dim=dim, keepdim=True, unbiased=unbiased)
        std = torch.sqrt(var) + eps if eps_outside_sqrt else torch.sqrt(var + eps)
        return (x - mean) / std * weight + bias

    return layer_norm


def layer_norm_without_affine(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


# --- ex08 pre-norm block ------------------------------------------------------------------------


def check_ex08(fn):
    torch.manual_seed(13)
    block = Block(GPTConfig(n_embd=16, n_head=2))
    with torch.no_grad():  # make ln_1 and ln_2 differ, so using the wrong one shows
        for ln in (block.ln_1, block.ln_2):
            ln.weight.copy_(1.0 + 0.5 * torch.randn(16))
            ln.bias.copy_(0.5 * torch.randn(16))
    x = 2.0 + 3.0 * randn(2, 5, 16, seed=14)
    with torch.no_grad():
        got = fn(x, block.ln_1, block.attn, block.ln_2, block.mlp)
        assert_close(got, block(x), "pre-norm block output, compared with part01's Block", atol=1e-5)


def post_norm_block(x, ln_1, attn, ln_2, mlp):
    x = ln_1(x + attn(x))
    return ln_2(x + mlp(x))


def block_without_residual(x, ln_1, attn, ln_2, mlp):
    return mlp(ln_2(attn(ln_1(x))))


def parallel_block(x, ln_1, attn, ln_2, mlp):  # the mlp reads the block's input, not the updated stream
    return x + attn(ln_1(x)) + mlp(ln_2(x))


def block_norms_swapped(x, ln_1, attn, ln_2, mlp):
    return solutions.ex08_pre_norm_block(x, ln_2, attn, ln_1, mlp)


CASES = [
    Exercise("ex01_sinusoidal_positions", check_ex01,
             wrong=[sin_cos_swapped, frequency_uses_i_not_2i, positions_from_one]),
    Exercise("ex02_causal_mask", check_ex02, wrong=[
        lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1),  # the diagonal excluded
        lambda T: torch.ones(T, T, dtype=torch.bool).triu(),  # the future instead of the past
        lambda T: torch.ones(T, T, dtype=torch.bool).tril(1),  # one future token leaks
    ]),
    Exercise("ex03_attention_weights", check_ex03, wrong=[
        attention_weights_variant(scale=lambda d: 1.0),  # no 1/sqrt(d)
        attention_weights_variant(scale=lambda d: d),  # 1/d instead of 1/sqrt(d)
        attention_weights_variant(mask_diagonal=-1),  # the diagonal excluded
        attention_weights_variant(mask_diagonal=1),  # the next token included
        attention_weights_variant(softmax_dim=-2),  # normalised over the queries
        attention_weights_variant(causal=False),  # no mask
    ]),
    Exercise("ex04_single_head_attention", check_ex04,
             wrong=[head_without_mask, head_attending_to_keys, head_without_scale]),
    Exercise("ex05_split_heads", check_ex05, wrong=[
        lambda x, n_head: x.view(x.size(0), n_head, x.size(1), -1),  # right shape, scrambled contents
        lambda x, n_head: x.view(x.size(0), x.size(1), -1, n_head).permute(0, 3, 1, 2),  # interleaved channels
    ]),
    Exercise("ex06_merge_heads", check_ex06, wrong=[
        lambda y: y.reshape(y.size(0), y.size(2), -1),  # no transpose
        lambda y: y.permute(0, 2, 3, 1).reshape(y.size(0), y.size(2), -1),  # interleaved channels
    ]),
    Exercise("ex07_layer_norm", check_ex07, wrong=[
        layer_norm_variant(unbiased=True),
        layer_norm_variant(dim=0),
        layer_norm_variant(eps_outside_sqrt=True),
        layer_norm_without_affine,
    ]),
    Exercise("ex08_pre_norm_block", check_ex08, wrong=[post_norm_block, block_without_residual, parallel_block,
                                                       block_norms_swapped]),
]

(test_solution, test_exercise, test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(
    exercises, solutions, CASES)
