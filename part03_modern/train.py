"""Train the modern (Llama/Mistral-style) byte-level GPT on Shakespeare: part 2's loop, new model.

The training loop is part 2's, unchanged; the model is part03_modern/model.py (RMSNorm, RoPE, SwiGLU,
grouped-query attention). The flags for the new parts are --n_kv_head, --rope_theta, --window_size,
--n_sink, --norm and --reference_ops (train with the written-out RMSNorm, RoPE and GQA instead of the
fused ops: the same numbers, slower). At the end we save the weights and print a sample generated with
the KV cache.

    python part03_modern/train.py                        # the main run (minutes on a laptop CPU)
    python part03_modern/train.py --norm layernorm       # the RMSNorm vs LayerNorm experiment
    python part03_modern/train.py --window_size 32       # train with sliding-window attention
    python part03_modern/train.py --help                 # every flag with its default
"""
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part03_modern.model import GPT, GPTConfig
from part03_modern.generate import generate_text
from part03_modern.tokenizer import VOCAB_SIZE, encode_tensor
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, read_metrics, read_steps


@dataclass
class TrainConfig:
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file"})
    # the model
    block_size: int = field(default=64, metadata={"help": "context length in bytes", "min": 1})
    n_layer: int = field(default=4, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_embd: int = field(default=128, metadata={"min": 1})
    dropout: float = field(default=0.0, metadata={"min": 0, "max": 0.99})
    bias: bool = False
    n_kv_head: int | None = field(default=2, metadata={"help": "key/value heads (GQA); none = n_head, 1 = MQA",
                                                       "min": 1})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency", "min": 1e-9})
    window_size: int | None = field(default=None, metadata={"help": "sliding-window attention; none = full", "min": 1})
    n_sink: int = field(default=0, metadata={"help": "attention sinks kept visible with a window", "min": 0})
    norm: str = field(default="rmsnorm", metadata={"choices": ["rmsnorm", "layernorm"]})
    reference_ops: bool = field(default=False, metadata={"help": "the written-out RMSNorm, RoPE and GQA of the lesson "
                                                                 "instead of PyTorch's fused ops (same numbers, slower)"})
    # the optimisation
    batch_size: int = field(default=12, metadata={"min": 1})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (at the start)", "min": 0})
    decay_lr: bool = field(default=True, metadata={"help": "cosine-decay the learning rate to 1/10 by max_iters"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of the weight matrices", "min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = off",
                                                    "min": 0})
    max_iters: int = field(default=3500, metadata={"min": 0})
    eval_interval: int = field(default=500, metadata={"min": 1})
    eval_iters: int = field(default=50, metadata={"help": "batches averaged for train_loss/val_loss", "min": 1})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow start, faster steps)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"]})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a run may replace the run already in out_dir"})
    seed: int = 1337
    out_dir: str = "runs/part03_modern"
    # the sample printed at the end (generate.py does the same from the saved checkpoint)
    start: str = field(default="\n", metadata={"help": "prompt for the samples; the default is a newline"})
    num_samples: int = field(default=1, metadata={"min": 1})
    max_new_tokens: int = field(default=500, metadata={"min": 0})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy", "min": 0})
    top_k: int | None = field(default=None, metadata={"help": "keep the k likeliest tokens (1 = greedy); none = off",
                                                      "min": 1})
    top_p: float | None = field(default=0.95, metadata={"help": "nucleus sampling, a probability mass in (0, 1]; "
                                                                "none = off", "min": 0, "max": 1})


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded or written (ValueError, one line each)."""
    check_bounds(cfg)
    if not cfg.start:
        raise ValueError("--start is empty; the samples need a prompt of at least one character, e.g. a newline")
    if cfg.top_p is not None and cfg.top_p <= 0:
        raise ValueError(f"--top_p must be in (0, 1], got {cfg.top_p}; --top_p none turns nucleus sampling off")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"the head size n_embd / n_head = {cfg.n_embd // cfg.n_head} must be even: RoPE rotates "
                         "channel pairs")
    if cfg.n_kv_head is not None and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"--n_head {cfg.n_head} must be a multiple of --n_kv_head {cfg.n_kv_head}")


# --- Data ----------------------------------------------------------------------------------------


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """batch_size random windows of the token stream: inputs x and next-token targets y, (B, T) each.

    y is x shifted left by one token: y[b, t] = data[start + t + 1], the token right after x[b, t].
    So every position t is trained to predict its next token, B * T predictions per batch.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
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


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Half a cosine from learning_rate down to learning_rate / 10 at max_iters (or constant).

    Big steps early, small steps late to settle into a minimum: on this task that is worth ~0.03 in
    val loss over a constant rate. Part 4 adds the warmup and the knobs of the full schedule.
    """
    if not cfg.decay_lr:
        return cfg.learning_rate
    min_lr = cfg.learning_rate / 10
    return min_lr + 0.5 * (1 + math.cos(math.pi * it / cfg.max_iters)) * (cfg.learning_rate - min_lr)


# --- Checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: GPT, **extra) -> None:
    """Write the weights and the model config, atomically: a crash never leaves half a file.

    Only tensors, numbers and strings go in, so torch.load(path, weights_only=True) can read it
    (weights_only refuses to run arbitrary pickled code from a file someone gave you).
    """
    checkpoint = {"model": model.state_dict(), "model_config": asdict(model.config), **extra}
    atomic_save(checkpoint, path)  # a temporary file, then a rename (shared/checkpoint.py)


# --- Training ----------------------------------------------------------------------------------


def train(cfg: TrainConfig):
    """Train a byte-level GPT on cfg.data; return (model, results). main() wraps this for the CLI."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    autocast(device, cfg.dtype)  # fail early on an unsupported dtype
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)  # a finished run is not replaced by accident

    train_data, val_data = train_val_split(encode_tensor(load_text(cfg.data)))
    if len(val_data) <= cfg.block_size:
        raise ValueError(f"--data gives only {len(val_data)} bytes of validation text (the last 10%); it needs "
                         f"more than --block_size {cfg.block_size}. Use a longer text or a smaller block_size.")

    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=VOCAB_SIZE, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                             n_kv_head=cfg.n_kv_head, rope_theta=cfg.rope_theta, window_size=cfg.window_size,
                             n_sink=cfg.n_sink, norm=cfg.norm, reference_ops=cfg.reference_ops)
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    # The compiled model shares its weights with `model`; we train and evaluate with it and keep the
    # plain one for generation (whose growing prompt lengths would make torch.compile recompile).
    step_model = torch.compile(model) if cfg.compile else model
    print(f"{len(train_data):,} train / {len(val_data):,} val bytes | {model.num_params():,} parameters | "
          f"device {device}")

    generator = torch.Generator().manual_seed(cfg.seed)
    logger = MetricsLogger(out_dir)
    tokens_per_iter = cfg.batch_size * cfg.block_size
    start = time.perf_counter()
    train_seconds, interval_seconds, interval_iters, tokens_per_sec, grad_norm = 0.0, 0.0, 0, 0.0, float("nan")
    bar = tqdm(range(cfg.max_iters + 1), desc="train", dynamic_ncols=True)
    for it in bar:
        lr = lr_at(it, cfg)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            step_model.eval()
            train_loss = estimate_loss(step_model, train_data, cfg, device)
            val_loss = estimate_loss(step_model, val_data, cfg, device)
            step_model.train()
            if interval_iters:
                tokens_per_sec = interval_iters * tokens_per_iter / interval_seconds
            logger.log(iter=it, train_loss=train_loss, val_loss=val_loss, lr=lr, tokens_per_sec=tokens_per_sec,
                       grad_norm=grad_norm)
            bar.write(f"iter {it:5d} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | lr {lr:.2e}")
            interval_seconds, interval_iters = 0.0, 0
        if it == cfg.max_iters:
            break

        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, generator)
        with autocast(device, cfg.dtype):
            _, loss = step_model(x.to(device), y.to(device))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at iteration {it}; "
                                     f"try a lower --learning_rate (now {cfg.learning_rate})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The global norm of all gradients together; above grad_clip, every gradient is scaled down
        # by the same factor (max_norm=inf only measures it).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
        optimizer.step()
        logger.log_step(it, loss_value)
        step_seconds = time.perf_counter() - step_start
        train_seconds += step_seconds
        interval_seconds += step_seconds
        interval_iters += 1
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{interval_iters * tokens_per_iter / interval_seconds:,.0f}",
                        refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    logger.close()

    records = read_metrics(logger.path)
    plot_loss(records, out_dir / "loss.png", title=f"part03: modern byte-level GPT on {Path(cfg.data).name}",
              steps=read_steps(out_dir))
    ckpt_path = out_dir / "ckpt.pt"
    save_checkpoint(ckpt_path, model, iter_num=cfg.max_iters, val_loss=records[-1]["val_loss"])

    model.eval()
    samples = generate_text(model, cfg.start, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                            cfg.top_p)

    val_loss = records[-1]["val_loss"]
    results = dict(train_loss=records[-1]["train_loss"], val_loss=val_loss,
                   val_bits_per_byte=val_loss / math.log(2),  # one token is one byte: nats -> bits
                   iters=cfg.max_iters, seconds=seconds, train_seconds=train_seconds,
                   tokens_per_sec=cfg.max_iters * tokens_per_iter / max(train_seconds, 1e-9),
                   num_params=model.num_params(), samples=samples, ckpt=str(ckpt_path), config=asdict(cfg))
    for sample in samples:
        print("-" * 80 + f"\n{sample}")
    print("-" * 80)
    print(f"val loss {val_loss:.4f} nats/byte = {results['val_bits_per_byte']:.3f} bits per byte "
          f"(train {results['train_loss']:.4f})")
    print(f"{seconds:.1f} s ({results['tokens_per_sec']:,.0f} tokens/s in training steps); "
          f"wrote {out_dir / 'metrics.jsonl'}, {out_dir / 'loss.png'}, {ckpt_path}")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
