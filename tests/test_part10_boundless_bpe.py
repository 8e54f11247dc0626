"""Part 10, BoundlessBPE: the supermerge rule, deletions, the trainer's bookkeeping, the encoder against Part 4's
BPE and against the trainer's own segmentation, the lossless round trip, the metrics, and a tiny end-to-end run."""
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from part04_scaling.bpe import ENDOFTEXT, get_stats, split_chunks, train
from part10_semantic import boundless_bpe as bb
from part10_semantic.boundless_bpe import (BoundlessTokenizer, BoundlessTrainer, boundary_share, bytes_per_token,
                                           can_join, phrases_of, renyi_efficiency, train_boundless)
from shared.data import load_text

UNICODE_SAMPLE = "naïve café 😀😀 👍🏽 中文字符 e\u0301 ١٢٣ 12345  \t\n    indented\r\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text("shakespeare")


@pytest.fixture(scope="module")
def boundless_tok(corpus) -> BoundlessTokenizer:
    """A tokenizer with all three kinds of ops: merges, supermerges and deletions."""
    tok = train_boundless(corpus[:40_000] + UNICODE_SAMPLE * 20, 700, tau=0.9)
    assert tok.super_rank and tok.delete_rank and tok.vocab_size == 700
    return tok


def kinds(tok) -> list[str]:
    return [op[0] for op in tok.ops]


# --- The supermerge rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pretoken, ok", [
    (" the", True), ("don", True), ("'t", True), ("_init", True), ("I", True), (" e\u0301te", True),  # marks ok
    (" of the", True),  # a superword joins again
    (",", False), ("12", False), (" 12", False), ("\n", False), ("  ", False), ("(Romeo", False), ("'", False),
    (" x1", False), ("the,", False),
])
def test_only_letter_pretokens_may_join(pretoken, ok):
    assert can_join(pretoken) is ok


def test_phrases_are_the_runs_of_joinable_pretokens():
    assert phrases_of([" my", " lord", ",", " I", " am", "\n", "12", "O"]) == [(" my", " lord"), (" I", " am"), ("O",)]


def test_a_supermerge_waits_until_both_pretokens_are_single_tokens():
    # Every pair has count 40 (39 for " cd" + " ab"). The pre-token pair (" ab", " cd") would win a tie against
    # the byte pairs, but it may not be counted before " ab" and " cd" are each one token: 4 merges first.
    # (Deletions off: " a" and " c" would go, unused once " ab" and " cd" exist.)
    tok = train_boundless(" ab cd" * 40, 257 + 5, tau=math.inf)
    assert kinds(tok) == ["merge"] * 4 + ["super"]
    assert [op[1:] for op in tok.ops] == [(b" ", b"a"), (b" ", b"c"), (b" a", b"b"), (b" c", b"d"), (b" ab", b" cd")]
    assert tok.encode(" ab cd ab") == [tok.ranks[b" ab cd"], tok.ranks[b" ab"]]


def test_punctuation_digits_and_newlines_never_join():
    # Whole single-token pre-tokens next to each other, but none of the neighbours is letter-only: the trainer
    # runs out of pairs rather than supermerge them.
    tok = train_boundless(" ab, cd. 12 34 ab\n" * 40, 400)
    assert "super" not in kinds(tok) and tok.vocab_size < 400
    assert all(len(tok.decoder[i]) <= 3 for i in tok.encode(" ab, cd. 12 34 ab\n"))


def test_every_supermerge_on_real_text_joins_whole_letter_pretokens(boundless_tok):
    for k, (kind, *operands) in enumerate(boundless_tok.ops):
        if kind != "super":
            continue
        before = BoundlessTokenizer(boundless_tok.ops[:k])  # the vocabulary when this supermerge was made
        for operand in operands:
            for pretoken in split_chunks(operand.decode("utf-8")):  # a superword operand holds several
                assert can_join(pretoken), (k, operands)
                assert len(before.encode(pretoken)) == 1, f"{pretoken!r} was not one token at supermerge {k}"


# --- Deletions -----------------------------------------------------------------------------------------------


def test_an_intermediate_token_is_deleted_when_its_intersection_over_self_reaches_tau():
    text = "abc\n" * 20 + "abd\n"  # "ab" occurs 21 times, 20 of them inside "abc": IoS = 20/21 = 0.952
    deleting = train_boundless(text, 257 + 3, tau=0.9)
    assert deleting.ops[:3] == [("merge", b"a", b"b"), ("merge", b"ab", b"c"), ("delete", b"ab")]
    first_three = BoundlessTokenizer(deleting.ops[:3])
    assert b"ab" not in first_three.ranks and first_three.vocab[256:] == [b"abc"]
    assert first_three.encode("abd") == [ord("a"), ord("b"), ord("d")]  # what is left of "ab" falls back to bytes
    keeping = train_boundless(text, 257 + 2, tau=0.96)  # 0.952 < 0.96
    assert keeping.ops == [("merge", b"a", b"b"), ("merge", b"ab", b"c")] and b"ab" in keeping.ranks


def test_a_whole_letter_pretoken_is_never_deleted():
    text = "ab cd\n" * 2 + "abc\n" * 40  # IoS of "ab" = 40/42, but "ab" is also a word that can join " cd"
    assert "delete" not in kinds(train_boundless(text, 257 + 2, tau=0.9))
    # without supermerges there is nothing to protect, and it goes
    assert ("delete", b"ab") in train_boundless(text, 257 + 2, tau=0.9, supermerges=False).ops


def test_the_encoder_replays_deletions_in_training_order():
    ops = [("merge", b"a", b"b"), ("merge", b"ab", b"c"), ("delete", b"ab"), ("merge", b"b", b"d")]
    tok = BoundlessTokenizer(ops, special_tokens=())
    assert tok.vocab[256:] == [b"abc", b"bd"]  # "ab" is gone, the ids close up
    # "abd": a+b -> ab (op 0), ab deleted (op 2) -> a, b, d; op 0 is in the past, so b+d -> bd (op 3)
    assert [tok.decoder[i] for i in tok.encode("abd")] == [b"a", b"bd"]
    assert [tok.decoder[i] for i in tok.encode("abcab")] == [b"abc", b"a", b"b"]
    with pytest.raises(ValueError, match="needs two tokens and a new byte string"):
        BoundlessTokenizer(ops + [("merge", b"a", b"b")])  # a deleted token is never made again


# --- The trainer's bookkeeping -----------------------------------------------------------------------------


def test_trainer_counts_equal_a_full_recount_after_every_step(corpus):
    trainer = BoundlessTrainer(corpus[:15_000], tau=0.9)
    seen = Counter()
    for _ in range(250):
        assert trainer.step()
        seen.update(op[0] for op in trainer.ops[-2:])
        words, phrases = trainer.words, trainer.phrases
        recount, tokens = {}, Counter()
        for ids, freq in zip(words.words, words.freqs):
            get_stats(ids, recount, freq)
            for i in ids:
                tokens[i] += freq
        assert words.pair_counts == recount
        assert {t: c for t, c in words.token_counts.items() if c} == dict(tokens)
        # a pair of pre-tokens counts only when both are single tokens (or superwords)
        whole = {phrases.unit_ids[c.encode()] for c, ids in zip(words.chunks, words.words)
                 if len(ids) == 1 and c.encode() in phrases.unit_ids}
        made = {phrases.unit_ids[op[1] + op[2]] for op in trainer.ops if op[0] == "super"}
        assert phrases.unlocked == whole | made
        super_recount = {}
        for ids, freq in zip(phrases.words, phrases.freqs):
            for pair in zip(ids, ids[1:]):
                if pair[0] in phrases.unlocked and pair[1] in phrases.unlocked:
                    super_recount[pair] = super_recount.get(pair, 0) + freq
        assert phrases.pair_counts == super_recount
    assert seen["super"] and seen["delete"] and seen["merge"]


def test_without_supermerges_and_deletions_it_is_part4_bpe(corpus):
    text = corpus[:30_000]
    ours, reference = train_boundless(text, 500, tau=math.inf, supermerges=False), train(text, 500)
    assert [op[1:] for op in ours.ops] == [(reference.vocab[a], reference.vocab[b]) for a, b in reference.merges]


def test_encoder_gives_part4_ids_when_there_are_no_supermerges(corpus):
    reference = train(corpus[:30_000] + UNICODE_SAMPLE * 20, 600)
    ours = BoundlessTokenizer([("merge", reference.vocab[a], reference.vocab[b]) for a, b in reference.merges])
    sample = corpus[-20_000:] + UNICODE_SAMPLE + ENDOFTEXT + "aaaaaaaaaaaaa" + UNICODE_SAMPLE[::-1]
    assert ours.vocab_size == reference.vocab_size
    assert ours.encode(sample) == reference.encode(sample)


def test_encoder_reproduces_the_trainers_own_segmentation(boundless_tok, corpus):
    # Two independent paths: the trainer's incremental state, and the encoder replaying the ops from bytes.
    text = corpus[:40_000] + UNICODE_SAMPLE * 20
    assert len(boundless_tok.encode(text)) == boundless_tok.train_stats["train_tokens"]


def test_a_smaller_vocabulary_is_a_prefix_of_a_bigger_one(corpus):
    text = corpus[:20_000]
    big, small = train_boundless(text, 500), train_boundless(text, 420)
    assert big.truncated(420).ops == small.ops and small.vocab_size == 420
    with pytest.raises(ValueError, match="never had"):
        small.truncated(10_000)


# --- Lossless round trip ------------------------------------------------------------------------------------

PIECES = [" of", " the", " my", " lord", " I", " am", "'ll", "don", "'t", ",", ".\n", "\n\n", " ", "  ", "é", "😀",
          "12", ENDOFTEXT, " Romeo", "O"]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_on_arbitrary_unicode(boundless_tok, text):
    assert boundless_tok.decode(boundless_tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_round_trip_where_superwords_form(boundless_tok, text):
    ids, spans = boundless_tok.encode_with_spans(text)
    assert boundless_tok.decode(ids) == text and len(spans) == len(ids)


def test_superwords_do_form_and_cross_boundaries(boundless_tok):
    ids, spans = boundless_tok.encode_with_spans(" I am, my lord; I am.")
    assert max(spans) >= 2 and any(b" " in boundless_tok.decoder[i].strip() for i in ids)


# --- Metrics ---------------------------------------------------------------------------------------------------


def test_bytes_per_token_counts_utf8_bytes():
    assert bytes_per_token("héllo", [1, 2, 3]) == 2.0  # é is 2 bytes: 6 bytes / 3 tokens
    assert bytes_per_token("abcd", [1, 2, 3, 4, 5, 6, 7, 8]) == 0.5


def test_renyi_efficiency_against_the_formula():
    vocab = 16
    assert renyi_efficiency(list(range(vocab)), vocab) == pytest.approx(1.0)  # uniform over the whole vocabulary
    assert renyi_efficiency(list(range(vocab)) * 3, vocab, alpha=1.0) == pytest.approx(1.0)
    assert renyi_efficiency(list(range(8)), vocab) == pytest.approx(0.75)  # log 8 / log 16: half the ids unused
    ids = [0] * 6 + [1] * 3 + [2] * 2 + [3]  # p = 1/2, 1/4, 1/6, 1/12
    p = np.array([6, 3, 2, 1]) / 12
    for alpha in (2.5, 0.5):
        expected = np.log(np.sum(p ** alpha)) / (1 - alpha) / np.log(vocab)
        assert renyi_efficiency(ids, vocab, alpha) == pytest.approx(expected, rel=1e-12)
    shannon = -np.sum(p * np.log(p)) / np.log(vocab)
    assert renyi_efficiency(ids, vocab, 1.0) == pytest.approx(shannon, rel=1e-12)
    assert renyi_efficiency(ids, vocab, 1.0 + 1e-7) == pytest.approx(shannon, rel=1e-5)  # the limit alpha -> 1
    assert renyi_efficiency(ids, vocab, 2.5) < renyi_efficiency(ids, vocab, 1.0)  # alpha > 1 punishes the skew


def test_boundary_share_counted_by_hand():
    ops = [("merge", b" ", b"o"), ("merge", b" o", b"f"), ("merge", b" ", b"t"), ("merge", b" t", b"h"),
           ("merge", b" th", b"e"), ("super", b" of", b" the")]
    tok = BoundlessTokenizer(ops)
    text = " of the, the of the of"  # pre-tokens: " of" " the" "," " the" " of" " the" " of"
    ids, spans = tok.encode_with_spans(text)
    # ids: 256 " o", 257 " of", 258 " t", 259 " th", 260 " the", 261 " of the"; 44 is ","
    assert ids == [261, 44, 260, 261, 257] and spans == [2, 1, 1, 2, 1]
    assert boundary_share(spans) == 2 / 5 and bytes_per_token(text, ids) == 22 / 5
    assert tok.decode(ids) == text
    assert boundary_share([1, 1, 1]) == 0.0


# --- The script ----------------------------------------------------------------------------------------------


def test_tiny_run_writes_results(corpus, tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text(corpus[:60_000], encoding="utf-8")
    out_dir = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran out of pairs": both tokenizers really reach the sizes
        results = bb.main(["--data", str(data), "--vocab_sizes", "300,360", "--vocab_size", "300",
                           "--out_dir", str(out_dir)])
    saved = json.loads((out_dir / "results.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert saved == json.loads(json.dumps(results))
    for key in ("bytes_per_token_bpe", "bytes_per_token_boundless", "renyi_efficiency_bpe",
                "renyi_efficiency_boundless", "boundary_share_boundless", "train_seconds_bpe",
                "train_seconds_boundless"):
        assert isinstance(saved[key], float) and saved[key] >= 0, key
    assert [row["vocab_size"] for row in saved["per_vocab"]] == [300, 360]
    assert set(saved["per_vocab"][0]) == {"vocab_size", "bpe", "boundless", "boundless_no_deletion"}
    assert (out_dir / "rank_frequency.png").stat().st_size > 0
    # the BPE number, recomputed with Part 4 alone
    train_text, val_text = corpus[:54_000], corpus[54_000:60_000]
    bpe = train(train_text, 300)
    assert saved["bytes_per_token_bpe"] == pytest.approx(len(val_text.encode()) / len(bpe.encode(val_text)))
    assert saved["per_vocab"][0]["bpe"]["boundary_share"] == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--vocab_sizes", "300,400", "--vocab_size", "350"], "--vocab_size 350 is not one of"),
    (["--vocab_sizes", "100"], "sizes >= 257"),
    (["--vocab_sizes", "3x0"], "comma-separated integers"),
    (["--tau", "-1"], "--tau must be >= 0"),
])
def test_bad_flags_are_refused_in_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bb.main(flags + ["--out_dir", str(tmp_path / "run")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before touching out_dir
