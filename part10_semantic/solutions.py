"""Part 10 reference solutions. Try exercises.py first; `pytest tests/test_part10_exercises.py -rs` checks both.

hyperbolic.py and boundless_bpe.py hold the lesson versions of ex01-ex04 (with the guards and the indexes that
training needs); here each idea is written out on its own, in plain PyTorch or plain Python.
"""
import math

import torch


def ex01_poincare_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sq_dist = (u - v).pow(2).sum(-1)  # |u - v|^2, (...)
    denom = (1 - u.pow(2).sum(-1)) * (1 - v.pow(2).sum(-1))  # shrinks to 0 near the boundary
    return torch.acosh(1 + 2 * sq_dist / denom)


def ex02_mobius_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xy = (x * y).sum(-1, keepdim=True)  # <x, y>, (..., 1)
    xx, yy = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    numerator = (1 + 2 * xy + yy) * x + (1 - xx) * y
    return numerator / (1 + 2 * xy + xx * yy)


def ex03_riemannian_grad(x: torch.Tensor, euclidean_grad: torch.Tensor) -> torch.Tensor:
    sq_norm = x.pow(2).sum(-1, keepdim=True)  # (..., 1): one factor per point
    return (1 - sq_norm).pow(2) / 4 * euclidean_grad  # 1 / (conformal factor)^2, (2 / (1 - |x|^2))^2


def _can_join(pretoken: tuple[str, ...]) -> bool:
    """A whole (single-token), letter-only pre-token: boundless_bpe.can_join's rule, once BPE has merged it."""
    if len(pretoken) != 1:
        return False
    token = pretoken[0]
    return any(ch.isalpha() for ch in token) and all(ch.isalpha() or ch in " _'\u2019" for ch in token)


def ex04_supermerge_step(corpus: list[list[tuple[str, ...]]],
                         counts: list[int]) -> tuple[tuple[str, str] | None, list[list[tuple[str, ...]]]]:
    pair_counts: dict[tuple[str, str], int] = {}
    for sequence, count in zip(corpus, counts):
        for left, right in zip(sequence, sequence[1:]):
            if _can_join(left) and _can_join(right):
                pair = (left[0], right[0])
                pair_counts[pair] = pair_counts.get(pair, 0) + count
    if not pair_counts:
        return None, [list(sequence) for sequence in corpus]
    pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # most frequent; on a tie the smallest pair
    left, right = (pair[0],), (pair[1],)
    merged = []
    for sequence in corpus:
        out, i = [], 0
        while i < len(sequence):
            if i + 1 < len(sequence) and sequence[i] == left and sequence[i + 1] == right:
                out.append((pair[0] + pair[1],))  # the superword: one token spanning two pre-tokens
                i += 2  # left to right, no overlaps
            else:
                out.append(sequence[i])
                i += 1
        merged.append(out)
    return pair, merged


def ex05_entropy_patch_starts(entropies: torch.Tensor, threshold: float, monotonic: bool = False) -> torch.Tensor:
    if monotonic:
        rising = (entropies[..., 1:] - entropies[..., :-1]) > threshold  # H(x_t) - H(x_{t-1}), t >= 1, per row
    else:
        rising = entropies[..., 1:] > threshold  # H(x_t) for t >= 1
    first = torch.ones_like(entropies[..., :1], dtype=torch.bool)  # position 0 always starts a patch
    return torch.cat((first, rising), dim=-1)


def ex06_bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    total_nats = float(loss_nats_per_token) * n_tokens
    return total_nats / math.log(2) / n_bytes


def ex07_context_gated_query(q: torch.Tensor, c: torch.Tensor, U: torch.Tensor, v1: torch.Tensor,
                             v2: torch.Tensor) -> torch.Tensor:
    c_hat = c @ U  # (..., n or 1, d): the context in the query space
    gate = torch.sigmoid(q @ v1 + c_hat @ v2)[..., None]  # (..., n, 1): one scalar per position
    return (1 - gate) * q + gate * c_hat


def ex08_contrastive_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    n = len(pred)
    # (N, N): |pred_i - target_j|, from the differences (not |p|^2 + |t|^2 - 2 p.t, which rounds ties apart)
    dist = torch.cdist(pred.double(), target.double(), compute_mode="donot_use_mm_for_euclid_dist")
    own = dist.diagonal()[:, None]  # (N, 1): |pred_i - target_i|
    farther = (dist > own).sum(1)  # j = i is never strictly farther than itself
    return (farther.double() / (n - 1)).mean().item()
