"""DPO: preference learning without a reward model and without sampling, offline from the SFT model.

Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) trains the policy
on the same preference pairs as part 7's reward model, with one supervised loss, and no RL loop at all.

The idea in three lines. RLHF maximises E[r(x, y)] - beta * KL(pi || pi_ref). That objective has a closed-form
optimum, pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). Turned around, every policy pi defines the reward
it is optimal for, its *implicit reward* r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x).
Put that reward into part 7's Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected): the log Z(x) terms of
the two answers to the same prompt cancel, and what is left only needs log-probabilities:

    loss = -log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

So the policy is its own reward model: no reward model to train, no answers to sample, no value head, no
advantages. The price: it learns only from the pairs it is given (offline), never from its own new answers.

This file, top to bottom: sequence_logprobs (log pi(y|x) of a batch of answers), dpo_loss, the pairs
(part 7's hand-made pairs plus the SFT model's own answers ranked by the verifier), the training loop, and
the evaluation: part 6's held-out exact match before and after, the implicit reward's pairwise accuracy on
held-out pairs, and the KL to the reference on the policy's own samples.

    python part09_grpo/dpo.py                                   # the main run (about 4 minutes on 2 CPU cores)
    python part09_grpo/dpo.py --beta 0.5 --out_dir runs/part09_grpo/dpo_beta0.5
    python part09_grpo/dpo.py --learning_rate 5e-5 --sft_weight 1 --out_dir runs/part09_grpo/dpo_rpo  # + an SFT term
    python part06_sft/eval.py --ckpt runs/part09_grpo/dpo/ckpt.pt   # part 6's evaluation, like any stage
    python part09_grpo/dpo.py --help
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
from tqdm import tqdm

from part06_sft.eval import evaluate, heldout_examples, load_policy, stop_tokens
from part06_sft.template import encode_text, has_chat_tokens
from part07_reward.score import clean_response, right_pad, sequence_ids
from part07_reward.train import Pair, accuracy_by, handmade_pairs, onpolicy_pairs
from part09_grpo.train import prompt_for, response_logprobs, rollout
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.device import autocast, pick_device
from shared.metrics import MetricsLogger, plot_loss, read_metrics, read_steps
from shared.tasks import TASKS, get_examples

SFT_CKPT = "runs/part06_sft/ckpt.pt"


@dataclass
class TrainConfig:
    init_from: str = field(default=SFT_CKPT, metadata={"help": "the SFT checkpoint: the policy starts from it and "
                                                               "a frozen copy of it is the reference"})
    beta: float = field(default=0.1, metadata={"help": "the KL coefficient of the objective DPO solves: small = the "
                                                       "policy may move far from the reference", "min": 1e-6})
    sft_weight: float = field(default=0.0, metadata={"help": "add sft_weight x the chosen answers' per-token "
                              "negative log-likelihood to the loss (RPO, Pang et al. 2024; Llama 3 used 0.2): keeps "
                              "the chosen answers likely; 0 = plain DPO", "min": 0})
    # on-policy pairs, as in part 7: the SFT model's own answers, the better one by the verifier as chosen
    onpolicy_prompts: int = field(default=200, metadata={"help": "training prompts per task the SFT model answers",
                                                         "min": 0})
    onpolicy_samples: int = field(default=4, metadata={"help": "answers sampled per prompt", "min": 2})
    onpolicy_temperature: float = field(default=1.0, metadata={"min": 1e-6})
    onpolicy_fraction: float = field(default=0.5, metadata={"help": "share of each batch taken from on-policy pairs",
                                                            "min": 0, "max": 1})
    # the optimisation
    batch_size: int = field(default=32, metadata={"help": "pairs per step (2 x batch_size sequences)", "min": 1})
    # 1e-5: at 5e-5 plain DPO lowered the chosen answers too (by ~1.2 nats each) and greedy reverse fell from
    # 96% to 77%; at 1e-5 no task lost more than a point. --sft_weight 1 makes 5e-5 safe as well.
    learning_rate: float = field(default=1e-5, metadata={"min": 0})
    warmup_iters: int = field(default=20, metadata={"min": 0})
    min_lr: float = field(default=1e-6, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})
    beta2: float = field(default=0.99, metadata={"min": 0, "max": 0.9999})
    grad_clip: float = field(default=1.0, metadata={"help": "0 = off", "min": 0})
    max_iters: int = field(default=300, metadata={"min": 0})
    eval_interval: int = field(default=50, metadata={"min": 1})
    val_pairs: int = field(default=20, metadata={"help": "held-out pairs per task for the curve in metrics.jsonl",
                                                 "min": 1})
    # the final evaluation
    eval_n: int | None = field(default=500, metadata={"help": "held-out prompts per task for part 6's exact match "
                                                              "(500 = all of them); none = all", "min": 1})
    eval_pairs: int = field(default=100, metadata={"help": "held-out hand-made pairs per task for the implicit "
                                                           "reward's pairwise accuracy", "min": 1})
    kl_prompts: int = field(default=50, metadata={"help": "held-out prompts per task the policy answers (T = 1) "
                                                          "for its KL to the reference", "min": 1})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit (evaluation, sampling)", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 or mps"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16", "float16"]})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    seed: int = 1337
    out_dir: str = "runs/part09_grpo/dpo"


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


# --- log pi(y | x): the one number DPO needs from a model ---------------------------------------------------


def sequence_logprobs(model, ids: torch.Tensor, padding_mask: torch.Tensor, response_mask: torch.Tensor):
    """log pi(response | prompt) of each row: (B,).

    ids (B, T): <|user|>prompt<|assistant|>response<|end|>, padded. padding_mask (B, T): True = a real token.
    response_mask (B, T): True at the response's tokens, its closing <|end|> included (stopping is part of the
    answer: a policy that never ends is a different policy), the prompt and the padding excluded.

    The log-probability of a sequence is the sum of its tokens' log-probabilities, each read from the logits
    one position earlier: logits[:, t] predict ids[:, t + 1]. The sum, not the mean: DPO compares
    log pi / pi_ref of whole answers (the paper's y is a whole answer), and a mean would change the objective.
    """
    logits, _ = model(ids, padding_mask=padding_mask)  # padding_mask: right or left padding both work
    targets = ids[:, 1:]
    token_logp = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                  reduction="none").view(targets.shape)  # (B, T - 1): log p(ids[t+1] | ids[:t+1])
    return torch.where(response_mask[:, 1:], token_logp, 0.0).sum(dim=1)


# --- The loss ------------------------------------------------------------------------------------------------


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """The DPO loss (Rafailov et al. 2023, eq. 7), from the four log-probabilities (B,) of each pair.

    Returns (loss, chosen_rewards, rejected_rewards). The implicit rewards beta * log(pi / pi_ref) are returned
    detached: they are what we watch (their difference is the margin; accuracy = how often it is > 0).

    Its gradient, -beta * sigmoid(r_rejected - r_chosen) * (grad log pi(y_c) - grad log pi(y_r)), raises the
    chosen answer and lowers the rejected one, weighted by how wrong the implicit reward still ranks the pair:
    a pair already ranked right by a wide margin stops pulling, which keeps the policy near the reference.
    At the start pi = pi_ref, every margin is 0 and the loss is log 2.
    """
    chosen_rewards = beta * (pi_chosen - ref_chosen)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    # logsigmoid, not log(sigmoid()): finite however negative the margin gets
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# --- The pairs -------------------------------------------------------------------------------------------------
# Part 7's data: hand-made pairs (chosen = the gold answer, rejected = a plausible failure) and on-policy pairs
# (two of the SFT model's own sampled answers, the better one by the task's verifier as chosen).


def encode_answer(tokenizer, prompt: str, response: str, block_size: int) -> tuple[list[int], int]:
    """The ids part 7's reward model reads, <|user|>prompt<|assistant|>response<|end|> (sequence_ids), and
    how many of the last ids are the response (its <|end|> included). Too long: the start of the prompt is cut;
    the first id has no prediction, so at most len(ids) - 1 response tokens."""
    ids = sequence_ids(tokenizer, prompt, response, block_size)
    n_response = len(encode_text(tokenizer, clean_response(response))) + 1
    return ids, min(n_response, len(ids) - 1)


def answer_batch(encoded: list[tuple[list[int], int]], pad_id: int, device: str):
    """Encoded answers -> ids, padding_mask and response_mask, each (N, T), right-padded."""
    ids, padding_mask = right_pad([s for s, _ in encoded], pad_id)
    lengths = padding_mask.sum(dim=1, keepdim=True)
    n_response = torch.tensor([n for _, n in encoded])[:, None]
    position = torch.arange(ids.size(1))[None, :]
    response_mask = (position < lengths) & (position >= lengths - n_response)
    return ids.to(device), padding_mask.to(device), response_mask.to(device)


def encode_pairs(tokenizer, pairs: list[Pair], block_size: int) -> list[tuple[list[int], int]]:
    """The chosen answers of the pairs, then their rejected answers: 2B encoded rows (encode_answer)."""
    return [encode_answer(tokenizer, p.prompt, p.chosen, block_size) for p in pairs] + \
           [encode_answer(tokenizer, p.prompt, p.rejected, block_size) for p in pairs]


def pair_logprobs(model, encoded: list[tuple[list[int], int]], pad_id: int, device: str):
    """log pi of the chosen and of the rejected answers, (B,) each, in one forward pass of the 2B rows."""
    logp = sequence_logprobs(model, *answer_batch(encoded, pad_id, device))
    half = len(encoded) // 2
    return logp[:half], logp[half:]


@torch.no_grad()
def pair_logprobs_all(model, tokenizer, pairs: list[Pair], device: str, batch_size: int = 64):
    """pair_logprobs over many pairs, in batches, without gradients."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        encoded = encode_pairs(tokenizer, pairs[start : start + batch_size], model.config.block_size)
        c, r = pair_logprobs(model, encoded, tokenizer.eot_token, device)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def first_per_task(pairs: list[Pair], n: int) -> list[Pair]:
    """The first n pairs of each task: a fixed subset that covers every task."""
    by_task = defaultdict(list)
    for p in pairs:
        if len(by_task[p.task]) < n:
            by_task[p.task].append(p)
    return [p for t in TASKS for p in by_task[t]]


# --- The evaluation: implicit-reward accuracy, and how far the policy moved (KL) --------------------------------


@torch.no_grad()
def sampled_kl(policy, reference, tokenizer, examples: list, max_new_tokens: int, device: str,
               batch_size: int = 64) -> float:
    """KL(pi || pi_ref) per answer, estimated on the policy's own samples (temperature 1, one per prompt):
    the mean over answers y ~ pi of log pi(y|x) - log pi_ref(y|x), summed over the answer's tokens. (The
    unbiased Monte Carlo estimate of the sequence-level KL; a single sample can be negative, the mean is not
    in expectation.) It is the distance DPO's beta trades the reward against, measured with train.py's
    rollout exactly as parts 8 and 9 measure it."""
    stops = stop_tokens(tokenizer).to(device)
    prompts = [prompt_for(tokenizer, ex, max_new_tokens, policy.config.block_size) for ex in examples]
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        roll = rollout(policy, prompts[start : start + batch_size], max_new_tokens, 1.0, stops, tokenizer.eot_token)
        ref_logprobs, _ = response_logprobs(reference(roll.ids, padding_mask=roll.padding_mask)[0], roll.ids,
                                            roll.prompt_len, 1.0)
        total += ((roll.logprobs - ref_logprobs) * roll.response_mask).sum().item()
    return total / len(prompts)


def mean_exact(results: dict) -> float:
    return round(sum(r["exact_match"] for r in results.values()) / len(results), 4)


# --- Training ---------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig):
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    autocast(device, cfg.dtype)  # refuses an unsupported dtype before anything runs
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"no SFT model at {cfg.init_from}: make it with python part06_sft/train.py (after "
                                "python part04_scaling/train.py), or choose another checkpoint with --init_from PATH")
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    # The policy, and the reference: a frozen second copy of the same SFT model
    policy, tokenizer, _ = load_policy(cfg.init_from, device)
    if not has_chat_tokens(tokenizer):
        raise ValueError(f"{cfg.init_from} has no chat tokens: DPO starts from an SFT model "
                         "(python part06_sft/train.py)")
    reference, _, _ = load_policy(cfg.init_from, device)
    reference.requires_grad_(False)
    if cfg.max_new_tokens >= policy.config.block_size:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in the model's "
                         f"{policy.config.block_size}-token context")

    # The SFT model's held-out exact match: the "before" of the comparison
    eval_examples = heldout_examples("heldout", cfg.eval_n)
    gold_before, _ = evaluate(policy, tokenizer, eval_examples, cfg.max_new_tokens)

    # The data: part 7's pairs. On-policy pairs come from the SFT model's answers, sampled once, before training:
    # DPO is offline, the pairs never change while the policy does.
    train_pairs, heldout_pairs = handmade_pairs("train"), handmade_pairs("heldout")
    rng = Random(cfg.seed)
    onpolicy_examples = [ex for t in TASKS for ex in rng.sample(get_examples("train", t), cfg.onpolicy_prompts)]
    onpolicy_train, _ = onpolicy_pairs(policy, tokenizer, onpolicy_examples, cfg.onpolicy_samples,
                                       cfg.onpolicy_temperature)
    n_onpolicy = round(cfg.onpolicy_fraction * cfg.batch_size) if onpolicy_train else 0
    print(f"{len(train_pairs):,} hand-made + {len(onpolicy_train):,} on-policy training pairs "
          f"({cfg.batch_size - n_onpolicy} + {n_onpolicy} per batch)")
    val_pairs = first_per_task(heldout_pairs, cfg.val_pairs)
    val_ref = pair_logprobs_all(reference, tokenizer, val_pairs, device)

    optimizer = policy.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)
    logger = MetricsLogger(out_dir)
    train_seconds, step_loss, tokens_per_sec = 0.0, math.nan, math.nan
    bar = tqdm(range(cfg.max_iters + 1), desc="DPO", dynamic_ncols=True)
    try:
        for it in bar:
            lr = lr_at(it, cfg)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                policy.eval()
                chosen, rejected = pair_logprobs_all(policy, tokenizer, val_pairs, device)
                policy.train()
                val_loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, *val_ref, cfg.beta)
                if not math.isfinite(val_loss.item()):
                    raise FloatingPointError(f"step {it}: the held-out loss is {val_loss.item()}; try a lower "
                                             "--learning_rate")
                margin = (r_chosen - r_rejected).mean().item()
                logger.log(iter=it, train_loss=step_loss, val_loss=val_loss.item(), reward_margin=margin,
                           val_accuracy=(r_chosen > r_rejected).float().mean().item(),
                           chosen_reward=r_chosen.mean().item(), rejected_reward=r_rejected.mean().item(),
                           lr=lr, tokens_per_sec=tokens_per_sec)
                bar.write(f"iter {it:4d} | step loss {step_loss:.4f} | held-out DPO loss {val_loss.item():.4f} | "
                          f"reward margin {margin:+.3f} (chosen {r_chosen.mean():+.3f}, rejected "
                          f"{r_rejected.mean():+.3f})")
            if it == cfg.max_iters:
                break

            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr
            hand = torch.randint(len(train_pairs), (cfg.batch_size - n_onpolicy,), generator=generator).tolist()
            onp = torch.randint(len(onpolicy_train), (n_onpolicy,), generator=generator).tolist() if n_onpolicy \
                else []
            batch = [train_pairs[i] for i in hand] + [onpolicy_train[i] for i in onp]
            encoded = encode_pairs(tokenizer, batch, policy.config.block_size)
            with autocast(device, cfg.dtype):
                with torch.no_grad():  # the reference is frozen: no graph, no gradient
                    ref_chosen, ref_rejected = pair_logprobs(reference, encoded, tokenizer.eot_token, device)
                pi_chosen, pi_rejected = pair_logprobs(policy, encoded, tokenizer.eot_token, device)
            loss, _, _ = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, cfg.beta)
            step_loss = loss.item()  # the DPO loss alone, comparable with the held-out curve
            if cfg.sft_weight:
                # DPO only asks that chosen beat rejected; both may fall, and the chosen answers often do (their
                # log pi drops below the reference's). An SFT term on the chosen answers holds them up
                # (Pang et al. 2024, https://arxiv.org/abs/2404.19733; Llama 3, https://arxiv.org/abs/2407.21783).
                n_chosen = torch.tensor([n for _, n in encoded[: len(batch)]], device=device)
                loss = loss + cfg.sft_weight * (-pi_chosen / n_chosen).mean()
            loss.backward()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"step {it}: the loss became {loss.item()}; try a lower --learning_rate")
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds = time.perf_counter() - step_start
            train_seconds += step_seconds
            tokens_per_sec = sum(len(ids) for ids, _ in encoded) / step_seconds
            logger.log_step(it, step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
    finally:
        bar.close()
        logger.close()

    # --- The evaluation: part 6's exact match, the implicit reward as a judge, the distance travelled ---
    policy.eval()
    gold_after, _ = evaluate(policy, tokenizer, eval_examples, cfg.max_new_tokens)
    acc_pairs = first_per_task(heldout_pairs, cfg.eval_pairs)
    pi_c, pi_r = pair_logprobs_all(policy, tokenizer, acc_pairs, device)
    ref_c, ref_r = pair_logprobs_all(reference, tokenizer, acc_pairs, device)
    correct = cfg.beta * (pi_c - ref_c) > cfg.beta * (pi_r - ref_r)
    torch.manual_seed(cfg.seed)
    kl = sampled_kl(policy, reference, tokenizer, heldout_examples("heldout", cfg.kl_prompts), cfg.max_new_tokens,
                    device)
    results = dict(
        gold_before=gold_before, gold_after=gold_after,
        mean_exact_before=mean_exact(gold_before), mean_exact_after=mean_exact(gold_after),
        pairwise_accuracy=round(correct.float().mean().item(), 4), pairwise_n=len(acc_pairs),
        pairwise_by_failure_mode=accuracy_by(acc_pairs, correct, lambda p: p.kind),
        # the SFT model's own likelihood as a judge (log pi_ref(chosen) > log pi_ref(rejected)), for comparison
        pairwise_accuracy_sft_likelihood=round((ref_c > ref_r).float().mean().item(), 4),
        kl_to_ref=round(kl, 4), kl_n=len(TASKS) * cfg.kl_prompts,
        n_pairs=dict(handmade=len(train_pairs), onpolicy=len(onpolicy_train)),
        iters=cfg.max_iters, train_seconds=round(train_seconds, 1), seconds=None, config=asdict(cfg))
    atomic_save({"model": policy.state_dict(), "model_config": asdict(policy.config), "tokenizer": tokenizer.to_dict(),
                 "iter_num": cfg.max_iters, "train_config": asdict(cfg), "sft_ckpt": cfg.init_from}, ckpt_path)
    records = read_metrics(logger.path)
    plot_loss([{k: r[k] for k in ("iter", "val_loss")} for r in records], out_dir / "loss.png",
              title=f"part09: DPO (beta {cfg.beta}), held-out DPO loss", steps=read_steps(out_dir))
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    print("held-out exact match, SFT -> DPO:")
    for task in gold_before:
        print(f"  {task:10s} {gold_before[task]['exact_match']:.3f} -> {gold_after[task]['exact_match']:.3f}")
    print(f"  {'mean':10s} {results['mean_exact_before']:.3f} -> {results['mean_exact_after']:.3f}")
    print(f"implicit-reward pairwise accuracy {results['pairwise_accuracy']:.3f} on {len(acc_pairs)} held-out pairs "
          f"(the SFT model's likelihood: {results['pairwise_accuracy_sft_likelihood']:.3f}); "
          f"KL to the reference {kl:.3f} nats per answer")
    print(f"{results['seconds']:.0f} s ({train_seconds:.0f} s in training steps); wrote {ckpt_path}, "
          f"{out_dir / 'results.json'}, loss.png")
    return policy, results


def main(argv=None) -> dict:
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    _, results = train(cfg)
    return results


if __name__ == "__main__":
    run_cli(main)
