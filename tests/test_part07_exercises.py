"""Part 7 exercises: each check compares against an outside reference and rejects plausible slips."""
import math
import statistics

import numpy as np
import torch
from torch.nn import functional as F

from part07_reward import exercises, solutions
from part07_reward.model import GPT, GPTConfig
from part07_reward.train import calibration
from tests.harness import Exercise, exercise_tests


def _mask(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --- ex01: the last real token ----------------------------------------------------------------------------


def gather_by_hand(hidden, padding_mask):
    """Row by row: the largest position whose mask is True."""
    rows = []
    for b in range(hidden.size(0)):
        last = max(t for t in range(padding_mask.size(1)) if padding_mask[b, t])
        rows.append(hidden[b, last])
    return torch.stack(rows)


POOL_CASES = [  # (what, padding_mask, the last real position of each row, written out by hand)
    ("right padding", [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], [2, 3, 0]),
    ("left padding", [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]], [4, 4, 4]),
    ("right padding, one row without padding", [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], [4, 1, 3]),
    ("no padding", [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [4, 4, 4]),
]


def _picked_position(hidden_row, row) -> str:
    """Which position of hidden_row (T, C) the answer row (C,) is, to say so in a message."""
    for t in range(hidden_row.size(0)):
        if torch.equal(hidden_row[t], row):
            return f"position {t}"
    return "no single position (a mix of several?)"


def check_ex01_last_token_pool(fn):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)  # (B, T, C)
    for what, rows, positions in POOL_CASES:
        mask = _mask(rows)
        got = fn(hidden.clone(), mask.clone())
        assert torch.is_tensor(got) and tuple(got.shape) == (3, 4), (
            f"{what}: expected a (B, C) = (3, 4) tensor, got {tuple(got.shape) if torch.is_tensor(got) else got!r}")
        want = gather_by_hand(hidden, mask)
        assert torch.equal(want, torch.stack([hidden[b, t] for b, t in enumerate(positions)]))  # the test itself
        for b, t in enumerate(positions):
            assert torch.equal(got[b], want[b]), (
                f"{what}, padding_mask {rows}: row {b} should be hidden[{b}, {t}] (its last real token), "
                f"your answer is {_picked_position(hidden[b], got[b])}")
    # In a model: the pooled state of each padded row equals the last hidden state of its sequence run alone
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21]]
    T, pad = max(len(s) for s in sequences), 0
    with torch.no_grad():
        alone = torch.stack([model.hidden_states(torch.tensor([s]))[0, -1] for s in sequences])  # (4, 16)
        for side in ("right", "left"):
            rows = [s + [pad] * (T - len(s)) if side == "right" else [pad] * (T - len(s)) + s for s in sequences]
            real = [[True] * len(s) + [False] * (T - len(s)) if side == "right" else
                    [False] * (T - len(s)) + [True] * len(s) for s in sequences]
            ids, mask = torch.tensor(rows), _mask(real)
            pooled = fn(model.hidden_states(ids, padding_mask=mask), mask)
            assert torch.allclose(pooled, alone, atol=1e-5), (
                f"{side} padding: the pooled hidden states differ from the last hidden state of each sequence run "
                f"alone, by up to {(pooled - alone).abs().amax(dim=-1).tolist()} per row")


def _rows(hidden, index):
    return hidden[torch.arange(hidden.size(0)), index]


def _pool_last_column(hidden, padding_mask):  # right padding: that is a padding token
    return hidden[:, -1]


def _pool_at_count(hidden, padding_mask):  # the number of real tokens is one past the last index
    return _rows(hidden, padding_mask.sum(dim=1))


def _pool_count_minus_one(hidden, padding_mask):  # right for right padding only
    return _rows(hidden, padding_mask.sum(dim=1) - 1)


def _pool_first_real(hidden, padding_mask):  # argmax without the flip: the first real token
    return _rows(hidden, padding_mask.int().argmax(dim=1))


def _pool_unflipped_from_end(hidden, padding_mask):  # T - 1 - argmax, but of the row not flipped
    return _rows(hidden, hidden.size(1) - 1 - padding_mask.int().argmax(dim=1))


def _pool_mean(hidden, padding_mask):  # mean pooling: another head, not this chapter's
    weights = padding_mask.unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


# --- ex02: the Bradley-Terry loss ----------------------------------------------------------------------------


def neg_log_sigmoid(d: float) -> float:
    """-log sigmoid(d) = log(1 + e^-d), in float64 without overflow: for d < 0 it is -d + log(1 + e^d)."""
    return math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))


def check_ex02_bradley_terry_loss(fn):
    loss = fn(torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.is_tensor(loss), f"return a tensor (the training loop calls .backward() on it), got {loss!r}"
    assert loss.dim() == 0, f"return a scalar (0-dim) tensor, the mean over pairs; got shape {tuple(loss.shape)}"
    assert abs(loss.item() - math.log(2)) < 1e-6, (
        f"equal rewards: P(chosen wins) = 1/2, so the loss is log 2 = {math.log(2):.6f}; got {loss.item():.6f}")
    loss = fn(torch.tensor([3.0, -1.0]), torch.tensor([3.0, -1.0])).item()
    assert abs(loss - math.log(2)) < 1e-6, f"two pairs of equal rewards: still log 2 (the mean), got {loss:.6f}"
    loss = fn(torch.tensor([1.0]), torch.tensor([0.0])).item()
    want = math.log(1 + math.exp(-1))
    assert abs(loss - want) < 1e-6, (
        f"chosen ahead by 1: -log sigmoid(1) = log(1 + e^-1) = {want:.6f}, got {loss:.6f} (is the sign right?)")
    loss = fn(torch.tensor([-200.0]), torch.tensor([0.0])).item()
    assert math.isfinite(loss), (
        f"chosen behind by 200: the loss is {loss}, not finite. torch.log(torch.sigmoid(d)) is log(0) in float32 "
        "here; use F.logsigmoid")
    assert abs(loss - 200.0) < 1e-3, f"chosen behind by 200: the loss is log(1 + e^200) = 200.0, got {loss}"
    # A batch, against the float64 formula, with gradients
    differences = [2.0, -1.0, 0.5, -200.0, 30.0, -30.0, 0.0, 7.25]
    r_rejected = torch.linspace(-2, 2, len(differences))
    r_chosen = (r_rejected + torch.tensor(differences)).requires_grad_()
    loss = fn(r_chosen, r_rejected)
    chosen_values, rejected_values = r_chosen.tolist(), r_rejected.tolist()
    real_differences = [c - r for c, r in zip(chosen_values, rejected_values)]  # float32 rounding of the sums
    want = sum(neg_log_sigmoid(d) for d in real_differences) / len(differences)
    assert abs(loss.item() - want) < 1e-5 * max(1.0, want), (
        f"rewards {chosen_values} vs {rejected_values}: loss {loss.item():.6f}, the float64 formula gives "
        f"{want:.6f} (the mean over pairs of -log sigmoid(r_chosen - r_rejected))")
    loss.backward()
    want_grad = [-1 / (1 + math.exp(d)) / len(differences) for d in real_differences]  # d/dr_c = -sigmoid(-d) / B
    assert r_chosen.grad is not None, "no gradient reached r_chosen: keep the computation in torch"
    assert torch.allclose(r_chosen.grad, torch.tensor(want_grad), atol=1e-6), (
        f"the gradient with respect to r_chosen is {r_chosen.grad.tolist()}, expected -sigmoid(r_rejected - "
        f"r_chosen) / B = {want_grad}")


def _bt_sign_flipped(r_chosen, r_rejected):  # prefers the rejected response
    return -F.logsigmoid(r_rejected - r_chosen).mean()


def _bt_sum(r_chosen, r_rejected):  # the loss grows with the batch size, and so does the step
    return -F.logsigmoid(r_chosen - r_rejected).sum()


def _bt_log_of_sigmoid(r_chosen, r_rejected):  # log(0) = -inf once the difference is below about -104
    return -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()


def _bt_log_of_sigmoid_eps(r_chosen, r_rejected):  # finite, but capped at -log(1e-8) = 18.4
    return -torch.log(torch.sigmoid(r_chosen - r_rejected) + 1e-8).mean()


def _bt_without_log(r_chosen, r_rejected):  # 1 - P(chosen wins): a loss, but not the likelihood
    return (1 - torch.sigmoid(r_chosen - r_rejected)).mean()


def _bt_as_float(r_chosen, r_rejected):  # a number, not a tensor: nothing to call .backward() on
    return -F.logsigmoid(r_chosen - r_rejected).mean().item()


# --- ex03: the margin ranking loss --------------------------------------------------------------------------


def check_ex03_margin_ranking_loss(fn):
    loss = fn(torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0, 0.0, 0.0]), 1.0)
    assert torch.is_tensor(loss) and loss.dim() == 0, f"return a scalar (0-dim) tensor, got {loss!r}"
    assert abs(loss.item() - 2.5 / 3) < 1e-6, (
        f"r_chosen [2, 0.5, -1], r_rejected [0, 0, 0], margin 1: the pairs cost 0, 0.5 and 2, mean 0.8333; "
        f"got {loss.item():.4f}")
    g = torch.Generator().manual_seed(0)
    r_chosen, r_rejected = torch.randn(40, generator=g) * 2, torch.randn(40, generator=g) * 2
    target = torch.ones(40)  # +1: the first input should rank higher
    for margin in (0.0, 1.0, 2.5):
        c, r = r_chosen.clone().requires_grad_(), r_rejected.clone().requires_grad_()
        loss = fn(c, r, margin)
        c_ref, r_ref = r_chosen.clone().requires_grad_(), r_rejected.clone().requires_grad_()
        want = F.margin_ranking_loss(c_ref, r_ref, target, margin=margin)
        assert abs(loss.item() - want.item()) < 1e-6, (
            f"margin {margin}: loss {loss.item():.6f}, F.margin_ranking_loss gives {want.item():.6f}")
        loss.backward()
        want.backward()
        assert c.grad is not None and torch.allclose(c.grad, c_ref.grad, atol=1e-7), (
            f"margin {margin}: the gradient with respect to r_chosen differs from F.margin_ranking_loss's")
    # One margin per pair: each pair against F.margin_ranking_loss with its own margin, then the mean
    margins = torch.rand(40, generator=g) * 3
    loss = fn(r_chosen, r_rejected, margins)
    want = sum(F.margin_ranking_loss(r_chosen[i : i + 1], r_rejected[i : i + 1], target[i : i + 1],
                                     margin=float(margins[i])).item() for i in range(40)) / 40
    assert torch.is_tensor(loss) and loss.dim() == 0, f"a tensor margin (B,): still a scalar loss, got {loss!r}"
    assert abs(loss.item() - want) < 1e-5, (
        f"one margin per pair: loss {loss.item():.6f}, expected {want:.6f} (the mean of each pair's "
        "max(0, margin_i - (r_chosen_i - r_rejected_i)))")


def _margin_without_relu(r_chosen, r_rejected, margin):  # pairs far ahead pay negative loss: gaps grow forever
    return (margin - (r_chosen - r_rejected)).mean()


def _margin_sign_flipped(r_chosen, r_rejected, margin):  # asks the rejected response to lead
    return torch.relu(margin + (r_chosen - r_rejected)).mean()


def _margin_ignored(r_chosen, r_rejected, margin):  # margin 0 always: a tie costs nothing
    return torch.relu(r_rejected - r_chosen).mean()


def _margin_sum(r_chosen, r_rejected, margin):
    return torch.relu(margin - (r_chosen - r_rejected)).sum()


def _margin_averaged(r_chosen, r_rejected, margin):  # one margin for all: the mean of the per-pair margins
    margin = margin.mean() if torch.is_tensor(margin) else margin
    return torch.relu(margin - (r_chosen - r_rejected)).mean()


# --- ex04: pairwise accuracy ------------------------------------------------------------------------------


def check_ex04_pairwise_accuracy(fn):
    got = fn(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 0.0, 1.0]))
    assert isinstance(got, float), f"return a Python float (e.g. sum(...) / n or .item()), got {got!r}"
    assert abs(got - 0.5) < 1e-6, (
        f"r_chosen [1, 2, 0, 5], r_rejected [0, 3, 0, 1]: right, wrong, tie, right -> 2 of 4 = 0.5 (a tie is "
        f"wrong), got {got}")
    got = fn(torch.zeros(6), torch.zeros(6))
    assert got == 0.0, f"every reward equal: nothing is ranked, accuracy 0.0 (ties count as wrong), got {got}"
    g = torch.Generator().manual_seed(0)
    r_chosen = torch.randint(0, 4, (101,), generator=g).float()  # small integers: many ties
    r_rejected = torch.randint(0, 4, (101,), generator=g).float()
    right = sum(1 for c, r in zip(r_chosen.tolist(), r_rejected.tolist()) if c > r)
    got = fn(r_chosen, r_rejected)
    assert abs(got - right / 101) < 1e-6, f"101 pairs, {right} ranked right (counted by hand): {right / 101}, got {got}"
    # By group: each group's accuracy over its own pairs
    got = fn(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 0.0, 1.0]), ["a", "a", "b", "b"])
    assert isinstance(got, dict), f"with groups, return a dict {{group: accuracy}}, got {got!r}"
    assert got == {"a": 0.5, "b": 0.5}, f"groups a a b b: expected {{'a': 0.5, 'b': 0.5}}, got {got}"
    groups = ["wrong_answer", "truncated", "wrong_answer", "off_topic", "wrong_answer", "truncated", "wrong_answer"]
    r_chosen = torch.tensor([1.0, 0.2, 3.0, 2.0, -1.0, 0.7, 4.0])
    r_rejected = torch.tensor([0.0, 0.5, 3.0, 1.0, -2.0, 0.1, 4.5])
    want = {"wrong_answer": 2 / 4, "truncated": 1 / 2, "off_topic": 1.0}  # by hand: (1>0, 3=3, -1>-2, 4<4.5), ...
    got = fn(r_chosen, r_rejected, groups)
    assert isinstance(got, dict) and set(got) == set(want), f"expected the groups {sorted(want)}, got {got!r}"
    for group, accuracy in want.items():
        assert isinstance(got[group], float), f"group {group}: return Python floats, got {got[group]!r}"
        assert abs(got[group] - accuracy) < 1e-6, (
            f"group {group}: {accuracy:.4f} (its right pairs over its own pairs), got {got[group]}")


def _accuracy(correct, groups):
    if groups is None:
        return sum(correct) / len(correct)
    return {g: sum(c for c, h in zip(correct, groups) if h == g) / sum(1 for h in groups if h == g)
            for g in dict.fromkeys(groups)}


def _accuracy_ties_right(r_chosen, r_rejected, groups=None):  # >=: a constant reward model scores 1.0
    return _accuracy((r_chosen >= r_rejected).tolist(), groups)


def _accuracy_sign_flipped(r_chosen, r_rejected, groups=None):
    return _accuracy((r_chosen < r_rejected).tolist(), groups)


def _accuracy_count(r_chosen, r_rejected, groups=None):  # the number of right pairs, not the share
    correct = (r_chosen > r_rejected).tolist()
    if groups is None:
        return float(sum(correct))
    return {g: float(sum(c for c, h in zip(correct, groups) if h == g)) for g in dict.fromkeys(groups)}


def _accuracy_global_denominator(r_chosen, r_rejected, groups=None):  # a group's right pairs over all pairs
    correct = (r_chosen > r_rejected).tolist()
    if groups is None:
        return sum(correct) / len(correct)
    return {g: sum(c for c, h in zip(correct, groups) if h == g) / len(correct) for g in dict.fromkeys(groups)}


def _accuracy_ignores_groups(r_chosen, r_rejected, groups=None):
    return (r_chosen > r_rejected).float().mean().item()


def _accuracy_tensor(r_chosen, r_rejected, groups=None):  # a 0-dim tensor, not a float
    return (r_chosen > r_rejected).float().mean()


# --- ex05: length bias --------------------------------------------------------------------------------------


def check_ex05_length_bias(fn):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (60,), generator=g)  # ints, as token counts are
    rewards = 0.05 * lengths + torch.randn(60, generator=g)  # float32, a weak length bias
    got = fn(rewards, lengths)
    assert isinstance(got, float), f"return a Python float, got {got!r}"
    x, y = rewards.double().numpy(), lengths.double().numpy()
    want = float(np.corrcoef(x, y)[0, 1])
    assert abs(got - want) < 1e-5, f"numpy.corrcoef gives r = {want:.6f}, you got {got:.6f}"
    want = statistics.correlation(x.tolist(), y.tolist())
    assert abs(got - want) < 1e-5, f"statistics.correlation gives r = {want:.6f}, you got {got:.6f}"
    scaled = fn(10 * rewards + 3, lengths)
    assert abs(scaled - got) < 1e-5, (
        f"rewards x 10 + 3: the correlation should not change (it has no units), but it went {got:.4f} -> {scaled:.4f}")
    flipped = fn(-rewards, lengths)
    assert abs(flipped + got) < 1e-5, f"rewards negated: r should change sign, {got:.4f} -> {flipped:.4f}"
    # Monotone but not linear: the ranks agree perfectly (Spearman 1), the values do not lie on a line
    lengths = torch.arange(1, 21)
    rewards = torch.exp(lengths / 3.0)
    want = float(np.corrcoef(rewards.double().numpy(), lengths.double().numpy())[0, 1])
    got = fn(rewards, lengths)
    assert abs(got - want) < 1e-5, (
        f"rewards exp(length / 3): Pearson's r is {want:.4f} (the ranks agree perfectly, the values are not on a "
        f"line); got {got:.4f}")


def _centred(rewards, lengths):
    x, y = rewards.double(), lengths.double()
    return x - x.mean(), y - y.mean()


def _length_covariance(rewards, lengths):  # the covariance: it has units, and no bound
    x, y = _centred(rewards, lengths)
    return (x * y).mean().item()


def _length_spearman(rewards, lengths):  # the ranks' correlation
    def ranks(v):
        return v.double().argsort().argsort().double()

    return solutions.ex05_length_bias(ranks(rewards), ranks(lengths))


def _length_mixed_ddof(rewards, lengths):  # covariance over n - 1, standard deviations over n
    x, y = _centred(rewards, lengths)
    n = len(x)
    return ((x * y).sum() / (n - 1) / (x.pow(2).mean().sqrt() * y.pow(2).mean().sqrt())).item()


def _length_r_squared(rewards, lengths):  # r^2 loses the sign: a bias towards short answers looks like one to long
    return solutions.ex05_length_bias(rewards, lengths) ** 2


# --- ex06: calibration ---------------------------------------------------------------------------------------


ECE_CASES = [  # (predicted, outcome, n_bins, the ECE worked out by hand)
    # bins 0, 1, 9: means 0.05, 0.15, 0.9667 against 0, 0.5, 0.6667: gaps 0.05, 0.35, 0.3 over 1, 2, 3 of 6
    ([0.05, 0.15, 0.15, 0.95, 0.95, 1.0], [0, 0, 1, 1, 1, 0], 10, (0.05 * 1 + 0.35 * 2 + 0.3 * 3) / 6),
    # 5 bins: 0.05, 0.15, 0.15 share bin 0 (mean 0.11667 vs 1/3), the rest bin 4 (gap 0.3)
    ([0.05, 0.15, 0.15, 0.95, 0.95, 1.0], [0, 0, 1, 1, 1, 0], 5, (abs(0.35 / 3 - 1 / 3) * 3 + 0.3 * 3) / 6),
    # p = 0, 0.5 and 1 land in bins 0, 5 and 9; the last one is wrong with certainty: a gap of 1
    ([0.0, 0.5, 1.0], [0, 1, 0], 10, (0.0 + 0.5 + 1.0) / 3),
    ([0.3, 0.3, 0.3, 0.3], [1, 0, 0, 1], 10, 0.2),  # one bin: |0.3 - 0.5|
]


def check_ex06_calibration_ece(fn):
    for predicted, outcome, n_bins, want in ECE_CASES:
        for outcome_tensor in (torch.tensor(outcome, dtype=torch.float), torch.tensor(outcome, dtype=torch.bool)):
            got = fn(torch.tensor(predicted), outcome_tensor, n_bins)
            assert isinstance(got, float), f"return a Python float, got {got!r}"
            assert abs(got - want) < 1e-6, (
                f"predicted {predicted}, outcome {outcome}, {n_bins} bins: the ECE worked out by hand is {want:.4f}, "
                f"got {got:.4f} ({outcome_tensor.dtype} outcomes)")
    default = fn(torch.tensor([0.05, 0.15, 0.15, 0.95, 0.95, 1.0]), torch.tensor([0, 0, 1, 1, 1, 0.0]))
    assert abs(default - 0.275) < 1e-6, f"without n_bins: the default is 10 bins (ECE 0.275), got {default}"
    # The chapter's train.calibration, on reward differences: it shows each pair in a random order (a, b) and
    # predicts sigmoid(r_a - r_b); the same random order is drawn here to give your function the same inputs
    margins = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 2 + 1
    flip = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.5
    predicted = torch.sigmoid(torch.where(flip, -margins, margins))
    _, want = calibration(margins, n_bins=10, seed=0)
    got = fn(predicted, ~flip, 10)
    assert abs(got - want) < 1e-5, f"500 reward differences: train.calibration's ECE is {want:.5f}, got {got:.5f}"


def _ece_bins(predicted, outcome, n_bins, last_bin_closed=True):
    predicted, outcome = predicted.double(), outcome.double()
    which = (predicted * n_bins).floor().long()
    if last_bin_closed:
        which = which.clamp(max=n_bins - 1)
    return [(predicted[which == b], outcome[which == b]) for b in range(n_bins) if (which == b).any()]


def _ece_unweighted(predicted, outcome, n_bins=10):  # a bin of 1 counts as much as a bin of 1,000
    gaps = [(p.mean() - o.mean()).abs().item() for p, o in _ece_bins(predicted, outcome, n_bins)]
    return sum(gaps) / len(gaps)


def _ece_signed(predicted, outcome, n_bins=10):  # over- and under-confidence cancel
    return abs(sum(len(p) / len(predicted) * (p.mean() - o.mean()).item()
                   for p, o in _ece_bins(predicted, outcome, n_bins)))


def _ece_drops_one(predicted, outcome, n_bins=10):  # p = 1.0 falls into bin n_bins, which is never visited
    return sum(len(p) / len(predicted) * (p.mean() - o.mean()).abs().item()
               for p, o in _ece_bins(predicted, outcome, n_bins, last_bin_closed=False) if len(p))


def _ece_no_bins(predicted, outcome, n_bins=10):  # the overall gap: mean predicted vs base rate
    return (predicted.double().mean() - outcome.double().mean()).abs().item()


CASES = [
    Exercise("ex01_last_token_pool", check_ex01_last_token_pool, wrong=[
        _pool_last_column, _pool_at_count, _pool_count_minus_one, _pool_first_real, _pool_unflipped_from_end,
        _pool_mean]),
    Exercise("ex02_bradley_terry_loss", check_ex02_bradley_terry_loss, wrong=[
        _bt_sign_flipped, _bt_sum, _bt_log_of_sigmoid, _bt_log_of_sigmoid_eps, _bt_without_log, _bt_as_float]),
    Exercise("ex03_margin_ranking_loss", check_ex03_margin_ranking_loss, wrong=[
        _margin_without_relu, _margin_sign_flipped, _margin_ignored, _margin_sum, _margin_averaged]),
    Exercise("ex04_pairwise_accuracy", check_ex04_pairwise_accuracy, wrong=[
        _accuracy_ties_right, _accuracy_sign_flipped, _accuracy_count, _accuracy_global_denominator,
        _accuracy_ignores_groups, _accuracy_tensor]),
    Exercise("ex05_length_bias", check_ex05_length_bias, wrong=[
        _length_covariance, _length_spearman, _length_mixed_ddof, _length_r_squared]),
    Exercise("ex06_calibration_ece", check_ex06_calibration_ece, wrong=[
        _ece_unweighted, _ece_signed, _ece_drops_one, _ece_no_bins]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
