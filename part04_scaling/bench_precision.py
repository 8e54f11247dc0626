"""Benchmark mixed precision for training: float32 vs bfloat16 autocast (and float16 + GradScaler on CUDA).

The same model, from the same initial weights, trains on the same batches once per dtype, with the steps
of train.py (autocast, clipping, AdamW; the GradScaler for float16; see train_step). We alternate the dtypes step by
step, so a noisy neighbour slows them alike, and report the median step time as tokens/s and the
validation loss after the run (evaluated in float32, so it compares the trained weights, not the
precision of the evaluation).

Whether bfloat16 is faster depends on the hardware: GPUs with tensor cores (and CPUs with AVX512-BF16 or
AMX) multiply bf16 natively, ~2x faster than fp32 or more. A CPU without them converts every operand
and is usually *slower* in bf16 than in fp32; the script tells you which kind you have.
See Micikevicius et al. 2017, "Mixed Precision Training", https://arxiv.org/abs/1710.03740.

    python part04_scaling/bench_precision.py                        # float32 vs bfloat16 (+ float16 on CUDA)
    python part04_scaling/bench_precision.py --steps 200 --device cuda
    python part04_scaling/bench_precision.py --dtypes float32,bfloat16 --threads 2

Prints a markdown table and writes bench_precision.json into --out_dir.
"""
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part04_scaling.model import GPT, GPTConfig
from part04_scaling.tokenizer import encode_tensor, get_tokenizer
from part04_scaling.train import TrainConfig, check_model_shape, estimate_loss, get_batch, lr_at
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import autocast, pick_device, supports_dtype, synchronize

DEFAULTS = TrainConfig()  # the model and batch of `python part04_scaling/train.py` unless a flag says otherwise
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def as_in_train(name: str):
    """A flag like train.py's: its default, help and bounds."""
    return field(default=getattr(DEFAULTS, name), metadata=TRAIN_FIELDS[name].metadata)


@dataclass
class PrecisionConfig:
    out_dir: str = field(default="runs/part04_precision", metadata={"help": "bench_precision.json goes here"})
    dtypes: str = field(default="auto", metadata={"help": "comma-separated float32,bfloat16,float16; auto = float32 "
                                                          "and whatever this device supports"})
    steps: int = field(default=40, metadata={"help": "optimizer steps per dtype (bf16 on a CPU without native "
                                                     "support: several seconds each)", "min": 1})
    skip_steps: int = field(default=3, metadata={"help": "first steps left out of the timing (warm-up); fewer than "
                                                         "--steps", "min": 0})
    warmup_iters: int = field(default=10, metadata={"help": "learning-rate warmup steps", "min": 0})
    eval_iters: int = field(default=10, metadata={"help": "validation batches for the final loss", "min": 1})
    data: str = as_in_train("data")
    vocab_size: int = as_in_train("vocab_size")
    block_size: int = as_in_train("block_size")
    n_layer: int = as_in_train("n_layer")
    n_head: int = as_in_train("n_head")
    n_kv_head: int | None = as_in_train("n_kv_head")
    n_embd: int = as_in_train("n_embd")
    batch_size: int = as_in_train("batch_size")
    learning_rate: float = as_in_train("learning_rate")
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = as_in_train("seed")


def check_config(cfg: PrecisionConfig) -> None:
    """The rules that involve several flags (the bounds of each one are checked before)."""
    if cfg.skip_steps >= cfg.steps:
        raise ValueError(f"--skip_steps {cfg.skip_steps} leaves no step to time: it must be below --steps {cfg.steps}")
    check_model_shape(cfg)


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instructions, from /proc/cpuinfo (Linux; elsewhere: unknown, empty)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def pick_dtypes(spec: str, device: str) -> list[str]:
    if spec == "auto":
        return [d for d in ("float32", "bfloat16", "float16") if supports_dtype(device, d)]
    dtypes = [d.strip() for d in spec.split(",") if d.strip()]
    unsupported = [d for d in dtypes if d not in ("float32", "bfloat16", "float16") or not supports_dtype(device, d)]
    if unsupported or not dtypes:
        raise ValueError(f"--dtypes {spec!r}: {unsupported or 'nothing'} cannot run on {device}; float16 autocast "
                         "needs CUDA or MPS, bfloat16 a recent GPU or any CPU")
    return dtypes


class Run:
    """One dtype's training: its own copy of the model, optimizer, scaler and batch generator."""

    def __init__(self, dtype: str, train_cfg: TrainConfig, model_config: GPTConfig, device: str):
        self.cfg = replace(train_cfg, dtype=dtype)
        torch.manual_seed(train_cfg.seed)  # the same initial weights for every dtype
        self.model = GPT(model_config).to(device)
        self.optimizer = self.model.configure_optimizers(train_cfg.weight_decay, train_cfg.learning_rate,
                                                         (train_cfg.beta1, train_cfg.beta2))
        # float16's narrow range needs loss scaling (as in train.py); for the others the scaler does nothing
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
        self.generator = torch.Generator().manual_seed(train_cfg.seed)  # the same batches for every dtype
        self.step_seconds, self.losses = [], []


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, lr: float, device: str) -> float:
    """One optimizer step on one batch, as train.py takes it; returns the loss."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, run.cfg.dtype):
        _, loss = run.model(x.to(device), y.to(device))
    run.scaler.scale(loss).backward()  # fp16: scaled up so small gradients survive
    run.scaler.unscale_(run.optimizer)  # fp16: clip the true gradients (a no-op otherwise)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or math.inf)
    run.scaler.step(run.optimizer)  # fp16: skips the step if any gradient overflowed to inf/nan
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dtype | tokens/s (median step) | vs float32 | last-10-step train loss | val loss (fp32 eval) | "
             "Δ val loss vs float32 |", "| --- |" + " ---: |" * 5]
    for row in rows:
        lines.append(f"| {row['dtype']} | {row['tokens_per_sec']:,.0f} | {row['speedup']:.2f}x | "
                     f"{row['train_loss']:.4f} | {row['val_loss']:.4f} | {row['val_loss_delta']:+.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse_config(PrecisionConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtypes = pick_dtypes(cfg.dtypes, device)
    if "float32" not in dtypes:
        dtypes.insert(0, "float32")  # the baseline
    train_cfg = replace(DEFAULTS, data=cfg.data, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd,
                        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, max_iters=cfg.steps,
                        warmup_iters=cfg.warmup_iters, eval_iters=cfg.eval_iters, seed=cfg.seed)
    tokenizer = get_tokenizer(cfg.vocab_size, cfg.data)
    train_data, val_data = train_val_split(encode_tensor(tokenizer, load_text(cfg.data)))
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd)
    runs = {dtype: Run(dtype, train_cfg, model_config, device) for dtype in dtypes}
    cpu_flags = cpu_bf16_flags()
    hardware = (torch.cuda.get_device_name(device) if device.startswith("cuda") else
                f"CPU, native bf16: {', '.join(cpu_flags) or 'none (no avx512_bf16 / amx_bf16)'}")
    print(f"{runs['float32'].model.num_params():,} parameters | {device} ({hardware}) | threads "
          f"{torch.get_num_threads()} | load average {os.getloadavg()[0]:.2f} | {cfg.steps} steps x "
          f"{cfg.batch_size * cfg.block_size:,} tokens | dtypes {', '.join(dtypes)}")

    for it in tqdm(range(cfg.steps), desc="train", dynamic_ncols=True):
        lr = lr_at(it, train_cfg)
        for dtype in dtypes if it % 2 == 0 else reversed(dtypes):  # alternate who goes first
            run = runs[dtype]
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, run.generator)
            synchronize(device)
            begin = time.perf_counter()
            loss = train_step(run, x, y, lr, device)
            synchronize(device)
            run.step_seconds.append(time.perf_counter() - begin)
            run.losses.append(loss)

    rows = []
    eval_cfg = replace(train_cfg, dtype="float32")
    for dtype, run in runs.items():
        run.model.eval()
        rows.append(dict(dtype=dtype, val_loss=estimate_loss(run.model, val_data, eval_cfg, device),
                         train_loss=statistics.mean(run.losses[-10:]),
                         tokens_per_sec=cfg.batch_size * cfg.block_size / statistics.median(
                             run.step_seconds[cfg.skip_steps:]),
                         step_losses=run.losses, step_seconds=run.step_seconds))
    base = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_sec"] / base["tokens_per_sec"]
        row["val_loss_delta"] = row["val_loss"] - base["val_loss"]
    table = markdown_table(rows)
    print(table)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(device=device, hardware=hardware, cpu_bf16_flags=cpu_flags, threads=torch.get_num_threads(),
                   load_average=os.getloadavg(), num_params=runs["float32"].model.num_params(), config=asdict(cfg),
                   rows=rows, table=table)
    json_path = out_dir / "bench_precision.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path}")
    return results


if __name__ == "__main__":
    run_cli(main)
