"""Part 10 reference solutions. Try exercises.py first; `pytest tests/test_part10_exercises.py -rs` checks both.

hyperbolic.py, boundless_bpe.py, blt.py, context_attention.py, lcm.py and thoughts.py hold the lesson versions
(with the guards, caches and indexes that training needs); here each idea is written out on its own, in plain
PyTorch or plain Python.
"""
import math

import torch
import torch.nn.functional as F


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


def ex09_robust_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q25, center, q75 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype), dim=0)  # each (d,)
    normal_iqr = (torch.special.ndtri(torch.tensor(0.75)) - torch.special.ndtri(torch.tensor(0.25))).item()  # 1.349
    scale = (q75 - q25) / normal_iqr
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant column: leave it unscaled
    return (x - center) / scale, center, scale


def ex10_base_lcm_loss_and_stop(pred: torch.Tensor, concepts: torch.Tensor, eot: torch.Tensor,
                                s_eot: float = 0.9, s_prev: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    loss = F.mse_loss(pred[:, :-1], concepts[:, 1:])  # output i against concept i + 1; the mean over B, L-1, d
    is_end = F.cosine_similarity(pred, eot, dim=-1) >= s_eot  # (B, L)
    repeats = F.cosine_similarity(pred, concepts, dim=-1) >= s_prev  # (B, L): concept i came just before pred i
    return loss, is_end | repeats


def ex11_ddim_step(x_t: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t: float,
                   alpha_bar_prev: float) -> torch.Tensor:
    eps_hat = (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t)  # the noise x0_pred implies
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps_hat


def ex12_continuous_thought_forward(model, prompt_embeds: torch.Tensor, n_thoughts: int) -> torch.Tensor:
    inputs = prompt_embeds  # (B, T, d)
    for _ in range(n_thoughts):
        hidden = model(inputs)  # (B, T', d)
        inputs = torch.cat((inputs, hidden[:, -1:]), dim=1)  # the last hidden state becomes the next input
    return inputs  # (B, T + n_thoughts, d)
