"""Score responses with the reward model: read JSONL rows, print each back with its score.

    python part07_reward/score.py --input rows.jsonl                 # rows {prompt, response} -> + "score"
    python -m shared.tasks export --split heldout --kind preference --out data/pref_heldout.jsonl
    python part07_reward/score.py --input data/pref_heldout.jsonl    # rows {prompt, chosen, rejected}
                                                                     # -> + "score_chosen", "score_rejected"

Scores are normalised: the reward model's raw output minus the mean, divided by the standard deviation, of
its scores on a reference set (the SFT model's own answers to training prompts), both stored in the
checkpoint. So 0 is "a typical answer of the SFT model", +1 one standard deviation better: the scale part
8's PPO optimises. For preference rows, the pairwise accuracy (score_chosen > score_rejected) goes to stderr.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch

from part04_scaling.bpe import Tokenizer
from part06_sft.template import END, encode_prompt, encode_text, has_chat_tokens
from part07_reward.model import GPTConfig, RewardModel
from shared.config import parse_config, run_cli
from shared.device import pick_device
from shared.tasks import read_jsonl

REWARD_CKPT = "runs/part07_reward/ckpt.pt"


@dataclass
class ScoreConfig:
    ckpt: str = field(default=REWARD_CKPT, metadata={"help": "the reward model (python part07_reward/train.py)"})
    input: str = field(default="", metadata={"help": "a .jsonl file of {prompt, response} or {prompt, chosen, "
                                                     "rejected} rows"})
    raw: bool = field(default=False, metadata={"help": "print the raw scores, not the normalised ones"})
    batch_size: int = field(default=64, metadata={"min": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})


def load_reward_model(ckpt_path, device: str = "cpu") -> tuple[RewardModel, Tokenizer, dict]:
    """The reward model, its tokenizer and its checkpoint (with "reward_mean", "reward_std")."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"no reward model at {path}; train it first: python part07_reward/train.py")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("kind") != "reward_model":
        raise ValueError(f"{path} is not a reward model checkpoint (python part07_reward/train.py writes one)")
    model = RewardModel(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), Tokenizer.from_dict(checkpoint["tokenizer"]), checkpoint


def clean_response(response: str) -> str:
    """The response as the reward model reads it: up to the first special-token marker, without trailing
    whitespace. A trailing space or the way generation stopped ("<|end|>" or not) never changes a score;
    the template's <|end|> is appended as a token (sequence_ids)."""
    return response.split("<|", 1)[0].rstrip()


def sequence_ids(tokenizer: Tokenizer, prompt: str, response: str, block_size: int) -> list[int]:
    """<|user|>prompt<|assistant|>response<|end|> as ids: what the reward model scores. Too long: the start
    is cut (the reward head reads the last token, which must stay)."""
    ids = encode_prompt(tokenizer, prompt) + encode_text(tokenizer, clean_response(response))
    return (ids + [tokenizer.special_tokens[END]])[-block_size:]


def right_pad(sequences: list[list[int]], pad_id: int):
    """(B, T) ids and padding_mask (True = real token), padded on the right."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
    return ids, mask


@torch.no_grad()
def score_responses(model: RewardModel, tokenizer: Tokenizer, prompts: list[str], responses: list[str],
                    batch_size: int = 64) -> torch.Tensor:
    """Raw rewards (N,) of the (prompt, response) pairs, in batches of similar lengths."""
    device = next(model.parameters()).device
    block_size = model.backbone.config.block_size
    sequences = [sequence_ids(tokenizer, p, r, block_size) for p, r in zip(prompts, responses)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.empty(len(sequences))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = right_pad([sequences[i] for i in batch], tokenizer.eot_token)
        scores[batch] = model(ids.to(device), mask.to(device)).float().cpu()
    return scores


def normalise(scores: torch.Tensor, checkpoint: dict) -> torch.Tensor:
    return (scores - checkpoint["reward_mean"]) / checkpoint["reward_std"]


def main(argv=None) -> list[dict]:
    cfg = parse_config(ScoreConfig, argv, description=__doc__.splitlines()[0])
    if not cfg.input:
        raise ValueError("--input is required: a .jsonl file of {prompt, response} or {prompt, chosen, rejected} rows")
    rows = [row for _, row in read_jsonl(cfg.input)]
    for number, row in enumerate(rows, 1):
        ok = isinstance(row.get("prompt"), str) and (isinstance(row.get("response"), str) or (
            isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)))
        if not ok:
            raise ValueError(f"{cfg.input}:{number}: a row needs string fields prompt and response (or chosen and "
                             f"rejected); it has {sorted(row)}")
    model, tokenizer, checkpoint = load_reward_model(cfg.ckpt, pick_device(cfg.device))
    if not has_chat_tokens(tokenizer):
        raise ValueError(f"{cfg.ckpt}: its tokenizer has no chat tokens")

    def score(key: str, picked: list[dict]) -> list[float]:
        raw = score_responses(model, tokenizer, [r["prompt"] for r in picked], [r[key] for r in picked], cfg.batch_size)
        return (raw if cfg.raw else normalise(raw, checkpoint)).tolist()

    single = [r for r in rows if "response" in r]
    pairs = [r for r in rows if "response" not in r]
    for row, s in zip(single, score("response", single) if single else []):
        row["score"] = round(s, 4)
    if pairs:
        chosen, rejected = score("chosen", pairs), score("rejected", pairs)
        for row, c, r in zip(pairs, chosen, rejected):
            row["score_chosen"], row["score_rejected"] = round(c, 4), round(r, 4)
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        print(f"pairwise accuracy {accuracy:.4f} on {len(pairs)} pairs (score_chosen > score_rejected)", file=sys.stderr)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return rows


if __name__ == "__main__":
    run_cli(main)
