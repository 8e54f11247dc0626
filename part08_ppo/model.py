"""Part 8: part 7's model, plus a value head: the policy PPO trains, with a critic on its hidden states.

PPO (part 8's train.py) needs two things from the network besides the next-token distribution:
NEW in part 8 (at the end of this file):
- PolicyWithValue: the GPT (the actor, pi(token | context)) and a value head (the critic, V(context): the
  reward this response is expected to end with), a Linear(n_embd, 1) on the same final hidden states the
  LM head reads (GPT.hidden_states, part 7), at every position; one forward pass gives both
  (Schulman et al. 2017, https://arxiv.org/abs/1707.06347; Ziegler et al. 2019,
  https://arxiv.org/abs/1909.08593). Or, with separate_value=True, a critic with its own backbone, so the
  value loss never pulls on the policy's weights (InstructGPT starts it from the reward model).

Part 7's model: a reward model is the same network with a scalar head instead of the LM head.
- GPT.hidden_states: the final hidden states (B, T, n_embd), which forward() turns into logits; a reward
  head (part 7) or a value head (here) reads them instead;
- last_token_index and RewardModel: the backbone's hidden state at the last real (non-padding) token,
  through a Linear(n_embd, 1): the reward (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325;
  Ouyang et al. 2022, InstructGPT, https://arxiv.org/abs/2203.02155).

Part 6's model, ready for chat: padding, a vocabulary that can grow, and a masked loss.

Supervised fine-tuning (SFT) trains the pretrained model on (prompt, answer) pairs, and the model needs
three small changes for it (each marked NEW in part 6):
- batches of prompts of different lengths: generation pads the short prompts on the left, and a
  padding_mask (B, T) tells attention which keys are padding, so no real token ever attends to them
  (right padding needs no mask at all in a causal model: see padding_attention_mask);
- resize_token_embeddings: the chat template adds special tokens (<|user|>, ...) to part 4's tokenizer,
  so the embedding (tied with the LM head) gains rows; the old rows stay exactly as they were;
- the loss ignores the targets marked IGNORE_INDEX = -100 (PyTorch's and Hugging Face's convention):
  the prompt and the padding, so the model is trained on the answers only.

The architecture, as part 3 built it from part 2's GPT:
- RMSNorm replaces LayerNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467);
- RoPE, rotary position embeddings, replace the learned position table (Su et al. 2021,
  https://arxiv.org/abs/2104.09864): positions enter attention as rotations of q and k;
- the MLP becomes SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202);
- grouped-query attention: n_kv_head <= n_head key/value heads shared by groups of query heads
  (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245); n_kv_head = 1 is multi-query attention;
- sliding-window attention with attention sinks (Beltagy et al. 2020, https://arxiv.org/abs/2004.05150;
  Xiao et al. 2023, StreamingLLM, https://arxiv.org/abs/2309.17453);
- a KV cache for generation: each new token computes only its own keys and values. First the plain
  cache that grows with the text, then Mistral's rolling buffer (Jiang et al. 2023,
  https://arxiv.org/abs/2310.06825), so generation runs in constant memory.
Each piece is written out once, readably; the model that trains runs PyTorch's fused versions of the same
math (F.rms_norm, SDPA's enable_gqa, RoPE as one complex multiply). GPTConfig(reference_ops=True) runs
the written-out versions instead: the same outputs (the tests check it), more time.

Paper: Vaswani et al. 2017, "Attention Is All You Need" (https://arxiv.org/abs/1706.03762); the layout
follows Llama (Touvron et al. 2023, https://arxiv.org/abs/2302.13971) and Mistral 7B.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # NEW in part 6: a target with this value adds nothing to the loss (the prompt, the padding)


@dataclass
class GPTConfig:
    block_size: int = 64  # longest sequence the model sees
    vocab_size: int = 256  # 256 = one token per byte
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = False  # Llama has no biases in its Linear layers and norms
    n_kv_head: int | None = None  # key/value heads; None = n_head (MHA), 1 = MQA, in between = GQA
    rope_theta: float = 10000.0  # RoPE base: the slowest rotation has a period of ~2*pi*rope_theta positions
    window_size: int | None = None  # sliding-window attention: each token sees its last window_size tokens
    n_sink: int = 0  # attention sinks: with a window, the first n_sink tokens stay visible forever
    norm: str = "rmsnorm"  # "rmsnorm" (Llama) or "layernorm" (GPT-2), kept to compare the two
    reference_ops: bool = False  # True: the written-out RMSNorm, RoPE and GQA instead of the fused ops (same outputs)


# --- Positional embeddings: RoPE --------------------------------------------------------------
# Attention by itself is blind to order. Part 2 added a learned position vector to each token.
# RoPE instead rotates every (even, odd) channel pair of q and k by an angle proportional to the
# token's position, pair i turning at its own speed theta_i = rope_theta^(-2i/head_size). A rotation
# by m*theta dotted with a rotation by n*theta depends only on (m - n): attention scores see the
# *offset* between two tokens, never their absolute positions. Nothing is learned, and no table
# limits the length.


# NEW in part 3 (Su et al. 2021, https://arxiv.org/abs/2104.09864)
def rope_angles(positions: torch.Tensor, head_size: int, theta: float = 10000.0):
    """cos and sin of the rotation angles, each (T, head_size // 2), for integer positions (T,).

    angle[t, i] = positions[t] * theta^(-2i / head_size). Computed in float64, because positions in
    the thousands times the fastest frequency (1 rad/token) lose digits in float32.
    """
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64, device=positions.device) / head_size)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, head_size // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[..., 2i], x[..., 2i+1]) of x (..., T, head_size) by its angle.
    cos and sin (T, head_size // 2) broadcast against x's pairs (..., head_size // 2): as they are for x (B, heads,
    T, head_size), and as cos[:, None] (T, 1, head_size // 2) for x (B, T, heads, head_size), attention's use.

    The pair as a complex number a + ib times e^(i*angle): (a cos - b sin) + i(a sin + b cos).
    """
    a, b = x[..., 0::2].float(), x[..., 1::2].float()  # (..., T, head_size // 2) each
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (..., T, head_size // 2, 2)
    return rotated.flatten(-2).type_as(x)  # interleave the pairs back: (..., T, head_size)


def apply_rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope as one complex multiply, RoFormer's own formulation (and Llama's code): the pair
    a + ib times the unit complex number cos + i sin. One kernel forward and one backward, where apply_rope
    takes about ten (slicing, four multiplies, stacking), each a pass over q or k."""
    if torch.compiler.is_compiling():  # torch.compile has no complex numbers; it fuses apply_rope into one kernel
        return apply_rope(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, head_size // 2): a + ib
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


# --- Attention -------------------------------------------------------------------------------


# NEW in part 3: sliding windows (Beltagy et al. 2020, https://arxiv.org/abs/2004.05150) and attention sinks
# (Xiao et al. 2023, https://arxiv.org/abs/2309.17453)
def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, n_sink: int = 0):
    """(Tq, Tk) bool: True where the query at position q_pos[i] may attend the key at k_pos[j].

    Causal: only keys at or before the query. With a window (sliding-window attention), only the
    last `window` positions, the query's own included, plus the first n_sink positions of the text:
    StreamingLLM found that models dump surplus attention on the first tokens ("attention sinks"),
    and that evicting them is what breaks window attention, so we keep them.
    """
    offset = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk): how far back the key is
    allowed = offset >= 0
    if window is not None:
        allowed = allowed & ((offset < window) | (k_pos[None, :] < n_sink))
    return allowed


# NEW in part 6: padding
def padding_attention_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, key_valid: torch.Tensor):
    """The attention mask (Tq, Tk) of attention_mask, with the padding keys hidden too: (B, 1, Tq, Tk) bool.

    key_valid (B, Tk): True for a real token, False for padding. Generation pads short prompts on the
    *left*, so that every row's next token comes at the same place; a real token must then not attend to
    the padding before it. (Training pads on the right, after the real tokens, where causal attention never
    looks: no mask needed.) RoPE makes the shift harmless: scores depend only on the offset between two
    tokens, never on the absolute positions. Each query still sees its own key, so a padding query (all
    its keys are padding) attends to itself instead of to nothing: softmax over a row of -inf is NaN in
    part 1's written-out attention and in some GPU kernels (PyTorch's CPU kernel happens to return zeros).
    """
    own = q_pos[:, None] == k_pos[None, :]  # (Tq, Tk)
    return (mask & key_valid[:, None, None, :]) | own


class MultiHeadAttention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query heads.

    n_head query heads share n_kv_head key/value heads, n_head // n_kv_head queries per group: fewer
    keys and values to compute and, above all, to keep in the KV cache (the cache is what fills a GPU
    during long generation). n_kv_head = n_head is ordinary multi-head attention, 1 is multi-query.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        # NEW in part 3 (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245): grouped-query attention
        self.n_kv_head = config.n_kv_head or config.n_head
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.head_size = config.n_embd // config.n_head
        self.reference_ops = config.reference_ops
        # one Linear makes q for n_head heads and k, v for n_kv_head heads
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos, cos, sin, kv_cache=None, mask=None, key_valid=None):
        """x (B, T, C) at positions pos (T,); cos, sin: their RoPE angles. mask (T, T) or (B, 1, T, T) bool:
        which keys each query may see; None = causal. kv_cache: one layer's cache (below) when generating;
        key_valid (B, T): which new tokens are real (not padding), remembered by the cache."""
        B, T, C = x.size()
        qk, v = self.qkv(x).split([(self.n_head + self.n_kv_head) * self.head_size,
                                   self.n_kv_head * self.head_size], dim=2)
        # split channels into heads: (B, T, heads * head_size) -> (B, T, heads, head_size)
        qk = qk.view(B, T, self.n_head + self.n_kv_head, self.head_size)
        v = v.view(B, T, self.n_kv_head, self.head_size)
        # Positions enter here, and only here. q and k lie side by side in qkv's output, so one call rotates
        # both, the angles (T, 1, head_size // 2) broadcast over the heads: half the small kernels of rotating
        # q and k apart, the same outputs.
        rope = apply_rope if self.reference_ops else apply_rope_complex  # the same rotation either way
        qk = rope(qk, cos[:, None], sin[:, None])
        # (B, T, heads, head_size) -> (B, heads, T, head_size), the layout attention wants
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)
        v = v.transpose(1, 2)
        # NEW in part 3: the KV cache (below). Store the new keys and values, attend over all the cached ones
        if kv_cache is not None:
            k, v, k_pos, k_valid = kv_cache.update(k, v, pos, key_valid)
            mask = attention_mask(pos, k_pos, kv_cache.window, kv_cache.n_sink)  # the cache's positions decide
            if key_valid is not None:  # NEW in part 6: and the padding it holds
                mask = padding_attention_mask(mask, pos, k_pos, k_valid)
        if self.reference_ops:  # each key/value head serves n_head // n_kv_head query heads: repeat it for them
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # The same math as part 1's `attention`, as one fused kernel: it never stores the (T, T) weights, which
        # saves memory traffic and time; on a GPU it is FlashAttention (Dao et al. 2022,
        # https://arxiv.org/abs/2205.14135). enable_gqa: each group of query heads reads its key/value head in
        # place, without the copies above. mask None: plain causal, built inside without materialising (T, T).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads again
        return self.dropout(self.proj(y))


# --- The KV cache -------------------------------------------------------------------------------
# Generating, the model runs once per new token. Without a cache each run recomputes the keys and values
# of the whole context, although those of the old tokens never change (a token only attends backwards).
# A KV cache keeps them: each step computes q, k, v of the new token only and attends over the stored
# keys. Same outputs, a fraction of the work. Step 1 is the plain cache; step 2 keeps its memory constant.


# NEW in part 3: step 1, the plain KV cache: it grows by one entry per token
class GrowingKVCache:
    """One layer's keys and values (B, n_kv_head, S, head_size) of all S tokens so far, and their positions.

    window, n_sink: the attention pattern the model generates with (attention_mask); the cache keeps
    everything, the mask hides what the window does not see.
    """

    def __init__(self, window: int | None = None, n_sink: int = 0):
        self.k = self.v = self.pos = self.valid = None
        self.window, self.n_sink = window, n_sink
        self.seen = 0  # tokens processed so far: the position of the next one

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None):
        """Append the keys and values (B, n_kv_head, T, head_size) of the new positions pos (T,), and which of
        them are real tokens, valid (B, T) (None: all); return everything stored: what the new queries
        attend over."""
        if valid is None:
            valid = torch.ones(k.size(0), pos.numel(), dtype=torch.bool, device=k.device)
        if self.k is None:
            self.k, self.v, self.pos, self.valid = k, v, pos, valid
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            self.pos, self.valid = torch.cat((self.pos, pos)), torch.cat((self.valid, valid), dim=1)
        self.seen += pos.numel()
        return self.k, self.v, self.pos, self.valid

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


# NEW in part 3 (Jiang et al. 2023, https://arxiv.org/abs/2310.06825): step 2, the rolling buffer, with sinks
class KVCache:
    """The KV cache in constant memory. With a window, a token never attends further back than `window`
    positions (plus the n_sink sinks), so older keys and values can go: Mistral's rolling buffer.

    The storage is a fixed buffer of `capacity` slots. The first n_sink positions keep their slots
    forever; every later position p goes to slot n_sink + (p - n_sink) % (capacity - n_sink), so once
    the ring is full the newest token overwrites the oldest. With capacity >= n_sink + window, every key
    the window may still see is in the buffer, and memory stays constant however long we generate.
    """

    EMPTY = torch.iinfo(torch.long).max  # the "position" of an unused slot: after every query, never seen

    def __init__(self, batch_size: int, n_kv_head: int, head_size: int, capacity: int, window: int | None = None,
                 n_sink: int = 0, device=None, dtype=torch.float32):
        if window is not None and capacity < n_sink + window:
            raise ValueError(f"a cache of {capacity} slots cannot hold {n_sink} sinks + a window of {window}")
        self.capacity, self.window, self.n_sink = capacity, window, n_sink
        self.k = torch.zeros(batch_size, n_kv_head, capacity, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_pos = torch.full((capacity,), self.EMPTY, dtype=torch.long, device=device)  # position per slot
        self.slot_valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # NEW: real, not padding
        self.seen = 0  # tokens processed so far: the position of the next one

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None = None):
        """Store the keys and values (B, n_kv_head, T, head_size) of the new positions pos (T,), and which of
        them are real tokens, valid (B, T) (None: all).

        Returns what the new queries attend over: the buffer as it was plus the new entries, keys and values
        (B, n_kv_head, capacity + T, head_size), their positions (capacity + T,) and validity (B, capacity + T).
        We attend first and evict after, so a long prompt's early tokens still see their neighbours.
        """
        T = pos.numel()
        if self.window is None and self.seen + T > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions and has no window to forget old ones")
        if valid is None:
            valid = torch.ones(k.size(0), T, dtype=torch.bool, device=k.device)
        keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        key_pos, key_valid = torch.cat((self.slot_pos, pos)), torch.cat((self.slot_valid, valid), dim=1)
        # Evict: each new position p takes its slot, overwriting the oldest. Of a long prompt only the sinks and
        # the newest `ring` positions are left to store; the others would be overwritten within the prompt.
        ring = self.capacity - self.n_sink
        for i, p in enumerate(range(self.seen, self.seen + T)):
            if p < self.n_sink or p >= self.seen + T - ring:
                slot = p if p < self.n_sink else self.n_sink + (p - self.n_sink) % ring
                self.k[:, :, slot], self.v[:, :, slot], self.slot_pos[slot] = k[:, :, i], v[:, :, i], p
                self.slot_valid[:, slot] = valid[:, i]
        self.seen += T
        return keys, values, key_pos, key_valid

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


# --- Feed-forward, normalization, the block --------------------------------------------------


def swiglu_hidden_size(n_embd: int, multiple_of: int = 16) -> int:
    """SwiGLU has three matrices instead of two; a hidden size of 8/3 * n_embd (instead of 4 * n_embd)
    keeps the parameter count of the GELU MLP. Rounded to the nearest multiple of 16 so the matrix
    shapes suit the hardware (Llama rounds up to a multiple of 256, which only suits big models)."""
    return multiple_of * max(1, round(8 * n_embd / 3 / multiple_of))


# NEW in part 3 (Shazeer 2020, https://arxiv.org/abs/2002.05202)
class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): proj(silu(gate(x)) * up(x)).

    A gated linear unit: one projection (through SiLU, x * sigmoid(x)) decides, channel by channel,
    how much of the other passes. Same parameter budget as the GELU MLP, and consistently a little
    better in Shazeer's experiments; Llama, Mistral and most open models use it.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden_size(config.n_embd)
        self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


# NEW in part 3 (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467)
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): divide each token's channels by their root mean square, then
    scale. LayerNorm also subtracts the mean and adds a bias; RMSNorm drops both, is cheaper, and
    trains as well. Equals torch.nn.RMSNorm."""

    def __init__(self, ndim: int, eps: float = 1e-6, reference_ops: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps
        self.reference_ops = reference_ops

    def forward(self, x):
        if self.reference_ops:  # the formula, written out
            x32 = x.float()  # the mean of squares in float32, also under bf16 autocast
            rms = torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, 1)
            return (x32 / rms).type_as(x) * self.weight
        # the same in one fused op (fewer passes over memory), which also computes in float32
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016), the part 2 norm, kept for the RMSNorm comparison (--norm layernorm)."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        # one kernel instead of six elementwise passes (mean, var, subtract, divide, scale, shift)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    assert config.norm in ("rmsnorm", "layernorm"), config.norm
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, reference_ops=config.reference_ops)
    return LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream x carries the signal straight through; each sublayer only adds to it,
    so gradients reach the first layer undiminished however deep the stack is.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pos, cos, sin, kv_cache=None, mask=None, key_valid=None):
        x = x + self.attn(self.ln_1(x), pos, cos, sin, kv_cache, mask=mask, key_valid=key_valid)
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
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings; RoPE does positions
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)  # the final norm before the head
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017): one matrix, two uses
        # RoPE's cos and sin for positions 0 .. block_size - 1, computed once; forward slices them. A buffer:
        # it follows model.to(device), and is not saved (persistent=False): it is no parameter.
        cos, sin = rope_angles(torch.arange(config.block_size), config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
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

    # NEW in part 6: new tokens for the chat template (initialised as in Hewitt 2021,
    # https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow the vocabulary to new_vocab_size ids: the embedding (and the LM head tied to it) gains rows.

        The old rows are copied unchanged, so every old token means what it meant. A new row starts as the
        mean of the old ones, not as random noise: a random row of the tied head would give the new token a
        logit unrelated to the others, while the mean row gives it the average token's logit (it is not
        suddenly likely, nor impossible), and the model learns what it means during fine-tuning.
        """
        old = self.wte.weight
        if new_vocab_size < old.size(0):
            raise ValueError(f"cannot shrink the vocabulary from {old.size(0)} to {new_vocab_size}: ids would vanish")
        wte = nn.Embedding(new_vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        wte.weight[: old.size(0)] = old
        wte.weight[old.size(0) :] = old.mean(dim=0)
        self.wte = wte
        self.lm_head = nn.Linear(old.size(1), new_vocab_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.wte.weight  # tied again, to the new matrix
        self.config.vocab_size = new_vocab_size

    def forward(self, idx, targets=None, kv_cache: list | None = None, padding_mask=None):
        """idx (B, T) -> logits (B, T, vocab_size) and the loss if targets are given.

        With kv_cache (a cache per layer, see new_kv_cache), idx holds only the tokens that follow
        the cached ones: positions continue where the cache stopped. There is no length limit: RoPE's
        angles exist for every position, so T may exceed block_size (the model just never trained that far).
        padding_mask (B, T) bool, NEW in part 6: False marks padding (left padding, as generation uses); with
        a cache, the mask of the new tokens only (the cache remembers the earlier ones).
        """
        logits = self.lm_head(self.hidden_states(idx, kv_cache, padding_mask))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # targets[b, t] is the token that follows idx[b, t]; IGNORE_INDEX (-100) marks positions to ignore:
            # the mean is over the other targets only (in part 6: the answer tokens).
            # reshape, not view: targets are often a shifted slice such as tokens[:, 1:] (not contiguous).
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    # NEW in part 7: forward() without its last step, for the heads that read the hidden states
    def hidden_states(self, idx, kv_cache: list | None = None, padding_mask=None):
        """idx (B, T) -> the final hidden states (B, T, n_embd), after the last norm: what the LM head reads."""
        B, T = idx.size()
        cfg = self.config
        start = 0 if kv_cache is None else kv_cache[0].seen
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) absolute positions
        if start + T <= cfg.block_size:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:  # beyond the precomputed positions (a long generation): compute the angles
            cos, sin = rope_angles(pos, cfg.n_embd // cfg.n_head, cfg.rope_theta)
        # which keys each query may see, built once for all layers; None: plain causal. (With a cache, the
        # cache's positions decide, in each layer.)
        mask = None
        if kv_cache is None and cfg.window_size is not None:
            mask = attention_mask(pos, pos, cfg.window_size, cfg.n_sink)
        if kv_cache is None and padding_mask is not None:  # NEW in part 6: hide the padding keys
            causal = mask if mask is not None else attention_mask(pos, pos)
            mask = padding_attention_mask(causal, pos, pos, padding_mask)  # (B, 1, T, T)
        key_valid = padding_mask if kv_cache is not None else None  # with a cache, each layer's cache keeps it
        x = self.drop(self.wte(idx))  # (B, T, n_embd): no position embedding added
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cos, sin, None if kv_cache is None else kv_cache[i], mask=mask, key_valid=key_valid)
        return self.ln_f(x)

    def new_kv_cache(self, batch_size: int, capacity: int | None = None, growing: bool = False) -> list:
        """An empty KV cache, one per layer, for generation.

        Generation attends with the model's window, or, for a full-attention model, with a window of
        block_size: the longest context it was trained on. Thanks to RoPE, "the last block_size tokens"
        is the same whether we crop the text (part 2) or slide a window over it, up to block_size tokens.
        The default is the rolling buffer (KVCache) of capacity n_sink + window slots: constant memory.
        A larger capacity (e.g. the whole text) keeps everything, allocated up front; growing=True is the
        plain GrowingKVCache, which keeps everything too, allocated as it goes. Same outputs, more memory.
        """
        cfg = self.config
        window = cfg.window_size or cfg.block_size
        if growing:
            return [GrowingKVCache(window, cfg.n_sink) for _ in range(cfg.n_layer)]
        param = self.wte.weight
        return [KVCache(batch_size, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head,
                        capacity or cfg.n_sink + window, window, cfg.n_sink, param.device, param.dtype)
                for _ in range(cfg.n_layer)]

    @torch.no_grad()
    def stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, use_cache: bool = True, kv_cache: list | None = None,
               padding_mask=None):
        """Yield max_new_tokens new tokens (B, 1), one at a time, continuing idx (B, T).

        use_cache=True: run the prompt through the model once, filling the KV cache (the "prefill"),
        then feed only the newest token each step (the "decode"): one row of attention per layer
        instead of the whole context. use_cache=False recomputes from scratch every step: the last
        block_size tokens for a full-attention model (as in part 2), the whole text under the sliding
        window for a windowed one. kv_cache: bring your own (e.g. a growing one); default: rolling buffer.
        padding_mask (B, T), NEW in part 6: a batch of prompts left-padded to one length (False = padding).
        """
        window = self.config.window_size
        keep = slice(None) if window else slice(-self.config.block_size, None)  # the context the model sees
        real = torch.ones_like(idx[:, :1], dtype=torch.bool)  # (B, 1): every new token is a real one
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, keep], padding_mask=None if padding_mask is None else padding_mask[:, keep])
                idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
                idx = torch.cat((idx, idx_next), dim=1)
                if padding_mask is not None:
                    padding_mask = torch.cat((padding_mask, real), dim=1)
                yield idx_next
            return
        kv_cache = kv_cache or self.new_kv_cache(idx.size(0))
        logits, _ = self(idx[:, keep], kv_cache=kv_cache,  # prefill
                         padding_mask=None if padding_mask is None else padding_mask[:, keep])
        for step in range(max_new_tokens):
            idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
            yield idx_next
            if step < max_new_tokens - 1:  # decode: one token, positions continue
                logits, _ = self(idx_next, kv_cache=kv_cache, padding_mask=None if padding_mask is None else real)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, padding_mask=None):
        """Append max_new_tokens tokens to idx (B, T). temperature=0 is greedy; top_k / top_p filter the
        distribution first (see sample_next_token); use_cache, padding_mask: see stream."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, padding_mask=padding_mask))
        return torch.cat([idx, *new], dim=1)


# --- NEW in part 7: the reward model ----------------------------------------------------------------------------


def last_token_index(padding_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the index of each row's last real token, whether the padding is on the right or on the left.

    padding_mask (B, T) bool, True for real tokens. Flipped, the first True is the last real token."""
    T = padding_mask.size(1)
    return T - 1 - padding_mask.flip(1).int().argmax(dim=1)


class RewardModel(nn.Module):
    """r(prompt + response) -> one number: a GPT backbone and a scalar head on its last real token.

    The backbone starts as the SFT model (it already reads prompts and answers); the head replaces the LM
    head. Only the last token's hidden state is read: in a causal model it is the only position that has
    seen the whole prompt and the whole response. The head starts at zero, so every reward starts at 0 and
    the first pairs cost log 2 each (the Bradley-Terry loss of a coin flip).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.backbone = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, padding_mask=None):
        """idx (B, T), padding_mask (B, T) (None: no padding) -> rewards (B,)."""
        hidden = self.backbone.hidden_states(idx, padding_mask=padding_mask)  # (B, T, n_embd)
        if padding_mask is None:
            last = torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        else:
            last = last_token_index(padding_mask)
        return self.head(hidden[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1)  # (B,)


# --- NEW in part 8: the policy and its critic ------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """PPO's actor and critic: logits (B, T, vocab_size) and values (B, T) from one call.

    values[:, t] estimates the reward the response will end with, seen from the context idx[:, :t+1]: the
    state in which the token at t+1 is chosen. It reads the final hidden state, the same vector the LM head
    reads (not the logits: a projection of the hidden state onto the vocabulary, with less in it).
    The head starts at zero, so every value starts at 0 and the first advantages are the rewards themselves.
    separate_value: the critic gets its own backbone (a second GPT) instead of sharing the policy's.
    """

    def __init__(self, config: GPTConfig, separate_value: bool = False):
        super().__init__()
        self.policy = GPT(config)
        self.value_backbone = GPT(config) if separate_value else None
        self.value_head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx, padding_mask=None):
        """idx (B, T), padding_mask (B, T) (None: no padding) -> logits (B, T, vocab_size), values (B, T)."""
        hidden = self.policy.hidden_states(idx, padding_mask=padding_mask)  # (B, T, n_embd)
        logits = self.policy.lm_head(hidden)
        if self.value_backbone is not None:
            hidden = self.value_backbone.hidden_states(idx, padding_mask=padding_mask)
        return logits, self.value_head(hidden).squeeze(-1)
