"""Part 10, Large Concept Model lesson: the robust scaler against torch.quantile, the contrastive accuracy against a
brute-force count, the cosine schedule and the DDIM step against their formulas (and DDIM recovering x_0 from a
perfect predictor), classifier-free guidance, the One-Tower attention mask, causality of both LCMs, the stopping
rule, and a tiny end-to-end run on a stand-in concept space (no trained mini-SONAR needed)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from part10_semantic import lcm
from part10_semantic.concepts import Scene

# --- The robust scaler --------------------------------------------------------------------------------------------


def test_quantiles_match_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100):  # odd and even counts: the median interpolates between the two middle values
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        for q in (0.0, 0.25, 0.5, 0.75, 1.0, 0.1):
            assert torch.allclose(lcm.quantiles(x, q), torch.quantile(x, q, dim=0), atol=1e-12)


def test_robust_scaler_against_a_hand_computation_and_its_round_trip():
    x = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0], [100.0, 10.0]])  # an outlier; a constant
    scaler = lcm.RobustScaler(2).fit(x)
    # column 0 by hand: median 3, quartiles 2 and 4 -> IQR 2, divided by the normal IQR 2 * 0.6744897501960817
    assert scaler.center.tolist() == pytest.approx([3.0, 10.0])
    assert scaler.scale[0].item() == pytest.approx(2.0 / 1.3489795003921634, rel=1e-6)
    assert scaler.scale[1].item() == 1.0  # a constant dimension keeps scale 1 (no division by zero)
    # against torch.quantile on random heavy-tailed data
    g = torch.Generator().manual_seed(1)
    y = torch.distributions.StudentT(2.0).sample((501, 8)) * torch.rand(8, generator=g) * 5
    scaler = lcm.RobustScaler(8).fit(y)
    q = torch.quantile(y, torch.tensor([0.25, 0.5, 0.75]), dim=0)
    assert torch.allclose(scaler.center, q[1], atol=1e-6)
    assert torch.allclose(scaler.scale, (q[2] - q[0]) / 1.3489795003921634, rtol=1e-5)
    z = scaler.normalize(y)
    assert torch.allclose(scaler.denormalize(z), y, atol=1e-5)
    # scaled: median 0 and IQR 1.349 per dimension, as for a standard normal
    qz = torch.quantile(z, torch.tensor([0.25, 0.5, 0.75]), dim=0)
    assert qz[1].abs().max() < 1e-5 and torch.allclose(qz[2] - qz[0], torch.full((8,), 1.3489795), atol=1e-4)
    # robust: moving the outlier from 100 to a million changes nothing (a mean / standard-deviation scaler would move)
    far = x.clone()
    far[4, 0] = 1e6
    moved = lcm.RobustScaler(2).fit(far)
    assert torch.equal(moved.center, lcm.RobustScaler(2).fit(x).center)
    assert torch.equal(moved.scale, lcm.RobustScaler(2).fit(x).scale)


# --- Contrastive accuracy -----------------------------------------------------------------------------------------


def brute_force_contrastive_accuracy(pred, target, scene, position):
    """The paper's definition, one pair at a time: the share of the other ground-truth embeddings (neither x_n
    nor its two neighbours in the same document) further from the prediction than x_n."""
    scores = []
    for i in range(len(pred)):
        own = math.dist(pred[i].tolist(), target[i].tolist())
        further = total = 0
        for j in range(len(pred)):
            if j == i or (scene[j] == scene[i] and abs(position[j] - position[i]) == 1):
                continue
            total += 1
            further += math.dist(pred[i].tolist(), target[j].tolist()) > own
        scores.append(further / total)
    return sum(scores) / len(scores)


def test_contrastive_accuracy_on_a_hand_example():
    # targets on a line at 0, 1, 2, 10 (one scene, positions 0..3) and a fifth in another scene at 5
    target = torch.tensor([[0.0], [1.0], [2.0], [10.0], [5.0]])
    scene = torch.tensor([0, 0, 0, 0, 1])
    position = torch.tensor([0, 1, 2, 3, 0])
    pred = torch.tensor([[0.4], [3.0], [2.0], [6.0], [5.0]])
    # by hand: i=0 (pred 0.4, own 0.4): pool {2, 10, 5} (1 is a neighbour) -> 3/3
    #          i=1 (pred 3, own 2): pool {10, 5} (0 and 2 are neighbours) -> 10 is 7 away, 5 is 2 away (not >) -> 1/2
    #          i=2 (pred 2, own 0): pool {0, 5} -> 2/2;  i=3 (pred 6, own 4): pool {0, 1, 5} -> 0, 1 further -> 2/3
    #          i=4 (pred 5, own 0): pool {0, 1, 2, 10} -> 4/4
    expected = (1 + 0.5 + 1 + 2 / 3 + 1) / 5
    got = lcm.contrastive_accuracy(pred, target, lcm.neighbour_exclusion(scene, position)).mean().item()
    assert got == pytest.approx(expected)
    assert brute_force_contrastive_accuracy(pred, target, scene, position) == pytest.approx(expected)
    # without the neighbour exclusion (a plausible slip) the number changes
    wrong = lcm.contrastive_accuracy(pred, target, torch.eye(5, dtype=torch.bool)).mean().item()
    assert wrong != pytest.approx(expected)


def test_contrastive_accuracy_matches_brute_force_on_random_data():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    scene = torch.randint(0, 4, (40,), generator=g)
    position = torch.tensor([(scene[:i] == scene[i]).sum().item() for i in range(40)])  # index within its scene
    got = lcm.pooled_contrastive_accuracy(pred, target, scene, position, pool=40)
    assert got == pytest.approx(brute_force_contrastive_accuracy(pred, target, scene, position), abs=1e-12)
    # pools: each pool is its own batch
    pooled = lcm.pooled_contrastive_accuracy(pred, target, scene, position, pool=20)
    halves = [brute_force_contrastive_accuracy(pred[i:i + 20], target[i:i + 20], scene[i:i + 20].tolist(),
                                               position[i:i + 20].tolist()) for i in (0, 20)]
    assert pooled == pytest.approx(sum(halves) / 2, abs=1e-12)
    # a perfect predictor scores 1; predicting a far-away point for everything scores about the chance share 0
    assert lcm.pooled_contrastive_accuracy(target, target, scene, position, pool=40) == 1.0


# --- Diffusion: schedule, DDIM, guidance --------------------------------------------------------------------------


def test_cosine_schedule_against_the_formula():
    T, s = 100, 0.008
    ab = lcm.cosine_alpha_bar(T)
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 10, 50, 99):
        assert ab[t].item() == pytest.approx(math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / f0, rel=1e-12)
    assert ab[0] == 1.0 and ab[T] < 1e-30  # clean at 0, pure noise at T: zero terminal SNR
    assert (ab[1:] < ab[:-1]).all()  # strictly more noise at every step


def test_trailing_timesteps():
    assert lcm.sampling_timesteps(100, 4) == [100, 75, 50, 25]
    assert lcm.sampling_timesteps(1000, 10) == list(range(1000, 0, -100))
    steps = lcm.sampling_timesteps(100, 40)
    assert len(steps) == 40 and steps[0] == 100 and steps == sorted(steps, reverse=True)


def test_ddim_step_against_the_hand_formula():
    x_t, x0 = torch.tensor([1.5, -0.5]), torch.tensor([0.2, 0.4])
    a_t, a_prev = 0.3, 0.8
    eps = [(1.5 - math.sqrt(0.3) * 0.2) / math.sqrt(0.7), (-0.5 - math.sqrt(0.3) * 0.4) / math.sqrt(0.7)]
    expected = [math.sqrt(0.8) * x + math.sqrt(0.2) * e for x, e in zip((0.2, 0.4), eps)]
    assert lcm.ddim_step(x_t, x0, a_t, a_prev).tolist() == pytest.approx(expected, rel=1e-6)
    scaled = [math.sqrt(0.8) * x + math.sqrt(0.2) * e / 1.1 for x, e in zip((0.2, 0.4), eps)]
    assert lcm.ddim_step(x_t, x0, a_t, a_prev, epsilon_scaling=1.1).tolist() == pytest.approx(scaled, rel=1e-6)
    # the last step (alpha_bar_prev = 1) lands on the predicted x_0
    assert torch.allclose(lcm.ddim_step(x_t, x0, a_t, 1.0), x0)


def test_ddim_with_a_perfect_x0_predictor_recovers_x0_along_the_forward_trajectory():
    T = 100
    ab = lcm.cosine_alpha_bar(T)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)  # x_T: pure noise (alpha_bar_T = 0), so eps = x_T
    noise = x.clone()
    steps = lcm.sampling_timesteps(T, 7)
    for i, t in enumerate(steps):
        t_prev = steps[i + 1] if i + 1 < len(steps) else 0
        x = lcm.ddim_step(x, x0, ab[t].item(), ab[t_prev].item())
        # deterministic DDIM with the true x_0 stays on q(x_t | x_0) with the same noise
        assert torch.allclose(x, lcm.add_noise(x0, ab[t_prev], noise), atol=1e-9)
    assert torch.allclose(x, x0, atol=1e-9)


def test_classifier_free_guidance_formula():
    cond, uncond = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    assert torch.equal(lcm.classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(lcm.classifier_free_guidance(cond, uncond, 0.0), uncond)
    assert lcm.classifier_free_guidance(cond, uncond, 3.0).tolist() == [[3.0, 4.0, 7.0]]  # u + 3 (c - u)
    # rescale = 1: the guided vector is brought back to the conditional prediction's standard deviation
    full = lcm.classifier_free_guidance(cond, uncond, 3.0, rescale=1.0)
    assert full.std().item() == pytest.approx(cond.std().item())
    half = lcm.classifier_free_guidance(cond, uncond, 3.0, rescale=0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * torch.tensor([[3.0, 4.0, 7.0]]))
    # mixing x0-predictions is mixing the noise predictions they imply (weights 1 - g and g sum to 1)
    x_t, a = torch.tensor([[0.3, -1.0, 2.0]]), 0.4

    def eps(x0):
        return (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)

    assert torch.allclose(eps(lcm.classifier_free_guidance(cond, uncond, 3.0)),
                          lcm.classifier_free_guidance(eps(cond), eps(uncond), 3.0), atol=1e-6)


class FixedPredictor(torch.nn.Module):
    """A stand-in diffusion model: predicts `cond` where the context is kept and `uncond` where it is dropped."""

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, clean, noisy, t, drop_context=None):
        drop = drop_context if drop_context is not None else torch.zeros(clean.shape[:2], dtype=torch.bool)
        return torch.where(drop[..., None], self.uncond.expand_as(clean), self.cond.expand_as(clean))


def test_sampler_ends_on_the_guided_x0_prediction():
    cond, uncond = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 0.0, 0.0, 1.0])
    diffusion = lcm.Diffusion(lcm.cosine_alpha_bar(50), 5, guidance_scale=2.0, guidance_rescale=0.0,
                              init_noise_scale=0.6, epsilon_scaling=1.00045)
    out = lcm.diffusion_sample(FixedPredictor(cond, uncond), torch.zeros(2, 3, 4), diffusion,
                               torch.Generator().manual_seed(0))
    assert torch.allclose(out, (uncond + 2.0 * (cond - uncond)).expand(2, 3, 4), atol=1e-6)
    no_guidance = lcm.diffusion_sample(FixedPredictor(cond, uncond), torch.zeros(1, 2, 4), diffusion,
                                       guidance_scale=1.0)
    assert torch.allclose(no_guidance, cond.expand(1, 2, 4), atol=1e-6)


# --- The models: masks and causality ------------------------------------------------------------------------------


def tiny_config(**kw):
    return lcm.LCMConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, dropout=0.0, time_embd=8, **kw)


def test_one_tower_mask_by_hand():
    m = lcm.one_tower_mask(3)[0, 0].int().tolist()
    #        clean 0 1 2 | noisy 0 1 2
    assert m == [[1, 0, 0, 0, 0, 0],  # clean 0: itself
                 [1, 1, 0, 0, 0, 0],  # clean 1: clean 0, 1
                 [1, 1, 1, 0, 0, 0],
                 [0, 0, 0, 1, 0, 0],  # noisy 0: no context, itself
                 [1, 0, 0, 0, 1, 0],  # noisy 1: clean 0 and itself (never clean 1, the answer)
                 [1, 1, 0, 0, 0, 1]]
    dropped = lcm.one_tower_mask(3, torch.tensor([[False, False, True]]))[0, 0].int().tolist()
    assert dropped[5] == [0, 0, 0, 0, 0, 1] and dropped[4] == m[4]


def test_base_lcm_is_causal():
    torch.manual_seed(0)
    model = lcm.BaseLCM(6, tiny_config()).eval()
    x = torch.randn(2, 8, 6)
    y = x.clone()
    y[:, 5] += 3.0  # change concept 5
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # predictions made before concept 5 are unchanged
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)  # from concept 5 on they see it


def test_one_tower_sees_only_the_past_clean_context_and_its_own_noisy_input():
    torch.manual_seed(0)
    model = lcm.OneTowerLCM(6, tiny_config()).eval()
    clean, noisy = torch.randn(2, 8, 6), torch.randn(2, 8, 6)
    t = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        base = model(clean, noisy, t)
        c2 = clean.clone()
        c2[:, 4] += 3.0  # the clean concept 4 is context for positions 5.. only
        out = model(c2, noisy, t)
        assert torch.allclose(out[:, :5], base[:, :5], atol=1e-6)
        assert not torch.allclose(out[:, 5:], base[:, 5:], atol=1e-3)
        n2 = noisy.clone()
        n2[:, 4] += 3.0  # a noisy input matters only to its own position
        out = model(clean, n2, t)
        changed = (out - base).abs().amax(dim=(0, 2)) > 1e-5
        assert changed.tolist() == [i == 4 for i in range(8)]
        # with the context dropped, position 6 depends on nothing but its own noisy input
        drop = torch.zeros(2, 8, dtype=torch.bool)
        drop[:, 6] = True
        a = model(clean, noisy, t, drop)
        b = model(torch.randn(2, 8, 6), noisy, t, drop)
        assert torch.allclose(a[:, 6], b[:, 6], atol=1e-6)


# --- Generation: the stopping rule --------------------------------------------------------------------------------


def test_stop_reason():
    eot = torch.tensor([1.0, 0.0, 0.0])
    prev = torch.tensor([0.0, 1.0, 0.0])
    near_eot = torch.tensor([1.0, 0.4, 0.0])  # cos to eot 0.928
    near_prev = torch.tensor([0.0, 1.0, 0.45])  # cos to prev 0.912
    neither = torch.tensor([0.5, 0.5, 0.7])
    assert lcm.stop_reason(near_eot, prev, eot, 0.9, 0.9) == "end of text"
    assert lcm.stop_reason(near_prev, prev, eot, 0.9, 0.9) == "repetition"
    assert lcm.stop_reason(neither, prev, eot, 0.9, 0.9) is None
    assert lcm.stop_reason(near_eot, prev, eot, 0.95, 0.9) is None  # 0.928 < 0.95
    assert lcm.stop_reason(near_prev, None, eot, 0.9, 0.9) is None


def test_generate_stops_at_end_of_text_and_at_max_length():
    scaler = lcm.RobustScaler(3)  # identity: center 0, scale 1
    eot = torch.tensor([1.0, 0.0, 0.0])
    outputs = iter([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([2.0, 0.1, 0.0])])
    cfg = tiny_config(max_new_sentences=8)
    concepts, reason = lcm.generate(lambda ctx: next(outputs), torch.tensor([[0.0, -1.0, 1.0]]), scaler, eot, cfg)
    assert reason == "end of text" and concepts.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # EOT not kept
    turning = iter(torch.eye(3)[[1, 2, 1, 2, 1]])
    concepts, reason = lcm.generate(lambda ctx: next(turning), torch.tensor([[0.0, 0.0, 1.0]]), scaler, eot,
                                    tiny_config(max_new_sentences=3))
    assert reason == "max length" and len(concepts) == 3
    same = torch.tensor([0.0, 1.0, 1.0])
    concepts, reason = lcm.generate(lambda ctx: same, torch.tensor([[0.0, 1.0, 0.9]]), scaler, eot, cfg)
    assert reason == "repetition" and len(concepts) == 0


# --- A tiny end-to-end run on a stand-in concept space ------------------------------------------------------------


class StandInSpace:
    """A fixed random projection of a sentence's byte counts; decoding = the nearest sentence of a list."""

    dim = 12
    cache_key = "stand-in-v1"

    def __init__(self, sentences):
        self.proj = torch.randn(256, self.dim, generator=torch.Generator().manual_seed(0))
        self.sentences = sorted(set(sentences))
        self.encoded = 0
        self.bank = self.encode(self.sentences)

    def encode(self, sentences):
        self.encoded += len(sentences)
        counts = torch.zeros(len(sentences), 256)
        for i, s in enumerate(sentences):
            for b in s.encode():
                counts[i, b] += 1
        return F.normalize(counts, dim=1) @ self.proj

    def decode(self, embeddings):
        return [self.sentences[i] for i in torch.cdist(embeddings.float(), self.bank).argmin(1).tolist()]


def toy_scenes():
    """Scenes that walk a cycle of 10 lines from a random start: the next line is fully determined by the last."""
    lines = ["To be or not", "that is the question", "whether tis nobler", "in the mind to suffer",
             "the slings and arrows", "of outrageous fortune", "or to take arms", "against a sea of troubles",
             "and by opposing", "end them"]
    g = torch.Generator().manual_seed(0)
    scenes = []
    for k in range(30):
        start, n = torch.randint(10, (1,), generator=g).item(), 10 + torch.randint(8, (1,), generator=g).item()
        sentences = [lines[(start + i) % 10] for i in range(n)]
        scenes.append(Scene("Toy", "ACT I", f"SCENE {k}", sentences, ["A"] * n))
    return scenes, lines


TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "8",
        "--base_iters", "60", "--diffusion_iters", "60", "--eval_interval", "30", "--warmup_iters", "5",
        "--learning_rate", "3e-3", "--dropout", "0", "--diffusion_steps", "10", "--sample_steps", "3",
        "--time_embd", "8", "--guidance_sweep", "1", "--n_roundtrip", "20", "--nn_bank", "50", "--n_geometry", "50",
        "--n_generations", "1", "--prompt_sentences", "2", "--max_new_sentences", "3", "--contrastive_pool", "32",
        "--threads", "1", "--device", "cpu"]


def test_tiny_end_to_end_run(tmp_path):
    scenes, lines = toy_scenes()
    space = StandInSpace(lines + [lcm.EOT_SENTENCE])
    results = lcm.main([*TINY, "--out_dir", str(tmp_path)], concept_space=space, scenes=scenes)
    saved = json.loads((tmp_path / "results.json").read_text())
    for model in lcm.MODELS:
        for metric in ("l2", "l2r", "contrastive_accuracy"):
            assert 0 <= saved[f"{metric}_{model}"] < 100, (metric, model)
    for key in ("l2r_ground_truth", "heldout_mse_mean_baseline", "dist_to_mean_base_lcm",
                "dist_to_nearest_sentence_diffusion_lcm", "closer_to_mean_share_base_lcm", "par_base_lcm",
                "train_seconds_base_lcm", "command"):
        assert key in saved, key
    assert "1" in saved["guidance_sweep"]
    # the stand-in decodes to its own sentence list, so the truth's round trip is exact
    assert saved["l2r_ground_truth"] == 0.0 and saved["roundtrip_exact_match_ground_truth"] == 1.0
    # both losses fell
    for model in ("base_lcm", "diffusion_lcm"):
        assert saved[f"final_train_loss_{model}"] < saved[f"first_train_loss_{model}"], model
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"base_lcm", "diffusion_lcm"} and all("val_loss" in r for r in rows)
    # the lines cycle, so the next line is predictable: the Base-LCM beats predicting the mean
    assert results["l2_base_lcm"] < results["l2_mean_baseline"]
    for name in ("loss.png", "trajectories.png", "generations.json", "ckpt.pt"):
        assert (tmp_path / name).is_file(), name
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = lcm.BaseLCM(space.dim, lcm.LCMConfig(**{**ckpt["config"]}))
    model.load_state_dict(ckpt["base_lcm"])
    # the embedding cache: a second run (same concept space, same sentences) encodes no corpus sentence again
    encoded = space.encoded
    lcm.main([*TINY, "--out_dir", str(tmp_path), "--overwrite", "--base_iters", "2", "--diffusion_iters", "2"],
             concept_space=space, scenes=scenes)
    assert space.encoded - encoded < encoded - len(space.sentences)
    assert len(list(tmp_path.glob("concept_cache_*.pt"))) == 1


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        lcm.main(["--n_embd", "30", "--n_head", "4"])
    with pytest.raises(SystemExit):
        lcm.main(["--sample_steps", "200"])
    with pytest.raises(SystemExit):
        lcm.main(["--guidance_sweep", "1,x"])
