"""Context-aware and gated attention against the Part 3 model: bits per byte, gates, attention sinks.

Two changes to attention, each a GPTConfig flag of the chapter's model.py (off by default):
  1. context_gate (Yang et al. 2019, Context-Aware Self-Attention Networks, https://arxiv.org/abs/1902.05766):
     a context vector c is mixed into every query and key, q_hat = (1 - lam_q) q + lam_q (c U_q) with
     lam_q = sigmoid(q v_H + (c U_q) v_C), the same for k, so the scores q_hat . k_hat depend on the context as
     well as on the two tokens. We use the paper's "global context" (the mean of the layer's input) in its causal
     form: c_t is the mean of the inputs at positions <= t (model.causal_context), since the mean of the whole
     window would show position t the bytes it must predict.
  2. output_gate (Qiu et al. 2025, Gated Attention for Large Language Models, https://arxiv.org/abs/2505.06708):
     the paper's best variant G1, y <- y * sigmoid(x W_theta) after SDPA, elementwise (so head-specific) and
     computed from the query token, before the output projection.

The experiment: the Part 3 byte-level model (flags off: part 9's GPT exactly) against each gate, and both,
trained in lockstep (one step of each in turn, on the same batches, from the same initial weights for the shared
parameters), so a busy machine slows all of them alike. Measured on fixed held-out batches:
  - bits per byte at equal steps, and at equal wall time: the learning rate is constant, so the loss curve at
    step s is what a run of s steps reaches; a slower variant's time buys the baseline more steps (the baseline
    trains on alone for them), and a variant's loss at the baseline's time is read from its own curve;
  - the gates: the distribution of sigmoid values per layer (Qiu et al. find sparse output gates, mean ~0.12);
  - the attention sink: the mean attention weight on the first position, per layer and head, computed
    explicitly as softmax(q k^T / sqrt(d)) from each layer's q and k (Qiu et al.: 46.7% -> 4.8% with the gate);
  - the context vectors along a held-out scene: a 2-D PCA path coloured by speaker, and how far c_t moves
    between samples, at speaker turns and within speeches.

    python part10_semantic/context_attention.py                  # ~6 minutes of CPU time; see the README
    python part10_semantic/context_attention.py --variants baseline,output_gate --max_iters 1000
    python part10_semantic/context_attention.py --help
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part03_modern.tokenizer import VOCAB_SIZE, encode_tensor
from part03_modern.train import get_batch
from part10_semantic.model import GPT, GPTConfig
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_rope_heads, parse_config, run_cli
from shared.data import format_speech, iter_speeches, load_text, train_val_split
from shared.device import pick_device, synchronize

# The variants: which GPTConfig flags each one turns on. "baseline" is the Part 3 model.
VARIANTS = {
    "baseline": {},
    "context_gate": {"context_gate": True},
    "output_gate": {"output_gate": True},
    "both": {"context_gate": True, "output_gate": True},
}
PAPER = {  # numbers from the papers, for the README table
    "qiu2025_first_token_attention_baseline": 0.467,  # 1.7B dense, 3.5T tokens: mean attention on the first token
    "qiu2025_first_token_attention_gated": 0.048,  # with the elementwise SDPA output gate
    "qiu2025_mean_output_gate": 0.116,  # mean sigmoid score of that gate (their analysis of gate sparsity)
}


@dataclass
class ContextAttentionConfig:
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file"})
    variants: str = field(default="baseline,context_gate,output_gate,both",
                          metadata={"help": f"comma-separated, from {', '.join(VARIANTS)}; baseline is required"})
    # the model (Part 3's defaults, a longer context)
    block_size: int = field(default=128, metadata={"help": "context length in bytes", "min": 2})
    n_layer: int = field(default=4, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_kv_head: int | None = field(default=2, metadata={"help": "key/value heads (GQA); none = n_head", "min": 1})
    n_embd: int = field(default=128, metadata={"min": 2})
    # the optimisation: Part 3's, with a constant learning rate (see the docstring: equal time needs it)
    batch_size: int = field(default=16, metadata={"min": 1})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate, constant", "min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off", "min": 0})
    max_iters: int = field(default=300, metadata={"help": "training steps of every variant", "min": 1})
    eval_interval: int = field(default=50, metadata={"min": 1})
    eval_batches: int = field(default=16, metadata={"help": "fixed held-out batches (batch_size x block_size "
                                                            "bytes each), the same for every variant", "min": 1})
    max_time_ratio: float = field(default=2.0, metadata={"help": "the baseline trains on for at most this times "
                                                                 "max_iters to match a slower variant's time",
                                                         "min": 1})
    # the context dynamics
    scene_bytes: int = field(default=4096, metadata={"help": "bytes of the held-out scene to follow", "min": 2})
    scene_stride: int = field(default=8, metadata={"help": "a context vector every this many bytes", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores)", "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/context_attention"
    overwrite: bool = field(default=False, metadata={"help": "a run may replace the run already in out_dir"})


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "baseline" not in names:
        raise ValueError("--variants must include baseline: every number is a comparison with it")
    return sorted(set(names), key=list(VARIANTS).index)


def check_config(cfg: ContextAttentionConfig) -> None:
    parse_variants(cfg.variants)
    check_rope_heads(cfg.n_embd, cfg.n_head)
    if cfg.n_kv_head is not None and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"--n_head {cfg.n_head} must be a multiple of --n_kv_head {cfg.n_kv_head}")


# --- Data ------------------------------------------------------------------------------------------------------


def fixed_batches(data: torch.Tensor, cfg: ContextAttentionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """eval_batches batches (N, B, T) of inputs and targets, drawn once with their own seed: every evaluation of
    every variant scores the same bytes."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    xs, ys = zip(*(get_batch(data, cfg.batch_size, cfg.block_size, generator) for _ in range(cfg.eval_batches)))
    return torch.stack(xs), torch.stack(ys)


def held_out_scene(data: torch.Tensor, val_start: int, max_bytes: int):
    """The first whole scene that starts in the held-out split, from shared/corpus.py's speeches.

    Returns (name, its bytes (L,), [(offset, speaker) of every speech]), cut to max_bytes; None if data is not
    the speeches' text (another --data file)."""
    offset, previous, scene, start, text, turns = 0, None, None, 0, b"", []
    for speech in iter_speeches():
        key = (speech.play, speech.act, speech.scene)
        speech_bytes = format_speech(speech).encode("utf-8")
        if scene is None and offset >= val_start and key != previous:
            scene, start = key, offset  # a scene begins in the held-out split
        if scene is not None:
            if key != scene or len(text) >= max_bytes:
                break
            turns.append((len(text), speech.speaker))
            text += speech_bytes
        previous, offset = key, offset + len(speech_bytes)
    text = text[:max_bytes]
    if scene is None or bytes(data[start:start + len(text)].tolist()) != text:
        return None  # no scene in the held-out split, or data is not the corpus built from these speeches
    return " / ".join(part for part in scene if part), torch.tensor(list(text)), turns


# --- Training in lockstep --------------------------------------------------------------------------------------


@dataclass
class Trainee:
    """One variant being trained: its model, optimizer, batch generator, and its curve of evaluations."""
    name: str
    model: GPT
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    steps: int = 0
    train_seconds: float = 0.0  # time spent in training steps (not in evaluations)
    curve: list = field(default_factory=list)  # [{"iter", "train_seconds", "val_bits_per_byte"}]
    losses: list = field(default_factory=list)  # training loss of every step


def build_trainees(names: list[str], cfg: ContextAttentionConfig, device: str) -> dict[str, Trainee]:
    """One model per variant. The parameters they share start equal: each variant is the baseline's initial
    network plus its gates (load_state_dict(strict=False) leaves only the gates at their own init)."""
    trainees, base_state = {}, None
    for name in names:
        torch.manual_seed(cfg.seed)
        config = GPTConfig(block_size=cfg.block_size, vocab_size=VOCAB_SIZE, n_layer=cfg.n_layer, n_head=cfg.n_head,
                           n_embd=cfg.n_embd, n_kv_head=cfg.n_kv_head, **VARIANTS[name])
        model = GPT(config)
        if base_state is None:
            base_state = model.state_dict()  # names are in order: baseline comes first
        else:
            missing, unexpected = model.load_state_dict(base_state, strict=False)
            assert not unexpected and all(".context_" in k or ".output_gate." in k for k in missing), missing
        model.to(device)
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.99))
        trainees[name] = Trainee(name, model, optimizer, torch.Generator().manual_seed(cfg.seed))
    return trainees


def train_step(run: Trainee, train_data: torch.Tensor, cfg: ContextAttentionConfig, device: str) -> float:
    """One AdamW step on the next batch of run's own generator (the same batches for every variant)."""
    start = time.perf_counter()
    x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, run.generator)
    _, loss = run.model(x.to(device), y.to(device))
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"{run.name}: the loss became {loss_value} at step {run.steps}; try a lower "
                                 f"--learning_rate (now {cfg.learning_rate})")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    run.optimizer.step()
    synchronize(device)
    run.train_seconds += time.perf_counter() - start
    run.steps += 1
    run.losses.append(loss_value)
    return loss_value


@torch.no_grad()
def bits_per_byte(model: GPT, eval_x: torch.Tensor, eval_y: torch.Tensor, device: str) -> float:
    """Mean cross-entropy over the fixed held-out batches, in bits: one token is one byte, so nats / ln 2."""
    model.eval()
    losses = [model(x.to(device), y.to(device))[1].item() for x, y in zip(eval_x, eval_y)]
    model.train()
    return sum(losses) / len(losses) / math.log(2)


def evaluate(run: Trainee, eval_x, eval_y, device: str, logger) -> None:
    bpb = bits_per_byte(run.model, eval_x, eval_y, device)
    row = dict(variant=run.name, iter=run.steps, train_seconds=round(run.train_seconds, 3), val_bits_per_byte=bpb,
               val_loss=bpb * math.log(2), train_loss=float(np.mean(run.losses[-20:])) if run.losses else None)
    run.curve.append(row)
    logger.write(json.dumps(row) + "\n")
    logger.flush()


def train_lockstep(trainees: dict[str, Trainee], train_data, eval_x, eval_y, cfg, device, logger) -> None:
    """max_iters steps of every variant, one step of each in turn; evaluations every eval_interval steps."""
    bar = tqdm(range(cfg.max_iters), desc=f"training {len(trainees)} variants in lockstep", dynamic_ncols=True)
    for it in bar:
        for run in trainees.values():
            if it % cfg.eval_interval == 0:
                evaluate(run, eval_x, eval_y, device, logger)
            train_step(run, train_data, cfg, device)
        bar.set_postfix({name[:7]: f"{run.losses[-1]:.3f}" for name, run in trainees.items()}, refresh=False)
    bar.close()
    for run in trainees.values():
        evaluate(run, eval_x, eval_y, device, logger)


def extend_baseline(run: Trainee, target_iters: int, train_data, eval_x, eval_y, cfg, device, logger) -> None:
    """Train the baseline on, alone, to target_iters steps: the steps a slower variant's time would buy it."""
    for _ in tqdm(range(run.steps, target_iters), desc="baseline, extra steps for equal time", dynamic_ncols=True):
        train_step(run, train_data, cfg, device)
        if run.steps % cfg.eval_interval == 0 or run.steps == target_iters:
            evaluate(run, eval_x, eval_y, device, logger)


def curve_at(run: Trainee, iters: float) -> float | None:
    """The run's held-out bits/byte at a (fractional) step, linearly interpolated between evaluations; None
    beyond the last one. With a constant learning rate the curve at step s is what an s-step run reaches."""
    xs = [row["iter"] for row in run.curve]
    if not xs[0] <= iters <= xs[-1]:
        return None
    return float(np.interp(iters, xs, [row["val_bits_per_byte"] for row in run.curve]))


# --- Looking inside: attention weights, gates, context vectors -------------------------------------------------


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_size)) under the causal mask, written out: (B, n_head, T, T).

    q (B, n_head, T, hs), k (B, n_kv_head, T, hs): each key head serves n_head // n_kv_head query heads."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, n_head, T, T)
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def first_token_attention(weights: torch.Tensor) -> torch.Tensor:
    """(n_head,) the mean weight the queries at positions >= 1 put on position 0 (the query at 0 has no choice)."""
    return weights[:, :, 1:, 0].mean(dim=(0, 2))


def uniform_first_token_attention(T: int) -> float:
    """What first_token_attention gives when every query spreads its attention evenly over the t + 1 positions
    it sees: the mean of 1 / (t + 1) over t = 1 .. T - 1. Above it, position 0 draws extra attention (a sink)."""
    return sum(1 / (t + 1) for t in range(1, T)) / (T - 1)


@torch.no_grad()
def look_inside(model: GPT, idx: torch.Tensor) -> list[dict]:
    """Run idx (B, T) through the model and return, per layer: the attention weights (B, n_head, T, T), and
    where the layer has them, the output gate scores (B, T, n_embd), lam_q and lam_k (B, T) and the context
    vectors c_t (B, T, n_embd). Forward hooks catch each attention's inputs; the modules' own methods
    (heads, scores, mix_weight) then recompute what they computed inside, so nothing is written twice."""
    model.eval()
    records = [{} for _ in model.blocks]
    hooks = []
    for record, block in zip(records, model.blocks):
        attn = block.attn

        def keep_inputs(module, args, record=record):
            record["inputs"] = args[:4]  # x, pos, cos, sin

        hooks.append(attn.register_forward_pre_hook(keep_inputs))
        for gate_name in ("context_q", "context_k"):
            if getattr(attn, gate_name) is not None:
                def keep_gate_inputs(module, args, record=record, gate_name=gate_name):
                    record[gate_name] = args  # h (B, T, dim), context (B, T, n_embd)

                hooks.append(getattr(attn, gate_name).register_forward_pre_hook(keep_gate_inputs))
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    for record, block in zip(records, model.blocks):
        attn = block.attn
        x, pos, cos, sin = record.pop("inputs")
        q, k, _ = attn.heads(x, cos, sin)
        record["weights"] = attention_weights(q, k)
        if attn.output_gate is not None:
            record["output_gate"] = attn.output_gate.scores(x)
        for gate_name, lam_name in (("context_q", "lambda_q"), ("context_k", "lambda_k")):
            if gate_name in record:
                h, context = record.pop(gate_name)
                gate = getattr(attn, gate_name)
                record[lam_name] = gate.mix_weight(h, gate.context_map(context)).squeeze(-1)
                record["context"] = context
    return records


def scene_contexts(model: GPT, scene: torch.Tensor, block_size: int, stride: int, device: str):
    """The context vectors c_t of every layer at positions t = 0, stride, 2 stride, ... of a scene.

    A position t < block_size sees the scene from its start (one pass over the first block); a later one sees
    the block_size bytes that end at t (a window, as in training). Returns (positions (P,), contexts
    (n_layer, P, n_embd))."""
    positions = list(range(0, len(scene), stride))
    first = look_inside(model, scene[:block_size][None].to(device))
    early = [p for p in positions if p < block_size]
    contexts = [torch.stack([r["context"][0, early] for r in first])]  # (n_layer, P_early, C)
    late = [p for p in positions if p >= block_size]
    for chunk in range(0, len(late), 32):
        ends = late[chunk:chunk + 32]
        windows = torch.stack([scene[p - block_size + 1:p + 1] for p in ends]).to(device)  # (n, block_size)
        records = look_inside(model, windows)
        contexts.append(torch.stack([r["context"][:, -1] for r in records]))  # (n_layer, n, C)
    return torch.tensor(positions), torch.cat(contexts, dim=1).cpu()


def context_shifts(positions, contexts, turn_offsets: list[int], block_size: int) -> dict:
    """How far the context moves between two consecutive samples: 1 - cos(c_t, c_t'), per layer, averaged
    over the steps that cross a speaker turn and over those within one speech. Only windows of a full block
    (t - stride >= block_size - 1) count: inside the first block the cumulative mean is still settling."""
    steps = F.cosine_similarity(contexts[:, 1:], contexts[:, :-1], dim=-1)  # (n_layer, P - 1)
    shift = 1 - steps
    turns = torch.tensor(turn_offsets)
    before, after = positions[:-1], positions[1:]
    crosses = ((turns[None, :] > before[:, None]) & (turns[None, :] <= after[:, None])).any(dim=1)  # (P - 1,)
    settled = before >= block_size - 1
    at_turn, within = crosses & settled, ~crosses & settled
    mean = lambda m: [round(v, 5) for v in shift[:, m].mean(dim=1).tolist()] if m.any() else None  # noqa: E731
    return dict(at_turn=mean(at_turn), within=mean(within), n_at_turn=int(at_turn.sum()), n_within=int(within.sum()),
                shift=shift)


# --- Plots -----------------------------------------------------------------------------------------------------


def plot_loss(trainees: dict[str, Trainee], max_iters: int, path: Path) -> None:
    fig = Figure(figsize=(11, 4), dpi=120)
    axes = fig.subplots(1, 2)
    for i, run in enumerate(trainees.values()):
        iters = [r["iter"] for r in run.curve]
        bpb = [r["val_bits_per_byte"] for r in run.curve]
        axes[0].plot(iters, bpb, "-o", markersize=2.5, color=f"C{i}", label=run.name)
        seconds = [r["train_seconds"] for r in run.curve]
        axes[1].plot(seconds, bpb, "-o", markersize=2.5, color=f"C{i}", label=run.name)
    axes[0].axvline(max_iters, color="grey", linewidth=0.6, linestyle=":")
    axes[0].set_xlabel("training step (past the dotted line: the baseline's extra steps for equal time)")
    axes[1].set_xlabel("seconds in training steps (lockstep: the same machine load for all)")
    for ax in axes:
        ax.set_ylabel("held-out bits per byte")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("Part 3 model vs context-aware (Yang et al. 2019) and gated (Qiu et al. 2025) attention", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_gates(gates: dict[str, list[torch.Tensor]], path: Path) -> None:
    """One panel per (variant, gate): the distribution of its sigmoid values, one curve per layer."""
    cols = min(3, max(1, len(gates)))
    rows = max(1, math.ceil(len(gates) / cols))
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), dpi=120)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    bins = np.linspace(0, 1, 41)
    for ax, (title, per_layer) in zip(axes, gates.items()):
        for layer, values in enumerate(per_layer):
            counts, _ = np.histogram(values.flatten().numpy(), bins=bins)
            ax.stairs(counts / counts.sum(), bins, color=f"C{layer}",
                      label=f"layer {layer}: mean {values.mean():.3f}")
        if "output gate" in title:
            ax.axvline(PAPER["qiu2025_mean_output_gate"], color="k", linestyle=":", linewidth=0.8,
                       label="Qiu et al.: mean 0.116")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("sigmoid value")
        ax.set_ylabel("share of values")
        ax.legend(fontsize=6)
    if not gates:
        axes[0].text(0.5, 0.5, "no gated variant in --variants", ha="center")
    for ax in axes[len(gates):] if gates else ():
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)


def plot_sink(sinks: dict[str, torch.Tensor], uniform: float, path: Path) -> None:
    """A heat map (layer x head) of the first-token attention per variant, on one colour scale."""
    fig = Figure(figsize=(3.3 * len(sinks), 3.2), dpi=120)
    axes = fig.subplots(1, len(sinks), squeeze=False)[0]
    top = max(float(s.max()) for s in sinks.values())
    for ax, (name, sink) in zip(axes, sinks.items()):
        image = ax.imshow(sink.numpy(), vmin=0, vmax=top, cmap="viridis")
        for (layer, head), value in np.ndenumerate(sink.numpy()):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if value < 0.6 * top else "k")
        ax.set_title(f"{name}: mean {sink.mean():.3f}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer" if ax is axes[0] else "")
        ax.set_xticks(range(sink.size(1)))
        ax.set_yticks(range(sink.size(0)))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean attention on the first position")
    fig.suptitle(f"The attention sink: held-out windows, queries at positions >= 1 (evenly spread attention "
                 f"would give {uniform:.3f})", fontsize=9)
    fig.savefig(path, bbox_inches="tight")


def plot_context_dynamics(positions, contexts, shifts, turns, scene_name: str, block_size: int, path: Path) -> None:
    """Left: the last layer's c_t along the scene, projected on its first two principal components, coloured by
    the speaker; only full windows (t >= block_size - 1): in the first block the cumulative mean of a few bytes
    jumps around and would fill the plot. Right: 1 - cos between consecutive samples, per layer, with the
    speaker turns marked."""
    fig = Figure(figsize=(12, 4.6), dpi=120)
    ax_path, ax_shift = fig.subplots(1, 2)
    offsets = [o for o, _ in turns]
    settled = positions >= block_size - 1
    if settled.sum() >= 2:
        last = contexts[-1, settled].double()  # (P, C)
        centred = last - last.mean(dim=0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()  # (P, 2)
        speaker_at = [turns[np.searchsorted(offsets, p, side="right") - 1][1] for p in positions[settled].tolist()]
        ax_path.plot(xy[:, 0], xy[:, 1], color="grey", linewidth=0.4, alpha=0.6)
        for i, speaker in enumerate(dict.fromkeys(speaker_at)):
            mask = np.array([s == speaker for s in speaker_at])
            ax_path.scatter(xy[mask, 0], xy[mask, 1], s=6, color=f"C{i % 10}", label=speaker)
        ax_path.scatter(*xy[0], marker="*", s=80, color="k", label="first full window", zorder=5)
        ax_path.legend(fontsize=6, markerscale=1.5, ncol=2)
    ax_path.set_title(f"{scene_name}: last layer's context c_t, full windows (PCA), by speaker", fontsize=8)
    for layer in range(shifts.size(0)):
        ax_shift.plot(positions[1:].numpy(), shifts[layer].numpy(), color=f"C{layer}", linewidth=0.7,
                      label=f"layer {layer}")
    for offset in offsets[1:]:
        ax_shift.axvline(offset, color="grey", linewidth=0.5, alpha=0.5)
    ax_shift.set_yscale("log")
    ax_shift.set_xlabel("byte of the scene (grey: a new speech)")
    ax_shift.set_ylabel("1 - cos(c_t, c_{t - stride})")
    ax_shift.set_title("how far the context moves between two samples", fontsize=8)
    ax_shift.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# --- The run ---------------------------------------------------------------------------------------------------


def run(cfg: ContextAttentionConfig, argv=None) -> dict:
    names = parse_variants(cfg.variants)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    data = encode_tensor(load_text(cfg.data))
    train_data, val_data = train_val_split(data)
    if len(val_data) <= cfg.block_size:
        raise ValueError(f"--data gives only {len(val_data)} held-out bytes; it needs more than --block_size "
                         f"{cfg.block_size}")
    eval_x, eval_y = fixed_batches(val_data, cfg)
    trainees = build_trainees(names, cfg, device)
    params = {name: run.model.num_params() for name, run in trainees.items()}
    print(f"{len(train_data):,} train / {len(val_data):,} held-out bytes; parameters: "
          + ", ".join(f"{name} {n:,}" for name, n in params.items()))

    with open(out_dir / "metrics.jsonl", "w") as logger:
        train_lockstep(trainees, train_data, eval_x, eval_y, cfg, device, logger)
        base = trainees["baseline"]
        # Equal time. In lockstep every variant saw the same load, so the ratio of their step times is fair. The
        # baseline trains on to the steps that the slowest variant's time buys it (capped by max_time_ratio).
        ratio = {name: r.train_seconds / base.train_seconds for name, r in trainees.items()}
        target = math.ceil(cfg.max_iters * min(max(ratio.values()), cfg.max_time_ratio))
        if target > base.steps:
            extend_baseline(base, target, train_data, eval_x, eval_y, cfg, device, logger)

    results: dict = dict(command=shlex.join(["python", "part10_semantic/context_attention.py",
                                             *(sys.argv[1:] if argv is None else argv)]))
    at_max = {name: next(r["val_bits_per_byte"] for r in run.curve if r["iter"] == cfg.max_iters)
              for name, run in trainees.items()}
    for name, run in trainees.items():
        results[f"bits_per_byte_{name}"] = round(at_max[name], 4)
        results[f"train_seconds_{name}"] = next(r["train_seconds"] for r in run.curve if r["iter"] == cfg.max_iters)
        results[f"step_time_ratio_{name}"] = round(ratio[name], 3)
        results[f"params_{name}"] = params[name]
        if name != "baseline":
            # the variant given the baseline's time (its own curve at max_iters / ratio steps), and the baseline
            # given the variant's time (its curve at max_iters * ratio steps, past max_iters if it is slower)
            equal = curve_at(run, cfg.max_iters / ratio[name])
            results[f"bits_per_byte_{name}_equal_time"] = None if equal is None else round(equal, 4)
            base_equal = curve_at(base, cfg.max_iters * ratio[name])
            results[f"bits_per_byte_baseline_at_time_of_{name}"] = None if base_equal is None else round(base_equal, 4)

    # look inside every variant on the first held-out batch
    sinks, gates = {}, {}
    results["first_token_attention_uniform"] = round(uniform_first_token_attention(cfg.block_size), 4)
    for name, run in trainees.items():
        records = look_inside(run.model, eval_x[0].to(device))
        sink = torch.stack([first_token_attention(r["weights"]) for r in records]).cpu()  # (n_layer, n_head)
        sinks[name] = sink
        results[f"first_token_attention_{name}"] = round(sink.mean().item(), 4)
        results[f"first_token_attention_{name}_per_layer"] = [round(v, 4) for v in sink.mean(dim=1).tolist()]
        results[f"first_token_attention_{name}_per_head"] = [[round(v, 4) for v in row] for row in sink.tolist()]
        for key, label in (("output_gate", "output gate sigmoid(x W)"), ("lambda_q", "lambda_q"),
                           ("lambda_k", "lambda_k")):
            if key in records[0]:
                per_layer = [r[key].cpu() for r in records]
                gates[f"{name}: {label}"] = per_layer
                suffix = name if key == "output_gate" else f"{name}_{key}"
                results[f"mean_gate_{suffix}"] = round(torch.cat([g.flatten() for g in per_layer]).mean().item(), 4)
                results[f"mean_gate_{suffix}_per_layer"] = [round(g.mean().item(), 4) for g in per_layer]
                if key == "output_gate":  # Qiu et al.'s sparsity: most scores near 0
                    share = torch.cat([g.flatten() for g in per_layer]).lt(0.1).float().mean().item()
                    results[f"share_gate_below_0.1_{name}"] = round(share, 4)

    # the context vectors along a held-out scene
    context_model = next((trainees[n] for n in ("context_gate", "both") if n in trainees), None)
    scene = held_out_scene(data, len(train_data), cfg.scene_bytes) if context_model else None
    if scene is not None and len(scene[1]) > cfg.block_size:
        scene_name, scene_bytes, turns = scene
        positions, contexts = scene_contexts(context_model.model, scene_bytes, cfg.block_size, cfg.scene_stride,
                                             device)
        shifts = context_shifts(positions, contexts, [o for o, _ in turns], cfg.block_size)
        plot_context_dynamics(positions, contexts, shifts.pop("shift"), turns, scene_name, cfg.block_size,
                              out_dir / "context_dynamics.png")
        results.update(context_scene=scene_name, context_scene_bytes=len(scene_bytes),
                       context_scene_speeches=len(turns), context_model=context_model.name,
                       context_shift_at_speaker_turn=shifts["at_turn"], context_shift_within_speech=shifts["within"],
                       context_shift_counts=[shifts["n_at_turn"], shifts["n_within"]])
    else:
        print("no context_dynamics.png: it needs a context_gate variant, --data shakespeare and a held-out scene "
              "longer than --block_size")

    plot_loss(trainees, cfg.max_iters, out_dir / "loss.png")
    plot_gates(gates, out_dir / "gates.png")
    plot_sink(sinks, results["first_token_attention_uniform"], out_dir / "attention_sink.png")
    atomic_save({"kind": "context_attention", "config": asdict(cfg),
                 "model_configs": {name: asdict(run.model.config) for name, run in trainees.items()},
                 "models": {name: run.model.state_dict() for name, run in trainees.items()}}, out_dir / "ckpt.pt")
    results.update(paper=PAPER, curves={name: run.curve for name, run in trainees.items()},
                   seconds=round(time.perf_counter() - start, 1), config=asdict(cfg))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results, names)
    print(f"{results['seconds']:.0f} s; wrote {out_dir / 'results.json'} and the plots in {out_dir}")
    return results


def print_table(results: dict, names: list[str]) -> None:
    print(f"\n{'variant':>13} {'params':>9} {'bits/byte':>10} {'at equal time':>14} {'step time':>10} "
          f"{'first-token attn':>17} {'mean gate':>10}")
    for name in names:
        equal = results.get(f"bits_per_byte_{name}_equal_time", results[f"bits_per_byte_{name}"])
        gate = results.get(f"mean_gate_{name}", results.get(f"mean_gate_{name}_lambda_q"))
        print(f"{name:>13} {results[f'params_{name}']:9,d} {results[f'bits_per_byte_{name}']:10.4f} "
              f"{'-' if equal is None else f'{equal:.4f}':>14} {results[f'step_time_ratio_{name}']:9.2f}x "
              f"{results[f'first_token_attention_{name}']:17.3f} {'-' if gate is None else f'{gate:.3f}':>10}")
    for name in names[1:]:
        base = results[f"bits_per_byte_baseline_at_time_of_{name}"]
        if base is not None:
            print(f"the baseline, given {name}'s time: {base:.4f} bits/byte")


def main(argv=None) -> dict:
    cfg = parse_config(ContextAttentionConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    return run(cfg, argv)


if __name__ == "__main__":
    run_cli(main)
