"""Part 10, Byte Latent Transformer lesson: the patchers against hand examples, the thresholds, the hash n-gram ids
against a big-integer formula, the cross-attention masks and pooling against brute force, the causal constraint
(a perturbation test that a leaky decoder and a leaky patcher both fail), the FLOP formula against PyTorch's FLOP
counter, bits per byte by hand, and a tiny end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from part10_semantic import blt
from part10_semantic.model import GPT, GPTConfig

NAN = float("nan")


def tiny_config(**overrides) -> blt.BLTConfig:
    settings = dict(block_size=32, local_n_embd=16, local_n_head=2, encoder_layers=1, decoder_layers=2,
                    local_window=8, global_n_embd=32, global_n_head=2, cross_n_head=2, hash_vocab=64)
    settings.update(overrides)
    return blt.BLTConfig(**settings)


def as_list(starts: torch.Tensor) -> list[int]:
    return starts[0].int().tolist()


# --- Patching --------------------------------------------------------------------------------------------------------


def test_next_byte_entropy_is_in_bits_and_shifted_by_one():
    logits = torch.zeros(1, 3, 256)  # position 0: uniform -> H(x_1) = 8 bits
    logits[0, 1, 65] = 100.0  # position 1: certain -> H(x_2) = 0
    logits[0, 2, :2] = 100.0  # position 2: two equal choices -> H(x_3) = 1 bit
    h = blt.next_byte_entropy(logits)
    assert h.shape == (1, 4) and math.isnan(h[0, 0])
    assert h[0, 1:].tolist() == pytest.approx([8.0, 0.0, 1.0], abs=1e-4)


def test_global_threshold_and_monotonic_rules_on_a_hand_example():
    h = torch.tensor([[NAN, 0.5, 3.0, 3.5, 1.0, 2.5, 0.2, 2.1]])
    # global: H > 2 at 2, 3, 5, 7 (0 and 1 always start)
    assert as_list(blt.entropy_patch_starts(h, 2.0)) == [1, 1, 1, 1, 0, 1, 0, 1]
    # monotonic: jumps 2.5 (t=2), 0.5, -2.5, 1.5 (t=5), -2.3, 1.9 (t=7) -> > 1 at 2, 5, 7. Byte 3 is hard (3.5) but
    # no harder than byte 2: the monotonic rule keeps it in the patch, the global rule does not.
    assert as_list(blt.monotonic_patch_starts(h, 1.0)) == [1, 1, 1, 0, 0, 1, 0, 1]
    # a threshold above every value leaves only the two forced starts
    assert as_list(blt.entropy_patch_starts(h, 10.0)) == [1, 1, 0, 0, 0, 0, 0, 0]


def test_fixed_stride_patches():
    assert as_list(blt.stride_patch_starts(10, 4)) == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # [0] [1-4] [5-8] [9]
    assert blt.stride_patch_starts(10, 4, batch=3).shape == (3, 10)


def test_space_patching_on_a_hand_example():
    text = b"to be, or not\n\nto"
    idx = torch.tensor([list(text)])
    # space-like bytes at 2 ' ', 5 ',', 6 ' ', 9 ' ', 13 '\n', 14 '\n'; the first of each run (2, 5, 9, 13) ends a
    # patch, so patches start after them, at 3, 6, 10, 14: "t" "o " "be," " or " "not\n" "\nto"
    starts = blt.space_patch_starts(idx)
    assert [i for i, s in enumerate(as_list(starts)) if s] == [0, 1, 3, 6, 10, 14]
    pieces = [text[a:b] for a, b in zip([0, 1, 3, 6, 10, 14], [1, 3, 6, 10, 14, len(text)])]
    assert pieces == [b"t", b"o ", b"be,", b" or ", b"not\n", b"\nto"]
    assert blt.mean_patch_size(starts) == pytest.approx(len(text) / 6)


def test_mean_patch_size_and_patch_ids():
    starts = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert blt.mean_patch_size(starts) == pytest.approx(16 / 7)
    assert blt.patch_ids_from_starts(starts).tolist() == [[0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 2, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("rule", ["entropy", "monotonic"])
def test_fitted_threshold_gives_the_target_mean_patch_size(rule):
    g = torch.Generator().manual_seed(0)
    h = torch.rand(64, 257, generator=g) * 6
    h[:, 0] = NAN
    scores = h if rule == "entropy" else blt.entropy_jumps(h)
    patcher = blt.entropy_patch_starts if rule == "entropy" else blt.monotonic_patch_starts
    for target in (3.0, 4.0, 6.0):
        threshold = blt.fit_threshold(scores, target)
        assert blt.mean_patch_size(patcher(h, threshold)) == pytest.approx(target, rel=0.02)


def test_patch_starts_depend_only_on_earlier_bytes():
    """Whether byte t starts a patch must not depend on byte t itself (nor later ones): the decoder predicting
    x_t reads which patch x_t is in. Space patching passes; starting a patch *at* each space would not."""
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([list(b"It is the east, and Juliet is the sun. Arise, fair sun")])
    for t in range(2, idx.size(1)):
        changed = idx.clone()
        changed[0, t:] = torch.randint(32, 127, (idx.size(1) - t,), generator=g)
        assert torch.equal(blt.space_patch_starts(idx)[:, :t + 1], blt.space_patch_starts(changed)[:, :t + 1])
    at_space = lambda x: blt.force_first_patches(blt.is_space_like(x))  # noqa: E731  (the wrong rule)
    changed = idx.clone()
    changed[0, 2] = ord("x")  # "It is" -> "Itxis": the space at 2 is gone
    assert not torch.equal(at_space(idx)[:, :3], at_space(changed)[:, :3])


# --- Hash n-gram embeddings ------------------------------------------------------------------------------------------


def test_hash_ngram_ids_match_the_polynomial_formula_and_stay_in_range():
    text = b"to be, or not to be"
    idx = torch.tensor([list(text)])
    for n, vocab in ((3, 97), (5, 4096), (8, 500_000)):
        ids = blt.hash_ngram_ids(idx, n, vocab)
        padded = [256] * (n - 1) + list(text)  # positions before the text count as "byte" 256
        for t in range(len(text)):
            gram = padded[t:t + n]  # b_{t-n+1} .. b_t, oldest first; b_t gets a^0
            expected = sum(b * 1_000_000_007 ** (n - 1 - j) for j, b in enumerate(gram)) % (2 ** 31 - 1) % vocab
            assert ids[0, t].item() == expected
        assert ids.min() >= 0 and ids.max() < vocab
        assert torch.equal(ids, blt.hash_ngram_ids(idx.clone(), n, vocab))  # deterministic
    # the same n-gram gets the same row wherever it is ("to be" twice), and only the last n bytes matter
    ids = blt.hash_ngram_ids(idx, 5, 1 << 20)
    assert ids[0, 4] == ids[0, 18]
    changed = idx.clone()
    changed[0, 10] = ord("X")
    diff = (blt.hash_ngram_ids(changed, 5, 1 << 20) != ids)[0].nonzero().flatten().tolist()
    assert diff == [10, 11, 12, 13, 14]


def test_hash_embeddings_are_added_per_n_and_can_be_switched_off():
    idx = torch.tensor([list(b"to be, or not to be")])
    torch.manual_seed(0)
    encoder = blt.LocalEncoder(tiny_config(ngram_sizes="3,5"))
    expected = encoder.wte(idx) + encoder.hash_tables[0](blt.hash_ngram_ids(idx, 3, 64)) \
        + encoder.hash_tables[1](blt.hash_ngram_ids(idx, 5, 64))
    assert torch.equal(encoder.embed(idx), expected)
    plain = blt.ByteLatentTransformer(tiny_config(ngram_sizes=""))  # the ablation: bytes only
    assert len(plain.encoder.hash_tables) == 0
    assert torch.equal(plain.encoder.embed(idx), plain.encoder.wte(idx))
    assert plain(idx, blt.space_patch_starts(F.pad(idx, (0, 1))))[0].shape == (1, idx.size(1), 256)


# --- Cross-attention pooling and the masks ---------------------------------------------------------------------------


def test_encoder_and_decoder_cross_masks_against_brute_force():
    patch_ids = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 1, 2, 3, 4, 4]])
    k, P = 2, 6  # row 0 has patches 3..5 empty (padding)
    enc = blt.encoder_cross_mask(patch_ids, P, k)
    assert enc.shape == (2, P * k, 6)
    for b in range(2):
        for slot in range(P * k):
            own = [patch_ids[b, t].item() == slot // k for t in range(6)]
            expected = own if any(own) else [True] * 6  # an empty patch sees everything (never read)
            assert enc[b, slot].tolist() == expected
    read = torch.tensor([[0, 0, 1, 1, 1, 2]])
    dec = blt.decoder_cross_mask(read, 3, k)
    for i in range(6):
        assert dec[0, i].tolist() == [slot // k == read[0, i].item() for slot in range(3 * k)]


def test_a_patch_pools_only_its_own_bytes():
    torch.manual_seed(0)
    patch_ids = torch.tensor([[0, 1, 1, 1, 2, 2, 3, 3]])
    k, C, P = 2, 8, 4
    h = torch.randn(1, 8, C, requires_grad=True)
    pooled = blt.max_pool_patches(h, patch_ids, P)
    for p in range(P):
        assert torch.equal(pooled[0, p], h[0, patch_ids[0] == p].max(dim=0).values)
    pooled.sum().backward()
    assert h.grad.abs().sum() > 0  # the max-pool passes gradients
    cross = blt.CrossAttention(C, 2)
    queries = torch.randn(1, P * k, C)
    mask = blt.encoder_cross_mask(patch_ids, P, k)
    out = cross(queries, h.detach(), mask)
    # the same attention computed patch by patch, on that patch's bytes only, with no mask
    for p in range(P):
        mine = h.detach()[:, patch_ids[0] == p]
        alone = cross(queries[:, p * k:(p + 1) * k], mine, torch.ones(1, k, mine.size(1), dtype=torch.bool))
        assert torch.allclose(out[:, p * k:(p + 1) * k], alone, atol=1e-6)
    # changing the bytes of patch 1 moves patch 1's vectors and no other patch's
    changed = h.detach().clone()
    changed[0, 1:4] += 1.0
    moved = (cross(queries, changed, mask) - out).abs().amax(-1)[0].view(P, k).amax(-1)
    assert moved[1] > 1e-4 and moved[[0, 2, 3]].max() == 0
    # without the mask (plain attention over all bytes) every patch moves: the check can fail
    everything = torch.ones_like(mask)
    moved_all = (cross(queries, changed, everything) - cross(queries, h.detach(), everything)).abs().amax()
    assert moved_all > 1e-4 and (cross(queries, changed, everything) - cross(queries, h.detach(), everything)
                                 ).abs()[0, :k].amax() > 1e-4


# --- The causal constraint -------------------------------------------------------------------------------------------


def entropy_model_for_tests(T: int) -> GPT:
    torch.manual_seed(5)
    model = GPT(GPTConfig(block_size=T, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.wte.weight.mul_(100)  # sharper, more varied predictions than at init: entropies of 0-8 bits
    return model.eval()


def pipeline(model: blt.ByteLatentTransformer, patcher, entropy_model, windows):
    """Bytes -> entropies -> patches -> logits, all recomputed from the (possibly changed) bytes."""
    run = blt.Run("test", model, patcher, entropy_model=entropy_model)
    with torch.no_grad():
        return model(windows[:, :-1], run.starts(windows))[0]


def make_patchers(entropy_model, windows):
    h = blt.window_entropies(entropy_model, windows)
    return {"entropy": blt.Patcher("entropy", blt.fit_threshold(h, 4.0)),
            "monotonic": blt.Patcher("monotonic", blt.fit_threshold(blt.entropy_jumps(h), 4.0)),
            "stride": blt.Patcher("stride", stride=4), "space": blt.Patcher("space")}


def first_leak(model, patcher, entropy_model, windows, positions):
    """The first position q where changing bytes q.. changes a prediction of a byte <= q, else None.
    logits[:, i] predict x_{i+1}, so the predictions of bytes <= q are logits[:, :q]."""
    g = torch.Generator().manual_seed(3)
    base = pipeline(model, patcher, entropy_model, windows)
    for q in positions:
        changed = windows.clone()
        changed[:, q:] = torch.randint(0, 256, changed[:, q:].shape, generator=g)
        if not torch.allclose(pipeline(model, patcher, entropy_model, changed)[:, :q], base[:, :q], atol=1e-5):
            return q
    return None


@pytest.mark.parametrize("scheme", ["entropy", "monotonic", "stride", "space"])
def test_changing_a_byte_never_changes_the_predictions_of_earlier_bytes(scheme):
    cfg = tiny_config()
    T = cfg.block_size
    g = torch.Generator().manual_seed(2)
    windows = torch.tensor([list(b"O Romeo, Romeo! wherefore art thou Romeo? Deny thy father")[:T + 1],
                            list(b"and refuse thy name; Or, if thou wilt not, be but sworn my love")[:T + 1]])
    windows[1, 20:] = torch.randint(0, 256, (T + 1 - 20,), generator=g)  # and some non-text bytes
    entropy_model = entropy_model_for_tests(T)
    patcher = make_patchers(entropy_model, windows)[scheme]
    torch.manual_seed(0)
    model = blt.ByteLatentTransformer(cfg).eval()
    starts = patcher(windows, blt.window_entropies(entropy_model, windows))
    assert 4 <= starts[:, :-1].sum(1).min() < T  # really patched: several patches, not one byte each
    positions = list(range(1, T))
    assert first_leak(model, patcher, entropy_model, windows, positions) is None
    # the predictions after the change do move: the test can see a change when there is one
    changed = windows.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    assert not torch.allclose(pipeline(model, patcher, entropy_model, changed)[:, 10:],
                              pipeline(model, patcher, entropy_model, windows)[:, 10:], atol=1e-5)
    # the deliberately leaky model (the bytes of patch j read patch j's own global output) is caught
    torch.manual_seed(0)
    leaky = blt.ByteLatentTransformer(cfg, decoder_shift=0).eval()
    assert first_leak(leaky, patcher, entropy_model, windows, positions) is not None


def test_a_leaky_patcher_is_caught_by_the_same_test():
    """Starting a patch *at* each space (not after it) lets the patch boundary give the space away."""
    cfg = tiny_config()
    windows = torch.tensor([list(b"Now is the winter of our discontent made glorious summer")[:cfg.block_size + 1]])
    torch.manual_seed(0)
    model = blt.ByteLatentTransformer(cfg).eval()

    class AtSpace(blt.Patcher):
        def __call__(self, windows, entropy):
            return blt.force_first_patches(blt.is_space_like(windows))

    assert first_leak(model, blt.Patcher("space"), None, windows, range(1, cfg.block_size)) is None
    assert first_leak(model, AtSpace("space"), None, windows, range(1, cfg.block_size)) is not None


@pytest.mark.parametrize("shift,leaks", [(1, False), (0, True)])
def test_the_decoder_never_reads_the_global_output_of_its_own_patch(shift, leaks):
    cfg = tiny_config()
    T = cfg.block_size
    torch.manual_seed(0)
    model = blt.ByteLatentTransformer(cfg, decoder_shift=shift).eval()
    idx = torch.randint(0, 256, (2, T))
    starts = blt.stride_patch_starts(T + 1, 3, batch=2)
    starts[1, 7] = True  # the two rows patched differently
    patch_ids = blt.patch_ids_from_starts(starts)
    with torch.no_grad():
        h, patches = model.encode(idx, patch_ids)
        latent = model.latent.hidden_states(None, inputs_embeds=patches)
        logits = model.decoder(h, latent, model.read_patch(patch_ids))
        assert torch.allclose(logits, model(idx, starts)[0], atol=1e-6)  # the pieces are the forward pass
        target_patch = patch_ids[:, 1:]  # logits[:, i] predict x_{i+1}, which lies in patch target_patch[:, i]
        for j in range(1, int(target_patch.max())):
            poked = latent.clone()
            poked[:, j] += torch.randn_like(poked[:, j])  # change global output j only
            moved = (model.decoder(h, poked, model.read_patch(patch_ids)) - logits).abs().amax(-1) > 1e-6
            assert moved[target_patch == j].any().item() == leaks  # patch j's own bytes
            assert moved[target_patch == j + 1].all()  # patch j + 1's bytes read it (later bytes may, through
            assert not moved[target_patch < j].any()  # the decoder's self-attention); earlier bytes never


# --- FLOPs and bits per byte -----------------------------------------------------------------------------------------


def test_gpt_flops_per_byte_by_hand():
    L, d, T = 2, 32, 16
    model = GPT(GPTConfig(block_size=T, n_layer=L, n_head=4, n_embd=d))
    hidden = 80  # SwiGLU hidden size for 32 channels: 16 * round(8 * 32 / 3 / 16)
    params = L * (3 * d * d + d * d + 3 * d * hidden) + 256 * d  # qkv, proj, gate/up/proj; the (tied) head
    attention = L * 12 * d * (T + 1) / 2  # a causal query sees (T + 1) / 2 keys on average
    assert blt.gpt_flops_per_byte(model, T) == pytest.approx(6 * params + attention)


def test_blt_matmul_count_matches_the_flop_counter():
    """6 x params x tokens: the forward pass's matmuls are 2 x params x tokens. PyTorch's FLOP counter measures
    them in a real forward pass, where every per-patch layer runs once per patch."""
    cfg = tiny_config()
    T = cfg.block_size
    torch.manual_seed(0)
    model = blt.ByteLatentTransformer(cfg)
    for starts in (blt.stride_patch_starts(T + 1, 4, 2), blt.space_patch_starts(torch.tensor(
            [list(b"I come to bury Caesar, not to praise him. The evil"[:T + 1])] * 2))):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randint(0, 256, (2, T)), starts)
        size = blt.mean_patch_size(starts[:, :-1])
        assert counter.get_total_flops() == pytest.approx(2 * 2 * T * blt.blt_matmul_params_per_byte(model, size))
    # a count that forgot the per-patch layers run on patches, not bytes, is off
    assert blt.blt_matmul_params_per_byte(model, 1.0) > 1.5 * blt.blt_matmul_params_per_byte(model, 4.0)


def test_bits_per_byte_by_hand():
    assert blt.bits_per_byte(3 * 100 * math.log(2), 100) == pytest.approx(3.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    run = blt.Run("gpt", model)
    windows = torch.randint(0, 256, (5, 17))
    with torch.no_grad():
        logp = F.log_softmax(model(windows[:, :-1])[0], dim=-1)
    nats = -sum(logp[b, t, windows[b, t + 1]].item() for b in range(5) for t in range(16))
    assert blt.evaluate(run, windows, None, "cpu", chunk=2) == pytest.approx(nats / math.log(2) / 80, rel=1e-5)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform over 256 bytes: exactly 8 bits per byte
    assert blt.evaluate(run, windows, None, "cpu") == pytest.approx(8.0, abs=1e-5)


# --- End to end ------------------------------------------------------------------------------------------------------


TINY = ["--block_size", "32", "--batch_size", "4", "--entropy_n_embd", "16", "--entropy_n_head", "2",
        "--entropy_steps", "40", "--local_n_embd", "16", "--local_n_head", "2", "--local_window", "8",
        "--global_n_embd", "32", "--global_n_head", "2", "--global_n_layer", "1", "--decoder_layers", "1",
        "--hash_vocab", "64", "--baseline_n_layer", "1", "--baseline_n_embd", "32", "--baseline_n_head", "2",
        "--baseline_steps", "40", "--eval_interval", "20", "--curve_windows", "4", "--eval_windows", "8",
        "--threshold_windows", "8", "--snippet_bytes", "32", "--learning_rate", "1e-2", "--threads", "1",
        "--device", "cpu"]


def test_tiny_end_to_end_run(tmp_path):
    results = blt.main(TINY + ["--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("bits_per_byte_blt", "bits_per_byte_baseline", "mean_patch_size", "latent_steps_per_byte",
                "train_flops_blt", "train_flops_baseline", "command"):
        assert key in saved
    for variant in ("baseline", "entropy", "monotonic", "stride", "space"):
        for metric in ("bits_per_byte", "mean_patch_size", "latent_steps_per_byte", "train_flops", "train_seconds"):
            assert f"{metric}_{variant}" in saved
        row = saved["models"][variant]
        assert row["last_train_bits"] < row["first_train_bits"] - 0.5  # every model learned
        assert 0 < row["bits_per_byte"] < 8.5
        # matched training FLOPs: within a step's worth (and the variable patch counts) of the baseline's budget
        assert row["train_flops"] == pytest.approx(saved["train_flops_baseline"], rel=0.15)
    assert saved["bits_per_byte_blt"] == saved["bits_per_byte_entropy"] == results["bits_per_byte_blt"]
    assert saved["mean_patch_size_baseline"] == 1.0
    assert saved["mean_patch_size_stride"] == pytest.approx(32 / 9, rel=1e-3)  # [0] [1-4] ... [29-31]
    assert saved["latent_steps_per_byte"] == pytest.approx(1 / saved["mean_patch_size"], rel=1e-3)
    assert 1.5 < saved["mean_patch_size"] < 8
    for name in ("patches.png", "loss.png", "metrics.jsonl", "ckpt.pt"):
        assert (tmp_path / name).stat().st_size > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["models"]) == {"baseline", "entropy", "monotonic", "stride", "space"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"entropy model", "byte baseline", "BLT entropy", "BLT monotonic",
                                          "BLT stride", "BLT space"}


@pytest.mark.parametrize("flags,message", [
    (["--variants", "entropy,bpe"], "--variants"),
    (["--global_n_embd", "40"], "multiple"),
    (["--ngram_sizes", "1,3"], "ngram_sizes"),
    (["--ngram_sizes", "3,x"], "comma-separated"),
    (["--local_n_head", "3"], "divisible"),
])
def test_bad_flags_get_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        blt.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
