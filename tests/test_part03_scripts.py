"""Part 3 scripts: the generation benchmark (KV cache on/off, rolling vs growing) and the long-context
(StreamingLLM) evaluation, on a tiny random checkpoint written in train.py's format."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from part02_tiny_llm import train as part2_train
from part02_tiny_llm.model import GPT as Part2GPT
from part02_tiny_llm.model import GPTConfig as Part2Config
from part03_modern import bench_generate, eval_full_val, eval_long_context, train
from part03_modern.eval_long_context import position_losses, recompute_losses, with_attention
from part03_modern.model import GPT, GPTConfig

TINY_MODEL = dict(block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
TEXT = "".join(f"{i} little pigs went to market, and {i % 7} came home.\n" for i in range(300))  # ~15 KB


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder with an untrained tiny model saved as train.py saves it, and a small text file."""
    out_dir = tmp_path_factory.mktemp("part03_run")
    torch.manual_seed(0)
    train.save_checkpoint(out_dir / "ckpt.pt", GPT(GPTConfig(**TINY_MODEL)), iter_num=0)
    (out_dir / "text.txt").write_text(TEXT)
    return out_dir


# --- bench_generate.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("window_size", [None, 8])
def test_bench_generate_times_every_mode_and_measures_the_caches(run_dir, window_size, capsys):
    results = bench_generate.main(["--out_dir", str(run_dir), "--lengths", "12,24", "--rounds", "1", "--warmup", "2",
                                   "--window_size", str(window_size)])
    assert [row["new_tokens"] for row in results["rows"]] == [12, 24]
    # the rolling buffer holds n_sink + window slots per layer, keys and values, float32; no cache holds nothing
    window = window_size or TINY_MODEL["block_size"]
    head_size = TINY_MODEL["n_embd"] // TINY_MODEL["n_head"]
    rolling_bytes = TINY_MODEL["n_layer"] * 2 * TINY_MODEL["n_kv_head"] * window * head_size * 4
    # the growing cache: a slot per token of the text (prompt + new), and never fewer than the window
    growing_bytes = [rolling_bytes * max(1 + n, window) // window for n in (12, 24)]
    for row, growing in zip(results["rows"], growing_bytes):
        assert row["cache_kib"] == {"no cache": 0, "rolling cache": rolling_bytes / 2**10,
                                    "growing cache": growing / 2**10}
        # greedy decoding: the cache changes the cost, never the text
        assert row["caches_agree"] and row["cache_agrees_with_no_cache"], row
        rates = row["tokens_per_sec"]
        assert all(rate > 0 for rate in rates.values())
        assert row["speedup"] == pytest.approx(rates["rolling cache"] / rates["no cache"])
        assert row["vs_part2"] == pytest.approx(rates["rolling cache"] / rates[bench_generate.PART2])
    table = capsys.readouterr().out
    assert all(mode in results["table"] and mode in table for mode in (*bench_generate.MODES, bench_generate.PART2))
    saved = json.loads((run_dir / "bench_generate.json").read_text())
    assert saved["rows"] == results["rows"] and saved["model_config"]["window_size"] == window_size
    assert (run_dir / "bench_generate.png").stat().st_size > 0


def test_bench_generate_random_init_is_train_py_default_model(tmp_path):
    results = bench_generate.main(["--random_init", "--out_dir", str(tmp_path), "--lengths", "3", "--rounds", "1",
                                   "--warmup", "1"])
    assert results["model"] == "random init"
    model_config = results["model_config"]
    assert {k: model_config[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head")} == {
        k: getattr(train.TrainConfig(), k) for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head")}
    assert (tmp_path / "bench_generate.json").is_file() and not (tmp_path / "ckpt.pt").exists()


# --- eval_long_context.py ----------------------------------------------------------------------------


def test_recompute_equals_sliding_window_for_a_one_layer_model():
    # With one layer, a position's output depends only on the keys it attends: a sliding window over
    # the whole text and a fresh forward pass over the last `window` tokens must agree exactly.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_MODEL, "n_layer": 1})).eval()
    seq = torch.randint(256, (61,))
    windowed = position_losses(with_attention(model, window_size=8), seq)
    recomputed = recompute_losses(model, seq, window=8, stride=3)
    scored = ~recomputed.isnan()
    assert scored[:8].all() and scored.sum() == 8 + len(range(8, 60, 3))
    gap = (recomputed[scored] - windowed[scored]).abs().max().item()
    assert gap < 1e-5, f"recompute and sliding window differ by {gap}"
    # with two layers the window's receptive field grows with depth, so the two differ
    deep = GPT(GPTConfig(**TINY_MODEL)).eval()
    deep_windowed = position_losses(with_attention(deep, window_size=8), seq)
    assert not torch.allclose(recompute_losses(deep, seq, 8, 1)[8:], deep_windowed[8:])


def test_eval_long_context_scores_every_mode_per_position_bucket(run_dir, capsys):
    results = eval_long_context.main(["--out_dir", str(run_dir), "--data", str(run_dir / "text.txt"),
                                      "--seq_len", "96", "--num_seqs", "3", "--buckets", "16,48", "--n_sink", "2",
                                      "--recompute_stride", "4"])
    assert results["bucket_edges"] == [0, 16, 48, 96]
    modes = results["modes"]
    assert list(modes) == ["full attention", "sliding window 16", "window 16 + 2 sinks", "recompute window 16"]
    out = capsys.readouterr().out
    for name, mode in modes.items():
        assert f"| {name} |" in results["table"] and f"| {name} |" in out
        assert len(mode["bucket_loss"]) == 3 and all(math.isfinite(x) for x in mode["bucket_loss"])
        # untrained: every byte about equally likely, ln 256 = 5.55 nats
        assert abs(mode["mean_loss"] - math.log(256)) < 0.1
    # Inside the first window every mode sees the same keys, so the first bucket agrees exactly.
    first = [mode["bucket_loss"][0] for mode in modes.values()]
    assert max(first) - min(first) < 1e-5
    # Beyond it the patterns differ.
    assert modes["full attention"]["bucket_loss"][2] != modes["sliding window 16"]["bucket_loss"][2]
    assert len(modes["recompute window 16"]["position_loss"]) == 96
    assert modes["recompute window 16"]["position_loss"][17] is None  # skipped by the stride
    saved = json.loads((run_dir / "long_context.json").read_text())
    assert saved["modes"]["full attention"]["bucket_loss"] == modes["full attention"]["bucket_loss"]
    assert (run_dir / "long_context.png").stat().st_size > 0


def test_bad_inputs_get_clear_messages(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        bench_generate.main(["--out_dir", str(tmp_path / "nothing_here")])
    with pytest.raises(FileNotFoundError, match="train one first"):
        eval_long_context.main(["--out_dir", str(tmp_path / "nothing_here")])
    with pytest.raises(ValueError, match="--lengths"):
        bench_generate.main(["--out_dir", str(run_dir), "--lengths", "0"])
    with pytest.raises(ValueError, match="--seq_len"):
        eval_long_context.main(["--out_dir", str(run_dir), "--data", str(run_dir / "text.txt"), "--seq_len", "100000"])
    with pytest.raises(ValueError, match="--n_sink"):
        eval_long_context.main(["--out_dir", str(run_dir), "--data", str(run_dir / "text.txt"), "--n_sink", "16"])


@pytest.mark.parametrize("script", [bench_generate, eval_long_context])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--out_dir" in capsys.readouterr().out


# --- eval_full_val.py ------------------------------------------------------------------------------


def reference_full_loss(model, data: bytes, block_size: int) -> float:
    """Every non-overlapping window on its own, the loss written out as -log softmax at the next byte."""
    ids = torch.tensor(list(data))
    nll = []
    with torch.no_grad():
        for w in range((len(ids) - 1) // block_size):
            x = ids[w * block_size : (w + 1) * block_size]
            y = ids[w * block_size + 1 : (w + 1) * block_size + 1]
            logits, _ = model(x[None], y[None])
            nll.append(-torch.log_softmax(logits[0], dim=-1)[torch.arange(block_size), y])
    return torch.cat(nll).mean().item()


@pytest.fixture(scope="module")
def part2_run_dir(tmp_path_factory):
    """An untrained tiny part 2 model saved as part 2's train.py saves it."""
    out_dir = tmp_path_factory.mktemp("part02_run")
    torch.manual_seed(1)
    part2 = Part2GPT(Part2Config(block_size=16, n_layer=2, n_head=2, n_embd=32))
    part2_train.save_checkpoint(out_dir / "ckpt.pt", part2, iter_num=3)
    return out_dir


def test_eval_full_val_scores_part2_and_part3_runs_on_every_validation_window(run_dir, part2_run_dir):
    text = run_dir / "text.txt"
    rows = eval_full_val.main(["--run_dirs", f"{part2_run_dir},{run_dir}", "--data", str(text), "--batch_size", "5"])
    val = TEXT.encode()[len(TEXT) - round(len(TEXT) * 0.1):]  # the last 10%, as train.py splits
    for row, model in zip(rows, [eval_full_val.load_run(part2_run_dir)[0], eval_full_val.load_run(run_dir)[0]]):
        assert row["val_tokens"] == (len(val) - 1) // 16 * 16
        assert row["full_val_loss"] == pytest.approx(reference_full_loss(model, val, 16), rel=1e-5)
        assert json.loads((Path(row["run"]) / "full_val.json").read_text())["full_val_loss"] == row["full_val_loss"]
    assert isinstance(eval_full_val.load_run(part2_run_dir)[0], Part2GPT)
    assert isinstance(eval_full_val.load_run(run_dir)[0], GPT)


def test_nanogpt_data_and_checkpoints_round_trip(run_dir, part2_run_dir, tmp_path):
    """The corpus in nanoGPT's format is our split, byte for byte; a checkpoint in nanoGPT's format (here part
    2's GPT under a fake nanoGPT model.py, saved by a compiled model) scores as the model itself does."""
    text = run_dir / "text.txt"
    eval_full_val.main(["--data", str(text), "--write_nanogpt_data", str(tmp_path / "data")])
    n_val = round(len(TEXT) * 0.1)
    assert np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).tobytes() == \
        np.frombuffer(TEXT.encode()[:-n_val], dtype=np.uint8).astype(np.uint16).tobytes()
    assert bytes(np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16).astype(np.uint8)) == TEXT.encode()[-n_val:]
    with open(tmp_path / "data" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 256 and meta["itos"][ord("A")] == "A" and meta["stoi"]["\n"] == 10

    nanogpt_dir = tmp_path / "nanoGPT"
    nanogpt_dir.mkdir()
    (nanogpt_dir / "model.py").write_text("from part02_tiny_llm.model import GPT, GPTConfig\n")
    model = eval_full_val.load_run(part2_run_dir)[0]
    model_args = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=256, bias=True, dropout=0.0)
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}, "model_args": model_args,
                "iter_num": 7}, tmp_path / "ckpt.pt")
    [row] = eval_full_val.main(["--run_dirs", "", "--data", str(text), "--nanogpt_dir", str(nanogpt_dir),
                                "--nanogpt_ckpt", str(tmp_path / "ckpt.pt")])
    val = TEXT.encode()[-n_val:]
    assert row["iter"] == 7 and row["full_val_loss"] == pytest.approx(reference_full_loss(model, val, 16), rel=1e-5)


def test_eval_full_val_bad_inputs_get_clear_messages(tmp_path, run_dir, capsys):
    with pytest.raises(FileNotFoundError, match="train one first"):
        eval_full_val.main(["--run_dirs", str(tmp_path / "nothing_here"), "--data", str(run_dir / "text.txt")])
    with pytest.raises(ValueError, match="go together"):
        eval_full_val.main(["--data", str(run_dir / "text.txt"), "--nanogpt_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="model.py"):
        eval_full_val.main(["--run_dirs", "", "--data", str(run_dir / "text.txt"), "--nanogpt_dir", str(tmp_path),
                            "--nanogpt_ckpt", str(tmp_path / "ckpt.pt")])
    with pytest.raises(SystemExit) as exit_info:
        eval_full_val.main(["--help"])
    assert exit_info.value.code == 0 and "--nanogpt_ckpt" in capsys.readouterr().out
