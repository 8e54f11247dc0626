"""Part 1 exercises: build the Transformer's pieces yourself.

Fill in each function (replace `raise NotImplementedError`), then check your answers with

    pytest tests/test_part01_exercises.py -rs

Untouched exercises are reported as skipped ("not attempted yet"). Every check compares your function
with an independent reference (torch.nn.functional.scaled_dot_product_attention, torch.nn.LayerNorm,
the formula from the paper) and tells you what differs. Stuck? part01_transformer/solutions.py has
the answers, and model.py the same ideas inside the model.
"""
import math  # noqa: F401  (you will want math.sqrt)

import torch  # noqa: F401


def ex01_sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    """The sinusoidal position table of Vaswani et al. 2017 (section 3.5).

    Return a float tensor of shape (block_size, n_embd) with, for position pos and i = 0, 1, ...:
        PE[pos, 2i]   = sin(pos / 10000 ** (2i / n_embd))
        PE[pos, 2i+1] = cos(pos / 10000 ** (2i / n_embd))
    n_embd is even. Positions start at 0, so row 0 is [0, 1, 0, 1, ...].

    Hints: torch.arange(0, n_embd, 2) gives the values of 2i; broadcast a (T, 1) column of positions
    against a row of frequencies; table[:, 0::2] and table[:, 1::2] select the even and odd channels.
    """
    raise NotImplementedError


def ex02_causal_mask(T: int) -> torch.Tensor:
    """The causal mask for T tokens: a bool tensor (T, T) whose entry [t, s] is True when query t may
    look at key s, i.e. when s <= t (a token sees itself and the past, never the future).

    Hint: torch.tril keeps the lower triangle, the diagonal included.
    """
    raise NotImplementedError


def ex03_attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention weights from queries and keys, both of shape (..., T, head_size).

    Return (..., T, T) where row t is a probability distribution over the keys 0..t:
      1. scores = q @ k^T                       (how well query t matches key s)
      2. divide by sqrt(head_size)              (keeps the scores' variance ~1)
      3. set the scores of future keys (s > t) to -inf
      4. softmax over the keys (the last dimension)
    Leading dimensions (batch, heads) may be any number, including none.

    Hints: k.transpose(-2, -1); scores.masked_fill(~mask, float("-inf")); torch.softmax(..., dim=-1).
    """
    raise NotImplementedError


def ex04_single_head_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                               w_v: torch.Tensor) -> torch.Tensor:
    """One head of causal self-attention. x: (B, T, C); w_q, w_k, w_v: (C, head_size).

    Project the tokens to queries, keys and values (q = x @ w_q, ...), compute the causal attention
    weights (scaled, masked, softmax, as in ex03) and return the weighted sum of the values,
    shape (B, T, head_size).
    """
    raise NotImplementedError


def ex05_split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Split the channels of x (B, T, C) into n_head heads: return (B, n_head, T, head_size),
    head_size = C // n_head, where head h holds the channels h*head_size ... (h+1)*head_size - 1.

    Hint: first view as (B, T, n_head, head_size), then swap two dimensions. Viewing straight
    as (B, n_head, T, head_size) has the right shape but mixes up tokens and heads.
    """
    raise NotImplementedError


def ex06_merge_heads(y: torch.Tensor) -> torch.Tensor:
    """The inverse of ex05: concatenate the heads of y (B, n_head, T, head_size) along the channels,
    returning (B, T, n_head * head_size) with head 0's channels first, then head 1's, ...

    Hint: bring T next to B first; after a transpose call .contiguous() (or use .reshape) before .view.
    """
    raise NotImplementedError


def ex07_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016) over the last dimension, as torch.nn.LayerNorm computes it.

    For each token (each vector along the last dim, size C): subtract its mean, divide by
    sqrt(variance + eps), then multiply by weight (C,) and add bias (C,). The variance is the
    *biased* one: the mean of the squared deviations, dividing by C (not C - 1).

    Hint: x.mean(dim=-1, keepdim=True); torch.var's default is the unbiased variance.
    """
    raise NotImplementedError


def ex08_pre_norm_block(x: torch.Tensor, ln_1, attn, ln_2, mlp) -> torch.Tensor:
    """A pre-norm Transformer block (GPT-2): two residual sublayers, each reading a normalized copy
    of the stream and adding its result back to the un-normalized stream:

        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))

    ln_1, attn, ln_2 and mlp are functions (nn.Modules) from (B, T, C) to (B, T, C). Note the
    second line reads the x that already contains the attention output. (The original Transformer
    was post-norm, x = ln(x + sublayer(x)); pre-norm trains more stably in deep stacks.)
    """
    raise NotImplementedError
