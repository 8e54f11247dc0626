"""Part 3: RMSNorm, RoPE, SwiGLU, grouped-query attention, the KV cache, sliding windows with sinks and
the rolling buffer; each against an independent reference, plus the traps a reference implementation fell into."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from part03_modern import generate, train
from part03_modern.model import (GPT, MLP, GPTConfig, GrowingKVCache, KVCache, MultiHeadAttention, RMSNorm,
                                 apply_rope, apply_rope_complex, attention_mask, rope_angles, swiglu_hidden_size)
from shared.metrics import read_metrics
from tests.texts import write_verse

TINY = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def tiny_model(**changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, **changes)).eval()
    with torch.no_grad():  # the norm gains start at 1; jiggle them so a skipped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.mul_(1 + 0.5 * torch.rand_like(p))
    return model


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- RMSNorm ------------------------------------------------------------------------------------


def test_rms_norm_equals_torch_rms_norm():
    x = 3 * torch.randn(2, 5, 32) + 1  # a non-zero mean: LayerNorm would subtract it, RMSNorm must not
    ours = RMSNorm(32, eps=1e-6)
    nn.init.normal_(ours.weight)
    reference = nn.RMSNorm(32, eps=1e-6)
    reference.weight.data.copy_(ours.weight.data)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours(x), F.layer_norm(x, (32,), ours.weight), atol=1e-3)


def test_model_norm_choice_and_final_norm_before_the_head():
    rms, ln = tiny_model(), tiny_model(norm="layernorm")
    assert isinstance(rms.ln_f, RMSNorm) and all(isinstance(b.ln_1, RMSNorm) for b in rms.blocks)
    assert not isinstance(ln.ln_f, RMSNorm)
    # The head reads ln_f's output: doubling the final gain doubles every logit (the head is linear, no bias).
    idx = tokens(2, 10)
    logits, _ = rms(idx)
    with torch.no_grad():
        rms.ln_f.weight.mul_(2)
    torch.testing.assert_close(rms(idx)[0], 2 * logits, rtol=1e-5, atol=1e-5)


# --- RoPE ---------------------------------------------------------------------------------------


def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """The RoFormer / Llama formulation: channel pairs as complex numbers times e^(i * pos * freq)."""
    head_size = x.size(-1)
    freqs = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    rotation = torch.polar(torch.ones(len(positions), head_size // 2, dtype=torch.float64),
                           positions.double()[:, None] * freqs)  # (T, head_size / 2) unit complex numbers
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], head_size // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_equals_the_complex_number_formulation(theta):
    x = torch.randn(2, 3, 7, 16)
    positions = torch.tensor([0, 1, 2, 5, 100, 1000, 4095])
    cos, sin = rope_angles(positions, 16, theta)
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_complex(x, positions, theta), rtol=1e-5, atol=1e-5)


def test_rope_base_argument_is_used():
    x, positions = torch.randn(1, 1, 4, 16), torch.arange(4)
    a = apply_rope(x, *rope_angles(positions, 16, 10000.0))
    b = apply_rope(x, *rope_angles(positions, 16, 100.0))
    assert not torch.allclose(a, b, atol=1e-3)
    # and the model passes its rope_theta on: a different base changes the logits
    idx = tokens(1, 12)
    assert not torch.allclose(tiny_model()(idx)[0], tiny_model(rope_theta=100.0)(idx)[0], atol=1e-4)


def test_rope_preserves_norms_and_position_zero_is_identity():
    x = torch.randn(3, 2, 9, 16)
    rotated = apply_rope(x, *rope_angles(torch.arange(9), 16))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :])  # angle 0: no rotation


@pytest.mark.parametrize("rope", [apply_rope, apply_rope_complex])  # written out, and the fused path
@given(m=st.integers(0, 3000), n=st.integers(0, 3000), shift=st.integers(0, 3000))
def test_rope_scores_depend_only_on_the_offset(rope, m, n, shift):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)

    def score(q_pos, k_pos):
        q_rot = rope(q, *rope_angles(torch.tensor([q_pos]), 32))
        k_rot = rope(k, *rope_angles(torch.tensor([k_pos]), 32))
        return (q_rot * k_rot).sum().item()

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)


def test_rope_scores_do_change_with_the_offset():
    q = torch.randn(1, 32)
    scores = [(apply_rope(q, *rope_angles(torch.tensor([d]), 32)) * q).sum().item() for d in range(4)]
    assert len({round(s, 3) for s in scores}) == 4


# --- SwiGLU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_embd", [32, 128, 384, 768])
def test_swiglu_hidden_size_matches_the_gelu_mlp_parameter_count(n_embd):
    hidden = swiglu_hidden_size(n_embd)
    assert hidden % 16 == 0 and abs(hidden - 8 * n_embd / 3) <= 8
    swiglu_params, gelu_params = 3 * n_embd * hidden, 2 * n_embd * 4 * n_embd
    assert abs(swiglu_params / gelu_params - 1) < 0.07


def test_swiglu_mlp_equals_its_formula():
    mlp = MLP(TINY)
    x = torch.randn(2, 5, 32)
    want = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)
    assert mlp.gate.weight.shape == (swiglu_hidden_size(32), 32)


# --- Grouped-query attention --------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_grouped_query_attention_equals_sdpa_with_gqa(n_kv_head):
    config = dataclasses.replace(TINY, n_kv_head=n_kv_head)
    attn = MultiHeadAttention(config)
    x, pos = torch.randn(2, 9, 32), torch.arange(9)
    cos, sin = rope_angles(pos, 8)
    q, k, v = attn.qkv(x).split([32, 8 * n_kv_head, 8 * n_kv_head], dim=2)
    q = apply_rope(q.view(2, 9, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(2, 9, n_kv_head, 8).transpose(1, 2), cos, sin)
    v = v.view(2, 9, n_kv_head, 8).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # PyTorch's own GQA
    want = attn.proj(y.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(x, pos, cos, sin), want, rtol=1e-5, atol=1e-6)
    # fewer kv heads, fewer parameters: q is n_embd wide, k and v n_kv_head * head_size each
    assert attn.qkv.weight.shape == (32 + 2 * 8 * n_kv_head, 32)


def test_n_head_must_be_a_multiple_of_n_kv_head():
    with pytest.raises(AssertionError, match="multiple of n_kv_head"):
        GPT(dataclasses.replace(TINY, n_kv_head=3))


# --- Masks: sliding window and sinks ------------------------------------------------------------


def brute_force_mask(q_pos, k_pos, window, n_sink):
    return torch.tensor([[k <= q and (window is None or q - k < window or k < n_sink) for k in k_pos]
                         for q in q_pos])


@pytest.mark.parametrize("window,n_sink", [(None, 0), (1, 0), (4, 0), (4, 2), (7, 3), (50, 1)])
def test_attention_mask_equals_brute_force(window, n_sink):
    pos = torch.arange(20)
    assert torch.equal(attention_mask(pos, pos, window, n_sink), brute_force_mask(pos.tolist(), pos.tolist(),
                                                                                    window, n_sink))
    q_pos, k_pos = torch.arange(30, 33), torch.tensor([0, 1, 2, 25, 27, 29, 30, 31, 32])  # cache-like
    assert torch.equal(attention_mask(q_pos, k_pos, window, n_sink),
                       brute_force_mask(q_pos.tolist(), k_pos.tolist(), window, n_sink))


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The model's forward pass, attention done one query at a time over the keys the brute-force mask allows.

    Independent of attention_mask and SDPA: a misaligned mask in the full forward (training, prefill) shows here.
    """
    cfg = model.config
    T, hs = idx.size(1), cfg.n_embd // cfg.n_head
    cos, sin = rope_angles(torch.arange(T), hs, cfg.rope_theta)
    allowed = brute_force_mask(range(T), range(T), cfg.window_size, cfg.n_sink)
    x = model.wte(idx)
    for block in model.blocks:
        attn, h = block.attn, block.ln_1(x)
        q, k, v = attn.qkv(h).split([cfg.n_embd, attn.n_kv_head * hs, attn.n_kv_head * hs], dim=2)
        q = apply_rope(q.view(*idx.shape, cfg.n_head, hs).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(*idx.shape, attn.n_kv_head, hs).transpose(1, 2), cos, sin)
        v = v.view(*idx.shape, attn.n_kv_head, hs).transpose(1, 2)
        group = cfg.n_head // attn.n_kv_head
        out = torch.zeros_like(q)
        for head in range(cfg.n_head):
            for t in range(T):
                keys = allowed[t].nonzero().squeeze(1)
                scores = k[:, head // group, keys] @ q[:, head, t, :, None] / math.sqrt(hs)  # (B, n_keys, 1)
                out[:, head, t] = (scores.softmax(dim=1) * v[:, head // group, keys]).sum(dim=1)
        x = x + attn.proj(out.transpose(1, 2).reshape(x.shape))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))


@pytest.mark.parametrize("window,n_sink", [(None, 0), (5, 0), (5, 2), (1, 1)])
def test_full_forward_equals_one_query_at_a_time_reference(window, n_sink):
    model = tiny_model(window_size=window, n_sink=n_sink)
    idx = tokens(2, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_forward(model, idx), rtol=1e-4, atol=1e-5)


def test_a_window_wider_than_the_text_is_full_attention_and_a_narrow_one_is_not():
    idx = tokens(1, 12)
    full = tiny_model()(idx)[0]
    torch.testing.assert_close(tiny_model(window_size=12)(idx)[0], full)
    assert not torch.allclose(tiny_model(window_size=3)(idx)[0], full, atol=1e-4)


def test_forward_runs_past_block_size():
    logits, _ = tiny_model()(tokens(1, 3 * TINY.block_size))  # RoPE has no table to run out of
    assert logits.shape == (1, 48, TINY.vocab_size) and torch.isfinite(logits).all()


# --- KV cache -------------------------------------------------------------------------------------


def decode_step_by_step(model: GPT, idx: torch.Tensor, prefill: int, kv_cache=None) -> torch.Tensor:
    """Logits for every position of idx: the first `prefill` tokens in one call, then one token per call."""
    kv_cache = kv_cache or model.new_kv_cache(idx.size(0))
    outs = [model(idx[:, :prefill], kv_cache=kv_cache)[0]]
    outs += [model(idx[:, t : t + 1], kv_cache=kv_cache)[0] for t in range(prefill, idx.size(1))]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("n_kv_head,window,n_sink,prefill", [(4, None, 0, 1), (2, None, 0, 7), (1, None, 0, 16),
                                                             (2, 5, 0, 3), (2, 5, 2, 11), (4, 3, 1, 1)])
def test_cached_decoding_gives_the_full_forward_logits_at_every_step(n_kv_head, window, n_sink, prefill):
    model = tiny_model(n_kv_head=n_kv_head, window_size=window, n_sink=n_sink)
    length = TINY.block_size if window is None else 40  # a windowed model streams past block_size
    idx = tokens(3, length)
    with torch.no_grad():
        torch.testing.assert_close(decode_step_by_step(model, idx, prefill), model(idx)[0], rtol=1e-5, atol=1e-5)


def test_cache_stores_only_the_kv_heads():
    cache = tiny_model(n_kv_head=1).new_kv_cache(batch_size=3)
    assert cache[0].k.shape == (3, 1, TINY.block_size, 8)  # MQA: 4x less cache than MHA
    assert len(cache) == TINY.n_layer


def test_rolling_buffer_equals_a_growing_cache_and_recomputation_from_scratch():
    model = tiny_model(window_size=6, n_sink=2)
    idx = tokens(2, 60)
    with torch.no_grad():
        recomputed = model(idx)[0]
        rolling = decode_step_by_step(model, idx, prefill=9)
        growing = decode_step_by_step(model, idx, prefill=9, kv_cache=model.new_kv_cache(2, capacity=60))
    torch.testing.assert_close(rolling, recomputed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(growing, recomputed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,n_sink,prefill", [(None, 0, 1), (None, 0, 6), (5, 0, 3), (5, 2, 11)])
def test_the_plain_growing_cache_gives_the_full_forward_logits_and_grows_by_a_token_a_step(window, n_sink, prefill):
    model = tiny_model(window_size=window, n_sink=n_sink)
    length = TINY.block_size if window is None else 40
    idx = tokens(2, length)
    cache = model.new_kv_cache(2, growing=True)
    assert all(isinstance(layer, GrowingKVCache) for layer in cache) and cache[0].nbytes() == 0
    with torch.no_grad():
        torch.testing.assert_close(decode_step_by_step(model, idx, prefill, kv_cache=cache), model(idx)[0],
                                   rtol=1e-5, atol=1e-5)
    # one slot per token seen, keys and values, n_kv_head heads of head_size floats: memory grows with the text
    assert cache[0].k.shape == (2, 2, length, 8) and torch.equal(cache[0].pos, torch.arange(length))
    assert cache[0].nbytes() == 2 * 2 * 2 * length * 8 * 4 and cache[0].seen == length


def test_a_too_small_cache_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        KVCache(1, 1, 8, capacity=5, window=4, n_sink=2)
    cache = KVCache(1, 1, 8, capacity=4)  # no window: it cannot forget, so it must say when it is full
    with pytest.raises(ValueError, match="no window"):
        cache.update(torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8), torch.arange(5))


def test_generate_uses_the_rolling_buffer_and_memory_stays_constant(monkeypatch):
    """Trap: a rolling buffer that exists but that generate never uses, so the cache grows without bound."""
    model = tiny_model(window_size=8, n_sink=2)
    seen_sizes, buffers, attended_in_place = [], set(), []
    update = KVCache.update

    def spy(self, k, v, pos):
        keys, values, key_pos = update(self, k, v, pos)
        seen_sizes.append(self.k.shape[2])
        buffers.add(self.k.data_ptr())
        attended_in_place.append(keys.data_ptr() == self.k.data_ptr() and values.data_ptr() == self.v.data_ptr())
        return keys, values, key_pos

    monkeypatch.setattr(KVCache, "update", spy)
    out = model.generate(tokens(1, 5), max_new_tokens=300, temperature=0)
    assert out.shape == (1, 305)
    assert len(seen_sizes) == 300 * TINY.n_layer  # the prefill and then one call per new token, every layer
    assert set(seen_sizes) == {10}  # n_sink + window slots, from the first token to the 300th
    assert len(buffers) == TINY.n_layer  # written in place: one buffer per layer, never reallocated
    # each decoded token attends over the buffer itself (no copy of it); only the prefill concatenates
    assert attended_in_place == [False] * TINY.n_layer + [True] * (299 * TINY.n_layer)


@pytest.mark.parametrize("window", [None, 7])
def test_generate_with_and_without_cache_agree(window):
    model = tiny_model(window_size=window)
    # a full-attention model agrees up to block_size (beyond, the cache slides a window of block_size while the
    # uncached path crops the text); a windowed model agrees all the way
    n_new = TINY.block_size - 4 if window is None else 60
    prompt = tokens(2, 4)
    torch.manual_seed(1)
    cached = model.generate(prompt, n_new, temperature=1.0, top_k=10)
    torch.manual_seed(1)
    uncached = model.generate(prompt, n_new, temperature=1.0, top_k=10, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generate_appends_tokens_from_a_prompt_longer_than_block_size():
    out = tiny_model().generate(tokens(2, 40), max_new_tokens=5, temperature=0)
    assert out.shape == (2, 45) and torch.equal(out[:, :40], tokens(2, 40))


# --- Training and the scripts -----------------------------------------------------------------------


def tiny_run_flags(tmp_path, *extra) -> list[str]:
    data = write_verse(tmp_path, 40)
    return ["--data", str(data), "--out_dir", str(tmp_path / "run"), "--n_layer", "2", "--n_head", "2",
            "--n_kv_head", "1", "--n_embd", "48", "--block_size", "32", "--batch_size", "16",
            "--learning_rate", "3e-3", "--eval_interval", "100", "--eval_iters", "4", "--max_new_tokens", "40",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("extra", [[], ["--norm", "layernorm", "--window_size", "8", "--n_sink", "2"]])
def test_training_learns_saves_a_checkpoint_and_generates(tmp_path, capsys, extra):
    results = train.main(tiny_run_flags(tmp_path, "--max_iters", "200", *extra))
    assert results["val_loss"] < 1.0, results  # untrained: ln 256 = 5.55
    out_dir = tmp_path / "run"
    records = read_metrics(out_dir / "metrics.jsonl")
    assert [r["iter"] for r in records] == [0, 100, 200] and records[0]["val_loss"] > 5.0
    assert (out_dir / "loss.png").stat().st_size > 0
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["model_config"]["n_kv_head"] == 1 and not list(out_dir.glob("*.tmp"))

    capsys.readouterr()
    result = generate.main(["--out_dir", str(out_dir), "--start", "JULIET:", "--max_new_tokens", "50",
                            "--device", "cpu"])
    assert result["text"].startswith("JULIET:") and len(result["text"].encode()) >= 57
    assert result["cache_kib"] > 0 and "tokens/s" in capsys.readouterr().out
    uncached = generate.main(["--out_dir", str(out_dir), "--start", "JULIET:", "--max_new_tokens", "20",
                              "--device", "cpu", "--no-use_cache", "--stream", "--temperature", "0"])
    cached = generate.main(["--out_dir", str(out_dir), "--start", "JULIET:", "--max_new_tokens", "20",
                            "--device", "cpu", "--stream", "--temperature", "0"])
    assert cached["text"] == uncached["text"] and uncached["cache_kib"] == 0


def test_generate_script_without_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        generate.main(["--out_dir", str(tmp_path / "nothing_here")])


@pytest.mark.parametrize("script", [train, generate])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--device" in out
