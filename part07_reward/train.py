"""Train a reward model on preference pairs: which of two responses to a prompt is better?

Part 6's loop, with the changes a reward model needs:
- the data: pairs (prompt, chosen, rejected) instead of (prompt, answer). Two kinds: hand-made pairs from
  shared/tasks.py (chosen = the gold answer, rejected = a plausible failure: a wrong answer, a truncated,
  repeated, off-format or off-topic one), and on-policy pairs: answers the SFT model samples for a prompt,
  the better one by the task's verifier as chosen (the realistic case: the answers PPO will produce);
- the model: the SFT backbone with a scalar head on the last real token (model.RewardModel);
- the loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952; Christiano et al.
  2017, https://arxiv.org/abs/1706.03741), or a margin ranking loss, max(0, m - (r_chosen - r_rejected)).
At the end: held-out pairwise accuracy, overall, per failure mode and on the SFT model's own answers; the
sanity checks (length bias, gold > SFT answer > corrupted answer, calibration); and the normalisation
(mean 0, std 1 on the SFT model's answers) stored in the checkpoint for part 8.

    python part07_reward/train.py                                 # the main run (~5 minutes on 2 CPU cores)
    python part07_reward/train.py --loss bt --out_dir runs/part07_bt         # Bradley-Terry instead
    python part07_reward/train.py --init_from runs/other/ckpt.pt --out_dir runs/part07_other
    python part07_reward/train.py --help
"""
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part06_sft.eval import generate_answers, load_policy
from part06_sft.template import encode_prompt
from part07_reward.model import RewardModel
from part07_reward.score import right_pad, score_responses, sequence_ids
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, read_metrics, read_steps
from shared.tasks import TASKS, Example, get_examples, get_preferences, verify

SFT_CKPT = "runs/part06_sft/ckpt.pt"


@dataclass
class TrainConfig:
    init_from: str = field(default=SFT_CKPT, metadata={"help": "the SFT checkpoint the backbone starts from"})
    loss: str = field(default="margin", metadata={"choices": ["bt", "margin"], "help": "bt: Bradley-Terry, -log "
                      "sigmoid(r_c - r_r); margin: max(0, margin - (r_c - r_r)) (the default: see the README)"})
    margin: float = field(default=1.0, metadata={"help": "the margin of --loss margin", "min": 0})
    margin_from_strength: bool = field(default=True, metadata={"help": "--loss margin: scale the margin by the "
                                       "pair's preference strength (verifier reward of chosen - rejected)"})
    # on-policy pairs: answers the SFT model samples, ranked by the task's verifier
    onpolicy_prompts: int = field(default=200, metadata={"help": "training prompts per task the SFT model answers "
                                                                 "(its answers are also the normalisation's reference)",
                                                         "min": 1})
    onpolicy_heldout: int = field(default=50, metadata={"help": "held-out prompts per task for on-policy test pairs",
                                                        "min": 1})
    onpolicy_samples: int = field(default=4, metadata={"help": "answers sampled per prompt", "min": 2})
    onpolicy_temperature: float = field(default=1.0, metadata={"min": 1e-6})
    onpolicy_fraction: float = field(default=0.25, metadata={"help": "share of each batch taken from on-policy pairs",
                                                             "min": 0, "max": 1})
    # the optimisation
    batch_size: int = field(default=32, metadata={"help": "pairs per step (2 x batch_size sequences)", "min": 1})
    learning_rate: float = field(default=3e-4, metadata={"min": 0})
    warmup_iters: int = field(default=30, metadata={"min": 0})
    min_lr: float = field(default=3e-5, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "0 = off", "min": 0})
    max_iters: int = field(default=600, metadata={"min": 0})
    eval_interval: int = field(default=100, metadata={"min": 1})
    eval_pairs: int = field(default=40, metadata={"help": "held-out pairs per task for the curve in metrics.jsonl",
                                                  "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"]})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part07_reward"


def check_config(cfg: TrainConfig) -> None:
    check_bounds(cfg)
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Part 6's schedule: a linear warmup, then half a cosine down to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.learning_rate - cfg.min_lr)


# --- The losses ---------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen beats rejected), with P = sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952): the
    rewards are the logits of a pairwise preference. logsigmoid, not log(sigmoid()), which is -inf once the
    difference is below about -100 in float32."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def margin_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin) -> torch.Tensor:
    """max(0, margin - (r_chosen - r_rejected)): zero once chosen leads by the margin, so pairs already
    ranked well stop pulling (the BT loss never stops: it keeps widening every gap). margin: a number or a
    tensor (B,), e.g. larger for pairs whose quality differs more (as Llama 2's reward model does)."""
    return F.relu(margin - (r_chosen - r_rejected)).mean()


# --- The pairs ----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    task: str
    prompt: str
    chosen: str
    rejected: str
    kind: str  # a failure mode of shared.tasks (hand-made pairs) or "on_policy"
    strength: float  # verifier reward of chosen - rejected, in (0, 1]


def handmade_pairs(split: str) -> list[Pair]:
    """shared/tasks.py's pairs: chosen = gold, rejected = one failure mode per example."""
    pairs = []
    for p in get_preferences(split):
        ex = Example(p.task, p.prompt, p.chosen)  # the gold is the chosen answer
        pairs.append(Pair(p.task, p.prompt, p.chosen, p.rejected, p.failure_mode,
                          verify(ex, p.chosen) - verify(ex, p.rejected)))
    return pairs


def onpolicy_pairs(policy, tokenizer, examples: list, samples: int, temperature: float, batch_size: int = 64):
    """The SFT model answers each prompt `samples` times; the best and the worst answer by the verifier make a
    pair (when they differ). Returns (pairs, every answer with its prompt and reward)."""
    if not examples:
        return [], []
    max_len = policy.config.block_size - 32
    prompts = [encode_prompt(tokenizer, ex.prompt)[-max_len:] for ex in examples for _ in range(samples)]
    answers = generate_answers(policy, tokenizer, prompts, 32, temperature, batch_size, "sample answers")
    pairs, scored = [], []
    for i, ex in enumerate(examples):
        responses = [text for text, _ in answers[i * samples : (i + 1) * samples]]
        rewards = [verify(ex, r) for r in responses]
        scored += [(ex, r, w) for r, w in zip(responses, rewards)]
        best, worst = max(range(samples), key=rewards.__getitem__), min(range(samples), key=rewards.__getitem__)
        if rewards[best] > rewards[worst]:
            pairs.append(Pair(ex.task, ex.prompt, responses[best], responses[worst], "on_policy",
                              rewards[best] - rewards[worst]))
    return pairs, scored


def encode_pairs(tokenizer, pairs: list[Pair], block_size: int):
    return [(sequence_ids(tokenizer, p.prompt, p.chosen, block_size),
             sequence_ids(tokenizer, p.prompt, p.rejected, block_size)) for p in pairs]


def pair_batch(pairs: list, pad_id: int, device: str):
    """The chosen and the rejected sequences of B encoded pairs, as one right-padded batch of 2B rows: the
    chosen ones first. One forward pass scores both, with the same weights."""
    ids, mask = right_pad([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], pad_id)
    return ids.to(device), mask.to(device)


# --- Evaluation ------------------------------------------------------------------------------------------------


def pair_scores(model, tokenizer, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.rejected for p in pairs])
    return chosen, rejected


def accuracy_by(pairs: list[Pair], correct: torch.Tensor, key) -> dict:
    groups = defaultdict(list)
    for p, c in zip(pairs, correct.tolist()):
        groups[key(p)].append(c)
    return {k: dict(accuracy=round(sum(v) / len(v), 4), n=len(v)) for k, v in groups.items()}


def calibration(margins: torch.Tensor, n_bins: int = 10, seed: int = 0):
    """Reliability of P(chosen wins) = sigmoid(r_c - r_r). Each pair is shown in a random order (a, b), so
    both outcomes occur: predicted p = sigmoid(r_a - r_b), outcome = a is the chosen one. Returns the bins
    (mean predicted, observed win rate, count) and the expected calibration error (ECE: the count-weighted
    gap between the two; 0 = perfectly calibrated)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(margins), generator=g) < 0.5
    predicted = torch.sigmoid(torch.where(flip, -margins, margins))
    outcome = (~flip).float()  # a is the chosen one when not flipped
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = (predicted >= b / n_bins) & ((predicted < (b + 1) / n_bins) | (b == n_bins - 1))
        if inside.any():
            p, o = predicted[inside].mean().item(), outcome[inside].mean().item()
            bins.append((p, o, int(inside.sum())))
            ece += inside.sum().item() / len(margins) * abs(p - o)
    return bins, ece


def within_group(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x minus the mean of x over the entries with the same group value: what is left once the group (here:
    the verifier's reward) is accounted for. A reward that still tracks length after this is length-biased."""
    means = {g: x[groups == g].mean() for g in groups.unique().tolist()}
    return x - torch.stack([means[g] for g in groups.tolist()])


def mean_or_none(x: torch.Tensor) -> float | None:
    """The mean, rounded, or None for an empty tensor (NaN is not valid JSON)."""
    return round(x.mean().item(), 3) if x.numel() else None


def rounded(x: float) -> float | None:
    return round(x, 3) if math.isfinite(x) else None  # None: undefined (e.g. a correlation with a constant)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation; NaN when either is constant (then it is undefined)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return (x @ y / (x.norm() * y.norm())).item()


def plot_scores(groups: dict[str, torch.Tensor], path: Path) -> None:
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    low = min(v.min().item() for v in groups.values())
    high = max(v.max().item() for v in groups.values())
    for i, (name, values) in enumerate(groups.items()):
        ax.hist(values.tolist(), bins=40, range=(low, high), alpha=0.5, density=True, color=f"C{i}",
                label=f"{name} (mean {values.mean():+.2f})")
    ax.set_xlabel("normalised reward (0 = the SFT model's average answer)")
    ax.set_ylabel("density")
    ax.set_title("part07: reward of held-out answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_calibration(bins, ece: float, path: Path) -> None:
    fig = Figure(figsize=(4.6, 4.4), dpi=120)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", label=f"reward model (ECE {ece:.3f})")
    for p, o, n in bins:
        ax.annotate(str(n), (p, o), textcoords="offset points", xytext=(4, -10), fontsize=6)
    ax.set_xlabel("predicted P(a beats b) = sigmoid(r_a - r_b)")
    ax.set_ylabel("observed: a is the chosen answer")
    ax.set_title("part07: calibration on held-out pairs")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


# --- Training ---------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig):
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    autocast(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not Path(cfg.init_from).is_file():
        make = "python part06_sft/train.py (after python part04_scaling/train.py)" if cfg.init_from == SFT_CKPT \
            else "it"
        raise FileNotFoundError(f"no SFT model at {cfg.init_from}: make {make} first, or choose another checkpoint "
                                "with --init_from PATH")
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    policy, tokenizer, _ = load_policy(cfg.init_from, device)
    if "<|end|>" not in tokenizer.special_tokens:
        raise ValueError(f"{cfg.init_from} has no chat tokens: the reward model starts from an SFT model "
                         "(python part06_sft/train.py)")
    block_size = policy.config.block_size

    # The data: hand-made pairs, and the SFT model's own answers ranked by the verifier
    train_pairs, heldout_pairs = handmade_pairs("train"), handmade_pairs("heldout")
    rng = Random(cfg.seed)
    onpolicy_train_examples = [ex for t in TASKS for ex in rng.sample(get_examples("train", t), cfg.onpolicy_prompts)]
    onpolicy_train, reference = onpolicy_pairs(policy, tokenizer, onpolicy_train_examples, cfg.onpolicy_samples,
                                               cfg.onpolicy_temperature)
    onpolicy_test, heldout_answers = onpolicy_pairs(policy, tokenizer, [ex for t in TASKS for ex in get_examples(
        "heldout", t)[: cfg.onpolicy_heldout]], cfg.onpolicy_samples, cfg.onpolicy_temperature)
    print(f"{len(train_pairs):,} hand-made + {len(onpolicy_train):,} on-policy training pairs | held out: "
          f"{len(heldout_pairs):,} hand-made + {len(onpolicy_test):,} on-policy pairs")

    # The reward model: the SFT backbone, a new scalar head
    model = RewardModel(policy.config).to(device)
    model.backbone.load_state_dict(policy.state_dict())
    del policy
    encoded, encoded_onpolicy = encode_pairs(tokenizer, train_pairs, block_size), encode_pairs(
        tokenizer, onpolicy_train, block_size)
    strengths = torch.tensor([p.strength for p in train_pairs])
    strengths_onpolicy = torch.tensor([p.strength for p in onpolicy_train])
    curve_pairs = [p for t in TASKS for p in [q for q in heldout_pairs if q.task == t][: cfg.eval_pairs]]
    optimizer = model.backbone.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    optimizer.add_param_group({"params": list(model.head.parameters()), "weight_decay": 0.0})
    n_onpolicy = round(cfg.onpolicy_fraction * cfg.batch_size) if onpolicy_train else 0
    generator = torch.Generator().manual_seed(cfg.seed)

    logger = MetricsLogger(out_dir)
    train_seconds, step_loss = 0.0, math.nan
    bar = tqdm(range(cfg.max_iters + 1), desc="reward model", dynamic_ncols=True)
    try:
        for it in bar:
            lr = lr_at(it, cfg)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                model.eval()
                chosen, rejected = pair_scores(model, tokenizer, curve_pairs)
                model.train()
                val_loss = bradley_terry_loss(chosen, rejected).item()
                val_accuracy = (chosen > rejected).float().mean().item()
                if not math.isfinite(val_loss):
                    raise FloatingPointError(f"step {it}: the held-out loss is {val_loss}; try a lower --learning_rate")
                logger.log(iter=it, train_loss=step_loss, val_loss=val_loss, val_accuracy=val_accuracy, lr=lr)
                bar.write(f"iter {it:4d} | step loss {step_loss:.4f} | held-out BT loss {val_loss:.4f} | "
                          f"held-out accuracy {val_accuracy:.3f}")
            if it == cfg.max_iters:
                break

            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr
            hand = torch.randint(len(encoded), (cfg.batch_size - n_onpolicy,), generator=generator).tolist()
            onp = torch.randint(len(encoded_onpolicy), (n_onpolicy,), generator=generator).tolist() if n_onpolicy \
                else []
            batch = [encoded[i] for i in hand] + [encoded_onpolicy[i] for i in onp]
            strength = torch.cat((strengths[hand], strengths_onpolicy[onp])).to(device)
            ids, mask = pair_batch(batch, tokenizer.eot_token, device)
            with autocast(device, cfg.dtype):
                rewards = model(ids, mask).float()
            r_chosen, r_rejected = rewards[: len(batch)], rewards[len(batch) :]
            if cfg.loss == "bt":
                loss = bradley_terry_loss(r_chosen, r_rejected)
            else:
                loss = margin_ranking_loss(r_chosen, r_rejected,
                                           cfg.margin * strength if cfg.margin_from_strength else cfg.margin)
            loss.backward()
            step_loss = loss.item()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"step {it}: the loss became {step_loss}; try a lower --learning_rate")
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - step_start
            logger.log_step(it, step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
    finally:
        bar.close()
        logger.close()

    # --- The evaluation: accuracy, sanity checks, normalisation, calibration ---
    model.eval()
    ref_scores = score_responses(model, tokenizer, [ex.prompt for ex, _, _ in reference], [r for _, r, _ in reference])
    reward_mean, reward_std = ref_scores.mean().item(), ref_scores.std().item()

    def norm(x):
        return (x - reward_mean) / reward_std

    chosen, rejected = pair_scores(model, tokenizer, heldout_pairs)
    correct = chosen > rejected
    on_chosen, on_rejected = pair_scores(model, tokenizer, onpolicy_test) if onpolicy_test else (None, None)
    on_correct = on_chosen > on_rejected if onpolicy_test else torch.zeros(0, dtype=torch.bool)
    answers = score_responses(model, tokenizer, [ex.prompt for ex, _, _ in heldout_answers],
                              [r for _, r, _ in heldout_answers])
    answer_lengths = torch.tensor([len(sequence_ids(tokenizer, ex.prompt, r, block_size)) -
                                   len(encode_prompt(tokenizer, ex.prompt)) for ex, r, _ in heldout_answers],
                                  dtype=torch.float)
    answer_rewards = torch.tensor([w for _, _, w in heldout_answers])
    bins, ece = calibration(torch.cat((chosen - rejected, on_chosen - on_rejected)) if onpolicy_test
                            else chosen - rejected)
    results = dict(
        heldout_accuracy=round(correct.float().mean().item(), 4), n=len(heldout_pairs),
        by_failure_mode=accuracy_by(heldout_pairs, correct, lambda p: p.kind),
        by_task=accuracy_by(heldout_pairs, correct, lambda p: p.task),
        onpolicy_accuracy=round(on_correct.float().mean().item(), 4) if onpolicy_test else None,
        onpolicy_n=len(onpolicy_test),
        onpolicy_by_task=accuracy_by(onpolicy_test, on_correct, lambda p: p.task) if onpolicy_test else {},
        mean_score=dict(gold=mean_or_none(norm(chosen)), sft_answer=mean_or_none(norm(answers)),
                        sft_right=mean_or_none(norm(answers[answer_rewards == 1])),
                        sft_wrong=mean_or_none(norm(answers[answer_rewards < 1])),
                        corrupted=mean_or_none(norm(rejected))),
        length_correlation=dict(sft_answers=rounded(pearson(answers, answer_lengths)),
                                sft_answers_same_reward=rounded(pearson(within_group(answers, answer_rewards),
                                                                        answer_lengths))),
        verifier_correlation=rounded(pearson(answers, answer_rewards)),
        calibration_ece=round(ece, 4), calibration_bins=bins,
        reward_mean=reward_mean, reward_std=reward_std, train_seconds=train_seconds, iters=cfg.max_iters,
        seconds=time.perf_counter() - start, config=asdict(cfg))
    atomic_save({"kind": "reward_model", "model": model.state_dict(), "model_config": asdict(model.backbone.config),
                 "tokenizer": tokenizer.to_dict(), "reward_mean": reward_mean, "reward_std": reward_std,
                 "train_config": asdict(cfg), "sft_ckpt": cfg.init_from}, ckpt_path)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    records = read_metrics(logger.path)
    plot_loss([{k: r[k] for k in ("iter", "val_loss")} for r in records], out_dir / "loss.png",
              title=f"part07: reward model, {cfg.loss} loss (held-out: Bradley-Terry)", steps=read_steps(out_dir))
    plot_scores({"gold answers": norm(chosen), "SFT answers": norm(answers), "corrupted answers": norm(rejected)},
                out_dir / "scores.png")
    plot_calibration(bins, ece, out_dir / "calibration.png")
    seconds = time.perf_counter() - start
    print(f"held-out pairwise accuracy {results['heldout_accuracy']:.3f} ({len(heldout_pairs)} hand-made pairs); "
          f"on the SFT model's answers {results['onpolicy_accuracy']} ({len(onpolicy_test)} pairs)")
    print("by failure mode: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in results["by_failure_mode"].items()))
    print("by task: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in results["by_task"].items()))
    print(f"mean normalised reward: {results['mean_score']}; length correlation {results['length_correlation']}; "
          f"calibration ECE {ece:.3f}")
    print(f"{seconds:.0f} s ({train_seconds:.0f} s in training steps); wrote {ckpt_path}, {out_dir / 'results.json'}, "
          f"loss.png, scores.png, calibration.png")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
