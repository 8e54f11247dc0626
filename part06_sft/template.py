"""The chat template, and what SFT does with it: special tokens, label masking, padding, curriculum order.

A pretrained model continues text. To make it answer, we show it thousands of conversations written in
one fixed format, the chat template, and train it on the answers:

    <|user|>Who speaks this line, HAMLET or HORATIO?
    To be, or not to be, that is the question:<|assistant|>HAMLET<|end|>

<|user|>, <|assistant|> and <|end|> are special tokens: new ids added to part 4's tokenizer, which no text
can produce by accident (a user typing "<|end|>" gets the ordinary tokens of those 7 characters, see
encode_text). At inference we feed everything up to <|assistant|> and let the model write until it emits
<|end|>. The same idea, with more roles, is ChatML (OpenAI) and Llama's [INST] format.

    from part06_sft.template import chat_tokenizer, encode_example, collate
    tokenizer = chat_tokenizer(base_tokenizer)        # part 4's BPE + the three chat tokens
    x, y = encode_example(tokenizer, "2 + 2 =", "4")  # inputs, and targets with the prompt masked
    batch_x, batch_y = collate([(x, y), ...], pad_id=tokenizer.eot_token)
"""
import math
from functools import lru_cache

import torch

from part04_scaling.bpe import Tokenizer
from part06_sft.model import IGNORE_INDEX

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (USER, ASSISTANT, END)


def render(prompt: str, answer: str | None = None) -> str:
    """The conversation as text. Without an answer: the prompt the model continues (up to <|assistant|>).

    No newline after <|assistant|>: the answer starts right there, and the verifiers (shared/tasks.py)
    read the answer up to the first newline or special token."""
    text = f"{USER}{prompt}{ASSISTANT}"
    return text if answer is None else text + answer + END


def chat_tokenizer(base: Tokenizer) -> Tokenizer:
    """Part 4's tokenizer plus the chat tokens, appended after its own special tokens.

    The merges are the same, so every old id keeps its meaning; the new ids are base.vocab_size,
    base.vocab_size + 1, ... and the model's embedding must grow to match (GPT.resize_token_embeddings)."""
    missing = [t for t in CHAT_TOKENS if t not in base.special_tokens]
    return Tokenizer(base.merges, list(base.special_tokens) + missing, base.pattern)


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


@lru_cache(maxsize=8)
def _tiktoken(tokenizer: Tokenizer):
    return tokenizer.to_tiktoken()  # the same ids as tokenizer.encode, from tiktoken's Rust encoder


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ordinary text -> ids, special-token strings included as plain text: the user cannot inject <|end|>."""
    return _tiktoken(tokenizer).encode_ordinary(text)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids the model continues at inference: <|user|> prompt <|assistant|>."""
    special = tokenizer.special_tokens
    return [special[USER], *encode_text(tokenizer, prompt), special[ASSISTANT]]


def encode_example(tokenizer: Tokenizer, prompt: str, answer: str, mask_prompt: bool = True):
    """One training example -> (inputs x, targets y), two lists of equal length.

    The full sequence is s = <|user|> prompt <|assistant|> answer <|end|>; as in pretraining, x = s[:-1] and
    y = s[1:] (y[t] is the token after x[t]). With mask_prompt, the targets inside the prompt become
    IGNORE_INDEX: the model is not trained to predict the user's words, only the answer and the <|end|>
    that stops it. y's first real target is the answer's first token, predicted at <|assistant|>.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = encode_text(tokenizer, answer) + [tokenizer.special_tokens[END]]
    sequence = prompt_ids + answer_ids
    x, y = sequence[:-1], sequence[1:]
    if mask_prompt:  # y[t] = sequence[t + 1] is a prompt token for t + 1 < len(prompt_ids)
        n_prompt_targets = len(prompt_ids) - 1
        y = [IGNORE_INDEX] * n_prompt_targets + y[n_prompt_targets:]
    return x, y


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Pad a list of (x, y) examples of different lengths into two (B, T) tensors, T = the longest.

    Right padding: x gets pad_id after its tokens, y gets IGNORE_INDEX, so the padding adds nothing to
    the loss. No attention mask is needed: in a causal model a token only attends to the tokens before it,
    and the padding comes after every real token. (Generation pads on the left instead; see
    model.padding_attention_mask.) Packing is the other option: concatenate examples into full rows,
    which wastes no compute on padding but needs a block-diagonal attention mask so that examples cannot
    see each other (see the README).
    """
    T = max(len(x) for x, _ in examples)
    xs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    ys = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        xs[i, : len(x)] = torch.tensor(x)
        ys[i, : len(y)] = torch.tensor(y)
    return xs, ys


def left_pad(prompts: list[list[int]], pad_id: int):
    """Prompts of different lengths -> ids (B, T) padded on the left, and padding_mask (B, T) (False = padding).

    Left, so that every row's next token is at the same place, the last column."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    padding_mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        padding_mask[i, T - len(p) :] = True
    return ids, padding_mask


# --- Curriculum learning -------------------------------------------------------------------------------


def competence(it: int, curriculum_iters: int, c0: float = 0.1) -> float:
    """The fraction of the data, easiest first, that step `it` may draw from: the square-root pacing of
    competence-based curricula (Platanios et al. 2019, https://arxiv.org/abs/1903.09848), from c0 at step 0
    to 1 at curriculum_iters, then 1. (Curriculum learning: Bengio et al. 2009.)"""
    if curriculum_iters <= 0 or it >= curriculum_iters:
        return 1.0
    return min(1.0, math.sqrt(it / curriculum_iters * (1 - c0**2) + c0**2))


def sample_batch(order: list[int], batch_size: int, it: int, curriculum_iters: int, generator: torch.Generator):
    """Indices of the next batch. order: the examples sorted easiest first (for random order, any order and
    curriculum_iters = 0). Draws uniformly from the first competence(it) fraction of `order`."""
    n = max(batch_size, math.ceil(competence(it, curriculum_iters) * len(order)))
    n = min(n, len(order))
    picks = torch.randint(n, (batch_size,), generator=generator)
    return [order[i] for i in picks.tolist()]
