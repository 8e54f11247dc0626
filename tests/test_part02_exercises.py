"""Part 2 exercises: each check compares against an independent reference and rejects plausible slips."""
import torch
import torch.nn as nn
from torch.nn import functional as F

from part02_tiny_llm import exercises, solutions
from tests.harness import Exercise, exercise_tests

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


# --- ex02: batches with the shift -----------------------------------------------------------------


def check_ex02_get_batch(fn):
    data = (torch.arange(100) * 7) % 256  # distinct neighbours, so any shift error shows
    starts, block_size = torch.tensor([0, 5, 17, 90]), 9
    x, y = fn(data, starts, block_size)
    assert tuple(x.shape) == tuple(y.shape) == (4, block_size), f"x, y shapes {tuple(x.shape)}, {tuple(y.shape)}"
    for b, s in enumerate(starts.tolist()):
        want_x, want_y = data[s : s + block_size].tolist(), data[s + 1 : s + 1 + block_size].tolist()
        assert x[b].tolist() == want_x, f"x[{b}] should be data[{s}:{s + block_size}] = {want_x}, got {x[b].tolist()}"
        assert y[b].tolist() == want_y, (f"y[{b}] should be the next tokens data[{s + 1}:{s + 1 + block_size}] = "
                                         f"{want_y}, got {y[b].tolist()}")


def _batch_no_shift(data, starts, block_size):
    x = data[starts[:, None] + torch.arange(block_size)]
    return x, x


def _batch_shift_backwards(data, starts, block_size):
    positions = starts[:, None] + torch.arange(block_size)
    return data[positions], data[(positions - 1).clamp(min=0)]


def _batch_window_too_long(data, starts, block_size):
    window = data[starts[:, None] + torch.arange(block_size + 1)]
    return window, window[:, 1:]


# --- ex03: cross-entropy ---------------------------------------------------------------------------


def check_ex03_cross_entropy(fn):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(11, (3, 5), generator=gen)
    for name, t in [("no ignored positions", targets), ("some targets -1 (ignored)", targets.masked_fill(
            torch.rand(3, 5, generator=gen) < 0.3, -1))]:
        want = F.cross_entropy(logits.view(-1, 11), t.view(-1), ignore_index=-1)
        got = fn(logits, t)
        assert torch.is_tensor(got) and got.dim() == 0, f"return a 0-d tensor, got {got!r}"
        assert torch.allclose(got, want, atol=1e-5), f"{name}: loss {got.item():.6f}, expected {want.item():.6f}"


def _ce_sum(logits, targets):
    lp = F.log_softmax(logits.reshape(-1, logits.size(-1)), -1)
    t = targets.reshape(-1)
    keep = t != -1
    return -lp[keep].gather(1, t[keep][:, None]).sum()


def _ce_mean_over_all_positions(logits, targets):
    lp = F.log_softmax(logits.reshape(-1, logits.size(-1)), -1)
    t = targets.reshape(-1)
    keep = t != -1
    return -(lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * keep).sum() / t.numel()


def _ce_wrong_axis(logits, targets):
    lp = F.log_softmax(logits, dim=1)  # normalises over time, not the vocabulary
    t = targets.reshape(-1)
    keep = t != -1
    return -lp.reshape(-1, logits.size(-1))[keep].gather(1, t[keep][:, None]).mean()


# --- ex04 / ex05: sampling filters --------------------------------------------------------------------


def _reference_temperature_top_k(row: list[float], temperature: float, top_k):
    """A direct formula, one row at a time: exp(l / T) over the k largest, normalised."""
    kept = sorted(range(len(row)), key=lambda i: -row[i])[: top_k or len(row)]
    weights = {i: torch.tensor(row[i] / temperature, dtype=torch.float64).exp().item() for i in kept}
    total = sum(weights.values())
    return [weights.get(i, 0.0) / total for i in range(len(row))]


def check_ex04_temperature_top_k(fn):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, 1.0], [0.1, 0.2, -0.3, 0.4, -2.0, 1.5]], dtype=torch.float64)
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, 3), (0.7, 1), (1.3, 4)]:
        got = fn(logits, temperature, top_k)
        want = torch.tensor([_reference_temperature_top_k(r, temperature, top_k) for r in logits.tolist()],
                            dtype=torch.float64)
        assert tuple(got.shape) == tuple(want.shape), f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.allclose(got.to(torch.float64), want, atol=1e-6), (
            f"temperature={temperature}, top_k={top_k}: got {got.tolist()}, expected {want.tolist()}")


def _t_times_logits(logits, temperature, top_k):
    return solutions.ex04_temperature_top_k(logits * temperature * temperature, temperature, top_k)


def _top_k_without_renormalising(logits, temperature, top_k):
    probs = F.softmax(logits / temperature, dim=-1)
    if top_k is not None:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    return probs


def _top_k_plus_one(logits, temperature, top_k):
    return solutions.ex04_temperature_top_k(logits, temperature, None if top_k is None else top_k + 1)


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


def check_ex05_top_p_mask(fn):
    for probs, top_p in TOP_P_CASES:
        got = fn(torch.tensor(probs, dtype=torch.float64), top_p)
        want = [_reference_top_p(row, top_p) for row in probs]
        assert got.dtype == torch.bool, f"return a bool mask, got dtype {got.dtype}"
        assert got.tolist() == want, f"probs {probs}, top_p {top_p}: kept {got.tolist()}, expected {want}"


def _top_p_excludes_crossing_token(probs, top_p):  # keeps only tokens whose cumulative mass is <= p
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= top_p
    return keep.scatter(-1, order, keep)


def _top_p_keeps_one_too_many_at_ties(probs, top_p):
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs <= top_p
    return keep.scatter(-1, order, keep)


def _top_p_unsorted(probs, top_p):  # cumulative mass in vocabulary order, not by likelihood
    return probs.cumsum(-1) - probs < top_p


# --- ex06: weight-decay groups ------------------------------------------------------------------------


class TiedToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, as in GPT: one parameter, two modules


def check_ex06_split_decay_params(fn):
    decay, no_decay = fn(TiedToyModel())
    want_decay, want_no_decay = {"emb.weight", "fc.weight"}, {"fc.bias", "ln.weight", "ln.bias"}
    assert len(decay) == len(set(decay)) and len(no_decay) == len(set(no_decay)), (
        f"a parameter is listed twice: decay={decay}, no_decay={no_decay} (the tied weight counts once)")
    assert set(decay) == want_decay, f"decay group {sorted(decay)}, expected {sorted(want_decay)} (dim >= 2)"
    assert set(no_decay) == want_no_decay, f"no-decay group {sorted(no_decay)}, expected {sorted(want_no_decay)}"


def _decay_by_name(model):
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.endswith("weight")], [n for n in names if not n.endswith("weight")]


def _decay_only_linear(model):
    decay = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    decay = [n for n in dict.fromkeys(decay) if n in dict(model.named_parameters())]
    return decay, [n for n, _ in model.named_parameters() if n not in decay]


def _decay_with_duplicates(model):
    pairs = list(model.named_parameters(remove_duplicate=False))
    return [n for n, p in pairs if p.dim() >= 2], [n for n, p in pairs if p.dim() < 2]


# --- ex07: gradient clipping ----------------------------------------------------------------------------


def check_ex07_clip_grad_norm(fn):
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


CASES = [
    Exercise("ex01_utf8_encode", check_ex01_utf8_encode, wrong=[
        lambda text: [ord(ch) for ch in text],  # code points are not bytes
        lambda text: list(text.encode("latin-1", errors="replace")),
        _utf8_without_4_byte_case,
    ]),
    Exercise("ex02_get_batch", check_ex02_get_batch, wrong=[_batch_no_shift, _batch_shift_backwards,
                                                            _batch_window_too_long]),
    Exercise("ex03_cross_entropy", check_ex03_cross_entropy, wrong=[_ce_sum, _ce_mean_over_all_positions,
                                                                    _ce_wrong_axis]),
    Exercise("ex04_temperature_top_k", check_ex04_temperature_top_k, wrong=[
        _t_times_logits, _top_k_without_renormalising, _top_k_plus_one]),
    Exercise("ex05_top_p_mask", check_ex05_top_p_mask, wrong=[
        _top_p_excludes_crossing_token, _top_p_keeps_one_too_many_at_ties, _top_p_unsorted]),
    Exercise("ex06_split_decay_params", check_ex06_split_decay_params, wrong=[
        _decay_by_name, _decay_only_linear, _decay_with_duplicates,
        lambda model: ([n for n, _ in model.named_parameters()], []),  # decay everything
    ]),
    Exercise("ex07_clip_grad_norm", check_ex07_clip_grad_norm, wrong=[
        _clip_per_tensor, _clip_always_to_max, _clip_with_sum_of_norms, _clip_with_rms]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
