"""Part 9: GRPO. Group-relative advantages, the k3 KL estimator, loss aggregation, the clipped loss with its
KL term, the one-update case (REINFORCE with a group baseline), and a tiny run of the whole loop."""
import json
import math
import statistics
from dataclasses import asdict

import pytest
import torch

from part04_scaling.bpe import get_tokenizer
from part06_sft.eval import load_policy
from part06_sft.template import chat_tokenizer
from part09_grpo import train as grpo
from part09_grpo.model import GPT, GPTConfig


def tiny_config(vocab_size=60, block_size=128):
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


# --- Group-relative advantages --------------------------------------------------------------------------------


def test_group_advantages_against_statistics():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.0])  # 3 groups of 4
    advantages, flat = grpo.group_advantages(scores, group_size=4)  # eps = 1e-4 keeps flat groups at 0, not NaN
    for g in (0, 2):
        group = scores[4 * g : 4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)  # the sample std, as torch.std
        expected = [(x - mean) / std for x in group]
        assert advantages[4 * g : 4 * g + 4].tolist() == pytest.approx(expected, rel=1e-3)
    assert flat.tolist() == [False, True, False]  # the middle group: all right, nothing to learn
    assert torch.equal(advantages[4:8], torch.zeros(4))
    # Dr. GRPO: centred, not scaled
    unscaled, _ = grpo.group_advantages(scores, group_size=4, scale=False)
    assert unscaled[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert unscaled[8:].tolist() == pytest.approx([-0.125, -0.125, 0.375, -0.125])
    # groups are consecutive answers, not every 4th one
    wrong_layout = (scores.view(4, 3) - scores.view(4, 3).mean(0)).T.reshape(-1)
    assert not torch.allclose(unscaled, wrong_layout)


# --- The KL term --------------------------------------------------------------------------------------------------


def test_k3_is_an_unbiased_nonnegative_estimate_of_the_exact_kl():
    pi = torch.tensor([0.85, 0.1, 0.04, 0.01])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = sum(p * math.log(p / q) for p, q in zip(pi.tolist(), ref.tolist()))
    k3 = grpo.kl_per_token(pi.log(), ref.log(), "k3")
    assert (pi * k3).sum().item() == pytest.approx(exact, rel=1e-5)  # expectation over tokens sampled from pi
    assert (k3 >= 0).all()
    # Monte Carlo, as training sees it: the mean over sampled tokens approaches the exact KL
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    assert k3[tokens].mean().item() == pytest.approx(exact, rel=0.02)
    # the check can fail: the other direction, KL(ref || pi), and k3 with its arguments swapped are other numbers
    reverse = sum(q * math.log(q / p) for p, q in zip(pi.tolist(), ref.tolist()))
    swapped = (pi * grpo.kl_per_token(ref.log(), pi.log(), "k3")).sum().item()
    assert abs(reverse - exact) > 0.2 and abs(swapped - exact) > 0.2


# --- Aggregation and the loss ------------------------------------------------------------------------------------


def test_loss_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float)
    assert grpo.aggregate(per_token, mask, "sequence", 4).item() == pytest.approx((2.0 + 4.0) / 2)
    assert grpo.aggregate(per_token, mask, "token", 4).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert grpo.aggregate(per_token, mask, "constant", 4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)


def test_grpo_loss_by_hand():
    mask = torch.ones(2, 3)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
    adv = torch.tensor([1.0, -2.0])
    # ratio 1, policy = reference: the loss is -mean A (per answer), the KL term 0
    loss, policy_loss, kl, clip, approx_kl = grpo.grpo_loss(old, old, old, adv, mask, 0.2, 0.1)
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2) and kl.item() == pytest.approx(0.0, abs=1e-7)
    assert clip.item() == 0 and approx_kl.item() == pytest.approx(0.0, abs=1e-7)
    # ratio 1.5 for answer 1 (A = 1 > 0: clipped at 1.2), 0.5 for answer 2 (A = -2 < 0: clipped at 0.8)
    new = old + torch.log(torch.tensor([[1.5], [0.5]]))
    _, policy_loss, _, clip, _ = grpo.grpo_loss(new, old, new, adv, mask, 0.2, 0.0)
    assert policy_loss.item() == pytest.approx((-1.2 + 2 * 0.8) / 2) and clip.item() == 1.0
    # the KL term: beta x k3 between the policy and the reference, averaged like the rest
    ref = old + math.log(0.5)  # the reference gives every token half the probability
    loss, policy_loss, kl, _, _ = grpo.grpo_loss(old, old, ref, adv, mask, 0.2, 0.1)
    k3 = 0.5 - 1 - math.log(0.5)  # (r - 1) - log r with r = pi_ref / pi = 0.5
    assert kl.item() == pytest.approx(k3) and loss.item() == pytest.approx(policy_loss.item() + 0.1 * k3)


def test_one_update_per_batch_is_reinforce_with_a_group_baseline():
    """With a single update, the ratio is exactly 1 and the clip never acts: the gradient is REINFORCE's,
    -A x grad log pi, averaged per answer."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([0.7, -1.1, 0.4])

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)

    loss, *_ = grpo.grpo_loss(logprobs(), logprobs().detach(), logprobs().detach(), adv, mask, 0.2, 0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    reinforce = (-(adv[:, None] * logprobs() * mask).sum(1) / mask.sum(1)).mean()
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert torch.allclose(grad, expected, atol=1e-6)


# --- The whole loop on tiny checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    base = get_tokenizer()
    tokenizer = chat_tokenizer(base)
    torch.manual_seed(0)
    policy = GPT(tiny_config(base.vocab_size))
    policy.resize_token_embeddings(tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("sft") / "sft.pt"
    torch.save({"model": policy.state_dict(), "model_config": asdict(policy.config),
                "tokenizer": tokenizer.to_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_sft):
    out_dir = tmp_path_factory.mktemp("grpo") / "run"
    results = grpo.main(["--init_from", tiny_sft, "--reward_model", "no/such/file.pt", "--out_dir", str(out_dir),
                         "--tasks", "date", "--rollout_size", "8", "--group_size", "4", "--minibatch_size", "4",
                         "--ppo_epochs", "2", "--max_new_tokens", "6", "--max_iters", "3", "--eval_interval", "2",
                         "--probe_n", "2", "--eval_n", "3", "--eval_samples", "2", "--eval_other_n", "1",
                         "--learning_rate", "1e-3", "--early_stop_kl", "0", "--unfinished_penalty", "0",
                         "--threads", "1"])
    return out_dir, results


def test_tiny_run_updates_logs_and_writes_an_evaluable_checkpoint(tiny_run, tiny_sft):
    out_dir, results = tiny_run
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "score" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    assert all(r["minibatch_steps"] == 4 for r in steps)
    assert max(r["logprob_mismatch"] for r in steps) < 1e-4  # the sampled log-probs, recomputed
    for key in ("score", "kl", "zero_variance_fraction", "entropy", "clip_fraction", "approx_kl", "kl_term",
                "grad_norm", "response_length", "tokens_per_sec"):
        assert all(r.get(key) is not None for r in steps), key
    # a random tiny model never answers a date right: every group is flat, and nothing but the KL term moves
    assert all(r["zero_variance_fraction"] == 1.0 for r in steps) and all(r["score"] == 0 for r in steps)
    assert results["zero_variance_fraction_mean"] == 1.0
    assert set(results["eval_after"]["date"]) >= {"exact_match", "pass@1", "pass@2"}
    assert set(results["eval_after"]) == {"speaker", "play", "next_line", "add", "sub", "count", "reverse", "sort",
                                          "date"}
    assert results["eval_after"]["count"]["n"] == 1 and results["eval_after"]["date"]["n"] == 3
    for key in ("kl_final", "clip_fraction_mean", "gold_before", "gold_after", "tokens_per_sec", "peak_memory_mb",
                "trainable_params"):
        assert key in results
    json.loads((out_dir / "results.json").read_text(), parse_constant=pytest.fail)  # valid JSON: no NaN
    for name in ("grpo.png", "heldout.png", "accuracy.png", "loss.png"):
        assert (out_dir / name).is_file()
    policy, _, _ = load_policy(out_dir / "ckpt.pt")  # part 6's eval.py loads it
    assert policy.config == load_policy(tiny_sft)[0].config


def test_groups_that_differ_move_the_policy(tiny_sft, tmp_path, monkeypatch):
    """With a reward that varies within groups, the ratio leaves 1 after the first minibatch step."""
    monkeypatch.setattr(grpo, "verify", lambda ex, response: float(len(response) % 2))
    out_dir = tmp_path / "run"
    grpo.main(["--init_from", tiny_sft, "--out_dir", str(out_dir), "--tasks", "date", "--rollout_size", "8",
               "--group_size", "4", "--minibatch_size", "4", "--ppo_epochs", "2", "--max_new_tokens", "6",
               "--max_iters", "2", "--eval_interval", "2", "--probe_n", "1", "--eval_n", "1", "--eval_samples", "0",
               "--eval_other_n", "0", "--learning_rate", "1e-3", "--early_stop_kl", "0", "--threads", "1"])
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "score" in r]
    assert min(r["zero_variance_fraction"] for r in steps) < 1
    assert all(r["approx_kl"] > 1e-6 for r in steps)


def sft_loss_on_other_tasks(ckpt: str, n: int = 64) -> float:
    """Part 6's loss (answer tokens only) of a checkpoint on the first n training examples of the tasks that
    are not 'date', computed here with part 6's own template, apart from the training loop."""
    from part06_sft.template import collate, encode_example
    from shared.tasks import TASKS, get_examples
    policy, tokenizer, _ = load_policy(ckpt)
    examples = [ex for t in TASKS if t != "date" for ex in get_examples("train", t)[: n // 8]]
    x, y = collate([encode_example(tokenizer, ex.prompt, ex.gold) for ex in examples], tokenizer.eot_token)
    with torch.no_grad():
        return policy(x, y)[1].item()


@pytest.mark.parametrize("ptx_coef", [0.0, 1.0])
def test_ptx_loss_trains_the_other_tasks_and_nothing_else_moves_without_it(tiny_sft, tmp_path, ptx_coef):
    """All groups are flat (a random model never answers a date) and beta = 0, so the RL loss has no gradient:
    without ptx the policy stays exactly the SFT model; with ptx its supervised loss on the other tasks falls."""
    out_dir = tmp_path / "run"
    grpo.main(["--init_from", tiny_sft, "--out_dir", str(out_dir), "--tasks", "date", "--rollout_size", "8",
               "--group_size", "4", "--minibatch_size", "4", "--ppo_epochs", "2", "--max_new_tokens", "4",
               "--max_iters", "3", "--eval_interval", "3", "--probe_n", "1", "--eval_n", "1", "--eval_samples", "0",
               "--eval_other_n", "0", "--learning_rate", "3e-3", "--kl_coef", "0", "--early_stop_kl", "0",
               "--unfinished_penalty", "0", "--ptx_coef", str(ptx_coef), "--ptx_batch_size", "16", "--threads", "1"])
    steps = [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "score" in r]
    assert all(r["zero_variance_fraction"] == 1.0 for r in steps)
    before, after = sft_loss_on_other_tasks(tiny_sft), sft_loss_on_other_tasks(str(out_dir / "ckpt.pt"))
    if ptx_coef == 0:
        assert all(r["ptx_loss"] == 0 for r in steps)
        assert after == before
    else:
        assert all(r["ptx_loss"] > 1 for r in steps)  # a random model's loss: about ln(vocab)
        assert after < before - 0.1, (before, after)


def test_bad_input(tmp_path, monkeypatch, capsys, tiny_sft):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python part06_sft/train.py"):
        grpo.main(["--out_dir", "grpo"])
    with pytest.raises(FileNotFoundError, match="python part07_reward/train.py"):
        grpo.main(["--init_from", tiny_sft, "--reward", "verifier+reward_model", "--out_dir", "grpo"])
    assert not (tmp_path / "grpo").exists()
    with pytest.raises(SystemExit):
        grpo.main(["--rollout_size", "10", "--group_size", "4", "--minibatch_size", "5"])
    assert "--rollout_size 10 is not a multiple of --group_size 4" in capsys.readouterr().err
