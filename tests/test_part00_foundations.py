"""Part 0: the bigram and MLP byte models, the training loop and its flags, env_check, the notebook."""
import json
import math

import pytest
import torch

from part00_foundations import env_check, train
from part00_foundations.model import BigramLM, MLPLM, ModelConfig
from shared.metrics import read_metrics
from tests.notebooks import run_notebook

LN_256 = math.log(256)  # the loss of a uniform guess over 256 bytes
VERSE = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
         "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n")
TINY = ["--batch_size", "8", "--block_size", "16", "--n_embd", "8", "--n_hidden", "32",
        "--eval_interval", "10", "--eval_iters", "2", "--max_new_tokens", "20"]


@pytest.fixture(scope="module")
def verse_file(tmp_path_factory):
    """A small corpus: the same four lines 40 times (about 7 KB), so val looks like train."""
    path = tmp_path_factory.mktemp("data") / "verse.txt"
    path.write_text(VERSE * 40)
    return path


def train_tiny(out_dir, data, *flags):
    return train.main(["--data", str(data), "--out_dir", str(out_dir), *TINY, *flags])


def models():
    torch.manual_seed(0)
    config = ModelConfig(context=3, n_embd=8, n_hidden=32)
    return [BigramLM(config), MLPLM(config)]


# --- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", models(), ids=["bigram", "mlp"])
def test_forward_shapes(model):
    idx = torch.randint(256, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 10, 256) and loss is None
    logits, loss = model(idx, targets=torch.randint(256, (2, 10)))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_loss_at_init_is_uniform_guess():
    # The bigram table starts at zero: exactly uniform, so the loss is ln 256 (to float32 rounding).
    # The MLP's output layer starts small (std 0.01): nearly uniform, within 0.05 of ln 256.
    bigram, mlp = models()
    idx, targets = torch.randint(256, (4, 32)), torch.randint(256, (4, 32))
    assert bigram(idx, targets)[1].item() == pytest.approx(LN_256, abs=1e-5)
    assert mlp(idx, targets)[1].item() == pytest.approx(LN_256, abs=0.05)


def test_mlp_sees_exactly_its_context():
    _, mlp = models()  # context 3
    x = torch.randint(256, (2, 12))
    logits, _ = mlp(x)
    for t in range(2, 12):  # position t depends on x[t-2], x[t-1], x[t] only
        alone, _ = mlp(x[:, t - 2 : t + 1])
        torch.testing.assert_close(logits[:, t], alone[:, -1], rtol=1e-5, atol=1e-6)
    changed = x.clone()
    changed[:, 5] = (x[:, 5] + 1) % 256
    differs = (mlp(changed)[0] - logits).abs().amax(dim=(0, 2)) > 0
    assert differs.tolist() == [t in (5, 6, 7) for t in range(12)], "byte 5 must affect positions 5, 6, 7 only"


@pytest.mark.parametrize("model", models(), ids=["bigram", "mlp"])
def test_generate(model):
    prompt = torch.randint(256, (2, 5))
    out = model.generate(prompt, max_new_tokens=7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    assert out.min() >= 0 and out.max() < 256
    greedy = model.generate(prompt, max_new_tokens=1, temperature=0)
    assert torch.equal(greedy[:, -1], model(prompt)[0][:, -1].argmax(-1))


# --- the training loop --------------------------------------------------------------------------


@pytest.mark.parametrize("model, lr, iters, below", [("bigram", "0.1", 50, 2.0), ("mlp", "3e-2", 60, 1.0)])
def test_training_learns_and_logs(tmp_path, verse_file, model, lr, iters, below):
    # On the repeated verse the bigram reaches ~1.56 nats in 50 steps (it only knows the previous
    # byte); the MLP, which sees 4 bytes, ~0.48 in 60 steps. Both start at ln 256 = 5.55.
    result = train_tiny(tmp_path, verse_file, "--model", model, "--learning_rate", lr, "--max_iters", str(iters))
    assert result["val_loss"] < below, f"{model}: val loss {result['val_loss']:.3f} after {iters} iters"
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records] == list(range(0, iters + 1, 10))
    assert records[0]["val_loss"] == pytest.approx(LN_256, abs=0.05)  # untrained
    for key in ("train_loss", "val_loss", "lr", "tokens_per_sec"):
        assert key in records[-1] and records[-1][key] is not None, key
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["sample"]) > 0


def test_same_seed_same_run(tmp_path, verse_file):
    a = train_tiny(tmp_path / "a", verse_file, "--max_iters", "10")
    b = train_tiny(tmp_path / "b", verse_file, "--max_iters", "10")
    assert a["val_loss"] == b["val_loss"] and a["sample"] == b["sample"]


def test_profile_prints_table_and_writes_trace(tmp_path, verse_file, capsys):
    train_tiny(tmp_path, verse_file, "--profile", "--max_iters", "6")
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out, "the profiler table of ops"
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer_step"} <= names, "the record_function labels in the trace"


def test_profile_needs_enough_steps(tmp_path, verse_file):
    with pytest.raises(ValueError, match="--max_iters"):
        train_tiny(tmp_path, verse_file, "--profile", "--max_iters", "3")


def test_bfloat16_autocast_on_cpu(tmp_path, verse_file):
    result = train_tiny(tmp_path, verse_file, "--dtype", "bfloat16", "--device", "cpu", "--max_iters", "20",
                        "--learning_rate", "3e-2")
    assert result["val_loss"] < LN_256 - 1.0, f"bf16 run did not learn: val loss {result['val_loss']:.3f}"
    assert result["peak_memory_mb"] > 0


def test_too_short_data_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few bytes")
    with pytest.raises(ValueError, match="block_size"):
        train_tiny(tmp_path, path)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--profile", "--dtype", "--max_iters", "--data", "--out_dir"):
        assert flag in out, flag


# --- env_check and the notebook -----------------------------------------------------------------


def test_env_check(capsys):
    result = env_check.main(["--size", "64", "--min_seconds", "0.01", "--device", "cpu"])
    out = capsys.readouterr().out
    assert result["torch"] == torch.__version__ and torch.__version__ in out
    assert "cpu" in result["devices"] and result["float32_gflops"] > 0
    assert "autocast on cpu" in out and "GFLOP/s" in out
    assert env_check.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == (19.5, 312.0)
    assert env_check.gpu_peak_tflops("NVIDIA H100 PCIe")[1] == 756.0  # not the SXM number
    assert env_check.gpu_peak_tflops("Some Future GPU") is None


def test_notebook_runs():
    run_notebook("part00_foundations/notebook.ipynb")
