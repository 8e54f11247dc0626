"""Benchmark generation with and without the KV cache: tokens/s, and the cache's memory.

Three ways to generate the same greedy text, one token at a time (batch 1):
- no cache: every step runs the model on the context again (the last block_size tokens for a
  full-attention model, as in part 2; the whole text for a sliding-window one);
- rolling cache: model.new_kv_cache(1), n_sink + window slots, the same size however long we go;
- growing cache: one slot per token of the text (capacity = prompt + new tokens), as a plain KV cache.
Beside them, the yardstick: part 2's default model (random init; timings do not depend on the weights)
generating with its own `generate`, which re-runs the last block_size tokens for every new one.
The two caches compute the same thing and give the same tokens; they differ in memory, which we
report as the bytes of the cache tensors (KVCache.nbytes): at a few MiB, the process's resident
memory moves more with the allocator's whims than with the cache. We alternate the modes over
several rounds, so a noisy neighbour slows all of them alike, and report the median tokens/s.

    python part03_modern/bench_generate.py                       # the checkpoint of train.py
    python part03_modern/bench_generate.py --random_init         # no checkpoint needed: same timings
    python part03_modern/bench_generate.py --lengths 128,512 --rounds 5
    python part03_modern/bench_generate.py --window_size 64      # no cache = the whole text every step

Writes bench_generate.json and bench_generate.png into --out_dir.
"""
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from tqdm import tqdm

from part02_tiny_llm.model import GPT as Part2GPT
from part02_tiny_llm.model import GPTConfig as Part2Config
from part02_tiny_llm.train import TrainConfig as Part2TrainConfig
from part03_modern.eval_long_context import with_attention
from part03_modern.generate import load_model, prompt_tensor
from part03_modern.model import GPT, GPTConfig
from part03_modern.tokenizer import VOCAB_SIZE
from part03_modern.train import TrainConfig
from shared.config import parse_config
from shared.device import pick_device, synchronize


@dataclass
class BenchConfig:
    out_dir: str = field(default="runs/part03_modern", metadata={"help": "folder with ckpt.pt; results go here"})
    random_init: bool = field(default=False, metadata={
        "help": "an untrained model of train.py's default size instead of the checkpoint (timings do not depend "
                "on the weights)"})
    lengths: str = field(default="128,512,2048", metadata={"help": "new tokens to generate, comma-separated"})
    rounds: int = field(default=3, metadata={"help": "timed runs per mode and length; we report the median"})
    warmup: int = field(default=16, metadata={"help": "untimed tokens per mode first"})
    start: str = field(default="\n", metadata={"help": "the prompt; default: a newline"})
    window_size: int | None = field(default=None, metadata={
        "help": "give the model this sliding window (no parameters change); none = keep the model's"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default"})
    device: str = field(default="cpu", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = 1337


MODES = ("no cache", "rolling cache", "growing cache")
PART2 = "part 2"  # part 2's default model and its generate(): the speed part 3's generation should at least match


def default_model_config() -> GPTConfig:
    """The model that `python part03_modern/train.py` builds with no flags."""
    train_cfg = TrainConfig()
    shared_fields = {f.name: getattr(train_cfg, f.name) for f in fields(GPTConfig) if hasattr(train_cfg, f.name)}
    return GPTConfig(**shared_fields, vocab_size=VOCAB_SIZE)


def build_model(cfg: BenchConfig, device: str) -> tuple[GPT, str]:
    """The model to time and where it came from."""
    if cfg.random_init:
        torch.manual_seed(cfg.seed)
        model, source = GPT(default_model_config()).to(device).eval(), "random init"
    else:
        path = Path(cfg.out_dir) / "ckpt.pt"
        model, source = load_model(path, device), str(path)
    if cfg.window_size is not None:  # a window has no parameters: same weights, new config
        model = with_attention(model, window_size=cfg.window_size)
    return model, source


def part2_model(seed: int, device: str) -> Part2GPT:
    """The model that `python part02_tiny_llm/train.py` builds with no flags (random weights)."""
    train_cfg = Part2TrainConfig()
    shared_fields = {f.name: getattr(train_cfg, f.name) for f in fields(Part2Config) if hasattr(train_cfg, f.name)}
    torch.manual_seed(seed)
    return Part2GPT(Part2Config(**shared_fields)).to(device).eval()


def run_part2(model: Part2GPT, prompt: torch.Tensor, n_new: int, device: str) -> dict:
    """Part 2's greedy generation of n_new tokens, timed."""
    synchronize(device)
    begin = time.perf_counter()
    model.generate(prompt, n_new, temperature=0)
    synchronize(device)
    return dict(seconds=time.perf_counter() - begin)


def kv_cache_for(model: GPT, mode: str, total_len: int):
    """The cache a mode generates with (None: no cache). The growing cache needs at least the window's slots."""
    if mode == "no cache":
        return None
    if mode == "rolling cache":
        return model.new_kv_cache(1)
    window = model.config.window_size or model.config.block_size
    return model.new_kv_cache(1, capacity=max(total_len, model.config.n_sink + window))


def run_mode(model: GPT, prompt: torch.Tensor, n_new: int, mode: str, device: str) -> dict:
    """Generate n_new greedy tokens in one mode; time it, and measure the cache."""
    kv_cache = kv_cache_for(model, mode, prompt.size(1) + n_new)
    synchronize(device)
    begin = time.perf_counter()
    tokens = list(model.stream(prompt, n_new, temperature=0, use_cache=mode != "no cache", kv_cache=kv_cache))
    synchronize(device)
    seconds = time.perf_counter() - begin
    return dict(tokens=torch.cat(tokens, dim=1)[0].tolist(), seconds=seconds,
                cache_bytes=sum(layer.nbytes() for layer in kv_cache) if kv_cache else 0)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| new tokens | " + " | ".join(f"{m} (tok/s)" for m in (*MODES, PART2))
             + " | speedup (rolling / none) | rolling / part 2 | rolling cache (KiB) | growing cache (KiB) |",
             "|" + " ---: |" * (len(MODES) + 6)]
    for row in rows:
        rates = " | ".join(f"{row['tokens_per_sec'][m]:,.0f}" for m in (*MODES, PART2))
        kib = " | ".join(f"{row['cache_kib'][m]:,.0f}" for m in MODES[1:])
        lines.append(f"| {row['new_tokens']} | {rates} | {row['speedup']:.1f}x | {row['vs_part2']:.2f}x | {kib} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    lengths = [row["new_tokens"] for row in rows]
    fig = Figure(figsize=(10, 4), dpi=120)
    speed_ax, memory_ax = fig.subplots(1, 2)
    colors = {mode: f"C{i}" for i, mode in enumerate((*MODES, PART2))}  # a mode keeps its colour in both panels
    for mode in (*MODES, PART2):
        speed_ax.plot(lengths, [row["tokens_per_sec"][mode] for row in rows], marker="o", color=colors[mode],
                      label=mode, linestyle=":" if mode == PART2 else "-")
    for mode in MODES[1:]:
        memory_ax.plot(lengths, [row["cache_kib"][mode] for row in rows], marker="o", color=colors[mode], label=mode)
    speed_ax.set_ylabel("tokens / s (median)")
    speed_ax.set_ylim(bottom=0)
    memory_ax.set_ylabel("KV cache (KiB, all layers)")
    memory_ax.set_yscale("log", base=2)  # ticks at 128, 256, 512, ... KiB
    memory_ax.yaxis.set_major_formatter(FuncFormatter(lambda kib, _: f"{kib:,.0f}"))
    for ax in (speed_ax, memory_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("new tokens generated")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    lengths = [int(n) for n in cfg.lengths.split(",")]
    if not lengths or min(lengths) < 1 or cfg.rounds < 1:
        raise ValueError(f"--lengths needs positive numbers and --rounds at least 1 "
                         f"(got {cfg.lengths!r} and {cfg.rounds})")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, source = build_model(cfg, device)
    prompt = prompt_tensor(model, cfg.start)
    part2 = part2_model(cfg.seed, device)  # byte-level too: the same prompt ids
    load_before = os.getloadavg()[0]  # timings are only as good as the machine is quiet: we record its load
    print(f"{source} | {model.num_params():,} parameters | window {model.config.window_size} | "
          f"block_size {model.config.block_size} | device {device} | threads {torch.get_num_threads()} | "
          f"load average {load_before:.2f}")
    for mode in MODES:
        run_mode(model, prompt, cfg.warmup, mode, device)
    run_part2(part2, prompt, cfg.warmup, device)

    all_modes = (*MODES, PART2)
    runs = {(n, mode): [] for n in lengths for mode in all_modes}
    bar = tqdm(total=cfg.rounds * len(all_modes) * sum(lengths), desc="generate", unit="tok", dynamic_ncols=True)
    for r in range(cfg.rounds):
        for n in lengths:
            for mode in all_modes if r % 2 == 0 else reversed(all_modes):  # alternate who goes first
                runs[n, mode].append(run_part2(part2, prompt, n, device) if mode == PART2
                                     else run_mode(model, prompt, n, mode, device))
                bar.update(n)
                bar.set_postfix(mode=mode, tok_s=f"{n / runs[n, mode][-1]['seconds']:,.0f}", refresh=False)
    bar.close()

    rows = []
    for n in lengths:
        first = {mode: runs[n, mode][0] for mode in MODES}
        tokens_per_sec = {mode: statistics.median(n / run["seconds"] for run in runs[n, mode]) for mode in all_modes}
        rows.append(dict(
            new_tokens=n, tokens_per_sec=tokens_per_sec,
            speedup=tokens_per_sec["rolling cache"] / tokens_per_sec["no cache"],
            vs_part2=tokens_per_sec["rolling cache"] / tokens_per_sec[PART2],
            cache_kib={mode: first[mode]["cache_bytes"] / 2**10 for mode in MODES},
            # greedy decoding: the caches must not change the text
            caches_agree=first["rolling cache"]["tokens"] == first["growing cache"]["tokens"],
            cache_agrees_with_no_cache=first["rolling cache"]["tokens"] == first["no cache"]["tokens"],
        ))
    table = markdown_table(rows)
    print(table)
    for row in rows:
        if not row["caches_agree"] or not row["cache_agrees_with_no_cache"]:
            print(f"note: at {row['new_tokens']} tokens the modes generated different greedy text "
                  f"(rolling = growing: {row['caches_agree']}, cache = no cache: {row['cache_agrees_with_no_cache']})")

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(model=source, model_config=asdict(model.config), num_params=model.num_params(), device=device,
                   threads=torch.get_num_threads(), load_average=dict(before=load_before, after=os.getloadavg()[0]),
                   config=asdict(cfg), rows=rows, table=table)
    json_path, png_path = out_dir / "bench_generate.json", out_dir / "bench_generate.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    window, block_size = model.config.window_size, model.config.block_size
    attention = f"window {window}" if window else f"full attention, block_size {block_size}"
    plot(rows, png_path, f"part03 generation, batch 1, {device} ({model.num_params():,} params, {attention})")
    print(f"wrote {json_path}, {png_path}")
    return results


if __name__ == "__main__":
    main()
