"""Part 1 exercises: build the Transformer's pieces yourself, and check them against PyTorch's own.

Fill in each function (replace `raise NotImplementedError`), then check your answers with

    pytest tests/test_part01_exercises.py -rs

Untouched exercises are reported as skipped ("not attempted yet"). Each exercise states a goal and
the check compares your function with an outside reference (torch.nn.functional.scaled_dot_product_attention,
torch.nn.MultiheadAttention, torch.nn.LayerNorm and autograd, this chapter's position table) and tells
you what differs; ex05 is an experiment whose result must land in the range the reference measured.
Stuck? part01_transformer/solutions.py has the answers.
"""
import math  # noqa: F401  (you will want math.sqrt)

import torch  # noqa: F401


def ex01_position_shift_matrix(k: int, n_embd: int) -> torch.Tensor:
    """Why sinusoids? Vaswani et al. 2017 (section 3.5) chose them because "for any fixed offset k,
    PE[pos + k] can be represented as a linear function of PE[pos]": a layer can learn to look k
    tokens back without knowing where it is. Find that linear function.

    PE is the table of sinusoidal_positions in model.py (section 3.5 of the paper):
        PE[pos, 2i]   = sin(pos / 10000 ** (2i / n_embd))
        PE[pos, 2i+1] = cos(pos / 10000 ** (2i / n_embd))
    Return a float tensor M of shape (n_embd, n_embd) such that, for every position pos,
        PE[pos + k] = M @ PE[pos]
    The same M must work at every position (it depends only on k). n_embd is even; k >= 0.
    """
    raise NotImplementedError


def ex02_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, section 3.2.1), written out by hand.

    q: (..., T, d) queries; k: (..., S, d) keys; v: (..., S, d_v) values. T and S may differ (a decode
    step has T = 1; cross-attention reads another sequence), d_v may differ from d, and the leading
    dimensions (batch, heads) may be any number, including none.
    mask: None (every query sees every key) or a bool tensor broadcastable to (..., T, S),
    True where query t may look at key s. Every query row keeps at least one key.

    Goal: return (..., T, d_v), equal to
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    without calling it (or any other attention function): the check compares with it on random
    inputs, with and without masks.
    """
    raise NotImplementedError


def ex03_multi_head_attention(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
                              out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal multi-head self-attention from the weights of a torch.nn.MultiheadAttention.

    x: (B, T, C). The weights are those of mha = torch.nn.MultiheadAttention(C, n_head, batch_first=True):
        in_proj_weight (3C, C) and in_proj_bias (3C,): the query, key and value projections stacked, in
            that order (nn.Linear's layout: y = x @ W.T + b);
        out_proj_weight (C, C), out_proj_bias (C,): the output projection.
    Head h works on channels h*C/n_head .. (h+1)*C/n_head - 1 of the queries, keys and values, with its
    own attention; the heads' outputs are concatenated in order and projected.

    Goal: return (B, T, C), equal to what PyTorch computes with a causal mask:
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)     # nn.MultiheadAttention: True = NOT allowed
        mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    without calling nn.MultiheadAttention or F.multi_head_attention_forward (your ex02 is welcome).
    """
    raise NotImplementedError


def ex04_layer_norm_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm (Ba et al. 2016, https://arxiv.org/abs/1607.06450), forward and backward, by hand.

    Forward, over the last dimension (size C) of x (..., C), as torch.nn.LayerNorm computes it: each
    vector is normalised to mean 0 and variance 1 (the biased variance, dividing by C), with eps added
    to the variance, then scaled by weight (C,) and shifted by bias (C,): out = x_hat * weight + bias.

    Backward: given grad_out = dL/d(out) (same shape as x) for some loss L, return the gradients of L
    with respect to x, weight and bias. Work them out on paper (the chain rule through the mean and
    the variance; x_hat has zero mean and unit variance, which simplifies the result) and write them
    as tensor formulas.

    Return (out, grad_x, grad_weight, grad_bias), shaped like x, x, weight, bias. The check compares
    with torch.nn.LayerNorm and autograd; it does not let you call autograd or F.layer_norm yourself.
    """
    raise NotImplementedError


def ex05_attention_peakiness(head_size: int) -> tuple[float, float]:
    """Experiment: what does the 1/sqrt(head_size) in attention do?

    Draw random queries and keys with independent standard-normal entries: at least 1,000 independent
    rows (queries), each attending over 32 keys, all of size head_size. Compute the attention weights
    (softmax over the 32 keys, no mask) twice: with the scores q . k divided by sqrt(head_size), and
    without. For each, measure the mean over the queries of the largest weight in the row (1/32 means
    the query spreads its attention evenly; 1 means it looks at one key only).

    Return (mean largest weight with the scale, mean largest weight without the scale).
    Then try head_size 4, 16, 64, 256: which of the two depends on the head size, and why would a
    softmax that puts all its weight on one key be hard to train (Vaswani et al. 2017, footnote 4)?
    """
    raise NotImplementedError
