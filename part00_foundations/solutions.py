"""Part 0 reference solutions. Same names and signatures as exercises.py (see the docstrings there)."""
import bz2
import lzma
import math
import zlib

import torch


def ex01_gpt_param_count(n_layer: int, n_embd: int, vocab_size: int, block_size: int,
                         bias: bool = True, tied: bool = True) -> int:
    C = n_embd
    norm = 2 * C if bias else C  # LayerNorm: weight (+ bias)
    attn = C * 3 * C + C * C + (3 * C + C if bias else 0)  # qkv and output projection
    mlp = C * 4 * C + 4 * C * C + (4 * C + C if bias else 0)  # expand, project back
    block = 2 * norm + attn + mlp  # = 12 C^2 + 13 C with bias
    embeddings = vocab_size * C + block_size * C  # wte + wpe
    lm_head = 0 if tied else vocab_size * C
    return embeddings + n_layer * block + norm + lm_head  # + ln_f


def ex02_gpt_training_flops(n_layer: int, n_embd: int, vocab_size: int, block_size: int, batch_size: int) -> int:
    C, T = n_embd, block_size
    # Forward, per token: every weight matrix that multiplies the token's vector costs 2 FLOPs per
    # entry: qkv (3 C^2), attention output (C^2), MLP (8 C^2) per layer, and the lm_head (V C), which
    # multiplies although it is tied to wte (the embedding lookups multiply nothing).
    matmul_weights = n_layer * 12 * C * C + vocab_size * C
    # Attention: the T x T scores q @ k^T and the weighted sum of the values, each 2 T C per token and
    # layer (summed over the heads). The causal mask hides half of the scores but computes all of them.
    attention = n_layer * 2 * (2 * T * C)
    forward = batch_size * T * (2 * matmul_weights + attention)
    return 3 * forward  # backward: a gradient for each matmul's input and one for its weight, 2x forward


def ex03_training_days(n_params: float, n_tokens: float, n_gpus: int, peak_flops: float, mfu: float) -> float:
    achieved = n_gpus * peak_flops * mfu  # FLOP/s the whole cluster really delivers
    return 6 * n_params * n_tokens / achieved / 86400  # 2 N D forward + 4 N D backward


def ex04_training_memory(n_params: int, recipe: str) -> dict:
    fp32, bf16 = 4, 2
    if recipe == "fp32":
        weights, grads, optimizer = fp32, fp32, 2 * fp32  # m and v
    elif recipe == "bf16_mixed":
        weights, grads, optimizer = bf16, bf16, 3 * fp32  # fp32 master weights, m and v
    elif recipe == "bf16_pure":
        weights, grads, optimizer = bf16, bf16, 2 * bf16
    else:
        raise ValueError(f"unknown recipe {recipe!r}")
    out = {"weights": weights * n_params, "grads": grads * n_params, "optimizer": optimizer * n_params}
    out["total"] = sum(out.values())
    return out


def ex05_compressor_bits_per_byte(text: str) -> float:
    data = text.encode("utf-8")
    sizes = {
        "zlib": len(zlib.compress(data, 9)),
        "bz2": len(bz2.compress(data, 9)),
        "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return 8 * min(sizes.values()) / len(data)  # bz2 wins on English text


def ex06_perplexity_and_bpb(loss: float, text: str, encode) -> tuple[float, float]:
    n_tokens, n_bytes = len(encode(text)), len(text.encode("utf-8"))
    total_bits = loss * n_tokens / math.log(2)  # nats -> bits: divide by ln 2
    return math.exp(loss), total_bits / n_bytes


def ex07_bigram_log_probs(data: torch.Tensor, vocab_size: int = 256, smoothing: float = 1.0) -> torch.Tensor:
    pairs = data[:-1] * vocab_size + data[1:]  # one index per (current, next) pair
    counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).float()
    counts += smoothing
    return (counts / counts.sum(dim=1, keepdim=True)).log()
