"""Part 7: the reward model (last-token head, padding invariance), its losses, score.py and a tiny run."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from part04_scaling.bpe import get_tokenizer
from part06_sft.template import chat_tokenizer
from part07_reward import score as rm_score
from part07_reward import train as rm_train
from part07_reward.model import GPT, GPTConfig, RewardModel, last_token_index


def tiny_config(vocab_size=60, block_size=128):
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def test_last_token_index_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert last_token_index(right).tolist() == [2, 4, 0]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(left).tolist() == [4, 4]


def test_hidden_states_are_what_the_lm_head_reads():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 60, (2, 9))
    logits, _ = model(idx)
    assert torch.allclose(model.lm_head(model.hidden_states(idx)), logits)


def test_padding_and_its_side_never_change_the_score():
    torch.manual_seed(0)
    model = RewardModel(tiny_config()).eval()
    torch.nn.init.normal_(model.head.weight)  # a trained-looking head (the real one starts at zero)
    sequences = [torch.randint(1, 60, (n,)).tolist() for n in (7, 3, 5)]
    alone = torch.stack([model(torch.tensor([s]))[0] for s in sequences])
    right_ids, right_mask = rm_score.right_pad(sequences, pad_id=0)
    T = right_ids.size(1)
    left_ids = torch.stack([torch.cat((torch.full((T - len(s),), 59), torch.tensor(s))) for s in sequences])
    left_mask = torch.stack([torch.arange(T) >= T - len(s) for s in sequences])
    assert torch.allclose(model(right_ids, right_mask), alone, atol=1e-5)
    assert torch.allclose(model(left_ids, left_mask), alone, atol=1e-5)
    # other padding ids: the same scores
    assert torch.allclose(model(right_ids.masked_fill(~right_mask, 17), right_mask), alone, atol=1e-5)
    # reading the last column instead of the last real token would be wrong for the right-padded rows
    hidden = model.backbone.hidden_states(right_ids, padding_mask=right_mask)
    assert not torch.allclose(model.head(hidden[:, -1]).squeeze(-1), alone, atol=1e-3)


def test_a_new_reward_model_scores_zero_and_costs_log_2():
    model = RewardModel(tiny_config())
    ids = torch.randint(0, 60, (4, 6))
    rewards = model(ids)
    assert torch.equal(rewards, torch.zeros(4))
    assert rm_train.bradley_terry_loss(rewards[:2], rewards[2:]).item() == pytest.approx(math.log(2))


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([1.0, 0.0, -200.0]), torch.tensor([0.0, 0.0, 0.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + 200.0) / 3  # -log sigmoid(d) = log(1 + e^-d)
    assert rm_train.bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, rel=1e-6)  # finite at -200


def test_margin_ranking_loss_matches_pytorch():
    r_c, r_r = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0, 0.0, 0.0])
    for margin in (0.0, 1.0):
        expected = F.margin_ranking_loss(r_c, r_r, torch.ones(3), margin=margin)
        assert rm_train.margin_ranking_loss(r_c, r_r, margin).item() == pytest.approx(expected.item())
    per_pair = torch.tensor([3.0, 0.0, 0.5])  # max(0, 3 - 2) + max(0, 0 - 0.5) + max(0, 0.5 + 1), over 3
    assert rm_train.margin_ranking_loss(r_c, r_r, per_pair).item() == pytest.approx((1 + 0 + 1.5) / 3)


def test_calibration_and_pearson():
    # margins of 0 predict 0.5: the observed rate is the share of pairs left in order, close to 0.5
    bins, ece = rm_train.calibration(torch.zeros(4000))
    assert len(bins) == 1 and bins[0][0] == pytest.approx(0.5) and ece < 0.03
    # huge margins predict 0 or 1, and are right: perfectly calibrated
    bins, ece = rm_train.calibration(torch.full((1000,), 50.0))
    assert ece == pytest.approx(0.0, abs=1e-6) and {round(b[0]) for b in bins} == {0, 1}
    # huge margins on pairs ranked the wrong way: maximally miscalibrated
    assert rm_train.calibration(torch.full((1000,), -50.0))[1] == pytest.approx(1.0, abs=1e-6)
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.1, 5.9, 8.2])
    import numpy as np
    assert rm_train.pearson(x, y) == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1])
    centred = rm_train.within_group(torch.tensor([1.0, 3.0, 10.0, 20.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert centred.tolist() == [-1.0, 1.0, -5.0, 5.0]


# --- The chain: a tiny SFT checkpoint, a tiny reward model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    base = get_tokenizer()
    tokenizer = chat_tokenizer(base)
    torch.manual_seed(0)
    model = GPT(tiny_config(base.vocab_size))
    model.resize_token_embeddings(tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("sft") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tokenizer.to_dict()},
               path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_sft):
    out_dir = tmp_path_factory.mktemp("rm") / "run"
    results = rm_train.main(["--init_from", tiny_sft, "--out_dir", str(out_dir), "--max_iters", "40",
                             "--eval_interval", "20", "--batch_size", "16", "--onpolicy_prompts", "3",
                             "--onpolicy_heldout", "2", "--eval_pairs", "8", "--learning_rate", "1e-3",
                             "--threads", "1"])
    return out_dir, results


def test_tiny_run_learns_and_writes_a_normalised_reward_model(tiny_run):
    out_dir, results = tiny_run
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 20, 40]
    assert records[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head: a coin flip
    # it learned something in 40 steps (an untrained head stays at log 2 and accuracy 0: every pair a tie)
    assert records[-1]["val_loss"] < math.log(2) - 0.01 and records[-1]["val_accuracy"] > 0.55
    json.loads((out_dir / "results.json").read_text(), parse_constant=pytest.fail)  # valid JSON: no NaN
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["kind"] == "reward_model" and checkpoint["reward_std"] > 0
    for name in ("loss.png", "scores.png", "calibration.png", "results.json"):
        assert (out_dir / name).is_file()
    modes = set(results["by_failure_mode"])
    assert modes == {"wrong_answer", "truncated", "repeated", "off_format", "off_topic"}
    assert sum(v["n"] for v in results["by_failure_mode"].values()) == results["n"] == 4500
    # the held-out accuracy is a recount of the per-mode accuracies
    recount = sum(v["accuracy"] * v["n"] for v in results["by_failure_mode"].values()) / results["n"]
    assert results["heldout_accuracy"] == pytest.approx(recount, abs=1e-3)


def test_score_py_on_pairs_and_single_responses(tiny_run, tmp_path, capsys):
    out_dir, _ = tiny_run
    ckpt = str(out_dir / "ckpt.pt")
    pairs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
             {"prompt": "Write 1 May 1600 as YYYY-MM-DD.", "chosen": "1600-05-01", "rejected": "1600"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    rows = rm_score.main(["--ckpt", ckpt, "--input", str(tmp_path / "pairs.jsonl")])
    captured = capsys.readouterr()
    printed = [json.loads(line) for line in captured.out.splitlines()]
    assert printed == rows and all({"score_chosen", "score_rejected"} <= set(r) for r in rows)
    wins = sum(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert f"pairwise accuracy {wins / 2:.4f} on 2 pairs" in captured.err
    # single responses; trailing whitespace and the way generation stopped do not change a score
    singles = [{"prompt": "What is 2 + 2?", "response": r} for r in ("4", "4  ", "4<|end|>", "4\n", "5")]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in singles))
    scores = [r["score"] for r in rm_score.main(["--ckpt", ckpt, "--input", str(tmp_path / "one.jsonl"), "--raw"])]
    assert scores[0] == scores[1] == scores[2] == scores[3]
    model, tokenizer, checkpoint = rm_score.load_reward_model(ckpt)
    raw = rm_score.score_responses(model, tokenizer, ["What is 2 + 2?"], ["4"])
    assert scores[0] == pytest.approx(raw.item(), abs=1e-4)
    normalised = rm_score.main(["--ckpt", ckpt, "--input", str(tmp_path / "one.jsonl")])[0]["score"]
    assert normalised == pytest.approx((raw.item() - checkpoint["reward_mean"]) / checkpoint["reward_std"], abs=1e-3)


def test_score_py_errors(tiny_run, tiny_sft, tmp_path):
    out_dir, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="python part07_reward/train.py"):
        rm_score.load_reward_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a reward model"):
        rm_score.load_reward_model(tiny_sft)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a row needs"):
        rm_score.main(["--ckpt", str(out_dir / "ckpt.pt"), "--input", str(tmp_path / "bad.jsonl")])


def test_missing_sft_checkpoint_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python part06_sft/train.py"):
        rm_train.main(["--out_dir", "rm"])
    assert not (tmp_path / "rm").exists()


def test_a_base_model_is_refused(tmp_path):
    base = get_tokenizer()
    model = GPT(tiny_config(base.vocab_size))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": base.to_dict()},
               tmp_path / "base.pt")
    with pytest.raises(ValueError, match="no chat tokens"):
        rm_train.main(["--init_from", str(tmp_path / "base.pt"), "--out_dir", str(tmp_path / "rm")])
