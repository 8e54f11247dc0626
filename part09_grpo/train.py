"""GRPO: reinforce the answers that beat their siblings; no critic; the KL to the reference goes in the loss.

Part 8's PPO loop with the changes of Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath,
https://arxiv.org/abs/2402.03300), once per iteration:
1. rollout: the policy answers each of a batch of training prompts G times (a group), sampling; we keep
   every token's log-prob under the very distribution it was sampled from;
2. reward: the task's verifier scores each finished answer (1 = right), optionally plus part 7's reward
   model; no KL penalty in the reward: it moves into the loss;
3. advantages: no value head, no GAE. An answer's advantage is its reward minus its group's mean reward,
   divided by the group's std, the same for every token of the answer. A group whose answers all score
   the same (all right or all wrong) teaches nothing: its advantages are 0 (we count them);
4. update: several epochs of minibatch steps on part 8's clipped surrogate objective, plus
   beta x KL(pi || pi_ref) per token in the loss (the k3 estimator: unbiased and never negative), plus
   gamma x the supervised loss on the other tasks' training answers (InstructGPT's PPO-ptx), so that
   training one task does not make the model forget the others.
Options from the papers that followed: Dr. GRPO (Liu et al. 2025, https://arxiv.org/abs/2503.20783: no std
division, no length normalisation) and DAPO's token-level loss (Yu et al. 2025, https://arxiv.org/abs/2503.14476).
Every few iterations the policy answers held-out prompts: the verifier's reward (the gold) is logged
against the KL to the reference. At the end, part 6's eval.py numbers before and after.

    python part09_grpo/train.py                                   # the main run (minutes on 2 CPU cores; see the README)
    python part09_grpo/train.py --kl_coef 0 --out_dir runs/part09_beta0                  # ablation: no KL term
    python part09_grpo/train.py --no-scale_rewards --loss_agg constant --out_dir runs/part09_drgrpo  # Dr. GRPO
    python part09_grpo/train.py --ppo_epochs 1 --minibatch_size 256 --out_dir runs/part09_single  # one update
    python part09_grpo/train.py --help
"""
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part06_sft.eval import evaluate, heldout_examples, load_policy, stop_tokens
from part06_sft.template import collate, encode_example, encode_prompt, left_pad
from part07_reward.score import REWARD_CKPT, load_reward_model, normalise, score_responses
from part09_grpo.model import GPT
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.device import pick_device
from shared.metrics import MetricsLogger, plot_loss, plot_task_bars, read_metrics
from shared.tasks import TASKS, get_examples, verify

SFT_CKPT = "runs/part06_sft/ckpt.pt"


@dataclass
class TrainConfig:
    init_from: str = field(default=SFT_CKPT, metadata={"help": "the SFT checkpoint: the policy's start and the "
                                                               "frozen reference"})
    reward_model: str = field(default=REWARD_CKPT, metadata={"help": "part 7's reward model"})
    reward: str = field(default="verifier", metadata={"choices": ["verifier", "verifier+reward_model"], "help":
                        "what scores an answer: the task's verifier, or the verifier plus part 7's reward model"})
    tasks: str = field(default="count", metadata={"help": "comma-separated tasks whose training prompts are used"})
    # the rollout
    rollout_size: int = field(default=256, metadata={"help": "answers per iteration (group_size per prompt)",
                                                     "min": 1})
    group_size: int = field(default=4, metadata={"help": "G: answers sampled per prompt", "min": 2})
    replay_fraction: float = field(default=0.0, metadata={"help": "share of each rollout's prompts drawn from the "
                                                                  "other tasks, rewarded by their own verifiers, "
                                                                  "against forgetting them (0 = none)", "min": 0,
                                                          "max": 1})
    ptx_coef: float = field(default=1.0, metadata={"help": "gamma: weight of a supervised loss on the other tasks' "
                                                           "training answers, added to every step (InstructGPT's "
                                                           "PPO-ptx), against forgetting them (0 = none)", "min": 0})
    ptx_batch_size: int = field(default=32, metadata={"help": "examples of the other tasks per step of that loss",
                                                      "min": 1})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit, in tokens", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; the log-probs of the ratio "
                                                              "and the KL use the same tempered distribution",
                                                      "min": 1e-6})
    unfinished_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an answer cut "
                                                                     "at max_new_tokens (it never ended)", "min": 0})
    # the KL term of the loss
    kl_coef: float = field(default=0.02, metadata={"help": "beta: weight of the per-token KL(pi || pi_ref) (k3) in "
                                                           "the loss", "min": 0})
    # advantages
    scale_rewards: bool = field(default=True, metadata={"help": "divide by the group's std (GRPO); "
                                                                "--no-scale_rewards: Dr. GRPO"})
    loss_agg: str = field(default="sequence", metadata={"choices": ["sequence", "token", "constant"], "help":
                          "sequence: mean over each answer's tokens, then over answers (GRPO); token: mean over "
                          "all tokens (DAPO); constant: sum over an answer's tokens / max_new_tokens (Dr. GRPO)"})
    # the update
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout", "min": 1})
    minibatch_size: int = field(default=128, metadata={"help": "answers per gradient step", "min": 1})
    clip_range: float = field(default=0.2, metadata={"help": "epsilon: the ratio is clipped to [1-eps, 1+eps]",
                                                     "min": 0})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus", "min": 0})
    early_stop_kl: float = field(default=0.05, metadata={"help": "stop a rollout's epochs once the approx-KL between "
                                                                 "the policy and the one that sampled exceeds this "
                                                                 "(0 = never)", "min": 0})
    learning_rate: float = field(default=2e-4, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "0 = off", "min": 0})
    max_iters: int = field(default=150, metadata={"help": "rollouts", "min": 0})
    # evaluation
    eval_interval: int = field(default=10, metadata={"help": "iterations between held-out probes", "min": 1})
    probe_n: int = field(default=100, metadata={"help": "held-out prompts per task in each probe", "min": 1})
    eval_n: int | None = field(default=None, metadata={"help": "held-out prompts per trained task for the final "
                                                               "evaluation (part 6's eval.py); none = all 500",
                                                       "min": 1})
    eval_samples: int = field(default=8, metadata={"help": "K sampled answers per prompt for pass@1 and pass@K on "
                                                           "the trained tasks (0 = greedy only)", "min": 0})
    eval_other_n: int = field(default=100, metadata={"help": "held-out prompts per other task (greedy; 0 = skip)",
                                                     "min": 0})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part09_grpo"


def check_config(cfg: TrainConfig) -> None:
    check_bounds(cfg)
    if cfg.minibatch_size > cfg.rollout_size:
        raise ValueError(f"--minibatch_size {cfg.minibatch_size} is larger than --rollout_size {cfg.rollout_size}")
    if cfg.rollout_size % cfg.group_size:
        raise ValueError(f"--rollout_size {cfg.rollout_size} is not a multiple of --group_size {cfg.group_size}")


# --- 1. Rollout: sample answers, keep the log-probs they were sampled with ---------------------------------


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P + R): left-padded prompts, then the responses
    padding_mask: torch.Tensor  # (B, P + R): False on the prompts' left padding
    response_mask: torch.Tensor  # (B, R): True for the answer's tokens, up to and including its stop token
    logprobs: torch.Tensor  # (B, R): log pi_old(token), from the sampling distribution itself
    ended: torch.Tensor  # (B,): the answer emitted a stop token before max_new_tokens

    @property
    def prompt_len(self) -> int:
        return self.ids.size(1) - self.response_mask.size(1)


@torch.no_grad()
def rollout(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, stops: torch.Tensor,
            pad_id: int) -> Rollout:
    """Sample one answer per prompt with the KV cache, recording log softmax(logits / temperature) of each
    sampled token: exactly the distribution sampled from, which the PPO ratio and the KL must use.
    Rows that have stopped keep generating (the batch moves together) but those tokens are masked out."""
    device = model.wte.weight.device
    ids, padding_mask = left_pad(prompts, pad_id)
    ids, padding_mask = ids.to(device), padding_mask.to(device)
    B = ids.size(0)
    kv_cache = model.new_kv_cache(B)
    logits, _ = model(ids, kv_cache=kv_cache, padding_mask=padding_mask)  # prefill
    real = torch.ones(B, 1, dtype=torch.bool, device=device)
    tokens, logprobs, alive_steps = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits[:, -1].float() / temperature, dim=-1)  # (B, vocab)
        token = torch.multinomial(logp.exp(), 1)  # (B, 1)
        tokens.append(token)
        logprobs.append(logp.gather(-1, token))
        alive_steps.append(alive.clone())
        alive &= ~stops[token[:, 0]]  # the stop token itself belongs to the answer; what follows does not
        if not alive.any() or step == max_new_tokens - 1:
            break
        logits, _ = model(token, kv_cache=kv_cache, padding_mask=real)
    response = torch.cat(tokens, dim=1)
    return Rollout(ids=torch.cat((ids, response), dim=1),
                   padding_mask=torch.cat((padding_mask, torch.ones_like(response, dtype=torch.bool)), dim=1),
                   response_mask=torch.stack(alive_steps, dim=1), logprobs=torch.cat(logprobs, dim=1),
                   ended=~alive)


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int, temperature: float):
    """Log-probs (B, R) of the response tokens ids[:, P:], and the tempered log-softmax (B, R, vocab) they
    come from. The logits at position t predict the token at t + 1, hence the shift by one."""
    logp = F.log_softmax(logits[:, prompt_len - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1), logp


def decode_responses(tokenizer, roll: Rollout) -> list[str]:
    texts = []
    for tokens, mask in zip(roll.ids[:, roll.prompt_len :].tolist(), roll.response_mask.tolist()):
        texts.append(tokenizer.decode([t for t, keep in zip(tokens, mask) if keep]))
    return texts


# --- 2. Rewards: the verifier's score; the KL goes into the loss -----------------------------------------------


def score_answers(examples, responses: list[str], reward: str, reward_model, rm_ckpt, tokenizer) -> torch.Tensor:
    """One score per answer: the task verifier's reward (1 = right), plus part 7's normalised reward-model
    score with --reward verifier+reward_model."""
    scores = torch.tensor([verify(ex, r) for ex, r in zip(examples, responses)])
    if reward == "verifier+reward_model":
        prompts = [ex.prompt for ex in examples]
        scores = scores + normalise(score_responses(reward_model, tokenizer, prompts, responses), rm_ckpt)
    return scores


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    http://joschu.net/blog/kl-approx.html). k1 = log pi - log pi_ref: unbiased, but single tokens can be
    negative. k3 = (r - 1) - log r with r = pi_ref / pi: unbiased too, and never negative."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


# --- 3. Advantages: each answer against its own group ----------------------------------------------------------


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4):
    """(N,) scores of N = prompts x G answers (each prompt's G answers next to each other) -> (N,) advantages
    and (prompts,) bool: the groups whose answers all scored the same.

    A = (r - mean of the group) / (std of the group + eps): the group's mean is the baseline a critic would
    have to learn (how good is this prompt's typical answer?), counted instead. scale=False (Dr. GRPO) skips
    the division, which gives prompts the policy is nearly sure about (small std) as much weight as any.
    A group with zero variance gets A = 0 everywhere: it contributes no gradient."""
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    advantages = groups - mean
    if scale:
        advantages = advantages / (std + eps)
    return advantages.view(-1), std.squeeze(1) == 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> torch.Tensor:
    """Average a per-token loss (B, R) over the answers' tokens. sequence: each answer's mean, then the mean
    over answers (GRPO: a long answer's tokens each weigh less); token: one mean over every token of the
    batch (DAPO: every token weighs the same); constant: each answer's sum / max_new_tokens (Dr. GRPO: no
    length normalisation at all, which removes GRPO's bias toward long wrong answers)."""
    if how == "token":
        return masked_mean(per_token, mask)
    per_answer = (per_token * mask).sum(1)
    if how == "sequence":
        return (per_answer / mask.sum(1).clamp(min=1)).mean()
    if how == "constant":
        return (per_answer / max_new_tokens).mean()
    raise ValueError(f"unknown loss aggregation {how!r}; use sequence, token or constant")


# --- 4. The GRPO loss -------------------------------------------------------------------------------------------


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range: float, kl_coef: float,
              loss_agg: str = "sequence", max_new_tokens: int = 32):
    """Part 8's clipped surrogate with one advantage per answer (B,), the same for all its tokens, plus
    kl_coef x KL(pi || pi_ref) per token, estimated with k3 on the policy's own samples (gradient flows
    through log pi). Aggregated over the tokens by loss_agg.
    Returns (loss, policy_loss, kl, clip_fraction, approx_kl): the parts, for the logs."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    A = advantages[:, None]  # (B, 1): broadcast to every token of the answer
    policy_per_token = torch.max(-A * ratio, -A * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = kl_per_token(logprobs, ref_logprobs, "k3")
    loss = aggregate(policy_per_token + kl_coef * kl, mask, loss_agg, max_new_tokens)
    with torch.no_grad():
        policy_loss = aggregate(policy_per_token, mask, loss_agg, max_new_tokens)
        clip_fraction = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)  # k3 of KL(pi_old || pi)
    return loss, policy_loss, masked_mean(kl.detach(), mask), clip_fraction, approx_kl


# --- The held-out probe: gold reward (and proxy, with a reward model) and KL as the policy moves ----------


@torch.no_grad()
def probe(model, ref, reward_model, rm_ckpt, tokenizer, examples, cfg: TrainConfig, stops) -> dict:
    """The policy samples one answer per held-out prompt (as in training). Returns the mean verifier reward
    (gold), the mean normalised reward-model score (proxy; None without a reward model) and the mean KL per
    answer to the reference (sum over the answer's tokens of log pi - log pi_ref, an unbiased estimate of
    KL(pi || ref))."""
    roll = rollout(model, [prompt_for(tokenizer, ex, cfg.max_new_tokens, model.config.block_size)
                           for ex in examples], cfg.max_new_tokens, cfg.temperature, stops, tokenizer.eot_token)
    ref_logprobs, _ = response_logprobs(ref(roll.ids, padding_mask=roll.padding_mask)[0], roll.ids,
                                        roll.prompt_len, cfg.temperature)
    responses = decode_responses(tokenizer, roll)
    proxy = None if reward_model is None else normalise(
        score_responses(reward_model, tokenizer, [ex.prompt for ex in examples], responses), rm_ckpt).mean().item()
    gold = torch.tensor([verify(ex, r) for ex, r in zip(examples, responses)])
    kl = ((roll.logprobs - ref_logprobs) * roll.response_mask).sum(1)
    return dict(proxy=proxy, gold=gold.mean().item(), kl=kl.mean().item())


def prompt_for(tokenizer, example, max_new_tokens: int, block_size: int) -> list[int]:
    """The chat prompt's ids, cut on the left so prompt + answer fit the context (as eval.py does)."""
    return encode_prompt(tokenizer, example.prompt)[-(block_size - max_new_tokens) :]


# --- Plots ------------------------------------------------------------------------------------------------------


def plot_training(records: list[dict], path: Path) -> None:
    """A grid of the per-iteration statistics: what to watch in an RL run."""
    panels = [("score", "reward of the rollout's answers"), ("kl", "KL to the reference per answer (nats)"),
              ("zero_variance_fraction", "groups with zero variance"), ("entropy", "entropy per token (nats)"),
              ("clip_fraction", "clip fraction"), ("approx_kl", "approx-KL (pi_old || pi)"),
              ("grad_norm", "gradient norm (before clipping)"), ("response_length", "answer length (tokens)")]
    fig = Figure(figsize=(12, 5.6), dpi=110)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        points = [(r["iter"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color=f"C{i % 10}")
        if key == "score":
            std = [(r["iter"], r["score"] - r["score_std"], r["score"] + r["score_std"]) for r in records
                   if r.get("score_std") is not None]
            if std:
                its, low, high = zip(*std)
                ax.fill_between(its, low, high, alpha=0.2, color="C0", label="+-1 std")
                ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("part09: GRPO training statistics, one point per rollout")
    fig.tight_layout()
    fig.savefig(path)


def plot_heldout(probes: list[dict], path: Path) -> None:
    """Gold reward (verifier) of held-out sampled answers, and the KL to the reference, over the run."""
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    its = [p["iter"] for p in probes]
    ax.plot(its, [p["gold"] for p in probes], marker="s", color="C3", label="gold: task verifier (sampled answers)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gold reward (verifier, mean)", color="C3")
    kl_ax = ax.twinx()
    kl_ax.plot(its, [p["kl"] for p in probes], marker="o", color="C0", label="KL(policy || SFT) per answer")
    kl_ax.set_ylabel("KL to the reference (nats)", color="C0")
    lines = ax.get_legend_handles_labels()[0] + kl_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    ax.set_title("part09: held-out reward and KL over the run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --- Training ---------------------------------------------------------------------------------------------------


def exact_means(results: dict) -> float:
    return sum(r["exact_match"] for r in results.values()) / len(results)


def evaluate_policy(model, tokenizer, cfg: TrainConfig, tasks: list[str]) -> dict:
    """Part 6's evaluation: the trained tasks on eval_n held-out prompts, greedy plus eval_samples sampled
    answers (pass@1, pass@K); the other tasks greedy on eval_other_n prompts (did training on one task cost
    the others?)."""
    results, _ = evaluate(model, tokenizer, heldout_examples("heldout", cfg.eval_n, ",".join(tasks)),
                          cfg.max_new_tokens, num_samples=cfg.eval_samples, temperature=cfg.temperature)
    others = [t for t in TASKS if t not in tasks]
    if others and cfg.eval_other_n:
        results |= evaluate(model, tokenizer, heldout_examples("heldout", cfg.eval_other_n, ",".join(others)),
                            cfg.max_new_tokens)[0]
    return results


def peak_memory_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def train(cfg: TrainConfig):
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    needed = [(cfg.init_from, "python part06_sft/train.py")]
    if cfg.reward == "verifier+reward_model":
        needed.append((cfg.reward_model, "python part07_reward/train.py"))
    for path, make in needed:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: make it first ({make}; the chain is part 4 -> 6 -> 7), "
                                    "or point --init_from / --reward_model at another one")
    tasks = list(TASKS) if cfg.tasks == "all" else [t.strip() for t in cfg.tasks.split(",")]
    if unknown := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    # The networks: the policy that learns (no critic), the frozen reference, the optional frozen reward model
    ref, tokenizer, _ = load_policy(cfg.init_from, device)
    if "<|end|>" not in tokenizer.special_tokens:
        raise ValueError(f"{cfg.init_from} has no chat tokens: GRPO starts from an SFT model (python part06_sft/train.py)")
    reward_model = rm_ckpt = None
    if cfg.reward == "verifier+reward_model":
        reward_model, rm_tokenizer, rm_ckpt = load_reward_model(cfg.reward_model, device)
        if rm_tokenizer.to_dict() != tokenizer.to_dict():
            raise ValueError(f"{cfg.init_from} and {cfg.reward_model} must share the chat tokenizer of part 6")
    block_size = ref.config.block_size
    if cfg.max_new_tokens >= block_size:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in {block_size} tokens")
    model = GPT(ref.config).to(device)
    model.load_state_dict(ref.state_dict())
    for p in (*ref.parameters(), *(reward_model.parameters() if reward_model is not None else ())):
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    stops = stop_tokens(tokenizer).to(device)
    train_examples = [ex for t in tasks for ex in get_examples("train", t)]
    replay_examples = [ex for t in TASKS if t not in tasks for ex in get_examples("train", t)]
    probe_examples = heldout_examples("heldout", cfg.probe_n, ",".join(tasks))
    generator = torch.Generator().manual_seed(cfg.seed)
    n_prompts = cfg.rollout_size // cfg.group_size
    # Replay: answers to the other tasks' prompts are rewarded too, against forgetting them. See the README: at
    # this scale it did not stop the forgetting; the supervised loss below (ptx) did.
    n_replay = round(cfg.replay_fraction * n_prompts) if replay_examples else 0
    # PPO-ptx (Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155, eq. 2): every step also takes
    # gamma x the supervised loss on a batch of the other tasks' training answers, the data part 6 learned them
    # from. No rollout and no reward: it holds those tasks where SFT left them while RL moves the trained one.
    ptx_data = [encode_example(tokenizer, ex.prompt, ex.gold) for ex in replay_examples] if cfg.ptx_coef else []
    ptx_data = [xy for xy in ptx_data if len(xy[0]) <= block_size]

    # Before: part 6's evaluation of the SFT model
    gold_before = evaluate_policy(ref, tokenizer, cfg, tasks)

    logger = MetricsLogger(out_dir)
    probes, train_seconds, clip_fractions, zero_variance = [], 0.0, [], []
    bar = tqdm(range(cfg.max_iters + 1), desc="GRPO", dynamic_ncols=True)
    try:
        for it in bar:
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                model.eval()
                probes.append(dict(iter=it, **probe(model, ref, reward_model, rm_ckpt, tokenizer, probe_examples,
                                                    cfg, stops)))
                logger.log(iter=it, heldout_proxy=probes[-1]["proxy"], heldout_gold=probes[-1]["gold"],
                           heldout_kl=probes[-1]["kl"])
                bar.write(f"iter {it:3d} | held-out: verifier {probes[-1]['gold']:.3f}, KL to SFT "
                          f"{probes[-1]['kl']:.2f} nats")
            if it == cfg.max_iters:
                break
            step_start = time.perf_counter()

            # 1. rollout: each prompt G times, the copies next to each other (a group)
            model.eval()
            picked = [train_examples[i] for i in torch.randint(len(train_examples), (n_prompts - n_replay,),
                                                               generator=generator).tolist()]
            picked += [replay_examples[i] for i in torch.randint(len(replay_examples), (n_replay,),
                                                                 generator=generator).tolist()]
            batch = [ex for ex in picked for _ in range(cfg.group_size)]
            roll = rollout(model, [prompt_for(tokenizer, ex, cfg.max_new_tokens, block_size) for ex in batch],
                           cfg.max_new_tokens, cfg.temperature, stops, tokenizer.eot_token)
            mask, P = roll.response_mask.float(), roll.prompt_len
            with torch.no_grad():
                ref_logprobs, _ = response_logprobs(ref(roll.ids, padding_mask=roll.padding_mask)[0], roll.ids, P,
                                                    cfg.temperature)
                # 2. rewards
                responses = decode_responses(tokenizer, roll)
                scores = score_answers(batch, responses, cfg.reward, reward_model, rm_ckpt, tokenizer).to(device)
                scores = scores - cfg.unfinished_penalty * (~roll.ended).float()
                kl = kl_per_token(roll.logprobs, ref_logprobs, "k1") * mask  # for the logs: KL per answer
                # 3. advantages
                advantages, flat = group_advantages(scores, cfg.group_size, cfg.scale_rewards)

            # 4. epochs over minibatches
            model.train()
            stats, stop_early, mismatch = [], False, None
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.rollout_size, generator=generator)
                for start_row in range(0, cfg.rollout_size, cfg.minibatch_size):
                    rows = order[start_row : start_row + cfg.minibatch_size].to(device)
                    logits, _ = model(roll.ids[rows], padding_mask=roll.padding_mask[rows])
                    logprobs, logp_all = response_logprobs(logits, roll.ids[rows], P, cfg.temperature)
                    if mismatch is None:  # before the first update: the sampling log-probs, recomputed
                        mismatch = ((logprobs.detach() - roll.logprobs[rows]).abs() * mask[rows]).max().item()
                    loss, policy_loss, kl_term, clip_fraction, approx_kl = grpo_loss(
                        logprobs, roll.logprobs[rows], ref_logprobs[rows], advantages[rows], mask[rows],
                        cfg.clip_range, cfg.kl_coef, cfg.loss_agg, cfg.max_new_tokens)
                    entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask[rows])
                    loss = loss - cfg.entropy_coef * entropy
                    ptx_loss = torch.zeros((), device=device)
                    if ptx_data:
                        pick = torch.randint(len(ptx_data), (cfg.ptx_batch_size,), generator=generator).tolist()
                        x, y = collate([ptx_data[i] for i in pick], tokenizer.eot_token)
                        ptx_loss = model(x.to(device), y.to(device))[1]
                        loss = loss + cfg.ptx_coef * ptx_loss
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"iteration {it}: the GRPO loss became {loss.item()}; nothing was "
                                                 "saved from this run; try a lower --learning_rate")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                    optimizer.step()
                    stats.append(dict(loss=loss.item(), policy_loss=policy_loss.item(), kl_term=kl_term.item(),
                                      entropy=entropy.item(), ptx_loss=ptx_loss.item(),
                                      clip_fraction=clip_fraction.item(),
                                      approx_kl=approx_kl.item(), grad_norm=grad_norm.item()))
                    if cfg.early_stop_kl and approx_kl.item() > cfg.early_stop_kl:
                        stop_early = True
                        break
                if stop_early:
                    break

            answer_kl = kl.sum(1).mean().item()
            seconds = time.perf_counter() - step_start
            train_seconds += seconds
            mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
            clip_fractions.append(mean["clip_fraction"])
            zero_variance.append(flat.float().mean().item())
            record = logger.log(
                iter=it + 1, train_loss=mean["loss"], **{k: v for k, v in mean.items() if k != "loss"},
                score=scores.mean().item(), score_std=scores.std().item(), kl=answer_kl,
                zero_variance_fraction=zero_variance[-1],
                response_length=mask.sum(1).mean().item(), ended=roll.ended.float().mean().item(),
                logprob_mismatch=mismatch,
                minibatch_steps=len(stats), lr=cfg.learning_rate,
                tokens_per_sec=mask.sum().item() / seconds)
            bar.set_postfix(score=f"{record['score']:+.2f}", kl=f"{answer_kl:.2f}", clip=f"{mean['clip_fraction']:.2f}",
                            refresh=False)
    finally:
        bar.close()
        logger.close()

    # After: the same evaluation
    model.eval()
    gold_after = evaluate_policy(model, tokenizer, cfg, tasks)
    records = read_metrics(logger.path)
    train_records = [r for r in records if "score" in r]
    results = dict(
        kl_final=round(probes[-1]["kl"], 4),
        clip_fraction_mean=round(sum(clip_fractions) / len(clip_fractions), 4) if clip_fractions else None,
        zero_variance_fraction_mean=round(sum(zero_variance) / len(zero_variance), 4) if zero_variance else None,
        gold_before={t: r["exact_match"] for t, r in gold_before.items()},
        gold_after={t: r["exact_match"] for t, r in gold_after.items()},
        gold_mean_before=round(exact_means(gold_before), 4), gold_mean_after=round(exact_means(gold_after), 4),
        eval_before=gold_before, eval_after=gold_after, probes=probes, logprob_mismatch_max=max((r["logprob_mismatch"] for r in train_records),
                                                            default=None),
        tokens_per_sec=round(sum(r["tokens_per_sec"] for r in train_records) / max(1, len(train_records)), 1),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        peak_memory_mb=round(peak_memory_mb(), 1),
        train_seconds=round(train_seconds, 1), seconds=round(time.perf_counter() - start, 1), config=asdict(cfg))
    ckpt_path = out_dir / "ckpt.pt"
    atomic_save({"model": model.state_dict(), "model_config": asdict(model.config),
                 "tokenizer": tokenizer.to_dict(), "iter_num": cfg.max_iters, "train_config": asdict(cfg),
                 "sft_ckpt": cfg.init_from}, ckpt_path)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    if train_records:
        plot_training(train_records, out_dir / "grpo.png")
        plot_loss([dict(iter=r["iter"], policy_loss=r["policy_loss"], kl_loss=cfg.kl_coef * r["kl_term"])
                   for r in train_records], out_dir / "loss.png",
                  title="part09: GRPO loss terms (mean over each rollout's minibatch steps)")
    plot_heldout(probes, out_dir / "heldout.png")
    plot_task_bars({"SFT": results["gold_before"], "GRPO": results["gold_after"]}, out_dir / "accuracy.png",
                   title="part09: held-out exact match (greedy)")
    k = cfg.eval_samples
    for t in tasks:
        line = f"{t}: greedy exact match {gold_before[t]['exact_match']:.3f} (SFT) -> {gold_after[t]['exact_match']:.3f}"
        if k:
            line += (f" (GRPO); pass@1 {gold_before[t]['pass@1']:.3f} -> {gold_after[t]['pass@1']:.3f}; "
                     f"pass@{k} {gold_before[t][f'pass@{k}']:.3f} -> {gold_after[t][f'pass@{k}']:.3f}")
        print(line + f" ({gold_after[t]['n']} held-out prompts)")
    others = [t for t in gold_after if t not in tasks]
    if others:
        print("other tasks, greedy exact match, SFT -> GRPO: " + ", ".join(
            f"{t} {results['gold_before'][t]:.3f}->{results['gold_after'][t]:.3f}" for t in others))
    print(f"KL to SFT {probes[-1]['kl']:.2f} nats per answer; groups with zero variance "
          f"{results['zero_variance_fraction_mean']}; clip fraction {results['clip_fraction_mean']}")
    print(f"{results['seconds']:.0f} s ({train_seconds:.0f} s in GRPO iterations); wrote {ckpt_path}, results.json, "
          "grpo.png, heldout.png, accuracy.png, loss.png")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
