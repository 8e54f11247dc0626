"""Part 7 reference solutions. Try exercises.py first; `pytest tests/test_part07_exercises.py -rs` checks both."""
import torch
import torch.nn.functional as F


def ex01_last_token_pool(hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    B, T, _ = hidden.shape
    # Flip the mask left-right: the first True of the flipped row is the last real token of the row, wherever
    # the padding is. argmax returns the first maximum (True = 1).
    last = T - 1 - padding_mask.flip(1).int().argmax(dim=1)  # (B,)
    return hidden[torch.arange(B, device=hidden.device), last]  # (B, C): row b, position last[b]


def ex02_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    # logsigmoid computes log(sigmoid(d)) without forming sigmoid(d), which is 0 in float32 once d < -104
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def ex03_margin_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin) -> torch.Tensor:
    # margin: a number, or a tensor (B,) that broadcasts against the differences
    return torch.relu(margin - (r_chosen - r_rejected)).mean()


def ex04_pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor, groups: list[str] | None = None):
    correct = (r_chosen > r_rejected).tolist()  # strictly: a tie has not ranked the pair
    if groups is None:
        return sum(correct) / len(correct)
    by_group: dict[str, list[bool]] = {}
    for group, c in zip(groups, correct):
        by_group.setdefault(group, []).append(c)
    return {group: sum(cs) / len(cs) for group, cs in by_group.items()}  # each group over its own pairs


def ex05_length_bias(rewards: torch.Tensor, lengths: torch.Tensor) -> float:
    x = rewards.double() - rewards.double().mean()  # float64: lengths are ints, and float32 sums lose digits
    y = lengths.double() - lengths.double().mean()
    return ((x * y).sum() / (x.pow(2).sum().sqrt() * y.pow(2).sum().sqrt())).item()


def ex06_calibration_ece(predicted: torch.Tensor, outcome: torch.Tensor, n_bins: int = 10) -> float:
    predicted, outcome = predicted.double(), outcome.double()
    # bin b holds b/n <= p < (b+1)/n; p = 1.0 goes to the last bin (clamp), not to an extra one
    which = (predicted * n_bins).floor().long().clamp(0, n_bins - 1)  # (N,)
    ece = 0.0
    for b in range(n_bins):
        inside = which == b
        if inside.any():  # an empty bin has no gap and no weight
            gap = (predicted[inside].mean() - outcome[inside].mean()).abs()
            ece += inside.sum().item() / len(predicted) * gap.item()
    return ece
