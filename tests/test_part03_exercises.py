"""Part 3 exercises: each check compares against an independent reference and rejects plausible slips."""
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from part03_modern import exercises, solutions
from part03_modern.model import KVCache
from tests.harness import Exercise, exercise_tests


def _assert_close(got, want, what: str, atol: float = 1e-5, rtol: float = 1e-5):
    assert torch.is_tensor(got), f"{what}: return a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.to(torch.float64), want.to(torch.float64)
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        where = tuple(int(i) for i in torch.unravel_index((got - want).abs().argmax(), got.shape))
        raise AssertionError(f"{what}: largest difference at index {where}: got {got[where].item():.6g}, "
                             f"expected {want[where].item():.6g} (tolerance {atol:g})")


# --- ex01: RMSNorm -------------------------------------------------------------------------------------------


def check_ex01_rms_norm(fn):
    gen = torch.Generator().manual_seed(0)
    C = 16
    weight = torch.randn(C, generator=gen)
    # a non-zero mean (so subtracting it shows), and a tiny input where eps matters
    for scale, eps in [(3.0, 1e-6), (0.05, 0.1)]:
        x = scale * (torch.randn(2, 5, C, generator=gen) + 0.5)
        norm = nn.RMSNorm(C, eps=eps)
        with torch.no_grad():
            norm.weight.copy_(weight)
            want = norm(x)
        _assert_close(fn(x, weight, eps), want, f"input scale {scale}, eps {eps} (vs torch.nn.RMSNorm)")


def _rms_norm_subtracting_mean(x, weight, eps):  # that is LayerNorm (without its bias)
    x = x - x.mean(dim=-1, keepdim=True)
    return solutions.ex01_rms_norm(x, weight, eps)


def _rms_norm_eps_outside_sqrt(x, weight, eps):
    return x / (x.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps) * weight


def _rms_norm_over_time(x, weight, eps):  # the mean over the wrong axis
    return x / torch.sqrt(x.pow(2).mean(dim=-2, keepdim=True) + eps) * weight


def _l2_normalise(x, weight, eps):  # the sum of squares, not their mean
    return x / torch.sqrt(x.pow(2).sum(dim=-1, keepdim=True) + eps) * weight


# --- ex02: RoPE ---------------------------------------------------------------------------------------------


def _reference_rope(x, positions, theta):
    """RoPE as complex multiplication (the paper's form): pair (a, b) is a + ib, times e^(i * angle)."""
    head_size = x.size(-1)
    freqs = 1.0 / theta ** (torch.arange(head_size // 2, dtype=torch.float64) * 2 / head_size)
    angles = torch.outer(positions.to(torch.float64), freqs)  # (T, head_size/2)
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], head_size // 2, 2))
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2)


def check_ex02_rope(fn):
    gen = torch.Generator().manual_seed(0)
    head_size = 16
    x = torch.randn(2, 3, 6, head_size, generator=gen)  # (B, heads, T, head_size)
    for positions, theta in [(torch.arange(6), 10000.0), (torch.arange(6), 100.0),
                             (torch.tensor([0, 7, 1, 200, 3, 50]), 10000.0)]:
        _assert_close(fn(x, positions, theta), _reference_rope(x, positions, theta),
                      f"positions {positions.tolist()}, theta {theta} (vs the complex-number form)", atol=1e-4)
    # the point of RoPE: the score of a query at m and a key at n depends only on m - n
    q, k = torch.randn(2, head_size, generator=gen).unbind(0)

    def score(m, n):
        return (fn(q[None], torch.tensor([m]), 10000.0) * fn(k[None], torch.tensor([n]), 10000.0)).sum().item()
    for m, n in [(5, 2), (9, 9), (3, 8)]:
        assert math.isclose(score(m, n), score(m + 40, n + 40), abs_tol=1e-4), (
            f"q at {m} . k at {n} = {score(m, n):.5f} but q at {m + 40} . k at {n + 40} = "
            f"{score(m + 40, n + 40):.5f}: the score should depend only on the offset")


def _rope_rotate_half(x, positions, theta):  # GPT-NeoX pairs channel i with i + head_size/2
    half = x.size(-1) // 2
    interleaved = torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)
    rotated = solutions.ex02_rope(interleaved, positions, theta)
    return torch.cat((rotated[..., 0::2], rotated[..., 1::2]), dim=-1)


def _rope_clockwise(x, positions, theta):  # sin's sign flipped: rotates by -angle
    return solutions.ex02_rope(x, -positions, theta)


def _rope_ignoring_theta(x, positions, theta):
    return solutions.ex02_rope(x, positions, 10000.0)


def _rope_frequencies_without_the_2(x, positions, theta):  # theta^(-i/d): half the frequency range
    return solutions.ex02_rope(x, positions, theta ** 0.5)


def _rope_positions_ignored(x, positions, theta):  # assumes the tokens sit at 0, 1, 2, ...
    return solutions.ex02_rope(x, torch.arange(x.size(-2)), theta)


# --- ex03: SwiGLU ---------------------------------------------------------------------------------------------


def check_ex03_swiglu(fn):
    gen = torch.Generator().manual_seed(0)
    C, hidden = 8, 24
    x = torch.randn(2, 3, C, generator=gen)
    w_gate, w_up = torch.randn(hidden, C, generator=gen), torch.randn(hidden, C, generator=gen)
    w_down = torch.randn(C, hidden, generator=gen) / hidden**0.5
    gate = x @ w_gate.T
    want = (gate * torch.sigmoid(gate) * (x @ w_up.T)) @ w_down.T  # the formula, SiLU written out
    _assert_close(fn(x, w_gate, w_up, w_down), want, "SwiGLU output", atol=1e-4)


def _geglu(x, w_gate, w_up, w_down):  # GELU instead of SiLU
    return F.linear(F.gelu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _swiglu_gate_up_swapped(x, w_gate, w_up, w_down):  # SiLU on the wrong branch
    return solutions.ex03_swiglu(x, w_up, w_gate, w_down)


def _silu_after_the_product(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate) * F.linear(x, w_up)), w_down)


# --- ex04: grouped-query attention ------------------------------------------------------------------------------


def check_ex04_grouped_query_attention(fn):
    gen = torch.Generator().manual_seed(0)
    B, n_head, T, head_size = 2, 6, 5, 8
    q = torch.randn(B, n_head, T, head_size, generator=gen)
    for n_kv_head in [6, 3, 2, 1]:  # MHA, two kinds of GQA, MQA
        k, v = torch.randn(2, B, n_kv_head, T, head_size, generator=gen).unbind(0)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        _assert_close(fn(q, k, v), want, f"n_head {n_head}, n_kv_head {n_kv_head} (vs SDPA with enable_gqa)")


def _gqa_tiled(q, k, v):  # repeat tiles [k0, k1, k0, k1, ...]: query head 1 gets kv head 1, not 0
    group = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), is_causal=True)


def _gqa_not_causal(q, k, v):
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def _gqa_without_scale(q, k, v):
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


# --- ex05: sliding window + sinks mask ------------------------------------------------------------------------


def _reference_window_mask(T, window, n_sink):
    return [[s <= t and (t - s < window or s < n_sink) for s in range(T)] for t in range(T)]


def check_ex05_sliding_window_mask(fn):
    for T, window, n_sink in [(6, 2, 1), (10, 3, 0), (12, 4, 2), (5, 10, 0), (8, 1, 3)]:
        got = fn(T, window, n_sink)
        assert torch.is_tensor(got) and got.dtype == torch.bool, f"return a bool tensor, got {got!r}"
        want = _reference_window_mask(T, window, n_sink)
        if got.tolist() != want:
            t, s = next((t, s) for t in range(T) for s in range(T) if bool(got[t, s]) != want[t][s])
            raise AssertionError(f"T={T}, window={window}, n_sink={n_sink}: mask[{t}, {s}] is {bool(got[t, s])}, "
                                 f"expected {want[t][s]} (query {t}, key {s}); expected mask:\n"
                                 + "\n".join("".join("x" if a else "." for a in row) for row in want))


def _window_off_by_one(T, window, n_sink):  # sees window + 1 positions
    return solutions.ex05_sliding_window_mask(T, window + 1, n_sink)


def _window_without_sinks(T, window, n_sink):
    return solutions.ex05_sliding_window_mask(T, window, 0)


def _window_not_causal(T, window, n_sink):
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return (offset.abs() < window) | (torch.arange(T)[None, :] < n_sink)


def _sinks_visible_to_earlier_queries(T, window, n_sink):  # the sink columns forget causality
    offset = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return ((offset >= 0) & (offset < window)) | (torch.arange(T)[None, :] < n_sink)


# --- ex06: a decode step with the KV cache ---------------------------------------------------------------------


def check_ex06_kv_cache_decode_step(fn):
    gen = torch.Generator().manual_seed(0)
    B, H, T, head_size = 2, 3, 6, 8
    q, k, v = torch.randn(3, B, H, T, head_size, generator=gen).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # all T tokens at once
    k_cache = v_cache = torch.zeros(B, H, 0, head_size)  # generation starts with an empty cache
    for t in range(T):  # then one token at a time, as in generation
        out, k_cache, v_cache = fn(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], k_cache, v_cache)
        _assert_close(k_cache, k[:, :, : t + 1], f"step {t}: the key cache (the keys of tokens 0..{t})")
        _assert_close(v_cache, v[:, :, : t + 1], f"step {t}: the value cache (the values of tokens 0..{t})")
        _assert_close(out, want[:, :, t : t + 1], f"step {t}: the output (vs row {t} of full causal attention)")


def _decode_before_appending(q_new, k_new, v_new, k_cache, v_cache):  # the new token does not see itself
    scores = q_new @ k_cache.transpose(-2, -1) / math.sqrt(q_new.size(-1))
    out = F.softmax(scores, dim=-1) @ v_cache
    return out, torch.cat((k_cache, k_new), dim=2), torch.cat((v_cache, v_new), dim=2)


def _decode_with_is_causal(q_new, k_new, v_new, k_cache, v_cache):  # top-left causal mask: sees key 0 only
    k_cache, v_cache = torch.cat((k_cache, k_new), dim=2), torch.cat((v_cache, v_new), dim=2)
    return F.scaled_dot_product_attention(q_new, k_cache, v_cache, is_causal=True), k_cache, v_cache


def _decode_without_scale(q_new, k_new, v_new, k_cache, v_cache):
    k_cache, v_cache = torch.cat((k_cache, k_new), dim=2), torch.cat((v_cache, v_new), dim=2)
    return F.softmax(q_new @ k_cache.transpose(-2, -1), dim=-1) @ v_cache, k_cache, v_cache


def _decode_returning_old_cache(q_new, k_new, v_new, k_cache, v_cache):  # forgets to hand the new cache back
    out, _, _ = solutions.ex06_kv_cache_decode_step(q_new, k_new, v_new, k_cache, v_cache)
    return out, k_cache, v_cache


# --- ex07: the rolling buffer's slots ---------------------------------------------------------------------------


def _simulated_slots(n_positions, capacity, n_sink):
    """The policy, simulated: fill free slots in order, then overwrite the oldest non-sink token."""
    slot_of, holder = [], [None] * capacity  # holder[slot] = the position stored there
    for pos in range(n_positions):
        if None in holder:
            slot = holder.index(None)
        else:
            slot = min((s for s in range(capacity) if holder[s] >= n_sink), key=lambda s: holder[s])
        holder[slot] = pos
        slot_of.append(slot)
    return slot_of


def check_ex07_rolling_buffer_slot(fn):
    for capacity, n_sink in [(5, 2), (4, 0), (8, 1), (3, 2), (6, 4)]:
        want = _simulated_slots(30, capacity, n_sink)
        got = [int(fn(pos, capacity, n_sink)) for pos in range(30)]
        assert got == want, (f"capacity {capacity}, n_sink {n_sink}: positions 0..29 went to slots {got}, "
                             f"expected {want}")


def _slot_overwriting_sinks(pos, capacity, n_sink):
    return pos % capacity


def _slot_not_shifted(pos, capacity, n_sink):  # forgets to count from the first non-sink position
    return pos if pos < n_sink else n_sink + pos % (capacity - n_sink)


def _slot_ring_too_large(pos, capacity, n_sink):  # the ring is capacity - n_sink slots, not capacity
    return pos if pos < n_sink else n_sink + (pos - n_sink) % capacity


# --- ex08: KV cache memory ----------------------------------------------------------------------------------------

KV_CACHE_CASES = [  # (n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value)
    (32, 32, 128, 4096, None, 0, 2),  # Llama-2-7B at 4096 tokens: 2 GiB
    (32, 8, 128, 4096, None, 0, 2),  # the same with GQA, 8 kv heads
    (32, 8, 128, 100_000, 4096, 0, 2),  # Mistral 7B's rolling buffer on a long text
    (4, 2, 32, 1000, 64, 4, 4),  # this chapter's model with a window and sinks, float32
    (4, 2, 32, 10, 64, 4, 4),  # ... before the buffer is full: it is allocated up front
]


def check_ex08_kv_cache_bytes(fn):
    for n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value in KV_CACHE_CASES:
        # the reference: the model's own KVCache, on the "meta" device (shapes only, no memory)
        dtype = {2: torch.bfloat16, 4: torch.float32}[bytes_per_value]
        layer = KVCache(1, n_kv_head, head_size, n_tokens if window is None else n_sink + window, window, n_sink,
                        device="meta", dtype=dtype)
        want = n_layer * layer.nbytes()
        got = fn(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value)
        assert got == want, (f"n_layer={n_layer}, n_kv_head={n_kv_head}, head_size={head_size}, n_tokens={n_tokens}, "
                             f"window={window}, n_sink={n_sink}, {bytes_per_value} bytes per value: got {got:,} "
                             f"bytes, expected {want:,} ({want / 2**20:,.2f} MiB)")


def _kv_bytes_keys_only(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value):
    return solutions.ex08_kv_cache_bytes(n_layer, n_kv_head, head_size, n_tokens, window, n_sink,
                                         bytes_per_value) // 2


def _kv_bytes_ignoring_window(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value):
    return solutions.ex08_kv_cache_bytes(n_layer, n_kv_head, head_size, n_tokens, None, n_sink, bytes_per_value)


def _kv_bytes_forgetting_sinks(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value):
    return solutions.ex08_kv_cache_bytes(n_layer, n_kv_head, head_size, n_tokens, window, 0, bytes_per_value)


CASES = [
    Exercise("ex01_rms_norm", check_ex01_rms_norm, wrong=[
        _rms_norm_subtracting_mean, _rms_norm_eps_outside_sqrt, _rms_norm_over_time, _l2_normalise,
        lambda x, weight, eps: solutions.ex01_rms_norm(x, weight, 0.0),  # eps forgotten
        lambda x, weight, eps: solutions.ex01_rms_norm(x, torch.ones_like(weight), eps),  # weight forgotten
    ]),
    Exercise("ex02_rope", check_ex02_rope, wrong=[
        _rope_rotate_half, _rope_clockwise, _rope_ignoring_theta, _rope_frequencies_without_the_2,
        _rope_positions_ignored]),
    Exercise("ex03_swiglu", check_ex03_swiglu, wrong=[_geglu, _swiglu_gate_up_swapped, _silu_after_the_product]),
    Exercise("ex04_grouped_query_attention", check_ex04_grouped_query_attention, wrong=[
        _gqa_tiled, _gqa_not_causal, _gqa_without_scale]),
    Exercise("ex05_sliding_window_mask", check_ex05_sliding_window_mask, wrong=[
        _window_off_by_one, _window_without_sinks, _window_not_causal, _sinks_visible_to_earlier_queries]),
    Exercise("ex06_kv_cache_decode_step", check_ex06_kv_cache_decode_step, wrong=[
        _decode_before_appending, _decode_with_is_causal, _decode_without_scale, _decode_returning_old_cache]),
    Exercise("ex07_rolling_buffer_slot", check_ex07_rolling_buffer_slot, wrong=[
        _slot_overwriting_sinks, _slot_not_shifted, _slot_ring_too_large]),
    Exercise("ex08_kv_cache_bytes", check_ex08_kv_cache_bytes, wrong=[
        _kv_bytes_keys_only, _kv_bytes_ignoring_window, _kv_bytes_forgetting_sinks]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
