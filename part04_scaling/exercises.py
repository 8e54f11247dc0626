"""Part 4 exercises: a BPE tokenizer and the machinery of real training runs, one function each.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part04_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Every check compares your function with an independent reference (Python's str.replace, bpe.train_naive,
the schedule formula, one big batch, an uninterrupted run, a direct formula). The reference answers are
in solutions.py (try first, then peek); bpe.py and train.py have the same ideas in the real code.
"""
import math  # noqa: F401  (you will want math.cos and math.pi)

import regex  # noqa: F401  (like `re`, but it knows \p{L}; you will want regex.findall)
import torch

from part04_scaling.bpe import GPT4_SPLIT_PATTERN  # noqa: F401  (the chunking regex, for ex03)


def ex01_get_stats(ids: list[int]) -> dict[tuple[int, int], int]:
    """Count every pair of adjacent ids: BPE's question "which pair is the most frequent?".

    Return {(a, b): how often b directly follows a}. Every position counts, overlapping ones too:
        [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}
        [7, 7, 7]       -> {(7, 7): 2}        (positions 0-1 and 1-2)
    A list of 0 or 1 ids has no pairs: {}.

    Hint: zip(ids, ids[1:]) walks the adjacent pairs.
    """
    raise NotImplementedError


def ex02_merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in ids by the single id new_id: one BPE merge.

    Scan left to right; after a replacement, continue *after* the pair (its ids are used up):
        merge([1, 2, 3, 1, 2], (1, 2), 256) -> [256, 3, 256]
        merge([7, 7, 7], (7, 7), 9)         -> [9, 7]           (not [9, 9]: the middle 7 is used once)
    Return a new list; do not change ids.

    Hint: a while loop with an index i that steps by 2 after a match and by 1 otherwise.
    """
    raise NotImplementedError


def ex03_train_bpe(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Train byte-level BPE the textbook way (Sennrich et al. 2016); return the n_merges merges in order.

    1. Cut the text into chunks with GPT-4's regex: regex.findall(GPT4_SPLIT_PATTERN, text). Merges never
       cross a chunk boundary, so " dog" is one token whether "." or "!" follows.
    2. Each chunk becomes the list of its UTF-8 bytes: list(chunk.encode("utf-8")), ids 0..255.
    3. Repeat n_merges times: count the pairs of all chunks together (ex01), pick the most frequent pair -
       on a tie the smallest pair, compared as tuples ((3, 9) < (4, 1) < (4, 2)) - give it the next free
       id (256, 257, ...), and merge it in every chunk (ex02). Stop early if no pair is left.
    Return the list of merged pairs [(a, b), ...]; merge i made token 256 + i.

    Hints: recount after every merge (a merge changes its neighbours' pairs); min(counts, key=lambda p:
    (-counts[p], p)) is "most frequent, then smallest". You may call your ex01 and ex02.
    """
    raise NotImplementedError


def ex04_lr_warmup_cosine(it: int, warmup_iters: int, decay_iters: int, lr: float, min_lr: float) -> float:
    """The learning rate of step `it` (0-based): a linear warmup, then half a cosine down to min_lr.

        it < warmup_iters:  lr * (it + 1) / warmup_iters   (step 0 gets lr / warmup_iters, not 0;
                                                             step warmup_iters - 1 gets the full lr)
        it >= decay_iters:  min_lr
        otherwise:          progress = (it - warmup_iters) / (decay_iters - warmup_iters)   (0 -> 1)
                            min_lr + 0.5 * (1 + cos(pi * progress)) * (lr - min_lr)
    The cosine starts at the end of the warmup (not at step 0) and ends exactly at min_lr at
    decay_iters (Loshchilov & Hutter 2016; the warmup: Goyal et al. 2017). warmup_iters may be 0.
    Return a float.
    """
    raise NotImplementedError


def ex05_accumulate_gradients(model: torch.nn.Module, micro_batches: list) -> float:
    """Gradient accumulation: k micro-batches give the gradient of one k-times bigger batch.

    micro_batches: [(x, y), ...], k pairs of (B, T) token tensors, all of the same shape.
    model(x, y) returns (logits, loss), loss being the mean over that micro-batch's tokens.
    Leave in each parameter's .grad the gradient of the loss of all k micro-batches as one batch
    (the .grad start out as None), and return that loss as a float. Do not step an optimizer.

    Hints: .backward() adds to .grad; the big batch's loss is the mean of the k micro-batch losses,
    so backpropagate loss / k for each. Keep the memory of one micro-batch: backward each one before
    the next forward. Return the mean of all k losses, not the last one.
    """
    raise NotImplementedError


def ex06_resume(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> int:
    """Restore a training run from a checkpoint, so that it continues exactly as if never stopped.

    checkpoint is what train.py saves (read back with torch.load(..., weights_only=True)):
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": the next step,
         "rng": {"torch": torch.get_rng_state(),      # the global generator: dropout
                 "batches": generator.get_state()}}   # the batch generator: which windows come next
    model, optimizer and generator are freshly made (new random weights, empty optimizer state, the
    generator seeded as at the start of the run). Put every piece of the saved state back and return
    the step the training loop should do next.

    Hints: load_state_dict for the model and the optimizer (AdamW's moment estimates live there: without
    them the first resumed steps are far too big); generator.set_state; torch.set_rng_state.
    """
    raise NotImplementedError


def ex07_int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a weight matrix, one scale per output channel (per row).

    w: (out_features, in_features), as nn.Linear stores it. For each row r:
        scale[r] = max_j |w[r, j]| / 127
        q[r, j]  = round(w[r, j] / scale[r])          (nearest integer, in -127..127)
    so q * scale approximates w with an error of at most scale / 2 per entry, and the largest entry
    of each row maps to +-127. One scale per row keeps a row of small weights precise even when
    another row has big ones (one scale for the whole matrix would flatten the small row to 0).
    Return (q as torch.int8 of w's shape, scale as float32 of shape (out_features,)), as quantize.py does.
    A row of zeros: q = 0 and any finite scale; do not divide by zero (clamp the max to >= 1e-12).

    Hints: w.abs().amax(dim=1, keepdim=True); torch.round rounds to the nearest integer, whereas
    .to(torch.int8) truncates toward zero.
    """
    raise NotImplementedError
