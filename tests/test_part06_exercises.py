"""Part 6 exercises: each check compares against an outside reference and rejects plausible slips."""
import functools
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from part04_scaling.bpe import get_tokenizer
from part06_sft import exercises, solutions
from part06_sft.model import GPT, GPTConfig
from part06_sft.template import chat_tokenizer, encode_example, encode_prompt, encode_text, render
from shared.tasks import Example, verify
from tests.harness import Exercise, exercise_tests

IGNORE = -100  # written out here, not imported: the value the loss skips is part of what is checked


def tiny_model(vocab_size: int = 50, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


@functools.cache
def tokenizer():
    return chat_tokenizer(get_tokenizer())  # part 4's BPE (cached in data/) + <|user|>, <|assistant|>, <|end|>


def _as_list(values) -> list[int]:
    return [int(v) for v in (values.tolist() if torch.is_tensor(values) else values)]


# --- ex01: the chat template ----------------------------------------------------------------------------


CHATS = [  # (prompt, answer, the text written out by hand)
    ("2 + 2 =", "4", "<|user|>2 + 2 =<|assistant|>4<|end|>"),
    ("2 + 2 =", None, "<|user|>2 + 2 =<|assistant|>"),
    ("Who speaks this line, HAMLET or HORATIO?\nTo be, or not to be, that is the question:", "HAMLET",
     "<|user|>Who speaks this line, HAMLET or HORATIO?\nTo be, or not to be, that is the question:"
     "<|assistant|>HAMLET<|end|>"),
    ("Reverse: a, b, c", None, "<|user|>Reverse: a, b, c<|assistant|>"),
    ("Sort: 3 1 2", "", "<|user|>Sort: 3 1 2<|assistant|><|end|>"),  # an empty answer still ends the turn
]


def check_ex01_render_chat(fn):
    for prompt, answer, want in CHATS:
        got = fn(prompt) if answer is None else fn(prompt, answer)
        assert got == want, f"prompt {prompt!r}, answer {answer!r}: got {got!r}, expected {want!r}"
    for prompt, answer, _ in CHATS:  # and the chapter's template agrees, on the same cases
        assert fn(prompt, answer) == render(prompt, answer), f"{prompt!r}, {answer!r}: differs from template.render"
        if answer is not None:
            assert fn(prompt, answer).startswith(fn(prompt)), (
                "the inference prompt (no answer) must be the beginning of the training text, so that the model "
                "continues exactly where training had the answer begin")


def _render_newline_after_assistant(prompt, answer=None):
    text = f"<|user|>{prompt}<|assistant|>\n"
    return text if answer is None else text + answer + "<|end|>"


def _render_without_end(prompt, answer=None):
    return f"<|user|>{prompt}<|assistant|>" + (answer or "")


def _render_end_always(prompt, answer=None):
    return f"<|user|>{prompt}<|assistant|>{answer or ''}<|end|>"


def _render_newlines_around_prompt(prompt, answer=None):
    text = f"<|user|>\n{prompt}\n<|assistant|>"
    return text if answer is None else text + answer + "<|end|>"


def _render_falsy_answer_as_none(prompt, answer=None):  # `if answer:` treats "" like None
    text = f"<|user|>{prompt}<|assistant|>"
    return text + answer + "<|end|>" if answer else text


# --- ex02: label masking ---------------------------------------------------------------------------------


def targets_by_position(prompt_ids, answer_ids):
    """Position by position: x[t] is token t; its target is token t + 1, kept only if that is an answer token."""
    sequence = list(prompt_ids) + list(answer_ids)
    x, y = [], []
    for t in range(len(sequence) - 1):
        x.append(sequence[t])
        y.append(sequence[t + 1] if t + 1 >= len(prompt_ids) else IGNORE)
    return x, y


MASK_CASES = [  # (prompt_ids, answer_ids, x, y) written out by hand
    ([1, 2, 3], [7, 8, 9], [1, 2, 3, 7, 8], [IGNORE, IGNORE, 7, 8, 9]),
    ([10, 11], [12], [10, 11], [IGNORE, 12]),  # an empty answer: only <|end|> is learned, at <|assistant|>
    ([4, 5, 5, 6], [6, 6], [4, 5, 5, 6, 6], [IGNORE, IGNORE, IGNORE, 6, 6]),  # repeated ids: positions count
]
CHAT_EXAMPLES = [("2 + 2 =", "4"), ("What is 417 + 162?", "579"),
                 ("Who speaks this line, HAMLET or HORATIO?\nTo be, or not to be, that is the question:", "HAMLET")]


def check_ex02_mask_labels(fn):
    for prompt_ids, answer_ids, want_x, want_y in MASK_CASES:
        x, y = (_as_list(v) for v in fn(list(prompt_ids), list(answer_ids)))
        assert (x, y) == (want_x, want_y), (f"prompt_ids {prompt_ids}, answer_ids {answer_ids}: got x {x}, y {y}; "
                                            f"expected x {want_x}, y {want_y}")
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):  # random lengths, against the position-by-position construction
        n_prompt, n_answer = (int(n) for n in torch.randint(1, 9, (2,), generator=rng))
        prompt_ids = torch.randint(0, 50, (n_prompt,), generator=rng).tolist()
        answer_ids = torch.randint(0, 50, (n_answer,), generator=rng).tolist()
        got = tuple(_as_list(v) for v in fn(list(prompt_ids), list(answer_ids)))
        want = targets_by_position(prompt_ids, answer_ids)
        assert got == want, f"prompt_ids {prompt_ids}, answer_ids {answer_ids}: got {got}, expected {want}"
    tok = tokenizer()
    for prompt, answer in CHAT_EXAMPLES:  # real chat ids, against the chapter's encode_example
        prompt_ids = encode_prompt(tok, prompt)
        answer_ids = encode_text(tok, answer) + [tok.special_tokens["<|end|>"]]
        got = tuple(_as_list(v) for v in fn(prompt_ids, answer_ids))
        want = encode_example(tok, prompt, answer)
        assert got == tuple(want), f"{prompt!r} -> {answer!r}: got {got}, template.encode_example gives {want}"
        first_target = next(t for t, target in enumerate(got[1]) if target != IGNORE)
        assert got[0][first_target] == tok.special_tokens["<|assistant|>"], (
            "the first answer token is predicted at <|assistant|>, the last prompt token")


def _mask_one_too_many(prompt_ids, answer_ids):  # masks the answer's first target as well
    sequence = prompt_ids + answer_ids
    return sequence[:-1], [IGNORE] * len(prompt_ids) + sequence[len(prompt_ids) + 1:]


def _mask_without_shift(prompt_ids, answer_ids):  # y is s, not s[1:]: each position "predicts" itself
    sequence = prompt_ids + answer_ids
    return sequence, [IGNORE] * len(prompt_ids) + answer_ids


def _mask_inputs_instead(prompt_ids, answer_ids):  # the prompt is hidden from the model's inputs, not its targets
    sequence = prompt_ids + answer_ids
    return [IGNORE] * (len(prompt_ids) - 1) + sequence[len(prompt_ids) - 1:-1], sequence[1:]


def _mask_nothing(prompt_ids, answer_ids):  # plain next-token targets: the model also learns to write prompts
    sequence = prompt_ids + answer_ids
    return sequence[:-1], sequence[1:]


# --- ex03: collate ---------------------------------------------------------------------------------------


PAD = 49  # neither 0 nor -100, so padding with either shows
COLLATE_EXAMPLES = [([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]),
                    ([6, 7], [IGNORE, 8]),
                    ([9, 10, 11, 12], [IGNORE, IGNORE, IGNORE, 13])]
COLLATE_X = [[1, 2, 3, 4, 5], [6, 7, PAD, PAD, PAD], [9, 10, 11, 12, PAD]]
COLLATE_Y = [[IGNORE, IGNORE, 3, 4, 5], [IGNORE, 8, IGNORE, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE, 13, IGNORE]]


def check_ex03_collate(fn):
    x, y = fn([(list(a), list(b)) for a, b in COLLATE_EXAMPLES], PAD)
    assert torch.is_tensor(x) and torch.is_tensor(y), "return two tensors"
    assert x.shape == y.shape == (3, 5), f"shapes {tuple(x.shape)}, {tuple(y.shape)}: expected (3, 5) (B, longest)"
    assert x.dtype == y.dtype == torch.long, f"dtypes {x.dtype}, {y.dtype}: token ids and targets are torch.long"
    assert x.tolist() == COLLATE_X, f"x {x.tolist()}, expected {COLLATE_X} (pad_id after the tokens: right padding)"
    assert y.tolist() == COLLATE_Y, f"y {y.tolist()}, expected {COLLATE_Y} (padding targets are -100)"
    # The loss of the padded batch is the mean over the real targets of all examples, each run alone unpadded
    model = tiny_model()
    examples = [(list(a), list(b)) for a, b in COLLATE_EXAMPLES]
    rng = torch.Generator().manual_seed(1)
    for n in (2, 9, 12, 4):  # and a few longer, random ones: prompts of 1 to 5 tokens, answers of 1 to 5
        n_prompt = 1 + n % 5
        ids = torch.randint(0, 48, (n + 1,), generator=rng).tolist()
        examples.append((ids[:-1], [IGNORE] * min(n_prompt, n - 1) + ids[1 + min(n_prompt, n - 1):]))
    total, count = 0.0, 0
    with torch.no_grad():
        for ex_x, ex_y in examples:
            logits, _ = model(torch.tensor([ex_x]))
            total += F.cross_entropy(logits[0], torch.tensor(ex_y), reduction="sum", ignore_index=IGNORE).item()
            count += sum(target != IGNORE for target in ex_y)
        batch_x, batch_y = fn(examples, PAD)
        _, loss = model(batch_x, batch_y)
    assert abs(loss.item() - total / count) < 1e-5, (
        f"the model's loss on your batch is {loss.item():.6f}, but the mean loss over the {count} real targets of "
        f"the examples run one by one is {total / count:.6f}: the padding must add nothing to the loss")


def _collate_padding_targets_with_pad_id(examples, pad_id):  # the model is trained to predict padding
    x, y = solutions.ex03_collate(examples, pad_id)
    return x, torch.where(x == pad_id, torch.full_like(y, pad_id), y)


def _collate_left(examples, pad_id):
    T = max(len(x) for x, _ in examples)
    xs = torch.tensor([[pad_id] * (T - len(x)) + x for x, _ in examples])
    ys = torch.tensor([[IGNORE] * (T - len(y)) + y for _, y in examples])
    return xs, ys


def _collate_padding_with_zeros(examples, pad_id):  # forgets pad_id: 0 is a real token id
    T = max(len(x) for x, _ in examples)
    return (torch.tensor([x + [0] * (T - len(x)) for x, _ in examples]),
            torch.tensor([y + [IGNORE] * (T - len(y)) for _, y in examples]))


def _collate_to_block_size(examples, pad_id, block_size=16):  # a fixed length: right values, wrong shape
    return (torch.tensor([x + [pad_id] * (block_size - len(x)) for x, _ in examples]),
            torch.tensor([y + [IGNORE] * (block_size - len(y)) for _, y in examples]))


# --- ex04: resizing the embeddings -------------------------------------------------------------------


def check_ex04_resize_embeddings(fn):
    model = tiny_model(vocab_size=50)
    old_rows = model.wte.weight.detach().clone()  # (50, 16)
    old_count = sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old_logits, _ = model(idx)  # (2, 8, 50)

    def chapter_method(*args, **kwargs):
        raise AssertionError("do not call model.resize_token_embeddings: it is the chapter's answer, write yours")

    model.resize_token_embeddings = chapter_method  # shadows the method, on this instance only
    fn(model, 53)
    weight = model.wte.weight
    assert tuple(weight.shape) == (53, 16), f"wte.weight has shape {tuple(weight.shape)}, expected (53, 16)"
    assert torch.equal(weight[:50].detach(), old_rows), "the old rows must be copied unchanged"
    mean_row = old_rows.sum(dim=0) / 50
    assert torch.allclose(weight[50:].detach(), mean_row.expand(3, -1), atol=1e-6), (
        "each new row should be the mean of the old rows (over the 50 tokens, not over the channels; not random, "
        f"not zero): new row 0 starts {weight[50, :4].tolist()}, the mean row {mean_row[:4].tolist()}")
    head = tuple(model.lm_head.weight.shape)
    assert head == (53, 16), f"lm_head.weight has shape {head}, expected (53, 16): the LM head must grow too"
    assert model.lm_head.weight is model.wte.weight, (
        "lm_head.weight must be the very Parameter of wte (tied, as before), not a copy of its values")
    assert model.config.vocab_size == 53, f"model.config.vocab_size is {model.config.vocab_size}, expected 53"
    new_count = sum(p.numel() for p in model.parameters())
    assert new_count == old_count + 3 * 16, (f"{new_count} parameters, expected {old_count} + 3 new rows of 16 = "
                                             f"{old_count + 48}: one shared matrix, not two")
    with torch.no_grad():
        logits, _ = model(idx)
    assert tuple(logits.shape) == (2, 8, 53), f"logits of shape {tuple(logits.shape)}, expected (2, 8, 53)"
    assert torch.allclose(logits[..., :50], old_logits, atol=1e-5), "the old tokens' logits must not change"
    assert torch.allclose(logits[..., 50:], old_logits.mean(dim=-1, keepdim=True).expand(-1, -1, 3), atol=1e-5), (
        "a new token's logit should be the mean of the old logits (its row is their mean)")
    _, loss = model(torch.tensor([[50, 51, 3]]), torch.tensor([[52, 1, 51]]))  # the new ids work, in and out
    loss.backward()
    assert weight.requires_grad and weight.grad is not None, "the new embedding must be a trainable Parameter"
    try:
        fn(model, 40)
    except ValueError:
        pass
    else:
        raise AssertionError("shrinking the vocabulary (53 -> 40) should raise ValueError")


def _resize(model, new_vocab_size, new_rows=lambda old, n: old.mean(dim=0).expand(n, -1), tie=True,
            grow_head=True):
    old = model.wte.weight.detach()
    if new_vocab_size < old.size(0):
        raise ValueError("cannot shrink")
    wte = nn.Embedding(new_vocab_size, old.size(1))
    with torch.no_grad():
        wte.weight[: old.size(0)] = old
        wte.weight[old.size(0):] = new_rows(old, new_vocab_size - old.size(0))
    model.wte = wte
    if grow_head:
        model.lm_head = nn.Linear(old.size(1), new_vocab_size, bias=False)
        if tie:
            model.lm_head.weight = wte.weight
        else:
            with torch.no_grad():
                model.lm_head.weight.copy_(wte.weight)  # equal values today, two matrices after one step
    model.config.vocab_size = new_vocab_size


def _resize_random_rows(model, new_vocab_size):
    _resize(model, new_vocab_size, new_rows=lambda old, n: 0.02 * torch.randn(n, old.size(1)))


def _resize_zero_rows(model, new_vocab_size):
    _resize(model, new_vocab_size, new_rows=lambda old, n: torch.zeros(n, old.size(1)))


def _resize_untied(model, new_vocab_size):
    _resize(model, new_vocab_size, tie=False)


def _resize_embedding_only(model, new_vocab_size):  # the LM head still has 50 outputs
    _resize(model, new_vocab_size, grow_head=False)


def _resize_without_shrink_check(model, new_vocab_size):  # slices the old rows away silently
    old = model.wte.weight.detach()
    if new_vocab_size < old.size(0):
        model.wte = nn.Embedding.from_pretrained(old[:new_vocab_size].clone(), freeze=False)
        model.lm_head = nn.Linear(old.size(1), new_vocab_size, bias=False)
        model.lm_head.weight = model.wte.weight
        model.config.vocab_size = new_vocab_size
        return
    _resize(model, new_vocab_size)


# --- ex05: the integer verifier ----------------------------------------------------------------------------


VERIFY_CASES = [  # (gold, response)
    ("579", "579"), ("579", " 579 "), ("579", "579."), ("579", "579 ."), ("579", "579\n123"), ("579", "579<|end|>"),
    ("579", "579<|end|>5"), ("579", "+579"), ("579", "0579"), ("579", "The answer is 579"), ("579", "579 580"),
    ("579", "57 9"), ("579", "5.79"), ("579", "579.0"), ("579", ""), ("579", "578"), ("579", "\n579"),
    ("579", "579..."), ("579", "579!"), ("579", "579\t\n"), ("579", "579 is the answer"), ("579", "-579"),
    ("579", "579<|assistant|>579"), ("579", " 5 7 9 "), ("579", "five hundred seventy-nine"), ("579", "579579"),
    ("0", "0"), ("0", "-0"), ("0", "00"), ("0", "O"), ("3", "3.\n4"), ("3", "3 <|end|>"), ("3", "The answer is: 3"),
    ("12", "12,"), ("12", "1 2"), ("12", "12\r\n"), ("12", "  12  .  "), ("7", "7 7"), ("7", "<|end|>7"),
]


def check_ex05_verify_integer(fn):
    for gold, response in VERIFY_CASES:
        want = verify(Example("add", "What is it?", gold), response)
        got = fn(gold, response)
        assert isinstance(got, float), f"return a float (1.0 or 0.0), got {got!r}"
        assert got == want, f"gold {gold!r}, response {response!r}: got {got}, shared.tasks.verify gives {want}"
    rng = torch.Generator().manual_seed(0)
    for a, b in torch.randint(100, 1000, (50, 2), generator=rng).tolist():  # add's answers, right and off by one
        for response in (f"{a + b}<|end|>", f"{a + b + 1}<|end|>", f"{a + b}\n{a} + {b}"):
            want = verify(Example("add", f"What is {a} + {b}?", str(a + b)), response)
            assert fn(str(a + b), response) == want, f"{a} + {b}: response {response!r} should score {want}"


def _verify_search(gold, response):  # finds the number anywhere: accepts "The answer is 579"
    match = re.search(r"[+-]?\d+", response)
    return float(match is not None and int(match.group()) == int(gold))


def _verify_whole_response(gold, response):  # no cut at the newline or the special token
    text = response.strip()
    text = text[:-1] if text.endswith(".") else text
    return float(re.fullmatch(r"[+-]?\d+", text) is not None and int(text) == int(gold))


def _verify_no_newline_cut(gold, response):  # cuts at "<|" but reads on past the newline
    return solutions.ex05_verify_integer(gold, response.replace("\n", " "))


def _verify_string_equality(gold, response):  # "0579" and "+579" are the number 579 too
    return float(solutions._answer_text(response) == gold)


def _verify_keeps_full_stop(gold, response):
    text = " ".join(response.split("\n", 1)[0].split("<|", 1)[0].split())
    return float(re.fullmatch(r"[+-]?\d+", text) is not None and int(text) == int(gold))


# --- ex06: curriculum pacing -------------------------------------------------------------------------------


def sqrt_pacing(t, T, c0):
    """Platanios et al. (2019), eq. 7: c_sqrt(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2))."""
    return min(1.0, math.sqrt(t * (1 - c0 ** 2) / T + c0 ** 2))


def check_ex06_competence(fn):
    for T, c0 in ((100, 0.1), (100, 0.01), (37, 0.5), (1, 0.1)):
        for t in range(0, 2 * T + 3):
            got, want = fn(t, T, c0), sqrt_pacing(t, T, c0)
            assert isinstance(got, float), f"return a float, got {got!r}"
            assert abs(got - want) < 1e-9, f"it={t}, curriculum_iters={T}, c0={c0}: got {got}, expected {want}"
    assert abs(fn(0, 100) - 0.1) < 1e-12, "the default c0 is 0.1: competence 0.1 at step 0"
    assert abs(fn(25, 100) - math.sqrt(0.25 * 0.99 + 0.01)) < 1e-9, "with the default c0 = 0.1"
    for it in (0, 5, 1000):
        assert fn(it, 0) == 1.0, f"curriculum_iters = 0 means no curriculum: competence 1.0, got {fn(it, 0)} at {it}"
    # The property that names it: c(t)^2 grows linearly, so the pool grows fast at first and slower later
    first, second = fn(10, 100) - fn(0, 100), fn(60, 100) - fn(50, 100)
    assert first > 2 * second, f"the first 10 steps should admit much more than steps 50-60: {first} vs {second}"


def _competence_linear(it, curriculum_iters, c0=0.1):
    if curriculum_iters <= 0 or it >= curriculum_iters:
        return 1.0
    return c0 + (1 - c0) * it / curriculum_iters


def _competence_sqrt_without_c0(it, curriculum_iters, c0=0.1):  # starts from nothing: an empty pool at step 0
    if curriculum_iters <= 0:
        return 1.0
    return min(1.0, math.sqrt(it / curriculum_iters))


def _competence_sqrt_shifted(it, curriculum_iters, c0=0.1):  # c0 + (1 - c0) sqrt(t / T): a square root, wrong one
    if curriculum_iters <= 0:
        return 1.0
    return min(1.0, c0 + (1 - c0) * math.sqrt(it / curriculum_iters))


def _competence_unclamped(it, curriculum_iters, c0=0.1):  # goes past 1 after curriculum_iters
    if curriculum_iters <= 0:
        return 1.0
    return math.sqrt(it * (1 - c0 ** 2) / curriculum_iters + c0 ** 2)


# --- ex07: left padding --------------------------------------------------------------------------------


PROMPTS = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14], [15, 16, 17, 18, 19, 20]]
LEFT_IDS = [[5, 6, 7, 8, 9, 10], [PAD] * 5 + [11], [PAD, PAD, PAD, 12, 13, 14], [15, 16, 17, 18, 19, 20]]
LEFT_MASK = [[True] * 6, [False] * 5 + [True], [False] * 3 + [True] * 3, [True] * 6]


def check_ex07_left_pad(fn):
    ids, padding_mask = fn([list(p) for p in PROMPTS], PAD)
    assert torch.is_tensor(ids) and torch.is_tensor(padding_mask), "return two tensors"
    assert ids.shape == padding_mask.shape == (4, 6), (f"shapes {tuple(ids.shape)}, {tuple(padding_mask.shape)}: "
                                                       "expected (4, 6) (B, longest prompt)")
    assert ids.dtype == torch.long, f"ids are token ids: torch.long, got {ids.dtype}"
    assert padding_mask.dtype == torch.bool, f"padding_mask is torch.bool (True = real token), got {padding_mask.dtype}"
    assert ids.tolist() == LEFT_IDS, f"ids {ids.tolist()}, expected {LEFT_IDS} (pad_id before the prompt)"
    assert padding_mask.tolist() == LEFT_MASK, f"padding_mask {padding_mask.tolist()}, expected {LEFT_MASK}"
    # Generation equivalence: each row's next-token logits (what generate samples from) equal those of its
    # prompt run alone, with and without the KV cache.
    model = tiny_model()
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([p]))[0][0, -1] for p in PROMPTS])  # (4, vocab)
        batched = model(ids, padding_mask=padding_mask)[0][:, -1]
        cached = model(ids, kv_cache=model.new_kv_cache(4), padding_mask=padding_mask)[0][:, -1]
    for name, logits in (("forward", batched), ("forward with a KV cache", cached)):
        worst = (logits - alone).abs().amax(dim=-1)
        assert torch.allclose(logits, alone, atol=1e-5), (
            f"{name}: the batch's next-token logits differ from those of each prompt run alone, by up to "
            f"{worst.tolist()} per row")


def _pad_right(prompts, pad_id):
    T = max(len(p) for p in prompts)
    return (torch.tensor([p + [pad_id] * (T - len(p)) for p in prompts]),
            torch.tensor([[True] * len(p) + [False] * (T - len(p)) for p in prompts]))


def _pad_left_mask_inverted(prompts, pad_id):  # True marks the padding
    ids, mask = solutions.ex07_left_pad(prompts, pad_id)
    return ids, ~mask


def _pad_left_mask_all_true(prompts, pad_id):  # the right ids, but attention sees the padding
    ids, mask = solutions.ex07_left_pad(prompts, pad_id)
    return ids, torch.ones_like(mask)


def _pad_left_with_zeros(prompts, pad_id):
    return solutions.ex07_left_pad(prompts, 0)


def _pad_left_int_mask(prompts, pad_id):  # 1/0 instead of True/False
    ids, mask = solutions.ex07_left_pad(prompts, pad_id)
    return ids, mask.long()


CASES = [
    Exercise("ex01_render_chat", check_ex01_render_chat, wrong=[
        _render_newline_after_assistant, _render_without_end, _render_end_always, _render_newlines_around_prompt,
        _render_falsy_answer_as_none]),
    Exercise("ex02_mask_labels", check_ex02_mask_labels, wrong=[
        _mask_one_too_many, _mask_without_shift, _mask_inputs_instead, _mask_nothing]),
    Exercise("ex03_collate", check_ex03_collate, wrong=[
        _collate_padding_targets_with_pad_id, _collate_left, _collate_padding_with_zeros, _collate_to_block_size]),
    Exercise("ex04_resize_embeddings", check_ex04_resize_embeddings, wrong=[
        _resize_random_rows, _resize_zero_rows, _resize_untied, _resize_embedding_only, _resize_without_shrink_check,
        lambda model, n: model.resize_token_embeddings(n)]),  # the chapter's method: not the exercise
    Exercise("ex05_verify_integer", check_ex05_verify_integer, wrong=[
        _verify_search, _verify_whole_response, _verify_no_newline_cut, _verify_string_equality,
        _verify_keeps_full_stop]),
    Exercise("ex06_competence", check_ex06_competence, wrong=[
        _competence_linear, _competence_sqrt_without_c0, _competence_sqrt_shifted, _competence_unclamped]),
    Exercise("ex07_left_pad", check_ex07_left_pad, wrong=[
        _pad_right, _pad_left_mask_inverted, _pad_left_mask_all_true, _pad_left_with_zeros, _pad_left_int_mask]),
]

(test_solution, test_exercise,
 test_check_rejects_wrong, test_every_exercise_is_checked) = exercise_tests(exercises, solutions, CASES)
