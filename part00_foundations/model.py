"""Part 0: the simplest language models over bytes, the baselines every later chapter must beat.

A language model reads a sequence of tokens and, at every position, predicts a probability
distribution over the next token. Here a token is a byte (vocab_size = 256), so any UTF-8 text
works without a tokenizer. Two models, from simplest to less simple:

- BigramLM: the next byte depends only on the current byte. The whole model is a 256 x 256 table
  of logits, row = current byte, column = next byte.
- MLPLM: the next byte depends on the previous `context` bytes. Embed each byte, concatenate the
  embeddings, one hidden layer, logits. Bengio et al. 2003, "A Neural Probabilistic Language
  Model" (https://www.jmlr.org/papers/v3/bengio03a.html).

Both have the interface of the GPT in part01: forward(idx, targets=None) -> (logits, loss) with
logits for every position, and generate(idx, max_new_tokens, temperature=1.0).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 256  # 256 = one token per byte
    context: int = 4  # MLPLM: how many previous bytes it sees (the bigram always sees 1)
    n_embd: int = 16  # MLPLM: size of each byte's embedding vector
    n_hidden: int = 256  # MLPLM: width of the hidden layer
    activation: str = "tanh"  # MLPLM: "tanh" (Bengio et al.) or "gelu" (what GPTs use)


class LanguageModel(nn.Module):
    """What every model in this course does with its logits: the loss and sampling.

    A subclass sets `self.context` (how many of the latest tokens it needs to predict the next one)
    and defines `logits(idx)`: (B, T) token ids -> (B, T, vocab_size), where position t predicts
    the token that comes after idx[:, t].
    """

    context: int

    def forward(self, idx, targets=None):
        logits = self.logits(idx)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # targets[b, t] is the token that follows idx[b, t]. Cross-entropy = the average
            # negative log-probability (in nats) the model gave to the byte that really came next.
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0):
        """Append max_new_tokens tokens to idx (B, T), one at a time. temperature=0 is greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.context :])  # the model only needs the last `context` tokens
            logits = logits[:, -1, :]  # only the last position predicts the next token
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BigramLM(LanguageModel):
    """Next byte from the current byte only: row idx[t] of a (vocab_size, vocab_size) table.

    With counting instead of gradient descent, the best table is log(count(a -> b) / count(a)):
    training this model by gradient descent converges to the same thing.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.context = 1
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)
        # All zeros = the uniform distribution: the loss at init is exactly ln(vocab_size).
        nn.init.zeros_(self.table.weight)

    def logits(self, idx):
        return self.table(idx)  # (B, T) -> (B, T, vocab_size): a lookup, nothing else


class MLPLM(LanguageModel):
    """Bengio et al. 2003: embed the last `context` bytes, concatenate, hidden layer, logits.

    The window for position t is idx[t-context+1 .. t]; windows that reach back before the start of
    the sequence are filled with a special padding token (id vocab_size, an extra embedding row).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.activation in ("tanh", "gelu"), config.activation
        self.config = config
        self.context = config.context
        self.pad_id = config.vocab_size
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # +1 row for the padding token
        self.fc = nn.Linear(config.context * config.n_embd, config.n_hidden)
        self.act = nn.Tanh() if config.activation == "tanh" else nn.GELU()
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        # Start from (nearly) uniform predictions: a large random head would make the model
        # confidently wrong at step 0 (loss well above ln 256) and waste the first steps undoing it.
        nn.init.normal_(self.lm_head.weight, std=0.01)
        nn.init.zeros_(self.lm_head.bias)

    def logits(self, idx):
        B, T = idx.size()
        padded = F.pad(idx, (self.context - 1, 0), value=self.pad_id)  # (B, context-1+T)
        windows = padded.unfold(1, self.context, 1)  # (B, T, context): window t ends at idx[:, t]
        x = self.wte(windows).view(B, T, self.context * self.config.n_embd)  # concatenated embeddings
        return self.lm_head(self.act(self.fc(x)))  # (B, T, vocab_size)


MODELS = {"bigram": BigramLM, "mlp": MLPLM}
