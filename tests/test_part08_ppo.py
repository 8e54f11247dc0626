"""Part 8: PPO. GAE, the KL estimators and controller, the clipped losses, the value head, sampling log-probs
that equal the training forward pass, and a tiny run of the whole loop."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from part04_scaling.bpe import get_tokenizer
from part06_sft.eval import load_policy
from part06_sft.template import chat_tokenizer
from part08_ppo import train as ppo
from part08_ppo.model import GPT, GPTConfig, PolicyWithValue, RewardModel


def tiny_config(vocab_size=60, block_size=64):
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


# --- GAE ----------------------------------------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.3, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens: its 3rd is garbage
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: delta = [0 + .9*.4 - .2, 0 + .9*.6 - .4, 1 - .6] = [.16, .14, .4]; A_t = delta_t + .45 A_{t+1}
    # row 2: delta = [0 + .9*.5 - .3, 1 - .5] = [.15, .5], and nothing after its end
    expected = torch.tensor([[0.16 + 0.45 * (0.14 + 0.45 * 0.4), 0.14 + 0.45 * 0.4, 0.4], [0.15 + 0.45 * 0.5, 0.5, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, expected + values * mask, atol=1e-6)
    # lam = 1, gamma = 1: Monte Carlo, the rewards still to come minus the value
    advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages[0], torch.tensor([1 - 0.2, 1 - 0.4, 1 - 0.6]))
    # lam = 0: one-step TD errors
    advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert torch.allclose(advantages[0], torch.tensor([0.4 - 0.2, 0.6 - 0.4, 1 - 0.6]))


def test_gae_against_a_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    B, R, gamma, lam = 5, 9, 0.97, 0.8
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [9, 1, 4, 7, 2]
    mask = torch.tensor([[t < n for t in range(R)] for n in lengths], dtype=torch.float)
    advantages, _ = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]  # the value after the last token is 0
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(R):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) if t < n else 0.0
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float)
    w = ppo.whiten(x, mask)
    kept = x[:, :3].flatten()
    assert torch.allclose(w[:, :3].flatten(), (kept - kept.mean()) / kept.std(unbiased=False), atol=1e-5)
    assert torch.equal(w[:, 3], torch.zeros(2))  # the masked entries neither count nor move
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    full = torch.ones(1, 3, dtype=torch.bool)
    assert ppo.explained_variance(returns.clone(), returns, full) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((1, 3), 2.0), returns, full) == pytest.approx(0.0)  # the mean
    assert ppo.explained_variance(-returns, returns, full) < 0


# --- The KL penalty ----------------------------------------------------------------------------------------------


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the policy: tokens are sampled from it
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])  # the reference
    exact = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):
        per_token = ppo.kl_per_token(p.log(), q.log(), estimator)
        assert (p * per_token).sum().item() == pytest.approx(exact.item(), rel=1e-5)  # expectation under p
    assert (ppo.kl_per_token(p.log(), q.log(), "k1") < 0).any()  # k1: single tokens can be negative
    assert (ppo.kl_per_token(p.log(), q.log(), "k3") >= 0).all()
    assert F.kl_div(q.log(), p, reduction="sum").item() == pytest.approx(exact.item(), rel=1e-5)


def test_token_rewards_put_the_score_on_the_last_answer_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float)
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.2, 0.1 - 1.0, 0.0]]))


def test_kl_controller():
    fixed = ppo.KLController(0.1)
    fixed.update(kl=100.0, n_answers=64)
    assert fixed.value == 0.1
    adaptive = ppo.KLController(0.1, target=2.0, horizon=1000)
    adaptive.update(kl=100.0, n_answers=50)  # far above the target: the error is clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 50 / 1000))
    adaptive.update(kl=1.0, n_answers=50)  # half the target: error -0.5, clipped to -0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.05) * (1 - 0.2 * 0.05))
    before = adaptive.value
    adaptive.update(kl=2.2, n_answers=100)  # 10% above: error +0.1
    assert adaptive.value == pytest.approx(before * (1 + 0.1 * 0.1))


# --- The PPO losses ------------------------------------------------------------------------------------------


def test_ppo_losses_by_hand():
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    values = old_values = returns = torch.zeros(1, 3)
    # ratio 1 everywhere: the surrogate is -mean(A), nothing is clipped, the policies agree
    pl, vl, clip, akl = ppo.ppo_losses(old, old, adv, values, old_values, returns, mask, 0.2, 0.2)
    assert pl.item() == pytest.approx(-2 / 3) and clip.item() == 0 and akl.item() == pytest.approx(0)
    # ratios 1.5, 0.5, 1.1: token 1 (A > 0) is clipped at 1.2, token 2 (A < 0) at 0.8, token 3 is inside
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    pl, _, clip, akl = ppo.ppo_losses(logp, old, adv, values, old_values, returns, mask, 0.2, 0.2)
    assert pl.item() == pytest.approx((-1.2 + 0.8 - 2 * 1.1) / 3)
    assert clip.item() == pytest.approx(2 / 3)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert akl.item() == pytest.approx(expected_kl)
    # where the clip would help the objective, it does not apply: A > 0 and ratio 0.5 keeps ratio 0.5
    pl, *_ = ppo.ppo_losses(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.ones(1, 1),
                            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.2, 0.2)
    assert pl.item() == pytest.approx(-0.5)
    # value clipping: the old value 0, the return 1: a new value of 0.9 may only count as 0.2
    _, vl, *_ = ppo.ppo_losses(old[:, :1], old[:, :1], adv[:, :1], torch.tensor([[0.9]]), torch.zeros(1, 1),
                               torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2)
    assert vl.item() == pytest.approx(0.5 * max(0.1**2, 0.8**2))
    # masked tokens count for nothing
    pl, *_ = ppo.ppo_losses(logp, old, adv, values, old_values, returns, torch.tensor([[1.0, 0.0, 0.0]]), 0.2, 0.2)
    assert pl.item() == pytest.approx(-1.2)


# --- The value head and the sampling log-probs ------------------------------------------------------------------


def test_the_value_head_reads_the_final_hidden_states():
    torch.manual_seed(0)
    model = PolicyWithValue(tiny_config()).eval()
    assert model.value_head.in_features == model.policy.config.n_embd  # not vocab_size: not the logits
    torch.nn.init.normal_(model.value_head.weight)
    idx = torch.randint(0, 60, (3, 7))
    logits, values = model(idx)
    hidden = model.policy.hidden_states(idx)
    assert torch.allclose(values, model.value_head(hidden).squeeze(-1), atol=1e-6)
    assert torch.allclose(logits, model.policy(idx)[0], atol=1e-6)
    assert PolicyWithValue(tiny_config())(idx)[1].abs().max() == 0  # a new head: every value 0
    separate = PolicyWithValue(tiny_config(), separate_value=True).eval()
    torch.nn.init.normal_(separate.value_head.weight)
    _, values = separate(idx)
    assert torch.allclose(values, separate.value_head(separate.value_backbone.hidden_states(idx)).squeeze(-1),
                          atol=1e-6)
    values.sum().backward()  # the critic's loss never reaches the policy's weights
    assert all(p.grad is None for p in separate.policy.parameters())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_training_forward_pass(temperature):
    """Sampled with the KV cache from left-padded prompts; recomputed in one forward pass over the finished
    sequences, as the first PPO minibatch does: the same numbers, at the temperature sampled with."""
    torch.manual_seed(0)
    model = PolicyWithValue(tiny_config()).eval()
    prompts = [torch.randint(3, 60, (n,)).tolist() for n in (9, 2, 5, 12)]
    stops = torch.zeros(60, dtype=torch.bool)
    stops[[0, 1, 2]] = True
    roll = ppo.rollout(model.policy, prompts, 12, temperature, stops, pad_id=59)
    assert roll.ids.size(1) - roll.prompt_len == roll.response_mask.size(1) and roll.prompt_len == 12
    logits, _ = model(roll.ids, padding_mask=roll.padding_mask)
    recomputed, _ = ppo.response_logprobs(logits, roll.ids, roll.prompt_len, temperature)
    mask = roll.response_mask
    assert torch.allclose(recomputed[mask], roll.logprobs[mask], atol=1e-5)
    if temperature != 1.0:  # the untempered distribution gives other numbers: the check can fail
        untempered, _ = ppo.response_logprobs(logits, roll.ids, roll.prompt_len, 1.0)
        assert not torch.allclose(untempered[mask], roll.logprobs[mask], atol=1e-3)
    # the answer runs up to and including its first stop token; nothing after it counts
    for row in range(len(prompts)):
        response = roll.ids[row, roll.prompt_len :].tolist()
        first_stop = next((t for t, tok in enumerate(response) if stops[tok]), None)
        n = mask[row].sum().item()
        assert n == (len(response) if first_stop is None else first_stop + 1)
        assert roll.ended[row].item() == (first_stop is not None)


# --- The whole loop on tiny checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """A tiny SFT-style policy and a tiny reward model (a random head: any reward signal will do here)."""
    base = get_tokenizer()
    tokenizer = chat_tokenizer(base)
    folder = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    policy = GPT(tiny_config(base.vocab_size, block_size=128))
    policy.resize_token_embeddings(tokenizer.vocab_size)
    torch.save({"model": policy.state_dict(), "model_config": asdict(policy.config),
                "tokenizer": tokenizer.to_dict()}, folder / "sft.pt")
    rm = RewardModel(policy.config)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    torch.save({"kind": "reward_model", "model": rm.state_dict(), "model_config": asdict(policy.config),
                "tokenizer": tokenizer.to_dict(), "reward_mean": 0.0, "reward_std": 1.0}, folder / "rm.pt")
    return str(folder / "sft.pt"), str(folder / "rm.pt")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_chain):
    sft, rm = tiny_chain
    out_dir = tmp_path_factory.mktemp("ppo") / "run"
    results = ppo.main(["--init_from", sft, "--reward_model", rm, "--out_dir", str(out_dir), "--tasks",
                        "count,date", "--rollout_size", "8", "--minibatch_size", "4", "--ppo_epochs", "2",
                        "--max_new_tokens", "6", "--max_iters", "3", "--eval_interval", "2", "--probe_n", "2",
                        "--eval_n", "2", "--learning_rate", "1e-3", "--early_stop_kl", "0", "--threads", "1"])
    return out_dir, results


def test_tiny_run_updates_logs_and_writes_an_evaluable_checkpoint(tiny_run, tiny_chain):
    out_dir, results = tiny_run
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "score" in r]
    probes = [r for r in records if "heldout_proxy" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3] and [r["iter"] for r in probes] == [0, 2, 3]
    # several minibatch steps per rollout: after the first, the policy is not the one that sampled
    assert all(r["minibatch_steps"] == 4 for r in steps)
    assert all(r["approx_kl"] > 1e-6 for r in steps) and max(r["clip_fraction"] for r in steps) > 0
    # the sampled log-probs were the training forward pass's
    assert max(r["logprob_mismatch"] for r in steps) < 1e-4
    for key in ("score", "score_std", "kl", "kl_coef", "entropy", "value_loss", "explained_variance",
                "grad_norm", "response_length", "tokens_per_sec"):
        assert all(r.get(key) is not None for r in steps), key
    assert probes[0]["heldout_kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert steps[-1]["kl"] != 0 and probes[-1]["heldout_kl"] != 0  # the reference is scored, and it moved
    for key in ("rm_reward_before", "rm_reward_after", "kl_final", "clip_fraction_mean", "gold_before",
                "gold_after"):
        assert key in results
    assert set(results["gold_after"]) == {"count", "date"}
    json.loads((out_dir / "results.json").read_text(), parse_constant=pytest.fail)  # valid JSON: no NaN
    for name in ("ppo.png", "overoptimisation.png", "accuracy.png", "loss.png"):
        assert (out_dir / name).is_file()
    policy, _, checkpoint = load_policy(out_dir / "ckpt.pt")  # part 6's eval.py loads it
    sft, _, _ = load_policy(tiny_chain[0])
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft.state_dict().values()))
    assert "value_head.weight" in checkpoint["value_model"]


def test_missing_checkpoints_name_the_command(tmp_path, monkeypatch, tiny_chain, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python part06_sft/train.py"):
        ppo.main(["--out_dir", "ppo"])
    with pytest.raises(FileNotFoundError, match="python part07_reward/train.py"):
        ppo.main(["--init_from", tiny_chain[0], "--out_dir", "ppo"])
    assert not (tmp_path / "ppo").exists()
    with pytest.raises(SystemExit):
        ppo.main(["--rollout_size", "4", "--minibatch_size", "8"])
    assert "--minibatch_size 8 is larger than --rollout_size 4" in capsys.readouterr().err

