"""Part 2 reference solutions. Try exercises.py first; `pytest tests/test_part02_exercises.py -rs` checks both."""
import torch
import torch.nn as nn
from torch.nn import functional as F


def ex01_utf8_encode(text: str) -> list[int]:
    out = []
    for ch in text:
        cp = ord(ch)
        if cp < 0x80:  # 0xxxxxxx
            out.append(cp)
        elif cp < 0x800:  # 110xxxxx 10xxxxxx
            out += [0xC0 | (cp >> 6), 0x80 | (cp & 0x3F)]
        elif cp < 0x10000:  # 1110xxxx 10xxxxxx 10xxxxxx
            out += [0xE0 | (cp >> 12), 0x80 | ((cp >> 6) & 0x3F), 0x80 | (cp & 0x3F)]
        else:  # 11110xxx 10xxxxxx 10xxxxxx 10xxxxxx
            out += [0xF0 | (cp >> 18), 0x80 | ((cp >> 12) & 0x3F), 0x80 | ((cp >> 6) & 0x3F), 0x80 | (cp & 0x3F)]
    return out


def ex02_get_batch(data: torch.Tensor, starts: torch.Tensor, block_size: int):
    positions = starts[:, None] + torch.arange(block_size)  # (B, T)
    return data[positions], data[positions + 1]


def ex03_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    keep = targets != -1
    log_probs = F.log_softmax(logits[keep], dim=-1)  # (N, V)
    return -log_probs.gather(1, targets[keep][:, None]).mean()


def ex04_temperature_top_k(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return F.softmax(logits, dim=-1)


def ex05_top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    return keep_sorted.scatter(-1, order, keep_sorted)


def ex06_split_decay_params(model: nn.Module) -> tuple[list[str], list[str]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def ex07_clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    total_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).to(grads[0].dtype)
    scale = min(1.0, max_norm / (total_norm.item() + 1e-6))
    return [g * scale for g in grads], total_norm
