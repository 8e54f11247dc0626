"""Part 4's train.py (and part 5's, its copy) as a careless user meets it: the training step written
inline, honest bits per byte, resume that refuses what it cannot continue exactly, checkpoints that
survive kills, full disks and a second run, and a NaN that never overwrites the last good state."""
import errno
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tiktoken
import torch

from part04_scaling import train
from part04_scaling.bpe import Tokenizer
from shared.checkpoint import atomic_save, lock_run_dir
from shared.metrics import read_metrics, read_steps
from tests.texts import VERSE, write_verse

REPO = Path(__file__).resolve().parents[1]


def flags(run_dir: Path, data: Path, *extra) -> list[str]:
    return ["--data", str(data), "--vocab_size", "320", "--out_dir", str(run_dir), "--n_layer", "2", "--n_head", "2",
            "--n_kv_head", "1", "--n_embd", "32", "--block_size", "16", "--batch_size", "4", "--learning_rate", "3e-3",
            "--min_lr", "3e-4", "--warmup_iters", "5", "--eval_interval", "10", "--eval_iters", "2",
            "--max_new_tokens", "5", "--device", "cpu", *extra]


@pytest.fixture
def verse(tmp_path) -> Path:
    return write_verse(tmp_path, 60)


def ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "ckpt.pt", weights_only=True)


# --- The step written inline: accumulation and clipping ------------------------------------------


def assert_same_steps(run_a: Path, run_b: Path) -> None:
    """Two runs took the same optimizer steps: equal weights and equal logged step losses."""
    a, b = ckpt(run_a)["model"], ckpt(run_b)["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-6, msg=f"{name} differs")
    steps_a, steps_b = read_steps(run_a), read_steps(run_b)
    assert [s["iter"] for s in steps_a] == [s["iter"] for s in steps_b]
    for x, y in zip(steps_a, steps_b):  # the logged loss is the mean over the micro-batches
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)


def test_two_micro_batches_of_4_take_the_same_steps_as_one_batch_of_8(tmp_path, verse):
    """The inline loop divides each micro-batch's loss by grad_accum_steps: the gradient of the mean."""
    train.main(flags(tmp_path / "big", verse, "--max_iters", "5", "--batch_size", "8"))
    train.main(flags(tmp_path / "accum", verse, "--max_iters", "5", "--batch_size", "4", "--grad_accum_steps", "2"))
    assert [s["iter"] for s in read_steps(tmp_path / "big")] == [0, 1, 2, 3, 4]  # one row per optimizer step
    assert_same_steps(tmp_path / "big", tmp_path / "accum")


def test_a_missing_division_by_grad_accum_steps_would_be_caught(tmp_path, verse, monkeypatch):
    """The check above can fail: a loop that forgets to divide (here: the training loss doubled, with two
    micro-batches) sums the micro-batch losses. Adam hardly notices the doubled gradient (it divides by
    the gradient's running RMS), but the logged step loss does."""
    train.main(flags(tmp_path / "big", verse, "--max_iters", "5", "--batch_size", "8"))
    original_forward = train.GPT.forward

    def forward_without_the_division(self, idx, targets=None, **kwargs):
        logits, loss = original_forward(self, idx, targets, **kwargs)
        return logits, loss * 2 if self.training and loss is not None else loss

    monkeypatch.setattr(train.GPT, "forward", forward_without_the_division)
    train.main(flags(tmp_path / "accum", verse, "--max_iters", "5", "--batch_size", "4", "--grad_accum_steps", "2"))
    with pytest.raises(AssertionError):
        assert_same_steps(tmp_path / "big", tmp_path / "accum")


def test_the_optimizer_sees_the_clipped_gradient(tmp_path, verse, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    train.main(flags(tmp_path / "run", verse, "--max_iters", "3", "--grad_clip", "0.01"))
    assert seen and all(norm == pytest.approx(0.01, rel=1e-3) for norm in seen)
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["grad_norm"] is not None]
    assert logged and all(norm > 0.01 for norm in logged)  # the norm before clipping is what we log


# --- Bits per byte -------------------------------------------------------------------------------


def test_bits_per_byte_counts_the_bytes_of_the_validation_tokens(tmp_path):
    """The validation tail here is text the tokenizer never saw (it compresses worse than the corpus
    average), so dividing by the whole text's bytes per token would understate bits per byte."""
    rng = random.Random(0)
    unseen = " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(2, 7))) for _ in range(3000))
    train_text = VERSE * 60
    data = tmp_path / "mixed.txt"
    data.write_text(train_text + unseen[: len(train_text) // 9])
    results = train.main(flags(tmp_path / "run", data, "--max_iters", "10"))
    # independent count: tiktoken encodes the text with the saved tokenizer, the last 10% of the tokens
    # are the validation split, and tiktoken's own decoder counts their bytes
    encoding = Tokenizer.load(tmp_path / "run" / "tokenizer.json").to_tiktoken()
    assert isinstance(encoding, tiktoken.Encoding)
    ids = encoding.encode(data.read_text(), allowed_special="all")
    val_ids = ids[len(ids) - round(len(ids) * 0.1):]
    expected_bytes_per_token = len(encoding.decode_bytes(val_ids)) / len(val_ids)
    assert results["bytes_per_token"] == pytest.approx(expected_bytes_per_token, rel=1e-9)
    whole_text_average = len(data.read_bytes()) / len(ids)
    assert expected_bytes_per_token < 0.8 * whole_text_average  # the case the old computation got wrong
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["val_bits_per_byte"] == pytest.approx(record["val_loss"] / math.log(2) / expected_bytes_per_token)


# --- Resume -------------------------------------------------------------------------------------------


def test_the_checkpoint_is_read_onto_the_cpu_whatever_the_device(tmp_path, verse, monkeypatch):
    """On CUDA, map_location=device put the saved random-number states on the GPU, and torch.set_rng_state
    refused them. Stand-in for a GPU here: a torch.load that puts every tensor on the meta device unless it
    is asked for the CPU. The resume must still work, so load_checkpoint must ask for the CPU."""
    train.main(flags(tmp_path / "run", verse, "--max_iters", "10", "--lr_decay_iters", "20"))
    cfg = train.TrainConfig(**{**ckpt(tmp_path / "run")["train_config"], "init_from": "resume"})
    real_load, asked = torch.load, []

    def load_as_if_the_run_were_on_a_gpu(f, map_location=None, **kwargs):
        asked.append(map_location)
        return real_load(f, map_location="cpu" if map_location in ("cpu", torch.device("cpu")) else "meta", **kwargs)

    monkeypatch.setattr(torch, "load", load_as_if_the_run_were_on_a_gpu)
    checkpoint = train.load_checkpoint(tmp_path / "run" / "ckpt.pt", cfg, world_size=1)
    states = [*checkpoint["rng"]["torch"], checkpoint["rng"]["batches"]]
    assert all(state.device.type == "cpu" and state.dtype == torch.uint8 for state in states)
    train.main(flags(tmp_path / "run", verse, "--max_iters", "20", "--lr_decay_iters", "20", "--init_from", "resume"))
    assert asked and all(location == "cpu" for location in asked)
    monkeypatch.undo()
    assert ckpt(tmp_path / "run")["iter_num"] == 20


@pytest.mark.parametrize("change", [["--dropout", "0.1"], ["--grad_clip", "0.5"], ["--wsd_decay_fraction", "0.5"],
                                   ["--beta2", "0.95"]])
def test_resume_refuses_a_change_that_would_not_continue_the_same_run(tmp_path, verse, change):
    train.main(flags(tmp_path / "run", verse, "--max_iters", "10", "--lr_decay_iters", "20"))
    with pytest.raises(ValueError, match=f"{change[0]} .* -> {change[1]}"):
        train.main(flags(tmp_path / "run", verse, "--max_iters", "20", "--lr_decay_iters", "20", "--init_from",
                         "resume", *change))


def test_resume_refuses_another_number_of_processes(tmp_path, verse):
    train.main(flags(tmp_path / "run", verse, "--max_iters", "10", "--lr_decay_iters", "20"))
    checkpoint = ckpt(tmp_path / "run")
    checkpoint["world_size"] = 2  # as if it was trained under torchrun --nproc_per_node=2
    atomic_save(checkpoint, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(ValueError, match="number of processes 2 -> 1"):
        train.main(flags(tmp_path / "run", verse, "--max_iters", "20", "--lr_decay_iters", "20", "--init_from",
                         "resume"))


def test_a_kill_between_saving_and_logging_loses_no_metrics_row(tmp_path, verse):
    run, straight = tmp_path / "run", tmp_path / "straight"
    train.main(flags(straight, verse, "--max_iters", "40"))
    train.main(flags(run, verse, "--max_iters", "20", "--lr_decay_iters", "40"))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # step 20 saved, its row never written
    train.main(flags(run, verse, "--max_iters", "40", "--lr_decay_iters", "40", "--init_from", "resume"))
    resumed, uninterrupted = read_metrics(run / "metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert [r["iter"] for r in resumed] == [0, 10, 20, 30, 40]
    assert [s["iter"] for s in read_steps(run)] == list(range(40))  # every step once
    for key in ("val_loss", "lr", "step_loss", "grad_norm"):  # the re-logged row 20 is the row it replaces
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key


def test_the_tokenizer_travels_with_the_checkpoint_and_resume_refuses_changed_data(tmp_path, verse):
    run = tmp_path / "run"
    train.main(flags(run, verse, "--max_iters", "10", "--lr_decay_iters", "20"))
    saved = Tokenizer.from_dict(ckpt(run)["tokenizer"])
    assert saved.to_dict() == Tokenizer.load(run / "tokenizer.json").to_dict()
    tokenizer_file = (run / "tokenizer.json").read_text()
    verse.write_text(" ".join(reversed(VERSE.split())) * 60)  # the data file changed under the run
    with pytest.raises(ValueError, match="tokenizer"):
        train.main(flags(run, verse, "--max_iters", "20", "--lr_decay_iters", "20", "--init_from", "resume"))
    assert (run / "tokenizer.json").read_text() == tokenizer_file  # nothing was overwritten


def test_ddp_ranks_draw_their_own_dropout_and_resume_exactly(tmp_path, verse):
    """Under torchrun every process seeds seed + rank (nanoGPT's offset), and the checkpoint keeps every
    rank's random-number state, so a resumed 2-process run with dropout is bit-identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(run_dir, *extra):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(REPO / "part04_scaling" / "train.py"),
                               *flags(run_dir, verse, "--dropout", "0.2", "--eval_interval", "2", "--max_new_tokens",
                                      "1", *extra)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp_path / "straight", "--max_iters", "4")
    torchrun(tmp_path / "halves", "--max_iters", "2", "--lr_decay_iters", "4")
    torchrun(tmp_path / "halves", "--max_iters", "4", "--lr_decay_iters", "4", "--init_from", "resume")
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "halves")
    states = a["rng"]["torch"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])  # each rank its own dropout stream
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after a 2-process resume"


# --- Checkpoint writes ----------------------------------------------------------------------------------


def test_concurrent_saves_to_one_path_do_not_collide(tmp_path):
    """Each save has its own temporary file: a fixed name (ckpt.pt.tmp) made two writers trip over each other."""
    path, errors = tmp_path / "ckpt.pt", []

    def writer(value):
        try:
            for _ in range(15):
                atomic_save({"value": torch.full((20_000,), float(value))}, path)
        except Exception as err:  # noqa: BLE001 - any failure is the bug
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    value = torch.load(path, weights_only=True)["value"]
    assert value.unique().numel() == 1 and value[0].item() in (1.0, 2.0)
    assert not list(tmp_path.glob("*.tmp"))


WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from shared.checkpoint import atomic_save
step = 0
while True:
    atomic_save({{"step": step, "weights": torch.full((2_000_000,), float(step))}}, {path!r})
    step += 1
    print(step, flush=True)
"""


def test_a_writer_killed_mid_save_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "1"  # one whole checkpoint exists
        time.sleep(random.Random(0).uniform(0.05, 0.3))  # then kill it at some moment of a later save
    finally:
        writer.kill()
        writer.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["weights"], torch.full((2_000_000,), float(checkpoint["step"])))


def test_a_full_disk_is_reported_as_such_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full while saving .*ckpt.pt.*untouched"):
        atomic_save({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no partial file left filling the disk


def test_checkpoint_files_get_a_normal_file_mode(tmp_path):
    atomic_save({"step": 1}, tmp_path / "ckpt.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o666 & ~umask


# --- NaN, an occupied out_dir, a second run --------------------------------------------------------------


def test_a_diverged_run_never_saves_a_non_finite_checkpoint(tmp_path, verse):
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="untouched"):
        train.main(flags(run, verse, "--max_iters", "30", "--learning_rate", "1e6", "--eval_interval", "1",
                         "--warmup_iters", "0", "--grad_clip", "0"))
    checkpoint = ckpt(run)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert math.isfinite(checkpoint["val_loss"])


def test_a_fresh_run_never_replaces_a_finished_one_unless_asked(tmp_path, verse):
    run = tmp_path / "run"
    train.main(flags(run, verse, "--max_iters", "10"))
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl", "steps.jsonl")}
    with pytest.raises(FileExistsError, match="--init_from resume.*--overwrite"):
        train.main(flags(run, verse, "--max_iters", "10"))
    with pytest.raises(SystemExit):  # a bad flag fails before anything is touched
        train.main(flags(run, verse, "--max_iters", "10", "--batch_size", "0", "--overwrite"))
    assert {name: (run / name).read_bytes() for name in before} == before
    train.main(flags(run, verse, "--max_iters", "5", "--eval_interval", "5", "--overwrite"))
    assert [r["iter"] for r in read_metrics(run / "metrics.jsonl")] == [0, 5]


def test_a_second_run_in_the_same_out_dir_fails_at_once(tmp_path, verse):
    lock = lock_run_dir(tmp_path / "run")  # as a first run would hold it
    try:
        with pytest.raises(FileExistsError, match="another run .* is using"):
            train.main(flags(tmp_path / "run", verse, "--max_iters", "10"))
    finally:
        lock.close()
    train.main(flags(tmp_path / "run", verse, "--max_iters", "2", "--eval_interval", "2"))  # free again


def test_expected_errors_are_one_line_without_a_traceback(tmp_path, verse):
    done = subprocess.run([sys.executable, str(REPO / "part04_scaling" / "train.py"),
                           *flags(tmp_path / "run", verse, "--init_from", "resume")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: --init_from resume: no checkpoint at")
