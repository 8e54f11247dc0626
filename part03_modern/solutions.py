"""Part 3 reference solutions. Try exercises.py first; `pytest tests/test_part03_exercises.py -rs` checks both."""
import math

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode


def ex01_rmsnorm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor, eps: float) -> torch.Tensor:
    h = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight  # RMSNorm
    return x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)  # the residual around SwiGLU


def ex02_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    head_size = x.size(-1)
    freqs = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (head_size/2,)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (T, head_size/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def ex03_to_rotate_half_layout(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Within each head, channel 2i goes to i and channel 2i+1 to i + head_size/2: then rotate-half's pair
    # (i, i + head_size/2) holds exactly our pair (2i, 2i+1), rotated by the same angle. Permuting the
    # channels of both q and k the same way leaves every dot product q . k unchanged.
    out_features, C = w.shape
    head_size = out_features // n_head
    return w.view(n_head, head_size // 2, 2, C).transpose(1, 2).reshape(out_features, C)


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
    scores = q_new @ k_cache.transpose(-2, -1) / math.sqrt(q_new.size(-1))  # (B, H, 1, T + 1): all in the past
    return F.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def ex07_kv_cache_flop_saving() -> float:
    from part03_modern.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    prompt = torch.randint(256, (1, 8))
    flops = {}
    for use_cache in (True, False):
        with FlopCounterMode(display=False) as counter:
            model.generate(prompt, 56, temperature=0, use_cache=use_cache)
        flops[use_cache] = counter.get_total_flops()
    # With the cache: 8 + 55 positions. Without: 8 + 9 + ... + 63 = 1,988 positions, ~32x more.
    return flops[False] / flops[True]


def ex08_rolling_kv_cache(n_layer: int, n_kv_head: int, head_size: int, n_tokens: int, window: int | None,
                          n_sink: int, bytes_per_value: int) -> tuple[list[int], int]:
    if window is None:
        slots, capacity = list(range(n_tokens)), n_tokens
    else:
        ring = window  # the slots after the sinks, reused round and round
        slots = [pos if pos < n_sink else n_sink + (pos - n_sink) % ring for pos in range(n_tokens)]
        capacity = n_sink + window
    total = 2 * n_layer * n_kv_head * head_size * capacity * bytes_per_value  # 2: keys and values
    return slots, total
