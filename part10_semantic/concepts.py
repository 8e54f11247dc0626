"""A concept space: sentence embeddings you can decode back to text (mini-SONAR, and the real SONAR).

A Large Concept Model (Barrault et al. 2024, https://arxiv.org/abs/2412.08821, lcm.py) does not predict the next
token: it predicts the next *sentence*, as one vector in a sentence-embedding space, and a frozen decoder turns the
predicted vector back into text. The paper's space is SONAR (Duquenne et al. 2023, "SONAR: Sentence-Level
Multimodal and Language-Agnostic Representations", https://arxiv.org/abs/2308.11466): a Transformer encoder whose
token outputs are mean-pooled into one fixed-size vector (1024 numbers) per sentence, and a Transformer decoder
that reads only that vector and writes the sentence, trained on translation and auto-encoding in 200 languages.

This lesson builds the interface the LCM needs, with two backends:

    space = load_concept_space("mini")          # or "sonar"
    vectors = space.encode(["To be, or not to be, that is the question:"])     # (1, space.dim) float32
    space.decode(vectors)                                                    # ['To be, or not to be, ...']

- "mini" (default, offline): mini-SONAR, a byte-level sentence auto-encoder trained here on the verse lines of the
  training scenes. Encoder: a small bidirectional Transformer (the chapter's Block, with a padding mask instead of
  the causal one) over the sentence's bytes, mean-pooled over the real bytes (as SONAR pools) and projected to
  `dim`. Decoder: the chapter's GPT, reading the sentence vector as a few prefix vectors (inputs_embeds), then the
  bytes, teacher-forced, ending with an end-of-sentence token. SONAR's objective is translation + auto-encoding;
  ours is auto-encoding only (we have one language), with the same fixed-size bottleneck.
  Noise: during training the decoder reads the embedding plus Gaussian noise (--noise_std). The LCM decodes
  *predicted* vectors, which are never exactly the embedding of a real sentence; a decoder that only ever saw exact
  embeddings can turn a vector slightly off into garbage. Noise makes nearby vectors decode to the same (or a
  similar) sentence: the space becomes smooth. For the noise to mean something the embedding's scale must be fixed
  (else the encoder would just make its vectors long and the noise negligible), so each vector is normalised to
  RMS 1 (F.rms_norm without a gain): every concept lies on the sphere of radius sqrt(dim).
- "sonar": the real SONAR text encoder and decoder through the `sonar-space` package (eng_Latn). It needs its own
  virtual environment (fairseq2 pins its own torch): pip install -r requirements-sonar.txt; its weights (several
  GB) download on first use. Without them it fails with a message saying so.

    python part10_semantic/concepts.py               # trains mini-SONAR, then reports (~4 min on 2 idle cores, 6 on 1)
    python part10_semantic/concepts.py --max_iters 4000 --out_dir runs/part10_semantic/concepts_long   # better, 4x
    python part10_semantic/concepts.py --backend sonar                  # the real SONAR (its own environment)
    python part10_semantic/concepts.py --help

Reports on held-out scenes (whole scenes the auto-encoder never saw): reconstruction exact match and character
error rate (edit distance / reference length) of greedy decoding, the same under noise added to the embedding, and
a 2-D projection of the space coloured by play and by speaker (semantic_space.png).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` imports from anywhere

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part10_semantic.model import IGNORE_INDEX, GPT, Block, GPTConfig, make_norm, rope_angles
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_rope_heads, parse_config, run_cli
from shared.corpus import iter_speeches
from shared.device import pick_device
from shared.metrics import MetricsLogger

DEFAULT_CKPT = "runs/part10_semantic/concepts/ckpt.pt"

# --- The sentences: scenes of the plays, split by whole scenes ------------------------------------------------------


@dataclass
class Scene:
    """One scene of a play, its sentences in order.

    The sentence units are the verse lines of the scene's speeches, the corpus's natural short unit (the LCM paper
    splits its documents into sentences with a length cap; a verse line has 5-10 words), and a scene is one
    document for the LCM."""

    play: str
    act: str
    scene: str
    sentences: list[str]  # verse lines, stripped, non-empty, at most max_chars bytes each
    speakers: list[str]  # who says each sentence


def corpus_scenes(max_chars: int = 64) -> list[Scene]:
    """Every scene of the corpus (shared/corpus.py's iter_speeches), in corpus order.

    A line longer than max_chars bytes (UTF-8) is skipped, not cut: a cut line is not a sentence of the corpus.
    (At 64 bytes 26 of 110,257 lines go.) A scene left without sentences is dropped."""
    scenes: dict[tuple[str, str, str], Scene] = {}  # insertion order = corpus order
    for speech in iter_speeches():
        key = (speech.play, speech.act, speech.scene)
        scene = scenes.setdefault(key, Scene(*key, sentences=[], speakers=[]))
        for line in speech.lines:
            line = line.strip()
            if line and len(line.encode("utf-8")) <= max_chars:
                scene.sentences.append(line)
                scene.speakers.append(speech.speaker)
    return [scene for scene in scenes.values() if scene.sentences]


def split_scenes(scenes: list[Scene], heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a seeded random choice of round(fraction * n) whole scenes is held out,
    so no held-out sentence has its neighbours in training (an LCM predicts the next sentence of a scene). Both
    lists keep corpus order."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_heldout = round(heldout_fraction * len(scenes))
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout = set(order[:n_heldout])
    return ([s for i, s in enumerate(scenes) if i not in heldout], [s for i, s in enumerate(scenes) if i in heldout])


def scene_sentences(scenes: list[Scene]) -> list[str]:
    return [s for scene in scenes for s in scene.sentences]


# --- Metrics: edit distance and character error rate ----------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """The edit distance between a and b: the fewest single-character insertions, deletions and substitutions
    that turn one into the other (dynamic programming over prefixes, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a  # the shorter string along the row
    previous = list(range(len(b) + 1))  # distance from a[:0] to each prefix of b
    for i, ca in enumerate(a, 1):
        current = [i]  # a[:i] to b[:0]: i deletions
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1,  # delete ca
                               current[j - 1] + 1,  # insert cb
                               previous[j - 1] + (ca != cb)))  # substitute (free if equal)
        previous = current
    return previous[-1]


def char_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level CER: the total edit distance over the total reference length (the usual definition in speech
    recognition; it can exceed 1 when hypotheses are longer than references)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    edits = sum(levenshtein(h, r) for h, r in zip(hypotheses, references))
    return edits / max(1, sum(len(r) for r in references))


# --- mini-SONAR: the model -------------------------------------------------------------------------------------------

BOS = 256  # the encoder's begin-of-sentence id (before the bytes; an empty sentence still has one position)
EOS = 256  # the decoder's end-of-sentence id (after the bytes); also its input padding (the targets are ignored)
MASK = 257  # a decoder input byte hidden by byte dropout (never a target)


@dataclass
class MiniSonarConfig:
    dim: int = 256  # the concept vector's size (SONAR: 1024)
    max_bytes: int = 64  # longest sentence in bytes; longer input is cut, decoding stops there
    n_embd: int = 128  # width of encoder and decoder
    n_head: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    prefix_tokens: int = 4  # the sentence vector becomes this many decoder input vectors
    noise_std: float = 0.1  # training noise on the (RMS-1) embedding, per coordinate
    byte_dropout: float = 0.0  # training: share of the decoder's input bytes replaced by MASK


def sinusoidal_positions(T: int, n_embd: int, device=None) -> torch.Tensor:
    """(T, n_embd) fixed position vectors (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762, section 3.5):
    sines in the first half of the channels, cosines in the second, at frequencies 10000^(-i / (n_embd / 2))."""
    half = n_embd // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32, device=device) / half)  # (half,)
    angles = torch.arange(T, dtype=torch.float32, device=device)[:, None] * freq[None, :]  # (T, half)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ByteEncoder(nn.Module):
    """A bidirectional Transformer over the bytes of a sentence: the chapter's Block with a padding mask (every real
    byte sees every real byte, before and after it) in place of the causal mask.

    Besides RoPE inside attention it adds fixed sinusoidal absolute positions to the byte embeddings, as SONAR's
    encoder (NLLB's) does. The mean pool has to say which byte sits where, and RoPE alone gives attention only the
    offsets between bytes. Measured at 1,000 steps: held-out CER 0.58 with them, 0.60 without, 0.62 with a learned
    position table instead (part 2's wpe)."""

    def __init__(self, cfg: MiniSonarConfig):
        super().__init__()
        self.gpt_config = GPTConfig(block_size=cfg.max_bytes + 1, vocab_size=257, n_layer=cfg.encoder_layers,
                                    n_head=cfg.n_head, n_embd=cfg.n_embd)
        self.wte = nn.Embedding(257, cfg.n_embd)  # 256 bytes + BOS
        self.blocks = nn.ModuleList([Block(self.gpt_config) for _ in range(cfg.encoder_layers)])
        self.ln_f = make_norm(self.gpt_config)

    def forward(self, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """idx (B, T) ids, valid (B, T) bool (False = padding) -> hidden states (B, T, n_embd)."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        cos, sin = rope_angles(pos, self.gpt_config.n_embd // self.gpt_config.n_head, self.gpt_config.rope_theta)
        mask = valid[:, None, None, :]  # (B, 1, 1, T): every query sees every real key, no padding key
        x = self.wte(idx) + sinusoidal_positions(T, self.gpt_config.n_embd, idx.device)  # (B, T, n_embd)
        for block in self.blocks:
            x = block(x, pos, cos, sin, mask=mask)
        return self.ln_f(x)


class SentenceAutoencoder(nn.Module):
    """mini-SONAR: bytes -> one vector -> bytes."""

    def __init__(self, cfg: MiniSonarConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ByteEncoder(cfg)
        self.to_concept = nn.Linear(cfg.n_embd, cfg.dim)
        self.to_prefix = nn.Linear(cfg.dim, cfg.prefix_tokens * cfg.n_embd)  # (dim) -> (prefix_tokens, n_embd)
        self.decoder = GPT(GPTConfig(block_size=cfg.prefix_tokens + cfg.max_bytes + 1, vocab_size=258,
                                     n_layer=cfg.decoder_layers, n_head=cfg.n_head, n_embd=cfg.n_embd))

    def encode(self, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Encoder ids (B, T) with BOS first, valid (B, T) -> concept vectors (B, dim), RMS 1 each."""
        h = self.encoder(idx, valid)  # (B, T, n_embd)
        # SONAR pools by the mean over the real tokens: padding must not move the vector
        w = valid.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1)  # (B, n_embd)
        return F.rms_norm(self.to_concept(pooled), (self.cfg.dim,))  # fixed scale: see the module docstring

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """Concept vectors (B, dim) -> the decoder's first input vectors (B, prefix_tokens, n_embd)."""
        return self.to_prefix(z).view(z.size(0), self.cfg.prefix_tokens, self.cfg.n_embd)

    def decoder_loss(self, z: torch.Tensor, dec_in: torch.Tensor, dec_targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the decoder reads [prefix(z), bytes] and predicts [bytes, EOS] from the last prefix
        position on. dec_in (B, L): the bytes, EOS-padded; dec_targets (B, L + 1): bytes, EOS, then IGNORE_INDEX."""
        P = self.cfg.prefix_tokens
        x = torch.cat((self.prefix(z), self.decoder.wte(dec_in)), dim=1)  # (B, P + L, n_embd)
        logits, _ = self.decoder(None, inputs_embeds=x)  # (B, P + L, 258)
        logits = logits[:, P - 1:]  # (B, L + 1): the positions that predict a byte or EOS
        return F.cross_entropy(logits.flatten(0, 1), dec_targets.flatten(), ignore_index=IGNORE_INDEX)

    def forward(self, enc_idx, enc_valid, dec_in, dec_targets, noise_std: float = 0.0, byte_dropout: float = 0.0):
        """The reconstruction loss (nats/byte). Training passes noise_std (Gaussian noise on the concept) and
        byte_dropout (word dropout, Bowman et al. 2016, https://arxiv.org/abs/1511.06349, on bytes: hidden input
        bytes must be read from the concept, so the decoder cannot get by as a plain language model)."""
        z = self.encode(enc_idx, enc_valid)
        if noise_std > 0:
            z = z + noise_std * torch.randn_like(z)
        if byte_dropout > 0:
            dec_in = dec_in.masked_fill(torch.rand(dec_in.shape, device=dec_in.device) < byte_dropout, MASK)
        return self.decoder_loss(z, dec_in, dec_targets)

    @torch.no_grad()
    def greedy_decode(self, z: torch.Tensor) -> list[bytes]:
        """Concept vectors (B, dim) -> B byte strings: argmax byte by byte (KV cache) until EOS or max_bytes."""
        B = z.size(0)
        cache = self.decoder.new_kv_cache(B)
        logits, _ = self.decoder(None, kv_cache=cache, inputs_embeds=self.prefix(z))  # prefill with the prefix
        out = torch.full((B, self.cfg.max_bytes), EOS, dtype=torch.long, device=z.device)
        done = torch.zeros(B, dtype=torch.bool, device=z.device)
        for t in range(self.cfg.max_bytes):
            nxt = logits[:, -1, :MASK].argmax(-1)  # (B,): a byte or EOS
            nxt = torch.where(done, EOS, nxt)
            out[:, t] = nxt
            done |= nxt == EOS
            if done.all() or t == self.cfg.max_bytes - 1:
                break
            logits, _ = self.decoder(nxt[:, None], kv_cache=cache)
        return [bytes(b for b in row if b < 256) for row in out.tolist()]  # everything after EOS is EOS


def encoder_batch(sentences: list[str], max_bytes: int, device="cpu"):
    """Sentences -> encoder ids (B, T) = [BOS, bytes..., 0-padding] and valid (B, T). Longer sentences are cut
    to max_bytes bytes."""
    data = [list(s.encode("utf-8")[:max_bytes]) for s in sentences]
    T = 1 + max((len(d) for d in data), default=0)
    idx = torch.zeros(len(data), T, dtype=torch.long)
    valid = torch.zeros(len(data), T, dtype=torch.bool)
    for i, d in enumerate(data):
        idx[i, :len(d) + 1] = torch.tensor([BOS] + d)
        valid[i, :len(d) + 1] = True
    return idx.to(device), valid.to(device)


def decoder_batch(sentences: list[str], max_bytes: int, device="cpu"):
    """Sentences -> decoder inputs (B, L) (bytes, EOS-padded) and targets (B, L + 1) (bytes, EOS, IGNORE_INDEX)."""
    data = [list(s.encode("utf-8")[:max_bytes]) for s in sentences]
    L = max((len(d) for d in data), default=0)
    dec_in = torch.full((len(data), L), EOS, dtype=torch.long)
    targets = torch.full((len(data), L + 1), IGNORE_INDEX, dtype=torch.long)
    for i, d in enumerate(data):
        dec_in[i, :len(d)] = torch.tensor(d, dtype=torch.long)
        targets[i, :len(d) + 1] = torch.tensor(d + [EOS], dtype=torch.long)
    return dec_in.to(device), targets.to(device)


# --- The interface -------------------------------------------------------------------------------------------------


class ConceptSpace(Protocol):
    """What an LCM needs from a sentence-embedding space."""

    dim: int

    def encode(self, sentences: list[str]) -> torch.Tensor:
        """(N, dim) float32, batched internally, no grad."""
        ...

    def decode(self, embeddings: torch.Tensor) -> list[str]:
        """(N, dim) -> N strings (greedy)."""
        ...


class MiniSonar:
    """The ConceptSpace of a trained SentenceAutoencoder. encode returns vectors on the model's device."""

    name = "mini-SONAR"

    def __init__(self, model: SentenceAutoencoder, batch_size: int = 256):
        self.model = model.eval()
        self.dim = model.cfg.dim
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.to_concept.weight.device

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> torch.Tensor:
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences, not one string")
        out = [torch.zeros(0, self.dim, device=self.device)]
        for i in range(0, len(sentences), self.batch_size):
            idx, valid = encoder_batch(sentences[i:i + self.batch_size], self.model.cfg.max_bytes, self.device)
            out.append(self.model.encode(idx, valid).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor) -> list[str]:
        if embeddings.dim() != 2 or embeddings.size(1) != self.dim:
            raise ValueError(f"decode takes (N, {self.dim}) embeddings, got {tuple(embeddings.shape)}")
        texts = []
        for i in range(0, embeddings.size(0), self.batch_size):
            z = embeddings[i:i + self.batch_size].to(self.device, torch.float32)
            texts += [b.decode("utf-8", errors="replace") for b in self.model.greedy_decode(z)]
        return texts


SONAR_INSTALL = ("the 'sonar' backend needs the sonar-space package and fairseq2, which pins its own torch: install "
                 "them in a separate virtual environment with `pip install -r requirements-sonar.txt` (see the "
                 "comments there for the build matching your torch/CUDA); the SONAR weights (text_sonar_basic_encoder"
                 "/decoder, a few GB) download on first use into $TORCH_HOME/hub. The default backend 'mini' needs "
                 "none of this")


class SonarSpace:
    """The real SONAR (Duquenne et al. 2023) through sonar-space's pipelines, English in and out. dim = 1024.
    decode is greedy (fairseq2's beam search with beam_size 1), as mini-SONAR's; SONAR's own default is beam 5."""

    dim = 1024
    name = "SONAR"

    def __init__(self, device: str = "cpu", batch_size: int = 32, max_seq_len: int = 256, beam_size: int = 1):
        try:  # lazily: the package is optional and lives in its own environment
            from sonar.inference_pipelines.text import EmbeddingToTextModelPipeline, TextToEmbeddingModelPipeline
        except ImportError as err:
            raise ImportError(f"{SONAR_INSTALL} ({err})") from err
        try:
            self.encoder = TextToEmbeddingModelPipeline(encoder="text_sonar_basic_encoder",
                                                        tokenizer="text_sonar_basic_encoder",
                                                        device=torch.device(device))
            self.decoder = EmbeddingToTextModelPipeline(decoder="text_sonar_basic_decoder",
                                                        tokenizer="text_sonar_basic_encoder",
                                                        device=torch.device(device))
        except Exception as err:  # a failed download or a missing asset card: fairseq2 raises its own error types
            raise OSError(f"could not load the SONAR models ({type(err).__name__}: {err}); {SONAR_INSTALL}") from err
        self.batch_size, self.max_seq_len, self.beam_size = batch_size, max_seq_len, beam_size

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> torch.Tensor:
        return self.encoder.predict(list(sentences), source_lang="eng_Latn", batch_size=self.batch_size).float()

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor) -> list[str]:
        return self.decoder.predict(embeddings.float().cpu(), target_lang="eng_Latn", batch_size=self.batch_size,
                                    beam_size=self.beam_size, max_seq_len=self.max_seq_len)


def save_concept_space(model: SentenceAutoencoder, path: str | Path, extra: dict | None = None) -> None:
    """Atomically; loadable with torch.load(weights_only=True): the config is a plain dict."""
    atomic_save({"kind": "mini_sonar", "model_config": asdict(model.cfg), "model": model.state_dict(),
                 **(extra or {})}, path)


def load_mini_sonar(path: str | Path, device: str = "cpu") -> MiniSonar:
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("kind") != "mini_sonar":
        raise ValueError(f"{path} is not a mini-SONAR checkpoint (kind {ckpt.get('kind')!r})")
    model = SentenceAutoencoder(MiniSonarConfig(**ckpt["model_config"])).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"{path} was written by an older concepts.py and no longer fits the model; train a new one "
                         f"with: python part10_semantic/concepts.py --out_dir {Path(path).parent} --overwrite "
                         f"({str(err).splitlines()[0]})") from err
    return MiniSonar(model)


def load_concept_space(backend: str = "mini", ckpt_path: str = DEFAULT_CKPT, device: str = "cpu",
                       train_if_missing: bool = True) -> ConceptSpace:
    """The concept space an LCM works in.

    backend "mini": mini-SONAR from ckpt_path; if it is missing and train_if_missing, first train it with this
    script's defaults into ckpt_path's folder (`python part10_semantic/concepts.py --out_dir <folder>`, a few
    minutes). backend "sonar": the real SONAR (needs requirements-sonar.txt, in its own environment)."""
    if backend == "sonar":
        return SonarSpace(device)
    if backend != "mini":
        raise ValueError(f"unknown concept-space backend {backend!r}: use 'mini' or 'sonar'")
    path = Path(ckpt_path)
    if not path.is_file():
        command = f"python part10_semantic/concepts.py --out_dir {path.parent}"
        if not train_if_missing:
            raise FileNotFoundError(f"no mini-SONAR checkpoint at {path}; train one with: {command}")
        if path.name != "ckpt.pt":
            raise ValueError(f"training writes <out_dir>/ckpt.pt, so a missing {path} cannot be trained here; "
                             f"run {command} or pass a ckpt_path ending in ckpt.pt")
        print(f"no mini-SONAR checkpoint at {path}: training one ({command})")
        main(["--out_dir", str(path.parent), "--overwrite"])
    return load_mini_sonar(path, device)


# --- Training ------------------------------------------------------------------------------------------------------


@dataclass
class ConceptsConfig:
    backend: str = field(default="mini", metadata={"choices": ["mini", "sonar"], "help": "mini: train mini-SONAR "
                         "and measure it; sonar: measure the real SONAR on the same held-out sentences (no training; "
                         "needs requirements-sonar.txt)"})
    # data
    max_chars: int = field(default=64, metadata={"help": "skip verse lines longer than this many bytes", "min": 1})
    n_plays: int = field(default=0, metadata={"help": "use only the first n plays (corpus order); 0 = all 38",
                                              "min": 0, "max": 38})
    heldout_fraction: float = field(default=0.1, metadata={"help": "fraction of whole scenes held out", "min": 0,
                                                           "max": 0.9})
    split_seed: int = field(default=0, metadata={"help": "seed of the scene split (lcm.py uses the same)"})
    # the model
    dim: int = field(default=256, metadata={"help": "size of a concept vector (SONAR: 1024)", "min": 1})
    n_embd: int = field(default=128, metadata={"help": "width of encoder and decoder", "min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    encoder_layers: int = field(default=2, metadata={"min": 1})
    decoder_layers: int = field(default=2, metadata={"min": 1})
    prefix_tokens: int = field(default=4, metadata={"help": "decoder input vectors made from one concept", "min": 1})
    noise_std: float = field(default=0.1, metadata={"help": "Gaussian noise added to the (RMS-1) concept vector "
                                                            "while training, so that nearby vectors decode alike",
                                                    "min": 0})
    byte_dropout: float = field(default=0.0, metadata={"help": "share of the decoder's teacher-forced input bytes "
                                                               "hidden while training (forces it to read the concept; "
                                                               "0.25 trained slower here)", "min": 0, "max": 1})
    # training
    batch_size: int = field(default=64, metadata={"min": 1})
    max_iters: int = field(default=1000, metadata={"help": "training steps", "min": 1})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak, cosine to a tenth", "min": 0})
    warmup_iters: int = field(default=100, metadata={"min": 0})
    weight_decay: float = field(default=0.01, metadata={"min": 0})
    grad_clip: float = field(default=1.0, metadata={"min": 0})
    eval_interval: int = field(default=250, metadata={"help": "steps between held-out evaluations", "min": 1})
    eval_decode: int = field(default=200, metadata={"help": "held-out sentences decoded at each evaluation", "min": 1})
    # reporting
    eval_sentences: int = field(default=1000, metadata={"help": "held-out sentences decoded for exact match / CER",
                                                        "min": 1})
    noise_levels: str = field(default="0.1,0.2,0.4", metadata={"help": "also decode held-out embeddings plus "
                                                                       "Gaussian noise of these std devs"})
    plot_plays: str = field(default="A Midsummer Night's Dream,Hamlet,Henry V,Julius Caesar",
                            metadata={"help": "comma-separated plays of the semantic-space plot (a comedy, a tragedy, "
                                              "a history, a Roman play); the first also gets the speaker panel. "
                                              "Plays not in the run are left out (none left: the first 4 of the run)"})
    plot_per_play: int = field(default=300, metadata={"help": "sentences per play in the plot", "min": 1})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/concepts"


def parse_noise_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--noise_levels must be comma-separated numbers, got {text!r}") from None
    if any(not (x >= 0) for x in levels):
        raise ValueError(f"--noise_levels must be >= 0, got {text!r}")
    return levels


def check_config(cfg: ConceptsConfig) -> None:
    parse_noise_levels(cfg.noise_levels)
    check_rope_heads(cfg.n_embd, cfg.n_head)


def lr_at(step: int, cfg: ConceptsConfig) -> float:
    """Linear warmup, then cosine from learning_rate to learning_rate / 10."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_tensors(model: SentenceAutoencoder, sentences: list[str], device):
    enc = encoder_batch(sentences, model.cfg.max_bytes, device)
    dec = decoder_batch(sentences, model.cfg.max_bytes, device)
    return (*enc, *dec)


@torch.no_grad()
def heldout_loss(model: SentenceAutoencoder, sentences: list[str], batch_size: int, device) -> float:
    """Mean per-byte cross-entropy (nats) of teacher-forced reconstruction, without noise."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i:i + batch_size]
        enc_idx, enc_valid, dec_in, targets = batch_tensors(model, chunk, device)
        n = (targets != IGNORE_INDEX).sum().item()
        total += model(enc_idx, enc_valid, dec_in, targets).item() * n
        count += n
    model.train()
    return total / max(1, count)


def length_bucketed_batches(sentences: list[str], batch_size: int, rng: random.Random, pool_batches: int = 16):
    """Endless random batches of sentences of similar length: draw pool_batches batches' worth at random, sort them
    by length, cut into batches, shuffle the batches. A batch is padded to its longest sentence, so mixing 5- and
    60-byte lines would spend most of the compute on padding (verse lines run from 1 to 64 bytes, mean 39)."""
    batch_size = min(batch_size, len(sentences))
    while True:
        pool = sorted(rng.sample(sentences, min(len(sentences), batch_size * pool_batches)), key=len)
        chunks = [pool[i:i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]
        rng.shuffle(chunks)
        yield from chunks


def train_autoencoder(cfg: ConceptsConfig, train_sentences: list[str], val_sentences: list[str],
                      logger: MetricsLogger | None = None) -> tuple[SentenceAutoencoder, list[float]]:
    """Train mini-SONAR on random batches of training sentences; returns the model and the per-step losses."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model_cfg = MiniSonarConfig(dim=cfg.dim, max_bytes=cfg.max_chars, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                                prefix_tokens=cfg.prefix_tokens, noise_std=cfg.noise_std,
                                byte_dropout=cfg.byte_dropout)
    model = SentenceAutoencoder(model_cfg).to(cfg.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    losses = []
    batches = length_bucketed_batches(train_sentences, cfg.batch_size, rng)
    bar = tqdm(range(cfg.max_iters), desc="mini-SONAR", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = next(batches)
        loss = model(*batch_tensors(model, batch, cfg.device), noise_std=cfg.noise_std, byte_dropout=cfg.byte_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the loss became {losses[-1]} at step {step}; try a lower --learning_rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if logger is not None:
            logger.log_step(step, losses[-1])
            if (step + 1) % cfg.eval_interval == 0 or step == cfg.max_iters - 1:
                val = heldout_loss(model, val_sentences, 256, cfg.device)
                recon = reconstruction_scores(MiniSonar(model), val_sentences[:cfg.eval_decode])
                model.train()
                window = losses[-cfg.eval_interval:]
                logger.log(iter=step + 1, train_loss=sum(window) / len(window), val_loss=val, lr=lr_at(step, cfg),
                           heldout_exact_match=recon["exact_match"], heldout_char_error_rate=recon["char_error_rate"])
                tqdm.write(f"step {step + 1}: train loss {sum(window) / len(window):.4f}, held-out loss {val:.4f} "
                           f"nats/byte, exact match {recon['exact_match']:.3f}, CER {recon['char_error_rate']:.3f} "
                           f"(first {len(val_sentences[:cfg.eval_decode])} held-out sentences)")
    bar.close()
    return model.eval(), losses


# --- Evaluation and the plot ----------------------------------------------------------------------------------------


def reconstruction_scores(space: ConceptSpace, sentences: list[str], noise_std: float = 0.0, seed: int = 0) -> dict:
    """Greedy decode(encode(x)) (plus Gaussian noise on the vector, if asked) against x: exact match and CER."""
    z = space.encode(sentences)
    if noise_std > 0:
        g = torch.Generator().manual_seed(seed)
        z = z + noise_std * torch.randn(z.shape, generator=g).to(z.device)
    decoded = space.decode(z)
    exact = sum(d == s for d, s in zip(decoded, sentences)) / max(1, len(sentences))
    return dict(exact_match=exact, char_error_rate=char_error_rate(decoded, sentences), decoded=decoded)


def nearest_neighbours(space: ConceptSpace, queries: list[str], pool: list[str]) -> list[dict]:
    """For each query, the pool sentence with the most similar concept (cosine): what "near" means in the space."""
    zq, zp = F.normalize(space.encode(queries), dim=-1), F.normalize(space.encode(pool), dim=-1)
    sims = zq @ zp.T  # (Q, P)
    best = sims.argmax(1).tolist()
    return [dict(query=q, neighbour=pool[j], cosine=round(sims[i, j].item(), 3)) for i, (q, j) in
            enumerate(zip(queries, best))]


def interpolate(space: ConceptSpace, a: str, b: str, steps: int = 5) -> list[str]:
    """Decode the points (1 - t) z_a + t z_b for t = 0 .. 1: a smooth space passes through sentence-like text."""
    z = space.encode([a, b])
    t = torch.linspace(0, 1, steps, device=z.device)[:, None]
    return space.decode((1 - t) * z[:1] + t * z[1:])


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, 2): the projection on the two directions of largest variance (SVD of the centred data)."""
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def nearest_centroid_accuracy(z: torch.Tensor, labels: list[str]) -> float:
    """How often a vector is nearer (cosine) to its own label's mean than to any other label's mean, leaving the
    vector itself out of its own mean: how much the label is written in the space (chance ~ 1 / labels)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    sums = torch.zeros(len(names), z.size(1)).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=len(names)).float()
    # leave-one-out: a vector's own label mean without it
    means = sums[None, :, :].expand(len(z), -1, -1).clone()
    means[torch.arange(len(z)), y] -= z
    denom = counts[None, :].expand(len(z), -1).clone()
    denom[torch.arange(len(z)), y] -= 1
    means = means / denom.clamp_min(1)[..., None]
    sims = F.cosine_similarity(z[:, None, :], means, dim=-1)  # (N, labels)
    return (sims.argmax(1) == y).float().mean().item()


def semantic_space(space: ConceptSpace, scenes: list[Scene], cfg: ConceptsConfig, path: Path) -> dict:
    """Two panels of a 2-D PCA of concept vectors: sentences of a few plays coloured by play, and the sentences
    of the main speakers of one play coloured by speaker. Also the nearest-centroid accuracy of both labels in
    the full space (the plot shows 2 of dim directions)."""
    present = list(dict.fromkeys(scene.play for scene in scenes))
    plays = [p.strip() for p in cfg.plot_plays.split(",") if p.strip() in present] or present[:4]
    rng = random.Random(cfg.seed)
    by_play = {p: [s for scene in scenes if scene.play == p for s in scene.sentences] for p in plays}
    by_play = {p: rng.sample(s, min(cfg.plot_per_play, len(s))) for p, s in by_play.items()}
    play_sentences = [s for p in plays for s in by_play[p]]
    play_labels = [p for p in plays for _ in by_play[p]]
    # speakers: the five with the most lines in the first play
    lines = [(spk, s) for scene in scenes if scene.play == plays[0] for s, spk in zip(scene.sentences, scene.speakers)]
    counts: dict[str, int] = {}
    for spk, _ in lines:
        counts[spk] = counts.get(spk, 0) + 1
    speakers = sorted(counts, key=lambda k: -counts[k])[:5]
    spk_pairs = [(spk, s) for spk, s in lines if spk in speakers]
    spk_pairs = rng.sample(spk_pairs, min(cfg.plot_per_play * 2, len(spk_pairs)))
    z_play = space.encode(play_sentences).cpu()
    z_spk = space.encode([s for _, s in spk_pairs]).cpu()
    out = dict(play_centroid_accuracy=nearest_centroid_accuracy(z_play, play_labels), play_chance=1 / len(plays),
               speaker_centroid_accuracy=nearest_centroid_accuracy(z_spk, [k for k, _ in spk_pairs]),
               speaker_chance=1 / max(1, len(speakers)), plot_plays=plays, plot_speakers=speakers)
    # what the most visible direction stands for: |correlation| of PC 1 with the line length (PC signs are arbitrary)
    lengths = torch.tensor([len(s.encode("utf-8")) for s in play_sentences], dtype=torch.float32)
    out["pc1_length_correlation"] = torch.corrcoef(torch.stack((pca_2d(z_play)[:, 0], lengths)))[0, 1].abs().item()
    fig = Figure(figsize=(12, 5.5), dpi=120)
    axes = fig.subplots(1, 2)
    for ax, z, labels, names, title in (
            (axes[0], z_play, play_labels, plays, f"by play (nearest-centroid accuracy "
                                                  f"{out['play_centroid_accuracy']:.2f}, chance {1 / len(plays):.2f})"),
            (axes[1], z_spk, [k for k, _ in spk_pairs], speakers,
             f"{plays[0]}: by speaker (accuracy {out['speaker_centroid_accuracy']:.2f}, chance "
             f"{out['speaker_chance']:.2f})")):
        xy = pca_2d(z)
        for i, name in enumerate(names):
            keep = torch.tensor([label == name for label in labels])
            ax.scatter(xy[keep, 0], xy[keep, 1], s=5, alpha=0.6, color=f"C{i}", label=name, edgecolors="none")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"PC 1 (|correlation| with the line's length: {out['pc1_length_correlation']:.2f})"
                      if z is z_play else "PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, markerscale=3)
    fig.suptitle(f"{space.name} concept space (dim {space.dim}), 2-D PCA of sentence embeddings", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return out


def plot_loss(losses: list[float], path: Path) -> None:
    fig = Figure(figsize=(6, 3.8), dpi=120)
    ax = fig.add_subplot()
    t = torch.tensor(losses)
    window = max(1, len(t) // 50)
    smooth = t.unfold(0, window, 1).mean(1) if len(t) >= window else t
    ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist())
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss (nats/byte, smoothed)")
    ax.set_yscale("log")
    ax.set_title("mini-SONAR training (with embedding noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# --- The run -------------------------------------------------------------------------------------------------------


def run(cfg: ConceptsConfig, argv=None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.device = pick_device(cfg.device)
    space: ConceptSpace | None = SonarSpace(cfg.device) if cfg.backend == "sonar" else None  # fails fast if absent
    out_dir = Path(cfg.out_dir)
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    scenes = corpus_scenes(cfg.max_chars)
    if cfg.n_plays:
        keep = list(dict.fromkeys(scene.play for scene in scenes))[:cfg.n_plays]
        scenes = [scene for scene in scenes if scene.play in keep]
    train_scenes, heldout_scenes = split_scenes(scenes, cfg.heldout_fraction, cfg.split_seed)
    train_sentences, heldout_sentences = scene_sentences(train_scenes), scene_sentences(heldout_scenes)
    if not train_sentences or not heldout_sentences:
        raise ValueError(f"{len(train_sentences)} training and {len(heldout_sentences)} held-out sentences: use more "
                         "--n_plays or a --heldout_fraction that holds out at least one scene")
    print(f"{len(scenes)} scenes: {len(train_scenes)} for training ({len(train_sentences):,} sentences), "
          f"{len(heldout_scenes)} held out ({len(heldout_sentences):,} sentences)")
    # the held-out sentences measured: an even spread over the held-out scenes, fixed by the seed
    eval_sentences = random.Random(cfg.seed).sample(heldout_sentences, min(cfg.eval_sentences,
                                                                           len(heldout_sentences)))

    trained = {}
    if space is None:
        with MetricsLogger(out_dir) as logger:
            model, losses = train_autoencoder(cfg, train_sentences, eval_sentences, logger)
        space = MiniSonar(model)
        save_concept_space(model, out_dir / "ckpt.pt", {"config": asdict(cfg)})
        plot_loss(losses, out_dir / "loss.png")
        trained = dict(params=sum(p.numel() for p in model.parameters()), first_loss=losses[0],
                       final_loss=losses[-1], train_seconds=round(time.perf_counter() - start, 1))

    scores = reconstruction_scores(space, eval_sentences)
    train_scores = reconstruction_scores(space, random.Random(cfg.seed + 1).sample(
        train_sentences, min(cfg.eval_sentences, len(train_sentences))))
    noise = {}
    for sigma in parse_noise_levels(cfg.noise_levels):
        s = reconstruction_scores(space, eval_sentences, noise_std=sigma, seed=cfg.seed)
        noise[f"{sigma:g}"] = dict(exact_match=s["exact_match"], char_error_rate=s["char_error_rate"])
    space_stats = semantic_space(space, train_scenes, cfg, out_dir / "semantic_space.png")
    pool = random.Random(cfg.seed + 2).sample(train_sentences, min(2000, len(train_sentences)))
    neighbours = nearest_neighbours(space, eval_sentences[:8], pool)
    path = interpolate(space, eval_sentences[0], eval_sentences[1])

    results = dict(
        command="python part10_semantic/concepts.py " + " ".join(sys.argv[1:] if argv is None else argv),
        exact_match=round(scores["exact_match"], 4), char_error_rate=round(scores["char_error_rate"], 4),
        train_exact_match=round(train_scores["exact_match"], 4),
        train_char_error_rate=round(train_scores["char_error_rate"], 4),
        backend=cfg.backend, dim=space.dim, n_train_sentences=len(train_sentences),
        n_heldout_sentences=len(heldout_sentences),
        n_eval_sentences=len(eval_sentences), n_train_scenes=len(train_scenes), n_heldout_scenes=len(heldout_scenes),
        **trained,
        **{f"exact_match_noise{k}": round(v["exact_match"], 4) for k, v in noise.items()},
        **{f"char_error_rate_noise{k}": round(v["char_error_rate"], 4) for k, v in noise.items()},
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in space_stats.items()},
        examples=[dict(sentence=s, decoded=d) for s, d in zip(eval_sentences[:12], scores["decoded"][:12])],
        neighbours=neighbours, interpolation=path,
        config=asdict(cfg))
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    if trained:
        print(f"\nmini-SONAR, dim {cfg.dim}, {trained['params']:,} parameters, {len(train_sentences):,} training "
              f"sentences, {cfg.max_iters} steps ({trained['train_seconds']:.0f} s)")
    else:
        print(f"\nSONAR (text_sonar_basic_encoder/decoder), dim {space.dim}")
    print(f"{'sentences':>24} {'exact match':>12} {'CER':>8}")
    print(f"{'held-out':>24} {results['exact_match']:12.3f} {results['char_error_rate']:8.3f}")
    print(f"{'training':>24} {results['train_exact_match']:12.3f} {results['train_char_error_rate']:8.3f}")
    for k, v in noise.items():
        print(f"{'held-out, noise ' + k:>24} {v['exact_match']:12.3f} {v['char_error_rate']:8.3f}")
    print(f"PC 1 of the plotted sentences vs their length in bytes: |correlation| "
          f"{results['pc1_length_correlation']:.2f}")
    print(f"play nearest-centroid accuracy {results['play_centroid_accuracy']:.3f} (chance "
          f"{results['play_chance']:.3f}); speaker {results['speaker_centroid_accuracy']:.3f} (chance "
          f"{results['speaker_chance']:.3f})")
    print("held-out sentence -> decode(encode(sentence)):")
    for ex in results["examples"][:6]:
        print(f"  {ex['sentence']!r}\n  -> {ex['decoded']!r}")
    print("held-out sentence -> its nearest training sentence in the space (cosine):")
    for nb in neighbours[:3]:
        print(f"  {nb['query']!r}\n  ~ {nb['neighbour']!r} ({nb['cosine']:.2f})")
    print("decoding the straight line between the first two:")
    for t, text in zip(torch.linspace(0, 1, len(path)).tolist(), path):
        print(f"  t = {t:.2f}: {text!r}")
    files = "semantic_space.png, ckpt.pt and loss.png" if trained else "semantic_space.png"
    print(f"wrote {out_dir / 'results.json'}, {files} ({results['seconds']:.0f} s)")
    return results


def main(argv=None) -> dict:
    cfg = parse_config(ConceptsConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    return run(cfg, argv)


if __name__ == "__main__":
    run_cli(main)
