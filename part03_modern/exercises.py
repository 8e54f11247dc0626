"""Part 3 exercises: the pieces of a modern (Llama/Mistral-style) Transformer, one function each.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part03_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Every check compares your function with an independent reference (torch.nn.RMSNorm, the complex-number
form of RoPE, F.scaled_dot_product_attention, a brute-force loop). The reference answers are in
solutions.py (try first, then peek); model.py has the same ideas inside the model.
"""
import math  # noqa: F401  (you will want math.sqrt)

import torch
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): normalise each vector of x (..., C) by its root mean square.

        rms(x) = sqrt(mean(x_c ** 2 over the C channels) + eps)
        out    = x / rms(x) * weight            (weight: (C,), one gain per channel)

    Unlike LayerNorm there is no mean subtracted and no bias added. Return a tensor shaped like x,
    equal to torch.nn.RMSNorm(C, eps=eps) with its weight set to `weight`.

    Hints: x.pow(2).mean(dim=-1, keepdim=True); eps goes inside the square root; torch.rsqrt exists.
    """
    raise NotImplementedError


def ex02_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) of queries or keys x (..., T, head_size).

    Split the head_size channels into pairs (x[..., 2i], x[..., 2i+1]), i = 0 .. head_size/2 - 1, and
    rotate pair i of the token at position p = positions[t] by the angle
        angle = p * theta ** (-2i / head_size)
    i.e. (a, b) -> (a cos(angle) - b sin(angle), a sin(angle) + b cos(angle)): counter-clockwise, the
    first pair fastest (1 radian per position), the last one slowest. positions: (T,) integers.
    Return a tensor shaped like x.

    Why: the dot product of a query rotated by m * freq and a key rotated by n * freq depends only on
    m - n, so attention scores see how far apart two tokens are, not where they are.

    Hints: torch.arange(0, head_size, 2) gives the values of 2i; positions[:, None] * freqs[None, :]
    gives a (T, head_size/2) table of angles; x[..., 0::2] and x[..., 1::2] are the a's and b's;
    torch.stack((new_a, new_b), dim=-1).flatten(-2) interleaves them back.
    """
    raise NotImplementedError


def ex03_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU feed-forward network (Shazeer 2020) that replaces GPT-2's GELU MLP in Llama.

        out = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T,     silu(z) = z * sigmoid(z)

    x: (..., C); w_gate, w_up: (hidden, C); w_down: (C, hidden) (nn.Linear's layout: (out, in)).
    The gate branch goes through SiLU and decides, channel by channel, how much of the up branch passes.
    Return (..., C).

    Hints: F.linear(x, w) is x @ w.T; F.silu.
    """
    raise NotImplementedError


def ex04_grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention (GQA, Ainslie et al. 2023).

    q: (B, n_head, T, head_size); k, v: (B, n_kv_head, T, head_size), n_head a multiple of n_kv_head.
    Query heads come in n_kv_head consecutive groups of n_head // n_kv_head: query heads
    0 .. g-1 use key/value head 0, heads g .. 2g-1 use key/value head 1, and so on (g = group size).
    Return the causal attention output (B, n_head, T, head_size):
        softmax(q @ k^T / sqrt(head_size), future keys masked) @ v,  for each query head with its kv head.

    Do it without enable_gqa: repeat each key/value head for its group, then ordinary causal attention.

    Hints: k.repeat_interleave(g, dim=1) gives [k0, k0, k1, k1, ...]; mind that k.repeat(1, g, 1, 1)
    gives [k0, k1, k0, k1, ...] instead. Then F.scaled_dot_product_attention(q, k, v, is_causal=True),
    or the scores, mask and softmax by hand.
    """
    raise NotImplementedError


def ex05_sliding_window_mask(T: int, window: int, n_sink: int) -> torch.Tensor:
    """The attention mask of sliding-window attention with attention sinks (Mistral; StreamingLLM).

    Return a bool tensor (T, T) whose entry [t, s] is True when the query at position t may attend the
    key at position s:
      - causal: never a future key (s > t);
      - the window: the last `window` positions, the query's own included (t - s < window);
      - sinks: the first n_sink positions (s < n_sink) stay visible to every later query, however far
        back they are (Xiao et al. 2023: models dump surplus attention there; evicting them breaks).
    Example: T=6, window=2, n_sink=1: query 4 sees keys 0 (sink), 3 and 4.

    Hints: t - s as a (T, T) table: torch.arange(T)[:, None] - torch.arange(T)[None, :]. Combine
    conditions with & and |, and check that a sink is still never a *future* key.
    """
    raise NotImplementedError


def ex06_kv_cache_decode_step(q_new: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor):
    """One decode step of generation with a KV cache.

    The cache holds the keys and values of the T tokens seen so far, k_cache, v_cache: (B, H, T, head_size)
    (T may be 0). The new token brings its query, key and value, each (B, H, 1, head_size).
    Return (out, k_cache, v_cache):
      - k_cache, v_cache: the caches with the new token's key and value appended: (B, H, T + 1, head_size);
      - out: the new token's attention output (B, H, 1, head_size): its query against all T + 1 keys,
        its own included, scaled by 1/sqrt(head_size), softmax, weighted sum of the values.
    That equals the last row of full causal attention over the T + 1 tokens, at a fraction of the cost.

    Hints: torch.cat along dim=2. The new token is the latest, so every cached key is in its past: no
    mask is needed. (Careful: F.scaled_dot_product_attention's is_causal=True with 1 query and T + 1
    keys aligns the mask to the top-left corner and would let the query see key 0 only.)
    """
    raise NotImplementedError


def ex07_rolling_buffer_slot(pos: int, capacity: int, n_sink: int) -> int:
    """Where does the key/value of the token at position `pos` go in a rolling-buffer KV cache?

    The cache has `capacity` slots, 0 .. capacity - 1 (capacity > n_sink). The first n_sink positions
    (the attention sinks) are kept forever in slots 0 .. n_sink - 1. Every later position goes to the
    remaining capacity - n_sink slots in turn, round and round: once they are full, each new token
    overwrites the oldest non-sink token (Mistral's rolling buffer), so memory stays constant.
    Example: capacity 5, n_sink 2: positions 0 1 2 3 4 5 6 7 -> slots 0 1 2 3 4 2 3 4.
    Return the slot index (an int).

    Hint: for pos >= n_sink, count from the first non-sink position and take it modulo the ring size.
    """
    raise NotImplementedError


def ex08_kv_cache_bytes(n_layer: int, n_kv_head: int, head_size: int, n_tokens: int, window: int | None,
                        n_sink: int, bytes_per_value: int) -> int:
    """How much memory does the KV cache take? The number that decides how long a text fits on a GPU.

    Every layer keeps a key AND a value vector of head_size numbers per key/value head per token slot.
    Without a window (window=None) the cache holds every one of the n_tokens tokens. With a window it
    is a rolling buffer of n_sink + window slots, allocated up front, whatever n_tokens is.
    bytes_per_value: 4 for float32, 2 for bfloat16. Return the total number of bytes (an int).

    Example: Llama-2-7B (32 layers, 32 kv heads of size 128) at 4096 tokens in bfloat16:
    2 * 32 * 32 * 128 * 4096 * 2 bytes = 2 GiB per sequence; with 8 kv heads (GQA) it is a quarter.
    """
    raise NotImplementedError
