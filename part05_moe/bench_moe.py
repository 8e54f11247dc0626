"""Time one training step (forward, backward, AdamW) of the dense model and of MoE variants.

MoE layers keep the active parameters of the dense model but add routing, sorting, gathers and one
small matmul per expert instead of one big one: on a CPU that overhead is what this measures.
Both wall time and the process's CPU time are reported; on a shared machine the CPU time is the
steadier number (it does not count the time other programs hold the cores).

    python part05_moe/bench_moe.py                                  # block 64, batch 16, 1 thread
    python part05_moe/bench_moe.py --block_size 128 --batch_size 8 --threads 2
"""
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
    steps: int = field(default=10, metadata={"help": "timed steps per variant (after 3 warm-up steps)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    seed: int = 0


def time_step(model: GPT, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds per training step, (wall, CPU of this process), after 3 warm-up steps."""
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    for i in range(3 + steps):
        if i == 3:
            wall, cpu = time.perf_counter(), time.process_time()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    base = dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd)
    print(f"{'variant':44s} {'params':>10s} {'active':>10s} {'wall ms':>8s} {'CPU ms':>7s} {'tokens/s':>9s}")
    results = {}
    for name, changes in VARIANTS.items():
        model = GPT(GPTConfig(**base, **changes))
        wall, cpu = time_step(model, x, cfg.steps)
        results[name] = dict(params=model.num_params(), active=model.num_active_params(), wall=wall, cpu=cpu)
        print(f"{name:44s} {model.num_params():>10,} {model.num_active_params():>10,} {1000 * wall:>8.0f} "
              f"{1000 * cpu:>7.0f} {x.numel() / wall:>9,.0f}", flush=True)
    return results


if __name__ == "__main__":
    main()
