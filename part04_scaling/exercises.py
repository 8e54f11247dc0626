"""Part 4 exercises: a BPE tokenizer and the machinery of real training runs.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part04_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (bpe.train_naive, tiktoken's Rust encoder,
the schedule formula, one big batch, an uninterrupted run, a float64 formula); ex07 is an experiment
whose result must land in the range the reference measured. The reference answers are in solutions.py
(try first, then peek).
"""
import math  # noqa: F401  (you will want math.cos and math.pi)

import regex  # noqa: F401  (like `re`, but it knows \p{L}; GPT-4's pattern needs it)
import torch

from part04_scaling.bpe import GPT4_SPLIT_PATTERN  # noqa: F401  (the chunking regex, for ex01 and ex02)


def ex01_train_bpe(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Train byte-level BPE the textbook way (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909);
    return the n_merges merges in order.

    1. Cut the text into chunks with GPT-4's regex, regex.findall(GPT4_SPLIT_PATTERN, text). Merges never
       cross a chunk boundary, so " dog" is one token whether "." or "!" follows.
    2. Each chunk becomes the list of its UTF-8 bytes, ids 0..255.
    3. Repeat n_merges times: count every pair of adjacent ids in all chunks together (overlapping
       occurrences count: [7, 7, 7] holds (7, 7) twice); pick the most frequent pair - on a tie the
       smallest pair, compared as tuples ((3, 9) < (4, 1) < (4, 2)); give it the next free id (256,
       257, ...); replace it in every chunk, left to right (a merged id is used once: merging (7, 7) in
       [7, 7, 7] gives [new, 7]). Stop early if no pair is left.
    Return the list of merged pairs [(a, b), ...]; merge i made token 256 + i. The check compares with
    part04's bpe.train_naive on a few texts.
    """
    raise NotImplementedError


def ex02_bpe_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Encode text with a BPE vocabulary so that tiktoken would give the very same ids.

    The vocabulary: ids 0..255 are the bytes, id 256 + i the token made by merges[i] = (a, b), whose bytes
    are token a's bytes followed by token b's. tiktoken describes the same vocabulary as
        tiktoken.Encoding("mine", pat_str=GPT4_SPLIT_PATTERN, special_tokens={},
                          mergeable_ranks={bytes of token i: i for every id i})
    and its encode_ordinary(text) is the reference: the check compares your ids with it, on merges
    trained on Shakespeare and on hand-made merge lists that set a trap or two.

    Find out how tiktoken encodes one chunk (_byte_pair_merge in its src/lib.rs) rather than assume it
    replays the merges in order: the same merge list can be read in two ways, and only one is tiktoken's.
    """
    raise NotImplementedError


def ex03_lr_warmup_cosine(it: int, warmup_iters: int, decay_iters: int, lr: float, min_lr: float) -> float:
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


def ex04_accumulate_gradients(model: torch.nn.Module, micro_batches: list) -> float:
    """Gradient accumulation: k micro-batches give the gradient of one k-times bigger batch.

    micro_batches: [(x, y), ...], k pairs of (B, T) token tensors, all of the same shape.
    model(x, y) returns (logits, loss), loss being the mean over that micro-batch's tokens.
    Leave in each parameter's .grad the gradient of the loss of all k micro-batches as one batch
    (the .grad start out as None), and return that loss as a float. Do not step an optimizer.
    Keep the memory of one micro-batch: at most one micro-batch's graph may be alive at a time.
    """
    raise NotImplementedError


def ex05_resume(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> int:
    """Restore a training run from a checkpoint, so that it continues exactly as if never stopped.

    checkpoint is what train.py saves (read back with torch.load(..., weights_only=True)):
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": the next step,
         "rng": {"torch": torch.get_rng_state(),      # the global generator: dropout
                 "batches": generator.get_state()}}   # the batch generator: which windows come next
    model, optimizer and generator are freshly made (new random weights, empty optimizer state, the
    generator seeded as at the start of the run). Put every piece of the saved state back and return
    the step the training loop should do next. The check trains on from there and compares, bit for
    bit, with a run that was never interrupted.
    """
    raise NotImplementedError


def ex06_int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of a weight matrix, one scale per output channel (per row).

    w: (out_features, in_features), as nn.Linear stores it. For each row r:
        scale[r] = max_j |w[r, j]| / 127
        q[r, j]  = round(w[r, j] / scale[r])          (nearest integer, in -127..127)
    so q * scale approximates w with an error of at most scale / 2 per entry, and the largest entry
    of each row maps to +-127. One scale per row keeps a row of small weights precise even when
    another row has big ones (one scale for the whole matrix would flatten the small row to 0).
    Return (q as torch.int8 of w's shape, scale as float32 of shape (out_features,)), as quantize.py does.
    A row of zeros: q = 0 and any finite scale (no division by zero).
    """
    raise NotImplementedError


def ex07_bpe_bytes_per_token(train_text: str, val_text: str, vocab_size: int) -> float:
    """Experiment: how much does a bigger vocabulary compress?

    Train a BPE tokenizer with vocab_size ids (256 bytes + vocab_size - 256 merges, no special tokens)
    on train_text, encode val_text with it and return how many UTF-8 bytes of val_text one token covers
    on average. The test passes 200,000 characters of the Shakespeare training split and the whole
    validation split (about 0.5 MB), with vocab_size 512 and 2048. Use part04_scaling.bpe's train and
    Tokenizer (seconds) or your ex01 and ex02 (minutes, in pure Python).

    Then try 256, 512, 1024, ..., 8192: what does each doubling of the vocabulary buy? (GPT-2's 50,257
    tokens cover about 4 bytes of English web text each; the embedding table and the softmax grow
    with the vocabulary, which is why part 4 stops at 2,048.)
    """
    raise NotImplementedError
