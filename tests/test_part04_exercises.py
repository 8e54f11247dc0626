"""Part 4 exercises: each check compares against an independent reference and rejects plausible slips."""
import io
import math
import random
import warnings

import regex
import torch

from part04_scaling import exercises, solutions
from part04_scaling.bpe import GPT4_SPLIT_PATTERN, train_naive
from part04_scaling.model import GPT, GPTConfig
from part04_scaling.train import TrainConfig, lr_at
from tests.harness import Exercise, exercise_tests

# --- ex01: pair counts ------------------------------------------------------------------------------------

STATS_CASES = [[], [5], [1, 2], [1, 2, 3, 1, 2], [7, 7, 7], [7, 7, 7, 7], [3, 3, 4, 3, 3, 4, 3],
               random.Random(0).choices(range(6), k=200)]


def _reference_stats(ids):  # by brute force: for every distinct pair, count the positions where it starts
    pairs = {(ids[i], ids[i + 1]) for i in range(len(ids) - 1)}
    return {p: sum(1 for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == p) for p in pairs}


def _short(ids) -> str:
    return str(ids) if len(ids) < 20 else str(ids[:8])[:-1] + ", ...]"


def _short_counts(counts: dict) -> str:
    items = sorted(counts.items())
    return str(dict(items)) if len(items) < 10 else str(dict(items[:6]))[:-1] + ", ...}"


def check_ex01_get_stats(fn):
    for ids in STATS_CASES:
        got, want = fn(list(ids)), _reference_stats(ids)
        assert isinstance(got, dict), f"return a dict {{(a, b): count}}, got {type(got).__name__}"
        got = {pair: count for pair, count in got.items() if count}
        assert got == want, (f"get_stats({_short(ids)}) gave {_short_counts(got)}, expected "
                             f"{_short_counts(want)} (every adjacent position counts: [7, 7, 7] has (7, 7) "
                             "twice)")


def _stats_non_overlapping(ids):  # counts as if merging: after a (7, 7) the next 7 starts afresh
    counts, i = {}, 0
    while i < len(ids) - 1:
        pair = (ids[i], ids[i + 1])
        counts[pair] = counts.get(pair, 0) + 1
        i += 2 if pair[0] == pair[1] else 1
    return counts


def _stats_skipping_the_last_pair(ids):
    return solutions.ex01_get_stats(ids[:-1])


def _stats_presence_only(ids):
    return {pair: 1 for pair in zip(ids, ids[1:])}


# --- ex02: one merge -------------------------------------------------------------------------------------


def _reference_merge(ids, pair, new_id):
    """Python's str.replace, which also replaces left to right without overlaps: one character per id."""
    as_text = "".join(map(chr, ids))
    return [ord(ch) for ch in as_text.replace(chr(pair[0]) + chr(pair[1]), chr(new_id))]


MERGE_CASES = [([1, 2, 3, 1, 2], (1, 2), 256), ([7, 7, 7], (7, 7), 9), ([7, 7, 7, 7], (7, 7), 9),
               ([7, 7, 7, 7, 7], (7, 7), 300), ([1, 2, 1, 2, 2], (2, 1), 256), ([], (1, 2), 256), ([1], (1, 2), 256),
               ([5, 6, 5, 6], (6, 5), 256), (random.Random(1).choices(range(3), k=300), (1, 1), 1000)]


def check_ex02_merge(fn):
    for ids, pair, new_id in MERGE_CASES:
        original = list(ids)
        got, want = fn(ids, pair, new_id), _reference_merge(ids, pair, new_id)
        assert ids == original, "merge changed its input list; return a new one"
        assert list(got) == want, (f"merge({_short(ids)}, {pair}, {new_id}) gave {_short(list(got))}, expected "
                                   f"{_short(want)} (left to right; a merged id is used once)")


def _merge_every_position(ids, pair, new_id):  # steps by 1 after a match: [7, 7, 7] -> [9, 9, 7]
    out, i = [], 0
    while i < len(ids):
        out.append(new_id if tuple(ids[i:i + 2]) == tuple(pair) else ids[i])
        i += 1
    return out


def _merge_right_to_left(ids, pair, new_id):
    return solutions.ex02_merge(ids[::-1], pair[::-1], new_id)[::-1]


def _merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


# --- ex03: a BPE trainer -----------------------------------------------------------------------------------

BPE_TEXTS = [
    ("aaabdaaabac", 3),  # the textbook example: (a, a) first, then a tie (a, b) vs (256, a): the smaller pair wins
    ("ab ab ab ab ba ba", 10),  # runs out of pairs after 3 merges: stop early
    ("O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n" * 3
     + "naïve café, déjà vu: ça va? 12345 apples.\n", 40),  # digits, ties, a few multi-byte characters
    ("café crème, thé, déjà vu, été; " * 4, 12),  # frequent multi-byte characters: é is the 2 bytes C3 A9
]


def check_ex03_train_bpe(fn):
    for text, n_merges in BPE_TEXTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference warns when a text runs out of pairs
            want = train_naive(text, 256 + n_merges, special_tokens=(), pattern=GPT4_SPLIT_PATTERN,
                               verbose=False).merges
        got = [tuple(pair) for pair in fn(text, n_merges)]
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert got == want, (f"{text[:30]!r}... with {n_merges} merges: merge {first_diff} is "
                             f"{got[first_diff] if first_diff < len(got) else 'missing'}, expected "
                             f"{want[first_diff] if first_diff < len(want) else 'none (no pairs left)'}; "
                             f"expected merges {want[:first_diff + 3]}...")


def _chunk_bytes(text):
    return [list(chunk.encode("utf-8")) for chunk in regex.findall(GPT4_SPLIT_PATTERN, text)]


def _bpe_on_chunks(chunks, n_merges, pick=lambda counts: min(counts, key=lambda p: (-counts[p], p))):
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = {}
        for ids in chunks:
            for pair, count in solutions.ex01_get_stats(ids).items():
                counts[pair] = counts.get(pair, 0) + count
        if not counts:
            break
        pair = pick(counts)
        chunks = [solutions.ex02_merge(ids, pair, new_id) for ids in chunks]
        merges.append(pair)
    return merges


def _bpe_first_seen_on_tie(text, n_merges):  # max() keeps the first of equal counts: depends on the text order
    return _bpe_on_chunks(_chunk_bytes(text), n_merges, pick=lambda counts: max(counts, key=counts.get))


def _bpe_largest_on_tie(text, n_merges):
    return _bpe_on_chunks(_chunk_bytes(text), n_merges, pick=lambda counts: max(counts, key=lambda p: (counts[p], p)))


def _bpe_without_chunks(text, n_merges):  # the whole text as one sequence: merges cross word boundaries
    return _bpe_on_chunks([list(text.encode("utf-8"))], n_merges)


def _bpe_code_points(text, n_merges):  # ord(ch) is not a byte: "\u00e9" is 233 (one id, not two), "\u20ac" 8364
    return _bpe_on_chunks([[ord(ch) for ch in chunk] for chunk in regex.findall(GPT4_SPLIT_PATTERN, text)], n_merges)


def _bpe_counting_once(text, n_merges):  # the n most frequent byte pairs of the text, never recounted
    counts = {}
    for ids in _chunk_bytes(text):
        for pair, count in solutions.ex01_get_stats(ids).items():
            counts[pair] = counts.get(pair, 0) + count
    return sorted(counts, key=lambda p: (-counts[p], p))[:n_merges]


# --- ex04: warmup + cosine ----------------------------------------------------------------------------------

# (warmup_iters, decay_iters, lr, min_lr)
SCHEDULES = [(10, 110, 1.0, 0.1), (100, 3000, 2e-3, 2e-4), (0, 50, 6e-4, 6e-5)]


def _reference_lr(it, warmup_iters, decay_iters, lr, min_lr):
    """train.lr_at, the chapter's schedule, with the cosine shape."""
    cfg = TrainConfig(lr_schedule="cosine", learning_rate=lr, min_lr=min_lr, warmup_iters=warmup_iters,
                      max_iters=decay_iters, lr_decay_iters=decay_iters)
    return lr_at(it, cfg)


def check_ex04_lr_warmup_cosine(fn):
    for warmup_iters, decay_iters, lr, min_lr in SCHEDULES:
        middle = (warmup_iters + decay_iters) // 2
        quarter = warmup_iters + (decay_iters - warmup_iters) // 4
        steps = sorted({0, 1, max(0, warmup_iters - 1), warmup_iters, warmup_iters + 1, quarter, middle,
                        decay_iters - 1, decay_iters, decay_iters + 100})
        for it in steps:
            want = _reference_lr(it, warmup_iters, decay_iters, lr, min_lr)
            if warmup_iters <= it <= decay_iters:  # the direct formula agrees with train.lr_at
                progress = (it - warmup_iters) / (decay_iters - warmup_iters)
                assert math.isclose(want, min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2)
            got = fn(it, warmup_iters, decay_iters, lr, min_lr)
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15), (
                f"warmup_iters={warmup_iters}, decay_iters={decay_iters}, lr={lr}, min_lr={min_lr}: step {it} got "
                f"{got:.6g}, expected {want:.6g}")


def _lr_warmup_from_zero(it, warmup_iters, decay_iters, lr, min_lr):  # step 0 learns nothing
    if it < warmup_iters:
        return lr * it / warmup_iters
    return solutions.ex04_lr_warmup_cosine(it, warmup_iters, decay_iters, lr, min_lr)


def _lr_cosine_to_zero(it, warmup_iters, decay_iters, lr, min_lr):  # min_lr only after the end: a jump
    if warmup_iters <= it < decay_iters:
        return solutions.ex04_lr_warmup_cosine(it, warmup_iters, decay_iters, lr, 0.0)
    return solutions.ex04_lr_warmup_cosine(it, warmup_iters, decay_iters, lr, min_lr)


def _lr_decay_from_step_zero(it, warmup_iters, decay_iters, lr, min_lr):  # the cosine ignores the warmup
    if warmup_iters <= it < decay_iters:
        return min_lr + 0.5 * (1 + math.cos(math.pi * it / decay_iters)) * (lr - min_lr)
    return solutions.ex04_lr_warmup_cosine(it, warmup_iters, decay_iters, lr, min_lr)


# --- ex05: gradient accumulation ----------------------------------------------------------------------------


def _tiny_gpt(dropout: float = 0.0, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, dropout=dropout))


def _token_batches(n: int, batch_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(50, (batch_size, 16), generator=gen), torch.randint(50, (batch_size, 16), generator=gen))
            for _ in range(n)]


def check_ex05_accumulate_gradients(fn):
    micro = _token_batches(3, 2)
    model = _tiny_gpt()
    x, y = torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])  # the reference: one batch of 6
    _, big_loss = model(x, y)
    big_loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got_loss = fn(model, micro)
    assert isinstance(got_loss, float), f"return the loss as a float (loss.item()), got {type(got_loss).__name__}"
    assert math.isclose(got_loss, big_loss.item(), rel_tol=1e-6), (
        f"returned loss {got_loss:.6f}, expected {big_loss.item():.6f}: the mean over all micro-batches")
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}.grad is None: call backward on every micro-batch's loss"
        ratio = (p.grad.norm() / want[name].norm()).item()
        assert torch.allclose(p.grad, want[name], rtol=1e-5, atol=1e-7), (
            f"{name}.grad differs from one batch of 6 (its norm is {ratio:.3f}x the expected one; divide each "
            "loss by the number of micro-batches, and do not zero the gradients in between)")


def _accumulate_without_dividing(model, micro_batches):  # k times too big a gradient
    losses = []
    for x, y in micro_batches:
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def _accumulate_returning_the_last_loss(model, micro_batches):
    solutions.ex05_accumulate_gradients(model, micro_batches)
    _, loss = model(*micro_batches[-1])
    return loss.item()


def _accumulate_zeroing_in_between(model, micro_batches):  # only the last micro-batch survives
    total = 0.0
    for x, y in micro_batches:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        total += loss.item() / len(micro_batches)
    return total


def _accumulate_dividing_by_batch_size(model, micro_batches):
    total = 0.0
    for x, y in micro_batches:
        _, loss = model(x, y)
        (loss / x.size(0)).backward()
        total += loss.item() / len(micro_batches)
    return total


# --- ex06: exact resume ---------------------------------------------------------------------------------------

TOTAL_STEPS, STOP_AT = 6, 3
RESUME_DATA = torch.randint(50, (2000,), generator=torch.Generator().manual_seed(3))


def _fresh_run(model_seed: int):
    """A new model (with dropout, so the global random state matters), its AdamW, the batch generator."""
    model = _tiny_gpt(dropout=0.1, seed=model_seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1)


def _train_steps(model, optimizer, generator, start: int, stop: int) -> None:
    """A training loop in miniature: a warmup schedule, random windows, dropout, AdamW."""
    for it in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * min(1.0, (it + 1) / 4)
        starts = torch.randint(len(RESUME_DATA) - 17, (4,), generator=generator)
        windows = RESUME_DATA[starts[:, None] + torch.arange(17)]
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def check_ex06_resume(fn):
    with torch.random.fork_rng(devices=[]):  # leave the global random state as we found it
        torch.manual_seed(2)
        model, optimizer, generator = _fresh_run(model_seed=0)
        torch.manual_seed(2)
        _train_steps(model, optimizer, generator, 0, TOTAL_STEPS)
        uninterrupted = {name: t.clone() for name, t in model.state_dict().items()}

        model, optimizer, generator = _fresh_run(model_seed=0)
        torch.manual_seed(2)
        _train_steps(model, optimizer, generator, 0, STOP_AT)
        buffer = io.BytesIO()  # through torch.save / torch.load, as train.py does it
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": STOP_AT,
                    "rng": {"torch": torch.get_rng_state(), "batches": generator.get_state()}}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)

        model, optimizer, generator = _fresh_run(model_seed=99)  # another process, days later
        torch.manual_seed(12345)
        start = fn(checkpoint, model, optimizer, generator)
        assert start == STOP_AT, f"returned step {start}; the checkpoint's next step is iter_num = {STOP_AT}"
        for name, t in model.state_dict().items():
            assert torch.equal(t, checkpoint["model"][name]), f"{name} was not restored: load the model's state_dict"
        assert optimizer.state, "the optimizer state is empty: AdamW's moments must be restored too"
        assert torch.equal(generator.get_state(), checkpoint["rng"]["batches"]), (
            "the batch generator restarts from its seed: restore its state, or the resumed run trains on "
            "the batches it has already seen")
        assert torch.equal(torch.get_rng_state(), checkpoint["rng"]["torch"]), (
            "the global random state (dropout masks) was not restored: torch.set_rng_state")
        _train_steps(model, optimizer, generator, start, TOTAL_STEPS)
        for name, t in model.state_dict().items():
            assert torch.equal(t, uninterrupted[name]), f"{name}: the resumed run differs from an uninterrupted one"


def _resume_without(*skipped):
    def resume(checkpoint, model, optimizer, generator):
        model.load_state_dict(checkpoint["model"])
        if "optimizer" not in skipped:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if "batches" not in skipped:
            generator.set_state(checkpoint["rng"]["batches"])
        if "torch" not in skipped:
            torch.set_rng_state(checkpoint["rng"]["torch"])
        return checkpoint["iter_num"]
    return resume


def _resume_one_step_later(checkpoint, model, optimizer, generator):  # as if iter_num were the last step done
    return solutions.ex06_resume(checkpoint, model, optimizer, generator) + 1


# --- ex07: int8 quantization ------------------------------------------------------------------------------------


def _weights():
    gen = torch.Generator().manual_seed(0)
    row_scales = torch.tensor([1e-3, 0.05, 1.0, 30.0, 0.2, 1.0])[:, None]  # rows of very different sizes
    w = torch.randn(6, 48, generator=gen) * row_scales
    w[2, 7] = 9.0  # an outlier
    w[5] = -w[5].abs()  # a row whose largest entry is negative
    return torch.cat([w, torch.zeros(1, 48)])  # and a row of zeros


def check_ex07_int8_quantize_per_channel(fn):
    w = _weights()
    q, scale = fn(w.clone())
    assert q.dtype == torch.int8 and tuple(q.shape) == tuple(w.shape), (
        f"q should be int8 of shape {tuple(w.shape)}, got {q.dtype} {tuple(q.shape)}")
    assert scale.numel() == w.size(0), (f"one scale per output row: expected shape ({w.size(0)},), got "
                                        f"{tuple(scale.shape)}")
    scale, q = scale.reshape(-1, 1).double(), q.double()
    assert torch.isfinite(scale).all() and (q[-1] == 0).all(), "a row of zeros should give q = 0 and a finite scale"
    w64, live = w[:-1].double(), slice(0, w.size(0) - 1)  # the direct formula, in float64, on the non-zero rows
    want_scale = w64.abs().amax(dim=1, keepdim=True) / 127
    want_q = torch.round(w64 / want_scale)
    assert torch.allclose(scale[live], want_scale, rtol=1e-5, atol=0), (
        f"scales {scale[live].flatten().tolist()}, expected max|row| / 127 = {want_scale.flatten().tolist()}")
    assert (q[live].abs().amax(dim=1) == 127).all(), (
        f"each row's largest |w| should map to 127, got row maxima {q[live].abs().amax(dim=1).tolist()}")
    error = (q[live] * scale[live] - w64).abs()
    worst = (error / scale[live]).max().item()
    assert worst <= 0.5 + 1e-4, f"|q * scale - w| reaches {worst:.3f} * scale; rounding to nearest gives at most 0.5"
    mismatches = (q[live] != want_q).float().mean().item()
    assert mismatches < 0.01 and (q[live] - want_q).abs().max() <= 1, (
        f"{mismatches:.1%} of the entries differ from round(w / scale)")


def _quantize_per_tensor(w):  # one scale for the whole matrix: the small rows round to 0
    scale = w.abs().max().clamp(min=1e-12) / 127
    return torch.round(w / scale).to(torch.int8), scale.expand(w.size(0), 1).float()


def _quantize_with_128(w):  # int8 goes down to -128, but +128 does not fit: a row's positive maximum would clip
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 128
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale


def _quantize_truncating(w):  # .to(torch.int8) rounds toward zero: errors up to a whole scale
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (w / scale).to(torch.int8), scale


def _quantize_flooring(w):  # floor rounds down: biased toward -infinity
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.floor(w / scale).clamp(-127, 127).to(torch.int8), scale


def _quantize_per_column(w):  # the max over the wrong axis (per input channel)
    scale = w.abs().amax(dim=0, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w / scale).to(torch.int8), scale


CASES = [
    Exercise("ex01_get_stats", check_ex01_get_stats, wrong=[
        _stats_non_overlapping, _stats_skipping_the_last_pair, _stats_presence_only]),
    Exercise("ex02_merge", check_ex02_merge, wrong=[_merge_every_position, _merge_right_to_left, _merge_first_only]),
    Exercise("ex03_train_bpe", check_ex03_train_bpe, wrong=[
        _bpe_first_seen_on_tie, _bpe_largest_on_tie, _bpe_without_chunks, _bpe_code_points, _bpe_counting_once]),
    Exercise("ex04_lr_warmup_cosine", check_ex04_lr_warmup_cosine, wrong=[
        _lr_warmup_from_zero, _lr_cosine_to_zero, _lr_decay_from_step_zero]),
    Exercise("ex05_accumulate_gradients", check_ex05_accumulate_gradients, wrong=[
        _accumulate_without_dividing, _accumulate_returning_the_last_loss, _accumulate_zeroing_in_between,
        _accumulate_dividing_by_batch_size]),
    Exercise("ex06_resume", check_ex06_resume, wrong=[
        _resume_without("batches"), _resume_without("optimizer"), _resume_without("torch"), _resume_one_step_later]),
    Exercise("ex07_int8_quantize_per_channel", check_ex07_int8_quantize_per_channel, wrong=[
        _quantize_per_tensor, _quantize_with_128, _quantize_truncating, _quantize_flooring, _quantize_per_column]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
