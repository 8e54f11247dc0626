"""shared/: config -> flags, metrics logging and plot, device helpers, chapter diff."""
import json
from dataclasses import dataclass, field

import pytest
import torch

from shared.config import build_parser, parse_config
from shared.device import autocast, pick_device, supports_dtype
from shared.diff import chapter_diff
from shared.metrics import MetricsLogger, plot_loss, read_metrics


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
