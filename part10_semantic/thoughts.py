"""Continuous thoughts: reasoning in the hidden state instead of in words (Coconut).

A chain of thought (CoT) lets a Transformer of fixed depth compute something deeper than its layers: each written
step is an intermediate result that later positions read back. But every step must pass through the vocabulary: the
last hidden state, n_embd numbers, is squeezed into one token. Coconut (Hao et al. 2024, "Training Large Language
Models to Reason in a Continuous Latent Space", https://arxiv.org/abs/2412.06769) skips the squeeze: between <bot> and
<eot> the last hidden state is fed straight back as the next input embedding, a "continuous thought". A staged
curriculum teaches it: stage 0 is the full CoT, stage k replaces the first k written steps by k * c thoughts, and the
last stage replaces them all. Nothing supervises a thought directly: the loss is on the words after <eot>, and its
gradient flows back through every thought, so a training step takes n_thoughts + 1 sequential forward passes (each
thought needs the one before it). We run them with a KV cache, as the reference code does (continuous_forward).

The task (ours, a small cousin of the paper's GSM8k): a start digit and n_steps updates, applied left to right mod 10,

    question   3+4*7-5?                 (n_steps = 3)
    CoT        3+4=7;7*7=9;9-5=4;       (one equation per update, as GSM8k's "<<3+4=7>>")
    answer     #4<end>

Every update is a permutation of the ten digits (+k, -k, *3, *7 or *9 mod 10), so knowing all updates but one leaves
the answer uniform. One shortcut remains: x3, x7 and x9 keep the parity, so the answer's parity is the start's plus
the odd constants of the + and - updates, an XOR that needs no intermediate value (evaluate() scores the answer mod 2
and mod 5 apart to see it). The 2-layer GPT learns neither the shortcut nor three updates in one forward pass, but it
does one update per written step. Six methods, each a GPT from model.py, evaluated on held-out problems:

1. no-CoT: question -> answer;
2. CoT: question -> steps -> answer;
3. pause tokens (Goyal et al. 2023, "Think before you speak", https://arxiv.org/abs/2310.02226): k learned <pause>
   tokens between the question and the answer, no CoT: more positions to compute in, but no recurrence;
4. Coconut with c = 1, 2, 3 thoughts per replaced step, each starting from the CoT model (its stage 0), as the paper's
   GSM8k run starts from its CoT checkpoint.

After every Coconut stage, the thoughts are read two ways (the paper's Figure 2 analysis, and a stronger one): through
the LM head, and with a linear probe per (thought, intermediate value), which sees whatever a thought encodes.

    python part10_semantic/thoughts.py             # everything (~5 minutes on one CPU core)
    python part10_semantic/thoughts.py --n_layer 3 --thoughts_per_step 3 \
        --out_dir runs/part10_semantic/thoughts_L3   # all methods with a 3-layer GPT, Coconut c = 3 only
    python part10_semantic/thoughts.py --help
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` imports from anywhere

import torch
from matplotlib.figure import Figure
from torch.nn import functional as F
from tqdm import tqdm

from part10_semantic.model import GPT, IGNORE_INDEX, GPTConfig
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, parse_int_list, run_cli
from shared.device import pick_device
from shared.metrics import MetricsLogger


@dataclass
class ThoughtsConfig:
    # the task
    n_steps: int = field(default=3, metadata={"help": "updates per problem: the CoT's steps", "min": 1, "max": 25})
    n_train: int = field(default=20000, metadata={"help": "distinct training problems", "min": 1})
    n_heldout: int = field(default=500, metadata={"help": "distinct held-out problems (never trained on)", "min": 1})
    # the model (the chapter's GPT)
    n_layer: int = field(default=2, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_embd: int = field(default=64, metadata={"min": 1})
    # training
    batch_size: int = field(default=64, metadata={"min": 1})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW, constant after a linear warm-up", "min": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW (the paper: 0.01)", "min": 0})
    warmup_iters: int = field(default=50, metadata={"help": "linear warm-up at the start of every stage", "min": 0})
    baseline_iters: int = field(default=1200, metadata={"help": "training steps of each baseline (no-CoT, CoT, pause);"
                                                        " the CoT model is Coconut's stage 0", "min": 1})
    stage_iters: int = field(default=300, metadata={"help": "training steps of each Coconut stage 1 .. n_steps - 1",
                                                    "min": 1})
    final_stage_iters: int = field(default=600, metadata={"help": "training steps of the last Coconut stage (all steps"
                                                          " replaced); the paper trains it longest too", "min": 1})
    thoughts_per_step: str = field(default="1,2,3", metadata={"help": "comma-separated c: continuous thoughts per "
                                                                     "replaced step, one Coconut run each"})
    pause_tokens: int | None = field(default=None, metadata={"help": "<pause> tokens before the answer; none = "
                                                                     "n_steps * the largest c (as many positions as "
                                                                     "Coconut's longest run)", "min": 1})
    eval_interval: int = field(default=250, metadata={"help": "steps between held-out loss evaluations", "min": 1})
    analysis: bool = field(default=True, metadata={"help": "after every Coconut stage, decode the thoughts through the "
                                                           "LM head and fit linear probes on them"})
    probe_train: int = field(default=2000, metadata={"help": "training problems whose thoughts fit the linear probes",
                                                     "min": 1})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/thoughts"


def check_config(cfg: ThoughtsConfig) -> None:
    check_bounds(cfg)
    parse_int_list(cfg.thoughts_per_step, "thoughts_per_step")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")


# --- The task: chains of updates modulo 10 ------------------------------------------------------------------------

# Each update is a permutation of the ten digits: +k and -k for any k, and *k only for the units of Z/10 (k coprime
# to 10). So knowing all updates but one leaves the answer uniform: no partial shortcut to guess with.
UPDATES = [("+", k) for k in range(1, 10)] + [("-", k) for k in range(1, 10)] + [("*", k) for k in (3, 7, 9)]


def apply_update(value: int, op: str, k: int) -> int:
    return {"+": value + k, "-": value - k, "*": value * k}[op] % 10


@dataclass(frozen=True)
class Problem:
    """start, then the updates (ops[i], consts[i]) applied left to right, modulo 10 (no operator precedence)."""

    start: int
    ops: str
    consts: tuple[int, ...]

    def values(self) -> list[int]:
        """The start and the value after every update."""
        out = [self.start]
        for op, k in zip(self.ops, self.consts):
            out.append(apply_update(out[-1], op, k))
        return out

    def question(self) -> str:
        """ "3+4*7-5+9?" """
        return f"{self.start}" + "".join(f"{op}{k}" for op, k in zip(self.ops, self.consts)) + "?"

    def steps(self) -> list[str]:
        """The chain of thought, one equation per update as GSM8k's "<<3+4=7>>": ["3+4=7;", "7*7=9;", ...]."""
        v = self.values()
        return [f"{v[i]}{op}{k}={v[i + 1]};" for i, (op, k) in enumerate(zip(self.ops, self.consts))]

    def answer(self) -> str:
        return f"#{self.values()[-1]}"


def random_problem(rng: random.Random, n_steps: int) -> Problem:
    updates = [rng.choice(UPDATES) for _ in range(n_steps)]
    return Problem(rng.randrange(10), "".join(op for op, _ in updates), tuple(k for _, k in updates))


def make_split(n_train: int, n_heldout: int, n_steps: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """n_train + n_heldout problems with distinct questions, drawn with `seed`; the first n_heldout drawn are held
    out, so the held-out set does not depend on n_train."""
    space = 10 * len(UPDATES) ** n_steps
    if n_train + n_heldout > space // 2:
        raise ValueError(f"{n_train + n_heldout} distinct problems of {n_steps} steps asked for, out of only {space}: "
                         "use fewer, or more --n_steps")
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < n_train + n_heldout:
        p = random_problem(rng, n_steps)
        if p.question() not in seen:
            seen.add(p.question())
            problems.append(p)
    return problems[n_heldout:], problems[:n_heldout]


# --- The vocabulary: characters plus the markers ------------------------------------------------------------------

SPECIALS = ["<end>", "<bot>", "<eot>", "<thought>", "<pause>"]  # <thought>: a placeholder, replaced by a hidden state
VOCAB = SPECIALS + list("0123456789+-*=;?#")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def encode(tokens: list[str]) -> list[int]:
    return [TOKEN_ID[t] for t in tokens]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


# --- One training sequence per method -----------------------------------------------------------------------------


@dataclass
class Sequence:
    """A training sequence: tokens, how many leading tokens get no loss (the prompt: the question, and the <pause>
    tokens or <bot> thoughts <eot>), and where the continuous thoughts sit."""

    tokens: list[str]
    n_prompt: int
    thought_start: int = 0  # index of the first <thought>
    n_thoughts: int = 0


def no_cot_sequence(p: Problem) -> Sequence:
    q = list(p.question())
    return Sequence(q + list(p.answer()) + ["<end>"], len(q))


def cot_sequence(p: Problem) -> Sequence:
    q = list(p.question())
    return Sequence(q + list("".join(p.steps())) + list(p.answer()) + ["<end>"], len(q))


def pause_sequence(p: Problem, n_pause: int) -> Sequence:
    """Goyal et al. 2023: the question, k <pause> tokens, the answer. The outputs at the pause positions are ignored
    (no loss), so the pauses only add positions where the network can compute before it must answer."""
    q = list(p.question()) + ["<pause>"] * n_pause
    return Sequence(q + list(p.answer()) + ["<end>"], len(q))


def coconut_sequence(p: Problem, stage: int, c: int) -> Sequence:
    """The paper's curriculum (section 3, "Training Procedure"): stage 0 is the plain CoT; stage k >= 1 replaces the
    first k written steps by k * c continuous thoughts between <bot> and <eot> and keeps the rest of the CoT. The loss
    skips the question, the markers and the thoughts: it starts at the first word after <eot>.

    (The reference code puts an empty "<bot><eot>" into stage 0; ours is exactly the CoT baseline's sequence, so the
    trained CoT model is stage 0.)"""
    if stage == 0:
        return cot_sequence(p)
    stage = min(stage, len(p.steps()))  # past the last stage every step is replaced (the paper's max_latent_stage)
    q = list(p.question())
    prompt = q + ["<bot>"] + ["<thought>"] * (stage * c) + ["<eot>"]
    rest = list("".join(p.steps()[stage:])) + list(p.answer()) + ["<end>"]
    return Sequence(prompt + rest, len(prompt), thought_start=len(q) + 1, n_thoughts=stage * c)


@dataclass
class Encoded:
    """One method's sequences for a set of problems, as tensors. Every problem has the same length here (one digit
    per number), so a batch needs no padding and all thoughts sit at the same positions."""

    ids: torch.Tensor  # (N, T)
    targets: torch.Tensor  # (N, T - 1): ids[:, 1:], with IGNORE_INDEX where the prompt is being predicted
    n_prompt: int
    thought_start: int
    n_thoughts: int


def encode_sequences(seqs: list[Sequence]) -> Encoded:
    first = seqs[0]
    if any((len(s.tokens), s.n_prompt, s.thought_start, s.n_thoughts) !=
           (len(first.tokens), first.n_prompt, first.thought_start, first.n_thoughts) for s in seqs):
        raise ValueError("all sequences of a set must share one layout")
    ids = torch.tensor([encode(s.tokens) for s in seqs], dtype=torch.long)
    targets = ids[:, 1:].clone()
    targets[:, : first.n_prompt - 1] = IGNORE_INDEX  # target t is token t + 1: the prompt's tokens are not learned
    return Encoded(ids, targets, first.n_prompt, first.thought_start, first.n_thoughts)


# --- The continuous-thought forward pass --------------------------------------------------------------------------


def continuous_forward(model: GPT, idx: torch.Tensor, thought_start: int, n_thoughts: int,
                       kv_cache: list | None = None) -> torch.Tensor:
    """Hidden states (B, T, n_embd) of idx (B, T), whose positions thought_start .. thought_start + n_thoughts - 1
    hold <thought> placeholders: the input at each of them is the last hidden state of the position before it.

    Coconut's n_thoughts + 1 sequential passes (the reference code's Coconut.forward), with a KV cache so that each
    pass computes only its new positions: pass 0 runs the prefix up to and including <bot>; pass i runs thought i
    alone (its input: the previous pass's last hidden state); the last pass runs the last thought together with the
    rest of the sequence. The cache keeps the autograd graph, so the loss on the answer back-propagates through every
    thought into the prefix. kv_cache: bring your own to keep generating afterwards (growing=True)."""
    if n_thoughts == 0:  # a plain sequence: one ordinary pass
        return model.hidden_states(idx, kv_cache)
    cache = kv_cache if kv_cache is not None else model.new_kv_cache(idx.size(0), growing=True)
    embeds = model.wte(idx)  # (B, T, n_embd); the placeholders' own embeddings are never used
    rest = embeds[:, thought_start + n_thoughts :]
    hidden = [model.hidden_states(None, cache, inputs_embeds=embeds[:, :thought_start])]  # through <bot>
    for i in range(n_thoughts):
        thought = hidden[-1][:, -1:]  # (B, 1, n_embd): the last hidden state becomes the next input
        x = thought if i < n_thoughts - 1 else torch.cat((thought, rest), dim=1)
        hidden.append(model.hidden_states(None, cache, inputs_embeds=x))
    return torch.cat(hidden, dim=1)


def sequence_loss(model: GPT, ids: torch.Tensor, targets: torch.Tensor, thought_start: int, n_thoughts: int):
    """Mean cross-entropy of the targets (B, T - 1) given the inputs ids[:, :-1] with their thoughts."""
    hidden = continuous_forward(model, ids[:, :-1], thought_start, n_thoughts)
    logits = model.lm_head(hidden)
    return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, thought_start: int, n_thoughts: int, max_new: int) -> torch.Tensor:
    """Greedy continuation (B, max_new) of prompt (B, Tp), its thoughts filled in as in training (the prompt ends
    with <eot> for Coconut: the number of thoughts is fixed, as in the paper's evaluation)."""
    cache = model.new_kv_cache(prompt.size(0), growing=True)
    h = continuous_forward(model, prompt, thought_start, n_thoughts, cache)
    out = []
    for _ in range(max_new):
        next_id = model.lm_head(h[:, -1]).argmax(-1, keepdim=True)  # (B, 1)
        out.append(next_id)
        h = model.hidden_states(next_id, cache)
    return torch.cat(out, dim=1)


def parse_answer(text: str) -> str | None:
    """The digit after the last '#' of a generated text cut at <end>, or None."""
    text = text.split("<end>")[0]
    at = text.rfind("#")
    return text[at + 1] if 0 <= at < len(text) - 1 else None


@torch.no_grad()
def evaluate(model: GPT, data: Encoded, problems: list[Problem], batch_size: int = 500) -> dict:
    """Held-out answer accuracy, positions generated per answer, and the held-out loss (teacher-forced).

    Also the accuracy of the answer mod 2 and mod 5 (chance 0.5 and 0.2): a digit mod 10 is the pair (mod 2, mod 5),
    and the two halves differ in difficulty. Every update keeps or flips the parity on its own (x3, x7, x9 keep it,
    +k and -k flip it when k is odd), so the answer's parity is the start's parity plus the odd constants, mod 2: an
    XOR of the inputs that needs no intermediate value. Only the mod 5 half needs the chain of values."""
    model.eval()
    device = model.wte.weight.device
    correct, correct_mod, positions, losses = 0, {2: 0, 5: 0}, 0, []
    marker_positions = data.n_prompt - len(problems[0].question())  # <pause>s, or <bot> thoughts <eot>
    max_new = data.ids.size(1) - data.n_prompt + 2  # the gold continuation and a little slack
    end = TOKEN_ID["<end>"]
    for lo in range(0, len(problems), batch_size):
        ids = data.ids[lo : lo + batch_size].to(device)
        targets = data.targets[lo : lo + batch_size].to(device)
        losses.append(sequence_loss(model, ids, targets, data.thought_start, data.n_thoughts).item() * len(ids))
        out = generate(model, ids[:, : data.n_prompt], data.thought_start, data.n_thoughts, max_new).tolist()
        for row, p in zip(out, problems[lo : lo + batch_size]):
            n_gen = row.index(end) + 1 if end in row else len(row)
            positions += marker_positions + n_gen
            answer, gold = parse_answer(decode(row[:n_gen])), p.values()[-1]
            correct += answer == str(gold)
            for m in correct_mod:
                correct_mod[m] += answer is not None and answer.isdigit() and int(answer) % m == gold % m
    model.train()
    return dict(accuracy=correct / len(problems), positions=positions / len(problems),
                val_loss=sum(losses) / len(problems), accuracy_mod2=correct_mod[2] / len(problems),
                accuracy_mod5=correct_mod[5] / len(problems))


# --- Training -----------------------------------------------------------------------------------------------------


def train_stage(model: GPT, train: Encoded, heldout: Encoded, heldout_problems: list[Problem], iters: int,
                cfg: ThoughtsConfig, generator: torch.Generator, logger: MetricsLogger, run: str, stage: int,
                first_iter: int) -> list[float]:
    """Train `iters` steps on one method's (or one Coconut stage's) sequences, with a fresh AdamW: the paper resets
    the optimizer state whenever the stage changes (reference code: reset_optimizer). Returns the step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    device = model.wte.weight.device
    losses = []
    bar = tqdm(range(iters), desc=f"{run} stage {stage}" if stage else run, dynamic_ncols=True, leave=False)
    for it in bar:
        lr = cfg.learning_rate * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.randint(len(train.ids), (cfg.batch_size,), generator=generator)
        loss = sequence_loss(model, train.ids[rows].to(device), train.targets[rows].to(device), train.thought_start,
                             train.n_thoughts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{run}: the loss became {losses[-1]} at step {it}; try a lower --learning_rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (it + 1) % cfg.eval_interval == 0 or it + 1 == iters:
            window = losses[-cfg.eval_interval:]
            with torch.no_grad():
                model.eval()
                rows = torch.arange(min(len(heldout.ids), 500))
                val = sequence_loss(model, heldout.ids[rows].to(device), heldout.targets[rows].to(device),
                                    heldout.thought_start, heldout.n_thoughts).item()
                model.train()
            logger.log(run=run, stage=stage, iter=first_iter + it + 1, train_loss=sum(window) / len(window),
                       val_loss=val, lr=lr)
    bar.close()
    return losses


def init_thought_markers(model: GPT) -> None:
    """The reference code's start for the new tokens: <bot>, <eot> and <thought> begin as a copy of a known token's
    embedding (GPT-2's "<<"; here ";", the end of a step), which it found to stabilise training. The CoT model never
    saw them, so their rows are still the random initialisation. (The LM head is tied: its rows follow.)"""
    with torch.no_grad():
        for token in ("<bot>", "<eot>", "<thought>"):
            model.wte.weight[TOKEN_ID[token]] = model.wte.weight[TOKEN_ID[";"]]


def new_model(cfg: ThoughtsConfig, block_size: int, device: str) -> GPT:
    config = GPTConfig(block_size=block_size, vocab_size=len(VOCAB), n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd)
    return GPT(config).to(device)


# --- The paper's analysis: what a thought decodes to --------------------------------------------------------------


@torch.no_grad()
def thought_states(model: GPT, data: Encoded) -> torch.Tensor:
    """The continuous thoughts (N, n_thoughts, n_embd) of data's prompts: the hidden state one position before each
    <thought>, which is what the model reads there."""
    model.eval()
    ids = data.ids[:, : data.n_prompt].to(model.wte.weight.device)
    hidden = continuous_forward(model, ids, data.thought_start, data.n_thoughts)
    model.train()
    return hidden[:, data.thought_start - 1 : data.thought_start - 1 + data.n_thoughts]


def step_values(problems: list[Problem]) -> torch.Tensor:
    """(N, n_steps): the value after each update, the quantities a thought might carry."""
    return torch.tensor([p.values()[1:] for p in problems])


def probe_thoughts(model: GPT, train: Encoded, train_problems: list[Problem], heldout: Encoded,
                   heldout_problems: list[Problem], iters: int = 150) -> list[list[float]]:
    """A linear probe per (thought j, step s): softmax regression from thought j to the value after step s, fitted
    on training problems' thoughts and scored on the held-out ones (chance 0.1). The LM head (decode_thoughts) only
    sees what a thought "says" as a next token; a probe sees any value the thought encodes linearly, so a value no
    probe finds is not there in a form the next layer's linear maps can read either."""
    x_train, x_held = thought_states(model, train).float(), thought_states(model, heldout).float()
    y_train, y_held = step_values(train_problems).to(x_train.device), step_values(heldout_problems).to(x_train.device)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5  # standardise each thought's channels (train statistics)
    x_train, x_held = (x_train - mean) / std, (x_held - mean) / std
    n_thoughts, n_embd, n_steps = x_train.size(1), x_train.size(2), y_train.size(1)
    # all n_thoughts * n_steps probes at once: weight[j, s] maps thought j to the 10 logits of step s's value
    weight = torch.zeros(n_thoughts, n_steps, n_embd, 10, device=x_train.device, requires_grad=True)
    bias = torch.zeros(n_thoughts, n_steps, 10, device=x_train.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)

    def logits(x):  # (N, n_thoughts, n_embd) -> (N, n_thoughts, n_steps, 10)
        return torch.einsum("njc,jscv->njsv", x, weight) + bias

    targets = y_train[:, None, :].expand(-1, n_thoughts, -1)  # (N, n_thoughts, n_steps)
    with torch.enable_grad():
        for _ in range(iters):
            loss = F.cross_entropy(logits(x_train).flatten(0, 2), targets.flatten()) + 1e-3 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        hits = logits(x_held).argmax(-1) == y_held[:, None, :]  # (N, n_thoughts, n_steps)
    return [[round(x, 3) for x in row] for row in hits.float().mean(0).tolist()]


@torch.no_grad()
def decode_thoughts(model: GPT, data: Encoded, problems: list[Problem], c: int) -> dict:
    """Each continuous thought (a last hidden state fed back) read through the LM head, as the paper's Figure 2
    decodes GSM8k thoughts into the intermediate numbers. For every thought j and every step s: how often the most
    likely digit of thought j is the value of step s (chance: 0.1). A diagonal, j // c = s - 1, means the thoughts
    carry the intermediate values in order, as the CoT's written steps did."""
    thoughts = thought_states(model, data)  # (N, n_thoughts, C)
    probs = model.lm_head(thoughts).softmax(-1)  # (N, n_thoughts, vocab)
    digit_ids = [TOKEN_ID[str(d)] for d in range(10)]
    top_digit = probs[..., digit_ids].argmax(-1)  # (N, n_thoughts)
    values = step_values(problems).to(top_digit.device)  # (N, n_steps)
    match = (top_digit[:, :, None] == values[:, None, :]).float().mean(0)  # (n_thoughts, n_steps)
    example = problems[0]
    top = probs[0].topk(3, dim=-1)
    return dict(c=c, digit_match=[[round(x, 3) for x in row] for row in match.tolist()],
                digit_mass=round(probs[..., digit_ids].sum(-1).mean().item(), 3),
                example_question=example.question(), example_steps=example.steps(),
                example_top3=[[(VOCAB[i], round(pr, 3)) for i, pr in zip(idx, pr_row)]
                              for idx, pr_row in zip(top.indices.tolist(), top.values.tolist())])


# --- Plots --------------------------------------------------------------------------------------------------------


def plot_accuracy(results: dict, curves: dict, path: Path):
    """Held-out accuracy against the positions generated per answer: the paper's efficiency argument (Figure 3,
    Table 1's "# tokens"). Each Coconut line runs through its stages, from the CoT (stage 0) to all steps replaced."""
    fig = Figure(figsize=(6.5, 4.2), dpi=120)
    ax = fig.add_subplot()
    for i, (name, label) in enumerate((("no_cot", "no CoT"), ("cot", "CoT"), ("pause", "pause tokens"))):
        ax.plot(results[f"tokens_per_answer_{name}"], results[f"accuracy_{name}"], "s", markersize=8,
                color=f"C{i}", label=label)
    for j, (c, points) in enumerate(curves.items()):
        xs, ys = zip(*[(pt["positions"], pt["accuracy"]) for pt in points])
        ax.plot(xs, ys, "-o", color=f"C{j + 3}", label=f"Coconut c={c} (stages 0..{len(points) - 1})")
        ax.annotate(f"c={c}", (xs[-1], ys[-1]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance (one digit)")
    ax.set_xlabel("positions per answer after the question (words, pauses, markers and thoughts)")
    ax.set_ylabel("held-out answer accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Chains of updates mod 10: accuracy vs positions", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_losses(step_losses: dict, stage_starts: dict, path: Path):
    """Training loss of every run, smoothed; the Coconut runs continue after the CoT's steps (their stage 0), and a
    dotted line marks each stage switch (the loss jumps when more steps become thoughts)."""
    fig = Figure(figsize=(8, 4.2), dpi=120)
    ax = fig.add_subplot()
    for i, (run, losses) in enumerate(step_losses.items()):
        start = stage_starts.get(run, [0])[0]
        x = torch.tensor(losses)
        window = max(1, min(25, len(x) // 10))
        smooth = x.unfold(0, window, 1).mean(1) if len(x) >= window else x
        ax.plot(range(start + window - 1, start + window - 1 + len(smooth)), smooth.tolist(), color=f"C{i}",
                label=run, linewidth=1, linestyle="--" if run == "no_cot" else "-")  # no-CoT and pause overlap
        for s in stage_starts.get(run, []):
            ax.axvline(s, color=f"C{i}", linestyle=":", linewidth=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("training step (Coconut runs start from the CoT model)")
    ax.set_ylabel("training loss (answer and CoT tokens, nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_thoughts(analyses: list[dict], path: Path):
    """For each c, at one stage, two (thought j, step s) matrices: top row, how often thought j's top digit through
    the LM head is the value after step s (decode_thoughts); bottom row, the held-out accuracy of a linear probe from
    thought j to that value (probe_thoughts). Chance is 0.1 in both."""
    fig = Figure(figsize=(3.2 * len(analyses), 6.4), dpi=120)
    axes = fig.subplots(2, len(analyses), squeeze=False)
    for col, a in enumerate(analyses):
        for ax, key, what in ((axes[0, col], "digit_match", "LM head: top digit = the value"),
                              (axes[1, col], "probe_accuracy", "linear probe accuracy")):
            m = a[key]  # (n_thoughts, n_steps) as lists
            ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for j, row in enumerate(m):
                for s, v in enumerate(row):
                    ax.text(s, j, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
            ax.set_xticks(range(len(m[0])), [f"value {s + 1}" for s in range(len(m[0]))], fontsize=7)
            ax.set_yticks(range(len(m)), [f"thought {j + 1}" for j in range(len(m))], fontsize=7)
            ax.set_title(f"c={a['c']}, stage {a['stage']} (accuracy {a['accuracy']:.2f}):\n{what}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --- The run ------------------------------------------------------------------------------------------------------


def run(cfg: ThoughtsConfig, argv: list[str] | None = None) -> dict:
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    cs = parse_int_list(cfg.thoughts_per_step, "thoughts_per_step")
    n_pause = cfg.pause_tokens or cfg.n_steps * max(cs)
    out_dir = Path(cfg.out_dir)
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    train_problems, heldout_problems = make_split(cfg.n_train, cfg.n_heldout, cfg.n_steps, cfg.seed)
    example = train_problems[0]
    print(f"{len(train_problems):,} training and {len(heldout_problems):,} held-out problems, e.g. "
          f"{example.question()} -> {''.join(example.steps())} {example.answer()}")

    def sets(make):
        return (encode_sequences([make(p) for p in train_problems]),
                encode_sequences([make(p) for p in heldout_problems]))

    layouts = {"no_cot": sets(no_cot_sequence), "cot": sets(cot_sequence),
               "pause": sets(lambda p: pause_sequence(p, n_pause))}
    for c in cs:
        for stage in range(1, cfg.n_steps + 1):
            layouts[f"coconut_c{c}_stage{stage}"] = sets(lambda p, s=stage, c=c: coconut_sequence(p, s, c))
    block_size = max(train.ids.size(1) for train, _ in layouts.values()) + 2  # + the generation slack

    results: dict = {"task_example": {"question": example.question(), "steps": example.steps(),
                                      "answer": example.answer()}, "pause_tokens": n_pause,
                     "tokens_per_answer_counts": "every position after the question: <pause>s, or <bot> thoughts "
                                                 "<eot>, then the generated tokens up to and including <end>"}
    step_losses, stage_starts, curves, analyses, models = {}, {}, {}, [], {}
    with MetricsLogger(out_dir) as logger:
        # the three baselines: one model each, trained from scratch on its own format
        for name in ("no_cot", "cot", "pause"):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            model = new_model(cfg, block_size, device)
            train, heldout = layouts[name]
            step_losses[name] = train_stage(model, train, heldout, heldout_problems, cfg.baseline_iters, cfg, generator,
                                            logger, name, 0, 0)
            scores = evaluate(model, heldout, heldout_problems)
            results[f"accuracy_{name}"] = round(scores["accuracy"], 4)
            results[f"tokens_per_answer_{name}"] = round(scores["positions"], 2)
            results[f"val_loss_{name}"] = round(scores["val_loss"], 4)
            for m in ("mod2", "mod5"):
                results[f"accuracy_{m}_{name}"] = round(scores[f"accuracy_{m}"], 4)
            results[f"seconds_{name}"] = round(time.perf_counter() - t0, 1)
            models[name] = model
            tqdm.write(f"{name:12s}: accuracy {scores['accuracy']:.3f}, {scores['positions']:.1f} positions per "
                       f"answer, {results[f'seconds_{name}']:.0f} s")
        cot_point = dict(stage=0, accuracy=results["accuracy_cot"], positions=results["tokens_per_answer_cot"])

        # Coconut: from the CoT model (stage 0), stage k replaces the first k steps by k * c thoughts
        for c in cs:
            t0 = time.perf_counter()
            run_name = f"coconut_c{c}"
            model = copy.deepcopy(models["cot"])
            init_thought_markers(model)
            curves[c], step_losses[run_name], stage_starts[run_name] = [cot_point], [], []
            for stage in range(1, cfg.n_steps + 1):
                iters = cfg.final_stage_iters if stage == cfg.n_steps else cfg.stage_iters
                train, heldout = layouts[f"{run_name}_stage{stage}"]
                stage_starts[run_name].append(cfg.baseline_iters + len(step_losses[run_name]))
                step_losses[run_name] += train_stage(model, train, heldout, heldout_problems, iters, cfg, generator,
                                                     logger, run_name, stage, stage_starts[run_name][-1])
                scores = evaluate(model, heldout, heldout_problems)
                curves[c].append(dict(stage=stage, accuracy=round(scores["accuracy"], 4),
                                      positions=round(scores["positions"], 2), val_loss=round(scores["val_loss"], 4),
                                      accuracy_mod2=round(scores["accuracy_mod2"], 4),
                                      accuracy_mod5=round(scores["accuracy_mod5"], 4)))
                tqdm.write(f"{run_name} stage {stage}: {stage * c} thoughts + {cfg.n_steps - stage} written steps: "
                           f"accuracy {scores['accuracy']:.3f}, {scores['positions']:.1f} positions per answer")
                if cfg.analysis:  # what the thoughts of this stage decode to, and which values they encode at all
                    n = min(cfg.probe_train, len(train_problems))
                    probe_set = dataclasses.replace(train, ids=train.ids[:n], targets=train.targets[:n])
                    probe = probe_thoughts(model, probe_set, train_problems[:n], heldout, heldout_problems)
                    analyses.append(dict(stage=stage, accuracy=curves[c][-1]["accuracy"], probe_accuracy=probe,
                                         **decode_thoughts(model, heldout, heldout_problems, c)))
            final = curves[c][-1]
            results[f"accuracy_{run_name}"] = final["accuracy"]
            results[f"tokens_per_answer_{run_name}"] = final["positions"]
            results[f"val_loss_{run_name}"] = final["val_loss"]
            for m in ("mod2", "mod5"):
                results[f"accuracy_{m}_{run_name}"] = final[f"accuracy_{m}"]
            results[f"seconds_{run_name}"] = round(time.perf_counter() - t0, 1)
            models[run_name] = model

    results["coconut_stages"] = {f"c{c}": points for c, points in curves.items()}
    if analyses:
        results["thought_analysis"] = analyses
        # the last stage of every c, and before them the latest earlier stage that still answers at least half of the
        # problems (its thoughts carry something), of the largest such c
        shown = [next(a for a in reversed(analyses) if a["c"] == c) for c in cs]
        working = [a for a in analyses if a["stage"] < cfg.n_steps and a["accuracy"] >= 0.5]
        if working:
            shown.insert(0, max(working, key=lambda a: (a["stage"], a["c"])))
        plot_thoughts(shown, out_dir / "thoughts.png")
    plot_accuracy(results, curves, out_dir / "accuracy.png")
    plot_losses(step_losses, stage_starts, out_dir / "loss.png")
    atomic_save({"kind": "coconut_thoughts", "config": asdict(cfg), "vocab": VOCAB, "block_size": block_size,
                 "models": {name: m.state_dict() for name, m in models.items()}}, out_dir / "ckpt.pt")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = asdict(cfg)
    flags = sys.argv[1:] if argv is None else argv
    results["command"] = shlex.join(["python", "part10_semantic/thoughts.py", *flags])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'method':14s} {'accuracy':>9s} {'positions/answer':>17s}")
    for name in ["no_cot", "cot", "pause"] + [f"coconut_c{c}" for c in cs]:
        print(f"{name:14s} {results[f'accuracy_{name}']:9.3f} {results[f'tokens_per_answer_{name}']:17.1f}")
    print(f"{results['seconds']:.0f} s; wrote {out_dir / 'results.json'} and the plots in {out_dir}")
    return results


def main(argv=None) -> dict:
    cfg = parse_config(ThoughtsConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    return run(cfg, argv)


if __name__ == "__main__":
    run_cli(main)
