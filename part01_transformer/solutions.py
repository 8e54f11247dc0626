"""Reference answers for part01_transformer/exercises.py. Try the exercises first!"""
import math

import torch


def ex01_sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    position = torch.arange(block_size, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float32)  # 0, 2, 4, ...
    angle = position / 10000.0 ** (two_i / n_embd)  # (T, n_embd/2)
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(angle)  # even channels: sin
    table[:, 1::2] = torch.cos(angle)  # odd channels: cos
    return table


def ex02_causal_mask(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()  # row t: True for keys 0..t (the diagonal included)


def ex03_attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    T, head_size = q.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_size)  # (..., T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)  # over the keys: each row sums to 1


def ex04_single_head_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                               w_v: torch.Tensor) -> torch.Tensor:
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # each (B, T, head_size)
    return ex03_attention_weights(q, k) @ v


def ex05_split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, n_head, T, head_size)


def ex06_merge_heads(y: torch.Tensor) -> torch.Tensor:
    B, n_head, T, head_size = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, n_head * head_size)


def ex07_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # divide by C, not C-1
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ex08_pre_norm_block(x: torch.Tensor, ln_1, attn, ln_2, mlp) -> torch.Tensor:
    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))
    return x
