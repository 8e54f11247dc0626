"""Part 9, DPO: sequence log-probabilities, the DPO loss, its gradient, the sampled KL and a tiny run."""
import copy
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from part04_scaling.bpe import get_tokenizer
from part06_sft import eval as sft_eval
from part06_sft.model import GPT, GPTConfig
from part06_sft.template import chat_tokenizer, encode_prompt
from part07_reward.train import Pair
from part09_grpo import dpo
from shared.tasks import Example

REPO = Path(__file__).resolve().parents[1]


def tiny_model(vocab_size, seed=0, block_size=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(get_tokenizer())


def _reference_logprob(model, ids: list[int], n_response: int) -> float:
    """log p of the last n_response tokens given the ones before, one unpadded sequence, token by token."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_response, len(ids)))


# --- sequence_logprobs --------------------------------------------------------------------------------------


def test_sequence_logprobs_is_the_sum_over_response_tokens_whatever_the_padding():
    model = tiny_model(50).eval()
    torch.manual_seed(1)
    rows = [(torch.randint(0, 50, (n,)).tolist(), k) for n, k in ((9, 3), (4, 1), (12, 7), (6, 2))]
    expected = torch.tensor([_reference_logprob(model, ids, k) for ids, k in rows], dtype=torch.float64)
    ids, padding_mask, response_mask = dpo.answer_batch(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        got = dpo.sequence_logprobs(model, ids, padding_mask, response_mask)
        assert torch.allclose(got.double(), expected, atol=1e-4)
        # another padding id: the same numbers
        assert torch.allclose(dpo.sequence_logprobs(model, ids.masked_fill(~padding_mask, 31), padding_mask,
                                                    response_mask), got, atol=1e-5)
        # left padding (with its mask): the same numbers too
        T = ids.size(1)
        left = torch.stack([torch.cat((torch.full((T - len(s),), 7), torch.tensor(s))) for s, _ in rows])
        left_pad = torch.stack([torch.arange(T) >= T - len(s) for s, _ in rows])
        left_resp = torch.stack([torch.arange(T) >= T - k for _, k in rows])
        assert torch.allclose(dpo.sequence_logprobs(model, left, left_pad, left_resp), got, atol=1e-4)
        # the prompt is excluded: summing over every predicted token gives other numbers
        everything = padding_mask.clone()
        everything[:, 0] = False
        assert (dpo.sequence_logprobs(model, ids, padding_mask, everything) < got - 1e-3).all()


def test_response_mask_covers_the_answer_and_its_end_token(tokenizer):
    prompt, response = "Reverse this list:\nrose, wind, sea", "sea, wind, rose\n"
    encoded = dpo.encode_answer(tokenizer, prompt, response, block_size=128)
    ids, padding_mask, response_mask = dpo.answer_batch([encoded, ([5, 6, 7], 1)], tokenizer.eot_token, "cpu")
    row = ids[0][response_mask[0]].tolist()
    assert tokenizer.decode(row) == "sea, wind, rose<|end|>"  # cleaned as part 7 cleans it, then <|end|>
    assert tokenizer.decode(ids[0][padding_mask[0] & ~response_mask[0]].tolist()) == \
        "<|user|>Reverse this list:\nrose, wind, sea<|assistant|>"
    assert response_mask[1].tolist() == [False, False, True] + [False] * (ids.size(1) - 3)


# --- dpo_loss --------------------------------------------------------------------------------------------------


def test_dpo_loss_by_hand():
    pi_c, pi_r = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-3.0, -5.0, -40.0])
    ref_c, ref_r = torch.tensor([-2.0, -5.0, -2.0]), torch.tensor([-2.0, -4.0, -2.0])
    beta = 0.5
    # margins: 0.5 * ((1) - (-1)) = 1, 0.5 * ((0) - (-1)) = 0.5, 0.5 * (0 - (-38)) = 19; -log sigmoid(m) = log(1 + e^-m)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-19.0))) / 3
    loss, r_c, r_r = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert r_c.tolist() == [0.5, 0.0, 0.0] and r_r.tolist() == [-0.5, -0.5, -19.0]
    # a hugely wrong ranking stays finite: log(1 + e^200) = 200 (+ a tiny bit)
    zero = torch.tensor([0.0])
    huge, _, _ = dpo.dpo_loss(torch.tensor([-500.0]), zero, zero, zero, 0.4)
    assert huge.item() == pytest.approx(200.0, rel=1e-6)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logp = torch.tensor([-3.0, -7.5, -0.2])
    other = torch.tensor([-1.0, -9.0, -4.0])
    for beta in (0.1, 1.0, 5.0):
        loss, r_c, r_r = dpo.dpo_loss(logp, other, logp.clone(), other.clone(), beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert not r_c.any() and not r_r.any()


def test_one_step_raises_the_chosen_and_lowers_the_rejected(tokenizer):
    policy = tiny_model(tokenizer.vocab_size, seed=3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    pair = Pair("add", "What is 2 + 2?", "4", "The answer is five", "off_format", 1.0)
    encoded = dpo.encode_pairs(tokenizer, [pair], policy.config.block_size)

    def logps(model):
        with torch.no_grad():
            return dpo.pair_logprobs(model, encoded, tokenizer.eot_token, "cpu")

    (c0,), (r0,) = logps(policy)
    ref_c, ref_r = logps(reference)
    pi_c, pi_r = dpo.pair_logprobs(policy, encoded, tokenizer.eot_token, "cpu")
    loss, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    (c1,), (r1,) = logps(policy)
    assert c1 > c0 + 1e-3, f"log pi(chosen) went from {c0:.4f} to {c1:.4f}"
    assert r1 < r0 - 1e-3, f"log pi(rejected) went from {r0:.4f} to {r1:.4f}"
    # and the reference never moves
    assert logps(reference) == (ref_c, ref_r)


# --- The KL to the reference -----------------------------------------------------------------------------------


def test_sampled_kl_is_zero_for_the_reference_and_matches_the_exact_kl(tokenizer):
    policy = tiny_model(tokenizer.vocab_size, seed=0).eval()
    assert dpo.sampled_kl(policy, copy.deepcopy(policy), tokenizer, [Example("add", "What is 1 + 1?", "2")] * 8, 4,
                          "cpu") == pytest.approx(0.0, abs=1e-5)
    # one-token answers: the exact KL is a sum over the vocabulary at the prompt's last position
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        policy.wte.weight.mul_(40.0)  # a sharper policy, far enough from the reference for a KL around 1
    example = Example("add", "What is 1 + 1?", "2")
    prompt = torch.tensor([encode_prompt(tokenizer, example.prompt)])
    with torch.no_grad():
        logp = F.log_softmax(policy(prompt)[0][0, -1].double(), dim=-1)
        logq = F.log_softmax(reference(prompt)[0][0, -1].double(), dim=-1)
    exact = (logp.exp() * (logp - logq)).sum().item()
    spread = (logp.exp() * (logp - logq - exact) ** 2).sum().sqrt().item()
    n = 1000
    torch.manual_seed(0)
    estimate = dpo.sampled_kl(policy, reference, tokenizer, [example] * n, 1, "cpu", batch_size=500)
    assert 0.3 < exact and abs(estimate - exact) < 4 * spread / math.sqrt(n), (estimate, exact)


# --- The script: a tiny run from a tiny SFT-style checkpoint ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory, tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("sft") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tokenizer.to_dict()},
               path)
    return str(path)


def tiny_flags(out_dir, init_from, *extra):
    return ["--init_from", init_from, "--out_dir", str(out_dir), "--max_iters", "8", "--eval_interval", "4",
            "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "2", "--min_lr", "1e-3", "--beta", "0.5",
            "--onpolicy_prompts", "3", "--val_pairs", "4", "--eval_n", "2", "--eval_pairs", "3", "--kl_prompts", "2",
            "--max_new_tokens", "8", "--threads", "1", *extra]


def test_tiny_run_learns_and_writes_a_checkpoint_part6_loads(tmp_path, tiny_sft, capsys):
    out_dir = tmp_path / "dpo"
    results = dpo.main(tiny_flags(out_dir, tiny_sft))
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 4, 8]
    assert records[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every margin 0
    assert records[-1]["val_loss"] < math.log(2) - 0.01 and records[-1]["reward_margin"] > 0
    for r in records:  # the curve's loss is the DPO loss of its margin's pairs: it cannot be below -log sigmoid(mean)
        assert r["val_loss"] >= -math.log(1 / (1 + math.exp(-r["reward_margin"]))) - 1e-6
    assert (out_dir / "loss.png").stat().st_size > 0
    saved = json.loads((out_dir / "results.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert saved == results
    for key in ("gold_before", "gold_after", "mean_exact_before", "mean_exact_after", "pairwise_accuracy",
                "kl_to_ref", "train_seconds", "seconds", "config"):
        assert key in results, key
    assert set(results["gold_after"]) == set(results["gold_before"]) and len(results["gold_after"]) == 9
    assert results["mean_exact_after"] == pytest.approx(
        sum(r["exact_match"] for r in results["gold_after"].values()) / 9, abs=1e-4)
    assert results["pairwise_n"] == 27 and results["config"]["beta"] == 0.5
    recount = sum(v["accuracy"] * v["n"] for v in results["pairwise_by_failure_mode"].values()) / 27
    assert results["pairwise_accuracy"] == pytest.approx(recount, abs=1e-3)

    # the checkpoint: part 6's format, the trained policy (not the reference), loadable by part 6's eval.py
    ckpt = str(out_dir / "ckpt.pt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["sft_ckpt"] == tiny_sft and checkpoint["iter_num"] == 8
    assert checkpoint["train_config"]["max_iters"] == 8
    model, _, _ = sft_eval.load_policy(ckpt)
    sft, _, _ = sft_eval.load_policy(tiny_sft)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))
    capsys.readouterr()
    printed = sft_eval.main(["--ckpt", ckpt, "--n", "2", "--max_new_tokens", "8"])
    assert printed == results["gold_after"]  # eval.py on the saved file recounts the run's "after"
    assert json.loads(capsys.readouterr().out) == printed


def test_missing_init_from_names_the_command(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no SFT model at runs/part06_sft/ckpt.pt: .*part06_sft/train.py"):
        dpo.main(["--out_dir", "dpo"])
    with pytest.raises(FileNotFoundError, match="no SFT model at other.pt: .*python part06_sft/train.py"):
        dpo.main(["--out_dir", "dpo", "--init_from", "other.pt"])
    assert not (tmp_path / "dpo").exists()
    # from the command line: one line, exit status 1
    done = subprocess.run([sys.executable, str(REPO / "part09_grpo" / "dpo.py"), "--init_from", "other.pt",
                           "--out_dir", "dpo"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith("error: no SFT model at other.pt")
    assert len(done.stderr.strip().splitlines()) == 1
    # a base model (no chat tokens) is refused too
    base = get_tokenizer()
    model = tiny_model(base.vocab_size)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": base.to_dict()},
               tmp_path / "base.pt")
    with pytest.raises(ValueError, match="no chat tokens"):
        dpo.main(["--init_from", str(tmp_path / "base.pt"), "--out_dir", str(tmp_path / "dpo2")])
