"""Part 0 exercises: each check compares with an independent reference (the part01 GPT, PyTorch's
FLOP counter, a real AdamW step, a counting loop, Python's compressors) or a number worked out by hand."""
import bz2
import functools
import lzma
import math
import zlib

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from part00_foundations import exercises, solutions
from part01_transformer.model import GPT, GPTConfig
from shared.data import load_text, train_val_split
from tests.harness import Exercise, exercise_tests, python_lines


def close(got, want, what, rel=1e-9):
    assert got == pytest.approx(want, rel=rel), f"{what}: got {got}, expected {want}"


# --- ex01: parameter count of a GPT ------------------------------------------------------------


def gpt_reference_count(n_layer, n_embd, vocab_size, block_size, bias, tied):
    """Build the part01 GPT and count its parameters (the tied lm_head counts once)."""
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=4,
                          n_embd=n_embd, bias=bias))
    if not tied:  # give lm_head its own matrix
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model.num_params()


def check_ex01(fn):
    got = fn(12, 768, 50257, 1024, True, True)
    assert got == 124_439_808, f"GPT-2 small: got {got:,}, expected 124,439,808"
    for n_layer, n_embd, vocab_size, block_size, bias, tied in [
        (2, 32, 256, 16, True, True), (3, 48, 100, 24, False, True),
        (1, 16, 64, 8, True, False), (2, 16, 64, 8, False, False),
    ]:
        want = gpt_reference_count(n_layer, n_embd, vocab_size, block_size, bias, tied)
        got = fn(n_layer, n_embd, vocab_size, block_size, bias, tied)
        assert got == want, (f"n_layer={n_layer} n_embd={n_embd} vocab={vocab_size} block={block_size} "
                             f"bias={bias} tied={tied}: got {got:,}, the part01 GPT has {want:,}")


def ex01_wrong_double_counts_tied_head(n_layer, n_embd, vocab_size, block_size, bias=True, tied=True):
    return solutions.ex01_gpt_param_count(n_layer, n_embd, vocab_size, block_size, bias, False)


def ex01_wrong_no_position_embedding(n_layer, n_embd, vocab_size, block_size, bias=True, tied=True):
    return solutions.ex01_gpt_param_count(n_layer, n_embd, vocab_size, block_size, bias, tied) - block_size * n_embd


def ex01_wrong_only_matrices(n_layer, n_embd, vocab_size, block_size, bias=True, tied=True):
    # the 12 L C^2 approximation: forgets LayerNorms and biases
    return n_layer * 12 * n_embd**2 + (vocab_size + block_size) * n_embd + (0 if tied else vocab_size * n_embd)


def ex01_wrong_ignores_bias_flag(n_layer, n_embd, vocab_size, block_size, bias=True, tied=True):
    return solutions.ex01_gpt_param_count(n_layer, n_embd, vocab_size, block_size, True, tied)


# --- ex02: the exact FLOPs of a GPT training step ------------------------------------------------


def counted_training_flops(n_layer, n_embd, vocab_size, block_size, batch_size, n_head) -> int:
    """PyTorch's FLOP counter around one forward + backward of the part01 GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    idx = torch.randint(vocab_size, (batch_size, block_size))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


def check_ex02(fn):
    # sizes where the attention term matters (block_size comparable to n_embd) and where it does not
    for args in [(2, 32, 256, 16, 3, 4), (3, 48, 100, 24, 2, 2), (1, 16, 64, 64, 1, 1), (2, 64, 50, 8, 2, 8)]:
        n_layer, n_embd, vocab_size, block_size, batch_size, n_head = args
        want = counted_training_flops(*args)
        got = fn(n_layer, n_embd, vocab_size, block_size, batch_size)
        assert got == want, (f"n_layer={n_layer} n_embd={n_embd} vocab={vocab_size} block={block_size} "
                             f"batch={batch_size}: got {got:,}, FlopCounterMode counts {want:,} "
                             f"({got / want:.3f}x)")


def ex02_wrong_six_n_d(n_layer, n_embd, vocab_size, block_size, batch_size):  # the rule of thumb, all parameters
    return 6 * solutions.ex01_gpt_param_count(n_layer, n_embd, vocab_size, block_size) * batch_size * block_size


def ex02_wrong_no_attention(n_layer, n_embd, vocab_size, block_size, batch_size):
    return 6 * (n_layer * 12 * n_embd**2 + vocab_size * n_embd) * batch_size * block_size


def ex02_wrong_forward_only(n_layer, n_embd, vocab_size, block_size, batch_size):
    return solutions.ex02_gpt_training_flops(n_layer, n_embd, vocab_size, block_size, batch_size) // 3


def ex02_wrong_causal_half(n_layer, n_embd, vocab_size, block_size, batch_size):  # the mask does not save work
    attention = 3 * batch_size * block_size * n_layer * 4 * block_size * n_embd
    return ex02_wrong_no_attention(n_layer, n_embd, vocab_size, block_size, batch_size) + attention // 2


def ex02_wrong_untied_head_skipped(n_layer, n_embd, vocab_size, block_size, batch_size):  # tied != free
    attention = 3 * batch_size * block_size * n_layer * 4 * block_size * n_embd
    return 6 * n_layer * 12 * n_embd**2 * batch_size * block_size + attention


# --- ex03: training time ---------------------------------------------------------------------------


def check_ex03(fn):
    # 6 N D against PyTorch's FLOP counter on a bias-free Linear layer: N = in * out weights, D = rows.
    # The days for a "cluster" of one device doing 1 FLOP/s at full utilization are FLOPs / 86400.
    for n_in, n_out, n_tokens in [(64, 32, 10), (48, 96, 7)]:
        layer = nn.Linear(n_in, n_out, bias=False)
        x = torch.randn(n_tokens, n_in, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        close(fn(n_in * n_out, n_tokens, 1, 1.0, 1.0), counter.get_total_flops() / 86400,
              f"N={n_in * n_out}, D={n_tokens} on 1 device at 1 FLOP/s (FlopCounterMode: 6 N D)")
    # Chinchilla-sized: 6 * 70e9 * 1.4e12 = 5.88e23 FLOPs at 1024 * 312e12 * 0.4 = 1.277952e17 FLOP/s
    close(fn(70e9, 1.4e12, 1024, 312e12, 0.4), 5.88e23 / 1.277952e17 / 86400, "70e9 params, 1.4e12 tokens")
    assert 53.2 < fn(70e9, 1.4e12, 1024, 312e12, 0.4) < 53.3
    # one GPU: 6 * 1e9 * 1e10 = 6e19 FLOPs at 0.5 * 1e14 = 5e13 FLOP/s -> 1.2e6 s
    close(fn(1e9, 1e10, 1, 1e14, 0.5), 1.2e6 / 86400, "1e9 params, 1e10 tokens, one GPU")


# --- ex04: memory of weights, gradients and AdamW state ------------------------------------------


def measured_training_bytes(dtype: torch.dtype) -> tuple[int, dict]:
    """Take one real AdamW step on a Linear layer in `dtype` and add up the bytes of every tensor."""
    torch.manual_seed(0)
    model = nn.Linear(7, 5).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 7, dtype=dtype)).sum().backward()
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]  # step: a counter
    measured = {"weights": nbytes(params), "grads": nbytes(p.grad for p in params), "optimizer": nbytes(state)}
    measured["total"] = sum(measured.values())
    return sum(p.numel() for p in params), measured


def check_ex04(fn):
    for recipe, dtype in [("fp32", torch.float32), ("bf16_pure", torch.bfloat16)]:
        n_params, measured = measured_training_bytes(dtype)
        got = fn(n_params, recipe)
        assert got == measured, f"{recipe}, {n_params} parameters: got {got}, a real AdamW step uses {measured}"
    # mixed precision: bf16 weights 2 + bf16 grads 2 + fp32 master weights, m and v 4 + 4 + 4 bytes
    got = fn(1000, "bf16_mixed")
    want = {"weights": 2000, "grads": 2000, "optimizer": 12000, "total": 16000}
    assert got == want, f"bf16_mixed, 1000 parameters: got {got}, expected {want}"
    assert fn(7_000_000_000, "fp32")["total"] == 112_000_000_000, "a 7B model in fp32 AdamW needs 112 GB"


def ex04_wrong_adam_one_state(n_params, recipe):  # AdamW keeps two averages (m and v), not one
    out = solutions.ex04_training_memory(n_params, recipe)
    out["optimizer"] = {"fp32": 4, "bf16_mixed": 8, "bf16_pure": 2}[recipe] * n_params
    out["total"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


def ex04_wrong_no_master_weights(n_params, recipe):
    if recipe == "bf16_mixed":
        out = {"weights": 2 * n_params, "grads": 2 * n_params, "optimizer": 8 * n_params}
        out["total"] = sum(out.values())
        return out
    return solutions.ex04_training_memory(n_params, recipe)


def ex04_wrong_mixed_halves_everything(n_params, recipe):
    return solutions.ex04_training_memory(n_params, "bf16_pure" if recipe == "bf16_mixed" else recipe)


# --- ex05: the compressor experiment -----------------------------------------------------------------


@functools.cache
def shakespeare_val() -> str:
    return train_val_split(load_text("shakespeare"))[1]


# The reference measured (Python 3.11's zlib 1.2/1.3, libbz2 1.0.8, liblzma 5.x) on the 478 KB validation
# split: zlib 3.18, lzma 2.76, bz2 2.43 bits per byte. bz2's Burrows-Wheeler transform suits text best.
# The range leaves +-0.2 for other library versions, and stays below lzma and zlib, so using only one of
# those, or forgetting to take the best, is caught.
COMPRESSOR_BPB_RANGE = (2.2, 2.65)


def check_ex05(fn):
    got = fn(shakespeare_val())
    low, high = COMPRESSOR_BPB_RANGE
    assert isinstance(got, float), f"return a float (bits per byte), got {type(got).__name__}"
    assert low <= got <= high, (f"the best compressor gave {got:.3f} bits per byte on the Shakespeare validation "
                                f"split; the reference measured about 2.43 (bz2), and accepts {low}..{high}. "
                                "Bits per byte = 8 * compressed bytes / input bytes, the best of zlib, bz2, lzma")


def _compressed_bits_per_byte(compress, text):
    data = text.encode("utf-8")
    return 8 * len(compress(data)) / len(data)


# --- ex06: perplexity and bits per byte ------------------------------------------------------------------

ACCENTED = "héllo wörld ☃"  # 13 characters; é and ö take 2 bytes, ☃ takes 3: 17 bytes


def check_ex06(fn):
    def as_bytes(s):
        return list(s.encode("utf-8"))

    ppl, bpb = fn(math.log(256), ACCENTED, as_bytes)
    close(ppl, 256.0, "perplexity of the uniform guess over 256 bytes")
    close(bpb, 8.0, "bits per byte of the uniform guess over 256 bytes")
    # Against the probabilities themselves: perplexity = 1 / geometric mean of p(target),
    # bits = mean of -log2 p(target), one byte per token.
    torch.manual_seed(0)
    logits, targets = torch.randn(20, 256, dtype=torch.float64), torch.randint(256, (20,))
    loss = F.cross_entropy(logits, targets).item()
    p = F.softmax(logits, dim=-1)[torch.arange(20), targets]
    ppl, bpb = fn(loss, "twenty ascii bytes!!", as_bytes)
    close(ppl, (p.prod() ** (-1 / 20)).item(), "perplexity = 1 / geometric mean of p(target)")
    close(bpb, (-torch.log2(p)).mean().item(), "bits per byte = mean -log2 p(target) (1 byte per token)")
    # a character-level tokenizer on accented text: 13 tokens for 17 bytes
    ppl, bpb = fn(2.0, ACCENTED, list)
    close(ppl, math.exp(2.0), "perplexity is per token: the tokenizer does not change it")
    close(bpb, 2.0 * 13 / math.log(2) / 17, f"loss 2.0 nats per character on {ACCENTED!r} (13 chars, 17 bytes)")
    # a word-level tokenizer: 3 tokens covering 11 bytes
    ppl, bpb = fn(3.0, "the cat sat", str.split)
    close(bpb, 3.0 * 3 / math.log(2) / 11, "loss 3.0 nats per word on 'the cat sat' (3 words, 11 bytes)")


def _bytes_per_token(text, encode):
    return len(text.encode("utf-8")) / len(encode(text))


def ex06_wrong_characters_not_bytes(loss, text, encode):
    return math.exp(loss), loss / math.log(2) / (len(text) / len(encode(text)))


def ex06_wrong_ignores_tokenizer(loss, text, encode):
    return math.exp(loss), loss / math.log(2)


def ex06_wrong_times_bytes_per_token(loss, text, encode):
    return math.exp(loss), loss / math.log(2) * _bytes_per_token(text, encode)


def ex06_wrong_per_byte_perplexity(loss, text, encode):
    return math.exp(loss / _bytes_per_token(text, encode)), loss / math.log(2) / _bytes_per_token(text, encode)


# --- ex07: the counted bigram table --------------------------------------------------------------


def counted_log_probs(ids: list[int], vocab_size: int, smoothing: float) -> torch.Tensor:
    counts = [[smoothing] * vocab_size for _ in range(vocab_size)]
    for a, b in zip(ids, ids[1:]):
        counts[a][b] += 1
    return torch.tensor([[math.log(c / sum(row)) for c in row] for row in counts])


def check_ex07(fn):
    torch.manual_seed(0)
    for vocab_size, smoothing in [(5, 1.0), (7, 0.5)]:
        data = torch.randint(vocab_size, (60,))
        data[-1], data[0] = 1, 3  # a wrap-around pair (1 -> 3) that must not be counted
        got = fn(data, vocab_size, smoothing)
        want = counted_log_probs(data.tolist(), vocab_size, smoothing)
        assert got.shape == (vocab_size, vocab_size), f"shape {tuple(got.shape)}, expected {(vocab_size,) * 2}"
        assert torch.allclose(got.float(), want, atol=1e-5), (
            f"vocab_size={vocab_size}, smoothing={smoothing}: differs from counting pairs one by one; "
            f"largest difference {(got.float() - want).abs().max():.3g}")
    lines = {n: python_lines(fn, torch.randint(5, (n,)), 5, 1.0)[1] for n in (100, 1000)}
    assert lines[1000] <= 2 * lines[100] + 10, (
        f"your function ran {lines[100]} Python lines for 100 tokens and {lines[1000]} for 1,000: a Python loop over "
        "the data will take minutes on the 4.8 MB corpus; count with tensor operations")


def ex07_wrong_transposed(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(data.flip(0), vocab_size, smoothing)


def ex07_wrong_wraparound(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(torch.cat([data, data[:1]]), vocab_size, smoothing)


def ex07_wrong_python_loop(data, vocab_size=256, smoothing=1.0):  # right numbers, one Python step per pair
    return counted_log_probs(data.tolist(), vocab_size, smoothing)


def ex07_wrong_probs_not_logs(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(data, vocab_size, smoothing).exp()


CASES = [
    Exercise("ex01_gpt_param_count", check_ex01, wrong=[
        ex01_wrong_double_counts_tied_head, ex01_wrong_no_position_embedding,
        ex01_wrong_only_matrices, ex01_wrong_ignores_bias_flag,
    ]),
    Exercise("ex02_gpt_training_flops", check_ex02, wrong=[
        ex02_wrong_six_n_d, ex02_wrong_no_attention, ex02_wrong_forward_only, ex02_wrong_causal_half,
        ex02_wrong_untied_head_skipped,
    ]),
    Exercise("ex03_training_days", check_ex03, wrong=[
        lambda n, d, g, peak, mfu: 6 * n * d / (g * peak) / 86400,  # forgets the utilization
        lambda n, d, g, peak, mfu: 6 * n * d / (g * peak * mfu) / 3600,  # hours, not days
        lambda n, d, g, peak, mfu: 2 * n * d / (g * peak * mfu) / 86400,  # forward FLOPs only
        lambda n, d, g, peak, mfu: 6 * n * d * mfu / (g * peak) / 86400,  # multiplies by the utilization
    ]),
    Exercise("ex04_training_memory", check_ex04, wrong=[
        ex04_wrong_adam_one_state, ex04_wrong_no_master_weights, ex04_wrong_mixed_halves_everything,
    ]),
    Exercise("ex05_compressor_bits_per_byte", check_ex05, wrong=[
        lambda text: _compressed_bits_per_byte(zlib.compress, text),  # only zlib (gzip's algorithm)
        lambda text: _compressed_bits_per_byte(lzma.compress, text),  # only lzma (xz)
        lambda text: len(bz2.compress(text.encode("utf-8"), 9)) / len(text.encode("utf-8")),  # bytes, not bits
        lambda text: len(text.encode("utf-8")) / len(bz2.compress(text.encode("utf-8"), 9)),  # compression ratio
    ]),
    Exercise("ex06_perplexity_and_bpb", check_ex06, wrong=[
        lambda loss, text, encode: (2**loss, solutions.ex06_perplexity_and_bpb(loss, text, encode)[1]),  # base 2
        lambda loss, text, encode: (math.exp(loss), loss * math.log(2) / _bytes_per_token(text, encode)),  # x ln 2
        lambda loss, text, encode: (math.exp(loss), loss / math.log(10) / _bytes_per_token(text, encode)),  # log10
        ex06_wrong_characters_not_bytes, ex06_wrong_ignores_tokenizer, ex06_wrong_times_bytes_per_token,
        ex06_wrong_per_byte_perplexity,
    ]),
    Exercise("ex07_bigram_log_probs", check_ex07, wrong=[
        ex07_wrong_transposed, ex07_wrong_wraparound, ex07_wrong_probs_not_logs, ex07_wrong_python_loop,
        lambda data, vocab_size=256, smoothing=1.0: solutions.ex07_bigram_log_probs(data, vocab_size, 0.0),
    ]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
