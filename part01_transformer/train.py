"""Train the Part 1 Transformer on a toy task that needs attention: reverse a string of digits.

Each example is `digits | answer`, e.g. `3 1 4 1 5 9 2 6 | 6 2 9 5 1 4 1 3`. The model reads the whole
line left to right and is scored only on the answer: to write answer digit j it must look back at
input digit seq_len-1-j, a different position for every j. No n-gram statistics help (the digits are
random); only attention to the right position does. After training we draw what each head attends to:
for reversal, the answer rows light up along the anti-diagonal.

    python part01_transformer/train.py                 # reverse 8 digits (the main run)
    python part01_transformer/train.py --task copy     # copy instead: a shifted diagonal
    python part01_transformer/train.py --help          # every flag with its default
"""
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from part01_transformer.model import GPT, GPTConfig
from shared.config import check_bounds, parse_config, run_cli
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, read_metrics, read_steps

DIGITS = "0123456789"
SEP = "|"
VOCAB = DIGITS + SEP  # token id = index in this string: digits 0-9, separator 10
TASKS = ("reverse", "copy")


@dataclass
class TrainConfig:
    task: str = field(default="reverse", metadata={"help": "what the answer is", "choices": list(TASKS)})
    seq_len: int = field(default=8, metadata={"help": "digits per example (the line is 2*seq_len+1 tokens)", "min": 1})
    block_size: int | None = field(default=None, metadata={"help": "model context; none = 2*seq_len, all it needs",
                                                               "min": 1})
    n_layer: int = field(default=2, metadata={"help": "Transformer blocks", "min": 1})
    n_head: int = field(default=4, metadata={"help": "attention heads per block", "min": 1})
    n_embd: int = field(default=64, metadata={"help": "width of the residual stream", "min": 1})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability (fresh data every step: none needed)",
                                                          "min": 0, "max": 0.99})
    bias: bool = field(default=True, metadata={"help": "biases in Linear layers and LayerNorms"})
    pos_embedding: str = field(default="learned", metadata={"help": "position vectors",
                                                            "choices": ["learned", "sinusoidal"]})
    batch_size: int = field(default=64, metadata={"help": "lines per training step", "min": 1})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant)", "min": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 = off", "min": 0})
    max_iters: int = field(default=500, metadata={"help": "training steps", "min": 0})
    eval_interval: int = field(default=50, metadata={"help": "evaluate and log every this many steps", "min": 1})
    eval_iters: int = field(default=10, metadata={"help": "batches averaged for train_loss/val_loss", "min": 1})
    val_size: int = field(default=500, metadata={"help": "held-out lines for val_loss and accuracy", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda or mps"})
    dtype: str = field(default="float32", metadata={"help": "autocast dtype",
                                                    "choices": ["float32", "bfloat16", "float16"]})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    seed: int = field(default=1337, metadata={"help": "seeds the model init and the training lines"})
    out_dir: str = field(default="runs/part01_transformer", metadata={"help": "where metrics and plots go"})


# --- The task ---------------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    return [VOCAB.index(ch) for ch in text]


def decode(tokens) -> str:
    return "".join(VOCAB[int(t)] for t in tokens)


def make_examples(task: str, n: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """n random lines `digits | answer`, shape (n, 2*seq_len+1)."""
    digits = torch.randint(0, len(DIGITS), (n, seq_len), generator=generator)
    answer = digits.flip(1) if task == "reverse" else digits
    sep = torch.full((n, 1), VOCAB.index(SEP))
    return torch.cat([digits, sep, answer], dim=1)


def inputs_and_targets(lines: torch.Tensor, seq_len: int):
    """Next-token pairs, with the loss only on the answer.

    x = line[:-1], y = line[1:]. Position t predicts y[t] = line[t+1]; the first seq_len predictions are
    random digits and the separator (nothing to learn), so they get -1, which the loss ignores.
    """
    x, y = lines[:, :-1], lines[:, 1:].clone()
    y[:, :seq_len] = -1
    return x, y


# --- Evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model, batches, device, dtype) -> float:
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def answer_accuracy(model, lines: torch.Tensor, seq_len: int, device: str) -> tuple[float, torch.Tensor]:
    """Greedy-decode the answer after `digits |`; return (exact-match accuracy, predicted answers)."""
    prompt = lines[:, : seq_len + 1].to(device)
    predicted = model.generate(prompt, max_new_tokens=seq_len, temperature=0)[:, seq_len + 1 :].cpu()
    exact = (predicted == lines[:, seq_len + 1 :]).all(dim=1)
    return exact.sum().item() / len(lines), predicted


# --- Attention heatmaps ------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(model, line: torch.Tensor) -> torch.Tensor:
    """Run one line through the model; return every head's weights, (n_layer, n_head, T, T)."""
    device = next(model.parameters()).device
    model(line[None, :-1].to(device))  # the model's input: everything but the last token
    return torch.stack([block.attn.attn_weights[0].cpu() for block in model.blocks])


def plot_attention(maps: torch.Tensor, tokens: str, path=None, title: str = ""):
    """One heatmap per layer (rows) x head (columns); rows are queries, columns the keys they read.
    Saves a PNG when given a path, else returns the figure (for notebooks)."""
    n_layer, n_head, T, _ = maps.shape
    figsize = (max(2.6 * n_head, 5.0), 2.9 * n_layer + 0.5)
    fig, axes = plt.subplots(n_layer, n_head, figsize=figsize, squeeze=False, dpi=100)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            ax.set_xticks(range(T), list(tokens), fontsize=6)
            ax.set_yticks(range(T), list(tokens), fontsize=6)
            if head == 0:
                ax.set_ylabel("query (reads)", fontsize=8)
            if layer == n_layer - 1:
                ax.set_xlabel("key (is read)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


# --- Training ----------------------------------------------------------------------------------


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is written (ValueError, one line each)."""
    check_bounds(cfg)  # --seq_len, --eval_interval, --grad_clip, ... within their "min"/"max" (see TrainConfig)
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.block_size is not None and cfg.block_size < 2 * cfg.seq_len:
        raise ValueError(f"--block_size {cfg.block_size} is too short: a line of --seq_len {cfg.seq_len} "
                         f"needs {2 * cfg.seq_len} tokens of context")


def train(cfg: TrainConfig):
    """Train on cfg.task; return (model, results). main() wraps this for the command line."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    block_size = cfg.block_size or 2 * cfg.seq_len
    device = pick_device(cfg.device)
    autocast(device, cfg.dtype)  # fail early on an unsupported dtype
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)

    model_config = GPTConfig(block_size=block_size, vocab_size=len(VOCAB), n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, pos_embedding=cfg.pos_embedding)
    model = GPT(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    print(f"task {cfg.task}, {cfg.seq_len} digits | {model.num_params():,} parameters | device {device}")

    # Training lines are drawn fresh every step. The held-out lines, and the fresh lines that estimate
    # train_loss, come from generators of their own, so evaluating never changes what the model trains on.
    train_gen, estimate_gen = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 2)
    val_lines = make_examples(cfg.task, cfg.val_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1))
    val_batches = [inputs_and_targets(chunk, cfg.seq_len) for chunk in val_lines.split(cfg.batch_size)]

    def batch(generator):
        return inputs_and_targets(make_examples(cfg.task, cfg.batch_size, cfg.seq_len, generator), cfg.seq_len)

    def evaluate(it: int, tokens_per_sec: float) -> dict:
        model.eval()
        train_loss = mean_loss(model, [batch(estimate_gen) for _ in range(cfg.eval_iters)], device, cfg.dtype)
        val_loss = mean_loss(model, val_batches[: cfg.eval_iters], device, cfg.dtype)
        accuracy, _ = answer_accuracy(model, val_lines, cfg.seq_len, device)
        model.train()
        return logger.log(iter=it, train_loss=train_loss, val_loss=val_loss, lr=cfg.learning_rate,
                          tokens_per_sec=tokens_per_sec, accuracy=accuracy)

    logger = MetricsLogger(out_dir)
    tokens_per_iter = cfg.batch_size * 2 * cfg.seq_len
    start = time.perf_counter()
    interval_start, interval_iters, tokens_per_sec = start, 0, 0.0
    bar = tqdm(range(cfg.max_iters + 1), desc=f"{cfg.task}", dynamic_ncols=True)
    for it in bar:
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            if interval_iters:
                tokens_per_sec = interval_iters * tokens_per_iter / (time.perf_counter() - interval_start)
            record = evaluate(it, tokens_per_sec)
            bar.set_postfix(val_loss=f"{record['val_loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                            tok_s=f"{tokens_per_sec:,.0f}")
            interval_start, interval_iters = time.perf_counter(), 0
        if it == cfg.max_iters:
            break
        x, y = batch(train_gen)
        with autocast(device, cfg.dtype):
            _, loss = model(x.to(device), y.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; "
                               f"try a lower --learning_rate (now {cfg.learning_rate})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        logger.log_step(it, loss.item())
        interval_iters += 1
    seconds = time.perf_counter() - start
    bar.close()
    logger.close()

    records = read_metrics(logger.path)
    plot_loss(records, out_dir / "loss.png", title=f"part01: {cfg.task} {cfg.seq_len} digits", steps=read_steps(out_dir))
    model.eval()
    example = val_lines[0]
    _, predicted = answer_accuracy(model, example[None], cfg.seq_len, device)
    plot_attention(attention_maps(model, example), decode(example[:-1]), out_dir / "attention.png",
                   title=f"{cfg.task}: attention on the held-out line {decode(example)}")

    accuracy = records[-1]["accuracy"]
    results = dict(train_loss=records[-1]["train_loss"], val_loss=records[-1]["val_loss"], accuracy=accuracy,
                   iters=cfg.max_iters, seconds=seconds, num_params=model.num_params(),
                   example_input=decode(example[: cfg.seq_len + 1]), example_target=decode(example[cfg.seq_len + 1 :]),
                   example_output=decode(predicted[0]), config=asdict(cfg))
    print(f"held-out exact-match accuracy: {accuracy:.1%} of {cfg.val_size} lines (greedy decoding)")
    print(f"example: {results['example_input']} -> {results['example_output']} "
          f"(expected {results['example_target']})")
    print(f"{seconds:.1f} s (training and evaluation); wrote {out_dir / 'metrics.jsonl'}, {out_dir / 'loss.png'}, {out_dir / 'attention.png'}")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
