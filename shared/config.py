"""Turn a config dataclass into command-line flags, so every train.py has `--help`.

    @dataclass
    class TrainConfig:
        batch_size: int = 32  # no help text needed: the default is shown
        learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})

    cfg = parse_config(TrainConfig, description="Train a bigram model")

Every field becomes `--name` with its type and default; booleans get `--name/--no-name`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        # argparse %-formats help strings: a literal "%" in our text must be written "%%"
        help_text = (f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)s)").strip()
        kwargs = dict(default=default, help=help_text)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        # `int | None` style fields: accept the value, or "none".
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind)
        convert = _none_or(base) if optional else base
        parser.add_argument(f"--{f.name}", type=convert, **kwargs)
    return parser


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def parse_config(config_cls, argv: list[str] | None = None, description: str | None = None):
    """Parse `argv` (default: sys.argv) into an instance of `config_cls`."""
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))
