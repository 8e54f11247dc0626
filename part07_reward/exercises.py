"""Part 7 exercises: the pieces of a reward model and of the numbers that judge it.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part07_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (a gather written row by row and each sequence
run through the model alone, the loss worked out by hand and in float64 with Python's math module,
torch.nn.functional.margin_ranking_loss, hand-counted accuracies, numpy.corrcoef and statistics.correlation,
a hand-computed calibration error and the chapter's train.calibration). The reference answers are in
solutions.py (try first, then peek).
"""
import torch
import torch.nn.functional as F  # noqa: F401  (F.logsigmoid, F.relu)


def ex01_last_token_pool(hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token: (B, T, C), (B, T) -> (B, C).

    The reward head reads one position per sequence: the last real token, the only one that (in a causal
    model) has seen the whole prompt and the whole response. padding_mask is bool, True for a real token,
    False for padding, and the padding may be on either side:

        right padding  [[T, T, T, F], [T, T, T, T]]  ->  positions [2, 3]
        left padding   [[F, T, T, T], [F, F, F, T]]  ->  positions [3, 3]

    Return hidden[b, last[b]] for every row b, a (B, C) tensor.
    Not hidden[:, -1] (that is padding in a right-padded row), and not padding_mask.sum(1) (a count of
    tokens, one past the last index; and with left padding, the count says nothing about where they end).
    Hint: the last True of a row is the first True of the row flipped (torch.flip); argmax of a 0/1 row
    returns the first 1. Then index with hidden[torch.arange(B), last].
    """
    raise NotImplementedError


def ex02_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The Bradley-Terry loss of B pairs: the mean over pairs of -log sigmoid(r_chosen - r_rejected).

    r_chosen, r_rejected: (B,) rewards of the better and the worse response to the same prompt.
    Bradley & Terry (1952) model P(chosen beats rejected) = sigmoid(r_chosen - r_rejected): the rewards are
    the logits of a pairwise preference, and the loss is the negative log-likelihood of the observed choice.
    Equal rewards give log 2 (a coin flip); a pair ranked the wrong way by d costs about d.
    Return a scalar tensor (0-dim) that gradients flow through.
    Careful: torch.log(torch.sigmoid(d)) is log(0) = -inf once d is below about -104 in float32 (sigmoid
    rounds to 0), and a single such pair makes the loss inf. F.logsigmoid computes the same thing safely.
    """
    raise NotImplementedError


def ex03_margin_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin) -> torch.Tensor:
    """The margin ranking loss of B pairs: the mean over pairs of max(0, margin - (r_chosen - r_rejected)).

    Zero for a pair once chosen leads by at least the margin: pairs already ranked well stop pulling, where
    the Bradley-Terry loss keeps widening every gap. margin: a number, or a tensor (B,), one margin per pair
    (Llama 2's reward model asks for a larger gap when the two responses differ more).

        r_chosen [2.0, 0.5, -1.0], r_rejected [0.0, 0.0, 0.0], margin 1.0  ->  mean(0, 0.5, 2.0) = 0.8333

    Return a scalar tensor that gradients flow through. Hint: torch.relu.
    """
    raise NotImplementedError


def ex04_pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor, groups: list[str] | None = None):
    """The share of pairs the reward model ranks the right way: r_chosen > r_rejected.

    A tie counts as wrong: a reward model that gives every response the same score has ranked nothing, and
    should score 0.0, not 1.0 (so: strictly greater, not >=).
    groups=None: return the accuracy over all pairs, a Python float in [0, 1].
    groups (a list of B labels, e.g. each pair's failure mode): return a dict {label: accuracy over that
    label's pairs}, each a Python float (every group over its own pairs only):

        r_chosen [1, 2, 0, 5], r_rejected [0, 3, 0, 1], groups ["a", "a", "b", "b"]  ->  {"a": 0.5, "b": 0.5}
    """
    raise NotImplementedError


def ex05_length_bias(rewards: torch.Tensor, lengths: torch.Tensor) -> float:
    """Pearson's correlation between rewards (N,) and response lengths (N,) (lengths may be ints): a float
    in [-1, 1].

        r = sum((x - mean x)(y - mean y)) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2)

    A reward model that learned "longer is better" instead of "right is better" shows a large positive r on
    answers that are equally right. The covariance alone is not it: it grows with the units (tokens or
    characters, rewards scaled by 10). Not the rank (Spearman) correlation either. Compute in float64.
    """
    raise NotImplementedError


def ex06_calibration_ece(predicted: torch.Tensor, outcome: torch.Tensor, n_bins: int = 10) -> float:
    """The expected calibration error of predicted probabilities (N,) against outcomes (N,) (0/1 or bool).

    A Bradley-Terry reward model predicts P(a beats b) = sigmoid(r_a - r_b); it is calibrated if, of the
    pairs it gives 0.8, about 80% go its way. Cut [0, 1] into n_bins equal bins: bin b holds the predictions
    with b/n_bins <= p < (b+1)/n_bins, and p = 1.0 goes into the last bin. For each non-empty bin, the gap
    |mean predicted - mean outcome| over its predictions; the ECE is the mean of the gaps weighted by the
    share of the N predictions in each bin (not a plain mean over bins). 0 = perfectly calibrated.

        predicted [0.05, 0.15, 0.15, 0.95, 0.95, 1.0], outcome [0, 0, 1, 1, 1, 0]
        bins 0, 1, 9: gaps 0.05, 0.35, 0.3 with 1, 2, 3 of the 6  ->  (0.05 + 0.7 + 0.9) / 6 = 0.275

    Return a Python float.
    """
    raise NotImplementedError
