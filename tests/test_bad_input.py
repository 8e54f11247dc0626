"""Bad command lines, as a careless or hostile user types them: each train.py refuses them up front with
one line naming the flag, before it loads data or touches out_dir (never a ZeroDivisionError, a NaN
loss or training that silently runs backwards)."""
import subprocess
import sys
from pathlib import Path

import pytest

from part00_foundations import train as train00
from part01_transformer import train as train01
from part02_tiny_llm import train as train02
from part03_modern import train as train03
from part04_scaling import train as train04
from part05_moe import train as train05

REPO = Path(__file__).resolve().parents[1]
LM_SCRIPTS = [train02, train03, train04, train05]  # the language models share most flags
ALL_SCRIPTS = [train00, train01, *LM_SCRIPTS]

# (flags, the text the error must contain, the scripts that have these flags)
BAD = [
    (["--grad_clip", "-1"], "--grad_clip must be >= 0", [train01, *LM_SCRIPTS]),  # it reversed training
    (["--batch_size", "0"], "--batch_size must be >= 1", ALL_SCRIPTS),
    (["--block_size", "0"], "--block_size must be >= 1", [train00, *LM_SCRIPTS]),
    (["--block_size", "-1"], "--block_size must be >= 1", [train00, *LM_SCRIPTS]),
    (["--eval_interval", "0"], "--eval_interval must be >= 1", ALL_SCRIPTS),
    (["--eval_iters", "0"], "--eval_iters must be >= 1", ALL_SCRIPTS),
    (["--n_head", "0"], "--n_head must be >= 1", [train01, *LM_SCRIPTS]),
    (["--n_head", "3"], "divisible by --n_head 3", [train01, *LM_SCRIPTS]),  # 128 or 64 channels
    (["--n_embd", "132", "--n_head", "4", "--n_kv_head", "none"], "must be even: RoPE", [train03, train04, train05]),
    (["--n_head", "4", "--n_kv_head", "3"], "multiple of --n_kv_head 3", [train03, train04, train05]),
    (["--learning_rate", "-1"], "--learning_rate must be >= 0", ALL_SCRIPTS),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be >= 0", [train00, *LM_SCRIPTS]),
    (["--temperature", "-1"], "--temperature must be >= 0", LM_SCRIPTS),
    (["--top_p", "1.5"], "--top_p must be <= 1", LM_SCRIPTS),
    (["--top_k", "0"], "--top_k must be >= 1", LM_SCRIPTS),  # it kept no token: NaN probabilities
    (["--top_p", "0"], "--top_p must be in (0, 1]", LM_SCRIPTS),
    (["--dropout", "1"], "--dropout must be <= 0.99", [train01, *LM_SCRIPTS]),
    (["--max_iters", "-3"], "--max_iters must be >= 0", ALL_SCRIPTS),
    (["--start", ""], "--start is empty", LM_SCRIPTS),
    (["--learning_rate", "nan"], "--learning_rate must be a number", ALL_SCRIPTS),
    (["--grad_accum_steps", "0"], "--grad_accum_steps must be >= 1", [train04, train05]),
    (["--warmup_iters", "-1"], "--warmup_iters must be >= 0", [train04, train05]),
    (["--min_lr", "1", "--learning_rate", "0.1"], "--min_lr 1.0 is above --learning_rate", [train04, train05]),
    (["--wsd_decay_fraction", "2"], "--wsd_decay_fraction must be <= 1", [train04, train05]),
    (["--capacity_factor", "-1"], "--capacity_factor must be >= 1e-09", [train05]),
    (["--moe_top_k", "3", "--n_expert", "2"], "--moe_top_k 3 is more than --n_expert 2", [train05]),
    (["--seq_len", "0"], "--seq_len must be >= 1", [train01]),
    (["--seq_len", "8", "--block_size", "6"], "--block_size 6 is too short", [train01]),
    (["--threads", "0"], "--threads must be >= 1", ALL_SCRIPTS),
]
CASES = [pytest.param(script, flags, message, id=f"{script.__name__.split('.')[0]}:{' '.join(flags) or 'empty'}")
         for flags, message, scripts in BAD for script in scripts]


@pytest.mark.parametrize("script, flags, message", CASES)
def test_a_bad_flag_is_refused_with_one_line_naming_it(script, flags, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        script.main([*flags, "--out_dir", str(out_dir), "--device", "cpu"])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert not out_dir.exists()  # refused before anything was created


def test_every_numeric_flag_of_every_train_script_has_a_bound():
    """A new numeric flag without a "min" would let the next --grad_clip -1 through: name each exception."""
    import dataclasses
    import typing

    unbounded_on_purpose = {"seed"}  # any integer seeds a generator
    for script in ALL_SCRIPTS:
        hints = typing.get_type_hints(script.TrainConfig)
        for f in dataclasses.fields(script.TrainConfig):
            kind = hints[f.name]
            numeric = kind in (int, float) or set(typing.get_args(kind)) & {int, float}
            if numeric and kind is not bool and f.name not in unbounded_on_purpose:
                assert "min" in f.metadata, f"{script.__name__}: --{f.name} has no lower bound"


def test_a_bad_flag_from_the_shell_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "part02_tiny_llm" / "train.py"), "--grad_clip", "-1",
                           "--out_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("error: --grad_clip must be >= 0, got -1.0")


def test_a_second_fresh_run_is_refused_with_the_way_out(tmp_path, capsys):
    """Part 2 has no --init_from: its message offers only --out_dir and --overwrite."""
    data = tmp_path / "verse.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 200)
    flags = ["--data", str(data), "--out_dir", str(tmp_path / "run"), "--n_layer", "1", "--n_embd", "16",
             "--n_head", "2", "--block_size", "16", "--batch_size", "2", "--max_iters", "2", "--eval_interval", "2",
             "--eval_iters", "1", "--max_new_tokens", "2", "--device", "cpu"]
    train02.main(flags)
    with pytest.raises(FileExistsError, match=r"already holds a run .*: pick another --out_dir, or replace it with "
                                              r"--overwrite$"):
        train02.main(flags)
