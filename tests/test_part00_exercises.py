"""Part 0 exercises: each check compares with an independent reference (the part01 GPT, PyTorch's
FLOP counter, a real AdamW step, a counting loop) or a number worked out by hand."""
import math

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from part00_foundations import exercises, solutions
from part01_transformer.model import GPT, GPTConfig
from tests.harness import Exercise, exercise_tests


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


# --- ex02 and ex03: training compute and time ----------------------------------------------------


def check_ex02(fn):
    # PyTorch's FLOP counter on a bias-free Linear layer: N = in * out weights, D = rows of the batch.
    # Forward: 2 N D; backward: grad of the input 2 N D + grad of the weight 2 N D.
    for n_in, n_out, n_tokens in [(64, 32, 10), (48, 96, 7)]:
        layer = nn.Linear(n_in, n_out, bias=False)
        x = torch.randn(n_tokens, n_in, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        n_params = n_in * n_out
        close(fn(n_params, n_tokens), counter.get_total_flops(), f"N={n_params}, D={n_tokens} (FlopCounterMode)")
    close(fn(124e6, 300e9), 2.232e20, "N=124e6, D=300e9")


def check_ex03(fn):
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


# --- ex05 and ex06: tokens, bytes, perplexity, bits ----------------------------------------------

ACCENTED = "héllo wörld ☃"  # 13 characters; é and ö take 2 bytes, ☃ takes 3: 17 bytes


def check_ex05(fn):
    close(fn(ACCENTED, lambda s: list(s.encode("utf-8"))), 1.0, "a byte-level tokenizer")
    close(fn(ACCENTED, list), 17 / 13, f"a character-level tokenizer on {ACCENTED!r} (17 bytes, 13 chars)")
    close(fn("the cat sat", str.split), 11 / 3, "a word-level tokenizer on 'the cat sat'")


def check_ex06(fn):
    ppl, bpb = fn(math.log(256))
    close(ppl, 256.0, "perplexity of the uniform guess over 256 bytes")
    close(bpb, 8.0, "bits per byte of the uniform guess over 256 bytes")
    # Against the probabilities themselves: perplexity = 1 / geometric mean of p(target),
    # bits = mean of -log2 p(target).
    torch.manual_seed(0)
    logits, targets = torch.randn(20, 256, dtype=torch.float64), torch.randint(256, (20,))
    loss = F.cross_entropy(logits, targets).item()
    p = F.softmax(logits, dim=-1)[torch.arange(20), targets]
    ppl, bpb = fn(loss)
    close(ppl, (p.prod() ** (-1 / 20)).item(), "perplexity = 1 / geometric mean of p(target)")
    close(bpb, (-torch.log2(p)).mean().item(), "bits per byte = mean -log2 p(target) (1 byte per token)")
    # a tokenizer whose tokens cover 4 bytes: 3 nats per token = 3 / ln 2 bits per token, over 4 bytes
    ppl, bpb = fn(3.0, 4.0)
    close(ppl, math.exp(3.0), "perplexity is per token: bytes_per_token does not change it")
    close(bpb, 3.0 / math.log(2) / 4.0, "loss 3.0 nats with 4 bytes per token")


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


def ex07_wrong_transposed(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(data.flip(0), vocab_size, smoothing)


def ex07_wrong_wraparound(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(torch.cat([data, data[:1]]), vocab_size, smoothing)


def ex07_wrong_probs_not_logs(data, vocab_size=256, smoothing=1.0):
    return solutions.ex07_bigram_log_probs(data, vocab_size, smoothing).exp()


CASES = [
    Exercise("ex01_gpt_param_count", check_ex01, wrong=[
        ex01_wrong_double_counts_tied_head, ex01_wrong_no_position_embedding,
        ex01_wrong_only_matrices, ex01_wrong_ignores_bias_flag,
    ]),
    Exercise("ex02_training_flops", check_ex02, wrong=[
        lambda n, d: 2 * n * d,  # forward only
        lambda n, d: 4 * n * d,  # backward only
        lambda n, d: 6 * n,  # per token
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
    Exercise("ex05_bytes_per_token", check_ex05, wrong=[
        lambda text, encode: len(text) / len(encode(text)),  # characters, not bytes
        lambda text, encode: len(encode(text)) / len(text.encode("utf-8")),  # tokens per byte
    ]),
    Exercise("ex06_perplexity_and_bpb", check_ex06, wrong=[
        lambda loss, bpt=1.0: (2**loss, loss / math.log(2) / bpt),  # perplexity in the wrong base
        lambda loss, bpt=1.0: (math.exp(loss), loss * math.log(2) / bpt),  # multiplies by ln 2
        lambda loss, bpt=1.0: (math.exp(loss), loss / math.log(10) / bpt),  # log base 10
        lambda loss, bpt=1.0: (math.exp(loss), loss / math.log(2) * bpt),  # bits per token times bytes
        lambda loss, bpt=1.0: (math.exp(loss), loss / math.log(2)),  # ignores bytes_per_token
        lambda loss, bpt=1.0: (math.exp(loss / bpt), loss / math.log(2) / bpt),  # per-byte perplexity
    ]),
    Exercise("ex07_bigram_log_probs", check_ex07, wrong=[
        ex07_wrong_transposed, ex07_wrong_wraparound, ex07_wrong_probs_not_logs,
        lambda data, vocab_size=256, smoothing=1.0: solutions.ex07_bigram_log_probs(data, vocab_size, 0.0),
    ]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
