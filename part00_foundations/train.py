"""Part 0: the smallest complete training loop, for a byte-level bigram or MLP language model.

    python part00_foundations/train.py                     # the MLP, on the default Shakespeare corpus
    python part00_foundations/train.py --model bigram      # the bigram baseline
    python part00_foundations/train.py --profile           # + torch.profiler table and a Chrome trace
    python part00_foundations/train.py --dtype bfloat16    # mixed precision with autocast
    python part00_foundations/train.py --help              # every flag with its default

Every later chapter's train.py grows out of this loop: sample a batch, forward, loss, backward,
optimizer step; now and then measure the loss on held-out text, log it and plot it.
"""
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part00_foundations.model import MODELS, ModelConfig
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import autocast, peak_memory_mb, pick_device, synchronize
from shared.metrics import MetricsLogger, plot_loss, read_steps

PROFILE_SCHEDULE = dict(wait=1, warmup=1, active=3)  # skip 1 step, warm up 1, record 3


@dataclass
class TrainConfig:
    model: str = field(default="mlp", metadata={"help": "which model", "choices": sorted(MODELS)})
    # data
    data: str = field(default="shakespeare", metadata={"help": "'shakespeare', 'tinyshakespeare' or a path to a UTF-8 file"})
    batch_size: int = field(default=32, metadata={"min": 1})
    block_size: int = field(default=64, metadata={"help": "bytes per training sequence; every position is a training example", "min": 1})
    # model (the MLP's; the bigram has no knobs)
    context: int = field(default=4, metadata={"help": "MLP: how many previous bytes it sees", "min": 1})
    n_embd: int = field(default=16, metadata={"help": "MLP: embedding size per byte", "min": 1})
    n_hidden: int = field(default=256, metadata={"help": "MLP: hidden layer width", "min": 1})
    activation: str = field(default="tanh", metadata={"choices": ["tanh", "gelu"]})
    # optimization
    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate (constant)", "min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    max_iters: int = field(default=1000, metadata={"min": 0})
    eval_interval: int = field(default=100, metadata={"min": 1})
    eval_iters: int = field(default=20, metadata={"help": "batches averaged per loss estimate", "min": 1})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    dtype: str = field(default="float32", metadata={"help": "autocast dtype", "choices": ["float32", "bfloat16"]})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part00_foundations"
    profile: bool = field(default=False, metadata={"help": "profile a few steps: print the op table, write trace.json"})
    max_new_tokens: int = field(default=300, metadata={"help": "bytes to sample at the end", "min": 0})


def encode(text: str) -> torch.Tensor:
    """Text -> a 1-D tensor of byte values 0..255 (UTF-8)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(ids).decode("utf-8", errors="replace")  # a sampled multi-byte char may be cut in half


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, device: str):
    """batch_size random windows of block_size bytes; y is x shifted left by one (the next bytes)."""
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, splits: dict, cfg: TrainConfig, device: str) -> dict:
    """Average loss over eval_iters random batches of each split (one batch is too noisy)."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, device)
            with autocast(device, cfg.dtype):
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[name] = losses.mean().item()
    model.train()
    return out


def make_profiler(cfg: TrainConfig, device: str, out_dir: Path):
    """torch.profiler over a few training steps; prints the top ops and writes a Chrome trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def on_trace_ready(prof):
        sort_by = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        tqdm.write(f"\ntorch.profiler: {PROFILE_SCHEDULE['active']} training steps, top ops by {sort_by}")
        tqdm.write(prof.key_averages().table(sort_by=sort_by, row_limit=15))
        trace = out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        tqdm.write(f"Chrome trace: {trace} (open it in chrome://tracing or https://ui.perfetto.dev)\n")

    schedule = torch.profiler.schedule(**PROFILE_SCHEDULE, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_trace_ready)


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0])
    profile_steps = sum(PROFILE_SCHEDULE.values())
    if cfg.profile and cfg.max_iters < profile_steps:
        raise ValueError(f"--profile needs --max_iters >= {profile_steps} (got {cfg.max_iters})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- data: bytes, 90% train / 10% validation ---
    data = encode(load_text(cfg.data))
    train_data, val_data = train_val_split(data)
    if len(val_data) <= cfg.block_size:
        raise ValueError(
            f"--data has {len(data)} bytes: its validation tail ({len(val_data)} bytes) is shorter than "
            f"--block_size {cfg.block_size} + 1. Use a longer text or a smaller --block_size."
        )
    splits = {"train": train_data, "val": val_data}

    # --- model and optimizer ---
    model_cfg = ModelConfig(context=cfg.context, n_embd=cfg.n_embd, n_hidden=cfg.n_hidden, activation=cfg.activation)
    model = MODELS[cfg.model](model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    print(f"{cfg.model}: {model.num_params():,} parameters | {len(train_data):,} train bytes, "
          f"{len(val_data):,} val bytes | device {device}, dtype {cfg.dtype}")

    logger = MetricsLogger(out_dir)
    records = []
    tokens_per_step = cfg.batch_size * cfg.block_size
    profiler = make_profiler(cfg, device, out_dir) if cfg.profile else contextlib.nullcontext()
    train_time, train_tokens = 0.0, 0  # time spent in training steps only (not in evaluation)
    start = time.perf_counter()
    bar = tqdm(range(cfg.max_iters + 1), desc=f"part00 {cfg.model}", unit="it")
    with profiler:
        for it in bar:
            # evaluate at iteration 0 (the untrained model), every eval_interval, and at the end
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                losses = estimate_loss(model, splits, cfg, device)
                record = logger.log(
                    iter=it, train_loss=losses["train"], val_loss=losses["val"],
                    val_bpb=losses["val"] / math.log(2), lr=cfg.learning_rate,
                    tokens_per_sec=train_tokens / train_time if train_time else None,
                    elapsed=time.perf_counter() - start,
                )
                records.append(record)
            if it == cfg.max_iters:
                break

            t0 = time.perf_counter()
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, device)
            with torch.profiler.record_function("forward"), autocast(device, cfg.dtype):
                _, loss = model(x, y)
            with torch.profiler.record_function("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with torch.profiler.record_function("optimizer_step"):
                optimizer.step()
            loss_value = loss.item()  # waits for the device, so the timing below is honest
            train_time += time.perf_counter() - t0
            logger.log_step(it, loss_value)
            train_tokens += tokens_per_step
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at iteration {it}: training diverged. "
                    f"Try a lower --learning_rate (now {cfg.learning_rate})."
                )
            if cfg.profile:
                profiler.step()
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{train_tokens / train_time:,.0f}", refresh=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    logger.close()
    plot_loss(records, out_dir / "loss.png", title=f"part00_foundations: {cfg.model}", steps=read_steps(out_dir))

    # --- a sample: start from a newline and let the model write ---
    model.eval()
    start_ids = encode("\n").view(1, -1).to(device)
    sample = decode(model.generate(start_ids, cfg.max_new_tokens)[0, 1:].tolist())
    print(f"--- sample ({cfg.max_new_tokens} bytes) ---\n{sample}\n---")

    final = records[-1]
    result = dict(
        model=cfg.model, params=model.num_params(), iters=cfg.max_iters,
        train_loss=final["train_loss"], val_loss=final["val_loss"], val_bpb=final["val_bpb"],
        tokens_per_sec=train_tokens / train_time if train_time else 0.0, seconds=seconds,
        peak_memory_mb=peak_memory_mb(device), sample=sample, config=asdict(cfg),
    )
    print(f"final val loss {result['val_loss']:.4f} nats/byte = {result['val_bpb']:.4f} bits/byte "
          f"(uniform guess: ln 256 = {math.log(256):.4f} nats = 8 bits) | train loss {result['train_loss']:.4f}")
    print(f"{seconds:.1f} s, {result['tokens_per_sec']:,.0f} tokens/s in training steps | "
          f"peak memory {result['peak_memory_mb']:.0f} MiB ({'allocator' if device.startswith('cuda') else 'process RSS'})")
    print(f"wrote {out_dir / 'metrics.jsonl'} and {out_dir / 'loss.png'}")
    return result


if __name__ == "__main__":
    run_cli(main)
