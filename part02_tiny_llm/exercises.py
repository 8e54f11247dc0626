"""Part 2 exercises: bytes in, a loss, sampling out, and the gradient clipping of the training loop.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part02_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference (str.encode, F.cross_entropy,
torch.nn.utils.clip_grad_norm_, the sampled frequencies against the exact distribution); ex06 is an
experiment whose result must land in the range the reference measured. The reference answers are in
solutions.py (try first, then peek).
"""
import torch
from torch.nn import functional as F  # noqa: F401  (you will want it)


def ex01_utf8_encode(text: str) -> list[int]:
    """Encode `text` as UTF-8 bytes by hand (do not call str.encode): the byte tokenizer's input.

    Each character's code point cp = ord(ch) becomes 1 to 4 bytes:
        cp < 0x80      0xxxxxxx                             (ASCII: one byte, the code point itself)
        cp < 0x800     110xxxxx 10xxxxxx
        cp < 0x10000   1110xxxx 10xxxxxx 10xxxxxx
        otherwise      11110xxx 10xxxxxx 10xxxxxx 10xxxxxx
    The x's are the bits of cp, most significant first. Example: "é" (cp 0xE9) -> [0xC3, 0xA9].
    Returns a list of ints in 0..255, equal to list(text.encode("utf-8")).
    """
    raise NotImplementedError


def ex02_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The language-model loss by hand, with label smoothing.

    logits: (B, T, V) raw scores; targets: (B, T) token ids, where -1 marks a position to ignore (it
    counts neither in the sum nor in the number we divide by). Without smoothing the loss is the mean,
    over the kept positions, of -log softmax(logits)[target]. Label smoothing (Szegedy et al. 2016,
    https://arxiv.org/abs/1512.00567, section 7) trains towards a softened target: 1 - label_smoothing
    on the right token plus label_smoothing spread evenly over all V tokens (the right one included).

    Goal: return a 0-d tensor equal to
        F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, label_smoothing=label_smoothing)
    without calling F.cross_entropy or F.nll_loss. It must stay finite for logits in the thousands.
    """
    raise NotImplementedError


def ex03_top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) sampling's cut (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751): which
    tokens survive?

    probs: (B, V), rows summing to 1, in vocabulary order (not sorted). Keep the smallest set of the
    most likely tokens whose total probability reaches top_p (>= top_p). Return a bool tensor (B, V),
    True for kept tokens. Example: probs [0.5, 0.3, 0.15, 0.05] with top_p 0.75 keeps the first two
    (0.5 alone is not enough; 0.5 + 0.3 reaches it); the token that crosses top_p is kept, and a set
    that reaches top_p exactly needs no further token. No Python loop over the rows or the vocabulary.
    """
    raise NotImplementedError


def ex04_sample_without_multinomial(logits: torch.Tensor, temperature: float, top_k: int | None,
                                    generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row, without torch.multinomial.

    logits: (B, V). The distribution to sample from is softmax(logits / temperature) restricted to the
    top_k largest logits of each row (None = all tokens) and renormalised, as the model's
    sample_next_token does. Return (B,) long token ids.

    The catch: do not call torch.multinomial (or torch.distributions): use only random numbers drawn
    elementwise (torch.rand, torch.empty(...).exponential_, ... with `generator`, so the check is
    reproducible), elementwise arithmetic and an argmax. Fast GPU samplers do this because it avoids
    multinomial's synchronisation with the CPU; look up the Gumbel-max trick (Gumbel 1954; e.g.
    Jang et al. 2016, https://arxiv.org/abs/1611.01144, section 2). The check draws tens of thousands
    of samples and compares their frequencies with the exact probabilities.
    """
    raise NotImplementedError


def ex05_clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient clipping by the global norm, as torch.nn.utils.clip_grad_norm_ does it.

    The global norm is sqrt(sum over every tensor of the sum of its squared entries): all gradients
    seen as one long vector. If it exceeds max_norm, scale *every* gradient by the same factor
    max_norm / (norm + 1e-6); otherwise leave them as they are (never scale up). Return
    (the clipped gradients as new tensors, the global norm before clipping as a 0-d tensor).
    """
    raise NotImplementedError


def ex06_sample_surprise(log_probs: torch.Tensor, temperature: float) -> float:
    """Experiment: how surprising is a model's own text, at each temperature?

    log_probs: (V, V), the log-probabilities of a bigram model: row a is log P(next token | token a).
    The test passes the bigram counted on the Shakespeare training split (part00's ex07), whose
    surprise on real Shakespeare, the validation split, is about 3.6 bits per byte.

    Sample a text of at least 2,000 tokens from this model at `temperature` (each next token from
    softmax(log_probs[current] / temperature); start from any token), then score the sample with the
    model itself at temperature 1: return the mean of -log2 P(next | current) over the sampled tokens,
    in bits per token.

    Compare the numbers at temperatures 0.5, 1 and 1.5 with the 3.6 bits of real text: which
    temperature writes text exactly as surprising as Shakespeare? Holtzman et al. 2019
    (https://arxiv.org/abs/1904.09751, figure 2) saw the same with GPT-2: the most likely text is far
    less surprising than what people write.
    """
    raise NotImplementedError
