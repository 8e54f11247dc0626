"""shared/: config -> flags, metrics logging and plot, device helpers, chapter diff."""
import json
from dataclasses import dataclass, field

import pytest
import torch

from shared.config import build_parser, check_rope_heads, parse_config, parse_int_list
from shared.device import autocast, pick_device, supports_dtype
from shared.diff import chapter_diff
from shared.metrics import MetricsLogger, _log_ticks, _smooth, plot_loss, read_metrics, read_steps


@dataclass
class Cfg:
    batch_size: int = 8
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    dropout: float = field(default=0.1, metadata={"help": "drop 10% of activations"})  # a literal % in help
    compile: bool = False
    top_k: int | None = None
    data: str = "shakespeare"


def test_config_defaults_and_flags():
    assert parse_config(Cfg, []) == Cfg()
    cfg = parse_config(Cfg, ["--batch_size", "4", "--learning_rate", "3e-4", "--compile", "--top_k", "5"])
    assert cfg == Cfg(batch_size=4, learning_rate=3e-4, compile=True, top_k=5)
    assert parse_config(Cfg, ["--top_k", "none"]).top_k is None
    assert parse_config(Cfg, ["--no-compile"]).compile is False


def test_config_help_lists_every_field_with_default():
    text = build_parser(Cfg).format_help()
    for name in ("--batch_size", "--learning_rate", "--compile", "--top_k", "--data"):
        assert name in text
    assert "peak learning rate (default: 0.001)" in text
    assert "drop 10% of activations (default: 0.1)" in text
    assert "(default: 8)" in text and "(default: shakespeare)" in text  # fields without help text too


def test_config_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--batch_size", "four"])
    assert "invalid int value" in capsys.readouterr().err


def test_parse_int_list_reads_comma_separated_values_and_names_the_flag_when_wrong():
    assert parse_int_list(" 2, 5,10 ,", "dims") == [2, 5, 10]
    assert parse_int_list("", "ngram_sizes", minimum=2, allow_empty=True) == []
    with pytest.raises(ValueError, match=r"^--dims must be comma-separated integers, got '2,x'$"):
        parse_int_list("2,x", "dims")
    with pytest.raises(ValueError, match=r"^--dims must list dimensions >= 1, got '3,0'$"):
        parse_int_list("3,0", "dims", what="dimensions")
    with pytest.raises(ValueError, match=r"--vocab_sizes must list vocabulary sizes >= 257 \(256 bytes\), got '300,256'"):
        parse_int_list("300,256", "vocab_sizes", minimum=257, what="vocabulary sizes", why=" (256 bytes)")
    with pytest.raises(ValueError, match="must list integers >= 1"):
        parse_int_list(" , ", "sizes")  # nothing in it, and it may not be empty


def test_check_rope_heads_wants_an_even_head_size():
    check_rope_heads(128, 4)  # head size 32
    with pytest.raises(ValueError, match=r"^--local_n_embd 30 must be divisible by --local_n_head 4"):
        check_rope_heads(30, 4, "local_")  # 30 / 4 is no whole number
    with pytest.raises(ValueError, match="even head size"):
        check_rope_heads(60, 4)  # head size 15: RoPE cannot pair the channels


def test_metrics_logger_writes_jsonl_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(iter=0, train_loss=3.0, val_loss=3.1)
    log.log(iter=10, train_loss=2.0, val_loss=float("nan"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"iter": 0, "train_loss": 3.0, "val_loss": 3.1}, {"iter": 10, "train_loss": 2.0, "val_loss": None}]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])  # NaN stored as valid JSON
    png = plot_loss(records, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    MetricsLogger(tmp_path, resume=True).log(iter=20, train_loss=1.0)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3
    MetricsLogger(tmp_path)  # a fresh run starts the file anew
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def _run(out_dir, iters, resume=False, start_iter=None, offset=0.0):
    """A toy training loop as train.py runs it: evaluate at every 5th step, then take the step."""
    with MetricsLogger(out_dir, resume=resume, start_iter=start_iter) as log:
        for it in iters:
            if it % 5 == 0:
                log.log(iter=it, train_loss=10.0 - it + offset, val_loss=11.0 - it + offset)
            if it < 10:
                log.log_step(it, 10.0 - it + offset)


def test_metrics_logger_resume_logs_every_step_once(tmp_path):
    _run(tmp_path, range(0, 11))
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 5, 10]
    assert [r["iter"] for r in read_steps(tmp_path)] == list(range(10))
    # Resume at step 5 (the checkpoint of the evaluation at 5); the resumed run logs 5..10 again.
    _run(tmp_path, range(5, 11), resume=True, start_iter=5, offset=0.5)
    metrics, steps = read_metrics(tmp_path / "metrics.jsonl"), read_steps(tmp_path / "steps.jsonl")
    assert [r["iter"] for r in metrics] == [0, 5, 10]
    assert [r["iter"] for r in steps] == list(range(10))
    # rows before step 5 come from the first run, the others from the resumed one
    assert [r["loss"] for r in steps] == [10.0 - i for i in range(5)] + [10.5 - i for i in range(5, 10)]
    assert [r["train_loss"] for r in metrics] == [10.0, 5.5, 0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "steps.jsonl"]  # no temp files left


def test_metrics_logger_fresh_run_starts_empty(tmp_path):
    _run(tmp_path, range(0, 11))
    MetricsLogger(tmp_path).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [] and read_steps(tmp_path) == []
    MetricsLogger(tmp_path / "new").close()  # a new out_dir is made, with both files empty
    assert read_metrics(tmp_path / "new" / "metrics.jsonl") == [] and read_steps(tmp_path / "new") == []


def test_metrics_logger_writes_steps_at_each_evaluation(tmp_path):
    log = MetricsLogger(tmp_path)
    for it in range(3):
        log.log_step(it, 2.0)
    assert read_steps(tmp_path) == []  # kept in memory between evaluations
    log.log(iter=3, val_loss=1.0)
    assert [r["iter"] for r in read_steps(tmp_path)] == [0, 1, 2]
    log.log_step(3, float("inf"))
    log.close()
    assert read_steps(tmp_path)[-1] == {"iter": 3, "loss": None}  # inf/NaN stored as valid JSON


def test_resume_drops_a_half_written_line(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"iter": 0, "loss": 2.0}\n{"iter": 1, "loss": 1.9}\n{"iter": 2, "lo')
    MetricsLogger(tmp_path, resume=True, start_iter=2).close()
    assert read_steps(tmp_path) == [{"iter": 0, "loss": 2.0}, {"iter": 1, "loss": 1.9}]
    assert read_steps(tmp_path / "nowhere") == []


def test_smoothing_follows_a_falling_loss_and_removes_noise():
    import math

    falling = [1.7 + 3.8 * math.exp(-t / 70) for t in range(3500)]
    smooth = _smooth(falling, span=70)
    assert smooth[0] == falling[0]
    # a plain moving average over 70 steps trails the fast early drop by > 0.5 nats
    assert max(abs(s - f) / f for s, f in zip(smooth, falling)) < 0.05
    noisy = [2.0 + (0.3 if t % 2 else -0.3) for t in range(3500)]
    tail = _smooth(noisy, span=70)[1000:]
    assert max(tail) - min(tail) < 0.05  # the raw values span 0.6


def test_log_ticks_are_round_numbers_inside_the_range():
    assert _log_ticks(1.53, 5.7) == [1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0]
    assert all(0.01 <= t <= 100 for t in _log_ticks(0.01, 100)) and len(_log_ticks(0.01, 100)) <= 9


def test_plot_loss_with_steps_and_missing_values(tmp_path):
    records = [{"iter": 0, "train_loss": 5.5, "val_loss": 5.5, "step_loss": None},
               {"iter": 50, "train_loss": 2.5, "val_loss": None, "step_loss": 2.6},
               {"iter": 100, "train_loss": 2.0, "val_loss": 2.1, "step_loss": 2.0}]
    steps = [{"iter": i, "loss": None if i == 7 else 5.5 - 0.035 * i} for i in range(100)]
    for name, kwargs in [("steps", dict(steps=steps)), ("plain", {}), ("empty_steps", dict(steps=[])),
                         ("all_none", dict(steps=[{"iter": 0, "loss": None}]))]:
        png = plot_loss(records if name != "all_none" else [{"iter": 0, "val_loss": None}],
                        tmp_path / f"{name}.png", **kwargs)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # a loss that goes negative (a policy loss, say) cannot use a log axis: it is drawn linear
    plot_loss([{"iter": i, "policy_loss": 0.1 - 0.02 * i} for i in range(10)], tmp_path / "negative.png",
              steps=[{"iter": i, "loss": 0.1 - 0.02 * i} for i in range(10)])
    with pytest.raises(ValueError, match="x='iter'"):
        plot_loss(records, tmp_path / "bad.png", x="tokens", steps=steps)
    with pytest.raises(ValueError, match="no '\\*loss\\*' column"):  # e.g. columns named after tasks only
        plot_loss([{"iter": 0, "speaker": 1.0}], tmp_path / "none.png")


def test_device_choice():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    assert supports_dtype("cpu", "bfloat16") and not supports_dtype("cpu", "float16")


def test_autocast_bfloat16_on_cpu():
    a = torch.randn(4, 4)
    with autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        autocast("cpu", "float8")


def test_chapter_diff(tmp_path, monkeypatch):
    import shared.diff as diff

    (tmp_path / "part01_a").mkdir()
    (tmp_path / "part02_b").mkdir()
    (tmp_path / "part01_a" / "model.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "part02_b" / "model.py").write_text("x = 1\ny = 3\n")
    monkeypatch.setattr(diff, "ROOT", tmp_path)
    text = chapter_diff("1", "02", ["model.py"])
    assert "-y = 2" in text and "+y = 3" in text and "part02_b/model.py" in text
