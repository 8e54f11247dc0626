"""Part 2 exercises: the pieces of a training loop and of sampling, one function each.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part02_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
The reference answers are in solutions.py (try first, then peek).
"""
import torch
import torch.nn as nn
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_utf8_encode(text: str) -> list[int]:
    """Encode `text` as UTF-8 bytes by hand (do not call str.encode): the byte tokenizer's input.

    Each character's code point cp = ord(ch) becomes 1 to 4 bytes:
        cp < 0x80      0xxxxxxx                             (ASCII: one byte, the code point itself)
        cp < 0x800     110xxxxx 10xxxxxx
        cp < 0x10000   1110xxxx 10xxxxxx 10xxxxxx
        otherwise      11110xxx 10xxxxxx 10xxxxxx 10xxxxxx
    The x's are the bits of cp, most significant first. Example: "é" (cp 0xE9) -> [0xC3, 0xA9].

    Hints: `cp >> 6` drops the low 6 bits; `cp & 0x3F` keeps them; `0xC0 | bits` sets the prefix.
    Returns a list of ints in 0..255.
    """
    raise NotImplementedError


def ex02_get_batch(data: torch.Tensor, starts: torch.Tensor, block_size: int):
    """Cut next-token training pairs out of a 1-D token stream.

    data: (N,) token ids. starts: (B,) window start positions (train.py draws them at random).
    Return (x, y), each (B, block_size):
        x[b] = data[starts[b] : starts[b] + block_size]
        y[b] = the tokens that follow each x token, i.e. x shifted left by one.

    Hint: build a (B, block_size) tensor of positions with broadcasting, then index data with it.
    """
    raise NotImplementedError


def ex03_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The language-model loss by hand: mean negative log-probability of the target tokens.

    logits: (B, T, V) raw scores; targets: (B, T) token ids, where -1 marks a position to ignore
    (it counts neither in the sum nor in the number we divide by). Return a scalar tensor equal to
    F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1) - without calling it.

    Hints: F.log_softmax over the vocabulary axis; `.gather` picks each row's target entry.
    """
    raise NotImplementedError


def ex04_temperature_top_k(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The sampling distribution after temperature and top-k.

    logits: (B, V). Divide the logits by temperature (> 0), keep only the top_k largest logits in
    each row (None = keep all; ties with the k-th largest may stay), and return the probabilities
    (B, V) the sampler draws from: zero outside the kept tokens, each row summing to 1.

    Hints: torch.topk(...).values[:, -1:] is each row's k-th largest; masked_fill with -inf, then softmax.
    """
    raise NotImplementedError


def ex05_top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) sampling's cut (Holtzman et al. 2019): which tokens survive?

    probs: (B, V), rows summing to 1, in vocabulary order (not sorted). Keep the smallest set of the
    most likely tokens whose total probability reaches top_p (>= top_p). Return a bool tensor (B, V),
    True for kept tokens. Example: probs [0.5, 0.3, 0.15, 0.05] with top_p 0.75 keeps the first two
    (0.5 alone is not enough; 0.5 + 0.3 reaches it); the token that crosses top_p is kept.

    Hints: sort descending, cumsum; a token is kept if the tokens ranked above it have mass < top_p.
    Then undo the sort (scatter the sorted mask back with the sort's indices).
    """
    raise NotImplementedError


def ex06_split_decay_params(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split a model's parameters into AdamW's two groups, by name: (decay, no_decay).

    Weight decay goes on every parameter with 2 or more dimensions (Linear weights and embedding
    tables, as in nanoGPT); biases and LayerNorm gains (1-D) get none. List each parameter once,
    with the names model.named_parameters() gives (a weight shared by two modules appears once).
    """
    raise NotImplementedError


def ex07_clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient clipping by the global norm, as torch.nn.utils.clip_grad_norm_ does it.

    The global norm is sqrt(sum over every tensor of the sum of its squared entries): all gradients
    seen as one long vector. If it exceeds max_norm, scale *every* gradient by the same factor
    max_norm / (norm + 1e-6); otherwise leave them as they are (never scale up). Return
    (the clipped gradients as new tensors, the global norm before clipping as a 0-d tensor).
    """
    raise NotImplementedError
