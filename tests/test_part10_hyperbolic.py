"""Part 10, hyperbolic lesson: the Poincaré distance against geoopt and near the boundary, the reconstruction
metrics against a brute-force count, the hierarchies, the loss, hyperbolic attention (Einstein midpoint against
geoopt's gyromidpoint, causality) and a tiny end-to-end run."""
import json
import math

import geoopt
import pytest
import torch

from part10_semantic import hyperbolic as hb
from shared.corpus import Speech

BALL = geoopt.PoincareBall()


def random_ball_points(n, dim, generator, max_norm=0.999):
    """Points with norms spread over [0, max_norm), directions uniform."""
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    radius = torch.rand(n, 1, generator=generator, dtype=torch.float64) * max_norm
    return x / x.norm(dim=-1, keepdim=True) * radius


# --- The distance -------------------------------------------------------------------------------------------------


def test_distance_matches_geoopt_and_the_closed_form_from_the_origin():
    g = torch.Generator().manual_seed(0)
    u, v = random_ball_points(500, 5, g), random_ball_points(500, 5, g)
    assert torch.allclose(hb.poincare_distance(u, v), BALL.dist(u, v), rtol=1e-9, atol=1e-9)
    # from the origin, d(0, x) = 2 artanh |x|
    zero = torch.zeros_like(u)
    assert torch.allclose(hb.poincare_distance(zero, u), 2 * torch.atanh(u.norm(dim=-1)), atol=1e-9)
    # the pairwise form (used by attention) is the same function
    pair = hb.pairwise_poincare_distance(u[:20], v[:30])
    assert torch.allclose(pair, BALL.dist(u[:20, None, :], v[None, :30, :]), rtol=1e-7, atol=1e-7)


def test_distance_is_a_metric_on_random_samples():
    g = torch.Generator().manual_seed(1)
    a, b, c = (random_ball_points(2000, 3, g, max_norm=0.99) for _ in range(3))
    d_ab, d_ba = hb.poincare_distance(a, b), hb.poincare_distance(b, a)
    assert torch.equal(d_ab, d_ba)
    assert (d_ab >= 0).all()
    assert (hb.poincare_distance(a, c) <= d_ab + hb.poincare_distance(b, c) + 1e-9).all()
    assert hb.poincare_distance(a, a).abs().max() < 1e-6
    # a wrong formula (without the factor 2) breaks the agreement with geoopt: the check can fail
    wrong = torch.acosh(1 + (a - b).pow(2).sum(-1) / ((1 - a.pow(2).sum(-1)) * (1 - b.pow(2).sum(-1))))
    assert not torch.allclose(wrong, BALL.dist(a, b), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distance_and_gradients_stay_finite_at_and_beyond_the_boundary(dtype):
    direction = torch.tensor([0.6, 0.8], dtype=dtype)
    points = torch.stack([direction * r for r in (1 - 1e-9, 1.0, 1.5)] + [-direction, torch.zeros(2, dtype=dtype)])
    u = points.clone().requires_grad_(True)
    v = points.flip(0).clone().requires_grad_(True)
    d = hb.poincare_distance(u, v)
    assert torch.isfinite(d).all()
    # with |x|^2 <= 1 - 1e-5, no distance can exceed twice the largest distance from the origin
    assert d.max() <= 2 * 2 * math.atanh(math.sqrt(1 - 1e-5)) * (1 + 1e-3)
    d.sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(v.grad).all()
    # without the guard the formula breaks down exactly here: 1 - |x|^2 = 0 at the boundary
    raw = torch.acosh(1 + 2 * (points[1] - points[3]).pow(2).sum() / ((1 - points[1].pow(2).sum()) *
                                                                    (1 - points[3].pow(2).sum())))
    assert not torch.isfinite(raw)
    # d(u, u) has a finite gradient too (arcosh'(1) is infinite)
    w = torch.tensor([[0.3, -0.2]], dtype=dtype, requires_grad=True)
    hb.poincare_distance(w, w.detach().clone()).sum().backward()
    assert torch.isfinite(w.grad).all()


def test_points_inside_the_guard_are_left_alone_and_points_outside_are_rescaled():
    x = torch.tensor([[0.3, 0.4], [3.0, 4.0]], dtype=torch.float64)
    y = hb.project_to_ball(x, eps=1e-5)
    assert torch.equal(y[0], x[0])
    assert y[1].norm().item() == pytest.approx(math.sqrt(1 - 1e-5), abs=1e-12)
    assert torch.allclose(y[1] / y[1].norm(), x[1] / x[1].norm())


def test_maps_between_the_models_agree_with_geoopt():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(100, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(hb.expmap0(v), BALL.expmap0(v), atol=1e-9)
    x = random_ball_points(100, 4, g)
    assert torch.allclose(hb.logmap0(x), BALL.logmap0(x), atol=1e-9)
    assert torch.allclose(hb.klein_to_poincare(hb.poincare_to_klein(x)), x, atol=1e-12)
    k = hb.poincare_to_klein(x)
    gamma = 1 / torch.sqrt(1 - k.pow(2).sum(-1, keepdim=True))
    assert torch.allclose(hb.lorentz_factor_from_poincare(x), gamma, rtol=1e-9)


# --- The Einstein midpoint ----------------------------------------------------------------------------------------


def test_einstein_midpoint_equals_geoopts_gyromidpoint():
    """Ungar: the Einstein midpoint in the Klein model is the Möbius gyromidpoint in the Poincaré ball, which
    geoopt computes by another formula (with the conformal factors lambda_x)."""
    g = torch.Generator().manual_seed(3)
    x = random_ball_points(6, 3, g, max_norm=0.95)
    w = torch.rand(2, 6, generator=g, dtype=torch.float64)  # two rows of weights
    ours = hb.klein_to_poincare(hb.einstein_midpoint(hb.poincare_to_klein(x), w))
    for i in range(2):
        assert torch.allclose(ours[i], BALL.weighted_midpoint(x, w[i], reducedim=[0]), atol=1e-9)
    # the Euclidean mean is a different point: the check can fail
    euclidean_mean = (w[0][:, None] * x).sum(0) / w[0].sum()
    assert not torch.allclose(ours[0], euclidean_mean, atol=1e-3)
    # with the Lorentz factors passed in (as the attention does), the same
    k = hb.poincare_to_klein(x)
    assert torch.allclose(hb.einstein_midpoint(k, w, hb.lorentz_factor_from_poincare(x)),
                          hb.einstein_midpoint(k, w), atol=1e-9)


def test_einstein_midpoint_of_identical_points_is_that_point_and_of_opposite_points_is_the_origin():
    p = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    k = hb.poincare_to_klein(p).expand(4, 3)
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(hb.klein_to_poincare(hb.einstein_midpoint(k, w)), p.expand(2, 3), atol=1e-12)
    pair = hb.poincare_to_klein(torch.stack([p, -p]))
    assert torch.allclose(hb.einstein_midpoint(pair, torch.tensor([[0.5, 0.5]], dtype=torch.float64)),
                          torch.zeros(1, 3, dtype=torch.float64), atol=1e-12)


# --- Reconstruction metrics ---------------------------------------------------------------------------------------


def small_hierarchy():
    """root -> a, b; a -> a0, a1; b -> b0, b1 (7 nodes)."""
    return hb.Hierarchy(["root", "a", "b", "a0", "a1", "b0", "b1"], [-1, 0, 0, 1, 1, 2, 2], ["root", "x", "y"])


def lookup_distance(matrix):
    """A 'distance' read from a matrix; the embedding of node i is the one-hot vector e_i."""

    def distance(a, b):
        return matrix[a.argmax(-1), b.argmax(-1)]

    return distance


def brute_force(matrix, h):
    """Rank and average precision by explicit loops, straight from the definitions."""
    ranks, aps = [], []
    n = len(h)
    for u in range(n):
        anc = set(h.ancestors(u))
        if not anc:
            continue
        others = [w for w in range(n) if w != u]
        for v in anc:
            ranks.append(1 + sum(1 for w in others if w not in anc and matrix[u, w] < matrix[u, v]))
        ordered = sorted(others, key=lambda w: matrix[u, w].item())
        hits, precisions = 0, []
        for position, w in enumerate(ordered, start=1):
            if w in anc:
                hits += 1
                precisions.append(hits / position)
        aps.append(sum(precisions) / len(precisions))
    return sum(ranks) / len(ranks), sum(aps) / len(aps)


def test_a_perfect_embedding_scores_map_1_and_mean_rank_1():
    h = small_hierarchy()
    n = len(h)
    matrix = torch.full((n, n), 10.0, dtype=torch.float64)
    for u in range(n):  # ancestors nearest, everything else far
        for v in h.ancestors(u):
            matrix[u, v] = 1.0 + h.depth[v]
    scores = hb.reconstruction(torch.eye(n, dtype=torch.float64), h, lookup_distance(matrix))
    assert scores == {"map": 1.0, "mean_rank": 1.0}


def test_reconstruction_matches_a_brute_force_count_and_a_hand_computed_case():
    h = small_hierarchy()
    n = len(h)
    rng = torch.Generator().manual_seed(4)
    for _ in range(5):
        matrix = torch.rand(n, n, generator=rng, dtype=torch.float64)
        scores = hb.reconstruction(torch.eye(n, dtype=torch.float64), h, lookup_distance(matrix), chunk=3)
        mean_rank, mean_ap = brute_force(matrix, h)
        assert scores["mean_rank"] == pytest.approx(mean_rank, abs=1e-12)
        assert scores["map"] == pytest.approx(mean_ap, abs=1e-12)
    # by hand: a0's ancestors a, root; order from a0: b1, a, b0, root, ... -> ranks 2 and 3, AP (1/2 + 2/4)/2
    matrix = torch.full((n, n), 10.0, dtype=torch.float64)
    for u in range(n):
        for v in h.ancestors(u):
            matrix[u, v] = 1.0
    matrix[3, 6], matrix[3, 1], matrix[3, 5], matrix[3, 0] = 1.0, 2.0, 3.0, 4.0
    scores = hb.reconstruction(torch.eye(n, dtype=torch.float64), h, lookup_distance(matrix))
    # 10 (node, ancestor) pairs: 8 at rank 1, a0's two at ranks 2 and 3; 6 nodes, five with AP 1
    assert scores["mean_rank"] == pytest.approx((8 + 2 + 3) / 10)
    assert scores["map"] == pytest.approx((5 + (1 / 2 + 2 / 4) / 2) / 6)


def test_a_shuffled_embedding_scores_worse():
    h = hb.synthetic_tree(2, 3)
    n = len(h)
    matrix = torch.full((n, n), 10.0, dtype=torch.float64)
    for u in range(n):
        for v in h.ancestors(u):
            matrix[u, v] = 1.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    shuffled = matrix[perm][:, perm]
    scores = hb.reconstruction(torch.eye(n, dtype=torch.float64), h, lookup_distance(shuffled))
    assert scores["map"] < 0.7 and scores["mean_rank"] > 1.5


def test_spearman_against_a_hand_computed_value():
    assert hb.spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])) == \
        pytest.approx(1.0)
    assert hb.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(-0.5)
    # ties get their average rank: x ranks (1, 2.5, 2.5, 4) vs y ranks (1, 2, 3, 4) -> 0.9486833
    assert hb.spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == \
        pytest.approx(3 / math.sqrt(10), abs=1e-9)


# --- The hierarchies and the loss ---------------------------------------------------------------------------------


def test_synthetic_tree_sizes_and_closure():
    h = hb.synthetic_tree(3, 4)
    assert len(h) == (3 ** 5 - 1) // 2
    assert len(h.closure_edges()) == sum(d * 3 ** d for d in range(1, 5))
    assert h.depth.count(4) == 81
    assert all(h.depth[c] == h.depth[a] + len(h.ancestors(c)) - len(h.ancestors(a)) for c, a in h.closure_edges())
    table = h.ancestors_padded()
    assert table.shape == (len(h), 5)
    assert set(table[len(h) - 1].tolist()) - {-1} == {len(h) - 1, *h.ancestors(len(h) - 1)}


def test_corpus_hierarchy_from_speeches():
    speeches = [Speech("P1", "ACT I", "SCENE I", "A", ("x",)), Speech("P1", "ACT I", "SCENE I", "B", ("y",)),
                Speech("P1", "ACT I", "SCENE I", "A", ("z",)), Speech("P1", "ACT I", "SCENE II", "A", ("w",)),
                Speech("P1", "PROLOGUE", "", "C", ("v",)), Speech("P2", "ACT I", "SCENE I", "A", ("u",))]
    h = hb.corpus_hierarchy(n_plays=0, leaf="speaker", speeches=speeches)
    # root, P1, P1/ACT I, its 2 scenes, A and B in scene I, A in scene II, P1/PROLOGUE, its scene, C; P2: 4 nodes
    assert len(h) == 1 + 1 + 1 + 2 + 3 + 1 + 1 + 1 + 4
    assert h.level_names == ["Shakespeare", "play", "act", "scene", "speaker"]
    assert sorted(set(h.depth)) == [0, 1, 2, 3, 4]
    leaf = h.names.index("P1 / ACT I / SCENE I / B")
    assert [h.names[a] for a in h.ancestors(leaf)] == ["P1 / ACT I / SCENE I", "P1 / ACT I", "P1", "Shakespeare"]
    assert "P1 / PROLOGUE / - / C" in h.names
    one_play = hb.corpus_hierarchy(n_plays=1, leaf="speaker", speeches=speeches)
    assert len(one_play) == len(h) - 4 and "P2" not in one_play.names
    by_speech = hb.corpus_hierarchy(n_plays=0, leaf="speech", speeches=speeches)
    assert by_speech.depth.count(4) == len(speeches)


def test_the_real_corpus_gives_a_four_level_hierarchy():
    h = hb.corpus_hierarchy(n_plays=1)
    assert h.names[1] == "A Midsummer Night's Dream"
    assert max(h.depth) == 4 and h.depth.count(1) == 1
    assert 50 < h.depth.count(4) < 200  # speakers per scene of one play


def test_embedding_loss_is_the_softmax_of_negative_distances_and_masks_ancestors():
    g = torch.Generator().manual_seed(6)
    h = small_hierarchy()
    emb = random_ball_points(len(h), 2, g, max_norm=0.9)
    forbidden = h.ancestors_padded()
    u, v = torch.tensor([3]), torch.tensor([1])  # a0 and its parent a
    negatives = torch.tensor([[5, 6, 0, 3]])  # b0, b1 are negatives; root (an ancestor) and a0 itself are not
    loss = hb.embedding_loss(emb, u, v, negatives, forbidden, hb.poincare_distance)
    d = lambda i, j: BALL.dist(emb[i], emb[j])  # noqa: E731
    expected = -torch.log(torch.exp(-d(3, 1)) / (torch.exp(-d(3, 1)) + torch.exp(-d(3, 5)) + torch.exp(-d(3, 6))))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # only forbidden negatives: nothing to contrast with, the loss is 0
    only_bad = hb.embedding_loss(emb, u, v, torch.tensor([[0, 3, 1]]), forbidden, hb.poincare_distance)
    assert only_bad.item() == pytest.approx(0.0, abs=1e-12)


def test_training_a_small_tree_reconstructs_it_and_beats_euclidean_in_2d():
    h = hb.synthetic_tree(2, 4)
    cfg = hb.HyperbolicConfig(epochs=25, burnin_epochs=5, batch_size=16, negatives=10, optimizer="radam",
                              learning_rate=0.3, euclidean_learning_rate=0.01)
    emb, losses = hb.train_embedding(h, "poincare", 2, cfg, seed=0)
    assert isinstance(emb, torch.Tensor) and emb.norm(dim=-1).max() < 1
    assert losses[-1] < losses[0]
    poincare = hb.reconstruction(emb, h, hb.poincare_distance)
    euclid_emb, _ = hb.train_embedding(h, "euclidean", 2, cfg, seed=0)
    euclid = hb.reconstruction(euclid_emb, h, hb.squared_euclidean_distance)
    assert poincare["map"] > 0.8  # 0.87 (0.91 with seed 1); Euclidean 0.44
    assert poincare["map"] > euclid["map"] + 0.2
    # deeper nodes lie further out
    assert hb.spearman(emb.norm(dim=-1), torch.tensor(h.depth, dtype=torch.float64)) > 0.5


# --- Hyperbolic attention -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [hb.DotProductAttention, hb.HyperbolicAttention])
def test_attention_shape_and_causality(cls):
    torch.manual_seed(0)
    attn = cls(16, 2)
    x = torch.randn(3, 7, 16)
    y = attn(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    changed = x.clone()
    changed[:, 4:] = torch.randn(3, 3, 16)  # change the future of position 3
    y2 = attn(changed)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:], atol=1e-3)
    weights = attn.attention_weights(*attn.heads(x)[:2])
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 7))
    assert (weights.triu(1) == 0).all()


def test_both_attentions_have_equal_parameters_and_agree_on_a_single_token():
    torch.manual_seed(0)
    dot, hyp = hb.DotProductAttention(16, 4), hb.HyperbolicAttention(16, 4)
    assert sum(p.numel() for p in dot.parameters()) == sum(p.numel() for p in hyp.parameters())
    hyp.qkv.load_state_dict(dot.qkv.state_dict())
    hyp.proj.load_state_dict(dot.proj.state_dict())
    x = torch.randn(2, 5, 16) * 0.3
    # one token attends only to itself: logmap0(expmap0(v)) = v, so both give proj(v)
    assert torch.allclose(hyp(x[:, :1]), dot(x[:, :1]), atol=1e-5)
    assert not torch.allclose(hyp(x), dot(x), atol=1e-3)


def test_hyperbolic_attention_gradients_are_finite_for_huge_inputs():
    torch.manual_seed(0)
    attn = hb.HyperbolicAttention(8, 2)
    x = (torch.randn(2, 6, 8) * 1e3).requires_grad_(True)
    attn(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_dyck_targets_match_a_stack():
    g = torch.Generator().manual_seed(7)
    tokens, targets, depths = hb.dyck_batch(50, 30, 2, 4, g)
    for seq, tgt, dep in zip(tokens.tolist(), targets.tolist(), depths.tolist()):
        stack = []
        for tok, t, d in zip(seq, tgt, dep):
            if tok < 2:
                stack.append(tok)
            else:
                assert stack and stack.pop() == tok - 2  # closes the innermost open bracket
            assert len(stack) <= 4 and d == len(stack)
            assert t == (stack[-1] + 1 if stack else 0)
    assert (depths == 4).any() and (targets == 0).any()


def test_tagger_learns_a_little():
    cfg = hb.HyperbolicConfig(attn_steps=60, attn_seq_len=12, attn_max_depth=3, attn_n_embd=16, attn_batch_size=16,
                              attn_eval_sequences=200)
    eval_set = hb.dyck_batch(200, 12, 2, 3, torch.Generator().manual_seed(8))
    result = hb.train_tagger("hyperbolic", cfg, 0, eval_set)
    assert result["losses"][-1] < result["losses"][0]
    majority = torch.bincount(eval_set[1].flatten()).max().item() / eval_set[1].numel()
    assert result["accuracy"] > majority


# --- The script ---------------------------------------------------------------------------------------------------


TINY = ["--n_plays", "1", "--tree_branching", "2", "--tree_depth", "3", "--dims", "2,3", "--epochs", "3",
        "--burnin_epochs", "1", "--negatives", "5", "--batch_size", "128", "--attn_steps", "5", "--attn_seq_len", "8",
        "--attn_n_embd", "8", "--attn_eval_sequences", "20", "--attn_seeds", "1"]


def test_tiny_run_writes_results_plots_and_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    results = hb.main(TINY + ["--out_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["map_poincare_dim2"] == results["map_poincare_dim2"]
    for key in ("map_poincare_dim2", "map_euclidean_dim2", "mean_rank_poincare_dim3", "tree_map_euclidean_dim3",
                "norm_depth_spearman_poincare_dim2", "attn_accuracy_dot", "attn_accuracy_hyperbolic"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]), key
    assert 0 < saved["map_poincare_dim2"] <= 1 and saved["mean_rank_poincare_dim2"] >= 1
    assert saved["attn_params_dot"] == saved["attn_params_hyperbolic"]
    assert saved["hierarchies"]["tree"]["nodes"] == 15
    # depth ties cap Spearman's rho below 1: sqrt(1 - sum(t^3 - t) / (n^3 - n)) for tie groups of sizes t
    n, ties = 15, sum(t ** 3 - t for t in (1, 2, 4, 8))
    assert saved["hierarchies"]["tree"]["spearman_ceiling"] == pytest.approx(math.sqrt(1 - ties / (n ** 3 - n)),
                                                                             abs=1e-4)
    for name in ("disk_corpus.png", "disk_tree.png", "map_vs_dim.png", "norm_vs_depth_corpus.png", "attention.png"):
        assert (out / name).stat().st_size > 1000
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["embeddings"]["tree/poincare/dim2"].shape == (15, 2)
    # a second run into the same folder is refused, unless --overwrite
    with pytest.raises(FileExistsError):
        hb.main(TINY + ["--out_dir", str(out)])


@pytest.mark.parametrize("flags, message", [
    (["--dims", "2,x"], "--dims must be comma-separated integers"),
    (["--dims", "0"], "--dims must list dimensions >= 1"),
    (["--burnin_epochs", "5", "--epochs", "3"], "--burnin_epochs 5 is more than --epochs 3"),
    (["--attn_n_embd", "10", "--attn_n_head", "3"], "divisible by --attn_n_head 3"),
    (["--boundary_eps", "0"], "--boundary_eps must be >= 1e-12"),
    (["--negatives", "0"], "--negatives must be >= 1"),
])
def test_bad_flags_are_refused_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hb.main(flags + ["--out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
