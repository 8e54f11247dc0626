"""Large Concept Model: language modelling in a space of sentence embeddings (Barrault et al. 2024).

An LLM predicts the next token. A Large Concept Model (LCM; Barrault et al. 2024, "Large Concept Models: Language
Modeling in a Sentence Representation Space", https://arxiv.org/abs/2412.08821, reference code
github.com/facebookresearch/large_concept_model) predicts the next *sentence*, as one vector: a "concept". A frozen
sentence encoder turns every sentence of a document into a vector (the paper uses SONAR; we use the chapter's
mini-SONAR, concepts.py), the LCM is a Transformer over those vectors, and the frozen decoder turns the vectors it
predicts back into text. The model plans in concept space; the words come last.

Read top to bottom:
  1. the data: every verse line of every scene encoded once (cached), a robust scaler fitted on the training
     embeddings (the paper's section 2.3.1: median and interquartile range), the concept of "End of text."
     appended to every scene, windows of up to block_size concepts;
  2. Base-LCM (section 2.3.1): PreNet (Linear) -> the chapter's causal GPT over concepts (inputs_embeds) ->
     PostNet (Linear), trained with the MSE to the next (scaled) concept; generation stops when the predicted
     concept is close to "End of text." or to the previous concept (cosine >= 0.9, the paper's s_eot and s_prev);
  3. the One-Tower diffusion LCM (sections 2.3.2-2.3.3): the same backbone reads the clean context and, beside it,
     a noised version of the next concept, and predicts the clean concept (x0-prediction). Cosine noise schedule
     (zero terminal SNR), T = 100 training timesteps, deterministic DDIM sampling with S = 10 trailing steps (the
     paper: 40), classifier-free guidance (the context dropped with probability 0.15 at training, g = 3 with
     rescale 0.7 at sampling), initial noise scale 0.6 and epsilon scaling 1.00045, the paper's settings;
  4. the paper's pre-training metrics on held-out scenes (section 2.4.1): l2, round-trip l2 (decode, re-encode),
     contrastive accuracy, paraphrasing; for both LCMs, the mean-embedding baseline and a copy-the-previous
     baseline; and the regression to the mean that motivates diffusion: is each prediction nearer the average
     embedding than any real sentence?
  5. generation: plan the next sentences of a held-out scene in concept space, decode them to text;
  6. plots: loss.png, trajectories.png (a PCA of concept space with a scene's true and predicted paths).

    python part10_semantic/lcm.py                          # mini-SONAR (trained first if missing, ~4 min)
    python part10_semantic/lcm.py --concept_backend sonar  # Meta's SONAR (needs requirements-sonar.txt + weights)
    python part10_semantic/lcm.py --help
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from part10_semantic.concepts import corpus_scenes, load_concept_space, split_scenes
from part10_semantic.model import GPT, GPTConfig
from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, run_cli
from shared.device import pick_device
from shared.metrics import MetricsLogger

EOT_SENTENCE = "End of text."  # the paper's document suffix (reference recipes: source_suffix_text)
MODELS = ("base_lcm", "diffusion_lcm", "mean_baseline", "copy_previous")  # the four predictors compared


@dataclass
class LCMConfig:
    # the concept space and the data
    concept_backend: str = field(default="mini", metadata={"choices": ["mini", "sonar"], "help": "mini: the "
                                 "chapter's mini-SONAR (concepts.py, trained first if missing); sonar: Meta's SONAR"})
    concept_ckpt: str = field(default="runs/part10_semantic/concepts/ckpt.pt",
                              metadata={"help": "mini-SONAR checkpoint (made by concepts.py when missing)"})
    max_chars: int = field(default=64, metadata={"help": "verse lines longer than this are left out of the scenes "
                                                         "(the concept decoder's limit)", "min": 8})
    heldout_fraction: float = field(default=0.1, metadata={"help": "share of scenes held out (concepts.py's split)",
                                                           "min": 0.01, "max": 0.5})
    max_train_scenes: int = field(default=0, metadata={"help": "use only the first N training scenes; 0 = all",
                                                       "min": 0})
    max_heldout_scenes: int = field(default=0, metadata={"help": "use only the first N held-out scenes; 0 = all",
                                                         "min": 0})
    block_size: int = field(default=32, metadata={"help": "concepts per training window (the paper wraps "
                                                          "documents at 128 sentences)", "min": 2})
    # both LCMs: the same backbone size (as in the paper's ablations)
    n_layer: int = field(default=4, metadata={"min": 1})
    n_head: int = field(default=4, metadata={"min": 1})
    n_embd: int = field(default=128, metadata={"min": 8})
    dropout: float = field(default=0.1, metadata={"help": "the paper trains with 0.1", "min": 0, "max": 0.9})
    batch_size: int = field(default=32, metadata={"help": "windows per step", "min": 1})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak; warmup, then cosine to a tenth",
                                                         "min": 0})
    warmup_iters: int = field(default=100, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"help": "the paper's 0.1", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off", "min": 0})
    base_iters: int = field(default=400, metadata={"help": "Base-LCM training steps", "min": 1})
    diffusion_iters: int = field(default=600, metadata={"help": "diffusion LCM training steps", "min": 1})
    eval_interval: int = field(default=100, metadata={"help": "steps between held-out loss evaluations", "min": 1})
    eval_batches: int = field(default=4, metadata={"help": "held-out batches per loss evaluation", "min": 1})
    # diffusion (the paper's section 2.3.2 and its defaults in 2.4.1)
    diffusion_steps: int = field(default=100, metadata={"help": "T, the training timesteps (the paper: 100)",
                                                        "min": 2})
    sample_steps: int = field(default=10, metadata={"help": "S, DDIM steps at sampling (the paper: 40; here 40 "
                                                            "gives the same l2 and CA at 4x the time)", "min": 1})
    cfg_drop: float = field(default=0.15, metadata={"help": "probability of dropping the context at training, for "
                                                            "classifier-free guidance (the paper: 0.15)",
                                                    "min": 0, "max": 1})
    guidance_scale: float = field(default=3.0, metadata={"help": "g: uncond + g (cond - uncond); 1 = no guidance "
                                                                 "(the paper: 3)", "min": 0})
    guidance_rescale: float = field(default=0.7, metadata={"help": "Lin et al.'s guidance rescale (the paper: 0.7)",
                                                           "min": 0, "max": 1})
    init_noise_scale: float = field(default=0.6, metadata={"help": "sigma_init of the starting noise (the paper: "
                                                                   "0.6)", "min": 0})
    epsilon_scaling: float = field(default=1.00045, metadata={"help": "divide the predicted noise by this at each "
                                                                      "DDIM step (Ning et al.; the paper: 1.00045)",
                                                              "min": 0.5})
    time_embd: int = field(default=32, metadata={"help": "size of the sinusoidal timestep embedding concatenated "
                                                         "to each input concept", "min": 2})
    guidance_sweep: str = field(default="1,5", metadata={"help": "also report l2 and contrastive accuracy of the "
                                                                   "diffusion LCM at these guidance scales ('' = "
                                                                   "none)"})
    # evaluation and generation
    eval_windows: int = field(default=128, metadata={"help": "held-out windows (of block_size concepts) in the "
                                                             "teacher-forced evaluation, a seeded random choice; "
                                                             "0 = all (diffusion sampling makes each one costly)",
                                                     "min": 0})
    contrastive_pool: int = field(default=1024, metadata={"help": "held-out targets per contrastive-accuracy "
                                                                  "batch", "min": 4})
    n_roundtrip: int = field(default=400, metadata={"help": "predictions per model decoded and re-encoded for the "
                                                            "round-trip l2 (decoding is slow); 0 = all", "min": 0})
    nn_bank: int = field(default=20000, metadata={"help": "real training sentences searched for the nearest "
                                                          "neighbour of each prediction", "min": 1})
    n_geometry: int = field(default=2000, metadata={"help": "predictions per model measured against the mean and "
                                                            "the nearest real sentence", "min": 1})
    eot_threshold: float = field(default=0.9, metadata={"help": "stop when cos(prediction, 'End of text.') reaches "
                                                                "this (the paper's s_eot)", "min": -1, "max": 1})
    prev_threshold: float = field(default=0.9, metadata={"help": "stop when cos(prediction, previous concept) "
                                                                 "reaches this (the paper's s_prev)",
                                                         "min": -1, "max": 1})
    n_generations: int = field(default=3, metadata={"help": "held-out scenes continued in free generation",
                                                    "min": 0})
    prompt_sentences: int = field(default=4, metadata={"help": "sentences of each scene given as the prompt",
                                                       "min": 1})
    max_new_sentences: int = field(default=8, metadata={"help": "most concepts generated per prompt", "min": 1})
    # the run
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default "
                                                                "(the physical cores). Running two jobs at once? "
                                                                "Give each --threads 1", "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a run may replace the run already in out_dir (the "
                                                             "embedding cache is kept)"})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/lcm"


def check_config(cfg: LCMConfig) -> None:
    check_bounds(cfg)
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.sample_steps > cfg.diffusion_steps:
        raise ValueError(f"--sample_steps {cfg.sample_steps} is more than --diffusion_steps {cfg.diffusion_steps}")
    if cfg.time_embd % 2:
        raise ValueError(f"--time_embd must be even (cos and sin halves), got {cfg.time_embd}")
    parse_scales(cfg.guidance_sweep)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--guidance_sweep must be comma-separated numbers, got {text!r}") from None
    if any(not s >= 0 for s in scales):
        raise ValueError(f"--guidance_sweep must list scales >= 0, got {text!r}")
    return scales


# --- 1. The data: scenes as sequences of concepts -----------------------------------------------------------------


class RobustScaler(nn.Module):
    """The paper's "normalize" and "denormalize" maps (section 2.3.1): per dimension, subtract the median and
    divide by the interquartile range, read as a normal distribution's standard deviation: IQR / 1.349 (the
    reference code's default, "gaussian_robust", the robust normalisation of https://arxiv.org/abs/2307.05445).
    Medians and quartiles ignore the long tails of sentence-embedding dimensions that would dominate a mean and a
    standard deviation; after scaling, every dimension has unit spread, which is what the diffusion noise assumes."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, q_min: float = 0.25, q_max: float = 0.75) -> RobustScaler:
        """x (N, dim): the training embeddings."""
        lo, median, hi = (quantiles(x, q) for q in (q_min, 0.5, q_max))
        normal_iqr = torch.special.ndtri(torch.tensor(q_max)) - torch.special.ndtri(torch.tensor(q_min))  # 1.349
        scale = (hi - lo) / normal_iqr
        self.center.copy_(median)
        self.scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))  # a constant dimension: leave it
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.center


def quantiles(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each column of x (N, dim) -> (dim,), linear interpolation between the two nearest
    order statistics (numpy's and torch.quantile's default). Written with a sort because torch.quantile refuses
    inputs over 16M elements (100k sentences x 256 dimensions already are)."""
    ordered = x.sort(dim=0).values
    position = q * (x.size(0) - 1)
    below = math.floor(position)
    above = min(below + 1, x.size(0) - 1)
    weight = position - below
    return ordered[below] * (1 - weight) + ordered[above] * weight


@dataclass
class ConceptData:
    """Every scene as a sequence of rows of one embedding table: each distinct sentence is encoded once."""

    sentences: list[str]  # (U,) the distinct sentences; sentences[eot_id] is "End of text."
    embeddings: torch.Tensor  # (U, dim) their concepts, unscaled (the concept space's own coordinates)
    eot_id: int
    train: list[torch.Tensor]  # each training scene: row ids (n_i + 1,), its sentences then the EOT row
    heldout: list[torch.Tensor]
    heldout_scenes: list  # the held-out Scene objects (names and text, for generation)


def concept_space_digest(cfg: LCMConfig, space) -> str | None:
    """What identifies the concept space, for the embedding cache: the checkpoint's bytes for mini-SONAR, the model
    name for SONAR, a `cache_key` attribute for any other space (None: do not cache)."""
    if hasattr(space, "cache_key"):
        return space.cache_key
    if cfg.concept_backend == "sonar":
        return "sonar-text_sonar_basic_encoder"
    ckpt = Path(cfg.concept_ckpt)
    return hashlib.sha1(ckpt.read_bytes()).hexdigest() if ckpt.is_file() else None


def encode_sentences(space, sentences: list[str], batch_size: int = 256, desc: str = "encoding") -> torch.Tensor:
    """space.encode in batches (with a progress bar) -> (N, dim) float32 on the CPU. The sentences go in order of
    length, so a batch pads its sentences to similar lengths (a quarter less work for mini-SONAR), and the rows
    come back in the order given."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [space.encode([sentences[j] for j in order[i:i + batch_size]]).detach().float().cpu()
           for i in tqdm(range(0, len(sentences), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                         leave=False, disable=len(sentences) <= batch_size)]
    if not out:
        return torch.zeros(0, space.dim)
    embeddings = torch.empty(len(sentences), out[0].size(1))
    embeddings[torch.tensor(order)] = torch.cat(out)
    return embeddings


def build_data(cfg: LCMConfig, space, scenes, out_dir: Path) -> ConceptData:
    train_scenes, heldout_scenes = split_scenes(scenes, cfg.heldout_fraction, seed=0)  # concepts.py's own split
    if cfg.max_train_scenes:
        train_scenes = train_scenes[:cfg.max_train_scenes]
    if cfg.max_heldout_scenes:
        heldout_scenes = heldout_scenes[:cfg.max_heldout_scenes]
    heldout_scenes = [s for s in heldout_scenes if s.sentences]
    sentences = sorted({s for scene in train_scenes + heldout_scenes for s in scene.sentences} | {EOT_SENTENCE})
    # Encode every sentence once and keep the table: the LCM never sees text, only these vectors. The cache is
    # keyed by the concept space (a retrained mini-SONAR gets new vectors) and by the sentence list.
    digest = concept_space_digest(cfg, space)
    cache = None
    if digest is not None:
        key = hashlib.sha1((digest + "\n" + "\n".join(sentences)).encode()).hexdigest()[:16]
        cache = out_dir / f"concept_cache_{key}.pt"
    if cache is not None and cache.is_file():
        embeddings = torch.load(cache, weights_only=True)["embeddings"]
        print(f"{len(sentences):,} sentence concepts from the cache {cache}")
    else:
        embeddings = encode_sentences(space, sentences, desc=f"encoding {len(sentences):,} sentences")
        if cache is not None:
            atomic_save({"sentences": sentences, "embeddings": embeddings}, cache)
    row = {s: i for i, s in enumerate(sentences)}
    eot_id = row[EOT_SENTENCE]

    def ids(scene) -> torch.Tensor:  # the paper suffixes every document with "End of text."
        return torch.tensor([row[s] for s in scene.sentences] + [eot_id])

    return ConceptData(sentences, embeddings, eot_id, [ids(s) for s in train_scenes if s.sentences],
                       [ids(s) for s in heldout_scenes], heldout_scenes)


def window_starts(scenes: list[torch.Tensor]) -> torch.Tensor:
    """(W, 2): (scene, start) of every window that holds at least two concepts (a context and a target)."""
    return torch.tensor([(i, j) for i, seq in enumerate(scenes) for j in range(len(seq) - 1)])


def gather_windows(scenes: list[torch.Tensor], starts: torch.Tensor, block_size: int):
    """The windows of up to block_size concepts that begin at starts (B, 2) -> row ids (B, L), right-padded with
    row 0, and valid (B, L), True for real concepts. Right padding needs no attention mask in a causal model:
    real concepts never look ahead at it."""
    ids = torch.zeros(len(starts), block_size, dtype=torch.long)
    valid = torch.zeros(len(starts), block_size, dtype=torch.bool)
    for b, (scene, start) in enumerate(starts.tolist()):
        part = scenes[scene][start:start + block_size]
        ids[b, :len(part)], valid[b, :len(part)] = part, True
    return ids, valid


def heldout_chunks(scenes: list[torch.Tensor], block_size: int) -> torch.Tensor:
    """(C, 2): each held-out scene cut into consecutive windows of block_size (the last one shorter), for the
    teacher-forced evaluation; every concept but a window's first is a target."""
    return torch.tensor([(i, j) for i, seq in enumerate(scenes) for j in range(0, len(seq) - 1, block_size)])


# --- 2. Base-LCM --------------------------------------------------------------------------------------------------


def backbone(cfg: LCMConfig, block_size: int) -> GPT:
    """The chapter's GPT (RMSNorm, RoPE, SwiGLU: the paper's Base-LCM backbone too), read through inputs_embeds.
    vocab_size = 1: its token embedding and LM head (one row) are never used."""
    return GPT(GPTConfig(block_size=block_size, vocab_size=1, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, dropout=cfg.dropout))


class BaseLCM(nn.Module):
    """PreNet -> causal Transformer over concepts -> PostNet (the paper's Figure 4).

    The inputs are already normalised by the RobustScaler (the paper's PreNet does both steps: normalise, then a
    Linear to d_model); the outputs stay in the scaled space, and the caller denormalises them (the PostNet's
    second step), so the loss is the MSE between scaled concepts, as in the reference code."""

    def __init__(self, dim: int, cfg: LCMConfig):
        super().__init__()
        self.prenet = nn.Linear(dim, cfg.n_embd)
        self.transformer = backbone(cfg, cfg.block_size)
        self.postnet = nn.Linear(cfg.n_embd, dim)

    def forward(self, concepts: torch.Tensor) -> torch.Tensor:
        """concepts (B, L, dim), scaled -> (B, L, dim): at position n, the predicted concept n + 1."""
        hidden = self.transformer.hidden_states(None, inputs_embeds=self.prenet(concepts))  # (B, L, n_embd)
        return self.postnet(hidden)


def base_lcm_loss(model: BaseLCM, concepts: torch.Tensor, valid: torch.Tensor, generator=None) -> torch.Tensor:
    """The MSE between each prediction and the next scaled concept (the paper's Eq. 1), over real targets only.
    (Mean over dimensions: the paper's squared norm divided by dim, a constant factor.)"""
    pred = model(concepts[:, :-1])  # (B, L-1, dim)
    target_valid = valid[:, 1:]
    return F.mse_loss(pred[target_valid], concepts[:, 1:][target_valid])


# --- 3. The One-Tower diffusion LCM -------------------------------------------------------------------------------


def cosine_alpha_bar(n_steps: int, s: float = 0.008) -> torch.Tensor:
    """The cosine noise schedule (Nichol & Dhariwal 2021; the paper's Eq. 12): (T + 1,) float64,
    alpha_bar_t = alpha_t^2 = f(t / T) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2), for t = 0 .. T.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (variance preserving). alpha_bar_0 = 1 (clean) and
    alpha_bar_T = cos^2(pi / 2) = 0: the last step is pure noise, the zero terminal SNR that the paper enforces
    on all its schedules (Lin et al. 2024, https://arxiv.org/abs/2305.08891). Only x0-prediction can be trained
    there: the noise is known, the clean vector is not."""
    u = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (f / f[0]).clamp(0.0, 1.0)


def add_noise(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) (the paper's Eq. 8): alpha_bar broadcast against x0 (..., dim)."""
    a = alpha_bar.to(x0.dtype).unsqueeze(-1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def sampling_timesteps(n_steps: int, n_sample: int) -> list[int]:
    """The "trailing" DDIM schedule the paper samples along (Lin et al. 2024, Table 2):
    round(flip(arange(T, 0, -T / S))), e.g. T = 100, S = 4 -> [100, 75, 50, 25]; after the last, t = 0."""
    return [round(n_steps - i * n_steps / n_sample) for i in range(n_sample)]


def ddim_step(x_t: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
              epsilon_scaling: float = 1.0) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2020, https://arxiv.org/abs/2010.02502, Eq. 12 with eta = 0),
    from a predicted x_0:
        eps_hat = (x_t - sqrt(a_t) x0_pred) / sqrt(1 - a_t)          (the noise that x0_pred implies)
        x_prev  = sqrt(a_prev) x0_pred + sqrt(1 - a_prev) eps_hat / epsilon_scaling
    epsilon_scaling > 1 shrinks the predicted noise a little (Ning et al. 2023, https://arxiv.org/abs/2308.15321),
    against the exposure bias of sampling. At the last step a_prev = 1 and x_prev = x0_pred."""
    eps = (x_t - math.sqrt(alpha_bar_t) * x0_pred) / math.sqrt(1 - alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps / epsilon_scaling


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0):
    """Classifier-free guidance (Ho & Salimans 2022; the paper's Eq. 20): uncond + scale * (cond - uncond);
    scale 1 is the conditional model alone, 0 the unconditional one, above 1 pushes away from the unconditional
    prediction. Then Lin et al.'s rescale (their Algorithm 2): bring the guided vector's standard deviation back
    towards the conditional one's, mixing rescale of the rescaled vector with 1 - rescale of the plain one.

    We mix x0-predictions; the reference code mixes the noise predictions eps = (x_t - sqrt(a) x0) / sqrt(1 - a).
    For a fixed x_t eps is affine in x0 and the weights (1 - scale, scale) sum to 1, so the guided x0 and eps
    describe the same point; only the rescale differs (it measures the spread of x0 instead of eps)."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        factor = cond.std(dim=-1, keepdim=True) / guided.std(dim=-1, keepdim=True).clamp_min(1e-12)
        guided = guided * (rescale * factor + (1 - rescale))
    return guided


def timestep_embedding(t: torch.Tensor, size: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (...,) -> (..., size): cos and sin at geometric frequencies
    (the frequency embedding of Dhariwal & Nichol 2021 that the paper uses), so nearby timesteps look alike."""
    half = size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def one_tower_mask(length: int, drop_context: torch.Tensor | None = None) -> torch.Tensor:
    """The attention pattern of the paper's Figure 7 over [clean x_0 .. x_{L-1}, noisy x^t_0 .. x^t_{L-1}] (2L):
    a clean concept sees the clean concepts up to itself (causal); the noisy concept n sees the clean concepts
    before n and itself, never another noisy one and never the clean x_n it must recover. So one forward pass
    trains (or samples) every position's next concept at once. drop_context (B, L) bool: that noisy concept sees
    only itself: the unconditional model of classifier-free guidance. -> (B or 1, 1, 2L, 2L) bool, True = may
    attend. (The paper interleaves clean and noisy inputs; with an explicit mask and explicit positions the order
    in the sequence does not matter.)"""
    i = torch.arange(length)
    clean_sees_clean = i[None, :] <= i[:, None]  # (L, L) causal
    noisy_sees_clean = i[None, :] < i[:, None]  # strictly before
    top = torch.cat([clean_sees_clean, torch.zeros(length, length, dtype=torch.bool)], dim=1)
    bottom = torch.cat([noisy_sees_clean, torch.eye(length, dtype=torch.bool)], dim=1)
    mask = torch.cat([top, bottom], dim=0)[None]  # (1, 2L, 2L)
    if drop_context is not None:
        mask = mask.repeat(drop_context.size(0), 1, 1)
        mask[:, length:, :length] &= ~drop_context.cpu()[:, :, None]
    return mask[:, None]


class OneTowerLCM(nn.Module):
    """The One-Tower diffusion LCM (the paper's section 2.3.3): one Transformer reads the clean context and the
    noisy next concepts together, each input concatenated with its timestep's embedding (0 for the clean ones),
    and predicts the clean concepts (x0-prediction). Same PreNet / backbone / PostNet as the Base-LCM; positions
    by RoPE (the paper: learned position embeddings), the clean x_n and the noisy x^t_n both at position n."""

    def __init__(self, dim: int, cfg: LCMConfig):
        super().__init__()
        self.time_embd = cfg.time_embd
        self.prenet = nn.Linear(dim + cfg.time_embd, cfg.n_embd)
        self.transformer = backbone(cfg, cfg.block_size)
        self.postnet = nn.Linear(cfg.n_embd, dim)

    def forward(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                drop_context: torch.Tensor | None = None) -> torch.Tensor:
        """clean (B, L, dim): scaled concepts x_0 .. x_{L-1}; noisy (B, L, dim): x^t_n, a noised x_n at timestep
        t (B, L); drop_context (B, L) bool: predict that position without context. -> (B, L, dim): at position n,
        the predicted clean x_n, from x^t_n and x_<n only."""
        B, L, _ = clean.shape
        steps = torch.cat([torch.zeros_like(t), t], dim=1)  # (B, 2L): the clean inputs are at t = 0
        x = torch.cat([clean, noisy], dim=1)  # (B, 2L, dim)
        x = self.prenet(torch.cat([x, timestep_embedding(steps, self.time_embd)], dim=-1))  # (B, 2L, n_embd)
        pos = torch.arange(L, device=x.device).repeat(2)  # (2L,)
        mask = one_tower_mask(L, drop_context).to(x.device)
        gpt = self.transformer
        # GPT.hidden_states builds a causal mask; this model needs Figure 7's, so we run its blocks directly
        cos, sin = gpt.rope_cos[pos], gpt.rope_sin[pos]
        x = gpt.drop(x)
        for block in gpt.blocks:
            x = block(x, pos, cos, sin, mask=mask)
        return self.postnet(gpt.ln_f(x)[:, L:])  # the noisy half: (B, L, dim)


@dataclass
class Diffusion:
    """The noise schedule and the sampler's settings."""

    alpha_bar: torch.Tensor  # (T + 1,) float64
    sample_steps: int
    guidance_scale: float
    guidance_rescale: float
    init_noise_scale: float
    epsilon_scaling: float

    @property
    def n_steps(self) -> int:
        return len(self.alpha_bar) - 1


def diffusion_loss(model: OneTowerLCM, concepts: torch.Tensor, valid: torch.Tensor, diffusion: Diffusion,
                   cfg_drop: float, generator=None) -> torch.Tensor:
    """The simple reconstruction loss (the paper's Eq. 16, w(t) = 1): every position gets its own timestep
    t ~ U{1..T} and noise; the model recovers the clean concept from the noisy one and the clean context. With
    probability cfg_drop a position's context is dropped (its unconditional model). Position 0 has no context:
    it is always unconditional."""
    B, L, _ = concepts.shape
    device = concepts.device
    t = torch.randint(1, diffusion.n_steps + 1, (B, L), generator=generator).to(device)
    noise = torch.randn(concepts.shape, generator=generator).to(device)
    drop = torch.rand(B, L, generator=generator).to(device) < cfg_drop
    noisy = add_noise(concepts, diffusion.alpha_bar.to(device)[t], noise)
    pred = model(concepts, noisy, t, drop)
    return F.mse_loss(pred[valid], concepts[valid])


@torch.no_grad()
def diffusion_sample(model: OneTowerLCM, clean: torch.Tensor, diffusion: Diffusion, generator=None,
                     guidance_scale: float | None = None) -> torch.Tensor:
    """Sample the next concept at every position of clean (B, L, dim) at once (teacher forcing: position n
    conditions on the true x_<n) -> (B, L, dim) scaled. Start from sigma_init * N(0, I) at t = T, take S
    deterministic DDIM steps along the trailing schedule; at each step the model predicts x_0 twice, with and
    without the context (one batch of 2B), and classifier-free guidance mixes the two."""
    scale = diffusion.guidance_scale if guidance_scale is None else guidance_scale
    B, L, _ = clean.shape
    x = (torch.randn(clean.shape, generator=generator) * diffusion.init_noise_scale).to(clean.device)
    steps = sampling_timesteps(diffusion.n_steps, diffusion.sample_steps)
    both = torch.cat([clean, clean])  # (2B, L, dim): the first half conditional, the second unconditional
    drop = torch.cat([torch.zeros(B, L, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool)]).to(clean.device)
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else 0
        tt = torch.full((2 * B, L), t, device=clean.device)
        cond, uncond = model(both, torch.cat([x, x]), tt, drop).chunk(2)
        x0 = cond if scale == 1 else classifier_free_guidance(cond, uncond, scale, diffusion.guidance_rescale)
        x = ddim_step(x, x0, diffusion.alpha_bar[t].item(), diffusion.alpha_bar[t_prev].item(),
                      diffusion.epsilon_scaling)
    return x  # after the last step (t_prev = 0, alpha_bar = 1): the final x0 prediction


# --- Training (both models) ---------------------------------------------------------------------------------------


def lr_at(it: int, cfg: LCMConfig, iters: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, iters - cfg.warmup_iters)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(name: str, model: nn.Module, loss_fn, iters: int, data: ConceptData, scaled: torch.Tensor,
          cfg: LCMConfig, logger: MetricsLogger, seed: int) -> dict:
    """AdamW on random windows of the training scenes; every eval_interval steps, the loss on fixed held-out
    windows. loss_fn(model, concepts (B, L, dim), valid (B, L), generator) -> scalar. Returns the losses."""
    device = scaled.device
    g = torch.Generator().manual_seed(seed)
    starts = window_starts(data.train)
    eval_g = torch.Generator().manual_seed(seed + 1)
    val_starts = window_starts(data.heldout)
    val_batches = [gather_windows(data.heldout, val_starts[torch.randint(len(val_starts), (cfg.batch_size,),
                                                                          generator=eval_g)], cfg.block_size)
                   for _ in range(cfg.eval_batches)]
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norm gains and biases do not
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(loss_fn(model, scaled[ids.to(device)], valid.to(device), torch.Generator().manual_seed(k)).item()
                       for k, (ids, valid) in enumerate(val_batches)) / len(val_batches)
        model.train()
        return loss

    losses, evals = [], []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(iters), desc=f"training {name}", dynamic_ncols=True)
    for it in bar:
        lr = lr_at(it, cfg, iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, valid = gather_windows(data.train, starts[torch.randint(len(starts), (cfg.batch_size,), generator=g)],
                                    cfg.block_size)
        loss = loss_fn(model, scaled[ids.to(device)], valid.to(device), g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: the loss became {losses[-1]} at step {it}; try a lower "
                                     "--learning_rate")
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if (it + 1) % cfg.eval_interval == 0 or it + 1 == iters:
            elapsed = time.perf_counter() - start
            row = logger.log(model=name, iter=it + 1, train_loss=sum(losses[-cfg.eval_interval:]) /
                             len(losses[-cfg.eval_interval:]), val_loss=evaluate(), lr=lr,
                             tokens_per_sec=(it + 1) * cfg.batch_size * cfg.block_size / elapsed)  # tokens = concepts
            evals.append(row)
            tqdm.write(f"{name} step {it + 1}: train loss {row['train_loss']:.4f}, held-out loss {row['val_loss']:.4f}")
    bar.close()
    model.eval()
    return dict(losses=losses, evals=evals, seconds=time.perf_counter() - start)


# --- 4. Metrics (the paper's section 2.4.1) -----------------------------------------------------------------------


def contrastive_accuracy(pred: torch.Tensor, target: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """For each prediction i: the share of the other ground-truth concepts j of the batch (not excluded[i, j])
    that lie further from pred_i (l2) than its own target does: CA_i = mean_j [|pred_i - target_j| >
    |pred_i - target_i|]. 0.5 is chance, 1 means the true next sentence is the nearest. pred, target (N, dim);
    excluded (N, N) bool, which must exclude j = i (the paper also excludes the target's two neighbours).
    -> (N,)."""
    dist = torch.cdist(pred.double(), target.double())  # (N, N): |pred_i - target_j|
    own = dist.diagonal().unsqueeze(1)  # (N, 1)
    further = (dist > own) & ~excluded
    return further.sum(1).double() / (~excluded).sum(1).clamp_min(1).double()


def neighbour_exclusion(scene: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The paper's exclusion for the contrastive accuracy: x_n itself and its two neighbouring ground-truth
    concepts (same scene, position n - 1 or n + 1). scene, position (N,) -> (N, N) bool."""
    same_scene = scene[:, None] == scene[None, :]
    neighbours = same_scene & ((position[:, None] - position[None, :]).abs() == 1)
    return neighbours | torch.eye(len(scene), dtype=torch.bool)


def pooled_contrastive_accuracy(pred, target, scene, position, pool: int) -> float:
    """The mean contrastive accuracy over consecutive batches of `pool` targets."""
    scores = [contrastive_accuracy(pred[i:i + pool], target[i:i + pool],
                                   neighbour_exclusion(scene[i:i + pool], position[i:i + pool]))
              for i in range(0, len(pred), pool) if len(pred[i:i + pool]) > 1]
    return torch.cat(scores).mean().item()


def nearest_distance(x: torch.Tensor, bank: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row of x (N, dim), the l2 distance to its nearest row of bank (M, dim) -> (N,)."""
    return torch.cat([torch.cdist(x[i:i + chunk], bank).min(dim=1).values for i in range(0, len(x), chunk)])


@dataclass
class Targets:
    """The held-out targets of the teacher-forced evaluation, and every predictor's guess for each."""

    rows: torch.Tensor  # (N,) embedding row of each target concept
    scene: torch.Tensor  # (N,) its held-out scene
    position: torch.Tensor  # (N,) its index in the scene
    context_start: torch.Tensor  # (N,) where its evaluation window starts in the scene: its context is
    #                              positions context_start .. position - 1
    preds: dict  # name -> (N, dim) predictions, unscaled


@torch.no_grad()
def teacher_forced_predictions(data: ConceptData, scaled: torch.Tensor, scaler: RobustScaler, base: BaseLCM,
                               diffusion_model: OneTowerLCM, diffusion: Diffusion, mean: torch.Tensor,
                               cfg: LCMConfig, guidance_scales: list[float]) -> Targets:
    """Run every predictor over the held-out scenes, window by window, with the true context (the paper's
    teacher-forced pre-training evaluation). The diffusion LCM's guess is one DDIM sample per target (also at
    each extra guidance scale, stored as 'diffusion_lcm_g<scale>')."""
    device = scaled.device
    chunks = heldout_chunks(data.heldout, cfg.block_size)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    if cfg.eval_windows and len(chunks) > cfg.eval_windows:
        chunks = chunks[torch.randperm(len(chunks), generator=g)[:cfg.eval_windows].sort().values]
    rows, scene, position, context_start = [], [], [], []
    preds = {name: [] for name in ["base_lcm", "diffusion_lcm", *[f"diffusion_lcm_g{s:g}" for s in guidance_scales]]}
    batch = 64
    for c0 in tqdm(range(0, len(chunks), batch), desc="held-out predictions", dynamic_ncols=True, leave=False):
        starts = chunks[c0:c0 + batch]
        ids, valid = gather_windows(data.heldout, starts, cfg.block_size)
        x = scaled[ids.to(device)]  # (B, L, dim)
        target_valid = valid[:, 1:]  # (B, L-1): position n + 1 is a real target
        rows.append(ids[:, 1:][target_valid])
        b_idx, n_idx = target_valid.nonzero(as_tuple=True)
        scene.append(starts[b_idx, 0])
        position.append(starts[b_idx, 1] + n_idx + 1)
        context_start.append(starts[b_idx, 1])
        preds["base_lcm"].append(base(x[:, :-1])[target_valid.to(device)])
        # the diffusion model predicts x_n at position n from x_<n: positions 1 .. L-1 are the targets
        for name, s in [("diffusion_lcm", None), *[(f"diffusion_lcm_g{s:g}", s) for s in guidance_scales]]:
            sample = diffusion_sample(diffusion_model, x, diffusion, g, guidance_scale=s)
            preds[name].append(sample[:, 1:][target_valid.to(device)])
    rows = torch.cat(rows)
    preds = {name: scaler.denormalize(torch.cat(p)).cpu() for name, p in preds.items()}
    preds["mean_baseline"] = mean.expand(len(rows), -1)
    # copy the previous concept: the true x_{n-1} (in the same scene, the target's own context)
    position = torch.cat(position)
    scene = torch.cat(scene)
    previous = torch.stack([data.heldout[s][p - 1] for s, p in zip(scene.tolist(), position.tolist())])
    preds["copy_previous"] = data.embeddings[previous]
    return Targets(rows, scene, position, torch.cat(context_start), preds)


def paraphrase_ratio(pred: torch.Tensor, targets: Targets, keep: torch.Tensor, data: ConceptData) -> float:
    """PAR (section 2.4.1): how much a prediction copies its context, max_{m<n} cos(pred_n, x_m), relative to the
    true sentence's own max_{m<n} cos(x_n, x_m), the context being the window the model read. We report the
    ratio of the two means over the targets (the paper's per-target ratio blows up where the true sentence is
    unlike all its context); above 1: the predictions paraphrase the context more than the real text does.
    pred (N, dim) for the targets where keep (all targets,) is True."""
    pred_max, true_max = [], []
    items = zip(targets.scene[keep].tolist(), targets.context_start[keep].tolist(), targets.position[keep].tolist(),
                targets.rows[keep].tolist())
    for p, (s, start, n, row) in zip(pred, items):
        context = data.embeddings[data.heldout[s][start:n]]  # (k, dim): x_start .. x_{n-1}
        pred_max.append(F.cosine_similarity(p[None], context).max())
        true_max.append(F.cosine_similarity(data.embeddings[row][None], context).max())
    return (torch.stack(pred_max).mean() / torch.stack(true_max).mean()).item()


def decode_in_batches(space, embeddings: torch.Tensor, batch_size: int = 256) -> list[str]:
    return [text for i in range(0, len(embeddings), batch_size) for text in space.decode(embeddings[i:i + batch_size])]


def evaluate_all(targets: Targets, data: ConceptData, space, mean: torch.Tensor, bank: torch.Tensor,
                 cfg: LCMConfig) -> dict:
    """l2, round-trip l2, contrastive accuracy and PAR for every predictor, over the held-out targets that are
    sentences (the "End of text." targets are left out: every scene has the same one)."""
    is_sentence = targets.rows != data.eot_id
    truth = data.embeddings[targets.rows[is_sentence]]  # (N, dim)
    scene, position = targets.scene[is_sentence], targets.position[is_sentence]
    g = torch.Generator().manual_seed(cfg.seed + 3)
    n = len(truth)
    subset = torch.randperm(n, generator=g)[:cfg.n_roundtrip or n]  # the same targets for every model
    results, geometry = {}, {}
    geo_subset = torch.randperm(n, generator=g)[:cfg.n_geometry]
    for name, pred_all in targets.preds.items():
        pred = pred_all[is_sentence]
        results[f"l2_{name}"] = (pred - truth).norm(dim=-1).mean().item()
        results[f"contrastive_accuracy_{name}"] = pooled_contrastive_accuracy(pred, truth, scene, position,
                                                                              cfg.contrastive_pool)
        if name.startswith("diffusion_lcm_g"):
            continue  # the guidance sweep: l2 and CA only
        results[f"par_{name}"] = paraphrase_ratio(pred, targets, is_sentence, data)
        # round trip: decode the prediction to text, encode the text again, compare with the truth
        texts = decode_in_batches(space, pred[subset])
        again = encode_sentences(space, texts, desc=f"re-encoding {name}")
        results[f"l2r_{name}"] = (again - truth[subset]).norm(dim=-1).mean().item()
        geometry[name] = pred[geo_subset]
    # the concept space's own round trip: the floor any LCM's l2-r sits on
    texts = decode_in_batches(space, truth[subset])
    results["l2r_ground_truth"] = (encode_sentences(space, texts, desc="re-encoding the truth") -
                                   truth[subset]).norm(dim=-1).mean().item()
    results["roundtrip_exact_match_ground_truth"] = sum(
        t == data.sentences[r] for t, r in zip(texts, targets.rows[is_sentence][subset].tolist())) / len(subset)
    # Regression to the mean (the paper's motivation for diffusion, section 2.3): an MSE-trained model predicts
    # the average of the plausible next sentences, which is no sentence at all, nearer the global mean than any
    # real sentence. How far is each prediction from the mean, and from the nearest real sentence?
    geometry["ground_truth"] = truth[geo_subset]
    for name, pred in geometry.items():
        to_mean = (pred - mean).norm(dim=-1)
        to_real = nearest_distance(pred, bank)
        results[f"dist_to_mean_{name}"] = to_mean.mean().item()
        results[f"dist_to_nearest_sentence_{name}"] = to_real.mean().item()
        results[f"closer_to_mean_share_{name}"] = (to_mean < to_real).float().mean().item()
        results[f"norm_{name}"] = pred.norm(dim=-1).mean().item()  # mini-SONAR's sentences all have sqrt(dim)
    results["n_targets"] = n
    results["n_roundtrip"] = len(subset)
    return results


# --- 5. Generation: plan in concept space, then decode ------------------------------------------------------------


def stop_reason(concept: torch.Tensor, previous: torch.Tensor | None, eot: torch.Tensor, eot_threshold: float,
                prev_threshold: float) -> str | None:
    """The paper's two stopping rules (section 2.3.1), on unscaled concepts (dim,): stop when the new concept is
    the end of the text, cos(concept, "End of text.") >= s_eot, or when it repeats the previous concept,
    cos(concept, previous) >= s_prev. Both thresholds are 0.9 in the paper. -> the reason, or None: go on."""
    if F.cosine_similarity(concept, eot, dim=-1).item() >= eot_threshold:
        return "end of text"
    if previous is not None and F.cosine_similarity(concept, previous, dim=-1).item() >= prev_threshold:
        return "repetition"
    return None


@torch.no_grad()
def generate(next_concept, prompt: torch.Tensor, scaler: RobustScaler, eot: torch.Tensor, cfg: LCMConfig):
    """Continue prompt (k, dim), scaled, one concept at a time: next_concept(context (n, dim)) -> (dim,) scaled.
    The concept that triggers a stopping rule is not kept. -> (the new concepts, unscaled (m, dim), the reason)."""
    context, new = prompt, []
    for _ in range(cfg.max_new_sentences):
        concept = next_concept(context[-cfg.block_size:])
        raw = scaler.denormalize(concept)
        reason = stop_reason(raw, scaler.denormalize(context[-1]), eot, cfg.eot_threshold, cfg.prev_threshold)
        if reason:
            return torch.stack(new) if new else raw[None][:0], reason
        new.append(raw)
        context = torch.cat([context, concept[None]])
    return torch.stack(new), "max length"


def generate_examples(data: ConceptData, scaled: torch.Tensor, scaler: RobustScaler, base: BaseLCM,
                      diffusion_model: OneTowerLCM, diffusion: Diffusion, space, cfg: LCMConfig) -> list[dict]:
    """For a few held-out scenes: the first prompt_sentences sentences as the prompt, then each LCM's plan,
    decoded to text, beside the true continuation."""
    eot = data.embeddings[data.eot_id].to(scaled.device)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    dim = scaled.size(1)
    predictors = {
        "base_lcm": lambda ctx: base(ctx[None])[0, -1],
        # the diffusion LCM samples x_n at position n from x_<n: a placeholder clean row at n is never attended
        "diffusion_lcm": lambda ctx: diffusion_sample(
            diffusion_model, torch.cat([ctx[-(cfg.block_size - 1):], ctx.new_zeros(1, dim)])[None], diffusion,
            g)[0, -1],
    }
    long_enough = [i for i, seq in enumerate(data.heldout) if len(seq) - 1 >= cfg.prompt_sentences + 2]
    examples = []
    for s in long_enough[:cfg.n_generations]:
        scene, ids = data.heldout_scenes[s], data.heldout[s]
        prompt_ids = ids[:cfg.prompt_sentences]
        truth_ids = ids[cfg.prompt_sentences:cfg.prompt_sentences + cfg.max_new_sentences]
        example = dict(scene_index=s, scene=f"{scene.play}, {scene.act}, {scene.scene}",
                       prompt=[data.sentences[i] for i in prompt_ids.tolist()],
                       truth=[data.sentences[i] for i in truth_ids.tolist() if i != data.eot_id])
        for name, predictor in predictors.items():
            concepts, reason = generate(predictor, scaled[prompt_ids.to(scaled.device)], scaler, eot, cfg)
            example[name] = decode_in_batches(space, concepts) if len(concepts) else []
            example[f"{name}_stop"] = reason
            example[f"{name}_concepts"] = concepts.cpu()  # for the trajectory plot (dropped from results.json)
        examples.append(example)
    return examples


# --- 6. Plots -----------------------------------------------------------------------------------------------------


def plot_losses(runs: dict, mean_mse: float, path: Path) -> None:
    """Each model's training loss (per step, smoothed) and held-out loss; beside the Base-LCM's, the held-out MSE
    of always predicting the mean concept."""
    fig = Figure(figsize=(10, 3.8), dpi=120)
    axes = fig.subplots(1, len(runs))
    for ax, (name, run) in zip(axes, runs.items()):
        losses = torch.tensor(run["losses"])
        window = max(1, len(losses) // 50)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        ax.plot(range(len(losses)), losses.tolist(), color="C0", alpha=0.2, linewidth=0.6)
        ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), color="C0", label="train (smoothed)")
        ax.plot([e["iter"] for e in run["evals"]], [e["val_loss"] for e in run["evals"]], "o-", color="C1",
                label=f"held-out (last {run['evals'][-1]['val_loss']:.3f})")
        if name == "base_lcm":
            ax.axhline(mean_mse, color="k", linestyle=":", label=f"predicting the mean ({mean_mse:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE per dimension (scaled concepts)")
        ax.set_title({"base_lcm": "Base-LCM: MSE to the next concept",
                      "diffusion_lcm": "One-Tower diffusion LCM: x0 reconstruction"}[name], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def pca_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (dim,) and the top two principal directions (2, dim) of x (N, dim)."""
    center = x.mean(0)
    _, _, vh = torch.linalg.svd(x - center, full_matrices=False)
    return center, vh[:2]


def plot_trajectories(data: ConceptData, train_rows: torch.Tensor, mean: torch.Tensor, example: dict,
                      targets: Targets, cfg: LCMConfig, path: Path) -> None:
    """Concept space in 2-D (PCA fitted on the training concepts). Left: a held-out scene's true path and each
    LCM's free continuation of its prompt. Right: the teacher-forced next-concept predictions for the same scene,
    each joined to the true concept it should have been: the Base-LCM's cluster round the mean."""
    g = torch.Generator().manual_seed(0)
    sample = data.embeddings[train_rows[torch.randperm(len(train_rows), generator=g)[:20000]]]
    center, axes2 = pca_basis(sample)

    def project(x):
        return ((x - center) @ axes2.T).numpy()

    fig = Figure(figsize=(12, 5.6), dpi=120)
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        bg = project(sample[:3000])
        ax.scatter(bg[:, 0], bg[:, 1], s=2, color="0.8", label="training sentences", zorder=1)
        m = project(mean[None])
        ax.scatter(m[:, 0], m[:, 1], marker="X", s=120, color="k", label="mean concept", zorder=5)
    s = example["scene_index"]
    ids = data.heldout[s]
    k = cfg.prompt_sentences
    true_path = project(data.embeddings[ids[:k + cfg.max_new_sentences]])
    left.plot(true_path[:k, 0], true_path[:k, 1], "o-", color="C0", label="prompt", zorder=3)
    left.plot(true_path[k - 1:, 0], true_path[k - 1:, 1], "o--", color="C0", alpha=0.5, label="true continuation",
              zorder=3)
    for i, (x, y) in enumerate(true_path):
        left.annotate(str(i), (x, y), fontsize=7, color="C0")
    for name, color in (("base_lcm", "C1"), ("diffusion_lcm", "C2")):
        concepts = example[f"{name}_concepts"]
        if len(concepts):
            path_xy = project(torch.cat([data.embeddings[ids[k - 1]][None], concepts]))
            left.plot(path_xy[:, 0], path_xy[:, 1], "s-", color=color, zorder=4,
                      label=f"{name} ({len(concepts)} new, stop: {example[f'{name}_stop']})")
    left.set_title(f"free generation: {example['scene']}", fontsize=9)
    here = (targets.scene == s) & (targets.rows != data.eot_id)
    here = here & (targets.position <= targets.position[here].min() + 24)  # the scene's first 25 targets
    truth = project(data.embeddings[targets.rows[here]])
    right.scatter(truth[:, 0], truth[:, 1], color="C0", s=14, label="true next sentence", zorder=3)
    for name, color in (("base_lcm", "C1"), ("diffusion_lcm", "C2")):
        pred = project(targets.preds[name][here])
        right.scatter(pred[:, 0], pred[:, 1], color=color, s=14, label=f"{name} prediction", zorder=4)
        for (x0, y0), (x1, y1) in zip(truth, pred):
            right.plot([x0, x1], [y0, y1], color=color, linewidth=0.5, alpha=0.5, zorder=2)
    right.set_title("teacher-forced next-concept predictions, same scene", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


# --- The run ------------------------------------------------------------------------------------------------------


def run(cfg: LCMConfig, argv=None, concept_space=None, scenes=None) -> dict:
    """The whole lesson. concept_space and scenes may be given (the tests pass small stand-ins); by default the
    concept space is loaded (mini-SONAR is trained first if missing) and the scenes come from the corpus."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    times = {}

    t0 = time.perf_counter()
    space = concept_space or load_concept_space(backend=cfg.concept_backend, ckpt_path=cfg.concept_ckpt,
                                                device=device, train_if_missing=True)
    times["concept_space_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scenes = scenes if scenes is not None else corpus_scenes(cfg.max_chars)
    data = build_data(cfg, space, scenes, out_dir)
    times["encode_seconds"] = time.perf_counter() - t0
    dim = data.embeddings.size(1)
    train_rows = torch.cat([seq[:-1] for seq in data.train])  # every training sentence occurrence (no EOT)
    n_held = sum(len(seq) - 1 for seq in data.heldout)
    print(f"{len(data.train)} training scenes ({len(train_rows):,} sentences), {len(data.heldout)} held-out scenes "
          f"({n_held:,} sentences), concepts of dimension {dim}")

    # the robust scaler is fitted on the training sentences' concepts (one row per distinct sentence)
    scaler = RobustScaler(dim).fit(data.embeddings[train_rows.unique()]).to(device)
    scaled = scaler.normalize(data.embeddings.to(device))  # (U, dim): what both LCMs read and predict
    mean = data.embeddings[train_rows].mean(0)  # the mean-prediction baseline (unscaled)
    unique_train = train_rows.unique()
    bank = data.embeddings[unique_train[torch.randperm(len(unique_train),
                                                       generator=torch.Generator().manual_seed(0))[:cfg.nn_bank]]]

    base = BaseLCM(dim, cfg).to(device)
    diffusion_model = OneTowerLCM(dim, cfg).to(device)
    diffusion = Diffusion(cosine_alpha_bar(cfg.diffusion_steps), cfg.sample_steps, cfg.guidance_scale,
                          cfg.guidance_rescale, cfg.init_noise_scale, cfg.epsilon_scaling)
    with MetricsLogger(out_dir) as logger:
        runs = {"base_lcm": train("base_lcm", base, base_lcm_loss, cfg.base_iters, data, scaled, cfg, logger,
                                  cfg.seed),
                "diffusion_lcm": train("diffusion_lcm", diffusion_model,
                                       lambda m, x, v, g: diffusion_loss(m, x, v, diffusion, cfg.cfg_drop, g),
                                       cfg.diffusion_iters, data, scaled, cfg, logger, cfg.seed + 10)}
    for name, r in runs.items():
        times[f"train_seconds_{name}"] = r["seconds"]

    t0 = time.perf_counter()
    sweep = [s for s in parse_scales(cfg.guidance_sweep) if s != cfg.guidance_scale]
    targets = teacher_forced_predictions(data, scaled, scaler, base, diffusion_model, diffusion, mean, cfg, sweep)
    results = evaluate_all(targets, data, space, mean, bank, cfg)
    times["eval_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    examples = generate_examples(data, scaled, scaler, base, diffusion_model, diffusion, space, cfg)
    times["generation_seconds"] = time.perf_counter() - t0

    heldout_rows = torch.cat([seq[:-1] for seq in data.heldout]).to(device)
    mean_mse = F.mse_loss(scaled[heldout_rows], scaler.normalize(mean.to(device)).expand(len(heldout_rows), -1)).item()
    results["heldout_mse_mean_baseline"] = mean_mse  # the Base-LCM's loss, for the mean predictor
    plot_losses(runs, mean_mse, out_dir / "loss.png")
    if examples:
        plot_trajectories(data, train_rows, mean, examples[0], targets, cfg, out_dir / "trajectories.png")
    for ex in examples:
        for name in ("base_lcm", "diffusion_lcm"):
            ex.pop(f"{name}_concepts")
    (out_dir / "generations.json").write_text(json.dumps(examples, indent=1, ensure_ascii=False))
    def on_cpu(module):  # loadable anywhere, with weights_only=True
        return {k: v.cpu() for k, v in module.state_dict().items()}

    atomic_save({"kind": "large_concept_model", "config": asdict(cfg), "concept_dim": dim, "scaler": on_cpu(scaler),
                 "base_lcm": on_cpu(base), "diffusion_lcm": on_cpu(diffusion_model),
                 "eot_concept": data.embeddings[data.eot_id]}, out_dir / "ckpt.pt")

    results.update({f"final_val_loss_{name}": r["evals"][-1]["val_loss"] for name, r in runs.items()})
    results.update({f"first_train_loss_{name}": r["losses"][0] for name, r in runs.items()})
    results.update({f"final_train_loss_{name}": r["evals"][-1]["train_loss"] for name, r in runs.items()})
    results.update({f"params_{name}": sum(p.numel() for p in m.parameters())
                    for name, m in (("base_lcm", base), ("diffusion_lcm", diffusion_model))})
    results.update(concept_dim=dim, n_train_scenes=len(data.train), n_heldout_scenes=len(data.heldout),
                   n_train_sentences=len(train_rows), n_heldout_sentences=n_held,
                   guidance_sweep={f"{s:g}": {"l2": results.pop(f"l2_diffusion_lcm_g{s:g}"),
                                               "contrastive_accuracy": results.pop(
                                                   f"contrastive_accuracy_diffusion_lcm_g{s:g}")} for s in sweep},
                   generation_stops={name: [ex[f"{name}_stop"] for ex in examples]
                                     for name in ("base_lcm", "diffusion_lcm")})
    results.update({k: round(v, 2) for k, v in times.items()})
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = "python part10_semantic/lcm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results["config"] = asdict(cfg)
    results["generations"] = examples
    results = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print_summary(results, examples, sweep, cfg)
    print(f"{results['seconds']:.0f} s; wrote {out_dir / 'results.json'}, generations.json, loss.png, "
          f"trajectories.png, ckpt.pt")
    return results


def print_summary(results: dict, examples: list[dict], sweep: list[float], cfg: LCMConfig) -> None:
    print(f"\nheld-out scenes, teacher-forced next concept ({results['n_targets']:,} targets; l2-r on "
          f"{results['n_roundtrip']})")
    print(f"{'predictor':>15} {'l2':>7} {'l2-r':>7} {'CA':>7} {'PAR':>6} {'norm':>6} {'to mean':>8} "
          f"{'to nearest':>11} {'nearer the mean':>16}")
    for name in (*MODELS, "ground_truth"):
        def get(key, fmt):
            value = results.get(f"{key}_{name}")
            width = int(fmt.split(".")[0])
            return format(value, fmt) if value is not None else "-".rjust(width)
        print(f"{name:>15} {get('l2', '7.3f')} {get('l2r', '7.3f')} {get('contrastive_accuracy', '7.1%')} "
              f"{get('par', '6.2f')} {get('norm', '6.2f')} {get('dist_to_mean', '8.3f')} "
              f"{get('dist_to_nearest_sentence', '11.3f')} "
              f"{get('closer_to_mean_share', '16.1%')}")
    for s in sweep:
        row = results["guidance_sweep"][f"{s:g}"]
        print(f"diffusion LCM at guidance {s:g}: l2 {row['l2']:.3f}, contrastive accuracy "
              f"{row['contrastive_accuracy']:.1%} (headline: g = {cfg.guidance_scale:g})")
    for ex in examples:
        print(f"\n{ex['scene']}\n  prompt: " + " / ".join(ex["prompt"]))
        print("  truth:         " + " / ".join(ex["truth"]))
        for name in ("base_lcm", "diffusion_lcm"):
            print(f"  {name:14s} " + " / ".join(ex[name]) + f"  [stop: {ex[f'{name}_stop']}]")


def main(argv=None, concept_space=None, scenes=None) -> dict:
    cfg = parse_config(LCMConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    with lock_run_dir(cfg.out_dir):  # one run per out_dir at a time
        return run(cfg, argv, concept_space, scenes)


if __name__ == "__main__":
    run_cli(main)
