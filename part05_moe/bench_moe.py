"""Time one training step (forward, backward, AdamW) of the dense model and of MoE variants.

MoE layers keep the active parameters of the dense model but add routing, sorting, gathers and one
small matmul per expert instead of one big one: on a CPU that overhead is what this measures.
Both wall time and the process's CPU time are reported; on a shared machine the CPU time is the
steadier number (it does not count the time other programs hold the cores). The variants are timed
interleaved (a few steps of each, round after round, the median kept), so a change in the machine's load
hits all of them alike; `ratio` is a variant's step time over the dense model's: for a comparison at equal
wall time, give the dense run round(ratio x the MoE's steps).

    python part05_moe/bench_moe.py                                  # block 64, batch 16, 1 thread
    python part05_moe/bench_moe.py --block_size 128 --batch_size 8 --threads 2
    python part05_moe/bench_moe.py --block_size 128 --batch_size 8 --only 'dense (,(default)' --moe n_expert=16
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch

from part05_moe.model import GPT, GPTConfig
from shared.config import parse_config

VARIANTS = {  # name: GPTConfig changes; the MoE ones have the dense model's active parameters unless noted
    "dense (--n_expert 0)": dict(n_expert=0),
    "MoE 8 x 168, top-2 (default)": dict(n_expert=8, moe_top_k=2, expert_hidden=168),
    "MoE 8 x 168, top-1 (half the active MLP)": dict(n_expert=8, moe_top_k=1, expert_hidden=168),
    "MoE 8 x 336, top-1 (Switch)": dict(n_expert=8, moe_top_k=1, expert_hidden=None),
    "dense first + 1 shared + top-1 of 8 x 168": dict(n_expert=8, moe_top_k=1, expert_hidden=168, n_shared_expert=1,
                                                     n_dense_first=1),
}


@dataclass
class BenchConfig:
    block_size: int = 64
    batch_size: int = 16
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    dropout: float = field(default=0.0, metadata={"help": "dropout of every variant (it costs time too)", "min": 0})
    only: str = field(default="", metadata={"help": "comma-separated parts of variant names to keep, e.g. "
                                                    "'dense (,(default)'; empty = all"})
    moe: str = field(default="", metadata={"help": "one more variant: the default MoE with these GPTConfig changes, "
                                                   "e.g. n_expert=4,moe_top_k=2 (empty: none)"})
    steps: int = field(default=1, metadata={"help": "timed steps per variant and round", "min": 1})
    rounds: int = field(default=20, metadata={"help": "interleaved rounds; each variant's median round counts",
                                             "min": 1})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    seed: int = 0


def parse_changes(spec: str) -> dict:
    """'n_expert=4,expert_hidden=none' -> {'n_expert': 4, 'expert_hidden': None}, typed like GPTConfig's defaults."""
    changes = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        default = GPTConfig.__dataclass_fields__[key].default
        if value.lower() == "none":
            changes[key] = None
        elif isinstance(default, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = float(value) if isinstance(default, float) or "." in value else int(value)
    return changes


def training_step(model: GPT, optimizer, x: torch.Tensor):
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    base = dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    variants = {name: changes for name, changes in VARIANTS.items()
                if not cfg.only or any(part in name for part in cfg.only.split(","))}
    if cfg.moe:
        variants[f"MoE --moe {cfg.moe}"] = {**VARIANTS["MoE 8 x 168, top-2 (default)"], **parse_changes(cfg.moe)}
    runs = {}
    for name, changes in variants.items():
        model = GPT(GPTConfig(**base, **changes)).train()
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
        for _ in range(3):  # warm-up: allocations, the first pass through every kernel
            training_step(model, optimizer, x)
        runs[name] = dict(model=model, optimizer=optimizer, wall=[], cpu=[])
    for _ in range(cfg.rounds):  # interleaved: a few steps of each variant per round
        for run in runs.values():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(cfg.steps):
                training_step(run["model"], run["optimizer"], x)
            run["wall"].append((time.perf_counter() - wall) / cfg.steps)
            run["cpu"].append((time.process_time() - cpu) / cfg.steps)
    results = {}
    first = statistics.median(next(iter(runs.values()))["cpu"])  # ratios relative to the first variant (dense)
    print(f"{'variant':44s} {'params':>10s} {'active':>10s} {'wall ms':>8s} {'CPU ms':>7s} {'ratio':>6s} "
          f"{'tokens/s':>9s}   (medians of {cfg.rounds} interleaved rounds of {cfg.steps} steps; ratio: CPU time "
          f"over the first row's)")
    for name, run in runs.items():
        model, wall, cpu = run["model"], statistics.median(run["wall"]), statistics.median(run["cpu"])
        results[name] = dict(params=model.num_params(), active=model.num_active_params(), wall=wall, cpu=cpu,
                             ratio=cpu / first)
        print(f"{name:44s} {model.num_params():>10,} {model.num_active_params():>10,} {1000 * wall:>8.0f} "
              f"{1000 * cpu:>7.0f} {cpu / first:>6.3f} {x.numel() / wall:>9,.0f}", flush=True)
    return results


if __name__ == "__main__":
    main()
