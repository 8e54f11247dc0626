"""Turn a config dataclass into command-line flags, so every train.py has `--help`, and turn expected
mistakes into a one-line error instead of a traceback.

    @dataclass
    class TrainConfig:
        batch_size: int = field(default=32, metadata={"min": 1})  # the default and the bound are shown
        learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate", "min": 0})

    cfg = parse_config(TrainConfig, argv, description="Train a bigram model", check=check_config)

    if __name__ == "__main__":
        run_cli(main)   # ValueError, OSError, ... -> "error: <message>" and exit status 1

Every field becomes `--name` with its type and default; booleans get `--name/--no-name`.
metadata "min"/"max" are inclusive bounds, checked at parse time ("none" always passes for an
optional field); `check(cfg)` may raise ValueError for rules that involve several flags. Both end
as argparse's usage line plus one "error: ..." line, with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


def build_parser(config_cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        bounds = _bounds_text(f.metadata)
        # argparse %-formats help strings: a literal "%" in our text must be written "%%"
        help_text = (f.metadata.get("help", "").replace("%", "%%") + bounds + " (default: %(default)s)").strip()
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


def _bounds_text(metadata) -> str:
    parts = [f">= {metadata['min']}"] if "min" in metadata else []
    parts += [f"<= {metadata['max']}"] if "max" in metadata else []
    return f" [{', '.join(parts)}]" if parts else ""


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def check_bounds(cfg) -> None:
    """Raise ValueError naming the first field outside its metadata "min"/"max" bounds."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value:  # NaN passes every comparison: refuse it explicitly
            raise ValueError(f"--{f.name} must be a number, got nan")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ValueError(f"--{f.name} must be >= {f.metadata['min']}, got {value}")
        if "max" in f.metadata and value > f.metadata["max"]:
            raise ValueError(f"--{f.name} must be <= {f.metadata['max']}, got {value}")


def parse_config(config_cls, argv: list[str] | None = None, description: str | None = None, check=None):
    """Parse `argv` (default: sys.argv) into an instance of `config_cls`, then validate it: the fields'
    "min"/"max" bounds, then `check(cfg)` if given. A ValueError from either becomes argparse's
    one-line error (usage + "error: ...", exit status 2), as a mistyped flag does."""
    parser = build_parser(config_cls, description)
    cfg = config_cls(**vars(parser.parse_args(argv)))
    try:
        check_bounds(cfg)
        if check is not None:
            check(cfg)
    except ValueError as err:
        parser.error(str(err))
    return cfg


# The mistakes a user can make that a script reports as one line: a bad value (ValueError), a missing,
# locked or unwritable file, a full disk (OSError), a diverged run (FloatingPointError), a missing
# optional package (ImportError). Anything else is a bug in our code and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)


def parse_int_list(text: str, flag: str, minimum: int = 1, what: str = "integers", why: str = "",
                   allow_empty: bool = False) -> list[int]:
    """A comma-separated flag value such as `--dims 2,5,10` -> [2, 5, 10]. A bad one gets a one-line message that
    names the flag: "--dims must be comma-separated integers, got '2,x'" or "--dims must list dimensions >= 1"."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {text!r}") from None
    if (not values and not allow_empty) or any(v < minimum for v in values):
        raise ValueError(f"--{flag} must list {what} >= {minimum}{why}, got {text!r}")
    return values


def check_rope_heads(n_embd: int, n_head: int, prefix: str = "") -> None:
    """--{prefix}n_embd must split into --{prefix}n_head heads of an even size: RoPE rotates channel pairs."""
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError(f"--{prefix}n_embd {n_embd} must be divisible by --{prefix}n_head {n_head} into an even "
                         "head size (RoPE rotates channel pairs)")


def run_cli(main, argv: list[str] | None = None):
    """Call main(argv); an expected error prints "error: <message>" to stderr and exits with status 1."""
    try:
        return main(argv)
    except EXPECTED_ERRORS as err:
        sys.exit(f"error: {err}")
