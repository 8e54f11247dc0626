"""Part 3 reference solutions. Try exercises.py first; `pytest tests/test_part03_exercises.py -rs` checks both."""
import math

import torch
from torch.nn import functional as F


def ex01_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return x / rms * weight


def ex02_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    head_size = x.size(-1)
    freqs = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (head_size/2,)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, head_size/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def ex03_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def ex04_grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, n_head, T, head_size)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def ex05_sliding_window_mask(T: int, window: int, n_sink: int) -> torch.Tensor:
    q_pos, k_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    offset = q_pos - k_pos  # (T, T): how far back the key is
    return (offset >= 0) & ((offset < window) | (k_pos < n_sink))


def ex06_kv_cache_decode_step(q_new: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor):
    k_cache, v_cache = torch.cat((k_cache, k_new), dim=2), torch.cat((v_cache, v_new), dim=2)
    scores = q_new @ k_cache.transpose(-2, -1) / math.sqrt(q_new.size(-1))  # (B, H, 1, T + 1)
    return F.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def ex07_rolling_buffer_slot(pos: int, capacity: int, n_sink: int) -> int:
    if pos < n_sink:
        return pos
    return n_sink + (pos - n_sink) % (capacity - n_sink)


def ex08_kv_cache_bytes(n_layer: int, n_kv_head: int, head_size: int, n_tokens: int, window: int | None,
                        n_sink: int, bytes_per_value: int) -> int:
    slots = n_tokens if window is None else n_sink + window
    return 2 * n_layer * n_kv_head * head_size * slots * bytes_per_value  # 2: keys and values
