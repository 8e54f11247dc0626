"""Part 0 exercises: the back-of-the-envelope arithmetic of language models, and how to score one.

Fill in each function, then check your answers:

    pytest tests/test_part00_exercises.py -rs

Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off. Some
checks compare with an outside reference (PyTorch's FLOP counter, a real AdamW step); ex05 is an
experiment whose result must land in the range the reference measured. The reference answers are in
solutions.py - try first, peek later.
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
    """
    raise NotImplementedError


def ex02_gpt_training_flops(n_layer: int, n_embd: int, vocab_size: int, block_size: int, batch_size: int) -> int:
    """Exactly how many FLOPs does one training step of the part01 GPT cost?

    The rule of thumb (Kaplan et al. 2020, https://arxiv.org/abs/2001.08361, section 2.1) is 6 N FLOPs
    per token: every parameter takes part in one multiply and one add per token in the forward pass
    (2 N), and the backward pass costs twice the forward (4 N). It is an estimate: it ignores the
    attention scores and counts parameters that never multiply anything.

    Goal: replace the estimate by an exact formula. The outside check is PyTorch's own FLOP counter,
    torch.utils.flop_counter.FlopCounterMode, around one step of part01_transformer.model.GPT with the
    given sizes (GPTConfig defaults otherwise: learned positions, bias=True, tied lm_head):

        from torch.utils.flop_counter import FlopCounterMode
        from part01_transformer.model import GPT, GPTConfig
        model = GPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, block_size=block_size))
        idx = torch.randint(vocab_size, (batch_size, block_size))
        with FlopCounterMode(display=False) as counter:
            _, loss = model(idx, idx)
            loss.backward()
        counter.get_total_flops()        # your formula must give exactly this

    FlopCounterMode counts matrix multiplications only: an (m x k) @ (k x n) product is 2 m k n FLOPs.
    Run it yourself and look at counter.get_flop_counts() to see which operations it counts. The number
    of heads does not change the result (the test uses a few). Return an int.
    """
    raise NotImplementedError


def ex03_training_days(n_params: float, n_tokens: float, n_gpus: int, peak_flops: float, mfu: float) -> float:
    """How many days does training take?

    - the work: 6 N D FLOPs for N = n_params parameters trained on D = n_tokens tokens (the estimate
      of ex02's docstring; exact enough for a model whose context is short compared with its width)
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


def ex05_compressor_bits_per_byte(text: str) -> float:
    """Experiment: how good are ordinary compressors as language models?

    Language modelling is compression (Delétang et al. 2023, https://arxiv.org/abs/2309.10668): a model
    that gives the next byte probability p can store it in -log2 p bits (arithmetic coding), so a model's
    bits per byte is the size it would compress the text to. Turn that around: a compressor's output
    size, in bits per byte of input, is the score of the "language model" inside it.

    Compress `text` (as UTF-8) with each of Python's standard-library compressors, zlib, bz2 and lzma,
    at their strongest settings, and return the best one's size in bits per byte of the input
    (8 * compressed bytes / input bytes). The test passes the validation split of the Shakespeare corpus
    (the last 10%, about 0.5 MB) and accepts a range around what the reference measured.

    Then compare: which compressor wins, and is it better or worse than the bigram (ex07, scored with
    ex06) and the MLP of train.py, whose val loss converts to bits per byte the same way?
    """
    raise NotImplementedError


def ex06_perplexity_and_bpb(loss: float, text: str, encode) -> tuple[float, float]:
    """Turn a model's loss on a text into perplexity and bits per byte.

    A model read `text`, tokenized by `encode` (a function from a string to a list of token ids), and
    its mean cross-entropy over those tokens is `loss`: what F.cross_entropy returns, the mean negative
    log-probability per token, in nats (natural log).
    - perplexity: e^loss, the number of equally likely choices that would be as surprising
      (uniform over 256 bytes: loss ln 256, perplexity 256). It is per token.
    - bits per byte: the total surprise of the text in bits (log base 2), divided by the number of
      UTF-8 bytes of the text. Unlike the loss and perplexity, it compares models with different
      tokenizers: a byte-level model and GPT-2's BPE (about 4 bytes per token on English prose).
      Careful: a character like "é" is one character but two bytes.

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
    reach there (with smoothing -> 0). Avoid a Python loop over the data: the corpus has millions of bytes.
    """
    raise NotImplementedError
