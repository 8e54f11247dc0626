"""Train the part 3 model the way real runs do: BPE tokens, gradient accumulation, mixed precision,
a learning-rate schedule with warmup, checkpoints you can resume exactly, logging, and data parallelism.

The loop is part 3's, grown up. Each optimizer step now averages the gradient of grad_accum_steps
micro-batches (on each of world_size processes under torchrun), clips it, and steps with the
learning rate of the schedule: all of it written out in train(), as in part 3. Every eval_interval
steps we evaluate and save a checkpoint with everything needed to continue bit for bit: weights,
optimizer moments, step, random-number states, and the tokenizer the ids belong to. A run keeps its
out_dir to itself (a lock), never replaces a finished run unless --overwrite, and never saves a
diverged (NaN) model over the last good checkpoint.

    python part04_scaling/train.py                                  # the main run (4.5-8.5 minutes on 2 CPU cores)
    python part04_scaling/train.py --init_from resume               # continue where the last run stopped
    python part04_scaling/train.py --grad_accum_steps 4 --batch_size 8   # a 4x bigger batch in the same memory
    python part04_scaling/train.py --lr_schedule wsd --dtype bfloat16
    torchrun --nproc_per_node=2 part04_scaling/train.py             # data parallel: 2 processes (gloo on CPU)
    python part04_scaling/train.py --help                           # every flag with its default
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from part04_scaling.generate import generate_text
from part04_scaling.model import GPT, GPTConfig
from part04_scaling.tokenizer import encode_tensor, get_tokenizer
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, read_metrics, read_steps


# The training config is the model's config (every GPTConfig field is a flag, so a new model setting is
# added in one place: model.py) plus the data, optimisation and run settings. Fields redeclared here only
# change the default or add help text.
@dataclass
class TrainConfig(GPTConfig):
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file"})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary (256 bytes + merges + <|endoftext|>)",
                                                    "min": 257})
    # the model (part 3's)
    block_size: int = field(default=128, metadata={"help": "context length in tokens (~2.9 bytes each)", "min": 1})
    n_layer: int = field(default=4, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_embd: int = field(default=128, metadata={"min": 1})
    dropout: float = field(default=0.0, metadata={"min": 0, "max": 0.99})
    n_kv_head: int | None = field(default=2, metadata={"help": "key/value heads (GQA); none = n_head, 1 = MQA",
                                                       "min": 1})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency", "min": 1e-9})
    window_size: int | None = field(default=None, metadata={"help": "sliding-window attention; none = full", "min": 1})
    n_sink: int = field(default=0, metadata={"help": "attention sinks kept visible with a window", "min": 0})
    norm: str = field(default="rmsnorm", metadata={"choices": ["rmsnorm", "layernorm"]})
    reference_ops: bool = field(default=False, metadata={"help": "the written-out RMSNorm, RoPE and GQA of the lesson "
                                                                 "instead of PyTorch's fused ops (same numbers, slower)"})
    # the optimisation
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch (per process)", "min": 1})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches averaged into one optimizer step",
                                                       "min": 1})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate", "min": 0})
    lr_schedule: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "wsd", "constant"],
                                                         "help": "shape after the warmup (wsd: warmup-stable-decay)"})
    warmup_iters: int = field(default=100, metadata={"help": "linear warmup from 0 to learning_rate", "min": 0})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "the schedule reaches min_lr here; none = "
                                                                       "max_iters", "min": 1})
    min_lr: float = field(default=2e-4, metadata={"help": "the learning rate at the end of the decay", "min": 0})
    wsd_decay_fraction: float = field(default=0.2, metadata={"help": "wsd: the final fraction of steps that decays",
                                                             "min": 0, "max": 1})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of the weight matrices", "min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = off",
                                                    "min": 0})
    max_iters: int = field(default=3000, metadata={"help": "optimizer steps", "min": 0})
    eval_interval: int = field(default=250, metadata={"help": "evaluate and save a checkpoint every this many steps",
                                                      "min": 1})
    eval_iters: int = field(default=40, metadata={"help": "batches averaged for train_loss/val_loss", "min": 1})
    init_from: str = field(default="scratch", metadata={"choices": ["scratch", "resume"],
                                                        "help": "resume: continue from out_dir/ckpt.pt"})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow start, faster steps)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"],
                                                    "help": "autocast dtype; float16 (CUDA) uses a GradScaler"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part04_scaling"
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard (pip install tensorboard)"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (pip install wandb)"})
    wandb_mode: str = field(default="offline", metadata={"choices": ["offline", "online"],
                                                         "help": "offline needs no account; `wandb sync` later"})
    # the sample printed at the end (generate.py does the same from the saved checkpoint)
    start: str = field(default="\n", metadata={"help": "prompt for the samples; the default is a newline"})
    num_samples: int = field(default=1, metadata={"min": 1})
    max_new_tokens: int = field(default=200, metadata={"min": 0})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy", "min": 0})
    top_k: int | None = field(default=None, metadata={"help": "keep the k likeliest tokens (1 = greedy); none = off",
                                                      "min": 1})
    top_p: float | None = field(default=0.95, metadata={"help": "nucleus sampling, a probability mass in (0, 1]; "
                                                                "none = off", "min": 0, "max": 1})


NOT_THE_MODELS_MEANING = ("reference_ops", "eval_capacity_factor")  # how it computes, not what it computes
# Changing any of these between a run and its resume would make the checkpoint mean something else: every
# model field, the data and its order, and the optimisation (the world size is checked on its own).
MUST_MATCH_ON_RESUME = tuple(f.name for f in fields(GPTConfig) if f.name not in NOT_THE_MODELS_MEANING) + (
    "data", "seed", "batch_size", "grad_accum_steps", "lr_schedule", "learning_rate", "min_lr", "warmup_iters",
    "wsd_decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded or written (ValueError, one line each)."""
    check_bounds(cfg)
    if not cfg.start:
        raise ValueError("--start is empty; the samples need a prompt of at least one character, e.g. a newline")
    if cfg.top_p is not None and cfg.top_p <= 0:
        raise ValueError(f"--top_p must be in (0, 1], got {cfg.top_p}; --top_p none turns nucleus sampling off")
    check_model_shape(cfg)
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")


def check_model_shape(cfg) -> None:
    """The shapes the model needs (part 4's bench_precision.py checks its flags with it too)."""
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"the head size n_embd / n_head = {cfg.n_embd // cfg.n_head} must be even: RoPE rotates "
                         "channel pairs")
    if cfg.n_kv_head is not None and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"--n_head {cfg.n_head} must be a multiple of --n_kv_head {cfg.n_kv_head}")


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The GPTConfig inside the train config (every model field), with the tokenizer's vocabulary size."""
    values = {f.name: getattr(cfg, f.name) for f in fields(GPTConfig)}
    return GPTConfig(**{**values, "vocab_size": vocab_size})


# --- Data ----------------------------------------------------------------------------------------


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator,
              rank: int = 0, world_size: int = 1):
    """batch_size random windows of the token stream: inputs x and next-token targets y, (B, T) each.

    y is x shifted left by one token: y[b, t] = data[start + t + 1], the token right after x[b, t].
    So every position t is trained to predict its next token, B * T predictions per batch.

    NEW (data parallel): this is this process's share of a global batch. Every process draws the same
    world_size * batch_size window starts from an identically seeded generator and keeps its own slice:
    together the processes see exactly the batch one process would see with batch_size * world_size,
    and the data position is one generator state.
    """
    starts = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
    starts = starts[rank * batch_size : (rank + 1) * batch_size]  # (B,)
    positions = starts[:, None] + torch.arange(block_size)  # (B, T)
    x = data[positions].long()
    y = data[positions + 1].long()  # the shift by one; the last start leaves room for it
    return x, y


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, cfg: TrainConfig, device: str) -> float:
    """Mean loss over eval_iters batches. The batches come from a fixed seed, so every evaluation
    scores the same windows and the curve shows the model changing, not the batches."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, generator)
        with autocast(device, cfg.dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    return sum(losses) / len(losses)


# --- Learning-rate schedules -------------------------------------------------------------------------


def lr_at(it: int, cfg: TrainConfig) -> float:
    """The learning rate of step `it`: a linear warmup, then the chosen shape down to min_lr.

    Warmup: Adam's moment estimates start from a handful of gradients and the freshly initialised
    model's gradients are large and noisy; small steps first keep the first updates from wrecking it
    (Goyal et al. 2017, https://arxiv.org/abs/1706.02677). After the warmup, by lr_schedule:
    - cosine: half a cosine from learning_rate to min_lr at lr_decay_iters (Loshchilov & Hutter 2016,
      https://arxiv.org/abs/1608.03983), then min_lr;
    - linear: a straight line to min_lr at lr_decay_iters;
    - wsd, warmup-stable-decay: flat at learning_rate, then a linear decay over the last
      wsd_decay_fraction of the steps (Hu et al. 2024, MiniCPM, https://arxiv.org/abs/2404.06395). The
      flat part lets you stop or extend the run at any time and decay only at the end;
    - constant: learning_rate after the warmup.
    The schedule is a pure function of the step, so resuming needs to save nothing but the step.
    """
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters  # never 0: step 0 already learns a little
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = decay_iters - cfg.wsd_decay_fraction * decay_iters
        if it < decay_start:
            return cfg.learning_rate
        progress = (it - decay_start) / (decay_iters - decay_start)
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)  # 0 -> 1 over the decay
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)  # cosine


# --- Checkpoints: everything needed to continue bit for bit -------------------------------------------


def rng_states(device: str, world_size: int) -> dict:
    """The random-number state of every process (dropout draws from it), as CPU tensors: one per rank.

    Each process seeds its own stream (seed + rank, as nanoGPT does), so dropout masks differ across
    processes; to resume exactly, each process needs its own state back, so we gather them all.
    """
    local = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device).cpu() if device.startswith("cuda") else torch.empty(0)}
    if world_size == 1:
        return {key: [value] for key, value in local.items()}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    return {key: [state[key] for state in gathered] for key in local}


def save_checkpoint(path: Path, model: GPT, optimizer, scaler, generator: torch.Generator, rng: dict,
                    iter_num: int, cfg: TrainConfig, world_size: int, tokenizer, **extra) -> None:
    """Write the full training state, atomically: a crash never leaves half a file (shared/checkpoint.py).

    Only tensors, numbers, strings, lists and dicts go in, so torch.load(path, weights_only=True) can read
    it (weights_only refuses to run arbitrary pickled code from a file someone gave you).
    """
    checkpoint = {
        "model": model.state_dict(),
        "model_config": asdict(model.config),
        "optimizer": optimizer.state_dict(),  # AdamW's moments: without them the first resumed steps jump
        "scaler": scaler.state_dict(),
        "iter_num": iter_num,  # the step to do next; the learning rate is a function of it
        "lr_decay_iters": cfg.lr_decay_iters or cfg.max_iters,  # the schedule's length, fixed for the run
        "train_config": asdict(cfg),
        "world_size": world_size,  # the processes split each batch: another count is another data order
        "rng": {**rng, "batches": generator.get_state()},  # dropout per process, and the data position
        "tokenizer": tokenizer.to_dict(),  # the ids mean nothing without it: it travels with the weights
        **extra,
    }
    atomic_save(checkpoint, path)


def load_checkpoint(path: Path, cfg: TrainConfig, world_size: int) -> dict:
    """Read a checkpoint to resume from, refusing one that was made with a different setup.

    Everything is loaded onto the CPU: load_state_dict copies the weights and the optimizer moments to
    the model's device, and the random-number states must stay CPU byte tensors (on a GPU,
    torch.set_rng_state refuses them).
    """
    if not path.is_file():
        raise FileNotFoundError(f"--init_from resume: no checkpoint at {path}; start a run with --init_from scratch")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["train_config"]
    changed = [f"--{key} {saved.get(key)} -> {getattr(cfg, key)}" for key in MUST_MATCH_ON_RESUME
               if saved.get(key) != getattr(cfg, key)]
    if (cfg.lr_decay_iters or cfg.max_iters) != checkpoint["lr_decay_iters"]:
        changed.append(f"the schedule length {checkpoint['lr_decay_iters']} -> {cfg.lr_decay_iters or cfg.max_iters} "
                       f"(to train longer, pass --lr_decay_iters {checkpoint['lr_decay_iters']})")
    if checkpoint["world_size"] != world_size:
        changed.append(f"the number of processes {checkpoint['world_size']} -> {world_size} (it sets the data order)")
    if changed:
        raise ValueError(f"cannot resume {path}: it was trained with a different config: " + "; ".join(changed))
    return checkpoint


# --- Distributed data parallel ----------------------------------------------------------------------------


def setup_distributed(device: str):
    """Under torchrun (it sets RANK and WORLD_SIZE), join the process group; returns (rank, world_size, device).

    Each process holds a full copy of the model and trains on its own slice of every batch; DDP
    all-reduces (averages) the gradients during backward, so every copy takes the same step
    (Li et al. 2020, https://arxiv.org/abs/2006.15704). gloo is the CPU backend, nccl the GPU one.
    """
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    else:  # the processes share the CPU cores: give each its part, or they fight over the same threads
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# --- Logging -----------------------------------------------------------------------------------------------


class Loggers:
    """metrics.jsonl always; TensorBoard and wandb when asked for (each is imported only then)."""

    def __init__(self, cfg: TrainConfig, resume: bool, start_iter: int):
        # a resumed run re-evaluates its first step: the logger drops the rows from start_iter on, so a run
        # killed between saving a checkpoint and logging its row loses nothing and logs nothing twice
        self.metrics = MetricsLogger(cfg.out_dir, resume=resume, start_iter=start_iter)
        self.tensorboard = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from err
            self.tensorboard = SummaryWriter(Path(cfg.out_dir) / "tensorboard")
        if cfg.wandb:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--wandb needs the wandb package: pip install wandb") from err
            self.wandb = wandb.init(project="llm-from-scratch", name=Path(cfg.out_dir).name, config=asdict(cfg),
                                    dir=cfg.out_dir, mode=cfg.wandb_mode, resume="allow")

    def log(self, **record):
        record = self.metrics.log(**record)
        step = record["iter"]
        for key, value in record.items():
            if key != "iter" and value is not None:
                if self.tensorboard:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=step)

    def close(self):
        self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


# --- Training ----------------------------------------------------------------------------------


def train(cfg: TrainConfig):
    """Train a BPE-token GPT on cfg.data; return (model, results). main() wraps this for the CLI."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world_size, device = setup_distributed(pick_device(cfg.device))
    master = rank == 0  # only the first process evaluates, logs and writes files
    autocast(device, cfg.dtype)  # fail early on an unsupported dtype
    torch.manual_seed(cfg.seed + rank)  # dropout: each process its own masks (nanoGPT's seed_offset)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    resume = cfg.init_from == "resume"
    if master:
        run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
        if not resume:
            check_fresh_run_dir(out_dir, cfg.overwrite)
    checkpoint = load_checkpoint(ckpt_path, cfg, world_size) if resume else None

    tokenizer = get_tokenizer(cfg.vocab_size, cfg.data)
    if checkpoint is not None and checkpoint["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"cannot resume {ckpt_path}: the tokenizer built from --data {cfg.data} differs from the "
                         "checkpoint's (did the data file change?)")
    text = load_text(cfg.data)
    train_data, val_data = train_val_split(encode_tensor(tokenizer, text))
    if len(val_data) <= cfg.block_size:
        raise ValueError(f"--data gives only {len(val_data)} tokens of validation text (the last 10%); it needs "
                         f"more than --block_size {cfg.block_size}. Use a longer text or a smaller block_size.")
    # bits per byte compares models with different tokenizers: nats per token / ln 2 / bytes per token, with
    # the bytes per token of the validation tokens themselves (held-out text compresses worse than average)
    bytes_per_token = len(tokenizer.decode(val_data).encode("utf-8")) / len(val_data)

    model = GPT(model_config(cfg, tokenizer.vocab_size)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    # float16 has a narrow range: small gradients underflow to 0. The GradScaler multiplies the loss
    # before backward and divides the gradients after (Micikevicius et al. 2017, https://arxiv.org/abs/1710.03740).
    # bfloat16 has float32's range and needs none; disabled, the scaler does nothing.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")
    generator = torch.Generator().manual_seed(cfg.seed)  # the data order; the same on every process
    start_iter = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])  # moves Adam's moments to the model's device
        scaler.load_state_dict(checkpoint["scaler"])
        generator.set_state(checkpoint["rng"]["batches"])
        torch.set_rng_state(checkpoint["rng"]["torch"][rank])
        if device.startswith("cuda") and checkpoint["rng"]["cuda"][rank].numel():
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"][rank], device)
        start_iter = checkpoint["iter_num"]
    step_model = torch.compile(model) if cfg.compile else model
    if world_size > 1:
        step_model = DDP(step_model, device_ids=[device] if device.startswith("cuda") else None)
    if master:
        print(f"{len(train_data):,} train / {len(val_data):,} val tokens ({bytes_per_token:.2f} bytes per token) | "
              f"{model.num_params():,} parameters | device {device} x {world_size} | "
              + (f"resuming at step {start_iter}" if checkpoint else "from scratch"))

    loggers = Loggers(cfg, resume=checkpoint is not None, start_iter=start_iter) if master else None
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * world_size
    start = time.perf_counter()
    train_seconds, interval_seconds, interval_iters, tokens_per_sec = 0.0, 0.0, 0, 0.0
    # the last step's loss and gradient norm, logged with the next evaluation (a resumed run gets them back)
    step_loss, grad_norm = (checkpoint.get("step_loss", math.nan), checkpoint.get("grad_norm", math.nan)) if checkpoint \
        else (math.nan, math.nan)
    it = start_iter
    bar = tqdm(range(start_iter, cfg.max_iters + 1), desc="train", dynamic_ncols=True, disable=not master)
    try:
        for it in bar:
            lr = lr_at(it, cfg)
            evaluate = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if evaluate:
                rng = rng_states(device, world_size)  # every process takes part in gathering its state
            if master and evaluate:
                model.eval()
                train_loss = estimate_loss(model, train_data, cfg, device)
                val_loss = estimate_loss(model, val_data, cfg, device)
                model.train()
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):  # never save a broken model
                    raise FloatingPointError(
                        f"step {it}: the loss is {val_loss} (the weights are no longer finite); try a lower "
                        f"--learning_rate (now {cfg.learning_rate}) or a longer --warmup_iters. {ckpt_path} is "
                        "untouched: it holds the last good step")
                if interval_iters:
                    tokens_per_sec = interval_iters * tokens_per_iter / interval_seconds
                # the checkpoint first, then its row: if we die in between, the resumed run evaluates this
                # step again and the logger replaces any row from this step on
                save_checkpoint(ckpt_path, model, optimizer, scaler, generator, rng, it, cfg, world_size, tokenizer,
                                val_loss=val_loss, step_loss=step_loss, grad_norm=grad_norm)
                loggers.log(iter=it, train_loss=train_loss, val_loss=val_loss,
                            val_bits_per_byte=val_loss / math.log(2) / bytes_per_token, lr=lr,
                            tokens_per_sec=tokens_per_sec, step_loss=step_loss, grad_norm=grad_norm)
                bar.write(f"iter {it:5d} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | lr {lr:.2e}")
                interval_seconds, interval_iters = 0.0, 0
            if it == cfg.max_iters:
                break

            # --- one optimizer step ---
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Gradient accumulation: grad_accum_steps micro-batches, each loss divided by their number
            # before backward, so the summed gradients are the gradient of the mean loss: k micro-batches
            # of b sequences give the step of one batch of k*b (up to float rounding), in the memory of b.
            step_loss = 0.0
            for micro_step in range(cfg.grad_accum_steps):
                x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, generator, rank, world_size)
                # under DDP, all-reduce the gradients only once, on the last micro-batch
                last = micro_step == cfg.grad_accum_steps - 1
                sync = step_model.no_sync() if world_size > 1 and not last else nullcontext()
                with sync:
                    with autocast(device, cfg.dtype):
                        _, loss = step_model(x.to(device), y.to(device))
                    loss = loss / cfg.grad_accum_steps
                    scaler.scale(loss).backward()  # fp16: scaled up so small gradients survive
                step_loss += loss.item()
            if world_size > 1:  # log (and check) the loss of the whole global batch, not this process's share
                mean_loss = torch.tensor(step_loss, device=device)
                dist.all_reduce(mean_loss)  # sum over processes
                step_loss = mean_loss.item() / world_size
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"step {it}: the loss became {step_loss}; try a lower --learning_rate (now "
                                         f"{cfg.learning_rate}) or a longer --warmup_iters. {ckpt_path} is "
                                         "untouched: it holds the last good step")
            scaler.unscale_(optimizer)  # fp16: clip the true gradients (a no-op otherwise)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise FloatingPointError(f"step {it}: the gradient norm is {grad_norm}; try a lower --learning_rate "
                                         f"or --grad_clip 1. {ckpt_path} (the last good checkpoint) is untouched")
            scaler.step(optimizer)  # fp16: skips the step if any gradient overflowed to inf/nan
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            step_seconds = time.perf_counter() - step_start
            train_seconds += step_seconds
            interval_seconds += step_seconds
            interval_iters += 1
            if master:
                loggers.metrics.log_step(it, step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{interval_iters * tokens_per_iter / interval_seconds:,.0f}",
                            refresh=False)
    except KeyboardInterrupt:  # Ctrl-C mid-step leaves a half-done step: keep the last whole checkpoint instead
        if master and ckpt_path.is_file():
            print(f"\ninterrupted at step {it}; {ckpt_path} holds step "
                  f"{torch.load(ckpt_path, weights_only=True)['iter_num']}: continue with --init_from resume")
        raise
    finally:
        bar.close()
        if loggers:
            loggers.close()
    seconds = time.perf_counter() - start
    if world_size > 1:
        dist.barrier()  # everyone finished before the master reads the files and the group goes away
        dist.destroy_process_group()
    if not master:
        return model, {}

    records = read_metrics(loggers.metrics.path)
    plot_loss(records, out_dir / "loss.png", title=f"part04: BPE-{tokenizer.vocab_size} GPT on {Path(cfg.data).name}",
              steps=read_steps(out_dir))
    tokenizer.save(out_dir / "tokenizer.json")  # for people and tools; generate.py reads the checkpoint's copy

    model.eval()
    samples = generate_text(model, tokenizer, cfg.start, cfg.num_samples, cfg.max_new_tokens, cfg.temperature,
                            cfg.top_k, cfg.top_p)
    val_loss = records[-1]["val_loss"]
    results = dict(train_loss=records[-1]["train_loss"], val_loss=val_loss,
                   val_bits_per_byte=records[-1]["val_bits_per_byte"], bytes_per_token=bytes_per_token,
                   iters=cfg.max_iters, seconds=seconds, train_seconds=train_seconds,
                   tokens_per_sec=(cfg.max_iters - start_iter) * tokens_per_iter / max(train_seconds, 1e-9),
                   num_params=model.num_params(), samples=samples, ckpt=str(ckpt_path), config=asdict(cfg))
    for sample in samples:
        print("-" * 80 + f"\n{sample}")
    print("-" * 80)
    print(f"val loss {val_loss:.4f} nats/token = {results['val_bits_per_byte']:.3f} bits per byte "
          f"({bytes_per_token:.2f} bytes per token; train {results['train_loss']:.4f})")
    print(f"{seconds:.1f} s ({results['tokens_per_sec']:,.0f} tokens/s in training steps); "
          f"wrote {out_dir / 'metrics.jsonl'}, {out_dir / 'loss.png'}, {ckpt_path}, {out_dir / 'tokenizer.json'}")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
