"""Byte Latent Transformer: a byte model that thinks in patches, cut where the next byte is hard to guess.

A byte-level model reads no tokenizer's choices, but it pays for every byte: a Transformer step per byte,
about four times the steps of a BPE model on English. The Byte Latent Transformer (BLT; Pagnoni et al. 2024,
"Byte Latent Transformer: Patches Scale Better Than Tokens", https://arxiv.org/abs/2412.09871) keeps the
bytes but groups them into patches, and runs its big Transformer once per patch:

1. Entropy patching (the paper's section 2.3). A small byte LM, trained first, gives the entropy of the next
   byte, H(x_t) = -sum_v p(v | x_<t) log p(v | x_<t). A new patch starts where the next byte is hard to guess:
       global threshold:           H(x_t) > theta_g
       approximate monotonicity:   H(x_t) - H(x_{t-1}) > theta_r
   Both decide about byte t from the bytes before it only, so patching can run while generating. Baselines:
   fixed-stride patches (MegaByte's) and space patching (a new patch after the first non-letter byte).
2. The local encoder (section 3.2): byte embeddings plus hash n-gram embeddings (each byte also looks up
   the hashed n-grams that end at it, n = 3..5 here, 3..8 in the paper), a few small Transformer layers with
   a local causal window, and cross-attention that pools each patch's bytes into the patch: the patch's queries
   start as the max-pool of its bytes and attend to those bytes only.
3. The latent (global) Transformer (section 3.1): the chapter's GPT (model.py), fed the patch vectors through
   inputs_embeds. It is the expensive part, and it runs once per patch, not once per byte.
4. The local decoder (section 3.3): byte states from the encoder, cross-attending to the global outputs, then
   small Transformer layers, then the next-byte head. The bytes of patch j read the global output of patch
   j - 1, never of patch j: that output has seen patch j's bytes, the very bytes being predicted.

The experiment trains, on the same bytes and at matched training FLOPs, four BLTs (entropy patching with a
global threshold, with the monotonic rule, fixed stride, space patching) and the byte-level baseline (the
chapter's GPT: part 3's modern model on bytes), and reports held-out bits per byte, mean patch size, latent
steps per byte, FLOPs and wall time. The paper's gains show at scale (up to 8B parameters), where the latent
model dominates the compute; at our tiny scale the local models are most of it. Here the BLTs do beat the byte
baseline, but through their hash n-gram tables (FLOP-free lookups of n-gram statistics): without them
(--ngram_sizes "") the entropy BLT only ties the baseline, and the choice of patcher barely matters.

    python part10_semantic/blt.py                                   # everything: ~5 minutes of one CPU core
    python part10_semantic/blt.py --variants entropy --ngram_sizes ""    # the BLT without hash n-grams
    python part10_semantic/blt.py --variants entropy --baseline_steps 200 --out_dir runs/blt_quick
    python part10_semantic/blt.py --ngram_sizes 3,4,5,6,7,8         # the paper's n-grams
    python part10_semantic/blt.py --help
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` imports from anywhere

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part10_semantic.model import GPT, Block, GPTConfig, RMSNorm, attention_mask, rope_angles
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, check_rope_heads, parse_config, parse_int_list, run_cli
from shared.data import load_text, train_val_split
from shared.device import pick_device
from shared.metrics import MetricsLogger

VARIANTS = ("entropy", "monotonic", "stride", "space")  # the BLT patching schemes, in table order


@dataclass
class BLTConfig:
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file"})
    block_size: int = field(default=256, metadata={"help": "bytes per training window (every model)", "min": 8})
    batch_size: int = field(default=8, metadata={"min": 1})
    # the entropy model: a small byte LM, trained first
    entropy_n_layer: int = field(default=2, metadata={"min": 1})
    entropy_n_embd: int = field(default=64, metadata={"min": 2})
    entropy_n_head: int = field(default=4, metadata={"min": 1})
    entropy_steps: int = field(default=300, metadata={"help": "training steps of the entropy model", "min": 1})
    # patching
    patch_size: float = field(default=4.0, metadata={"help": "target mean patch size in bytes: sets the entropy "
                              "thresholds (a quantile on training windows) and the fixed stride (rounded)", "min": 1.5})
    threshold_windows: int = field(default=64, metadata={"help": "training windows that fit the thresholds", "min": 1})
    variants: str = field(default="entropy,monotonic,stride,space", metadata={"help": "comma-separated BLT patching "
                          "schemes: entropy (global threshold), monotonic, stride, space"})
    # the BLT
    local_n_embd: int = field(default=64, metadata={"help": "width of the local encoder and decoder", "min": 2})
    local_n_head: int = field(default=4, metadata={"min": 1})
    encoder_layers: int = field(default=1, metadata={"help": "local encoder layers (each followed by cross-attention"
                                                             " pooling)", "min": 1})
    decoder_layers: int = field(default=2, metadata={"help": "local decoder layers (each after a cross-attention)",
                                                     "min": 1})
    local_window: int = field(default=64, metadata={"help": "local attention window in bytes", "min": 1})
    global_n_embd: int = field(default=128, metadata={"help": "width of the latent Transformer; a multiple k of "
                               "local_n_embd: each patch is k query vectors of local width", "min": 2})
    global_n_layer: int = field(default=3, metadata={"min": 1})
    global_n_head: int = field(default=4, metadata={"min": 1})
    cross_n_head: int = field(default=2, metadata={"help": "heads of the cross-attentions", "min": 1})
    ngram_sizes: str = field(default="3,4,5", metadata={"help": "comma-separated n of the hash n-gram embeddings "
                                                                "(the paper: 3,4,5,6,7,8); empty = none"})
    hash_vocab: int = field(default=4096, metadata={"help": "rows of each hash n-gram table", "min": 1})
    # the byte-level baseline (the chapter's GPT on bytes)
    baseline_n_layer: int = field(default=3, metadata={"min": 1})
    baseline_n_embd: int = field(default=96, metadata={"min": 2})
    baseline_n_head: int = field(default=4, metadata={"min": 1})
    baseline_steps: int = field(default=250, metadata={"help": "training steps of the baseline; its training FLOPs "
                                "are the budget every BLT matches", "min": 1})
    # the optimisation (the same for every model)
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW peak learning rate", "min": 0})
    warmup_iters: int = field(default=20, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off", "min": 0})
    eval_interval: int = field(default=50, metadata={"help": "steps between held-out loss points", "min": 1})
    curve_windows: int = field(default=16, metadata={"help": "held-out windows for the loss curves", "min": 1})
    eval_windows: int = field(default=256, metadata={"help": "held-out windows for the final bits/byte, spread "
                              "evenly over the held-out split (the same for every model); 0 = all", "min": 0})
    snippet_bytes: int = field(default=192, metadata={"help": "bytes shown in patches.png", "min": 16})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/blt"


def parse_ngram_sizes(text: str) -> list[int]:
    """--ngram_sizes; "" (none) is the ablation without hash n-grams."""
    return parse_int_list(text, "ngram_sizes", minimum=2, allow_empty=True,
                          what="n-gram sizes", why=" (single bytes have their own table)")


def parse_variants(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise ValueError(f"--variants must list some of {', '.join(VARIANTS)}, got {text!r}")
    return names


def check_config(cfg: BLTConfig) -> None:
    check_bounds(cfg)
    parse_variants(cfg.variants)
    parse_ngram_sizes(cfg.ngram_sizes)
    for prefix in ("entropy_", "local_", "global_", "baseline_"):
        check_rope_heads(getattr(cfg, prefix + "n_embd"), getattr(cfg, prefix + "n_head"), prefix)
    if cfg.global_n_embd % cfg.local_n_embd:
        raise ValueError(f"--global_n_embd {cfg.global_n_embd} must be a multiple of --local_n_embd "
                         f"{cfg.local_n_embd}: a patch is global_n_embd / local_n_embd query vectors")
    if cfg.local_n_embd % cfg.cross_n_head:
        raise ValueError(f"--local_n_embd {cfg.local_n_embd} must be divisible by --cross_n_head {cfg.cross_n_head}")
    if cfg.patch_size >= cfg.block_size / 2:
        raise ValueError(f"--patch_size {cfg.patch_size} leaves fewer than 2 patches in --block_size {cfg.block_size}")


# --- Entropy patching (the paper's section 2) ----------------------------------------------------------------------
# Every patcher returns a bool mask (B, T) over a window of T bytes: True where a patch starts. Two rules hold for
# all of them. (1) Byte 0 is a patch of its own and byte 1 always starts the next one, as in the reference code
# (facebookresearch/blt, patcher.py: the first patch starts are [0, 1]): the decoder predicts the bytes of patch j
# from the global output of patch j - 1, so the first predicted bytes need a patch 0 before them. (2) Whether byte
# t starts a patch depends on the bytes before t only. Otherwise the boundary itself would tell the model
# something about the byte it is predicting (a patch starting "at every space" gives the space away).


def next_byte_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy model's logits (B, T, 256) at positions 0..T-1 -> H (B, T + 1) in bits: H[:, t] is the entropy of
    p(x_t | x_<t), read from the logits at t - 1. H[:, 0] is NaN: nothing predicts the first byte."""
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1) / math.log(2)  # (B, T): nats -> bits
    return torch.cat((torch.full_like(h[:, :1], float("nan")), h), dim=1)


def force_first_patches(starts: torch.Tensor) -> torch.Tensor:
    starts[:, :2] = True  # rule (1) above
    return starts


def entropy_patch_starts(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """Global threshold (section 2.3): a patch starts at byte t when H(x_t) > theta_g. entropy (B, T)."""
    return force_first_patches(entropy > threshold)


def entropy_jumps(entropy: torch.Tensor) -> torch.Tensor:
    """H(x_t) - H(x_{t-1}) (B, T): NaN where there is no earlier entropy (t = 0, 1)."""
    jumps = torch.full_like(entropy, float("nan"))
    jumps[:, 1:] = entropy[:, 1:] - entropy[:, :-1]
    return jumps


def monotonic_patch_starts(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """Approximate monotonic constraint (section 2.3): a patch starts at byte t when the entropy jumps,
    H(x_t) - H(x_{t-1}) > theta_r: a break in the byte stream's predictability, whatever the level. Long runs
    of predictable text (a repeated name) then stay one patch even when their entropy drifts up slowly."""
    return force_first_patches(entropy_jumps(entropy) > threshold)


def stride_patch_starts(n_bytes: int, stride: int, batch: int = 1) -> torch.Tensor:
    """Fixed-stride patches (section 2.1; MegaByte, Yu et al. 2023, https://arxiv.org/abs/2305.07185): starts at
    0, 1, 1 + k, 1 + 2k, ... (after the single-byte first patch)."""
    t = torch.arange(n_bytes)
    return force_first_patches(((t - 1) % stride == 0).expand(batch, n_bytes).clone())


def is_space_like(idx: torch.Tensor) -> torch.Tensor:
    """Bytes that end a word: everything except ASCII letters and digits and the bytes >= 0x80 of UTF-8
    characters (those belong to the word they are in)."""
    letter = ((idx >= 48) & (idx <= 57)) | ((idx >= 65) & (idx <= 90)) | ((idx >= 97) & (idx <= 122)) | (idx >= 128)
    return ~letter


def space_patch_starts(idx: torch.Tensor) -> torch.Tensor:
    """Space patching (the paper's section 2.2): a new patch after a space-like byte, so a word and the
    punctuation or space after it form one patch. As in the reference code, only the first of a run of
    space-like bytes ends a patch ("king,\\n" -> "king," "\\nthe"). idx (B, T) byte values."""
    space = is_space_like(idx)
    first_of_run = space.clone()
    first_of_run[:, 1:] &= ~space[:, :-1]
    starts = torch.zeros_like(space)
    starts[:, 1:] = first_of_run[:, :-1]  # the byte *after* it starts the patch: decided by earlier bytes only
    return force_first_patches(starts)


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool starts -> (B, T) long: the index of the patch each byte belongs to."""
    return starts.long().cumsum(dim=1) - 1


def mean_patch_size(starts: torch.Tensor) -> float:
    """Bytes per patch over a batch of windows (B, T): total bytes / total patches."""
    return starts.numel() / starts.sum().item()


def fit_threshold(scores: torch.Tensor, patch_size: float) -> float:
    """The threshold whose rule `score > threshold` gives a mean patch size of patch_size on these windows.

    scores (B, T): H(x_t) for the global rule, H(x_t) - H(x_{t-1}) for the monotonic one. Bytes 0 and 1 always
    start patches; of the other T - 2 positions a fraction (T / patch_size - 2) / (T - 2) must, so the
    threshold is the score's quantile at one minus that fraction."""
    T = scores.size(1)
    fraction = (T / patch_size - 2) / (T - 2)
    eligible = scores[:, 2:].flatten()
    eligible = eligible[torch.isfinite(eligible)].double()
    return torch.quantile(eligible, 1 - fraction).item()


# --- Hash n-gram embeddings (section 3.2.1) ------------------------------------------------------------------------

HASH_BASE, HASH_MODULUS = 1_000_000_007, (1 << 31) - 1  # a polynomial rolling hash (Rabin-Karp), as the paper's
BEFORE_TEXT = 256  # the "byte" value of positions before the window: an n-gram at the start is padded with it


def hash_ngram_ids(idx: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """For each byte, the table row of the n-gram that ends at it: (B, T) -> (B, T) in [0, vocab).

    hash(b_{t-n+1} .. b_t) = sum_j b_{t-j} * a^j mod (2^31 - 1), then mod vocab. The paper's RollPolyHash; all
    arithmetic fits in int64 because every partial sum is reduced before the next multiply (Horner's rule)."""
    padded = F.pad(idx.long(), (n - 1, 0), value=BEFORE_TEXT)  # (B, T + n - 1)
    grams = padded.unfold(1, n, 1)  # (B, T, n): grams[:, t] = b_{t-n+1} .. b_t
    h = torch.zeros_like(idx, dtype=torch.long)
    for j in range(n):  # oldest byte first: h = h * a + b (mod p), so b_t ends up with a^0
        h = (h * HASH_BASE + grams[..., j]) % HASH_MODULUS
    return h % vocab


# --- The model (section 3) -----------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head cross-attention with a mask, pre-normed on both sides, added to the queries' residual stream
    (the reference code's CrossAttention). No positions: which keys a query may see is all the mask's doing."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm_q, self.norm_kv = RMSNorm(n_embd), RMSNorm(n_embd)
        self.wq, self.wk, self.wv = (nn.Linear(n_embd, n_embd, bias=False) for _ in range(3))
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, kv, mask):
        """x (B, Tq, C) queries, kv (B, Tk, C), mask (B, Tq, Tk) bool: True where a query may see a key."""
        B, Tq, C = x.shape
        heads = lambda t: t.view(B, t.size(1), self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q, kv_n = self.wq(self.norm_q(x)), self.norm_kv(kv)
        y = F.scaled_dot_product_attention(heads(q), heads(self.wk(kv_n)), heads(self.wv(kv_n)),
                                           attn_mask=mask[:, None])  # mask: the same for every head
        return x + self.proj(y.transpose(1, 2).reshape(B, Tq, C))


def encoder_cross_mask(patch_ids: torch.Tensor, n_patches: int, k: int) -> torch.Tensor:
    """(B, n_patches * k, T) bool: the k query slots of patch p see exactly the bytes of patch p (the paper:
    "each query only attends to the bytes of its respective patch"). A patch with no bytes (the padding when
    windows have different patch counts) gets all the keys instead of none, so softmax stays finite; its output
    is never read: the global model is causal and the decoder reads only real patches."""
    slot_patch = torch.arange(n_patches * k, device=patch_ids.device) // k  # (P * k,)
    mask = slot_patch[None, :, None] == patch_ids[:, None, :]
    return mask | ~mask.any(dim=-1, keepdim=True)


def decoder_cross_mask(read_patch: torch.Tensor, n_patches: int, k: int) -> torch.Tensor:
    """(B, T, n_patches * k) bool: byte i sees the k key slots of patch read_patch[b, i] only."""
    slot_patch = torch.arange(n_patches * k, device=read_patch.device) // k
    return read_patch[:, :, None] == slot_patch[None, None, :]


def max_pool_patches(h: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
    """h (B, T, C) -> (B, n_patches, C): the channel-wise max over each patch's bytes (0 for an empty patch)."""
    index = patch_ids[:, :, None].expand_as(h)
    return h.new_zeros(h.size(0), n_patches, h.size(2)).scatter_reduce(1, index, h, "amax", include_self=False)


class LocalModel(nn.Module):
    """The shared skeleton of the local encoder and decoder: small pre-norm blocks (model.py's Block: RoPE,
    SwiGLU, RMSNorm) under a sliding causal window (the paper's local block-causal attention)."""

    def __init__(self, cfg: BLTConfig, n_layer: int):
        super().__init__()
        self.config = GPTConfig(block_size=cfg.block_size, n_layer=n_layer, n_head=cfg.local_n_head,
                                n_embd=cfg.local_n_embd, window_size=cfg.local_window)
        self.k = cfg.global_n_embd // cfg.local_n_embd  # query (encoder) / key (decoder) vectors per patch
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layer))
        self.cross = nn.ModuleList(CrossAttention(cfg.local_n_embd, cfg.cross_n_head) for _ in range(n_layer))

    def positions(self, T: int, device):
        """RoPE angles and the windowed causal mask (T, T) for T bytes."""
        pos = torch.arange(T, device=device)
        cos, sin = rope_angles(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        return pos, cos, sin, attention_mask(pos, pos, self.config.window_size)


class LocalEncoder(LocalModel):
    """Bytes -> byte states (B, T, C) and patch vectors (B, P, k * C): alternating local Transformer layers and
    cross-attention pooling (Figure 5 of the paper)."""

    def __init__(self, cfg: BLTConfig):
        super().__init__(cfg, cfg.encoder_layers)
        C = cfg.local_n_embd
        self.wte = nn.Embedding(256, C)
        self.ngram_sizes, self.hash_vocab = parse_ngram_sizes(cfg.ngram_sizes), cfg.hash_vocab
        self.hash_tables = nn.ModuleList(nn.Embedding(cfg.hash_vocab, C) for _ in self.ngram_sizes)
        self.pool_proj = nn.Linear(C, self.k * C, bias=False)  # a pooled patch -> its k initial queries

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Section 3.2.1: e_t = x_t + sum_n E_n^hash(hash(b_{t-n+1} .. b_t)). Each byte also carries its
        recent n-grams, which a tiny local encoder would otherwise have to assemble itself."""
        x = self.wte(idx)
        for n, table in zip(self.ngram_sizes, self.hash_tables):
            x = x + table(hash_ngram_ids(idx, n, self.hash_vocab))
        return x

    def forward(self, idx: torch.Tensor, patch_ids: torch.Tensor, n_patches: int):
        B, T = idx.shape
        pos, cos, sin, mask = self.positions(T, idx.device)
        cross_mask = encoder_cross_mask(patch_ids, n_patches, self.k)  # (B, P * k, T)
        x, queries = self.embed(idx), None
        for block, cross in zip(self.blocks, self.cross):
            x = block(x, pos, cos, sin, mask=mask)  # (B, T, C)
            if queries is None:  # the queries start as the max-pool of each patch's bytes, projected (sec. 3.2.2)
                queries = self.pool_proj(max_pool_patches(x, patch_ids, n_patches)).view(B, n_patches * self.k, -1)
            queries = cross(queries, x, cross_mask)  # (B, P * k, C): each patch gathers its own bytes
        return x, queries.view(B, n_patches, -1)  # (B, T, C), (B, P, k * C)


class LocalDecoder(LocalModel):
    """Byte states + global patch outputs -> next-byte logits: a cross-attention to the patches before each
    local Transformer layer (section 3.3), then the byte head."""

    def __init__(self, cfg: BLTConfig):
        super().__init__(cfg, cfg.decoder_layers)
        self.patch_proj = nn.Linear(cfg.global_n_embd, self.k * cfg.local_n_embd, bias=False)  # a patch -> k keys
        self.ln_f = RMSNorm(cfg.local_n_embd)
        self.lm_head = nn.Linear(cfg.local_n_embd, 256, bias=False)

    def forward(self, h: torch.Tensor, patches: torch.Tensor, read_patch: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) byte states; patches (B, P, global_n_embd); read_patch (B, T): the patch each byte reads."""
        B, T, _ = h.shape
        pos, cos, sin, mask = self.positions(T, h.device)
        kv = self.patch_proj(patches).view(B, patches.size(1) * self.k, -1)  # (B, P * k, C)
        cross_mask = decoder_cross_mask(read_patch, patches.size(1), self.k)  # (B, T, P * k)
        for block, cross in zip(self.blocks, self.cross):
            h = block(cross(h, kv, cross_mask), pos, cos, sin, mask=mask)
        return self.lm_head(self.ln_f(h))  # (B, T, 256)


class ByteLatentTransformer(nn.Module):
    """Local encoder -> latent Transformer over patches -> local decoder (Figure 2 of the paper).

    forward(idx, starts): idx (B, T) bytes x_0..x_{T-1}; starts (B, T + 1) bool, the patch starts of the window
    *and of its next byte x_T* (whether x_T opens a new patch decides which patch predicts it). Logits[:, i]
    predict x_{i+1}, as in GPT. decoder_shift = 1 is the paper's: the bytes of patch j read global output j - 1.
    decoder_shift = 0 (the tests' deliberately leaky model) reads patch j's own output, which has seen them."""

    def __init__(self, cfg: BLTConfig, decoder_shift: int = 1):
        super().__init__()
        self.encoder, self.decoder = LocalEncoder(cfg), LocalDecoder(cfg)
        # the latent Transformer is the chapter's GPT; it reads vectors (inputs_embeds), so its one-row token
        # table and head are never used
        self.latent = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=1, n_layer=cfg.global_n_layer,
                                    n_head=cfg.global_n_head, n_embd=cfg.global_n_embd))
        self.decoder_shift = decoder_shift
        # GPT's initialisation (the latent GPT has done its own): N(0, 0.02), and the projections that write into
        # a residual stream scaled by 1 / sqrt(2 * layers)
        n_local = cfg.encoder_layers + cfg.decoder_layers
        for local in (self.encoder, self.decoder):
            for name, p in local.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * n_local) if name.endswith(".proj.weight") else 0.02
                    nn.init.normal_(p, mean=0.0, std=std)

    def read_patch(self, patch_ids: torch.Tensor) -> torch.Tensor:
        """patch_ids (B, T + 1) -> (B, T): the global output each decoder position i reads, the one of the patch
        before the patch of its target x_{i+1}. (Clamped for the leaky variant, which can point one past the
        last patch when x_T opens a new one.)"""
        n_patches = patch_ids[:, :-1].max() + 1
        return (patch_ids[:, 1:] - self.decoder_shift).clamp(max=n_patches - 1)

    def encode(self, idx, patch_ids):
        return self.encoder(idx, patch_ids[:, :-1], int(patch_ids[:, :-1].max()) + 1)

    def forward(self, idx, starts, targets=None):
        patch_ids = patch_ids_from_starts(starts)  # (B, T + 1)
        h, patches = self.encode(idx, patch_ids)  # (B, T, C), (B, P, k * C)
        latent = self.latent.hidden_states(None, inputs_embeds=patches)  # (B, P, global_n_embd), causal over P
        logits = self.decoder(h, latent, self.read_patch(patch_ids))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# --- FLOPs: 6 x params x tokens per component, plus attention ------------------------------------------------------
# The paper's FLOP-controlled comparisons count training FLOPs the same way (the reference code's
# get_num_flop_per_token: 6 x non-embedding params, plus attention). We count the ideal attention of each mask
# (a windowed query meets at most `window` keys), not the dense masked matrices a CPU kernel actually multiplies.


def linear_params(*modules: nn.Module) -> int:
    """Weights of the Linear layers: the matmuls. Embedding lookups (byte and hash tables) cost no FLOPs; a head
    tied to an embedding (GPT's) is a matmul and is counted."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


def mean_keys(T: int, window: int | None) -> float:
    """Mean number of keys a causal query sees in a window of T positions (all earlier ones, at most `window`)."""
    return sum(min(t + 1, window or T) for t in range(T)) / T


def attention_flops(n_embd: int, n_keys: float) -> float:
    """Training FLOPs of one query's attention in one layer: QK^T and the weighted sum of V are C * n_keys
    multiply-adds each, 4 * C * n_keys FLOPs forward; times 3 for forward + backward: 12 * C * n_keys. (The
    reference code's 7 * C * T per causal layer is FlashAttention's benchmark formula; ours gives 6 * C * (T + 1).)"""
    return 12 * n_embd * n_keys


def gpt_flops_per_byte(model: GPT, T: int) -> float:
    """Training FLOPs per byte of a byte-level GPT: 6 * N (every Linear, the tied head included) plus attention."""
    c = model.config
    return 6 * linear_params(model.blocks, model.lm_head) + c.n_layer * attention_flops(c.n_embd, mean_keys(T, None))


def blt_matmul_params_per_byte(model: ByteLatentTransformer, patch_size: float) -> float:
    """The BLT's Linear weights applied per byte at a mean patch size: per-byte parts once per byte, per-patch
    parts once per patch (1 / patch_size per byte); each patch holds k query (encoder) / key (decoder) vectors."""
    enc, dec, lat = model.encoder, model.decoder, model.latent
    k, per_patch = enc.k, 1 / patch_size
    return (linear_params(enc.blocks, dec.blocks, dec.lm_head)  # per byte
            + sum(linear_params(c.wk, c.wv) + k * per_patch * linear_params(c.wq, c.proj) for c in enc.cross)
            + sum(linear_params(c.wq, c.proj) + k * per_patch * linear_params(c.wk, c.wv) for c in dec.cross)
            + per_patch * linear_params(enc.pool_proj, dec.patch_proj, lat.blocks))  # per patch


def blt_flops_per_byte(model: ByteLatentTransformer, T: int, patch_size: float) -> float:
    """Training FLOPs per byte of the BLT: 6 x the matmul weights per byte, plus attention: the local layers'
    windowed self-attention, the cross-attentions (a patch's k queries meet each of its bytes once; a byte meets
    its patch's k keys), and the latent model's causal attention over the T / patch_size patches, per patch."""
    enc, dec, lat = model.encoder, model.decoder, model.latent
    C, n_local = enc.config.n_embd, enc.config.n_layer + dec.config.n_layer
    attention = (n_local * attention_flops(C, mean_keys(T, enc.config.window_size))
                 + n_local * attention_flops(C, enc.k)
                 + lat.config.n_layer * attention_flops(lat.config.n_embd, mean_keys(round(T / patch_size), None))
                 / patch_size)
    return 6 * blt_matmul_params_per_byte(model, patch_size) + attention


# --- Data, entropies, patches --------------------------------------------------------------------------------------


def random_windows(data: torch.Tensor, batch: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """batch random windows of T + 1 bytes (inputs x[:, :-1], targets x[:, 1:]): (B, T + 1) long."""
    starts = torch.randint(len(data) - T, (batch,), generator=generator)
    return data[starts[:, None] + torch.arange(T + 1)].long()


def spread_windows(data: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """n windows of T + 1 bytes spread evenly over data (n = 0: every non-overlapping window): (n, T + 1)."""
    most = (len(data) - 1) // T
    starts = torch.arange(most) * T if n == 0 or n >= most else torch.linspace(0, len(data) - T - 1, n).long()
    return data[starts[:, None] + torch.arange(T + 1)].long()


@torch.no_grad()
def window_entropies(entropy_model: GPT, windows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """H (N, T + 1) of each window's bytes, from the entropy model reading the window's first T bytes."""
    entropy_model.eval()
    dev = entropy_model.lm_head.weight.device
    return torch.cat([next_byte_entropy(entropy_model(w[:, :-1].to(dev))[0]).cpu() for w in windows.split(chunk)])


class Patcher:
    """One patching scheme: windows (B, T + 1) [+ their entropies] -> starts (B, T + 1)."""

    def __init__(self, scheme: str, threshold: float | None = None, stride: int | None = None):
        self.scheme, self.threshold, self.stride = scheme, threshold, stride

    def __call__(self, windows: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
        if self.scheme == "entropy":
            return entropy_patch_starts(entropy, self.threshold)
        if self.scheme == "monotonic":
            return monotonic_patch_starts(entropy, self.threshold)
        if self.scheme == "stride":
            return stride_patch_starts(windows.size(1), self.stride, windows.size(0))
        return space_patch_starts(windows)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Cross-entropy summed over n_bytes predicted bytes, in nats -> bits per byte: nats / ln 2 / bytes."""
    return total_nats / math.log(2) / n_bytes


# --- Training --------------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: BLTConfig) -> torch.optim.Optimizer:
    """AdamW, decay on the matrices and embeddings (dim >= 2), none on the norm gains: GPT.configure_optimizers'
    rule, for any of the models here."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99))


def lr_at(step: int, steps: int, cfg: BLTConfig) -> float:
    """Linear warmup, then half a cosine down to a tenth of the peak at the last step."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, steps - cfg.warmup_iters)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Run:
    """One model to train and evaluate: how it turns windows into a loss, and what a window costs in FLOPs."""

    def __init__(self, name: str, model: nn.Module, patcher: Patcher | None = None,
                 flops_per_byte=None, entropy_model: GPT | None = None):
        self.name, self.model, self.patcher, self.entropy_model = name, model, patcher, entropy_model
        self.flops_per_byte = flops_per_byte  # patch size -> FLOPs per byte (a constant for a GPT)

    def starts(self, windows, entropy=None):
        if entropy is None and self.patcher.scheme in ("entropy", "monotonic"):
            entropy = window_entropies(self.entropy_model, windows)
        return self.patcher(windows, entropy)

    def loss(self, windows, starts=None, reduction="mean"):
        """windows (B, T + 1) on the model's device; starts (B, T + 1) for a BLT. Mean or summed loss in nats."""
        x, y = windows[:, :-1], windows[:, 1:]
        logits = self.model(x)[0] if self.patcher is None else self.model(x, starts)[0]
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(run: Run, windows: torch.Tensor, starts: torch.Tensor | None, device: str, chunk: int = 32) -> float:
    """Held-out bits per byte over every predicted byte of windows (N, T + 1)."""
    run.model.eval()
    total = 0.0
    for i in range(0, len(windows), chunk):
        s = None if starts is None else starts[i:i + chunk].to(device)
        total += run.loss(windows[i:i + chunk].to(device), s, reduction="sum").item()
    run.model.train()
    return bits_per_byte(total, windows[:, 1:].numel())


def train(run: Run, steps: int, data: torch.Tensor, cfg: BLTConfig, curve: tuple, device: str,
          logger: MetricsLogger | None) -> dict:
    """Train run.model for `steps` steps on random windows; log held-out bits/byte every eval_interval steps.
    Counts the FLOPs of every step with the patches it actually had. curve: (windows, starts) held out."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)  # every model sees the same windows in the same order
    optimizer = make_optimizer(run.model, cfg)
    steps_log, points, flops, n_bytes, patches, start = [], [], 0.0, 0, 0, time.perf_counter()
    run.model.train()
    bar = tqdm(range(steps), desc=run.name, dynamic_ncols=True, leave=False)
    for step in bar:
        lr = lr_at(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = random_windows(data, cfg.batch_size, cfg.block_size, g)
        starts = None if run.patcher is None else run.starts(windows)
        if starts is None:
            flops += run.flops_per_byte(1.0) * windows[:, 1:].numel()
        else:  # this batch's own patch count sets the cost of its per-patch parts
            size = mean_patch_size(starts[:, :-1])
            flops += run.flops_per_byte(size) * windows[:, 1:].numel()
            patches += int(starts[:, :-1].sum())
        n_bytes += windows[:, 1:].numel()
        loss = run.loss(windows.to(device), None if starts is None else starts.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{run.name}: the loss became {value} at step {step}; try a lower "
                                     "--learning_rate")
        steps_log.append((step, flops, value / math.log(2)))
        bar.set_postfix(bits=f"{value / math.log(2):.3f}", refresh=False)
        if (step + 1) % cfg.eval_interval == 0 or step == steps - 1:
            seconds = time.perf_counter() - start
            val = evaluate(run, *curve, device)
            points.append((step + 1, flops, val))
            if logger is not None:
                logger.log(model=run.name, iter=step + 1, train_loss=value, val_loss=val * math.log(2),
                           val_bits_per_byte=val, lr=lr, flops=flops, tokens_per_sec=n_bytes / seconds)
    bar.close()
    return dict(steps=steps, train_flops=flops, train_bytes=n_bytes, seconds=time.perf_counter() - start,
                train_mean_patch_size=n_bytes / patches if patches else 1.0, curve=points, step_losses=steps_log)


# --- Plots ---------------------------------------------------------------------------------------------------------


def printable(byte: int) -> str:
    return {10: "\u21b5", 32: "\u2423", 9: "\u21e5"}.get(byte, chr(byte) if 32 < byte < 127 else "\u00b7")


def draw_patched_text(ax, data: list[int], entropy: list[float], starts: list[bool], title: str, cmap, vmax: float,
                      per_row: int = 48):
    """Each byte a cell coloured by H(x_t), a thick bar where a patch starts."""
    from matplotlib.patches import Rectangle
    rows = math.ceil(len(data) / per_row)
    for i, (b, h, s) in enumerate(zip(data, entropy, starts)):
        r, c = divmod(i, per_row)
        ax.add_patch(Rectangle((c, -r - 1), 1, 1, facecolor=cmap(min(h, vmax) / vmax), edgecolor="none"))
        ax.text(c + 0.5, -r - 0.5, printable(b), ha="center", va="center", fontsize=7, family="monospace",
                color="white" if h > 0.55 * vmax else "black")
        if s:
            ax.plot([c, c], [-r - 1, -r], color="red", linewidth=2.0)
    ax.set_xlim(-0.2, per_row + 0.2)
    ax.set_ylim(-rows - 0.1, 0.1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")


def plot_patches(path: Path, data: list[int], entropy: torch.Tensor, jumps: torch.Tensor, schemes: dict,
                 thresholds: dict):
    """patches.png: the snippet under the global and the monotonic rule, then H(x_t) and its jumps."""
    import matplotlib
    cmap, vmax = matplotlib.colormaps["magma_r"], max(4.0, float(entropy.nan_to_num(0).max()))
    fig = Figure(figsize=(12, 12), dpi=120)
    axes = fig.subplots(4, 1, gridspec_kw=dict(height_ratios=[1.3, 1.3, 1, 1]))
    ent = entropy.nan_to_num(0).tolist()
    for ax, (name, starts) in zip(axes[:2], schemes.items()):
        size = len(data) / max(1, sum(starts))
        draw_patched_text(ax, data, ent, starts, f"{name}: {sum(starts)} patches, {size:.2f} bytes/patch "
                          "(colour: next-byte entropy H(x_t), red bar: a patch starts)", cmap, vmax)
    t = torch.arange(len(data))
    for ax, values, key, label in ((axes[2], entropy, "entropy", "H(x_t), bits"),
                                   (axes[3], jumps, "monotonic", "H(x_t) - H(x_{t-1}), bits")):
        ax.plot(t.tolist(), values.tolist(), color="k", linewidth=0.8)
        ax.axhline(thresholds[key], color="red", linestyle="--", linewidth=1,
                   label=f"threshold {thresholds[key]:.2f}")
        over = values > thresholds[key]
        ax.scatter(t[over].tolist(), values[over].tolist(), color="red", s=10, zorder=3, label="a patch starts")
        for i in range(0, len(data), 4):
            ax.text(i, ax.get_ylim()[0], printable(data[i]), fontsize=5, ha="center", va="bottom", family="monospace")
        ax.set_ylabel(label)
        ax.set_xlim(-1, len(data))
        ax.legend(fontsize=7, loc="upper right")
    axes[3].set_xlabel("byte position in the snippet")
    fig.suptitle("Entropy patching (Pagnoni et al. 2024): new patches where the next byte is hard to predict",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_losses(path: Path, runs: dict):
    """loss.png: training and held-out bits/byte against training FLOPs (matched budgets end together)."""
    fig = Figure(figsize=(12, 4.5), dpi=120)
    axes = fig.subplots(1, 2)
    for i, (name, r) in enumerate(runs.items()):
        _, flops, bits = zip(*r["step_losses"])
        span = max(1, len(bits) // 25)
        smooth = torch.tensor(bits).unfold(0, span, 1).mean(1).tolist() if len(bits) >= span else list(bits)
        axes[0].plot(flops[span - 1:], smooth, color=f"C{i}", label=name)
        _, vflops, vbits = zip(*r["curve"])
        axes[1].plot(vflops, vbits, "-o", markersize=3, color=f"C{i}", label=name)
    for ax, title in zip(axes, ("training bits/byte (moving average)", "held-out bits/byte (curve windows)")):
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("bits per byte")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.set_ylim(top=min(ax.get_ylim()[1], 6))
    fig.tight_layout()
    fig.savefig(path)


# --- The run -------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    cfg = parse_config(BLTConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    with lock_run_dir(cfg.out_dir):  # one run per out_dir at a time
        return run(cfg, argv)


def run(cfg: BLTConfig, argv=None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()
    train_bytes, val_bytes = (torch.frombuffer(bytearray(t.encode("utf-8")), dtype=torch.uint8)
                              for t in train_val_split(load_text(cfg.data)))
    out_dir.mkdir(parents=True, exist_ok=True)
    T = cfg.block_size
    if len(val_bytes) < T + 2 or len(train_bytes) < T + 2:
        raise ValueError(f"the text is too short for --block_size {T}: {len(train_bytes)} training and "
                         f"{len(val_bytes)} held-out bytes")
    eval_windows = spread_windows(val_bytes, cfg.eval_windows, T)  # the final score: the same bytes for all
    curve_windows = spread_windows(val_bytes, cfg.curve_windows, T)
    print(f"training text {len(train_bytes) / 1e6:.2f} MB, held-out {len(val_bytes) / 1e6:.2f} MB; evaluating on "
          f"{len(eval_windows)} held-out windows of {T} bytes ({eval_windows[:, 1:].numel():,} predicted bytes)")
    variants = parse_variants(cfg.variants)
    flags = sys.argv[1:] if argv is None else argv
    results: dict = dict(command=shlex.join(["python", "part10_semantic/blt.py", *flags]),
                         train_bytes_available=len(train_bytes), eval_bytes=eval_windows[:, 1:].numel(), models={})

    with MetricsLogger(out_dir) as logger:
        # 1. the entropy model: the chapter's GPT, tiny, trained first on the same text (the paper's section 2.3)
        torch.manual_seed(cfg.seed)
        entropy_model = GPT(GPTConfig(block_size=T, n_layer=cfg.entropy_n_layer, n_head=cfg.entropy_n_head,
                                      n_embd=cfg.entropy_n_embd)).to(device)
        flops_e = gpt_flops_per_byte(entropy_model, T)
        ent_run = Run("entropy model", entropy_model, flops_per_byte=lambda _: flops_e)
        runs_out = {"entropy_model": train(ent_run, cfg.entropy_steps, train_bytes, cfg,
                                           (curve_windows, None), device, logger)}
        entropy_model.eval()
        results["bits_per_byte_entropy_model"] = round(evaluate(ent_run, eval_windows, None, device), 4)
        tqdm.write(f"entropy model: {entropy_model.num_params():,} parameters, held-out "
                   f"{results['bits_per_byte_entropy_model']:.3f} bits/byte")

        # 2. thresholds for the target mean patch size, fitted on training windows
        g = torch.Generator().manual_seed(cfg.seed + 1)
        fit_windows = random_windows(train_bytes, cfg.threshold_windows, T, g)
        fit_entropy = window_entropies(entropy_model, fit_windows)
        thresholds = {"entropy": fit_threshold(fit_entropy, cfg.patch_size),
                      "monotonic": fit_threshold(entropy_jumps(fit_entropy), cfg.patch_size)}
        stride = max(1, round(cfg.patch_size))
        patchers = {"entropy": Patcher("entropy", thresholds["entropy"]),
                    "monotonic": Patcher("monotonic", thresholds["monotonic"]),
                    "stride": Patcher("stride", stride=stride), "space": Patcher("space")}
        eval_entropy = window_entropies(entropy_model, eval_windows)
        curve_entropy = window_entropies(entropy_model, curve_windows)
        tqdm.write(f"thresholds for {cfg.patch_size} bytes/patch: global H > {thresholds['entropy']:.3f} bits, "
                   f"monotonic H_t - H_(t-1) > {thresholds['monotonic']:.3f} bits; stride {stride}")

        # 3. the byte-level baseline sets the FLOP budget
        torch.manual_seed(cfg.seed)
        baseline = GPT(GPTConfig(block_size=T, n_layer=cfg.baseline_n_layer, n_head=cfg.baseline_n_head,
                                 n_embd=cfg.baseline_n_embd)).to(device)
        flops_b = gpt_flops_per_byte(baseline, T)
        budget = cfg.baseline_steps * cfg.batch_size * T * flops_b
        runs = {"baseline": Run("byte baseline", baseline, flops_per_byte=lambda _: flops_b)}
        plans = {"baseline": dict(steps=cfg.baseline_steps, flops_per_byte=flops_b, patch_size=1.0, eval_starts=None,
                                  curve_starts=None, params=baseline.num_params())}

        # 4. the BLTs, one per patching scheme, each given the steps that spend the same budget
        for name in variants:
            torch.manual_seed(cfg.seed)
            model = ByteLatentTransformer(cfg).to(device)
            run_ = Run(f"BLT {name}", model, patchers[name], lambda ps, m=model: blt_flops_per_byte(m, T, ps),
                       entropy_model)
            fit_size = mean_patch_size(run_.starts(fit_windows, fit_entropy)[:, :-1])
            per_byte = blt_flops_per_byte(model, T, fit_size)
            runs[name] = run_
            plans[name] = dict(steps=max(1, round(budget / (cfg.batch_size * T * per_byte))), flops_per_byte=per_byte,
                               patch_size=fit_size, eval_starts=run_.starts(eval_windows, eval_entropy),
                               curve_starts=run_.starts(curve_windows, curve_entropy),
                               params=sum(p.numel() for p in model.parameters()))
        for key in ["baseline", *variants]:
            plan, r = plans[key], runs[key]
            runs_out[key] = train(r, plan["steps"], train_bytes, cfg, (curve_windows, plan["curve_starts"]), device,
                                  logger)
            bpb = evaluate(r, eval_windows, plan["eval_starts"], device)
            size = 1.0 if plan["eval_starts"] is None else mean_patch_size(plan["eval_starts"][:, :-1])
            row = dict(bits_per_byte=round(bpb, 4), mean_patch_size=round(size, 3),
                       latent_steps_per_byte=round(1 / size, 4), params=plan["params"],
                       flops_per_byte=round(plan["flops_per_byte"]), steps=plan["steps"],
                       train_flops=runs_out[key]["train_flops"], train_bytes=runs_out[key]["train_bytes"],
                       train_seconds=round(runs_out[key]["seconds"], 1),
                       first_train_bits=round(runs_out[key]["step_losses"][0][2], 4),
                       last_train_bits=round(sum(x[2] for x in runs_out[key]["step_losses"][-10:]) /
                                             len(runs_out[key]["step_losses"][-10:]), 4))
            results["models"][key] = row
            tqdm.write(f"{r.name:15s} {bpb:.4f} bits/byte, {size:.2f} bytes/patch, {row['steps']} steps, "
                       f"{row['train_flops']:.3g} FLOPs, {row['train_seconds']:.0f} s")

    # headline keys: entropy patching with a global threshold is "the BLT"
    head = "entropy" if "entropy" in variants else variants[0]
    rows = results["models"]
    results.update(bits_per_byte_blt=rows[head]["bits_per_byte"], blt_variant=head,
                   bits_per_byte_baseline=rows["baseline"]["bits_per_byte"],
                   mean_patch_size=rows[head]["mean_patch_size"],
                   latent_steps_per_byte=rows[head]["latent_steps_per_byte"],
                   train_flops_blt=rows[head]["train_flops"], train_flops_baseline=rows["baseline"]["train_flops"],
                   thresholds=thresholds, fixed_stride=stride, target_patch_size=cfg.patch_size)
    for key in ["baseline", *variants]:
        for metric in ("bits_per_byte", "mean_patch_size", "latent_steps_per_byte", "train_flops", "train_seconds"):
            results[f"{metric}_{key}"] = rows[key][metric]

    # the plots: a held-out snippet with both entropy rules, and the loss curves
    snippet = min(cfg.snippet_bytes, T)
    window = eval_windows[len(eval_windows) // 2: len(eval_windows) // 2 + 1]
    ent = eval_entropy[len(eval_windows) // 2: len(eval_windows) // 2 + 1]
    shown = slice(T - snippet, T)  # the window's end: the entropy model has context there
    schemes = {f"global threshold H > {thresholds['entropy']:.2f}": patchers["entropy"](window, ent)[0, shown].tolist(),
               f"monotonic H_t - H_(t-1) > {thresholds['monotonic']:.2f}":
                   patchers["monotonic"](window, ent)[0, shown].tolist()}
    plot_patches(out_dir / "patches.png", window[0, shown].tolist(), ent[0, shown], entropy_jumps(ent)[0, shown],
                 schemes, thresholds)
    plot_losses(out_dir / "loss.png", {runs[k].name: runs_out[k] for k in ["baseline", *variants]})
    atomic_save({"kind": "blt", "config": asdict(cfg), "thresholds": thresholds,
                 "entropy_model": entropy_model.state_dict(),
                 "models": {k: runs[k].model.state_dict() for k in ["baseline", *variants]}}, out_dir / "ckpt.pt")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = asdict(cfg)
    results["curves"] = {k: v["curve"] for k, v in runs_out.items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nheld-out bits/byte at matched training FLOPs ({len(eval_windows)} windows, "
          f"{results['eval_bytes']:,} bytes)")
    print(f"{'model':>15} {'bits/byte':>10} {'bytes/patch':>12} {'latent/byte':>12} {'params':>9} "
          f"{'FLOPs/byte':>11} {'steps':>6} {'train FLOPs':>12} {'seconds':>8}")
    for key in ["baseline", *variants]:
        r = rows[key]
        print(f"{runs[key].name:>15} {r['bits_per_byte']:10.4f} {r['mean_patch_size']:12.2f} "
              f"{r['latent_steps_per_byte']:12.3f} {r['params']:9,} {r['flops_per_byte']:11.3g} {r['steps']:6d} "
              f"{r['train_flops']:12.3g} {r['train_seconds']:8.1f}")
    print(f"{results['seconds']:.0f} s; wrote {out_dir / 'results.json'}, patches.png, loss.png, ckpt.pt")
    return results


if __name__ == "__main__":
    run_cli(main)
