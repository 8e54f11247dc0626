"""Part 0 exercises: the back-of-the-envelope arithmetic of language models.

Fill in each function, then check your answers:

    pytest tests/test_part00_exercises.py -rs

Exercises still raising NotImplementedError are skipped ("not attempted yet"). The reference
answers are in solutions.py - try first, peek later.
"""
import math  # noqa: F401  (for your answers)

import torch


def ex01_gpt_param_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int,
                         bias: bool = True, tied: bool = True) -> int:
    """Count the parameters of a GPT-2-style model (as in nanoGPT and part01_transformer/model.py).

    The model, with C = n_embd, V = vocab_size, T = block_size:
    - token embedding wte: a V x C matrix; learned position embedding wpe: a T x C matrix
    - n_layer blocks, each:
        ln_1: LayerNorm(C)   - a weight of C, plus a bias of C if `bias`
        attn: one Linear C -> 3C for q, k, v, and one Linear C -> C (the output projection)
        ln_2: LayerNorm(C)
        mlp:  Linear C -> 4C, GELU (no parameters), Linear 4C -> C
      Every Linear has a weight (in x out) and, if `bias`, a bias (out).
    - ln_f: the final LayerNorm(C)
    - lm_head: a Linear C -> V without bias. If `tied`, it *is* wte (the same matrix used twice,
      Press & Wolf 2017), so it adds no parameters; otherwise it adds V x C more.
    The number of heads does not matter: the heads split the C channels, they add no weights.

    Return the total as an int. GPT-2 small (12 layers, C=768, V=50257, T=1024, bias, tied) has
    124,439,808.

    Hint: write the count of one block as a function of C first; most of it is 12 * C^2.
    """
    raise NotImplementedError


def ex02_training_flops(n_params: float, n_tokens: float) -> float:
    """Estimate the floating-point operations (FLOPs) needed to train a model.

    n_params is N, the number of parameters; n_tokens is D, the number of tokens trained on.
    Use the standard estimate (Kaplan et al. 2020, https://arxiv.org/abs/2001.08361, section 2.1):
    - forward pass: every parameter takes part in one multiply and one add per token: 2 N per token
    - backward pass: twice the forward (a gradient for the activations and one for the weights): 4 N
    It ignores the attention scores (small while the context is short compared with the width).

    Return the total FLOPs for D tokens (a float).
    """
    raise NotImplementedError


def ex03_training_days(n_params: float, n_tokens: float, n_gpus: int, peak_flops: float, mfu: float) -> float:
    """How many days does training take?

    - the work is the training FLOPs of ex02 (n_params N, n_tokens D)
    - each of the n_gpus GPUs has a datasheet peak of `peak_flops` FLOP/s (e.g. 312e12 for an A100
      in bf16), but reaches only the fraction `mfu` of it (model FLOPs utilization, e.g. 0.4)
    - the GPUs work in parallel with no other overhead

    Return the wall-clock time in days (1 day = 86,400 s). Example: 70e9 parameters on 1.4e12
    tokens (Chinchilla) with 1024 A100s at 40% MFU takes about 53 days.
    """
    raise NotImplementedError


def ex04_training_memory(n_params: int, recipe: str) -> dict:
    """Bytes of memory for the weights, gradients and AdamW state of a model with n_params parameters.

    Count only these three (not activations, not temporary buffers). AdamW keeps two running
    averages per parameter: exp_avg (m) and exp_avg_sq (v). fp32 takes 4 bytes, bf16 2 bytes.
    The recipes:
    - "fp32": weights, gradients, m and v all in fp32.
    - "bf16_mixed": the mixed-precision recipe of Micikevicius et al. 2018
      (https://arxiv.org/abs/1710.03740) as accounted in the ZeRO paper (Rajbhandari et al. 2019,
      https://arxiv.org/abs/1910.02054, section 3.1): the forward and backward passes use bf16
      weights and produce bf16 gradients; the optimizer keeps an fp32 *master copy* of the
      weights plus m and v in fp32, and counts all three as optimizer state.
    - "bf16_pure": weights, gradients, m and v all in bf16.

    Return {"weights": ..., "grads": ..., "optimizer": ..., "total": ...} in bytes (ints), where
    "weights" is the copy the forward pass uses and total is the sum of the other three.
    """
    raise NotImplementedError


def ex05_bytes_per_token(text: str, encode) -> float:
    """How many bytes of UTF-8 text does one token of a tokenizer cover on average?

    `encode` is a function from a string to a list of token ids. Return
    (number of UTF-8 bytes of text) / (number of tokens). A byte-level tokenizer gives exactly 1;
    GPT-2's BPE gives about 4 on English prose. Careful: a character like "é" is one character
    but two bytes.
    """
    raise NotImplementedError


def ex06_perplexity_and_bpb(loss: float, bytes_per_token: float = 1.0) -> tuple[float, float]:
    """Turn a mean cross-entropy loss into perplexity and bits per byte.

    `loss` is what F.cross_entropy returns: the mean negative log-probability per token, in nats
    (natural log). `bytes_per_token` is how many bytes of text one token covers (see ex05; 1 for
    a byte-level model).
    - perplexity: e^loss, the number of equally likely choices that would be as surprising
      (uniform over 256 bytes: loss ln 256, perplexity 256). It is per token.
    - bits per byte: the loss in bits (log base 2) spread over the bytes the token covers. Unlike
      the loss and perplexity, it compares models with different tokenizers.

    Return (perplexity, bits_per_byte).
    """
    raise NotImplementedError


def ex07_bigram_log_probs(data: torch.Tensor, vocab_size: int = 256, smoothing: float = 1.0) -> torch.Tensor:
    """The bigram model by counting instead of gradient descent.

    data is a 1-D tensor of token ids. Count every pair of neighbours: counts[a, b] = how many
    times token a is directly followed by token b in data (len(data) - 1 pairs; the last token
    has no successor). Add `smoothing` to every count (so unseen pairs keep some probability),
    normalize every row to sum to 1 and return the log-probabilities: a (vocab_size, vocab_size)
    float tensor where row a is log P(next token | current token a).

    The cross-entropy of these log-probs on the training data is the lowest any BigramLM can
    reach there (with smoothing -> 0).

    Hint: a pair (a, b) can be turned into the single index a * vocab_size + b; torch.bincount.
    """
    raise NotImplementedError
