"""Part 5: the part 4 model with a mixture of experts (MoE) in place of the dense MLP.

The lesson of this chapter (see MoE below): each MoE layer holds n_expert SwiGLU MLPs, the "experts",
and a router that sends every token to only top_k of them, so the parameter count grows with
n_expert while the compute per token stays that of top_k experts (Shazeer et al. 2017,
https://arxiv.org/abs/1701.06538). Top-1 routing is the Switch Transformer (Fedus et al. 2021,
https://arxiv.org/abs/2101.03961), top-2 is GShard (Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668)
and Mixtral (Jiang et al. 2024, https://arxiv.org/abs/2401.04088). A load-balancing loss keeps the
router from sending everything to a few experts, a z-loss keeps its logits small (ST-MoE, Zoph et al.
2022, https://arxiv.org/abs/2202.08906), an optional capacity drops the tokens an overloaded expert has
no room for, and dense and MoE layers can be mixed, with an always-on shared expert (DeepSeekMoE, Dai
et al. 2024, https://arxiv.org/abs/2401.06066).

The rest is the part 3 architecture, as part 3 built it from part 2's GPT:
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
    # mixture of experts
    n_expert: int = 4  # routed experts per MoE layer; 0 = no MoE layer at all (the dense part 4 model)
    moe_top_k: int = 2  # experts each token goes to: 1 = Switch Transformer, 2 = GShard / Mixtral
    # (named moe_top_k, not top_k: top_k is the sampling filter of generate())
    expert_hidden: int | None = None  # each expert's SwiGLU hidden size; None = the dense MLP's
    n_shared_expert: int = 0  # DeepSeekMoE: always-on experts every token passes through, besides its top_k
    moe_every: int = 1  # hybrid layout: every moe_every-th layer is MoE, the others dense (GShard, Switch: 2)
    n_dense_first: int = 0  # hybrid layout: the first n_dense_first layers stay dense (DeepSeekMoE: 1)
    capacity_factor: float | None = None  # training: an expert takes at most this x its fair share; None = no cap
    eval_capacity_factor: float | None = None  # the same in eval mode (evaluation, generation); None = no cap
    noisy_gating: bool = False  # Shazeer 2017: learned Gaussian noise on the router logits while training
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss in the training loss (Switch: 0.01)
    z_loss_coef: float = 0.001  # weight of the router z-loss in the training loss (ST-MoE: 0.001)


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

    def forward(self, x, pos, cos, sin, kv_cache=None, mask=None):
        """x (B, T, C) at positions pos (T,); cos, sin: their RoPE angles. mask (T, T) bool: which keys each
        query may see; None = causal. kv_cache: one layer's cache (below) when generating."""
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
            k, v, k_pos = kv_cache.update(k, v, pos)
            mask = attention_mask(pos, k_pos, kv_cache.window, kv_cache.n_sink)  # the cache's positions decide
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
        self.k = self.v = self.pos = None
        self.window, self.n_sink = window, n_sink
        self.seen = 0  # tokens processed so far: the position of the next one

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Append the keys and values (B, n_kv_head, T, head_size) of the new positions pos (T,); return
        everything stored: what the new queries attend over."""
        if self.k is None:
            self.k, self.v, self.pos = k, v, pos
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            self.pos = torch.cat((self.pos, pos))
        self.seen += pos.numel()
        return self.k, self.v, self.pos

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
        self.seen = 0  # tokens processed so far: the position of the next one

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store the keys and values (B, n_kv_head, T, head_size) of the new positions pos (T,).

        Returns what the new queries attend over: the buffer as it was plus the new entries, keys and values
        (B, n_kv_head, capacity + T, head_size) and their positions (capacity + T,). We attend first and
        evict after, so a long prompt's early tokens still see their neighbours. One new token (decoding)
        is stored first and attends over the buffer itself, (B, n_kv_head, capacity, head_size): no copy.
        """
        T = pos.numel()
        if self.window is None and self.seen + T > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions and has no window to forget old ones")
        if T == 1:
            # Decoding. The entry the new token overwrites is capacity - n_sink >= window positions back, where
            # the window no longer sees it (with no window nothing is overwritten: the check above refuses to wrap),
            # so storing first changes nothing the query sees, and it saves copying the whole buffer every token.
            self.store(k[:, :, 0], v[:, :, 0], self.seen)
            self.seen += 1
            return self.k, self.v, self.slot_pos
        keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        key_pos = torch.cat((self.slot_pos, pos))
        # Evict: each new position p takes its slot, overwriting the oldest. Of a long prompt only the sinks and
        # the newest `ring` positions are left to store; the others would be overwritten within the prompt.
        ring = self.capacity - self.n_sink
        for i, p in enumerate(range(self.seen, self.seen + T)):
            if p < self.n_sink or p >= self.seen + T - ring:
                self.store(k[:, :, i], v[:, :, i], p)
        self.seen += T
        return keys, values, key_pos

    def store(self, k: torch.Tensor, v: torch.Tensor, p: int):
        """Put the key and value (B, n_kv_head, head_size) of position p in its slot: a sink keeps slot p, every
        later position goes round the ring of the other capacity - n_sink slots."""
        slot = p if p < self.n_sink else self.n_sink + (p - self.n_sink) % (self.capacity - self.n_sink)
        self.k[:, :, slot], self.v[:, :, slot], self.slot_pos[slot] = k, v, p

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

    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or swiglu_hidden_size(config.n_embd)
        self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


# --- Mixture of experts ---------------------------------------------------------------------------
# A dense MLP spends the same compute on every token. An MoE layer has n_expert MLPs and a router, a
# Linear that scores the experts for each token; the token goes through its top_k experts only, and
# their outputs are mixed with the router's weights. More experts = more parameters (more knowledge
# stored) at the same compute per token. The router learns with the model: the LM loss reaches it
# through the mixing weights. Left alone it tends to collapse (a few experts get everything, get better,
# get chosen more), which the load-balancing loss counteracts.


# NEW in part 5: hybrid layouts (Lepikhin et al. 2020, https://arxiv.org/abs/2006.16668; DeepSeekMoE, Dai et al.
# 2024, https://arxiv.org/abs/2401.06066)
def is_moe_layer(layer: int, config: GPTConfig) -> bool:
    """Whether block number `layer` (0-based) gets an MoE layer or a dense MLP (the hybrid layout)."""
    return (config.n_expert > 0 and layer >= config.n_dense_first
            and (layer - config.n_dense_first) % config.moe_every == 0)


# NEW in part 5 (Fedus et al. 2021, https://arxiv.org/abs/2101.03961)
def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, n_expert * sum_i f_i * P_i, from the router probabilities
    probs (N, n_expert) and the chosen experts expert_index (N, top_k).

    f_i is the fraction of the token->expert assignments that went to expert i (a count: no gradient),
    P_i the mean router probability of expert i (differentiable). With uniform routing it equals 1
    (n_expert * n_expert * 1/n_expert^2), whatever the number of experts; if one expert gets every token
    with certainty, n_expert. Its gradient lowers the probability of the experts that get more than their share.
    """
    fraction = torch.bincount(expert_index.flatten(), minlength=n_expert).float() / expert_index.numel()
    return n_expert * (fraction * probs.mean(dim=0)).sum()


# NEW in part 5 (Zoph et al. 2022, https://arxiv.org/abs/2202.08906)
def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-sum-exp of the router logits (N, n_expert). It keeps the
    logits small, where the softmax (and bfloat16) stay accurate; big logits make training unstable."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


# NEW in part 5 (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538)
class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer: x (B, T, C) -> (B, T, C), a drop-in for MLP.

    After each forward it keeps what train.py logs: aux_loss and z_loss (tensors in the graph, which
    GPT.forward adds to the training loss), expert_fraction (n_expert,), the share of the assignments
    each expert was chosen for, and drop_rate, the share of the assignments dropped for lack of capacity.
    (One-token decoding keeps no statistics: the first three are None after it.)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert 1 <= config.moe_top_k <= config.n_expert, "moe_top_k must be between 1 and n_expert"
        self.n_expert, self.top_k = config.n_expert, config.moe_top_k
        self.capacity_factor, self.eval_capacity_factor = config.capacity_factor, config.eval_capacity_factor
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)  # the gating network: a score per expert
        # Shazeer 2017's noisy top-k gating: a learned, per-expert noise scale on the logits while training
        # spreads the choices around early on and breaks ties; off by default (the balancing loss suffices).
        self.noise = nn.Linear(config.n_embd, config.n_expert, bias=False) if config.noisy_gating else None
        self.experts = nn.ModuleList([MLP(config, config.expert_hidden) for _ in range(config.n_expert)])
        # DeepSeekMoE's shared experts see every token (common knowledge), so the routed ones can specialise.
        # n shared experts of the same size are one MLP n times as wide: the same sum, one matmul.
        hidden = (config.expert_hidden or swiglu_hidden_size(config.n_embd)) * config.n_shared_expert
        self.shared = MLP(config, hidden) if config.n_shared_expert else None

    def forward(self, x):
        B, T, C = x.size()
        if B * T == 1 and not self.training:  # cached decoding, batch 1: a shortcut, the same output
            return self.forward_one_token(x)
        x = x.view(B * T, C)  # routing is per token: N = B * T tokens
        logits = self.router(x).float()  # (N, n_expert)
        self.z_loss = router_z_loss(logits)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        probs = F.softmax(logits, dim=-1)  # (N, n_expert)
        weights, expert_index = probs.topk(self.top_k, dim=-1)  # (N, top_k) each, best expert first
        if self.top_k > 1:
            # Mixtral renormalises the top-k probabilities to sum to 1 (a softmax over the chosen logits),
            # so a token's output has the scale of one expert's. (Top-1 keeps the raw probability, as in
            # Switch: renormalised it would be exactly 1 and the LM loss would not reach the router.)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss = load_balancing_loss(probs, expert_index, self.n_expert)
        self.expert_fraction = torch.bincount(expert_index.flatten(), minlength=self.n_expert) / expert_index.numel()

        # Dispatch, vectorised: list the N * top_k (token, expert, weight) assignments, sort them by expert
        # so each expert's tokens are contiguous, and run each expert once on all its tokens. The order is
        # choice-major (every token's first choice, then every token's second), so when an expert is full
        # the first choices win, as in GShard.
        expert_of = expert_index.t().reshape(-1)  # (top_k * N,)
        token_of = torch.arange(B * T, device=x.device).repeat(self.top_k)  # (top_k * N,)
        weight_of = weights.t().reshape(-1)  # (top_k * N,)
        order = torch.argsort(expert_of, stable=True)
        expert_of, token_of, weight_of = expert_of[order], token_of[order], weight_of[order]
        counts = torch.bincount(expert_of, minlength=self.n_expert)  # (n_expert,) assignments per expert
        # Switch keeps a separate capacity factor for evaluation. Ours defaults to none: evaluating and generating
        # drop nothing, so what a token gets never depends on the other tokens of the batch (the full forward and
        # one-token cached decoding agree).
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is not None:
            # Capacity (GShard, Switch): an expert processes at most capacity_factor x its fair share of the
            # assignments, so its batch has a fixed size (what a static-shape accelerator needs). The
            # overflow is dropped: that token gets nothing from this expert, the residual carries it on.
            capacity = math.ceil(capacity_factor * B * T * self.top_k / self.n_expert)
            start = torch.cumsum(counts, 0) - counts  # where each expert's run begins in the sorted list
            rank = torch.arange(expert_of.numel(), device=x.device) - start[expert_of]  # place in its expert's queue
            keep = rank < capacity
            expert_of, token_of, weight_of = expert_of[keep], token_of[keep], weight_of[keep]
            counts = counts.clamp(max=capacity)
        self.drop_rate = 1 - expert_of.numel() / (B * T * self.top_k)

        # Gather the tokens' rows once, in the sorted order: each expert's inputs are then one contiguous slice
        # (split makes views, no copies). A Python loop over the n_expert experts, each a batched matmul on
        # all of its tokens at once (as in Mixtral's reference code); there is no loop over tokens. One
        # index_add_ sums the weighted outputs of a token's top_k experts into its row. (One gather and one
        # scatter for the whole layer instead of one per expert: 12% fewer ops, ~3% of the MoE step.)
        x_sorted = x[token_of]  # (assignments, C)
        # An expert nobody chose is skipped (in decoding a batch of a few tokens, most of them); the chunks
        # are in sorted order, so the outputs of the others still line up with token_of.
        outs = [expert(chunk) for expert, chunk in zip(self.experts, x_sorted.split(counts.tolist())) if len(chunk)]
        out = torch.cat(outs) if outs else x_sorted  # if capacity dropped every assignment: (0, C)
        y = torch.zeros_like(x).index_add_(0, token_of, (out * weight_of[:, None]).to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, C)

    def forward_one_token(self, x):
        """forward for one token (1, 1, C), as in cached decoding with batch 1: the same output without the
        bookkeeping. With one token there is nothing to sort, count or drop (no capacity is below 1), and no
        loss or statistics to keep, so: route, then call its top_k experts directly. A one-token step pays per
        operation, not per FLOP (bench_generate.py), so this path runs as few as it can: 24 PyTorch operations
        per layer for top-2, where the vectorised dispatch runs 56 (and a dense MLP 6)."""
        x = x.view(1, -1)  # (1, C): a 2-D input goes straight to one matmul, a 3-D one reshapes around it
        probs = F.softmax(F.linear(x, self.router.weight).float(), dim=-1)[0]  # (n_expert,)
        weights, expert_index = probs.topk(self.top_k)  # (top_k,) each
        self.aux_loss = self.z_loss = self.expert_fraction = None
        self.drop_rate = 0.0
        # A handful of numbers: Python does the rest of the routing (each tensor op costs microseconds here).
        chosen = sorted(zip(expert_index.tolist(), weights.tolist()))  # (expert, probability), in expert order
        total = sum(weight for _, weight in chosen) if self.top_k > 1 else 1.0  # top-k renormalised, as above
        y = torch.zeros_like(x)
        for expert, weight in chosen:
            # expert(x), MLP.forward in eval mode, with F.linear on the weights: each nn.Module call costs as
            # much as a small matmul here, and an expert is four of them (itself and its three Linears)
            gate, up, proj = self.experts[expert].gate, self.experts[expert].up, self.experts[expert].proj
            h = F.silu(F.linear(x, gate.weight, gate.bias)) * F.linear(x, up.weight, up.bias)
            y.add_(F.linear(h, proj.weight, proj.bias), alpha=weight / total)  # y += weight * expert(x), one op
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(1, 1, -1)


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

    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if moe else MLP(config)  # NEW in part 5: MoE, a drop-in replacement for the dense MLP

    def forward(self, x, pos, cos, sin, kv_cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), pos, cos, sin, kv_cache, mask=mask)
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
        self.blocks = nn.ModuleList([Block(config, is_moe_layer(i, config)) for i in range(config.n_layer)])
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

    def num_active_params(self) -> int:
        """Parameters one token uses: the routed experts it is not sent to do not count. This is what
        the compute per token scales with (~6 FLOPs per active parameter per token in training)."""
        idle = sum(sum(p.numel() for p in moe.experts[0].parameters()) * (moe.n_expert - moe.top_k)
                   for moe in self.moe_layers())
        return self.num_params() - idle

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]

    def router_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss and the z-loss of the last forward pass, each averaged over the MoE layers."""
        layers = self.moe_layers()
        return (torch.stack([moe.aux_loss for moe in layers]).mean(),
                torch.stack([moe.z_loss for moe in layers]).mean())

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

    def forward(self, idx, targets=None, kv_cache: list | None = None):
        """idx (B, T) -> logits (B, T, vocab_size) and the loss if targets are given.

        The loss is the cross-entropy; in training mode (model.train()) plus the weighted router losses.

        With kv_cache (a cache per layer, see new_kv_cache), idx holds only the tokens that follow
        the cached ones: positions continue where the cache stopped. There is no length limit: RoPE's
        angles exist for every position, so T may exceed block_size (the model just never trained that far).
        """
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
        x = self.drop(self.wte(idx))  # (B, T, n_embd): no position embedding added
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cos, sin, None if kv_cache is None else kv_cache[i], mask=mask)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # targets[b, t] is the token that follows idx[b, t]; -1 marks positions to ignore.
            # reshape, not view: targets are often a shifted slice such as tokens[:, 1:] (not contiguous).
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if self.training and self.moe_layers():
                # The training objective adds the router losses (so they train the router); in eval mode
                # the loss stays the pure cross-entropy, comparable with the dense model's.
                aux_loss, z_loss = self.router_losses()
                loss = loss + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
        return logits, loss

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
               top_p: float | None = None, use_cache: bool = True, kv_cache: list | None = None):
        """Yield max_new_tokens new tokens (B, 1), one at a time, continuing idx (B, T).

        use_cache=True: run the prompt through the model once, filling the KV cache (the "prefill"),
        then feed only the newest token each step (the "decode"): one row of attention per layer
        instead of the whole context. use_cache=False recomputes from scratch every step: the last
        block_size tokens for a full-attention model (as in part 2), the whole text under the sliding
        window for a windowed one. kv_cache: bring your own (e.g. a growing one); default: rolling buffer.
        """
        window = self.config.window_size
        if not use_cache:
            for _ in range(max_new_tokens):
                idx_cond = idx if window else idx[:, -self.config.block_size :]
                logits, _ = self(idx_cond)
                idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
                idx = torch.cat((idx, idx_next), dim=1)
                yield idx_next
            return
        kv_cache = kv_cache or self.new_kv_cache(idx.size(0))
        logits, _ = self(idx if window else idx[:, -self.config.block_size :], kv_cache=kv_cache)  # prefill
        for step in range(max_new_tokens):
            idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)
            yield idx_next
            if step < max_new_tokens - 1:
                logits, _ = self(idx_next, kv_cache=kv_cache)  # decode: one token, positions continue

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True):
        """Append max_new_tokens tokens to idx (B, T). temperature=0 is greedy; top_k / top_p filter the
        distribution first (see sample_next_token); use_cache: see stream."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache))
        return torch.cat([idx, *new], dim=1)
