"""Benchmark one training step of part 3's model against part 2's, at the same shape, and profile both.

Both models train on the same batch in the same process, one step exactly as train.py takes it (forward,
backward, clip, AdamW step; part02_tiny_llm/bench_train_step.py's make_step). We alternate between them over
several rounds, so a noisy neighbour slows both alike, and report the median tokens/s of each and their
ratio. Then a short profile of each (torch.profiler): the operations that took the most CPU time, which is
where to look for the next speed-up.

    python part03_modern/bench_train_step.py                    # the two train.py defaults
    python part03_modern/bench_train_step.py --reference_ops    # part 3 with the written-out RMSNorm, RoPE, GQA
    python part03_modern/bench_train_step.py --norm layernorm   # part 3 with LayerNorm: what F.rms_norm costs
    python part03_modern/bench_train_step.py --n_layer 6 --n_embd 192 --block_size 256 --profile_rows 0
"""
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: the chapters import from anywhere

import torch
from torch.profiler import ProfilerActivity, profile

from part02_tiny_llm.bench_train_step import make_step, time_steps
from part02_tiny_llm.model import GPT as Part2GPT
from part02_tiny_llm.model import GPTConfig as Part2Config
from part03_modern.model import GPT, GPTConfig
from shared.config import parse_config, run_cli
from shared.device import pick_device


@dataclass
class BenchConfig:
    # the shape of both train.py defaults
    n_layer: int = field(default=4, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_kv_head: int | None = field(default=2, metadata={"help": "part 3's key/value heads; none = n_head", "min": 1})
    n_embd: int = field(default=128, metadata={"min": 1})
    block_size: int = field(default=64, metadata={"min": 1})
    batch_size: int = field(default=12, metadata={"min": 1})
    vocab_size: int = field(default=256, metadata={"min": 1})
    learning_rate: float = 2e-3
    norm: str = field(default="rmsnorm", metadata={"choices": ["rmsnorm", "layernorm"],
                                                   "help": "part 3's norm (layernorm: one fused kernel on the CPU)"})
    reference_ops: bool = field(default=False, metadata={
        "help": "part 3 with its written-out RMSNorm, RoPE and GQA head repeat instead of the fused ops"})
    rounds: int = field(default=7, metadata={"help": "alternations between the two models; we report the median",
                                             "min": 1})
    steps: int = field(default=20, metadata={"help": "timed training steps per model per round", "min": 1})
    warmup: int = field(default=5, metadata={"help": "untimed steps per model first", "min": 0})
    profile_steps: int = field(default=10, metadata={"help": "steps per model under the profiler", "min": 1})
    profile_rows: int = field(default=15, metadata={"help": "operations listed per profile; 0 = no profile",
                                                    "min": 0})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})
    device: str = field(default="cpu", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = 1337


def check_config(cfg: BenchConfig) -> None:
    if cfg.n_embd % cfg.n_head or cfg.n_head % (cfg.n_kv_head or cfg.n_head):
        raise ValueError(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head}), and --n_head a "
                         f"multiple of --n_kv_head ({cfg.n_kv_head})")


def build_models(cfg: BenchConfig, device: str) -> dict:
    """part 2's GPT and part 3's, at cfg's shape, each with its train.py defaults otherwise."""
    shape = dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_embd=cfg.n_embd, dropout=0.0)
    torch.manual_seed(cfg.seed)
    part2 = Part2GPT(Part2Config(**shape, bias=True)).to(device)
    part3 = GPT(GPTConfig(**shape, bias=False, n_kv_head=cfg.n_kv_head, norm=cfg.norm,
                          reference_ops=cfg.reference_ops)).to(device)
    return {"part02": part2, "part03": part3}


def profile_table(step, n: int, rows: int) -> str:
    """The `rows` operations that took the most CPU time (their own, not their callees') over n steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    models = build_models(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=generator).to(device)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # one batch, shared by both models
    steps = {name: make_step(model, model.configure_optimizers(0.1, cfg.learning_rate, (0.9, 0.99)), x, y)
             for name, model in models.items()}

    ops = "written-out (reference_ops)" if cfg.reference_ops else "fused"
    print(f"batch {cfg.batch_size} x {cfg.block_size} tokens | n_layer {cfg.n_layer}, n_head {cfg.n_head}, "
          f"n_embd {cfg.n_embd} | part03: n_kv_head {cfg.n_kv_head}, {cfg.norm}, {ops} ops | device {device} | "
          f"threads {torch.get_num_threads()}")
    for name, model in models.items():
        print(f"{name}: {model.num_params():,} parameters; {cfg.warmup} warm-up steps took "
              f"{time_steps(steps[name], cfg.warmup, device):.1f} s")
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    rates = {name: [] for name in steps}
    for r in range(cfg.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate who goes first
        for name in order:
            rates[name].append(tokens / time_steps(steps[name], cfg.steps, device))
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:,.0f} tok/s" for name in steps))
    results = {name: statistics.median(values) for name, values in rates.items()}
    results["ratio"] = results["part03"] / results["part02"]
    # each round's own ratio: both models timed back to back, so a slow spell of the machine mostly cancels
    results["round_ratio"] = statistics.median(a / b for a, b in zip(rates["part03"], rates["part02"]))
    for name in steps:
        print(f"{name}: {results[name]:,.0f} tokens/s, median of {cfg.rounds} rounds")
    print(f"part03 / part02 = {results['ratio']:.3f} (the median of each round's ratio: {results['round_ratio']:.3f})")

    if cfg.profile_rows:
        for name, step in steps.items():
            print(f"\n{name}: top {cfg.profile_rows} operations by self CPU time over {cfg.profile_steps} steps")
            print(profile_table(step, cfg.profile_steps, cfg.profile_rows))
    return results


if __name__ == "__main__":
    run_cli(main)
