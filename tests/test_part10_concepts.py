"""Part 10, concept-space lesson (mini-SONAR): the scenes against an independent walk of the corpus, the split,
the encoder (shapes, determinism, padding-free mean pooling, bidirectionality), decode(encode(x)) on a tiny
overfit model, the edit distance and CER against hand examples and a brute force, the checkpoint, the SONAR
backend's clear failure without its package, and a tiny end-to-end run."""
import functools
import json
import math
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from part10_semantic import concepts as cs
from shared.corpus import iter_speeches


@pytest.fixture(scope="module")
def scenes():
    return cs.corpus_scenes()


def tiny_model(seed=0, **overrides) -> cs.SentenceAutoencoder:
    torch.manual_seed(seed)
    cfg = dict(dim=32, max_bytes=40, n_embd=32, n_head=2, encoder_layers=1, decoder_layers=1, prefix_tokens=2,
               noise_std=0.0)
    cfg.update(overrides)
    return cs.SentenceAutoencoder(cs.MiniSonarConfig(**cfg)).eval()


# --- The scenes and the split ---------------------------------------------------------------------------------------


def test_scenes_match_an_independent_walk_of_one_play(scenes):
    # by hand: Macbeth's lines of at most 64 bytes, stripped, non-empty, grouped by (act, scene)
    expected: dict = {}
    for speech in iter_speeches():
        if speech.play != "Macbeth":
            continue
        for line in speech.lines:
            if line.strip() and len(line.strip().encode()) <= 64:
                expected.setdefault((speech.act, speech.scene), []).append((line.strip(), speech.speaker))
    got = {(s.act, s.scene): list(zip(s.sentences, s.speakers)) for s in scenes if s.play == "Macbeth"}
    assert got == expected
    assert len(got) == 28  # Macbeth has 28 scenes (5 acts: 7 + 4 + 6 + 3 + 8)
    assert sum(len(v) for v in got.values()) > 2000


def test_scenes_are_deterministic_and_hold_only_clean_short_lines(scenes):
    again = cs.corpus_scenes()
    assert [(s.play, s.act, s.scene, s.sentences, s.speakers) for s in again] == \
        [(s.play, s.act, s.scene, s.sentences, s.speakers) for s in scenes]
    assert len({(s.play, s.act, s.scene) for s in scenes}) == len(scenes)  # each scene once
    for s in scenes:
        assert s.sentences and len(s.sentences) == len(s.speakers)
        assert all(x == x.strip() and x and len(x.encode()) <= 64 for x in s.sentences)
    # a smaller cap skips the longer lines (it does not cut them)
    short = cs.corpus_scenes(max_chars=20)
    short_lines = [x for s in short for x in s.sentences]
    assert all(len(x.encode()) <= 20 for x in short_lines)
    all_lines = {x for s in scenes for x in s.sentences}
    assert set(short_lines) <= all_lines
    assert len(short_lines) == sum(1 for s in scenes for x in s.sentences if len(x.encode()) <= 20)


def test_split_holds_out_whole_scenes_deterministically(scenes):
    train, held = cs.split_scenes(scenes, 0.1, seed=0)
    key = lambda s: (s.play, s.act, s.scene)  # noqa: E731
    assert len(held) == round(0.1 * len(scenes))
    assert {key(s) for s in train}.isdisjoint({key(s) for s in held})
    assert len(train) + len(held) == len(scenes)
    position = {key(s): i for i, s in enumerate(scenes)}
    for part in (train, held):  # both keep corpus order
        assert [position[key(s)] for s in part] == sorted(position[key(s)] for s in part)
    train2, held2 = cs.split_scenes(scenes, 0.1, seed=0)
    assert [key(s) for s in held2] == [key(s) for s in held]
    _, held3 = cs.split_scenes(scenes, 0.1, seed=1)
    assert [key(s) for s in held3] != [key(s) for s in held]
    assert cs.split_scenes(scenes, 0.0)[1] == []
    with pytest.raises(ValueError):
        cs.split_scenes(scenes, 1.0)


# --- The encoder ---------------------------------------------------------------------------------------------------


def test_encode_shape_dtype_scale_and_determinism():
    space = cs.MiniSonar(tiny_model())
    sentences = ["To be, or not to be", "", "O Romeo, Romeo!", "\u00e9t\u00e9"]
    z = space.encode(sentences)
    assert z.shape == (4, 32) and z.dtype == torch.float32 and not z.requires_grad
    assert torch.equal(z, space.encode(sentences))
    assert torch.allclose(z.pow(2).mean(-1), torch.ones(4), atol=1e-4)  # RMS 1: the fixed scale the noise needs
    assert not torch.allclose(z[0], z[2], atol=1e-3)  # different sentences, different vectors
    assert space.encode([]).shape == (0, 32)


def test_pooled_vector_ignores_padding():
    space = cs.MiniSonar(tiny_model(), batch_size=3)
    short = "Fie!"
    alone = space.encode([short])
    batch = space.encode(["A much longer line of verse than that one", short, "x" * 39, short])
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert torch.allclose(batch[3], alone[0], atol=1e-5)  # also in the second internal batch
    # a plain mean over all positions (padding included) would move it: the check can fail
    model = space.model
    idx, valid = cs.encoder_batch(["A much longer line of verse than that one", short], 40)
    h = model.encoder(idx, valid)
    naive = torch.nn.functional.rms_norm(model.to_concept(h.mean(1)), (32,))
    assert not torch.allclose(naive[1], alone[0], atol=1e-3)


def test_sinusoidal_positions_by_hand():
    # n_embd 4: half = 2 frequencies, 10000^(-0/2) = 1 and 10000^(-1/2) = 0.01; sines first, then cosines
    pe = cs.sinusoidal_positions(3, 4)
    expected = torch.tensor([[math.sin(p), math.sin(0.01 * p), math.cos(p), math.cos(0.01 * p)] for p in range(3)])
    assert torch.allclose(pe, expected, atol=1e-6)


def test_encoder_is_bidirectional():
    model = tiny_model()
    idx, valid = cs.encoder_batch(["abcdef", "abcdeX"], 40)
    h = model.encoder(idx, valid)
    # the last byte differs, and the first position (BOS) sees it: not causal
    assert not torch.allclose(h[0, 0], h[1, 0], atol=1e-6)


def test_batches_and_targets():
    dec_in, targets = cs.decoder_batch(["ab", "c"], 40)
    assert dec_in.tolist() == [[97, 98], [99, cs.EOS]]
    assert targets.tolist() == [[97, 98, cs.EOS], [99, cs.EOS, -100]]
    idx, valid = cs.encoder_batch(["ab", ""], 40)
    assert idx.tolist() == [[cs.BOS, 97, 98], [cs.BOS, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    idx, _ = cs.encoder_batch(["abcdef"], 3)  # cut to max_bytes
    assert idx.tolist() == [[cs.BOS, 97, 98, 99]]


def test_byte_dropout_hides_inputs_not_targets():
    model = tiny_model()
    enc = cs.encoder_batch(["abcd"], 40)
    dec_in, targets = cs.decoder_batch(["abcd"], 40)
    other_in = torch.tensor([[120, 121, 122, 123]])  # other input bytes, same targets
    plain = model(*enc, dec_in, targets)
    assert not torch.allclose(plain, model(*enc, other_in, targets))  # the inputs matter...
    # ...unless every one is hidden: then the decoder has only the concept vector to go on
    assert torch.allclose(model(*enc, dec_in, targets, byte_dropout=1.0), model(*enc, other_in, targets,
                                                                                byte_dropout=1.0))
    assert torch.equal(model(*enc, dec_in, targets, byte_dropout=0.0), plain)


def test_round_trip_of_a_tiny_overfit_model():
    torch.manual_seed(0)
    sentences = ["Now is the winter", "of our discontent", "Made glorious summer", "by this sun of York;",
                 "O!", "Friends, Romans, countrymen"]
    model = tiny_model(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = cs.batch_tensors(model, sentences, "cpu")
    first = None
    for _ in range(200):  # ~1.5 s of CPU; exact from ~125 steps on (seeds 0-2)
        loss = model(*batch, noise_std=0.05)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
    space = cs.MiniSonar(model.eval())
    assert space.decode(space.encode(sentences)) == sentences
    assert cs.char_error_rate(space.decode(space.encode(sentences)), sentences) == 0
    # swapping two vectors swaps the sentences: the decoder reads the vector, it has not memorised an order
    z = space.encode(sentences)
    assert space.decode(z[[1, 0]]) == [sentences[1], sentences[0]]
    with pytest.raises(ValueError):
        space.decode(torch.zeros(2, 31))


# --- Edit distance and CER -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def brute_levenshtein(a: str, b: str) -> int:
    """The recursive definition, memoised: an independent reference for the row-by-row version."""
    if not a or not b:
        return len(a) + len(b)
    return min(brute_levenshtein(a[1:], b) + 1, brute_levenshtein(a, b[1:]) + 1,
               brute_levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_and_cer_by_hand():
    assert cs.levenshtein("kitten", "sitting") == 3
    assert cs.levenshtein("flaw", "lawn") == 2
    assert cs.levenshtein("", "abc") == cs.levenshtein("abc", "") == 3
    assert cs.levenshtein("abc", "abc") == 0
    assert cs.char_error_rate(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    # corpus level: total edits / total reference characters, (1 + 1) / (1 + 3); a mean of per-sentence rates
    # would be (1 + 1/3) / 2
    assert cs.char_error_rate(["a", "abc"], ["b", "abd"]) == pytest.approx(0.5)
    assert cs.char_error_rate(["hello world"], ["hi"]) > 1  # insertions can exceed the reference length
    with pytest.raises(ValueError):
        cs.char_error_rate(["a"], [])


@given(st.text(alphabet="abc", max_size=7), st.text(alphabet="abc", max_size=7))
def test_levenshtein_matches_the_recursive_definition(a, b):
    assert cs.levenshtein(a, b) == brute_levenshtein(a, b) == cs.levenshtein(b, a)


# --- The space's statistics ----------------------------------------------------------------------------------------


def test_pca_keeps_the_two_largest_variances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 1, 3, 0.5, 0.2, 0.1],
                                                                          dtype=torch.float64)
    xy = cs.pca_2d(x)
    top = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)[:2]  # covariance eigenvalues, largest first
    assert torch.allclose(xy.var(0), top, rtol=1e-9)
    assert abs(torch.corrcoef(xy.T)[0, 1]) < 1e-9  # uncorrelated components


def test_nearest_centroid_accuracy_against_a_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 5, generator=g)
    labels = [["a", "b", "c"][i % 3] for i in range(40)]
    z[torch.tensor([lab == "a" for lab in labels])] += 0.8  # a little structure
    correct = 0
    for i in range(len(z)):  # leave-one-out, by hand
        sims = {}
        for lab in "abc":
            members = [j for j in range(len(z)) if labels[j] == lab and j != i]
            centroid = z[members].mean(0)
            sims[lab] = torch.nn.functional.cosine_similarity(z[i], centroid, dim=0).item()
        correct += max(sims, key=sims.get) == labels[i]
    assert cs.nearest_centroid_accuracy(z, labels) == pytest.approx(correct / len(z))
    separated = torch.eye(3).repeat(10, 1) + 0.01 * torch.randn(30, 3, generator=g)
    assert cs.nearest_centroid_accuracy(separated, [str(i % 3) for i in range(30)]) == 1.0


def test_neighbours_and_interpolation_endpoints():
    space = cs.MiniSonar(tiny_model())
    pool = ["Fie!", "O Romeo, Romeo!", "Good night, sweet prince"]
    nbs = cs.nearest_neighbours(space, ["O Romeo, Romeo!", "Fie!"], pool)
    assert [nb["neighbour"] for nb in nbs] == ["O Romeo, Romeo!", "Fie!"]  # a sentence is its own nearest
    assert nbs[0]["cosine"] == pytest.approx(1.0, abs=1e-3)
    path = cs.interpolate(space, "Fie!", "O Romeo, Romeo!", steps=3)
    assert len(path) == 3
    assert path[0] == space.decode(space.encode(["Fie!"]))[0]
    assert path[-1] == space.decode(space.encode(["O Romeo, Romeo!"]))[0]


# --- Checkpoint and backends ---------------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny_model(seed=3)
    path = tmp_path / "ckpt.pt"
    cs.save_concept_space(model, path)
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "mini_sonar" and isinstance(raw["model_config"], dict)
    space = cs.load_concept_space("mini", str(path), train_if_missing=False)
    sentences = ["Out, damned spot!", "Alas, poor Yorick!"]
    assert torch.equal(space.encode(sentences), cs.MiniSonar(model).encode(sentences))
    assert space.decode(space.encode(sentences)) == cs.MiniSonar(model).decode(cs.MiniSonar(model).encode(sentences))
    assert space.dim == 32
    with pytest.raises(FileNotFoundError, match="concepts.py --out_dir"):
        cs.load_concept_space("mini", str(tmp_path / "missing" / "ckpt.pt"), train_if_missing=False)
    with pytest.raises(ValueError, match="unknown concept-space backend"):
        cs.load_concept_space("laser")


def test_sonar_backend_fails_clearly_without_the_package(monkeypatch):
    for name in ("sonar", "sonar.inference_pipelines", "sonar.inference_pipelines.text"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    with pytest.raises(ImportError, match="pip install -r requirements-sonar.txt") as err:
        cs.load_concept_space("sonar")
    assert "separate virtual environment" in str(err.value) and "download" in str(err.value)
    # on the command line, one line and exit status 1 (run_cli)
    with pytest.raises(SystemExit) as exit_info:
        cs.run_cli(cs.main, ["--backend", "sonar", "--out_dir", "/nonexistent-never-created"])
    assert "requirements-sonar.txt" in str(exit_info.value.code)


def test_sonar_backend_without_weights_says_they_download(monkeypatch):
    class Pipeline:  # the package is there, but loading the model card fails (offline, no weights)
        def __init__(self, **kwargs):
            raise RuntimeError("could not download text_sonar_basic_encoder")

    text = types.ModuleType("sonar.inference_pipelines.text")
    text.TextToEmbeddingModelPipeline = text.EmbeddingToTextModelPipeline = Pipeline
    monkeypatch.setitem(sys.modules, "sonar", types.ModuleType("sonar"))
    monkeypatch.setitem(sys.modules, "sonar.inference_pipelines", types.ModuleType("sonar.inference_pipelines"))
    monkeypatch.setitem(sys.modules, "sonar.inference_pipelines.text", text)
    with pytest.raises(OSError, match="download on first use"):
        cs.load_concept_space("sonar")


def test_sonar_backend_calls_the_pipelines_as_documented(monkeypatch):
    calls = {}

    class Encoder:
        def __init__(self, **kwargs):
            calls["encoder"] = kwargs

        def predict(self, sentences, source_lang, **kwargs):
            calls["source_lang"] = source_lang
            return torch.ones(len(sentences), 1024, dtype=torch.float16)

    class Decoder:
        def __init__(self, **kwargs):
            calls["decoder"] = kwargs

        def predict(self, embeddings, target_lang, **kwargs):
            calls["target_lang"], calls["generator"] = target_lang, kwargs
            return ["x"] * len(embeddings)

    text = types.ModuleType("sonar.inference_pipelines.text")
    text.TextToEmbeddingModelPipeline, text.EmbeddingToTextModelPipeline = Encoder, Decoder
    monkeypatch.setitem(sys.modules, "sonar.inference_pipelines.text", text)
    monkeypatch.setitem(sys.modules, "sonar", types.ModuleType("sonar"))
    monkeypatch.setitem(sys.modules, "sonar.inference_pipelines", types.ModuleType("sonar.inference_pipelines"))
    space = cs.load_concept_space("sonar")
    z = space.encode(["Hello."])
    assert z.shape == (1, 1024) and z.dtype == torch.float32 and space.dim == 1024
    assert space.decode(z) == ["x"]
    assert calls["encoder"]["encoder"] == "text_sonar_basic_encoder"
    assert calls["encoder"]["tokenizer"] == calls["decoder"]["tokenizer"] == "text_sonar_basic_encoder"
    assert calls["decoder"]["decoder"] == "text_sonar_basic_decoder"
    assert calls["source_lang"] == calls["target_lang"] == "eng_Latn"
    assert calls["generator"]["beam_size"] == 1  # greedy, as the interface promises


# --- End to end ----------------------------------------------------------------------------------------------------


def test_tiny_end_to_end_run(tmp_path):
    out = tmp_path / "run"
    results = cs.main(["--n_plays", "1", "--heldout_fraction", "0.2", "--dim", "16", "--n_embd", "16", "--n_head",
                       "2", "--encoder_layers", "1", "--decoder_layers", "1", "--prefix_tokens", "1",
                       "--max_iters", "25", "--eval_interval", "10", "--batch_size", "16", "--eval_sentences", "12",
                       "--noise_levels", "0.5", "--plot_per_play", "20", "--threads", "1", "--out_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    for key in ("exact_match", "char_error_rate", "dim", "n_train_sentences", "n_heldout_sentences", "command",
                "exact_match_noise0.5", "char_error_rate_noise0.5", "play_centroid_accuracy", "examples",
                "neighbours", "interpolation"):
        assert key in saved, key
    assert saved["dim"] == 16 and 0 <= saved["exact_match"] <= 1 and saved["char_error_rate"] >= 0
    assert saved["final_loss"] < saved["first_loss"]
    assert results["n_train_sentences"] > results["n_heldout_sentences"] > 0
    for name in ("ckpt.pt", "metrics.jsonl", "semantic_space.png", "loss.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [10, 20, 25]
    space = cs.load_concept_space("mini", str(out / "ckpt.pt"), train_if_missing=False)
    assert space.encode(["Hark!"]).shape == (1, 16)
    with pytest.raises(FileExistsError):  # no silent overwrite of a finished run
        cs.main(["--n_plays", "1", "--max_iters", "1", "--out_dir", str(out)])


def test_bad_flags_get_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cs.main(["--noise_levels", "0.1,x", "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--noise_levels must be comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cs.main(["--n_embd", "30", "--n_head", "4", "--out_dir", str(tmp_path)])
    assert "divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cs.run_cli(cs.main, ["--device", "tpu", "--out_dir", str(tmp_path)])
    assert "unknown device" in str(exit_info.value.code)
