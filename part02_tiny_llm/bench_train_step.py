"""Benchmark one training step (forward + backward + clip + AdamW step) of our GPT against a reference.

The reference is a plain GPT-2-style model of the same shape written below with PyTorch's stock
parts (nn.LayerNorm, F.scaled_dot_product_attention, nn.GELU, torch.optim.AdamW with its defaults);
ours is model.py's GPT with its configure_optimizers (two weight-decay groups, fused AdamW). Both
train on the same batch in the same process; we alternate between them over several rounds, so a
noisy neighbour slows both alike, and report the median tokens/s of each.

    python part02_tiny_llm/bench_train_step.py                  # nanoGPT's CPU shape
    python part02_tiny_llm/bench_train_step.py --n_layer 6 --n_embd 192 --block_size 256
    python part02_tiny_llm/bench_train_step.py --compile        # both models through torch.compile
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.nn as nn
from torch.nn import functional as F

from part02_tiny_llm.model import GPT, GPTConfig
from shared.config import parse_config
from shared.device import pick_device, synchronize


@dataclass
class BenchConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    vocab_size: int = 256
    learning_rate: float = 1e-3
    rounds: int = field(default=7, metadata={"help": "alternations between the two models; we report the median"})
    steps: int = field(default=20, metadata={"help": "timed training steps per model per round"})
    warmup: int = field(default=5, metadata={"help": "untimed steps per model first"})
    compile: bool = field(default=False, metadata={"help": "torch.compile both models"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default"})
    device: str = field(default="cpu", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = 1337


# --- The reference: GPT-2 with stock PyTorch parts --------------------------------------------------


class ReferenceBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: BenchConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([ReferenceBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# --- Timing ---------------------------------------------------------------------------------------


def make_step(model, optimizer, x, y):
    """One training step exactly as train.py takes it."""

    def step():
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def time_steps(step, n: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ours = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=True)).to(device)
    reference = ReferenceGPT(cfg).to(device)
    n_ours, n_ref = ours.num_params(), sum(p.numel() for p in reference.parameters())
    assert n_ours == n_ref, f"the two models differ in size: {n_ours} vs {n_ref} parameters"
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=generator).to(device)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # one batch, shared by both models
    betas = (0.9, 0.99)
    steps = {
        "ours": make_step(torch.compile(ours) if cfg.compile else ours,
                          ours.configure_optimizers(0.1, cfg.learning_rate, betas), x, y),
        "reference": make_step(torch.compile(reference) if cfg.compile else reference,
                               torch.optim.AdamW(reference.parameters(), lr=cfg.learning_rate, betas=betas,
                                                 weight_decay=0.1), x, y),
    }

    print(f"{n_ours:,} parameters | batch {cfg.batch_size} x {cfg.block_size} tokens | device {device} | "
          f"threads {torch.get_num_threads()} | compile {cfg.compile}")
    for name, step in steps.items():  # the first steps pay for torch.compile, if on
        print(f"{name}: {cfg.warmup} warm-up steps took {time_steps(step, cfg.warmup, device):.1f} s")
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    rates = {name: [] for name in steps}
    for r in range(cfg.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate who goes first
        for name in order:
            rates[name].append(tokens / time_steps(steps[name], cfg.steps, device))
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:,.0f} tok/s" for name in steps))
    results = {name: statistics.median(values) for name, values in rates.items()}
    results["speedup"] = results["ours"] / results["reference"]
    tokens_per_step = cfg.batch_size * cfg.block_size
    for name in steps:
        print(f"{name:>9}: {results[name]:,.0f} tokens/s ({1000 * tokens_per_step / results[name]:.1f} ms/step), "
              f"median of {cfg.rounds} rounds")
    print(f"ours / reference = {results['speedup']:.3f}")
    return results


if __name__ == "__main__":
    main()
