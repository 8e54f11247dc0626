"""Part 4: gradient accumulation, LR schedules, clipping, exact resume, mixed precision, logging and DDP."""
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from part04_scaling import generate, train
from part04_scaling.model import GPT, GPTConfig
from shared.metrics import read_metrics
from tests.texts import write_verse

REPO = Path(__file__).resolve().parents[1]


def tiny_run_flags(tmp_path, *extra) -> list[str]:
    data = write_verse(tmp_path, 60)
    return ["--data", str(data), "--vocab_size", "320", "--out_dir", str(tmp_path / "run"), "--n_layer", "2",
            "--n_head", "2", "--n_kv_head", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
            "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_iters", "5", "--eval_interval", "10",
            "--eval_iters", "2", "--max_new_tokens", "10", "--device", "cpu", *extra]


# Gradient accumulation and clipping are written inline in train(): tests/test_part04_run_safety.py
# checks them end to end (2 micro-batches of 4 take the steps of one batch of 8; the optimizer sees
# the clipped gradient).


# --- Learning-rate schedules -------------------------------------------------------------------


def schedule(kind: str, **changes) -> train.TrainConfig:
    return train.TrainConfig(lr_schedule=kind, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110,
                             **changes)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_warmup_rises_linearly_to_the_peak(kind):
    cfg = schedule(kind)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak: step 0 already moves
    assert train.lr_at(4, cfg) == pytest.approx(0.5)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, cfg) == pytest.approx(1.0)  # the decay starts from the peak


@pytest.mark.parametrize("kind,at_60", [("cosine", 0.55), ("linear", 0.55), ("wsd", 1.0)])
def test_decays_end_at_min_lr_with_the_right_shape(kind, at_60):
    cfg = schedule(kind)
    assert train.lr_at(60, cfg) == pytest.approx(at_60)  # halfway through the decay (cosine: its midpoint too)
    assert train.lr_at(110, cfg) == pytest.approx(0.1) and train.lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [train.lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after the warmup


def test_cosine_quarter_points_and_wsd_decay_window():
    cfg = schedule("cosine")
    assert train.lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    wsd = schedule("wsd", wsd_decay_fraction=0.2)  # decays over the last 22 of 110 steps
    assert train.lr_at(88, wsd) == pytest.approx(1.0) and train.lr_at(99, wsd) == pytest.approx(0.55)
    assert train.lr_at(200, schedule("constant")) == 1.0
    assert train.lr_at(60, schedule("cosine", lr_decay_iters=60)) == pytest.approx(0.1)  # lr_decay_iters is used


# --- Training, checkpoints, exact resume ---------------------------------------------------------


def final_state(tmp_path) -> dict:
    return torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)


def test_training_learns_logs_and_saves_everything_needed(tmp_path):
    results = train.main(tiny_run_flags(tmp_path, "--max_iters", "60", "--grad_accum_steps", "2"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 2  # untrained: ln 320 = 5.8 nats
    for r in records[1:]:  # a validation split, a finite gradient norm and the loss of the whole step
        assert {"val_loss", "val_bits_per_byte", "step_loss", "lr", "tokens_per_sec"} <= set(r)
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and math.isfinite(r["step_loss"])
    checkpoint = final_state(tmp_path)
    assert checkpoint["iter_num"] == 60 and checkpoint["optimizer"]["state"]  # the Adam moments are in
    assert set(checkpoint["rng"]) == {"torch", "cuda", "batches"} and len(checkpoint["rng"]["torch"]) == 1
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0 and (run / "tokenizer.json").is_file() and not list(run.glob("*.tmp"))
    result = generate.main(["--out_dir", str(run), "--start", "ROMEO:", "--max_new_tokens", "20", "--device", "cpu"])
    assert result["text"].startswith("ROMEO:")


@pytest.mark.parametrize("extra", [[], ["--grad_accum_steps", "2", "--dropout", "0.1", "--lr_schedule", "wsd"]])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extra):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train.main(tiny_run_flags(straight, "--max_iters", "40", *extra))
    # The first half stops at step 20 but keeps the 40-step schedule, as an interrupted 40-step run would.
    train.main(tiny_run_flags(halves, "--max_iters", "20", "--lr_decay_iters", "40", *extra))
    train.main(tiny_run_flags(halves, "--max_iters", "40", "--lr_decay_iters", "40", "--init_from", "resume", *extra))
    a, b = final_state(straight), final_state(halves)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    records_a = read_metrics(straight / "run" / "metrics.jsonl")
    records_b = read_metrics(halves / "run" / "metrics.jsonl")
    assert [r["iter"] for r in records_b] == [r["iter"] for r in records_a]  # no step logged twice
    assert [r["lr"] for r in records_b] == [r["lr"] for r in records_a]  # the schedule did not restart
    assert records_b[-1]["val_loss"] == records_a[-1]["val_loss"]


def test_resume_refuses_a_different_config_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(tiny_run_flags(tmp_path, "--init_from", "resume"))
    train.main(tiny_run_flags(tmp_path, "--max_iters", "10"))
    with pytest.raises(ValueError, match="--n_embd 32 -> 48"):
        train.main(tiny_run_flags(tmp_path, "--max_iters", "20", "--n_embd", "48", "--init_from", "resume"))
    with pytest.raises(ValueError, match="--lr_decay_iters 10"):  # a longer run would silently change the schedule
        train.main(tiny_run_flags(tmp_path, "--max_iters", "20", "--init_from", "resume"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="--learning_rate.*checkpoint"):
        train.main(tiny_run_flags(tmp_path, "--max_iters", "30", "--learning_rate", "1e30", "--grad_clip", "0",
                                  "--warmup_iters", "0"))
    checkpoint = final_state(tmp_path)  # saved at step 0, before the loss blew up
    assert checkpoint["iter_num"] == 0 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_bfloat16_autocast_trains_on_cpu(tmp_path):
    results = train.main(tiny_run_flags(tmp_path, "--max_iters", "20", "--dtype", "bfloat16"))
    assert math.isfinite(results["val_loss"]) and results["val_loss"] < math.log(320)
    with pytest.raises(ValueError, match="float16 is not supported"):
        train.main(tiny_run_flags(tmp_path, "--dtype", "float16"))  # fp16 + GradScaler is for CUDA


def test_tensorboard_logging_or_a_clear_install_hint(tmp_path):
    flags = tiny_run_flags(tmp_path, "--max_iters", "10", "--tensorboard")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            train.main(flags)
    else:
        train.main(flags)
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# --- Distributed data parallel ---------------------------------------------------------------------


def test_ddp_on_two_cpu_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """torchrun with 2 processes x batch 4 takes the same steps as 1 process with batch 8 (gloo all-reduce)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    flags = tiny_run_flags(ddp, "--max_iters", "6", "--eval_interval", "6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "part04_scaling" / "train.py"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2" in done.stdout  # the master reported two processes
    train.main(tiny_run_flags(single, "--max_iters", "6", "--eval_interval", "6", "--batch_size", "8"))
    a, b = final_state(ddp), final_state(single)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    trained = final_state(ddp)["model"]["wte.weight"]
    torch.manual_seed(1337)
    untrained = GPT(GPTConfig(**final_state(ddp)["model_config"])).state_dict()["wte.weight"]
    assert not torch.allclose(trained, untrained, atol=1e-3)  # the runs did train (6 steps moved the weights)


@pytest.mark.parametrize("script", [train, generate])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--device" in out
    if script is train:
        for flag in ("--grad_accum_steps", "--warmup_iters", "--lr_decay_iters", "--min_lr", "--init_from"):
            assert flag in out


def test_config_dataclass_has_no_flag_without_help_for_the_new_knobs():
    fields = {f.name: f for f in dataclasses.fields(train.TrainConfig)}
    for name in ("grad_accum_steps", "warmup_iters", "lr_decay_iters", "min_lr", "init_from", "lr_schedule"):
        assert fields[name].metadata.get("help") or fields[name].metadata.get("choices"), name
