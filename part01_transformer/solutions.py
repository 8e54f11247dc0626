"""Reference answers for part01_transformer/exercises.py. Try the exercises first!"""
import math

import torch


def ex01_position_shift_matrix(k: int, n_embd: int) -> torch.Tensor:
    # Channels (2i, 2i+1) hold (sin(pos w_i), cos(pos w_i)). Moving k positions adds k w_i to the angle:
    #   sin(a + b) = sin a cos b + cos a sin b,   cos(a + b) = cos a cos b - sin a sin b
    # a 2 x 2 rotation per pair that depends on k, not on pos: M is block-diagonal.
    inv_freq = 10000.0 ** (-torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)  # w_i
    M = torch.zeros(n_embd, n_embd, dtype=torch.float64)
    for i, w in enumerate(inv_freq.tolist()):
        c, s = math.cos(k * w), math.sin(k * w)
        M[2 * i, 2 * i], M[2 * i, 2 * i + 1] = c, s  # new sin = cos(kw) sin + sin(kw) cos
        M[2 * i + 1, 2 * i], M[2 * i + 1, 2 * i + 1] = -s, c  # new cos = -sin(kw) sin + cos(kw) cos
    return M.float()


def ex02_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T, S); the scale uses the key size d
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # hidden keys get weight exactly 0
    return torch.softmax(scores, dim=-1) @ v  # over the keys: each row of weights sums to 1


def ex03_multi_head_attention(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
                              out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    q, k, v = (x @ in_proj_weight.T + in_proj_bias).split(C, dim=-1)  # each (B, T, C)

    def heads(t):  # (B, T, C) -> (B, n_head, T, head_size): head h gets channel block h
        return t.view(B, T, n_head, C // n_head).transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()  # True = may look (ex02's convention)
    y = ex02_attention(heads(q), heads(k), heads(v), causal)  # (B, n_head, T, head_size)
    y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads in order
    return y @ out_proj_weight.T + out_proj_bias


def ex04_layer_norm_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # divide by C, not C - 1
    inv_std = 1.0 / torch.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    out = x_hat * weight + bias
    batch_dims = tuple(range(x.dim() - 1))  # weight and bias are shared by every token: sum over them
    grad_weight = (grad_out * x_hat).sum(dim=batch_dims)
    grad_bias = grad_out.sum(dim=batch_dims)
    g = grad_out * weight  # dL/dx_hat
    # x_hat depends on every channel through the mean and the variance; the chain rule gives
    # dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std
    grad_x = inv_std * (g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))
    return out, grad_x, grad_weight, grad_bias


def ex05_attention_peakiness(head_size: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2000, 1, head_size, generator=generator)  # 2000 queries ...
    k = torch.randn(2000, 32, head_size, generator=generator)  # ... each with its own 32 keys
    scores = (q @ k.transpose(-2, -1)).squeeze(1)  # (2000, 32); each score has variance head_size
    scaled = torch.softmax(scores / math.sqrt(head_size), dim=-1).amax(dim=-1).mean().item()
    unscaled = torch.softmax(scores, dim=-1).amax(dim=-1).mean().item()
    return scaled, unscaled
