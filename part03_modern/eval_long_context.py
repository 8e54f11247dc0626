"""Long context: how well does the model predict text far beyond the length it trained on?

The StreamingLLM experiment (Xiao et al. 2023, https://arxiv.org/abs/2309.17453), on our byte model.
We score validation sequences much longer than block_size (the trained context), byte by byte, with
the same weights under four attention patterns (window and sinks have no parameters, so we only
change the config):
- full attention: every byte sees the whole text so far, at distances never seen in training;
- sliding window: every byte sees the last W bytes (W = the trained window, or block_size);
- window + sinks: the last W bytes plus the first n_sink bytes of the text (--same_budget: the last
  W - n_sink, so the cache is as big as the plain window's, as in StreamingLLM's comparison). The sinks
  keep their positions in the text, as model.py's attention_mask does; StreamingLLM instead numbers
  the positions inside the cache, so the sinks stay at distances the model trained on;
- recompute: every byte is predicted from a fresh forward pass over its last W bytes, as part 2's
  generation does by cropping: the accurate but expensive baseline (a subsample of positions).
The mean loss per position bucket shows which patterns keep working past the trained length.

    python part03_modern/eval_long_context.py                              # the model of train.py
    python part03_modern/eval_long_context.py --out_dir runs/part03_window # one trained with a window
    python part03_modern/eval_long_context.py --seq_len 1024 --num_seqs 4  # quicker

Writes long_context.json and long_context.png into --out_dir.
"""
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from matplotlib.figure import Figure
from torch.nn import functional as F
from tqdm import tqdm

from part03_modern.generate import load_model
from part03_modern.model import GPT
from part03_modern.tokenizer import encode_tensor
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import pick_device


@dataclass
class LongContextConfig:
    out_dir: str = field(default="runs/part03_modern", metadata={"help": "folder with ckpt.pt; results go here"})
    data: str = field(default="shakespeare", metadata={"help": "text whose validation split (last tenth) we score"})
    seq_len: int = field(default=4096, metadata={"help": "bytes per scored sequence", "min": 1})
    num_seqs: int = field(default=8, metadata={"help": "sequences, at random places in the validation text", "min": 1})
    buckets: str = field(default="64,256,1024", metadata={
        "help": "bucket edges (positions), comma-separated; the buckets run from 0 to seq_len"})
    n_sink: int = field(default=4, metadata={"help": "attention sinks of the window + sinks mode", "min": 0})
    same_budget: bool = field(default=False, metadata={
        "help": "window + sinks: take the sinks out of the window (window - n_sink recent bytes + n_sink sinks)"})
    recompute_stride: int = field(default=4, metadata={
        "help": "recompute mode: score every k-th position past the first window (1 = all: slow); 0 = skip",
        "min": 0})
    device: str = field(default="cpu", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = 1337


def parse_buckets(text: str) -> list[int]:
    """"64,256,1024" -> [64, 256, 1024]; a ValueError unless they are increasing positive integers."""
    try:
        edges = [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise ValueError(f"--buckets must be comma-separated positions such as 64,256,1024, got {text!r}") from None
    if edges != sorted(set(edges)) or any(e < 1 for e in edges):
        raise ValueError(f"--buckets must be increasing positive positions, got {text!r}")
    return edges


def check_config(cfg) -> None:
    parse_buckets(cfg.buckets)


def with_attention(model: GPT, **changes) -> GPT:
    """The same weights under another attention pattern, e.g. window_size=64, n_sink=4."""
    other = GPT(replace(model.config, **changes)).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other.eval()


@torch.no_grad()
def position_losses(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """Loss of every next-byte prediction of seq (T + 1,) in one forward pass: (T,), entry t scores
    seq[t + 1] given seq[: t + 1]."""
    logits, _ = model(seq[None, :-1])
    return F.cross_entropy(logits[0], seq[1:], reduction="none")


@torch.no_grad()
def recompute_losses(model: GPT, seq: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Like position_losses, but position t sees only its last `window` bytes, run through the model
    afresh (NaN at the positions we skip: past the first window, we score every stride-th one)."""
    T = seq.numel() - 1
    losses = torch.full((T,), float("nan"), device=seq.device)
    losses[:window] = position_losses(model, seq[: window + 1])  # the first window: the crop is the prefix
    ends = torch.arange(window, T, stride, device=seq.device)  # positions t whose window is seq[t-window+1 : t+1]
    for chunk in ends.split(256):  # 256 windows per forward pass
        crops = seq[chunk[:, None] + torch.arange(-window + 1, 1, device=seq.device)]  # (n, window)
        logits, _ = model(crops)
        losses[chunk] = F.cross_entropy(logits[:, -1], seq[chunk + 1], reduction="none")
    return losses


def bucket_means(losses: torch.Tensor, edges: list[int]) -> list[float]:
    """Mean loss (over sequences and the scored positions) in each [edges[i], edges[i+1]) bucket."""
    means = []
    for lo, hi in zip(edges, edges[1:]):
        scored = losses[:, lo:hi][~losses[:, lo:hi].isnan()]
        means.append(scored.mean().item() if scored.numel() else float("nan"))
    return means


def markdown_table(modes: dict[str, dict], edges: list[int]) -> str:
    lines = ["| mode | " + " | ".join(f"{lo}–{hi}" for lo, hi in zip(edges, edges[1:])) + " | all |",
             "| --- |" + " ---: |" * len(edges)]
    for name, mode in modes.items():
        cells = " | ".join(f"{loss:.3f}" for loss in mode["bucket_loss"])
        lines.append(f"| {name} | {cells} | {mode['mean_loss']:.3f} |")
    return "\n".join(lines)


def plot(losses: dict[str, torch.Tensor], seq_len: int, trained_len: int, trained_window: int | None, path: Path,
         title: str) -> None:
    """Mean loss vs context length, averaged over sequences and over log-spaced bins of positions."""
    # position t predicts byte t + 1 from t + 1 bytes of context; bins of context lengths 1, 2, 3-4, ...
    bin_edges = sorted({int(round(x)) - 1 for x in torch.logspace(0, math.log10(seq_len + 1), 30).tolist()})
    centres = [math.sqrt((lo + 1) * hi) for lo, hi in zip(bin_edges, bin_edges[1:])]  # geometric, in context bytes
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name, mode_losses in losses.items():
        points = [(x, y) for x, y in zip(centres, bucket_means(mode_losses, bin_edges)) if not math.isnan(y)]
        ax.plot(*zip(*points), marker=".", label=name)
    marks = {"trained length": trained_len, "trained window": trained_window}
    for label, x in marks.items():
        if x is not None:
            ax.axvline(x, color="gray", linestyle="--" if label == "trained length" else ":", linewidth=1)
            bottom = label == "trained length"  # the two labels at opposite ends, clear of each other
            ax.text(x, ax.get_ylim()[0 if bottom else 1], f" {label} {x}", va="bottom" if bottom else "top",
                    ha="left" if bottom else "right", color="gray", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1, seq_len)
    ax.set_xlabel("bytes of context (position + 1)")
    ax.set_ylabel("next-byte loss (nats), mean over sequences")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    cfg = parse_config(LongContextConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    device = pick_device(cfg.device)
    model = load_model(Path(cfg.out_dir) / "ckpt.pt", device)
    trained = model.config
    window = trained.window_size or trained.block_size  # the span the model trained with
    if not 0 <= cfg.n_sink < window:
        raise ValueError(f"--n_sink {cfg.n_sink} must be between 0 and the window ({window}) minus 1")
    edges = [0, *(e for e in parse_buckets(cfg.buckets) if e < cfg.seq_len), cfg.seq_len]

    _, val_data = train_val_split(encode_tensor(load_text(cfg.data)))
    if len(val_data) <= cfg.seq_len + 1:
        raise ValueError(f"the validation text has {len(val_data):,} bytes: too few for --seq_len {cfg.seq_len}")
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(len(val_data) - cfg.seq_len - 1, (cfg.num_seqs,), generator=generator)
    seqs = [val_data[s : s + cfg.seq_len + 1].long().to(device) for s in starts.tolist()]

    sink_window = window - cfg.n_sink if cfg.same_budget else window
    variants = {
        "full attention": (with_attention(model, window_size=None, n_sink=0), None),
        f"sliding window {window}": (with_attention(model, window_size=window, n_sink=0), None),
        f"window {sink_window} + {cfg.n_sink} sinks": (
            with_attention(model, window_size=sink_window, n_sink=cfg.n_sink), None),
    }
    if cfg.recompute_stride > 0:  # the crop needs a full-attention model: the window is the crop itself
        variants[f"recompute window {window}"] = (variants["full attention"][0], cfg.recompute_stride)
    print(f"{cfg.out_dir}/ckpt.pt: trained with block_size {trained.block_size}, window {trained.window_size}, "
          f"n_sink {trained.n_sink} | {cfg.num_seqs} validation sequences of {cfg.seq_len} bytes | device {device}")

    modes, losses = {}, {}
    bar = tqdm(total=len(variants) * len(seqs), desc="score", unit="seq", dynamic_ncols=True)
    for name, (variant, stride) in variants.items():
        bar.set_postfix(mode=name, refresh=True)
        rows = []
        for seq in seqs:
            rows.append(position_losses(variant, seq) if stride is None
                        else recompute_losses(variant, seq, window, stride))
            bar.update()
        losses[name] = torch.stack(rows).cpu()  # (num_seqs, seq_len); NaN where recompute skipped
        scored = losses[name][~losses[name].isnan()]
        modes[name] = dict(window_size=variant.config.window_size if stride is None else window,
                           n_sink=variant.config.n_sink, recompute_stride=stride,
                           bucket_loss=bucket_means(losses[name], edges), mean_loss=scored.mean().item(),
                           position_loss=[None if math.isnan(x) else x for x in losses[name].mean(0).tolist()])
    bar.close()

    table = markdown_table(modes, edges)
    print(f"mean next-byte loss (nats) by position; the model trained on {trained.block_size}-byte sequences"
          + (f" with a {trained.window_size}-byte window" if trained.window_size else ""))
    print(table)
    out_dir = Path(cfg.out_dir)
    results = dict(checkpoint=str(out_dir / "ckpt.pt"), model_config=asdict(trained), config=asdict(cfg),
                   bucket_edges=edges, table=table, modes=modes)
    json_path, png_path = out_dir / "long_context.json", out_dir / "long_context.png"
    json_path.write_text(json.dumps(results) + "\n")
    plot(losses, cfg.seq_len, trained.block_size, trained.window_size, png_path,
         f"part03: loss beyond the trained length ({cfg.num_seqs} x {cfg.seq_len} val bytes)")
    print(f"wrote {json_path}, {png_path}")
    return results


if __name__ == "__main__":
    run_cli(main)
