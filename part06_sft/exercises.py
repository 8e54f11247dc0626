"""Part 6 exercises: the pieces of supervised fine-tuning.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part06_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (hand-written strings and tensors, a
position-by-position construction of the targets, F.cross_entropy over the unpadded examples,
the model's logits before the resize, shared/tasks.py's verifier, Platanios et al.'s formula, the
prompts run one at a time). The reference answers are in solutions.py (try first, then peek).
"""
import torch
from torch import nn  # noqa: F401  (ex04 builds new layers)

from part06_sft.model import IGNORE_INDEX  # noqa: F401  (-100: a target the loss skips)
from part06_sft.template import ASSISTANT, END, USER  # noqa: F401  ("<|assistant|>", "<|end|>", "<|user|>")


def ex01_render_chat(prompt: str, answer: str | None = None) -> str:
    """The chat template as text: the user's turn, then the assistant's.

        ex01_render_chat("2 + 2 =", "4")  ->  "<|user|>2 + 2 =<|assistant|>4<|end|>"
        ex01_render_chat("2 + 2 =")       ->  "<|user|>2 + 2 =<|assistant|>"

    With an answer: USER, the prompt, ASSISTANT, the answer, END (a training example). Without one
    (answer=None): everything up to and including ASSISTANT, nothing after it: the text the model
    continues at inference, writing the answer and then END.
    Nothing in between: no newline or space after ASSISTANT (the answer starts right there, and the
    verifiers read it up to the first newline), none around the prompt (it may hold newlines of its
    own; keep them as they are). USER, ASSISTANT and END are imported above.
    """
    raise NotImplementedError


def ex02_mask_labels(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """One training example: inputs x and next-token targets y, with the prompt's targets masked.

    prompt_ids: the ids of <|user|> prompt <|assistant|>; answer_ids: the ids of the answer followed by
    <|end|>. The sequence is s = prompt_ids + answer_ids, and as in pretraining x = s[:-1], y = s[1:]
    (y[t] is the token that follows x[t]; both have len(s) - 1 entries).
    Then set to IGNORE_INDEX (-100) every target that is a prompt token: the model should not be trained
    to predict the user's words. Only the answer's tokens and the <|end|> stay as targets, and the first
    of them, answer_ids[0], is predicted at the position of <|assistant|> (the last prompt token).

        prompt_ids [1, 2, 3], answer_ids [7, 8, 9]  ->  x [1, 2, 3, 7, 8],  y [-100, -100, 7, 8, 9]

    Return two lists of ints. Hint: how many of y's entries are prompt tokens?
    """
    raise NotImplementedError


def ex03_collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad examples of different lengths into one batch: (x, y), each a (B, T) long tensor, T = the longest x.

    examples: [(x, y), ...] as ex02 makes them (len(x) == len(y)). Right padding: row i starts with
    example i's tokens; after them, x holds pad_id and y holds IGNORE_INDEX, so the padding adds nothing
    to the loss (F.cross_entropy(..., ignore_index=-100) averages over the other targets only).
    Why the right: a causal model's token attends only to the tokens before it, so the padding, after
    every real token, changes none of the real positions' logits, and no attention mask is needed.
    The check also compares the model's loss on your batch with the loss over the real targets of the
    examples run one by one, unpadded.
    """
    raise NotImplementedError


def ex04_resize_embeddings(model, new_vocab_size: int) -> None:
    """Grow a part-6 GPT's vocabulary to new_vocab_size ids, in place (the chat template's new tokens).

    model.wte is an nn.Embedding (vocab_size, n_embd) and model.lm_head an nn.Linear(n_embd, vocab_size,
    bias=False) whose weight IS model.wte.weight (weight tying: one Parameter, two uses).
    Make a bigger embedding (new_vocab_size, n_embd) whose first vocab_size rows are the old rows,
    unchanged (every old token keeps its meaning), and whose new rows each equal the mean of the old rows
    (so a new token starts with the average token's logit, neither likely nor impossible; a random row
    would give it a logit unrelated to the others). Give the model a new lm_head of the new size, tied to
    the new embedding again, and set model.config.vocab_size. A smaller new_vocab_size raises ValueError
    (ids would vanish). Write it yourself: model.resize_token_embeddings is the chapter's answer.
    Hint: copying into a Parameter that requires grad needs `with torch.no_grad():`.
    """
    raise NotImplementedError


def ex05_verify_integer(gold: str, response: str) -> float:
    """The verifier of the numeric tasks (add, sub, count): 1.0 if the response answers gold, else 0.0.

    A model's response runs on after its answer, so first cut it to the answer, as shared/tasks.py does:
    1. keep what comes before the first newline, and of that what comes before the first "<|" (the start
       of a special token such as <|end|>);
    2. collapse runs of whitespace to one space and strip the ends;
    3. drop one trailing full stop ("579." -> "579"), and strip again.
    Then the whole answer must be an integer, an optional sign then digits ("579", "+579", "0579"), whose
    value equals int(gold). "The answer is 579" scores 0.0: the bare answer is part of the task, and a
    reward that accepted sentences would teach the model (in parts 8-9) that sentences are fine.
    Write it yourself rather than calling shared.tasks: the check compares with shared.tasks.verify.
    Hint: re.fullmatch.
    """
    raise NotImplementedError


def ex06_competence(it: int, curriculum_iters: int, c0: float = 0.1) -> float:
    """Curriculum pacing: the fraction of the training data, sorted easiest first, that step `it` may sample.

    Competence-based curriculum learning (Platanios et al. 2019, https://arxiv.org/abs/1903.09848) with
    square-root pacing: c(0) = c0, c(curriculum_iters) = 1, and in between c(it)^2 grows linearly:
        c(it) = sqrt(it * (1 - c0^2) / curriculum_iters + c0^2),   then 1 for it >= curriculum_iters.
    c0 is the fraction of easiest examples available at the start. Why the square root and not a straight
    line: the bigger the pool, the less often a step samples any one example of it, so new examples are
    admitted ever more slowly (dc/dt proportional to 1/c), to give each of them time to be learned; a
    straight line admits them at the same rate throughout.
    curriculum_iters <= 0 means no curriculum: always 1.0. Return a float in [c0, 1].
    """
    raise NotImplementedError


def ex07_left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths for generation: (ids, padding_mask), both (B, T), T = the longest.

    Left padding: row i ends with prompt i's tokens and starts with pad_id, so that every row's next
    token comes at the same place, the last column (right padding would put a short prompt's next token
    after its padding). ids is long; padding_mask is bool, True for a real token, False for padding: the
    model's forward and generate(..., padding_mask=...) hide the False keys from attention.

        prompts [[5, 6, 7], [8]], pad_id 0  ->  ids [[5, 6, 7], [0, 0, 8]],
                                                padding_mask [[True, True, True], [False, False, True]]

    The check also runs the batch through a model and compares each row's next-token logits with those
    of its prompt run alone.
    """
    raise NotImplementedError
