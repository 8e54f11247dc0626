"""Part 5: the mixture-of-experts layer (routing, balancing, capacity, hybrid layouts) and its training run."""
import math

import pytest
import torch
from torch.nn import functional as F

from part05_moe import eval_full_val, generate, train
from part05_moe.model import GPT, MLP, GPTConfig, MoE, is_moe_layer, load_balancing_loss, router_z_loss
from shared.metrics import read_metrics
from tests.texts import write_verse


def moe_config(**changes) -> GPTConfig:
    base = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, n_expert=4, moe_top_k=2)
    return GPTConfig(**{**base, **changes})


def moe_layer(**changes) -> MoE:
    torch.manual_seed(0)
    return MoE(moe_config(**changes))


def tokens_in(seed: int = 0, shape=(3, 8, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer the slow, obvious way: one token at a time, straight from the definition."""
    out = torch.zeros_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            token = x[b, t]
            probs = F.softmax(moe.router.weight @ token, dim=-1)
            chosen = probs.argsort(descending=True)[: moe.top_k]
            weights = probs[chosen] / probs[chosen].sum() if moe.top_k > 1 else probs[chosen]
            for w, e in zip(weights, chosen):
                out[b, t] += w * moe.experts[e](token[None])[0]
    return out


# --- The load-balancing loss and the z-loss ---------------------------------------------------------


@pytest.mark.parametrize("n_expert,top_k", [(4, 1), (8, 2), (3, 3)])
def test_balancing_loss_is_exactly_1_for_perfectly_uniform_routing(n_expert, top_k):
    n_tokens = 6 * n_expert
    probs = torch.full((n_tokens, n_expert), 1 / n_expert)
    expert_index = (torch.arange(n_tokens * top_k) % n_expert).view(n_tokens, top_k)  # round robin: equal counts
    assert load_balancing_loss(probs, expert_index, n_expert).item() == pytest.approx(1.0, abs=1e-6)


def test_balancing_loss_grows_with_imbalance_as_the_switch_formula_says():
    # 2 experts, every token to expert 0 with probability 0.9: 2 * (1.0 * 0.9 + 0.0 * 0.1) = 1.8
    probs = torch.tensor([[0.9, 0.1]] * 5)
    assert load_balancing_loss(probs, torch.zeros(5, 1, dtype=torch.long), 2).item() == pytest.approx(1.8)
    # a full collapse (probability 1 on the expert that gets everything) costs n_expert
    probs = F.one_hot(torch.zeros(7, dtype=torch.long), 4).float()
    assert load_balancing_loss(probs, torch.zeros(7, 1, dtype=torch.long), 4).item() == pytest.approx(4.0)


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e**3) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)


# --- Routing and dispatch ----------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_vectorised_dispatch_equals_the_token_by_token_definition(top_k):
    moe = moe_layer(moe_top_k=top_k)
    x = tokens_in()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes", [dict(moe_top_k=1), dict(moe_top_k=2), dict(moe_top_k=3),
                                     dict(n_shared_expert=1, eval_capacity_factor=0.5), dict(bias=True)])
def test_one_token_decoding_path_equals_the_token_by_token_definition(changes):
    """Batch 1, one token, eval mode (cached decoding) takes forward_one_token: no sort, no count, no capacity."""
    moe = moe_layer(**changes).eval()
    for seed in range(8):  # 8 tokens: their routers pick different experts
        x = tokens_in(seed, shape=(1, 1, 32))
        want = reference_moe(moe, x) + (moe.shared(x) if moe.shared is not None else 0)
        with torch.no_grad():
            torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-6)
        assert moe.expert_fraction is None and moe.aux_loss is None and moe.drop_rate == 0.0  # no statistics kept


def test_top_k_picks_the_highest_scoring_experts_and_renormalises_their_weights():
    moe = moe_layer(n_expert=4, moe_top_k=2)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([1.0, 3.0, 0.0, 2.0])  # logits: expert 1 > 3 > 0 > 2 when x[0] = 1
    x = torch.zeros(1, 1, 32)
    x[0, 0, 0] = 1.0
    with torch.no_grad():
        y = moe(x)
        p1, p3 = math.exp(3) / (math.exp(3) + math.exp(2)), math.exp(2) / (math.exp(3) + math.exp(2))  # sum to 1
        want = p1 * moe.experts[1](x) + p3 * moe.experts[3](x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-7)
    assert moe.expert_fraction.tolist() == [0.0, 0.5, 0.0, 0.5]  # the two chosen experts, one assignment each


def test_a_one_expert_moe_is_the_dense_mlp_with_the_same_weights():
    torch.manual_seed(0)
    dense = GPT(moe_config(n_expert=0))
    moe = GPT(moe_config(n_expert=1, moe_top_k=1))
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert all(k.endswith("router.weight") for k in missing) and not unexpected
    assert isinstance(dense.blocks[0].mlp, MLP) and isinstance(moe.blocks[0].mlp, MoE)
    idx = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))
    dense.eval(), moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-6)  # softmax of 1 logit = 1


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_language_model_loss_alone_reaches_the_router(top_k):
    torch.manual_seed(0)
    model = GPT(moe_config(moe_top_k=top_k, aux_loss_coef=0.0, z_loss_coef=0.0))
    idx = torch.randint(50, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    for moe in model.moe_layers():
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0, "router got no gradient"


def test_training_loss_adds_the_weighted_router_losses_and_eval_loss_is_pure_cross_entropy():
    torch.manual_seed(0)
    model = GPT(moe_config(aux_loss_coef=0.5, z_loss_coef=0.25))
    idx = torch.randint(50, (2, 16))
    logits, train_loss = model(idx, idx)
    aux, z = model.router_losses()
    ce = F.cross_entropy(logits.view(-1, 50), idx.view(-1))
    assert train_loss.item() == pytest.approx((ce + 0.5 * aux + 0.25 * z).item(), rel=1e-6)
    model.eval()
    assert model(idx, idx)[1].item() == pytest.approx(ce.item(), rel=1e-6)


def test_capacity_drops_the_overflow_in_token_order_and_reports_the_rate():
    moe = moe_layer(n_expert=4, moe_top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # every token (all channels positive) prefers expert 0
    x = tokens_in(shape=(2, 8, 32)).abs() + 0.1
    with torch.no_grad():
        y = moe(x).view(16, 32)
        p0 = F.softmax(x.view(16, 32) @ moe.router.weight.t(), dim=-1)[:, 0]
        kept = moe.experts[0](x.view(16, 32)[:4]) * p0[:4, None]
    # capacity = 1.0 * 16 tokens / 4 experts = 4: the first 4 tokens go through, 12 of 16 are dropped
    assert moe.drop_rate == pytest.approx(0.75)
    torch.testing.assert_close(y[:4], kept, rtol=1e-5, atol=1e-7)
    assert torch.all(y[4:] == 0), "a dropped token gets nothing from the MoE layer (the residual carries it)"


def test_no_capacity_means_no_drops():
    moe = moe_layer(capacity_factor=None)
    moe(tokens_in())
    assert moe.drop_rate == 0.0 and moe.expert_fraction.sum().item() == pytest.approx(1.0)


def test_noisy_gating_is_random_in_training_and_off_in_eval():
    moe = moe_layer(noisy_gating=True)
    x = tokens_in()
    assert not torch.equal(moe(x), moe(x))  # fresh noise every call
    moe.eval()
    torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-5, atol=1e-6)


# --- Hybrid layouts, shared experts, parameter counts -------------------------------------------------


@pytest.mark.parametrize("changes,layout", [
    (dict(n_expert=0), "DDDD"), (dict(), "MMMM"), (dict(moe_every=2), "MDMD"),
    (dict(moe_every=2, n_dense_first=1), "DMDM"), (dict(n_dense_first=1), "DMMM"),
])
def test_hybrid_layout_interleaves_dense_and_moe_layers(changes, layout):
    config = moe_config(n_layer=4, **changes)
    assert "".join("M" if is_moe_layer(i, config) else "D" for i in range(4)) == layout
    model = GPT(config)
    assert "".join("M" if isinstance(b.mlp, MoE) else "D" for b in model.blocks) == layout


def test_shared_expert_adds_an_always_on_mlp_to_the_routed_output():
    moe = moe_layer(n_shared_expert=2, expert_hidden=16)
    assert moe.shared.up.out_features == 32  # two shared experts of 16 = one MLP of 32
    x = tokens_in()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_moe(moe, x) + moe.shared(x), rtol=1e-5, atol=1e-6)


def test_active_parameters_count_only_the_chosen_experts():
    dense = GPT(moe_config(n_expert=0))
    hidden = dense.blocks[0].mlp.up.out_features
    moe = GPT(moe_config(n_expert=8, moe_top_k=2, expert_hidden=hidden // 2))
    router = 2 * 32 * 8  # two layers of (n_embd, n_expert) routers
    assert moe.num_active_params() == dense.num_params() + router  # 2 experts of half size = the dense MLP
    assert moe.num_params() == dense.num_params() + router + 2 * 3 * 32 * (hidden // 2) * 6  # 6 idle experts
    assert dense.num_active_params() == dense.num_params()


def test_kv_cache_generation_equals_recomputation_with_moe_layers():
    torch.manual_seed(0)
    model = GPT(moe_config(n_layer=3, moe_every=2)).eval()
    idx = torch.randint(50, (2, 5))
    cached = model.generate(idx, 8, temperature=0)
    uncached = model.generate(idx, 8, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


# --- Capacity at evaluation and decoding (Switch: a separate, by default absent, eval capacity) -------------


def test_eval_mode_drops_nothing_so_the_full_forward_equals_cached_decoding():
    """Trap: a capacity computed from whatever batch runs. The full forward (48 tokens) then drops overflow that
    one-token decoding never drops, and the cached logits differ from the full ones."""
    torch.manual_seed(0)
    model = GPT(moe_config(n_expert=4, moe_top_k=1, capacity_factor=1.0)).eval()
    idx = torch.randint(50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)[0]
        full_drop_rates = [moe.drop_rate for moe in model.moe_layers()]
        cache = model.new_kv_cache(3)
        steps = [model(idx[:, :1], kv_cache=cache)[0]] + [model(idx[:, t : t + 1], kv_cache=cache)[0]
                                                          for t in range(1, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert full_drop_rates == [0.0, 0.0]
    model.train()  # in training the capacity applies: the same tokens overflow an expert and are dropped
    with torch.no_grad():
        model(idx)
    assert max(moe.drop_rate for moe in model.moe_layers()) > 0.05


def test_eval_capacity_factor_caps_experts_in_eval_mode_only():
    torch.manual_seed(0)
    model = GPT(moe_config(n_expert=4, moe_top_k=1, eval_capacity_factor=0.5)).eval()
    idx = torch.randint(50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(idx)
        assert all(moe.drop_rate >= 0.5 for moe in model.moe_layers())  # half the fair share: at least half dropped
        model.train()
        model(idx)
        assert all(moe.drop_rate == 0.0 for moe in model.moe_layers())  # capacity_factor None: no cap in training


# --- Training ------------------------------------------------------------------------------------------


def tiny_run_flags(tmp_path, *extra) -> list[str]:
    data = write_verse(tmp_path, 60)
    return ["--data", str(data), "--vocab_size", "320", "--out_dir", str(tmp_path / "run"), "--n_layer", "2",
            "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
            "--n_expert", "4", "--moe_top_k", "2", "--expert_hidden", "48", "--learning_rate", "3e-3",
            "--min_lr", "3e-4", "--warmup_iters", "5", "--eval_interval", "10", "--eval_iters", "2",
            "--max_new_tokens", "10", "--device", "cpu", *extra]


def test_moe_training_learns_and_logs_router_statistics_and_the_utilization_plot(tmp_path):
    results = train.main(tiny_run_flags(tmp_path, "--max_iters", "60", "--n_dense_first", "1", "--n_layer", "3"))
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["iter"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 2  # untrained: ln 320 = 5.8 nats
    for r in records:
        assert len(r["expert_fraction"]) == 2 and all(len(row) == 4 for row in r["expert_fraction"])  # 2 MoE layers
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in r["expert_fraction"])
        assert 0.5 < r["aux_loss"] < 4 and r["z_loss"] > 0 and r["drop_rate"] == 0.0  # 1 = uniform, 4 = collapse
    assert results["num_active_params"] < results["num_params"]
    assert (run / "expert_utilization.png").stat().st_size > 0 and (run / "loss.png").stat().st_size > 0
    result = generate.main(["--out_dir", str(run), "--start", "ROMEO:", "--max_new_tokens", "10", "--device", "cpu"])
    assert result["text"].startswith("ROMEO:")


def test_eval_full_val_scores_every_validation_window_once(tmp_path):
    train.main(tiny_run_flags(tmp_path, "--max_iters", "10"))
    run = tmp_path / "run"
    [row] = eval_full_val.main(["--run_dirs", str(run), "--batch_size", "3"])
    # the reference: every window on its own, the loss written out as -log softmax at the target
    model, tokenizer, checkpoint = generate.load_run(run)
    _, val = train.train_val_split(train.encode_tensor(tokenizer, train.load_text(checkpoint["train_config"]["data"])))
    n_windows = (len(val) - 1) // 16
    nll = []
    with torch.no_grad():
        for w in range(n_windows):
            x = val[w * 16 : (w + 1) * 16].long()[None]
            y = val[w * 16 + 1 : (w + 1) * 16 + 1].long()
            logits, _ = model(x, y[None])
            nll.append(-F.log_softmax(logits[0], dim=-1)[torch.arange(16), y])
    assert n_windows >= 3 and row["val_tokens"] == n_windows * 16
    assert row["full_val_loss"] == pytest.approx(torch.cat(nll).mean().item(), rel=1e-5)
    assert row["train_slice_loss"] < math.log(320) and row["iter"] == 10
    assert (run / "full_val.json").is_file()


def test_dense_run_writes_no_router_statistics(tmp_path):
    train.main(tiny_run_flags(tmp_path, "--max_iters", "10", "--n_expert", "0"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "expert_fraction" not in records[-1] and "aux_loss" not in records[-1]
    assert not (tmp_path / "run" / "expert_utilization.png").exists()


def test_capacity_run_reports_a_drop_rate(tmp_path):
    results = train.main(tiny_run_flags(tmp_path, "--max_iters", "10", "--capacity_factor", "0.5"))
    assert results["drop_rate"] >= 0.5 - 1e-6  # half the fair share per expert: at least half dropped


def test_resume_is_bit_identical_with_noisy_routing(tmp_path):
    extra = ["--noisy_gating", "--grad_accum_steps", "2"]  # the noise draws from the saved RNG state
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train.main(tiny_run_flags(straight, "--max_iters", "30", *extra))
    train.main(tiny_run_flags(halves, "--max_iters", "10", "--lr_decay_iters", "30", *extra))
    train.main(tiny_run_flags(halves, "--max_iters", "30", "--lr_decay_iters", "30", "--init_from", "resume", *extra))
    a = torch.load(straight / "run" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(halves / "run" / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{name} differs after resume"
    with pytest.raises(ValueError, match="--n_expert 4 -> 8"):
        train.main(tiny_run_flags(halves, "--max_iters", "30", "--lr_decay_iters", "30", "--n_expert", "8",
                                  "--init_from", "resume", *extra))


def test_help_lists_the_moe_flags(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--n_expert", "--moe_top_k", "--aux_loss_coef", "--z_loss_coef", "--capacity_factor",
                 "--n_shared_expert", "--moe_every", "--n_dense_first", "--noisy_gating", "--expert_hidden"):
        assert flag in out, flag


def test_bench_times_every_variant():
    from part05_moe import bench_moe

    results = bench_moe.main(["--steps", "1", "--rounds", "2", "--block_size", "8", "--batch_size", "2",
                              "--vocab_size", "64", "--n_embd", "32", "--n_layer", "2"])
    assert set(results) == set(bench_moe.VARIANTS)
    dense = results["dense (--n_expert 0)"]
    assert dense["params"] == dense["active"] and all(r["wall"] > 0 and r["cpu"] > 0 for r in results.values())
    assert dense["ratio"] == 1.0 and all(r["ratio"] == pytest.approx(r["cpu"] / dense["cpu"]) for r in results.values())
    assert all(r["active"] < r["params"] for name, r in results.items() if name != "dense (--n_expert 0)")


def test_bench_generate_times_the_moe_the_dense_model_and_part2(tmp_path):
    from part05_moe import bench_generate

    models = bench_generate.build_models(seed=0)
    # the train.py defaults, as the README counts them: 2,528,384 (MoE), 976,000 (dense), part 2: 834,304
    assert [sum(p.numel() for p in m.parameters()) for m in models.values()] == [2_528_384, 976_000, 834_304]
    results = bench_generate.main(["--new_tokens", "3,5", "--rounds", "1", "--warmup", "0", "--out_dir", str(tmp_path)])
    assert set(results["tokens_per_sec"]) == set(models)
    assert all(set(rates) == {"3", "5"} and min(rates.values()) > 0 for rates in results["tokens_per_sec"].values())
    assert (tmp_path / "bench_generate.json").is_file()
