"""Part 3 exercises: the pieces of a modern (Llama/Mistral-style) Transformer.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part03_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (torch.nn.RMSNorm, the complex-number
form of RoPE, Hugging Face's rotate-half RoPE, F.scaled_dot_product_attention, a brute-force loop, a
simulation); ex07 is an experiment whose result must land in the range the reference measured. The
reference answers are in solutions.py (try first, then peek).
"""
import math  # noqa: F401  (you will want math.sqrt)

import torch
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_rmsnorm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor, eps: float) -> torch.Tensor:
    """The feed-forward half of a Llama block: out = x + SwiGLU(RMSNorm(x)).

    - RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467) divides each vector (over the
      last dimension, size C) by its root mean square, with eps added under the root, then multiplies
      by norm_weight (C,). Unlike LayerNorm it subtracts no mean and adds no bias. It must equal
      torch.nn.RMSNorm(C, eps=eps) with its weight set to norm_weight.
    - SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202, equation 6 without biases): a gate branch
      through SiLU (z * sigmoid(z)) multiplies an "up" branch channel by channel, and a down projection
      maps back: FFN(h) = (silu(h W_gate) * (h W_up)) W_down, with the weights given in nn.Linear's
      layout, (out_features, in_features): w_gate, w_up (hidden, C), w_down (C, hidden).
    x: (..., C). Return (..., C).
    """
    raise NotImplementedError


def ex02_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021, https://arxiv.org/abs/2104.09864, section 3.4)
    of queries or keys x (..., T, head_size).

    Split the head_size channels into pairs (x[..., 2i], x[..., 2i+1]), i = 0 .. head_size/2 - 1, and
    rotate pair i of the token at position p = positions[t] counter-clockwise by the angle
        p * theta ** (-2i / head_size)
    (the first pair fastest, 1 radian per position, the last one slowest). positions: (T,) integers,
    not necessarily 0, 1, 2, ... Return a tensor shaped like x.

    Why: the dot product of a query rotated by m * freq and a key rotated by n * freq depends only on
    m - n, so attention scores see how far apart two tokens are, not where they are.
    """
    raise NotImplementedError


def ex03_to_rotate_half_layout(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Port a query or key projection to the other RoPE convention.

    Our RoPE (ex02, model.py) rotates the channel pairs (2i, 2i+1) of each head. Hugging Face's Llama,
    GPT-NeoX and most ports rotate the pairs (i, i + head_size/2) instead ("rotate_half"):
        rotate_half(x) = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x * cos + rotate_half(x) * sin            (cos, sin: pair i's angle, repeated for both halves)
    with pair i at the same frequency theta ** (-2i / head_size) in both conventions. The same weights
    therefore give different attention scores under the two conventions: checkpoints must be converted
    (Meta's Llama weights, whose code rotates interleaved pairs, are converted this way for Hugging Face).

    w: (n_head * head_size, C), the weight of the Linear that makes the queries (or the keys) of
    n_head heads, in nn.Linear's layout, trained with our RoPE. Goal: return the weight to use instead
    in a model with rotate-half RoPE, so that every attention score q . k, between any two tokens at
    any positions, is what it was. The check builds both models' scores and compares.
    """
    raise NotImplementedError


def ex04_grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention (GQA, Ainslie et al. 2023, https://arxiv.org/abs/2305.13245).

    q: (B, n_head, T, head_size); k, v: (B, n_kv_head, T, head_size), n_head a multiple of n_kv_head.
    Query heads come in n_kv_head consecutive groups of g = n_head // n_kv_head: query heads 0 .. g-1
    use key/value head 0, heads g .. 2g-1 use key/value head 1, and so on. Return the causal
    attention output (B, n_head, T, head_size) of each query head with its key/value head.

    The check compares with F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    which does it for you, so it does not let you pass enable_gqa=True.
    """
    raise NotImplementedError


def ex05_sliding_window_mask(T: int, window: int, n_sink: int) -> torch.Tensor:
    """The attention mask of sliding-window attention with attention sinks (Mistral 7B, Jiang et al. 2023,
    https://arxiv.org/abs/2310.06825; StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453).

    Return a bool tensor (T, T) whose entry [t, s] is True when the query at position t may attend the
    key at position s:
      - causal: never a future key (s > t);
      - the window: the last `window` positions, the query's own included (t - s < window);
      - sinks: the first n_sink positions (s < n_sink) stay visible to every later query, however far
        back they are (models dump surplus attention there; evicting them breaks window attention).
    Example: T=6, window=2, n_sink=1: query 4 sees keys 0 (sink), 3 and 4. No Python loop.
    """
    raise NotImplementedError


def ex06_kv_cache_decode_step(q_new: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor):
    """One decode step of generation with a KV cache.

    The cache holds the keys and values of the T tokens seen so far, k_cache, v_cache: (B, H, T, head_size)
    (T may be 0). The new token brings its query, key and value, each (B, H, 1, head_size).
    Return (out, k_cache, v_cache):
      - k_cache, v_cache: the caches with the new token's key and value appended: (B, H, T + 1, head_size);
      - out: the new token's causal attention output (B, H, 1, head_size), over all T + 1 tokens.
    The check feeds tokens one at a time and compares every step with the matching row of full causal
    attention over the whole sequence. (Careful: F.scaled_dot_product_attention's is_causal=True aligns
    its mask to the top-left corner, which is not what one query after T cached keys needs.)
    """
    raise NotImplementedError


def ex07_kv_cache_flop_saving() -> float:
    """Experiment: how much work does the KV cache save?

    Build this chapter's model, GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)) from
    part03_modern.model, and a prompt of 8 tokens (any ids, batch size 1). Generate 56 new tokens with
    model.generate(prompt, 56, temperature=0, use_cache=...) twice: with the KV cache (use_cache=True,
    the prompt once, then one token per step) and without (use_cache=False: every step runs the whole
    context again). Count the FLOPs of each with torch.utils.flop_counter.FlopCounterMode.

    Return (FLOPs without the cache) / (FLOPs with it). Before you run it, predict it: how many token
    positions does each way push through the model? Why does the saving grow with the length?
    """
    raise NotImplementedError


def ex08_rolling_kv_cache(n_layer: int, n_kv_head: int, head_size: int, n_tokens: int, window: int | None,
                          n_sink: int, bytes_per_value: int) -> tuple[list[int], int]:
    """A KV cache on paper: where each token's key and value go, and how much memory the cache takes.

    Every layer keeps a key AND a value vector of head_size numbers per key/value head per token slot,
    bytes_per_value bytes each (4 for float32, 2 for bfloat16).
    - window=None: the cache keeps every token: position pos goes to slot pos, n_tokens slots in all.
    - with a window: Mistral's rolling buffer of capacity = n_sink + window slots, allocated up front
      whatever n_tokens is. The first n_sink positions (the attention sinks) keep slots 0 .. n_sink - 1
      forever. Every later position takes the remaining slots in turn, round and round: once they are
      full, each new token overwrites the oldest non-sink token, so the memory stays constant.
      Example: window 3, n_sink 2: positions 0 1 2 3 4 5 6 7 -> slots 0 1 2 3 4 2 3 4.
    Return (slots, total_bytes): slots[pos] for pos = 0 .. n_tokens - 1, and the bytes of all layers.
    Example: Llama-2-7B (32 layers, 32 kv heads of size 128) at 4096 tokens in bfloat16 needs 2 GiB per
    sequence; with 8 kv heads (GQA) a quarter of that.
    """
    raise NotImplementedError
