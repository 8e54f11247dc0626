"""Generation speed of part 5's MoE against the dense model and part 2's: batch 1, greedy, KV cache.

Generating, a batch holds one token per step, and routing is per token: each MoE layer runs the router, a
top-k and k small expert calls for that one token, where the dense MLP runs one. This times what that
costs. Three models, built from the train.py defaults with random weights (timings do not depend on them):
- part 5's default MoE, generating with the KV cache (the rolling buffer);
- the same model with dense MLPs (`--n_expert 0`: part 4's model), with the cache;
- part 2's default model with its own generate(): no cache, the last block_size bytes again for every token.
We alternate the three over several rounds, so a noisy neighbour slows all of them alike, and report the
median tokens/s. Part 2's tokens are bytes and part 5's are BPE tokens (about 2.9 bytes each on this corpus),
so per byte of text part 5 is faster still.

    python part05_moe/bench_generate.py
    python part05_moe/bench_generate.py --new_tokens 128,512 --rounds 5 --threads 1
"""
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part02_tiny_llm.model import GPT as Part2GPT
from part02_tiny_llm.model import GPTConfig as Part2Config
from part02_tiny_llm.train import TrainConfig as Part2TrainConfig
from part05_moe.model import GPT, GPTConfig
from part05_moe.train import TrainConfig
from shared.config import parse_config, parse_int_list, run_cli


@dataclass
class BenchConfig:
    new_tokens: str = field(default="128,512", metadata={"help": "tokens to generate per run, comma-separated"})
    rounds: int = field(default=3, metadata={"help": "timed runs per model and length; we report the median",
                                             "min": 1})
    warmup: int = field(default=16, metadata={"help": "untimed tokens per model first", "min": 0})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})
    out_dir: str = field(default="runs/part05_moe", metadata={"help": "bench_generate.json goes here"})
    seed: int = 1337


def default_config(train_cfg, config_cls, **overrides):
    """The model config a train.py builds with no flags: the fields the two dataclasses share."""
    shared = {f.name: getattr(train_cfg, f.name) for f in fields(config_cls) if hasattr(train_cfg, f.name)}
    return config_cls(**{**shared, **overrides})


def build_models(seed: int) -> dict:
    torch.manual_seed(seed)
    moe_cfg = default_config(TrainConfig(), GPTConfig)
    return {
        "part 5 MoE, cached": GPT(moe_cfg).eval(),
        "part 5 dense (--n_expert 0), cached": GPT(default_config(TrainConfig(), GPTConfig, n_expert=0)).eval(),
        "part 2, its generate() (no cache)": Part2GPT(default_config(Part2TrainConfig(), Part2Config)).eval(),
    }


@torch.no_grad()
def time_generation(model, n_new: int) -> float:
    """Seconds to generate n_new greedy tokens after a one-token prompt (id 10: a newline byte in part 2)."""
    prompt = torch.tensor([[10]])
    begin = time.perf_counter()
    model.generate(prompt, n_new, temperature=0)  # part 5: use_cache=True by default
    return time.perf_counter() - begin


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    lengths = parse_int_list(cfg.new_tokens, "new_tokens")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    models = build_models(cfg.seed)
    for model in models.values():
        if cfg.warmup:
            time_generation(model, cfg.warmup)
    seconds = {(name, n): [] for name in models for n in lengths}
    bar = tqdm(total=cfg.rounds * len(models) * sum(lengths), desc="generate", unit="tok", dynamic_ncols=True)
    for r in range(cfg.rounds):
        for n in lengths:
            for name in models if r % 2 == 0 else reversed(models):  # alternate who goes first
                seconds[name, n].append(time_generation(models[name], n))
                bar.update(n)
    bar.close()
    tokens_per_sec = {name: {n: statistics.median(n / s for s in seconds[name, n]) for n in lengths} for name in models}
    part2 = "part 2, its generate() (no cache)"
    print(f"threads {torch.get_num_threads()}, medians of {cfg.rounds} rounds")
    print("| model | params | " + " | ".join(f"{n} tokens (tok/s)" for n in lengths) + " | vs part 2 |")
    print("| --- | ---: |" + " ---: |" * (len(lengths) + 1))
    for name, model in models.items():
        rates = " | ".join(f"{tokens_per_sec[name][n]:,.0f}" for n in lengths)
        ratios = " / ".join(f"{tokens_per_sec[name][n] / tokens_per_sec[part2][n]:.2f}x" for n in lengths)
        print(f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {rates} | {ratios} |")
    results = dict(config=asdict(cfg), threads=torch.get_num_threads(),
                   tokens_per_sec={name: {str(n): v for n, v in rates.items()} for name, rates in tokens_per_sec.items()})
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_generate.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_dir / 'bench_generate.json'}")
    return results


if __name__ == "__main__":
    run_cli(main)
