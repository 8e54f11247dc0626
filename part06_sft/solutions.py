"""Part 6 reference solutions. Try exercises.py first; `pytest tests/test_part06_exercises.py -rs` checks both."""
import math
import re

import torch
from torch import nn

from part06_sft.model import IGNORE_INDEX
from part06_sft.template import ASSISTANT, END, USER


def ex01_render_chat(prompt: str, answer: str | None = None) -> str:
    text = f"{USER}{prompt}{ASSISTANT}"  # the answer starts right after <|assistant|>: no newline
    return text if answer is None else text + answer + END


def ex02_mask_labels(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    sequence = list(prompt_ids) + list(answer_ids)
    x, y = sequence[:-1], sequence[1:]
    # y[t] = sequence[t + 1] is a prompt token for t + 1 < len(prompt_ids): the first len(prompt_ids) - 1
    # targets. The next one, predicted at <|assistant|>, is the answer's first token: it stays.
    n_prompt_targets = len(prompt_ids) - 1
    y = [IGNORE_INDEX] * n_prompt_targets + y[n_prompt_targets:]
    return x, y


def ex03_collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x, _ in examples)
    xs = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T), padding everywhere at first
    ys = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        xs[i, : len(x)] = torch.tensor(x, dtype=torch.long)  # the real tokens on the left, padding after
        ys[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return xs, ys


@torch.no_grad()  # copying into the new weights is initialisation, not something to differentiate
def ex04_resize_embeddings(model, new_vocab_size: int) -> None:
    old = model.wte.weight  # (vocab_size, n_embd)
    vocab_size, n_embd = old.shape
    if new_vocab_size < vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {vocab_size} to {new_vocab_size}")
    wte = nn.Embedding(new_vocab_size, n_embd, device=old.device, dtype=old.dtype)
    wte.weight[:vocab_size] = old  # every old token keeps its row
    wte.weight[vocab_size:] = old.mean(dim=0)  # each new token: the average row (broadcast over the new rows)
    model.wte = wte
    model.lm_head = nn.Linear(n_embd, new_vocab_size, bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = model.wte.weight  # tied again, to the new matrix
    model.config.vocab_size = new_vocab_size


def _answer_text(response: str) -> str:
    response = response.split("\n", 1)[0].split("<|", 1)[0]  # stop at a newline or a special token
    text = " ".join(response.split())  # collapse whitespace, strip
    return text[:-1].rstrip() if text.endswith(".") else text


def ex05_verify_integer(gold: str, response: str) -> float:
    text = _answer_text(response)
    return float(re.fullmatch(r"[+-]?\d+", text) is not None and int(text) == int(gold))


def ex06_competence(it: int, curriculum_iters: int, c0: float = 0.1) -> float:
    if curriculum_iters <= 0 or it >= curriculum_iters:
        return 1.0
    return min(1.0, math.sqrt(it * (1 - c0**2) / curriculum_iters + c0**2))


def ex07_left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    padding_mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # False = padding
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)  # the prompt ends at the last column
        padding_mask[i, T - len(p) :] = True
    return ids, padding_mask
