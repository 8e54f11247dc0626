"""RLHF with PPO: make the SFT model's answers score higher with the reward model, without drifting far.

The loop (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Stiennon et al. 2020; Ouyang et al. 2022,
InstructGPT, https://arxiv.org/abs/2203.02155), once per iteration:
1. rollout: the policy answers a batch of training prompts, sampling; we keep every token's log-prob under
   the very distribution it was sampled from;
2. reward: part 7's reward model scores each finished answer (normalised: 0 = a typical SFT answer);
   every token also pays beta x its KL to the frozen SFT model (the reference), so the policy gains reward
   only by changes worth their distance from the model we trust;
3. advantages: the value head predicts the reward to come at every token; generalised advantage
   estimation (GAE, Schulman et al. 2015, https://arxiv.org/abs/1506.02438) turns rewards and values into
   "how much better than expected was this token";
4. update: several epochs of minibatch steps on the clipped surrogate objective (PPO, Schulman et al.
   2017, https://arxiv.org/abs/1707.06347), a clipped value loss and an entropy bonus. After the first
   step the policy differs from the one that sampled, the probability ratio leaves 1, and the clip keeps
   each step close. An adaptive beta (Ziegler et al. 2019) steers the KL toward a target.
Every few iterations the policy answers held-out prompts: the reward model's score (the proxy) and the
task verifier's (the gold) are logged against the KL to the reference: the over-optimisation curve of
Gao et al. 2022 (https://arxiv.org/abs/2210.10760). At the end, part 6's eval.py numbers before and after.

    python part08_ppo/train.py                                    # the main run (~3 minutes on 2 CPU cores)
    python part08_ppo/train.py --kl_coef 0.05 --no-adaptive_kl --learning_rate 1e-4 --max_iters 60 \
        --eval_interval 5 --probe_n 50 --out_dir runs/part08_overopt    # reward over-optimisation (~7 minutes)
    python part08_ppo/train.py --help
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
from part06_sft.template import encode_prompt, left_pad
from part07_reward.score import REWARD_CKPT, load_reward_model, normalise, score_responses
from part08_ppo.model import PolicyWithValue
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
    reward: str = field(default="reward_model", metadata={"choices": ["reward_model", "verifier"], "help": "what "
                        "scores an answer: part 7's reward model (RLHF), or the task's verifier (to compare with "
                        "part 9 on the same reward)"})
    tasks: str = field(default="all", metadata={"help": "comma-separated tasks whose training prompts are used"})
    # the rollout
    rollout_size: int = field(default=64, metadata={"help": "answers per iteration (one per prompt)", "min": 1})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit, in tokens", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; the log-probs of the ratio "
                                                              "and the KL use the same tempered distribution",
                                                      "min": 1e-6})
    unfinished_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an answer cut "
                                                                     "at max_new_tokens (it never ended)", "min": 0})
    # the reward
    kl_coef: float = field(default=0.2, metadata={"help": "beta: KL penalty per token (the adaptive controller's "
                                                           "start)", "min": 0})
    kl_estimator: str = field(default="k1", metadata={"choices": ["k1", "k3"], "help": "per-token KL in the reward: "
                              "k1 = log pi - log pi_ref; k3 = (r - 1) - log r, r = pi_ref / pi (always >= 0)"})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt beta toward --target_kl (Ziegler et al. 2019)"})
    target_kl: float = field(default=0.5, metadata={"help": "the adaptive controller's target: KL per answer, nats",
                                                    "min": 0})
    kl_horizon: int = field(default=256, metadata={"help": "the adaptive controller's horizon, in answers",
                                                    "min": 1})
    # advantages
    gamma: float = field(default=1.0, metadata={"help": "discount per token", "min": 0, "max": 1})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: 0 = one-step TD, 1 = Monte Carlo", "min": 0,
                                               "max": 1})
    whiten_advantages: bool = field(default=True, metadata={"help": "mean 0, std 1 over the rollout's tokens"})
    # the update
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout", "min": 1})
    minibatch_size: int = field(default=32, metadata={"help": "answers per gradient step", "min": 1})
    clip_range: float = field(default=0.2, metadata={"help": "epsilon: the ratio is clipped to [1-eps, 1+eps]",
                                                     "min": 0})
    clip_range_value: float = field(default=0.2, metadata={"help": "the value's step is clipped to +-this", "min": 0})
    vf_coef: float = field(default=0.5, metadata={"help": "weight of the value loss", "min": 0})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus", "min": 0})
    early_stop_kl: float = field(default=0.05, metadata={"help": "stop a rollout's epochs once the approx-KL between "
                                                                 "the policy and the one that sampled exceeds this "
                                                                 "(0 = never)", "min": 0})
    separate_value: bool = field(default=False, metadata={"help": "a critic with its own backbone, started from the "
                                                                  "reward model (InstructGPT), instead of a head on "
                                                                  "the policy's"})
    learning_rate: float = field(default=5e-5, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "0 = off", "min": 0})
    max_iters: int = field(default=40, metadata={"help": "rollouts", "min": 0})
    # evaluation
    eval_interval: int = field(default=10, metadata={"help": "iterations between held-out probes", "min": 1})
    probe_n: int = field(default=20, metadata={"help": "held-out prompts per task in each probe", "min": 1})
    eval_n: int | None = field(default=100, metadata={"help": "held-out prompts per task for the final greedy "
                                                              "evaluation (part 6's eval.py); none = all 500",
                                                      "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part08_ppo"


def check_config(cfg: TrainConfig) -> None:
    check_bounds(cfg)
    if cfg.minibatch_size > cfg.rollout_size:
        raise ValueError(f"--minibatch_size {cfg.minibatch_size} is larger than --rollout_size {cfg.rollout_size}")
    if cfg.adaptive_kl and cfg.target_kl <= 0:
        raise ValueError("--adaptive_kl needs a --target_kl > 0")


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


# --- 2. Rewards: the reward model's score at the end, a KL penalty at every token --------------------------


def score_answers(examples, responses: list[str], reward: str, reward_model, rm_ckpt, tokenizer) -> torch.Tensor:
    """One score per answer: part 7's normalised reward-model score (0 = a typical SFT answer), or the task
    verifier's reward (1 = right)."""
    if reward == "verifier":
        return torch.tensor([verify(ex, r) for ex, r in zip(examples, responses)])
    return normalise(score_responses(reward_model, tokenizer, [ex.prompt for ex in examples], responses), rm_ckpt)


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


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float):
    """(B, R): -kl_coef x KL at every answer token, plus the answer's score (B,) at its last token."""
    rewards = -kl_coef * kl * response_mask
    last = response_mask.sum(1).long() - 1  # index of each answer's last token (its stop token, if it stopped)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


class KLController:
    """beta, the KL penalty's weight. Fixed, or adaptive (Ziegler et al. 2019, section 2.2): after each
    rollout, beta *= 1 + clip(KL / target - 1, -0.2, 0.2) x answers / horizon: raised while the policy is
    further from the reference than the target, lowered while it is closer."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 2000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_answers: int) -> None:
        if self.target:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_answers / self.horizon


# --- 3. Advantages: generalised advantage estimation ---------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns (B, R) from per-token rewards and values (B, R).

    delta_t = r_t + gamma V_{t+1} - V_t: how much better token t turned out than the critic expected.
    A_t = delta_t + (gamma lam) delta_{t+1} + (gamma lam)^2 delta_{t+2} + ...: lam = 0 trusts the critic
    (one-step TD, low variance, biased), lam = 1 ignores it (Monte Carlo: the rewards still to come minus
    V_t). The value after an answer's last token is 0: the episode is over. Returns = A + V, the value
    head's targets. Positions after the answer (mask False) get 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean 0, std 1 over the masked entries (advantage whitening: the step size stops depending on the
    rewards' scale, and about half the tokens are pushed up, half down)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 = the critic predicts the returns, 0 = no better than their
    mean, < 0 = worse."""
    v, r = values[mask], returns[mask]
    return (1 - (r - v).var() / r.var()).item() if r.numel() > 1 and r.var() > 0 else math.nan


# --- 4. The PPO losses ------------------------------------------------------------------------------------------


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_range: float,
               clip_range_value: float):
    """The clipped surrogate and the clipped value loss, averaged over the answer tokens (mask).

    ratio = pi(token) / pi_old(token). The surrogate -A x ratio is the policy gradient's loss; clipping the
    ratio to [1 - eps, 1 + eps] and taking the worse (larger) of the two losses removes the incentive to
    move a token's probability further once it has moved by eps in the advantage's direction.
    The value loss clips the same way: the new value may not step more than clip_range_value from the old
    one for free. Returns (policy_loss, value_loss, clip_fraction, approx_kl)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    policy_loss = masked_mean(torch.max(-advantages * ratio,
                                        -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)), mask)
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)  # k3 of KL(pi_old || pi)
    return policy_loss, value_loss, clip_fraction, approx_kl


# --- The held-out probe: proxy reward, gold reward and KL as the policy moves ------------------------------


@torch.no_grad()
def probe(model, ref, reward_model, rm_ckpt, tokenizer, examples, cfg: TrainConfig, stops) -> dict:
    """The policy samples one answer per held-out prompt (as in training). Returns the mean normalised
    reward-model score (proxy), the mean verifier reward (gold) and the mean KL per answer to the
    reference (sum over the answer's tokens of log pi - log pi_ref, an unbiased estimate of KL(pi || ref))."""
    roll = rollout(model.policy, [prompt_for(tokenizer, ex, cfg.max_new_tokens, model.policy.config.block_size)
                                  for ex in examples], cfg.max_new_tokens, cfg.temperature, stops, tokenizer.eot_token)
    ref_logprobs, _ = response_logprobs(ref(roll.ids, padding_mask=roll.padding_mask)[0], roll.ids,
                                        roll.prompt_len, cfg.temperature)
    responses = decode_responses(tokenizer, roll)
    proxy = normalise(score_responses(reward_model, tokenizer, [ex.prompt for ex in examples], responses), rm_ckpt)
    gold = torch.tensor([verify(ex, r) for ex, r in zip(examples, responses)])
    kl = ((roll.logprobs - ref_logprobs) * roll.response_mask).sum(1)
    return dict(proxy=proxy.mean().item(), gold=gold.mean().item(), kl=kl.mean().item())


def prompt_for(tokenizer, example, max_new_tokens: int, block_size: int) -> list[int]:
    """The chat prompt's ids, cut on the left so prompt + answer fit the context (as eval.py does)."""
    return encode_prompt(tokenizer, example.prompt)[-(block_size - max_new_tokens) :]


# --- Plots ------------------------------------------------------------------------------------------------------


def plot_training(records: list[dict], path: Path) -> None:
    """A grid of the per-iteration statistics: what to watch in an RL run."""
    panels = [("score", "reward-model score (normalised)"), ("kl", "KL to the reference per answer (nats)"),
              ("kl_coef", "beta (KL coefficient)"), ("entropy", "entropy per token (nats)"),
              ("clip_fraction", "clip fraction"), ("approx_kl", "approx-KL (pi_old || pi)"),
              ("value_loss", "value loss"), ("explained_variance", "explained variance"),
              ("grad_norm", "gradient norm (before clipping)"), ("response_length", "answer length (tokens)")]
    fig = Figure(figsize=(12, 8), dpi=110)
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(3, 4, i + 1)
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
    fig.suptitle("part08: PPO training statistics, one point per rollout")
    fig.tight_layout()
    fig.savefig(path)


def plot_overoptimisation(probes: list[dict], path: Path) -> None:
    """Proxy (reward model) and gold (verifier) reward of held-out answers against sqrt(KL to the
    reference), as Gao et al. 2022 plot it: the proxy keeps rising; the gold rises, then may fall."""
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    d = [math.sqrt(max(p["kl"], 0.0)) for p in probes]
    ax.plot(d, [p["proxy"] for p in probes], marker="o", color="C0", label="proxy: reward model (normalised)")
    ax.set_xlabel("sqrt(KL(policy || SFT reference)), nats^0.5, per answer")
    ax.set_ylabel("proxy reward", color="C0")
    gold_ax = ax.twinx()
    gold_ax.plot(d, [p["gold"] for p in probes], marker="s", color="C3", label="gold: task verifier")
    gold_ax.set_ylabel("gold reward (verifier, mean)", color="C3")
    for p, x in zip(probes, d):
        ax.annotate(str(p["iter"]), (x, p["proxy"]), textcoords="offset points", xytext=(3, 4), fontsize=6)
    lines = ax.get_legend_handles_labels()[0] + gold_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    ax.set_title("part08: held-out reward as the policy moves away (labels: iteration)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --- Training ---------------------------------------------------------------------------------------------------


def exact_means(results: dict) -> float:
    return sum(r["exact_match"] for r in results.values()) / len(results)


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
    for path, make in ((cfg.init_from, "python part06_sft/train.py"), (cfg.reward_model, "python part07_reward/train.py")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: make it first ({make}; the chain is part 4 -> 6 -> 7), "
                                    "or point --init_from / --reward_model at another one")
    tasks = list(TASKS) if cfg.tasks == "all" else [t.strip() for t in cfg.tasks.split(",")]
    if unknown := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    # The three networks: the policy (+ critic) that learns, the frozen reference, the frozen reward model
    ref, tokenizer, _ = load_policy(cfg.init_from, device)
    reward_model, rm_tokenizer, rm_ckpt = load_reward_model(cfg.reward_model, device)
    if "<|end|>" not in tokenizer.special_tokens or rm_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"{cfg.init_from} and {cfg.reward_model} must share the chat tokenizer of part 6 (an SFT "
                         "model and the reward model trained from it)")
    block_size = ref.config.block_size
    if cfg.max_new_tokens >= block_size:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in {block_size} tokens")
    model = PolicyWithValue(ref.config, cfg.separate_value).to(device)
    model.policy.load_state_dict(ref.state_dict())
    if cfg.separate_value:  # InstructGPT: the critic starts as the reward model (it already judges answers)
        model.value_backbone.load_state_dict(reward_model.backbone.state_dict())
        model.value_head.load_state_dict(reward_model.head.state_dict())
    for p in (*ref.parameters(), *reward_model.parameters()):
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    stops = stop_tokens(tokenizer).to(device)
    train_examples = [ex for t in tasks for ex in get_examples("train", t)]
    probe_examples = heldout_examples("heldout", cfg.probe_n, ",".join(tasks))
    generator = torch.Generator().manual_seed(cfg.seed)
    kl_ctl = KLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)

    # Before: part 6's greedy evaluation of the SFT model, and the reward model's score of its answers
    eval_examples = heldout_examples("heldout", cfg.eval_n, ",".join(tasks))
    gold_before, rows_before = evaluate(ref, tokenizer, eval_examples, cfg.max_new_tokens, progress=True)
    rm_before = normalise(score_responses(reward_model, tokenizer, [r["prompt"] for r in rows_before],
                                          [r["response"] for r in rows_before]), rm_ckpt).mean().item()

    logger = MetricsLogger(out_dir)
    probes, train_seconds, clip_fractions = [], 0.0, []
    bar = tqdm(range(cfg.max_iters + 1), desc="PPO", dynamic_ncols=True)
    try:
        for it in bar:
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                model.eval()
                probes.append(dict(iter=it, **probe(model, ref, reward_model, rm_ckpt, tokenizer, probe_examples,
                                                    cfg, stops)))
                logger.log(iter=it, heldout_proxy=probes[-1]["proxy"], heldout_gold=probes[-1]["gold"],
                           heldout_kl=probes[-1]["kl"])
                bar.write(f"iter {it:3d} | held-out: reward model {probes[-1]['proxy']:+.3f}, verifier "
                          f"{probes[-1]['gold']:.3f}, KL to SFT {probes[-1]['kl']:.2f} nats")
            if it == cfg.max_iters:
                break
            step_start = time.perf_counter()

            # 1. rollout
            model.eval()
            batch = [train_examples[i] for i in torch.randint(len(train_examples), (cfg.rollout_size,),
                                                              generator=generator).tolist()]
            roll = rollout(model.policy, [prompt_for(tokenizer, ex, cfg.max_new_tokens, block_size) for ex in batch],
                           cfg.max_new_tokens, cfg.temperature, stops, tokenizer.eot_token)
            mask, P = roll.response_mask.float(), roll.prompt_len
            with torch.no_grad():
                logits, values = model(roll.ids, padding_mask=roll.padding_mask)
                recomputed, _ = response_logprobs(logits, roll.ids, P, cfg.temperature)
                old_values = values[:, P - 1 : -1] * mask  # V(state before each answer token)
                ref_logprobs, _ = response_logprobs(ref(roll.ids, padding_mask=roll.padding_mask)[0], roll.ids, P,
                                                    cfg.temperature)
                # 2. rewards
                responses = decode_responses(tokenizer, roll)
                scores = score_answers(batch, responses, cfg.reward, reward_model, rm_ckpt, tokenizer).to(device)
                scores = scores - cfg.unfinished_penalty * (~roll.ended).float()
                kl = kl_per_token(roll.logprobs, ref_logprobs, cfg.kl_estimator) * mask
                rewards = token_rewards(scores, kl, mask, kl_ctl.value)
                # 3. advantages
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten_advantages:
                    advantages = whiten(advantages, mask)

            # 4. PPO epochs over minibatches
            model.train()
            stats, stop_early = [], False
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.rollout_size, generator=generator)
                for start_row in range(0, cfg.rollout_size, cfg.minibatch_size):
                    rows = order[start_row : start_row + cfg.minibatch_size].to(device)
                    logits, values = model(roll.ids[rows], padding_mask=roll.padding_mask[rows])
                    logprobs, logp_all = response_logprobs(logits, roll.ids[rows], P, cfg.temperature)
                    policy_loss, value_loss, clip_fraction, approx_kl = ppo_losses(
                        logprobs, roll.logprobs[rows], advantages[rows], values[:, P - 1 : -1], old_values[rows],
                        returns[rows], mask[rows], cfg.clip_range, cfg.clip_range_value)
                    entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), mask[rows])
                    loss = policy_loss + cfg.vf_coef * value_loss - cfg.entropy_coef * entropy
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"iteration {it}: the PPO loss became {loss.item()}; nothing was "
                                                 "saved from this run; try a lower --learning_rate")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                    optimizer.step()
                    stats.append(dict(loss=loss.item(), policy_loss=policy_loss.item(), value_loss=value_loss.item(),
                                      entropy=entropy.item(), clip_fraction=clip_fraction.item(),
                                      approx_kl=approx_kl.item(), grad_norm=grad_norm.item()))
                    if cfg.early_stop_kl and approx_kl.item() > cfg.early_stop_kl:
                        stop_early = True
                        break
                if stop_early:
                    break

            answer_kl = kl.sum(1).mean().item()
            kl_ctl.update(answer_kl, cfg.rollout_size)
            seconds = time.perf_counter() - step_start
            train_seconds += seconds
            mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
            clip_fractions.append(mean["clip_fraction"])
            record = logger.log(
                iter=it + 1, train_loss=mean["loss"], **{k: v for k, v in mean.items() if k != "loss"},
                score=scores.mean().item(), score_std=scores.std().item(), kl=answer_kl, kl_coef=kl_ctl.value,
                explained_variance=explained_variance(old_values, returns, roll.response_mask),
                response_length=mask.sum(1).mean().item(), ended=roll.ended.float().mean().item(),
                logprob_mismatch=((recomputed - roll.logprobs).abs() * mask).max().item(),
                minibatch_steps=len(stats), lr=cfg.learning_rate,
                tokens_per_sec=mask.sum().item() / seconds)
            bar.set_postfix(score=f"{record['score']:+.2f}", kl=f"{answer_kl:.2f}", clip=f"{mean['clip_fraction']:.2f}",
                            refresh=False)
    finally:
        bar.close()
        logger.close()

    # After: the same greedy evaluation, and the reward model's score of the new answers
    model.eval()
    gold_after, rows_after = evaluate(model.policy, tokenizer, eval_examples, cfg.max_new_tokens, progress=True)
    rm_after = normalise(score_responses(reward_model, tokenizer, [r["prompt"] for r in rows_after],
                                         [r["response"] for r in rows_after]), rm_ckpt).mean().item()
    records = read_metrics(logger.path)
    train_records = [r for r in records if "score" in r]
    results = dict(
        rm_reward_before=round(rm_before, 4), rm_reward_after=round(rm_after, 4),
        kl_final=round(probes[-1]["kl"], 4),
        clip_fraction_mean=round(sum(clip_fractions) / len(clip_fractions), 4) if clip_fractions else None,
        gold_before={t: r["exact_match"] for t, r in gold_before.items()},
        gold_after={t: r["exact_match"] for t, r in gold_after.items()},
        gold_mean_before=round(exact_means(gold_before), 4), gold_mean_after=round(exact_means(gold_after), 4),
        eval_before=gold_before, eval_after=gold_after, probes=probes,
        kl_coef_final=kl_ctl.value, logprob_mismatch_max=max((r["logprob_mismatch"] for r in train_records),
                                                            default=None),
        tokens_per_sec=round(sum(r["tokens_per_sec"] for r in train_records) / max(1, len(train_records)), 1),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        peak_memory_mb=round(peak_memory_mb(), 1),
        train_seconds=round(train_seconds, 1), seconds=round(time.perf_counter() - start, 1), config=asdict(cfg))
    ckpt_path = out_dir / "ckpt.pt"
    atomic_save({"model": model.policy.state_dict(), "model_config": asdict(model.policy.config),
                 "tokenizer": tokenizer.to_dict(), "iter_num": cfg.max_iters, "train_config": asdict(cfg),
                 "value_model": {k: v for k, v in model.state_dict().items() if not k.startswith("policy.")},
                 "sft_ckpt": cfg.init_from, "reward_ckpt": cfg.reward_model}, ckpt_path)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    if train_records:
        plot_training(train_records, out_dir / "ppo.png")
        plot_loss([{k: r[k] for k in ("iter", "policy_loss", "value_loss")} for r in train_records],
                  out_dir / "loss.png", title="part08: PPO losses (mean over each rollout's minibatch steps)")
    plot_overoptimisation(probes, out_dir / "overoptimisation.png")
    plot_task_bars({"SFT": results["gold_before"], "PPO": results["gold_after"]}, out_dir / "accuracy.png",
                   title=f"part08: held-out exact match ({cfg.eval_n or 'all'} prompts per task, greedy)")
    print(f"reward-model score of held-out greedy answers: {rm_before:+.3f} (SFT) -> {rm_after:+.3f} (PPO); "
          f"KL to SFT {probes[-1]['kl']:.2f} nats per answer; clip fraction {results['clip_fraction_mean']}")
    print("held-out exact match, SFT -> PPO: " + ", ".join(
        f"{t} {results['gold_before'][t]:.3f}->{results['gold_after'][t]:.3f}" for t in tasks) +
        f" | mean {results['gold_mean_before']:.3f} -> {results['gold_mean_after']:.3f}")
    print(f"{results['seconds']:.0f} s ({train_seconds:.0f} s in PPO iterations); wrote {ckpt_path}, results.json, "
          "ppo.png, overoptimisation.png, accuracy.png, loss.png")
    return model, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
