"""The fused paths the part 3 model trains with (F.rms_norm, SDPA's enable_gqa, RoPE as one complex multiply, a
precomputed RoPE table, one mask per forward) against the written-out versions they replace
(GPTConfig(reference_ops=True)), in every chapter that carries the model forward; and the benchmark script."""
import dataclasses
import importlib
import re

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from part03_modern import bench_train_step
from part03_modern.model import (GPT, GPTConfig, LayerNorm, MultiHeadAttention, RMSNorm, apply_rope,
                                 apply_rope_complex, rope_angles)
from tests.test_part03_modern import reference_forward

CHAPTERS = ["part03_modern", "part04_scaling", "part05_moe", "part06_sft", "part07_reward", "part08_ppo", "part09_grpo",
            "part10_semantic"]  # every chapter that carries part 3's model forward
TINY = dict(block_size=16, vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def chapter_pair(chapter: str, **changes):
    """The same weights twice: fused ops and written-out ops."""
    module = importlib.import_module(f"{chapter}.model")
    torch.manual_seed(0)
    fast = module.GPT(module.GPTConfig(**{**TINY, **changes}))
    with torch.no_grad():  # norm gains away from 1, so a norm computed wrongly cannot hide
        for name, p in fast.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.mul_(1 + 0.5 * torch.rand_like(p))
    reference = module.GPT(dataclasses.replace(fast.config, reference_ops=True))
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chapter", CHAPTERS)
@pytest.mark.parametrize("changes", [dict(), dict(n_kv_head=1), dict(n_kv_head=4), dict(window_size=5, n_sink=2),
                                     dict(norm="layernorm")])
def test_fused_ops_give_the_written_out_logits_and_gradients(chapter, changes):
    fast, reference = chapter_pair(chapter, **changes)
    idx = tokens(3, 16)
    fast_logits, fast_loss = fast(idx, idx)
    ref_logits, ref_loss = reference(idx, idx)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    fast_loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_the_fused_model_runs_the_fused_ops(chapter, monkeypatch):
    """Trap: a reference_ops switch that changes nothing (both models silently running the same code)."""
    fast, reference = chapter_pair(chapter)
    calls = {"rms_norm": 0, "repeat_interleave": 0}
    rms_norm, repeat_interleave = F.rms_norm, torch.Tensor.repeat_interleave

    def counting_rms_norm(*args, **kwargs):
        calls["rms_norm"] += 1
        return rms_norm(*args, **kwargs)

    def counting_repeat_interleave(*args, **kwargs):
        calls["repeat_interleave"] += 1
        return repeat_interleave(*args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", counting_rms_norm)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", counting_repeat_interleave)
    fast(tokens(1, 4))
    assert calls == {"rms_norm": 2 * TINY["n_layer"] + 1, "repeat_interleave": 0}  # every norm fused, no copies
    reference(tokens(1, 4))
    assert calls == {"rms_norm": 2 * TINY["n_layer"] + 1, "repeat_interleave": 2 * TINY["n_layer"]}


@pytest.mark.parametrize("chapter", CHAPTERS)
@pytest.mark.parametrize("changes", [dict(), dict(window_size=6, n_sink=2)])
def test_fused_cached_decoding_gives_the_written_out_full_forward(chapter, changes):
    fast, reference = chapter_pair(chapter, **changes)
    fast.eval(), reference.eval()
    idx = tokens(2, 40)  # beyond block_size: positions past the precomputed RoPE table
    with torch.no_grad():
        cache = fast.new_kv_cache(2, capacity=40 if not changes else None)
        steps = [fast(idx[:, :5], kv_cache=cache)[0]] + [fast(idx[:, t : t + 1], kv_cache=cache)[0]
                                                         for t in range(5, 40)]
        full = reference(idx[:, :16])[0] if not changes else reference(idx)[0]
    decoded = torch.cat(steps, dim=1)
    if not changes:  # full attention: the cache slides a window of block_size, so compare where both see it all
        decoded = decoded[:, :16]
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)


def test_rms_norm_fused_and_written_out_equal_torch_rms_norm():
    x = 3 * torch.randn(2, 5, 32) + 1
    reference = nn.RMSNorm(32, eps=1e-6)
    nn.init.normal_(reference.weight)
    for reference_ops in (False, True):
        ours = RMSNorm(32, eps=1e-6, reference_ops=reference_ops)
        ours.weight.data.copy_(reference.weight.data)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)


def test_rope_as_a_complex_multiply_equals_the_written_out_rotation():
    x = torch.randn(2, 3, 7, 16)
    positions = torch.tensor([0, 1, 2, 5, 100, 1000, 4095])
    cos, sin = rope_angles(positions, 16)
    torch.testing.assert_close(apply_rope_complex(x, cos, sin), apply_rope(x, cos, sin), rtol=1e-5, atol=1e-5)
    # and on the strided (B, heads, T, head_size) view attention hands it
    qkv = torch.randn(2, 7, 3 * 16)
    q = qkv[..., :16].view(2, 7, 1, 16).transpose(1, 2)
    torch.testing.assert_close(apply_rope_complex(q, cos, sin), apply_rope(q, cos, sin), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(apply_rope_complex(x, cos, sin), apply_rope(x, cos, -sin), atol=1e-3)  # direction


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_gqa_equals_repeating_the_key_value_heads(n_kv_head):
    config = GPTConfig(**{**TINY, "n_kv_head": n_kv_head})
    torch.manual_seed(0)
    fast = MultiHeadAttention(config)
    reference = MultiHeadAttention(dataclasses.replace(config, reference_ops=True))
    reference.load_state_dict(fast.state_dict())
    x, pos = torch.randn(2, 9, 32), torch.arange(9)
    cos, sin = rope_angles(pos, 8)
    torch.testing.assert_close(fast(x, pos, cos, sin), reference(x, pos, cos, sin), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_rope_table_is_precomputed_not_saved_and_the_forward_runs_past_it(chapter):
    """Also checks each chapter's attention against reference_forward, which rotates q and k one at a time."""
    module = importlib.import_module(f"{chapter}.model")
    model = module.GPT(module.GPTConfig(**TINY)).eval()
    cos, sin = rope_angles(torch.arange(TINY["block_size"]), TINY["n_embd"] // TINY["n_head"])
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert not any(k.startswith("rope_") for k in model.state_dict())  # old checkpoints load strictly
    idx = tokens(2, 3 * TINY["block_size"])  # past the table: the angles are computed
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_forward(model, idx), rtol=1e-4, atol=1e-5)


# --- bench_train_step.py ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_ops", [False, True])
def test_bench_train_step_times_both_models_and_profiles_them(reference_ops, capsys):
    flags = ["--n_layer", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "2", "--rounds", "3",
             "--steps", "1", "--warmup", "1", "--profile_steps", "1", "--profile_rows", "5", "--threads", "1"]
    results = bench_train_step.main(flags + (["--reference_ops"] if reference_ops else []))
    assert results["part02"] > 0 and results["part03"] > 0
    assert results["ratio"] == pytest.approx(results["part03"] / results["part02"])
    out = capsys.readouterr().out
    assert out.count("Self CPU") >= 2 and "part03 / part02 = " in out
    # round_ratio: the median of the per-round ratios, recomputed from the printed rounds
    rounds = re.findall(r"round \d+: part02 ([\d,]+) tok/s, part03 ([\d,]+) tok/s", out)
    per_round = sorted(float(b.replace(",", "")) / float(a.replace(",", "")) for a, b in rounds)
    assert len(per_round) == 3 and results["round_ratio"] == pytest.approx(per_round[1], rel=2e-3)
    assert ("written-out" in out) == reference_ops


def test_bench_train_step_norm_flag_swaps_part3s_norms_only():
    cfg = bench_train_step.parse_config(bench_train_step.BenchConfig, ["--norm", "layernorm", "--n_layer", "1"])
    models = bench_train_step.build_models(cfg, "cpu")
    part3_norms = [type(m) for m in models["part03"].modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert part3_norms == [LayerNorm] * 3  # two per block and the final one
    assert not any(isinstance(m, RMSNorm) for m in models["part02"].modules())


def test_bench_train_step_has_help_and_refuses_a_bad_shape(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train_step.main(["--help"])
    assert exit_info.value.code == 0 and "--reference_ops" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bench_train_step.main(["--n_head", "3"])
    assert exit_info.value.code == 2 and "--n_head" in capsys.readouterr().err
