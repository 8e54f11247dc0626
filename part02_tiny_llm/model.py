"""Part 2: a tiny LLM, trained end to end. The model of part 1, made ready for real training.

What changes from part 1:
- attention and LayerNorm run as PyTorch's fused kernels (same math, fewer passes over memory);
- `configure_optimizers`: AdamW with weight decay on the weight matrices only (Loshchilov & Hutter
  2017, https://arxiv.org/abs/1711.05101);
- `generate` samples with temperature, top-k and top-p (nucleus) filtering (Holtzman et al. 2019,
  https://arxiv.org/abs/1904.09751) through `sample_next_token`.

Paper: Vaswani et al. 2017, "Attention Is All You Need" (https://arxiv.org/abs/1706.03762);
the decoder-only, pre-norm layout follows GPT-2 (Radford et al. 2019) and nanoGPT.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 64  # longest sequence the model sees
    vocab_size: int = 256  # 256 = one token per byte
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True  # bias in Linear layers and LayerNorms, as in GPT-2
    pos_embedding: str = "learned"  # "learned" (GPT-2) or "sinusoidal" (Vaswani et al.)


# --- Positional embeddings -------------------------------------------------------------------
# Attention by itself is blind to order: shuffle the tokens and each output is shuffled the same
# way. So we add a position vector to every token embedding.


def sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    """The fixed table of Vaswani et al. (section 3.5), shape (block_size, n_embd).

    PE[pos, 2i] = sin(pos / 10000^(2i/n_embd)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/n_embd)).
    Each pair of channels is a clock ticking at its own speed, from fast (i=0) to very slow.
    """
    position = torch.arange(block_size, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


# --- Attention -------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True):
    """Scaled dot-product attention, one step at a time. q, k, v: (..., T, head_size).

    Returns (output (..., T, head_size), weights (..., T, T)); equals
    F.scaled_dot_product_attention(q, k, v, is_causal=causal).
    """
    T, head_size = q.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1)  # (..., T, T): how well query t matches key s
    scores = scores / math.sqrt(head_size)  # keep the variance ~1 so softmax does not saturate
    if causal:  # token t may only look at tokens s <= t: the future is hidden
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1)  # each row sums to 1
    return weights @ v, weights  # a weighted average of the values


class MultiHeadAttention(nn.Module):
    """n_head heads side by side, computed as one batch.

    One Linear makes q, k and v for all heads at once; we split the channels into heads, let each
    head attend on its own, concatenate the heads again and mix them with an output projection.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        # split channels into heads: (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # NEW in part 2 (Dao et al. 2022, https://arxiv.org/abs/2205.14135): the same math as `attention` above, as
        # one fused kernel: it never stores the (T, T) weights (so there are no attn_weights to keep for
        # heatmaps any more), which saves memory traffic and time; on a GPU it is FlashAttention.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads again
        return self.dropout(self.proj(y))


# --- Feed-forward, normalization, the block --------------------------------------------------


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU, project back. Attention mixes tokens; this
    thinks about each token on its own."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016): normalize each token's channels to mean 0, variance 1, then
    scale and shift. Equals torch.nn.LayerNorm; part 1 wrote it out, here it is the fused kernel."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        # one kernel instead of six elementwise passes (mean, var, subtract, divide, scale, shift)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream x carries the signal straight through; each sublayer only adds to it,
    so gradients reach the first layer undiminished however deep the stack is.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# --- Sampling ---------------------------------------------------------------------------------


# NEW in part 2 (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751)
def sample_next_token(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Pick one next token per row of logits (B, vocab_size) -> (B, 1).

    temperature: divide the logits by it; < 1 sharpens the distribution, > 1 flattens it, 0 is argmax.
    top_k: keep only the k most likely tokens.
    top_p: nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
        probability mass reaches top_p, so the cut adapts to how sure the model is.
    The kept tokens' probabilities are renormalised (softmax over the surviving logits) and sampled.
    The most likely token always survives: top_k = 0 or 1, or top_p = 0, is greedy decoding.
    """
    if not temperature >= 0:  # (also refuses NaN)
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (or None: no top-k filter), got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be between 0 and 1 (or None: no top-p filter), got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, max(1, min(top_k, logits.size(-1)))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_probs, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        # Drop a token when the tokens above it already reach top_p; the token that crosses p stays.
        # (The 1e-6 lets float rounding not decide exact ties such as 0.5 + 0.3 vs top_p = 0.8.)
        drop_sorted = mass_before >= top_p - 1e-6
        drop_sorted[:, 0] = False  # the most likely token stays, even for top_p = 0 (else: nothing left, NaN)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


# --- The full model ---------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.pos_embedding in ("learned", "sinusoidal"), config.pos_embedding
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # a fixed table: a buffer, not a parameter
            self.register_buffer("sinusoid", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)  # the final norm before the head
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017): one matrix, two uses
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count; the tied lm_head weight is counted once."""
        return sum(p.numel() for p in self.parameters())

    # NEW in part 2 (Loshchilov & Hutter 2017, https://arxiv.org/abs/1711.05101)
    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float]):
        """AdamW with decoupled weight decay (Loshchilov & Hutter 2017) on two parameter groups.

        Weight decay pulls weights towards 0 every step. It should act on the matrices that mix
        features (Linear weights and, as in nanoGPT and GPT-2, the embeddings: every param with
        dim >= 2), not on biases and LayerNorm gains (dim 1): shrinking those only shifts and
        rescales activations, which is not the complexity we want to penalise.
        """
        params = [p for p in self.parameters() if p.requires_grad]  # the tied weight appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: the whole update in one kernel instead of a dozen elementwise passes over every
        # tensor (CPU and CUDA); on a small model that makes the training step several % faster.
        fused = self.wte.weight.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        pos_emb = self.wpe(pos) if self.config.pos_embedding == "learned" else self.sinusoid[:T]
        x = self.drop(self.wte(idx) + pos_emb)  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # targets[b, t] is the token that follows idx[b, t]; -1 marks positions to ignore.
            # reshape, not view: targets are often a shifted slice such as tokens[:, 1:] (not contiguous).
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None):
        """Append max_new_tokens tokens to idx (B, T), one at a time. temperature=0 is greedy;
        top_k / top_p filter the distribution first (see sample_next_token)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # the model sees at most block_size tokens
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]  # only the last position predicts the next token
            idx_next = sample_next_token(logits, temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
