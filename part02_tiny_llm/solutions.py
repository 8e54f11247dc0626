"""Part 2 reference solutions. Try exercises.py first; `pytest tests/test_part02_exercises.py -rs` checks both."""
import math

import torch
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


def ex02_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    keep = targets != -1
    log_probs = F.log_softmax(logits[keep], dim=-1)  # (N, V); stable: subtracts each row's max
    nll = -log_probs.gather(1, targets[keep][:, None]).squeeze(1)  # -log p(right token)
    uniform = -log_probs.mean(dim=-1)  # the loss against a target spread evenly over the V tokens
    return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()


def ex03_top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    keep_sorted = mass_before < top_p  # the token that crosses top_p still has less than top_p above it
    return keep_sorted.scatter(-1, order, keep_sorted)  # back to vocabulary order


def ex04_sample_without_multinomial(logits: torch.Tensor, temperature: float, top_k: int | None,
                                    generator: torch.Generator) -> torch.Tensor:
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    # Gumbel-max: argmax(logits + Gumbel noise) is distributed as softmax(logits). Gumbel = -log(-log U).
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(uniform))
    return torch.argmax(logits.double() + gumbel, dim=-1)


def ex05_clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    total_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).to(grads[0].dtype)
    scale = min(1.0, max_norm / (total_norm.item() + 1e-6))
    return [g * scale for g in grads], total_norm


def ex06_sample_surprise(log_probs: torch.Tensor, temperature: float) -> float:
    generator = torch.Generator().manual_seed(0)
    sampling_probs = F.softmax(log_probs / temperature, dim=-1)  # (V, V): one row per current token
    current, bits = ord("\n"), 0.0
    n_tokens = 4000
    for _ in range(n_tokens):
        following = torch.multinomial(sampling_probs[current], 1, generator=generator).item()
        bits += -log_probs[current, following].item() / math.log(2)  # scored at temperature 1
        current = following
    return bits / n_tokens
