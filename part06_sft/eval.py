"""Evaluate any stage's checkpoint on the held-out tasks: the one measurement of parts 6-9.

For every task of shared/tasks.py, the model answers the held-out prompts and the task's verifier scores
the answer against the gold. Greedy decoding, so a checkpoint always gets the same number. The same
script judges the base model (part 4), the SFT model (part 6) and the RL policies (parts 8 and 9):

- a checkpoint whose tokenizer has the chat tokens (SFT and later) gets the chat template:
  <|user|>prompt<|assistant|> and its answer up to <|end|>;
- a base model (part 4) has never seen them, so it gets the fairest prompt a base model can get:
  a few solved examples of the same task (few-shot, Brown et al. 2020, https://arxiv.org/abs/2005.14165),
  "prompt\\nAnswer: gold\\n\\n" each, then "prompt\\nAnswer:", and its answer up to the newline.

Prints one JSON object, {task: {"exact_match", "n", "mean_reward", "format_ok", ...}}; --dump writes every
prompt, response and gold, and the printed numbers are a recount of exactly those rows (the tests check it).
With --num_samples K it also samples K answers per prompt and reports pass@1 and pass@K.

    python part06_sft/eval.py                                              # the SFT model of part 6
    python part06_sft/eval.py --ckpt runs/part04_scaling/ckpt.pt           # the base model, few-shot
    python part06_sft/eval.py --n 50 --dump runs/part06_sft/heldout.jsonl  # 50 prompts per task, and the answers
    python part06_sft/eval.py --num_samples 8 --temperature 1.0            # pass@1 and pass@8 too
"""
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part04_scaling.bpe import Tokenizer
from part06_sft.model import GPT, GPTConfig
from part06_sft.template import encode_prompt, encode_text, has_chat_tokens, left_pad
from shared.config import parse_config, run_cli
from shared.device import pick_device
from shared.tasks import SPLITS, TASKS, get_examples, verify, well_formed, write_jsonl


@dataclass
class EvalConfig:
    ckpt: str = field(default="runs/part06_sft/ckpt.pt", metadata={"help": "the checkpoint to evaluate (any stage)"})
    split: str = field(default="heldout", metadata={"choices": list(SPLITS)})
    n: int | None = field(default=None, metadata={"help": "prompts per task (the first n); none = all", "min": 1})
    tasks: str = field(default="all", metadata={"help": "comma-separated task names, or all"})
    dump: str | None = field(default=None, metadata={"help": "write every prompt, response and gold to this .jsonl"})
    num_samples: int = field(default=0, metadata={"help": "K > 0: also sample K answers per prompt for pass@1 and "
                                                          "pass@K", "min": 0})
    temperature: float = field(default=1.0, metadata={"help": "for the K samples", "min": 1e-6})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit, in tokens", "min": 1})
    shots: int = field(default=3, metadata={"help": "solved examples before each prompt, for a model without the "
                                                    "chat template (the base model)", "min": 0})
    batch_size: int = field(default=64, metadata={"help": "prompts generated together", "min": 1})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})


# --- Loading any stage's checkpoint -------------------------------------------------------------------


def load_policy(ckpt_path, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """The GPT, its tokenizer and the checkpoint dict, from a checkpoint of part 4, 6, 8 or 9."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; make it first (part 4: python part04_scaling/train.py, "
                                "part 6: python part06_sft/train.py)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not {"model", "model_config", "tokenizer"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of this curriculum's GPT (it needs model, model_config and "
                         "tokenizer)")
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{path} holds another kind of model than part 6's GPT ({str(err).splitlines()[0]})") from err
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}")
    return model.to(device).eval(), tokenizer, checkpoint


# --- Prompts --------------------------------------------------------------------------------------------


def fewshot_prefix(task: str, shots: int, seed: int = 0) -> str:
    """`shots` solved training examples of the task, in the plain format a base model can follow."""
    demos = Random(f"{seed}:{task}").sample(get_examples("train", task), shots) if shots else []
    return "".join(f"{ex.prompt}\nAnswer: {ex.gold}\n\n" for ex in demos)


def prompt_ids(tokenizer: Tokenizer, example, shots: int, max_len: int) -> list[int]:
    """The ids the model continues: the chat template if the tokenizer has it, else few-shot text, with as
    many of the `shots` demonstrations as fit in max_len tokens."""
    if has_chat_tokens(tokenizer):
        return encode_prompt(tokenizer, example.prompt)
    for k in range(shots, -1, -1):
        ids = encode_text(tokenizer, fewshot_prefix(example.task, k) + f"{example.prompt}\nAnswer:")
        if len(ids) <= max_len or k == 0:
            return ids
    raise AssertionError("unreachable")


def stop_tokens(tokenizer: Tokenizer) -> torch.Tensor:
    """(vocab_size,) bool: the tokens that end an answer: every special token, and every token holding a
    newline (the verifiers read the answer up to the first of either)."""
    stops = torch.tensor([b"\n" in token for token in tokenizer.decoder])
    stops[list(tokenizer.special_tokens.values())] = True
    return stops


# --- Generation -------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_answers(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     temperature: float = 0.0, batch_size: int = 64, progress: str | None = None):
    """Answer each prompt (a list of ids): returns [(response text, ended)] in the prompts' order.

    Prompts of similar length are batched together (sorted by length: less padding), left-padded, and
    generated with the KV cache until every row has emitted a stop token (stop_tokens) or max_new_tokens.
    ended: whether the answer stopped by itself. The response is decoded up to and including its stop token.
    """
    device = next(model.parameters()).device
    stops = stop_tokens(tokenizer).to(device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, dynamic_ncols=True, leave=False):
        ids, padding_mask = left_pad([prompts[i] for i in batch], tokenizer.eot_token)
        new = torch.empty(len(batch), 0, dtype=torch.long, device=device)
        done = torch.zeros(len(batch), dtype=torch.bool, device=device)
        for token in model.stream(ids.to(device), max_new_tokens, temperature=temperature,
                                  padding_mask=padding_mask.to(device)):
            new = torch.cat((new, token), dim=1)
            done |= stops[token[:, 0]]
            if done.all():
                break
        for row, i in enumerate(batch):
            tokens = new[row].tolist()
            end = next((t for t, tok in enumerate(tokens) if stops[tok]), None)
            results[i] = (tokenizer.decode(tokens if end is None else tokens[: end + 1]), end is not None)
    return results


# --- The evaluation ---------------------------------------------------------------------------------------


def evaluate(model: GPT, tokenizer: Tokenizer, examples: list, max_new_tokens: int = 32, shots: int = 3,
             num_samples: int = 0, temperature: float = 1.0, batch_size: int = 64, progress: bool = True):
    """Score the model on examples. Returns (per-task results, one row per example).

    Per task: exact_match (greedy answer verifies to 1.0), mean_reward (the verifier's mean: token F1 for
    next_line), format_ok (the answer ended and has the task's shape), n; with num_samples K > 0 also
    pass@1 (the mean exact match of the K samples) and pass@K (at least one of the K is right).
    """
    max_len = model.config.block_size - max_new_tokens
    prompts = [prompt_ids(tokenizer, ex, shots, max_len) for ex in examples]
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens, 0.0, batch_size,
                              "eval (greedy)" if progress else None)
    rows = []
    for ex, (response, ended) in zip(examples, greedy):
        reward = verify(ex, response)
        rows.append(dict(task=ex.task, prompt=ex.prompt, response=response, gold=ex.gold, reward=reward,
                         exact=reward == 1.0, format_ok=ended and well_formed(ex, response)))
    if num_samples:
        repeated = [p for p in prompts for _ in range(num_samples)]
        sampled = generate_answers(model, tokenizer, repeated, max_new_tokens, temperature, batch_size,
                                   f"eval ({num_samples} samples)" if progress else None)
        for i, row in enumerate(rows):
            row["samples"] = [response for response, _ in sampled[i * num_samples : (i + 1) * num_samples]]
    return summarize(rows, examples, num_samples), rows


def summarize(rows: list[dict], examples: list, num_samples: int = 0) -> dict:
    """Per-task numbers from the rows (eval.py's dump is exactly these rows, so anyone can recount them)."""
    by_task = defaultdict(list)
    for row, ex in zip(rows, examples):
        by_task[row["task"]].append((row, ex))
    results = {}
    for task, items in by_task.items():
        n = len(items)
        result = dict(exact_match=sum(verify(ex, row["response"]) == 1.0 for row, ex in items) / n, n=n,
                      mean_reward=sum(verify(ex, row["response"]) for row, ex in items) / n,
                      format_ok=sum(row["format_ok"] for row, _ in items) / n)
        if num_samples:
            correct = [[verify(ex, s) == 1.0 for s in row["samples"]] for row, ex in items]
            result["pass@1"] = sum(sum(c) / len(c) for c in correct) / n
            result[f"pass@{num_samples}"] = sum(any(c) for c in correct) / n
        results[task] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    return results


def heldout_examples(split: str = "heldout", n: int | None = None, tasks: str = "all") -> list:
    names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",")]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    return [ex for task in names for ex in get_examples(split, task)[:n]]


def format_table(results: dict) -> str:
    """The results as a small text table, one task per line."""
    keys = [k for k in next(iter(results.values())) if k != "n"]
    lines = [f"{'task':10s} {'n':>5s} " + " ".join(f"{k:>11s}" for k in keys)]
    for task, r in results.items():
        lines.append(f"{task:10s} {r['n']:5d} " + " ".join(f"{r[k]:11.3f}" for k in keys))
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse_config(EvalConfig, argv, description=__doc__.splitlines()[0])
    if not math.isfinite(cfg.temperature):
        raise ValueError(f"--temperature must be a finite number > 0, got {cfg.temperature}")
    examples = heldout_examples(cfg.split, cfg.n, cfg.tasks)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_policy(cfg.ckpt, device)
    if cfg.max_new_tokens >= model.config.block_size:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for the prompt in the model's "
                         f"{model.config.block_size}-token context")
    results, rows = evaluate(model, tokenizer, examples, cfg.max_new_tokens, cfg.shots, cfg.num_samples,
                             cfg.temperature, cfg.batch_size)
    if cfg.dump:
        write_jsonl(rows, cfg.dump)
    style = "chat template" if has_chat_tokens(tokenizer) else f"base model, {cfg.shots}-shot"
    print(f"{cfg.ckpt} ({style}), {cfg.split}:\n{format_table(results)}", file=sys.stderr)
    if cfg.dump:
        print(f"wrote {len(rows)} rows to {cfg.dump}", file=sys.stderr)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    run_cli(main)
