"""Part 3 exercises: each check compares against an outside reference and rejects plausible slips."""
import functools
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from part03_modern import exercises, solutions
from tests.harness import Exercise, TorchCalls, exercise_tests


def _assert_close(got, want, what: str, atol: float = 1e-5, rtol: float = 1e-5):
    assert torch.is_tensor(got), f"{what}: return a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.to(torch.float64), want.to(torch.float64)
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        where = tuple(int(i) for i in torch.unravel_index((got - want).abs().argmax(), got.shape))
        raise AssertionError(f"{what}: largest difference at index {where}: got {got[where].item():.6g}, "
                             f"expected {want[where].item():.6g} (tolerance {atol:g})")


# --- ex01: RMSNorm + SwiGLU, with the residual ---------------------------------------------------------------


def _reference_ffn(x, norm_weight, w_gate, w_up, w_down, eps):
    """torch.nn.RMSNorm, then SwiGLU with SiLU written out as z * sigmoid(z), then the residual."""
    norm = nn.RMSNorm(x.size(-1), eps=eps, dtype=x.dtype)
    with torch.no_grad():
        norm.weight.copy_(norm_weight)
        h = norm(x)
    gate = h @ w_gate.T
    return x + (gate * torch.sigmoid(gate) * (h @ w_up.T)) @ w_down.T


def check_ex01_rmsnorm_swiglu(fn):
    gen = torch.Generator().manual_seed(0)
    C, hidden = 16, 24
    norm_weight = 1 + 0.5 * torch.randn(C, generator=gen)
    w_gate, w_up = torch.randn(hidden, C, generator=gen) / C**0.5, torch.randn(hidden, C, generator=gen) / C**0.5
    w_down = torch.randn(C, hidden, generator=gen) / hidden**0.5
    # a non-zero mean (so subtracting it shows), and a tiny input where eps matters
    for scale, eps in [(3.0, 1e-6), (0.05, 0.1)]:
        x = scale * (torch.randn(2, 5, C, generator=gen) + 0.5)
        want = _reference_ffn(x, norm_weight, w_gate, w_up, w_down, eps)
        _assert_close(fn(x, norm_weight, w_gate, w_up, w_down, eps), want,
                      f"input scale {scale}, eps {eps} (vs x + SwiGLU(torch.nn.RMSNorm(x)))", atol=1e-4)


def _ffn_variant(norm="rms", act=F.silu, swap=False, residual=True, eps_outside=False, post_norm=False):
    def ffn(x, norm_weight, w_gate, w_up, w_down, eps):
        def normed(t):
            if norm == "layer":  # LayerNorm without a bias: subtracts the mean
                t = t - t.mean(dim=-1, keepdim=True)
            if eps_outside:
                return t / (t.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps) * norm_weight
            return t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight

        g, u = (w_up, w_gate) if swap else (w_gate, w_up)
        h = x if post_norm else normed(x)
        out = F.linear(act(F.linear(h, g)) * F.linear(h, u), w_down)
        if post_norm:  # the original Transformer's order: norm(x + sublayer(x))
            return normed(x + out)
        return x + out if residual else out

    return ffn


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


# --- ex03: porting to rotate-half RoPE ---------------------------------------------------------------------------


def _rotate_half_rope(x, positions, theta):
    """RoPE as Hugging Face's Llama applies it (modeling_llama.apply_rotary_pos_emb): pairs (i, i + d/2)."""
    head_size = x.size(-1)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(positions.to(torch.float64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)  # (T, head_size): pair i's angle in channels i and i + d/2
    half = head_size // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def _scores(x, w_q, w_k, n_head, positions, rope):
    """Attention scores (n_head, T, T) of queries and keys made by w_q, w_k and rotated by `rope`."""
    T = x.size(0)
    q = (x @ w_q.T).view(T, n_head, -1).transpose(0, 1)  # (n_head, T, head_size)
    k = (x @ w_k.T).view(T, n_head, -1).transpose(0, 1)
    return rope(q, positions, 10000.0) @ rope(k, positions, 10000.0).transpose(-2, -1)


def check_ex03_to_rotate_half_layout(fn):
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 3, 7, 20, 21, 100])
    for C, n_head, head_size in [(16, 2, 8), (12, 3, 8), (10, 1, 16)]:
        x = torch.randn(len(positions), C, generator=gen, dtype=torch.float64)
        w_q, w_k = (torch.randn(n_head * head_size, C, generator=gen, dtype=torch.float64) for _ in range(2))
        ours = _scores(x, w_q, w_k, n_head, positions, _reference_rope)  # interleaved pairs, as trained
        new_q, new_k = fn(w_q.clone(), n_head), fn(w_k.clone(), n_head)
        assert tuple(new_q.shape) == tuple(w_q.shape), f"return a weight of shape {tuple(w_q.shape)}, got " \
                                                       f"{tuple(new_q.shape)}"
        ported = _scores(x, new_q.double(), new_k.double(), n_head, positions, _rotate_half_rope)
        _assert_close(ported, ours, f"C={C}, n_head={n_head}, head_size={head_size}: attention scores with "
                      "rotate-half RoPE on your weights vs ours on the original weights", atol=1e-6)


def _layout_inverse(w, n_head):  # rotate-half -> interleaved: the conversion the other way
    out_features, C = w.shape
    return w.view(n_head, 2, out_features // n_head // 2, C).transpose(1, 2).reshape(out_features, C)


def _layout_whole_matrix(w, n_head):  # one permutation over all rows: mixes the heads
    return solutions.ex03_to_rotate_half_layout(w, 1)


def _layout_columns(w, n_head):  # permutes the input channels instead of the output channels
    return solutions.ex03_to_rotate_half_layout(w.T.contiguous(), 1).T


# --- ex04: grouped-query attention ------------------------------------------------------------------------------


NO_ENABLE_GQA = {F.scaled_dot_product_attention: lambda args, kwargs: kwargs.get("enable_gqa") and (
    "enable_gqa=True is what the exercise asks you to write")}


def check_ex04_grouped_query_attention(fn):
    gen = torch.Generator().manual_seed(0)
    B, n_head, T, head_size = 2, 6, 5, 8
    q = torch.randn(B, n_head, T, head_size, generator=gen)
    for n_kv_head in [6, 3, 2, 1]:  # MHA, two kinds of GQA, MQA
        k, v = torch.randn(2, B, n_kv_head, T, head_size, generator=gen).unbind(0)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with TorchCalls(forbidden=NO_ENABLE_GQA):
            got = fn(q, k, v)
        _assert_close(got, want, f"n_head {n_head}, n_kv_head {n_kv_head} (vs SDPA with enable_gqa)")


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


# --- ex07: the KV-cache FLOPs experiment -----------------------------------------------------------------------

# The reference measured 14.7 MFLOP with the cache and 464 MFLOP without: a ratio of 31.6. Counting token
# positions predicts it: 8 + 55 with the cache, 8 + 9 + ... + 63 = 1,988 without, ~31.6x (the attention over
# the growing context adds a little on both sides). FLOP counts do not depend on the machine or the random
# weights; the range leaves room for changes in how the cache attends (over the filled slots or the whole
# buffer). The inverse (0.03), the count of forward calls (1.0) and the saving of the last step alone (~64)
# fall outside.
FLOP_SAVING_RANGE = (25.0, 38.0)


def check_ex07_kv_cache_flop_saving(fn):
    got = fn()
    low, high = FLOP_SAVING_RANGE
    assert isinstance(got, float), f"return a float (FLOPs without the cache / FLOPs with it), got {type(got).__name__}"
    assert low <= got <= high, (f"FLOPs without the cache / with it = {got:.2f}; the reference measured 31.6 and "
                                f"accepts {low}..{high} (8-token prompt, 56 new tokens, FlopCounterMode around "
                                "model.generate)")


@functools.cache
def _solution_flop_saving() -> float:
    return solutions.ex07_kv_cache_flop_saving()


def _flop_saving_last_step_only():  # one step's saving: the whole 63-token context vs 1 token
    return _solution_flop_saving() * 63 / 31.6


# --- ex08: the rolling buffer's slots and bytes -------------------------------------------------------------------


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


KV_CACHE_CASES = [  # (n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value)
    (32, 32, 128, 4096, None, 0, 2),  # Llama-2-7B at 4096 tokens: 2 GiB
    (32, 8, 128, 4096, None, 0, 2),  # the same with GQA, 8 kv heads
    (32, 8, 128, 100_000, 4096, 0, 2),  # Mistral 7B's rolling buffer on a long text
    (4, 2, 32, 1000, 64, 4, 4),  # this chapter's model with a window and sinks, float32
    (4, 2, 32, 10, 64, 4, 4),  # ... before the buffer is full: it is allocated up front
]


def check_ex08_rolling_kv_cache(fn):
    for window, n_sink in [(3, 2), (4, 0), (7, 1), (1, 2), (2, 4)]:
        want = _simulated_slots(30, n_sink + window, n_sink)
        got = [int(s) for s in fn(2, 1, 8, 30, window, n_sink, 4)[0]]
        assert got == want, f"window {window}, n_sink {n_sink}: positions 0..29 went to slots {got}, expected {want}"
    assert [int(s) for s in fn(2, 1, 8, 12, None, 0, 4)[0]] == list(range(12)), "without a window, position = slot"
    for n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value in KV_CACHE_CASES:
        # the reference: allocate the cache's tensors on the "meta" device (shapes only, no memory)
        dtype = {2: torch.bfloat16, 4: torch.float32}[bytes_per_value]
        slots = n_tokens if window is None else n_sink + window
        keys_and_values = torch.empty(n_layer, 2, n_kv_head, slots, head_size, dtype=dtype, device="meta")
        want = keys_and_values.numel() * keys_and_values.element_size()
        got = fn(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value)[1]
        assert got == want, (f"n_layer={n_layer}, n_kv_head={n_kv_head}, head_size={head_size}, n_tokens={n_tokens}, "
                             f"window={window}, n_sink={n_sink}, {bytes_per_value} bytes per value: got {got:,} "
                             f"bytes, expected {want:,} ({want / 2**20:,.2f} MiB)")


def _cache_variant(slot_rule="right", bytes_rule="right"):
    def rolling(n_layer, n_kv_head, head_size, n_tokens, window, n_sink, bytes_per_value):
        slots, total = solutions.ex08_rolling_kv_cache(n_layer, n_kv_head, head_size, n_tokens, window, n_sink,
                                                       bytes_per_value)
        if window is not None:
            capacity = n_sink + window
            if slot_rule == "overwrites_sinks":
                slots = [pos % capacity for pos in range(n_tokens)]
            elif slot_rule == "not_shifted":  # forgets to count from the first non-sink position
                slots = [pos if pos < n_sink else n_sink + pos % window for pos in range(n_tokens)]
            elif slot_rule == "ring_too_large":  # the ring is `window` slots, not the whole capacity
                slots = [pos if pos < n_sink else n_sink + (pos - n_sink) % capacity for pos in range(n_tokens)]
        if bytes_rule == "keys_only":
            total //= 2
        elif bytes_rule == "ignores_window":
            total = 2 * n_layer * n_kv_head * head_size * n_tokens * bytes_per_value
        elif bytes_rule == "forgets_sinks" and window is not None:
            total = 2 * n_layer * n_kv_head * head_size * window * bytes_per_value
        return slots, total

    return rolling


CASES = [
    Exercise("ex01_rmsnorm_swiglu", check_ex01_rmsnorm_swiglu, wrong=[
        _ffn_variant(norm="layer"), _ffn_variant(eps_outside=True), _ffn_variant(act=F.gelu), _ffn_variant(swap=True),
        _ffn_variant(residual=False), _ffn_variant(post_norm=True),
        lambda x, nw, g, u, d, eps: solutions.ex01_rmsnorm_swiglu(x, nw, g, u, d, 0.0),  # eps forgotten
        lambda x, nw, g, u, d, eps: solutions.ex01_rmsnorm_swiglu(x, torch.ones_like(nw), g, u, d, eps),  # no gain
    ]),
    Exercise("ex02_rope", check_ex02_rope, wrong=[
        _rope_rotate_half, _rope_clockwise, _rope_ignoring_theta, _rope_frequencies_without_the_2,
        _rope_positions_ignored]),
    Exercise("ex03_to_rotate_half_layout", check_ex03_to_rotate_half_layout, wrong=[
        lambda w, n_head: w,  # no conversion
        _layout_inverse, _layout_whole_matrix, _layout_columns]),
    Exercise("ex04_grouped_query_attention", check_ex04_grouped_query_attention, wrong=[
        _gqa_tiled, _gqa_not_causal, _gqa_without_scale]),
    Exercise("ex05_sliding_window_mask", check_ex05_sliding_window_mask, wrong=[
        _window_off_by_one, _window_without_sinks, _window_not_causal, _sinks_visible_to_earlier_queries]),
    Exercise("ex06_kv_cache_decode_step", check_ex06_kv_cache_decode_step, wrong=[
        _decode_before_appending, _decode_with_is_causal, _decode_without_scale, _decode_returning_old_cache]),
    Exercise("ex07_kv_cache_flop_saving", check_ex07_kv_cache_flop_saving, wrong=[
        lambda: 1 / _solution_flop_saving(),  # with / without
        lambda: 1.0,  # the number of forward calls: 56 either way
        _flop_saving_last_step_only,
    ]),
    Exercise("ex08_rolling_kv_cache", check_ex08_rolling_kv_cache, wrong=[
        _cache_variant(slot_rule="overwrites_sinks"), _cache_variant(slot_rule="not_shifted"),
        _cache_variant(slot_rule="ring_too_large"), _cache_variant(bytes_rule="keys_only"),
        _cache_variant(bytes_rule="ignores_window"), _cache_variant(bytes_rule="forgets_sinks")]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
