"""The generation scripts of parts 2-5 and the other scripts of parts 0, 3 and 4: bad flags end as one
line (no traceback), prompts that are not valid UTF-8, long generation in part 2, and the tokenizer that
travels inside a part 4/5 checkpoint."""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from part00_foundations import env_check
from part02_tiny_llm import sample
from part02_tiny_llm import tokenizer as bytes02
from part02_tiny_llm.model import GPT as GPT02
from part02_tiny_llm.model import GPTConfig as GPTConfig02
from part03_modern import eval_long_context
from part03_modern import generate as generate03
from part03_modern import tokenizer as bytes03
from part03_modern.model import GPT as GPT03
from part03_modern.model import GPTConfig as GPTConfig03
from part04_scaling import bench_bpe, bench_precision, quantize
from part04_scaling import generate as generate04
from part04_scaling import train as train04
from part04_scaling.bpe import Tokenizer, train
from part04_scaling.model import GPT as GPT04
from part04_scaling.model import GPTConfig as GPTConfig04
from part05_moe import generate as generate05
from part05_moe.model import GPT as GPT05
from part05_moe.model import GPTConfig as GPTConfig05
from shared.config import run_cli
from tests.test_part04_scaling import tiny_run_flags

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"{i} little pigs went to market, and {i % 7} came home.\n" for i in range(300))


def save(path: Path, model, **extra) -> Path:
    """A checkpoint in train.py's format (the keys generate.py reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), **extra}, path)
    return path


@pytest.fixture(scope="module")
def byte_runs(tmp_path_factory):
    """Untrained tiny byte-level models of parts 2 and 3, saved as their train.py saves them."""
    root = tmp_path_factory.mktemp("byte_runs")
    torch.manual_seed(0)
    save(root / "part02" / "ckpt.pt", GPT02(GPTConfig02(block_size=8, n_layer=1, n_head=2, n_embd=16)).eval())
    save(root / "part03" / "ckpt.pt", GPT03(GPTConfig03(block_size=8, n_layer=1, n_head=2, n_embd=16)).eval())
    return root


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """Two BPE tokenizers of different sizes, as two different runs would have."""
    return train(TEXT, 300), train(TEXT, 340)


# --- Bad flags: argparse's one-line error (exit status 2), before anything is loaded ---------------------

SAMPLING_SCRIPTS = {"part02 sample": sample, "part03 generate": generate03, "part04 generate": generate04,
                    "part05 generate": generate05}
BAD_SAMPLING_FLAGS = [
    (["--max_new_tokens", "-5"], "--max_new_tokens must be >= 1, got -5"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--top_p", "-0.5"], "--top_p must be in (0, 1], got -0.5"),
    (["--top_p", "1.5"], "--top_p must be <= 1, got 1.5"),
    (["--top_k", "0"], "--top_k must be >= 1, got 0"),  # 0 would keep no token; greedy is --top_k 1
    (["--top_k", "-2"], "--top_k must be >= 1, got -2"),
]
MISSING = "/nonexistent/llm-from-scratch"  # if a bad flag got through, the script fails on this instead
BAD_OTHER_FLAGS = [
    (sample, ["--num_samples", "0", "--out_dir", MISSING], "--num_samples must be >= 1, got 0"),
    (eval_long_context, ["--seq_len", "0"], "--seq_len must be >= 1, got 0"),
    (eval_long_context, ["--num_seqs", "0"], "--num_seqs must be >= 1, got 0"),
    (eval_long_context, ["--n_sink", "-1"], "--n_sink must be >= 0, got -1"),
    (eval_long_context, ["--recompute_stride", "-1"], "--recompute_stride must be >= 0, got -1"),
    (eval_long_context, ["--buckets", "64,x"], "--buckets must be comma-separated positions"),
    (eval_long_context, ["--buckets", "256,64"], "--buckets must be increasing positive positions"),
    (eval_long_context, ["--buckets", "0,64"], "--buckets must be increasing positive positions"),
    (bench_bpe, ["--small_bytes", "0"], "--small_bytes must be >= 1, got 0"),
    (bench_bpe, ["--naive_bytes", "-1"], "--naive_bytes must be >= 1, got -1"),
    (bench_bpe, ["--full_vocab_size", "256"], "--full_vocab_size must be >= 257, got 256"),
    (bench_bpe, ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (bench_bpe, ["--small_vocab_sizes", "300,big"], "--small_vocab_sizes must be comma-separated integers"),
    (bench_bpe, ["--small_vocab_sizes", "256"], "--small_vocab_sizes must list vocabulary sizes >= 257"),
    (bench_bpe, ["--compression_vocab_sizes", "100,512"], "--compression_vocab_sizes must list vocabulary sizes"),
    (bench_bpe, ["--compression_vocab_sizes", ","], "--compression_vocab_sizes must list vocabulary sizes"),
    (bench_precision, ["--steps", "0"], "--steps must be >= 1, got 0"),
    (bench_precision, ["--steps", "3", "--skip_steps", "3"], "--skip_steps 3 leaves no step to time"),
    (bench_precision, ["--skip_steps", "-1"], "--skip_steps must be >= 0, got -1"),
    (bench_precision, ["--eval_iters", "0"], "--eval_iters must be >= 1, got 0"),
    (bench_precision, ["--vocab_size", "100"], "--vocab_size must be >= 257, got 100"),
    (bench_precision, ["--n_embd", "30", "--n_head", "4"], "--n_embd 30 must be divisible by --n_head 4"),
    (bench_precision, ["--n_embd", "12", "--n_head", "4"], "the head size n_embd / n_head = 3 must be even"),
    (bench_precision, ["--n_head", "4", "--n_kv_head", "3"], "--n_head 4 must be a multiple of --n_kv_head 3"),
    (bench_precision, ["--threads", "0"], "--threads must be >= 1, got 0"),
    (quantize, ["--variants", "fp32,int4"], "--variants: unknown ['int4']"),
    (quantize, ["--variants", ","], "--variants: unknown empty list"),
    (quantize, ["--new_tokens", "0"], "--new_tokens must be >= 1, got 0"),
    (quantize, ["--eval_iters", "0"], "--eval_iters must be >= 1, got 0"),
    (quantize, ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (quantize, ["--threads", "0"], "--threads must be >= 1, got 0"),
    (quantize, ["--start", ""], "--start is empty"),
    (env_check, ["--size", "0", "--min_seconds", "0.01"], "--size must be >= 1, got 0"),
    (env_check, ["--size", "8", "--min_seconds", "-1"], "--min_seconds must be >= 0, got -1.0"),
]


def assert_usage_error(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"error: {message}" in err, err


@pytest.mark.parametrize("name", SAMPLING_SCRIPTS)
@pytest.mark.parametrize("flags, message", BAD_SAMPLING_FLAGS, ids=[" ".join(f) for f, _ in BAD_SAMPLING_FLAGS])
def test_sampling_flags_are_checked_before_anything_runs(name, flags, message, capsys):
    assert_usage_error(SAMPLING_SCRIPTS[name], ["--out_dir", MISSING, *flags], message, capsys)


@pytest.mark.parametrize("script, flags, message", BAD_OTHER_FLAGS,
                         ids=[f"{s.__name__.split('.')[-1]} {' '.join(f)}" for s, f, _ in BAD_OTHER_FLAGS])
def test_other_flags_are_checked_before_anything_runs(script, flags, message, capsys):
    # a missing --out_dir / --data: if the bad flag got through, the script would stop there, not run
    extra = [*(["--out_dir", MISSING] if script not in (env_check, bench_bpe) and "--out_dir" not in flags else []),
             *(["--data", MISSING + ".txt"] if script in (bench_bpe, bench_precision) else []),
             *(["--device", "cpu"] if script is not bench_bpe else [])]
    assert_usage_error(script, [*flags, *extra], message, capsys)


@pytest.mark.parametrize("name", SAMPLING_SCRIPTS)
def test_good_sampling_flags_pass(name):
    # the edges of the bounds are accepted: only the missing checkpoint stops the script
    with pytest.raises(FileNotFoundError, match="train one first"):
        SAMPLING_SCRIPTS[name].main(["--out_dir", MISSING, "--top_p", "1", "--top_k", "1", "--temperature", "0",
                                     "--max_new_tokens", "1"])


@pytest.mark.parametrize("script, argv, message", [
    (sample, ["--out_dir", MISSING], "train one first"),  # run_cli is what `python script.py` calls
    (generate03, ["--out_dir", MISSING], "train one first"),
    (generate04, ["--out_dir", MISSING], "train one first"),
    (generate05, ["--out_dir", MISSING], "train one first"),
    (eval_long_context, ["--out_dir", MISSING], "train one first"),
    (quantize, ["--out_dir", MISSING], "train a model first"),
    (bench_bpe, ["--data", MISSING + ".txt"], "No such file"),
])
def test_run_time_errors_are_one_line_through_run_cli(script, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def run_script(script: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, timeout=300)


def test_scripts_from_the_command_line_fail_without_a_traceback(tmp_path):
    for script, args, status, message in [
        ("part02_tiny_llm/sample.py", ["--out_dir", str(tmp_path)], 1, b"error: no checkpoint at"),
        ("part04_scaling/generate.py", ["--out_dir", str(tmp_path), "--top_p", "0"], 2, b"error: --top_p must be"),
    ]:
        result = run_script(script, *args)
        assert result.returncode == status, result.stderr
        assert message in result.stderr and b"Traceback" not in result.stderr, result.stderr


# --- Prompts that are not valid UTF-8 --------------------------------------------------------------------


@pytest.mark.parametrize("bytes_tokenizer", [bytes02, bytes03])
def test_byte_tokenizers_encode_lone_surrogates_as_the_replacement_character(bytes_tokenizer):
    # "\udcff" is what Python makes of the byte 0xFF in sys.argv; "\ud800" a lone surrogate in any str
    for text in ("a\udcffb", "a\ud800b"):
        assert bytes_tokenizer.encode(text) == list("a\ufffdb".encode()) == [97, 0xEF, 0xBF, 0xBD, 98]
        assert bytes_tokenizer.encode_tensor(text).tolist() == bytes_tokenizer.encode(text)
        assert bytes_tokenizer.decode(bytes_tokenizer.encode(text)) == "a\ufffdb"
    assert bytes_tokenizer.encode("naïve 😀") == list("naïve 😀".encode())  # valid text: its UTF-8, unchanged


def test_generation_scripts_accept_prompts_that_are_not_utf8(byte_runs, bpe_tokenizers, tmp_path, capsys):
    texts = sample.main(["--out_dir", str(byte_runs / "part02"), "--start", "\udcffR", "--num_samples", "2",
                         "--max_new_tokens", "5", "--device", "cpu"])
    assert all(t.startswith("\ufffdR") for t in texts)
    result = generate03.main(["--out_dir", str(byte_runs / "part03"), "--start", "\udcffR", "--max_new_tokens", "5",
                              "--stream", "--device", "cpu"])
    assert result["text"].startswith("\ufffdR") and "\ufffdR" in capsys.readouterr().out
    tokenizer = bpe_tokenizers[0]
    torch.manual_seed(0)
    model = GPT04(GPTConfig04(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save(tmp_path / "ckpt.pt", model, tokenizer=tokenizer.to_dict())
    result = generate04.main(["--out_dir", str(tmp_path), "--start", "\udcffR", "--max_new_tokens", "5",
                              "--device", "cpu"])
    assert result["text"].startswith("\ufffdR")


def test_a_non_utf8_prompt_from_a_shell_works_end_to_end(byte_runs):
    # what `python part02_tiny_llm/sample.py --start $'\xff'` passes: the raw byte 0xFF
    result = run_script("part02_tiny_llm/sample.py", "--out_dir", str(byte_runs / "part02"), "--start", b"\xffR",
                        "--num_samples", "1", "--max_new_tokens", "3", "--device", "cpu")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert "\ufffdR".encode() in result.stdout


# --- Part 2: long generation -----------------------------------------------------------------------------


def test_part02_sampling_gives_the_tokens_of_model_generate(byte_runs):
    model = sample.load_model(byte_runs / "part02" / "ckpt.pt")
    prompt = "Hi"
    for temperature, top_k, top_p in [(1.0, None, None), (0.8, 5, 0.9), (0.0, None, None)]:
        torch.manual_seed(1)
        ours = sample.generate_text(model, prompt, 3, 40, temperature, top_k, top_p)  # 40 > block_size 8
        torch.manual_seed(1)
        reference = model.generate(torch.tensor([bytes02.encode(prompt)] * 3), 40, temperature, top_k, top_p)
        assert ours == [bytes02.decode(row) for row in reference]


def test_part02_sampling_memory_per_step_does_not_grow_and_shows_progress(byte_runs, monkeypatch, capsys):
    """model.generate's torch.cat((idx, idx_next)) copies the whole text at every step: quadratic. The model's
    input must stay a small tensor (its storage, not just its view, bounded by block_size), whatever the length."""
    model = sample.load_model(byte_runs / "part02" / "ckpt.pt")
    forward = model.forward
    storage_bytes = []

    def spy(idx, *args, **kwargs):
        storage_bytes.append(idx.untyped_storage().nbytes())
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    num_samples, new_tokens, block_size = 2, 300, model.config.block_size
    texts = sample.generate_text(model, "Hi", num_samples, new_tokens, 1.0, None, None, progress=True)
    assert len(storage_bytes) == new_tokens and all(len(t.encode("utf-8", "surrogatepass")) >= 2 for t in texts)
    assert max(storage_bytes) <= num_samples * (block_size + 1) * 8, max(storage_bytes)  # int64 tokens
    assert f"{new_tokens}/{new_tokens}" in capsys.readouterr().err  # tqdm's progress bar


# --- Parts 4 and 5: the tokenizer travels with the checkpoint ---------------------------------------------


@pytest.fixture(scope="module")
def part04_run(tmp_path_factory):
    """A tiny part04 train.py run: tmp/run/{ckpt.pt,tokenizer.json}."""
    tmp_path = tmp_path_factory.mktemp("part04_run")
    train04.main(tiny_run_flags(tmp_path, "--max_iters", "10"))
    return tmp_path / "run"


def test_generate_uses_the_checkpoints_tokenizer_not_the_file_beside_it(part04_run, bpe_tokenizers, tmp_path):
    checkpoint = torch.load(part04_run / "ckpt.pt", weights_only=True)
    if "tokenizer" not in checkpoint:  # a train.py that does not store it yet: add it as train.py will
        checkpoint["tokenizer"] = Tokenizer.load(part04_run / "tokenizer.json").to_dict()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(checkpoint, run / "ckpt.pt")
    bpe_tokenizers[1].save(run / "tokenizer.json")  # another run's tokenizer, 340 ids for a 320-id model
    model, tokenizer, _ = generate04.load_run(run)
    assert tokenizer.to_dict() == checkpoint["tokenizer"] and tokenizer.vocab_size == model.config.vocab_size
    result = generate04.main(["--out_dir", str(run), "--start", "ROMEO:", "--max_new_tokens", "8", "--device", "cpu"])
    assert result["text"].startswith("ROMEO:")
    # quantize.py reads the tokenizer the same way (the other one would feed ids >= 320 to the model)
    results = quantize.main(["--out_dir", str(run), "--variants", "fp32", "--new_tokens", "2", "--eval_iters", "1",
                             "--eval_batch_size", "1", "--forward_batch_size", "1", "--rounds", "1", "--device", "cpu"])
    assert [row["variant"] for row in results["rows"]] == ["fp32"]


@pytest.mark.parametrize("generate, GPT, GPTConfig", [(generate04, GPT04, GPTConfig04),
                                                      (generate05, GPT05, GPTConfig05)])
def test_a_tokenizer_of_another_size_is_refused(generate, GPT, GPTConfig, bpe_tokenizers, tmp_path):
    small, big = bpe_tokenizers
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=small.vocab_size, n_layer=1, n_head=2, n_embd=16))
    argv = ["--out_dir", str(tmp_path), "--max_new_tokens", "4", "--device", "cpu"]
    # an older checkpoint without the tokenizer: the file beside it is used, if it fits the model
    save(tmp_path / "ckpt.pt", model)
    big.save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=rf"vocab_size {small.vocab_size}, but .*tokenizer.json has "
                                         rf"{big.vocab_size} tokens: they are not from the same run"):
        generate.main(argv)
    small.save(tmp_path / "tokenizer.json")
    assert generate.main(argv)["text"].startswith("\n")
    # the checkpoint's own tokenizer wins over the file; a broken or mismatched one is refused
    big.save(tmp_path / "tokenizer.json")
    save(tmp_path / "ckpt.pt", model, tokenizer=small.to_dict())
    assert generate.main(argv)["text"].startswith("\n")
    save(tmp_path / "ckpt.pt", model, tokenizer=big.to_dict())
    with pytest.raises(ValueError, match="the tokenizer stored in it has 340 tokens"):
        generate.main(argv)
    save(tmp_path / "ckpt.pt", model, tokenizer={**small.to_dict(), "merges": [[1, 999]]})
    with pytest.raises(ValueError, match=r"ckpt.pt: not a valid tokenizer: merge 0 \(1, 999\)"):
        generate.main(argv)


def test_prompts_are_encoded_by_tiktoken_with_the_same_ids(bpe_tokenizers, monkeypatch):
    tokenizer = bpe_tokenizers[0]
    model = GPT04(GPTConfig04(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    prompt = "l" * 16_000 + " little pigs<|endoftext|>"
    expected = tokenizer.encode(prompt)

    def python_encoder(*args, **kwargs):
        raise AssertionError("the prompt went through the pure-Python encoder")

    monkeypatch.setattr(tokenizer, "encode", python_encoder)
    ids = generate04.prompt_tensor(model, tokenizer, prompt, num_samples=2)
    assert ids.dtype == torch.long and ids.shape == (2, len(expected)) and ids[1].tolist() == expected
