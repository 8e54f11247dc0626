"""Part 2 exercises: each check compares against an outside reference and rejects plausible slips."""
import functools
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from part02_tiny_llm import exercises, solutions
from shared.data import load_text, train_val_split
from tests.harness import Exercise, TorchCalls, exercise_tests, python_lines

# --- ex01: UTF-8 by hand -----------------------------------------------------------------------

# every length class, and the first and last code point of each: 1, 2, 3 and 4 bytes
UTF8_TEXTS = ["", "hello", "é", "€", "😀", "naïve café — ∑ 😀",
              "\x7f\x80\u07ff\u0800\uffff\U00010000\U0010ffff"]


def check_ex01_utf8_encode(fn):
    for text in UTF8_TEXTS:
        got, want = fn(text), list(text.encode("utf-8"))  # Python's own encoder is the reference
        assert list(got) == want, f"encode({text!r}) gave {list(got)}, expected {want}"


def _utf8_without_4_byte_case(text):  # characters beyond U+FFFF squeezed into the 3-byte form
    out = []
    for ch in text:
        cp = ord(ch)
        out += ch.encode("utf-8") if cp < 0x10000 else [0xE0 | (cp >> 12) & 0xFF, 0x80 | ((cp >> 6) & 0x3F),
                                                        0x80 | (cp & 0x3F)]
    return out


# --- ex02: cross-entropy with label smoothing ---------------------------------------------------------

NO_CROSS_ENTROPY = {F.cross_entropy: "write the loss yourself", F.nll_loss: "write the loss yourself"}


def check_ex02_cross_entropy(fn):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(11, (3, 5), generator=gen)
    some_ignored = targets.masked_fill(torch.rand(3, 5, generator=gen) < 0.3, -1)
    cases = [("no ignored positions", logits, targets, 0.0), ("some targets -1 (ignored)", logits, some_ignored, 0.0),
             ("label_smoothing 0.1", logits, targets, 0.1), ("label_smoothing 0.3, some ignored", logits, some_ignored,
                                                            0.3),
             ("logits in the thousands, label_smoothing 0.2", 1000 * logits, some_ignored, 0.2)]
    for name, lg, t, smoothing in cases:
        want = F.cross_entropy(lg.view(-1, 11), t.view(-1), ignore_index=-1, label_smoothing=smoothing)
        with TorchCalls(forbidden=NO_CROSS_ENTROPY):
            got = fn(lg, t, smoothing)
        assert torch.is_tensor(got) and got.dim() == 0, f"return a 0-d tensor, got {got!r}"
        assert torch.isfinite(got), f"{name}: the loss is {got.item()} (exp of a large logit overflows?)"
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (
            f"{name}: loss {got.item():.6f}, F.cross_entropy gives {want.item():.6f}")


def _ce_variant(reduce="mean", over_all_positions=False, axis=-1, smoothing_over_others=False,
                ignore_smoothing=False, naive_log=False):
    def cross_entropy(logits, targets, label_smoothing=0.0):
        V = logits.size(-1)
        if naive_log:  # log(softmax) computed as written: exp overflows for big logits
            lp = torch.log(logits.exp() / logits.exp().sum(-1, keepdim=True)).reshape(-1, V)
        else:
            lp = F.log_softmax(logits, dim=axis).reshape(-1, V)
        t = targets.reshape(-1)
        keep = t != -1
        nll = -lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        if smoothing_over_others:  # the smoothing mass on the V - 1 wrong tokens only
            others = (-lp.sum(-1) - nll) / (V - 1)
            per = (1 - label_smoothing) * nll + label_smoothing * others
        else:
            per = nll if ignore_smoothing else (1 - label_smoothing) * nll + label_smoothing * (-lp.mean(-1))
        per = per * keep
        if reduce == "sum":
            return per.sum()
        return per.sum() / (t.numel() if over_all_positions else keep.sum())

    return cross_entropy


# --- ex03: the nucleus ------------------------------------------------------------------------------------


def _reference_top_p(row: list[float], top_p: float) -> list[bool]:
    """Walk the tokens from most to least likely, keeping them until the kept mass reaches top_p."""
    keep, mass = [False] * len(row), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        if mass >= top_p:
            break
        keep[i], mass = True, mass + row[i]
    return keep


# dyadic probabilities are exact in binary floating point, so "reaches top_p exactly" is a real tie.
TOP_P_CASES = [
    ([[0.15, 0.5, 0.05, 0.3]], 0.75),  # 0.5 + 0.3 crosses 0.75: keep both
    ([[0.15, 0.5, 0.05, 0.3]], 0.81),  # 0.5 + 0.3 = 0.8 falls short: a third token is needed
    ([[0.15, 0.5, 0.05, 0.3]], 0.4),  # the top token alone reaches it
    ([[0.125, 0.5, 0.125, 0.25]], 0.75),  # exactly reached by 0.5 + 0.25: two tokens, not three
    ([[0.25, 0.25, 0.25, 0.25], [0.0625, 0.0625, 0.125, 0.75]], 0.5),
]


def check_ex03_top_p_mask(fn):
    for probs, top_p in TOP_P_CASES:
        got = fn(torch.tensor(probs, dtype=torch.float64), top_p)
        want = [_reference_top_p(row, top_p) for row in probs]
        assert got.dtype == torch.bool, f"return a bool mask, got dtype {got.dtype}"
        assert got.tolist() == want, f"probs {probs}, top_p {top_p}: kept {got.tolist()}, expected {want}"
    lines = {}
    for n_rows in (4, 40):  # no Python loop over the rows: the lines run must not grow with them
        probs = torch.softmax(3 * torch.randn(n_rows, 50, generator=torch.Generator().manual_seed(n_rows)), dim=-1)
        got, lines[n_rows] = python_lines(fn, probs, 0.9)
        assert got.tolist() == [_reference_top_p(row, 0.9) for row in probs.tolist()], f"{n_rows} random rows: wrong"
    assert lines[40] <= 2 * lines[4] + 10, (f"your function ran {lines[4]} Python lines for 4 rows and {lines[40]} "
                                            "for 40: a Python loop over the rows? Use tensor operations")


def _top_p_excludes_crossing_token(probs, top_p):  # keeps only tokens whose cumulative mass is <= p
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= top_p
    return keep.scatter(-1, order, keep)


def _top_p_keeps_one_too_many_at_ties(probs, top_p):
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs <= top_p
    return keep.scatter(-1, order, keep)


def _top_p_row_by_row(probs, top_p):  # right, but a Python loop over the rows and tokens
    return torch.tensor([_reference_top_p(row, top_p) for row in probs.tolist()])


def _top_p_unsorted(probs, top_p):  # cumulative mass in vocabulary order, not by likelihood
    return probs.cumsum(-1) - probs < top_p


# --- ex04: sampling without multinomial -----------------------------------------------------------------

SAMPLING_LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0])
N_SAMPLES = 40_000
NO_MULTINOMIAL = {torch.multinomial: "sample with elementwise random numbers and an argmax instead",
                  torch.Tensor.multinomial: "sample with elementwise random numbers and an argmax instead"}


def _exact_probs(temperature, top_k) -> list[float]:
    """A direct formula: exp(l / T) over the k largest logits, normalised."""
    row = SAMPLING_LOGITS.tolist()
    kept = sorted(range(len(row)), key=lambda i: -row[i])[: top_k or len(row)]
    weights = {i: math.exp(row[i] / temperature) for i in kept}
    return [weights.get(i, 0.0) / sum(weights.values()) for i in range(len(row))]


def check_ex04_sample_without_multinomial(fn):
    for case, (temperature, top_k) in enumerate([(1.0, None), (0.5, None), (2.0, 3), (1.3, 4)]):
        logits = SAMPLING_LOGITS.expand(N_SAMPLES, -1).clone()
        with TorchCalls(forbidden=NO_MULTINOMIAL):
            got = fn(logits, temperature, top_k, torch.Generator().manual_seed(case))
        assert torch.is_tensor(got) and tuple(got.shape) == (N_SAMPLES,), (
            f"return (B,) token ids, got {tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
        freq = torch.bincount(got.long(), minlength=len(SAMPLING_LOGITS)).double() / N_SAMPLES
        want = _exact_probs(temperature, top_k)
        for token, p in enumerate(want):
            # 5 standard deviations of a frequency over 40,000 draws: a right sampler fails ~1 in 3 million
            tolerance = 5 * math.sqrt(p * (1 - p) / N_SAMPLES) + 1e-4
            assert abs(freq[token].item() - p) <= tolerance, (
                f"temperature {temperature}, top_k {top_k}: token {token} came up {freq[token].item():.4f} of the "
                f"time over {N_SAMPLES:,} samples, but its probability is {p:.4f} (all frequencies: "
                f"{[round(f, 4) for f in freq.tolist()]}, expected {[round(q, 4) for q in want]})")


def _sampler_variant(noise="gumbel", temperature_on="logits", use_top_k=True):
    def sample(logits, temperature, top_k, generator):
        scores = logits / temperature if temperature_on == "logits" else logits * temperature
        if top_k is not None and use_top_k:
            kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        u = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
        if noise == "none":  # greedy
            return scores.argmax(dim=-1)
        if noise == "uniform":
            return (scores + u).argmax(dim=-1)
        if noise == "exponential_times":  # the exponential race the wrong way round: probs * E, not probs / E
            return (F.softmax(scores.double(), -1) * -torch.log(u)).argmax(dim=-1)
        return (scores + -torch.log(-torch.log(u))).argmax(dim=-1)

    return sample


def _sampler_gumbel_before_temperature(logits, temperature, top_k, generator):  # (l + g) / T: T cancels out
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    scores = logits.double() - torch.log(-torch.log(u))
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(logits < kth, float("-inf"))
    return (scores / temperature).argmax(dim=-1)


# --- ex05: gradient clipping ----------------------------------------------------------------------------


def check_ex05_clip_grad_norm(fn):
    gen = torch.Generator().manual_seed(0)
    grads = [2 * torch.randn(3, 4, generator=gen), 3 * torch.randn(5, generator=gen),
             torch.randn(2, 2, 2, generator=gen)]
    for max_norm in [1.0, 3.0, 100.0]:  # clips hard, clips a little, leaves alone
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        want_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the reference clips in place
        got, got_norm = fn([g.clone() for g in grads], max_norm)
        assert torch.allclose(torch.as_tensor(got_norm, dtype=torch.float32), want_norm, atol=1e-5), (
            f"max_norm={max_norm}: global norm {float(got_norm):.5f}, expected {want_norm.item():.5f}")
        for i, (g, p) in enumerate(zip(got, params)):
            assert torch.allclose(g, p.grad, atol=1e-5), (
                f"max_norm={max_norm}: gradient {i} is {g.flatten()[:4].tolist()}..., "
                f"expected {p.grad.flatten()[:4].tolist()}... (one common scale for all tensors?)")


def _clip_per_tensor(grads, max_norm):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [g * min(1.0, max_norm / (g.norm().item() + 1e-6)) for g in grads], norm


def _clip_always_to_max(grads, max_norm):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [g * max_norm / (norm + 1e-6) for g in grads], norm


def _clip_with_sum_of_norms(grads, max_norm):
    norm = sum(g.norm() for g in grads)
    return [g * min(1.0, max_norm / (norm.item() + 1e-6)) for g in grads], norm


def _clip_with_rms(grads, max_norm):  # mean of squares instead of their sum
    norm = torch.sqrt(torch.cat([g.flatten() for g in grads]).pow(2).mean())
    return [g * min(1.0, max_norm / (norm.item() + 1e-6)) for g in grads], norm


# --- ex06: the sample-surprise experiment -------------------------------------------------------------------


@functools.cache
def shakespeare_bigram() -> torch.Tensor:
    """The counted bigram of the Shakespeare training split (part00's ex07, smoothing 1), log-probs (256, 256)."""
    data = torch.tensor(list(train_val_split(load_text("shakespeare"))[0].encode("utf-8")))
    counts = torch.bincount(data[:-1] * 256 + data[1:], minlength=256 * 256).view(256, 256).double() + 1.0
    return (counts / counts.sum(dim=1, keepdim=True)).log()


# The reference samples 4,000 tokens; over 5 seeds and 2,000 tokens it measured 2.73-2.77 bits at temperature
# 0.5, 3.62-3.65 at 1.0 (the real validation text: 3.60, so the model at temperature 1 writes text as
# surprising as Shakespeare's) and 5.41-5.50 at 1.5 (the smoothing's mass on rare bytes, flattened by the
# temperature). The ranges allow about 0.2 either side for other seeds and lengths. Bits counted in nats
# (2.51 at 1.0), or scored with the tempered instead of the model's distribution (2.33 at 0.5), fall outside.
SURPRISE_RANGES = {0.5: (2.55, 2.95), 1.0: (3.45, 3.8), 1.5: (5.1, 5.8)}


def check_ex06_sample_surprise(fn):
    log_probs = shakespeare_bigram()
    for temperature, (low, high) in SURPRISE_RANGES.items():
        got = fn(log_probs.clone(), temperature)
        assert isinstance(got, float), f"return a float (bits per token), got {type(got).__name__}"
        assert low <= got <= high, (
            f"temperature {temperature}: the sample's mean surprise is {got:.3f} bits per token; the reference "
            f"measured about {(low + high) / 2:.2f} and accepts {low}..{high} (sample at the temperature, score with "
            "the model's own log-probs at temperature 1, in bits)")


@functools.cache
def _solution_surprise(temperature):
    return solutions.ex06_sample_surprise(shakespeare_bigram(), temperature)


def _surprise_scored_tempered(log_probs, temperature):
    generator = torch.Generator().manual_seed(1)
    tempered = F.log_softmax(log_probs / temperature, dim=-1)
    current, bits = 10, 0.0
    for _ in range(2000):
        following = torch.multinomial(tempered[current].exp(), 1, generator=generator).item()
        bits += -tempered[current, following].item() / math.log(2)
        current = following
    return bits / 2000


def _surprise_greedy(log_probs, temperature):  # argmax every time: a loop of the likeliest bytes
    current, bits = 10, 0.0
    for _ in range(2000):
        following = int(log_probs[current].argmax())
        bits += -log_probs[current, following].item() / math.log(2)
        current = following
    return bits / 2000


CASES = [
    Exercise("ex01_utf8_encode", check_ex01_utf8_encode, wrong=[
        lambda text: [ord(ch) for ch in text],  # code points are not bytes
        lambda text: list(text.encode("latin-1", errors="replace")),
        _utf8_without_4_byte_case,
    ]),
    Exercise("ex02_cross_entropy", check_ex02_cross_entropy, wrong=[
        _ce_variant(reduce="sum"), _ce_variant(over_all_positions=True), _ce_variant(axis=1),
        _ce_variant(smoothing_over_others=True), _ce_variant(ignore_smoothing=True), _ce_variant(naive_log=True),
    ]),
    Exercise("ex03_top_p_mask", check_ex03_top_p_mask, wrong=[
        _top_p_excludes_crossing_token, _top_p_keeps_one_too_many_at_ties, _top_p_unsorted, _top_p_row_by_row]),
    Exercise("ex04_sample_without_multinomial", check_ex04_sample_without_multinomial, wrong=[
        _sampler_variant(noise="none"), _sampler_variant(noise="uniform"), _sampler_variant(noise="exponential_times"),
        _sampler_variant(temperature_on="multiply"), _sampler_variant(use_top_k=False),
        _sampler_gumbel_before_temperature,
    ]),
    Exercise("ex05_clip_grad_norm", check_ex05_clip_grad_norm, wrong=[
        _clip_per_tensor, _clip_always_to_max, _clip_with_sum_of_norms, _clip_with_rms]),
    Exercise("ex06_sample_surprise", check_ex06_sample_surprise, wrong=[
        lambda log_probs, t: _solution_surprise(t) * math.log(2),  # nats, not bits
        lambda log_probs, t: _solution_surprise(1 / t),  # multiplies by the temperature
        _surprise_scored_tempered, _surprise_greedy,
    ]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
