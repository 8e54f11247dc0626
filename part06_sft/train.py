"""Supervised fine-tuning (SFT): teach part 4's pretrained model to answer instructions.

Part 4's loop, with three changes:
- the data: (prompt, answer) pairs of nine verifiable tasks (shared/tasks.py), written in the chat
  template (template.py), instead of random windows of the corpus;
- the start: the pretrained weights of runs/part04_scaling/ckpt.pt, with the vocabulary grown by the
  chat tokens (GPT.resize_token_embeddings), instead of random weights;
- the loss: on the answers only. The prompt's targets are IGNORE_INDEX (-100), and so is the padding that
  brings a batch's examples to one length (--no-mask_prompt trains on the prompt too, for comparison).
Before and after, eval.py answers every held-out prompt with greedy decoding and the tasks' verifiers
score the answers: results.json and the table printed at the end compare the base model and the SFT model.

    python part06_sft/train.py                          # the main run (~6 minutes on 2 CPU cores)
    python part06_sft/train.py --curriculum length --out_dir runs/part06_curriculum   # easy -> hard
    python part06_sft/train.py --no-mask_prompt --out_dir runs/part06_unmasked        # the prompt in the loss
    python part06_sft/train.py --init_from runs/other/ckpt.pt --out_dir runs/part06_other
    python part06_sft/train.py --train_file my_alpaca.jsonl --out_dir runs/part06_mine   # bring your own data
    python part06_sft/train.py --help                   # every flag with its default
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part06_sft.eval import evaluate, format_table, heldout_examples, load_policy
from part06_sft.model import IGNORE_INDEX, GPT
from part06_sft.template import chat_tokenizer, collate, encode_example, sample_batch
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, plot_task_bars, read_metrics, read_steps
from shared.tasks import TASKS, get_examples, load_sft_jsonl

BASE_CKPT = "runs/part04_scaling/ckpt.pt"


@dataclass
class TrainConfig:
    init_from: str = field(default=BASE_CKPT, metadata={"help": "the pretrained checkpoint to fine-tune"})
    tasks: str = field(default="all", metadata={"help": "comma-separated task names to train and evaluate on, or all"})
    train_file: str | None = field(default=None, metadata={"help": "train on this JSONL file instead of the tasks: "
                                   "rows {prompt, gold} or Alpaca's {instruction, input, output} (the evaluation "
                                   "stays on the tasks' held-out prompts)"})
    mask_prompt: bool = field(default=True, metadata={"help": "loss on the answer only (off: on the prompt too)"})
    curriculum: str = field(default="none", metadata={"choices": ["none", "length"], "help": "none: batches drawn "
                            "from all the examples; length: short examples first (competence-based pacing)"})
    curriculum_iters: int | None = field(default=None, metadata={"help": "steps until the curriculum reaches the "
                                                                         "hardest examples; none = max_iters / 2",
                                                                 "min": 1})
    # the optimisation
    batch_size: int = field(default=32, metadata={"help": "examples per micro-batch", "min": 1})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches averaged into one optimizer step",
                                                       "min": 1})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate", "min": 0})
    warmup_iters: int = field(default=50, metadata={"help": "linear warmup from 0 to learning_rate", "min": 0})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "cosine decay to min_lr ends here; none = "
                                                                       "max_iters", "min": 1})
    min_lr: float = field(default=1e-4, metadata={"help": "the learning rate at the end of the decay", "min": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay of the weight matrices", "min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = off",
                                                    "min": 0})
    max_iters: int = field(default=1500, metadata={"help": "optimizer steps", "min": 0})
    eval_interval: int = field(default=100, metadata={"help": "held-out loss and a checkpoint every this many steps",
                                                      "min": 1})
    eval_examples: int = field(default=32, metadata={"help": "held-out examples per task in the held-out loss",
                                                     "min": 1})
    # the evaluation by answers (eval.py), before and after
    eval_n: int | None = field(default=None, metadata={"help": "held-out prompts per task answered before and after "
                                                               "training; none = all", "min": 1})
    eval_base: bool = field(default=True, metadata={"help": "also evaluate the base model first (few-shot)"})
    shots: int = field(default=3, metadata={"help": "few-shot examples for the base model's evaluation", "min": 0})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit in the evaluation", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"],
                                                    "help": "autocast dtype; float16 (CUDA) uses a GradScaler"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part06_sft"


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded or written (ValueError, one line each)."""
    check_bounds(cfg)
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")
    task_names(cfg.tasks)


def task_names(tasks: str) -> list[str]:
    names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; the tasks are "
                         f"{', '.join(TASKS)}")
    return names


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Part 4's schedule: a linear warmup, then half a cosine down to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)  # 0 -> 1 over the decay
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# --- Data: every example encoded once ----------------------------------------------------------------------


def encode_examples(tokenizer, examples, block_size: int, mask_prompt: bool):
    """(x, y) lists for the examples that fit in block_size tokens, and how many did not (they are dropped:
    cutting an answer short would teach the model to stop mid-answer)."""
    encoded = [encode_example(tokenizer, ex.prompt, ex.gold, mask_prompt) for ex in examples]
    kept = [e for e in encoded if len(e[0]) <= block_size]
    return kept, len(encoded) - len(kept)


def difficulty_order(encoded: list, generator: torch.Generator) -> list[int]:
    """Example indices from easiest to hardest by length (prompt + answer tokens); ties in random order."""
    shuffled = torch.randperm(len(encoded), generator=generator).tolist()
    return sorted(shuffled, key=lambda i: len(encoded[i][0]))


@torch.no_grad()
def heldout_loss(model, examples_by_task: dict, pad_id: int, batch_size: int, device: str, dtype: str) -> dict:
    """The masked loss on fixed held-out examples, per task: the mean over their answer tokens."""
    losses = {}
    for task, encoded in examples_by_task.items():
        total, count = 0.0, 0
        for i in range(0, len(encoded), batch_size):
            x, y = collate(encoded[i : i + batch_size], pad_id)
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            n = (y != IGNORE_INDEX).sum().item()
            total, count = total + loss.item() * n, count + n  # the batch mean back to a sum over tokens
        losses[task] = total / max(count, 1)
    return losses


# --- Training ----------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: GPT, tokenizer, iter_num: int, cfg: TrainConfig, **extra) -> None:
    """The fine-tuned model in part 4's checkpoint format (eval.py and parts 7-9 load it the same way),
    written atomically and loadable with torch.load(..., weights_only=True)."""
    atomic_save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tokenizer.to_dict(),
                 "iter_num": iter_num, "train_config": asdict(cfg), **extra}, path)


def train(cfg: TrainConfig):
    """Fine-tune cfg.init_from on the tasks; return (model, results). main() wraps this for the CLI."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    autocast(device, cfg.dtype)  # fail early on an unsupported dtype
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not Path(cfg.init_from).is_file():
        make = "python part04_scaling/train.py (about 5 minutes)" if cfg.init_from == BASE_CKPT else "it"
        raise FileNotFoundError(f"no pretrained model at {cfg.init_from}: make {make} first, or choose another "
                                "checkpoint with --init_from PATH")
    tasks = task_names(cfg.tasks)
    examples = load_sft_jsonl(cfg.train_file) if cfg.train_file else [ex for t in tasks for ex in
                                                                        get_examples("train", t)]
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    model, base_tokenizer, _ = load_policy(cfg.init_from, device)
    heldout = heldout_examples("heldout", cfg.eval_n, ",".join(tasks))
    results_base = None
    if cfg.eval_base:  # the starting point, measured the same way as the result
        results_base, _ = evaluate(model, base_tokenizer, heldout, cfg.max_new_tokens, cfg.shots)
        print(f"base model ({cfg.shots}-shot):\n{format_table(results_base)}")

    # The chat tokens join the vocabulary: the tokenizer first, then the model's embedding to match
    tokenizer = chat_tokenizer(base_tokenizer)
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.train()
    block_size = model.config.block_size
    train_encoded, dropped = encode_examples(tokenizer, examples, block_size, cfg.mask_prompt)
    if not train_encoded:
        raise ValueError(f"none of the {dropped} training examples fits in the model's {block_size}-token context")
    val_encoded = {t: encode_examples(tokenizer, get_examples("heldout", t)[: cfg.eval_examples], block_size,
                                      mask_prompt=True)[0] for t in tasks}  # the held-out loss: answers only
    generator = torch.Generator().manual_seed(cfg.seed)  # the data order
    order = difficulty_order(train_encoded, generator)
    curriculum_iters = 0 if cfg.curriculum == "none" else (cfg.curriculum_iters or max(1, cfg.max_iters // 2))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")
    n_answer = sum(sum(t != IGNORE_INDEX for t in y) for _, y in train_encoded)
    print(f"{len(train_encoded):,} training examples ({dropped} longer than {block_size} tokens dropped), "
          f"{n_answer:,} target tokens | {model.num_params():,} parameters | vocab {base_tokenizer.vocab_size} -> "
          f"{tokenizer.vocab_size} | device {device}")

    logger = MetricsLogger(out_dir)
    train_seconds, interval_seconds, interval_tokens, step_loss = 0.0, 0.0, 0, math.nan
    bar = tqdm(range(cfg.max_iters + 1), desc="sft", dynamic_ncols=True)
    try:
        for it in bar:
            lr = lr_at(it, cfg)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                model.eval()
                per_task = heldout_loss(model, val_encoded, tokenizer.eot_token, cfg.batch_size, device, cfg.dtype)
                model.train()
                val_loss = sum(per_task.values()) / len(per_task)  # each task counts the same
                if not math.isfinite(val_loss):
                    raise FloatingPointError(f"step {it}: the held-out loss is {val_loss}; try a lower "
                                             f"--learning_rate (now {cfg.learning_rate}). {ckpt_path} holds the "
                                             "last good step")
                save_checkpoint(ckpt_path, model, tokenizer, it, cfg, base_ckpt=cfg.init_from)
                logger.log(iter=it, train_loss=step_loss, val_loss=val_loss, lr=lr,
                           tokens_per_sec=interval_tokens / interval_seconds if interval_seconds else None,
                           **{f"val_loss_{t}": loss for t, loss in per_task.items()})
                bar.write(f"iter {it:5d} | step loss {step_loss:.4f} | held-out loss {val_loss:.4f} | lr {lr:.2e}")
                interval_seconds, interval_tokens = 0.0, 0
            if it == cfg.max_iters:
                break

            # --- one optimizer step: part 4's, on a batch of padded examples ---
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for _ in range(cfg.grad_accum_steps):
                batch = sample_batch(order, cfg.batch_size, it, curriculum_iters, generator)
                x, y = collate([train_encoded[i] for i in batch], tokenizer.eot_token)
                with autocast(device, cfg.dtype):
                    _, loss = model(x.to(device), y.to(device))  # mean over the targets that are not -100
                loss = loss / cfg.grad_accum_steps
                scaler.scale(loss).backward()
                step_loss += loss.item()
                interval_tokens += x.numel()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"step {it}: the loss became {step_loss}; try a lower --learning_rate "
                                         f"(now {cfg.learning_rate}). {ckpt_path} holds the last good step")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step_seconds = time.perf_counter() - step_start
            train_seconds += step_seconds
            interval_seconds += step_seconds
            logger.log_step(it, step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
    finally:
        bar.close()
        logger.close()

    model.eval()
    results_sft, rows = evaluate(model, tokenizer, heldout, cfg.max_new_tokens, cfg.shots)
    seconds = time.perf_counter() - start
    records = read_metrics(logger.path)
    plot_loss([{k: r[k] for k in ("iter", "val_loss")} for r in records], out_dir / "loss.png",
              title="part06: SFT, loss on the answer tokens", steps=read_steps(out_dir))
    plot_loss([{"iter": r["iter"], **{f"{t} loss": r[f"val_loss_{t}"] for t in tasks}} for r in records],
              out_dir / "task_loss.png", title="part06: held-out loss per task (answer tokens)")
    scores = {"base (few-shot)": {t: r["exact_match"] for t, r in results_base.items()}} if results_base else {}
    scores["SFT"] = {t: r["exact_match"] for t, r in results_sft.items()}
    plot_task_bars(scores, out_dir / "accuracy.png", title="part06: held-out exact match, greedy")
    results = dict(base=results_base, sft=results_sft, samples=rows[:: max(1, len(rows) // 9)][:9],
                   iters=cfg.max_iters, seconds=seconds, train_seconds=train_seconds, ckpt=str(ckpt_path),
                   config=asdict(cfg))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"SFT model:\n{format_table(results_sft)}")
    if results_base:
        print("\nexact match   " + "  ".join(f"{t} {results_base[t]['exact_match']:.2f}->"
                                              f"{results_sft[t]['exact_match']:.2f}" for t in results_sft))
    print(f"{seconds:.0f} s ({train_seconds:.0f} s in training steps); wrote {ckpt_path}, {out_dir / 'results.json'}, "
          f"{out_dir / 'loss.png'}, {out_dir / 'task_loss.png'}, {out_dir / 'accuracy.png'}")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
