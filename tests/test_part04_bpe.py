"""Part 4: byte-level BPE - the chunks, the naive and the fast trainer, the encoder against tiktoken,
special tokens, save/load, the cached tokenizer, and the (id, id)-pair vs bytes trap."""
import json
import math
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from part04_scaling import bench_bpe, bpe
from part04_scaling.bpe import (ENDOFTEXT, PairIndex, Tokenizer, add_token, get_stats, get_tokenizer, merge,
                                split_chunks, train, train_naive)
from shared.data import load_text

# Text that makes merges inside multi-byte characters: accents, combining marks, CJK, emoji with a skin
# tone, Arabic digits, runs of spaces and tabs.
UNICODE_SAMPLE = "naïve café 😀😀 👍🏽 中文字符 e\u0301 ١٢٣ 12345  \t\n    indented\r\n"
A, B, C, D = b"abcd"


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text("shakespeare")


@pytest.fixture(scope="module")
def shakespeare_tok(corpus) -> Tokenizer:
    return train(corpus[:300_000], 1024)


@pytest.fixture(scope="module")
def unicode_tok(corpus) -> Tokenizer:
    return train(corpus[:10_000] + UNICODE_SAMPLE * 100, 700)


@pytest.fixture(scope="module")
def unicode_tiktoken(unicode_tok):
    return unicode_tok.to_tiktoken()


# --- Pre-tokenization and the two building blocks ---------------------------------------------------


@pytest.mark.parametrize("text, chunks", [
    ("Hello world!!", ["Hello", " world", "!!"]),
    ("don't WE'LL", ["don", "'t", " WE", "'LL"]),  # contractions split off, any case
    ("12345 apples", ["123", "45", " apples"]),  # at most three digits per chunk
    ("a   b", ["a", "  ", " b"]),  # a run of spaces leaves its last one to the next word
    ("ROMEO:\nO Romeo,\n\n", ["ROMEO", ":\n", "O", " Romeo", ",\n\n"]),
    ("中文 😀😀!", ["中文", " 😀😀!"]),  # CJK are letters; emoji are symbols, like punctuation
])
def test_split_chunks_follows_gpt4_pattern(text, chunks):
    assert split_chunks(text) == chunks
    assert "".join(split_chunks(text)) == text


def test_get_stats_counts_overlapping_pairs_and_merge_goes_left_to_right():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_stats([7, 7, 7]) == {(7, 7): 2}
    counts = get_stats([1, 2], get_stats([1, 2, 1]), weight=10)  # counts accumulate, weighted
    assert counts == {(1, 2): 11, (2, 1): 1}
    assert merge([7, 7, 7], (7, 7), 9) == [9, 7]
    assert merge([1, 2, 3, 1, 2], (1, 2), 256) == [256, 3, 256]
    assert merge([1, 2], (2, 1), 256) == [1, 2]


# --- The trainers ------------------------------------------------------------------------------------------


def test_fast_trainer_learns_the_same_merges_as_the_naive_one(corpus):
    text = corpus[:10_000]
    fast, naive = train(text, 350), train_naive(text, 350)
    assert len(fast.merges) == 350 - 256 - 1 and fast.merges == naive.merges
    byte_pairs = Counter(pair for chunk in split_chunks(text) for pair in zip(chunk.encode(), chunk.encode()[1:]))
    [(top_pair, top_count), (_, second_count)] = byte_pairs.most_common(2)
    assert fast.merges[0] == top_pair == (ord("t"), ord("h")) and top_count > second_count
    assert fast.vocab[256:259] == [b"th", b"er", b" m"]


# Tiny texts full of ties and runs ("aaaa", "abab"), where an off-by-one in the incremental update shows.
@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="aab \n😀", max_size=80), st.integers(1, 30))
def test_fast_equals_naive_on_tiny_texts_and_never_repeats_a_token(text, n_merges):
    with warnings.catch_warnings(action="ignore"):  # tiny texts may run out of pairs (tested below)
        fast, naive = train(text, 257 + n_merges), train_naive(text, 257 + n_merges)
    assert fast.merges == naive.merges
    assert len(set(fast.vocab)) == len(fast.vocab)  # no two tokens with the same bytes


def test_pair_index_counts_equal_a_full_recount_after_every_merge(corpus):
    index = PairIndex(Counter(split_chunks(corpus[:10_000])))
    vocab = [bytes([b]) for b in range(256)]
    token_ids, merges = {t: i for i, t in enumerate(vocab)}, []
    for _ in range(60):
        pair = index.best_pair()
        recount, holders = {}, {}
        for w, (ids, freq) in enumerate(zip(index.words, index.freqs)):
            get_stats(ids, recount, freq)
            for p in zip(ids, ids[1:]):
                holders.setdefault(p, set()).add(w)
        assert index.pair_counts == recount
        assert pair == bpe.best_pair(recount)  # the heap's top is the best pair of the full recount
        assert all(words <= index.where[p] for p, words in holders.items())  # the index finds every word with p
        index.merge(pair, add_token(pair, vocab, token_ids, merges))


def test_a_smaller_vocabulary_is_a_prefix_of_a_bigger_one(corpus):
    assert train(corpus[:20_000], 400).merges[:80] == train(corpus[:20_000], 337).merges


def test_vocab_size_must_fit_and_a_short_text_stops_early_with_a_warning():
    with pytest.raises(ValueError, match="too small"):
        train("hello", 256)  # 256 bytes + <|endoftext|> need 257
    with pytest.warns(UserWarning, match="ran out of pairs after 2 of 43 merges"):
        tok = train("abc", 300)
    assert tok.vocab_size == 256 + 2 + 1 and tok.decode(tok.encode("abc")) == "abc"


# --- Our encoder against tiktoken --------------------------------------------------------------------------


def test_ours_equals_tiktoken_on_the_corpus_and_round_trips(shakespeare_tok, corpus):
    text = corpus[-200_000:]  # held out: the tokenizer trained on the first 300k characters
    ids = shakespeare_tok.encode(text)
    assert ids == shakespeare_tok.to_tiktoken().encode(text, allowed_special="all")
    assert shakespeare_tok.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.4  # bytes: 1.0 per token


unicode_text = st.lists(st.one_of(
    st.text(),  # any code points
    st.text(alphabet=UNICODE_SAMPLE + "\u0301\U0001F3FD\u200d7"),  # many that the tokenizer has merges for
    st.sampled_from(["\U0001F468\u200d\U0001F469", "  ", " 12345", "\n\n", ENDOFTEXT, "<|endoftext", "|>"]),
)).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_ours_equals_tiktoken_and_round_trips_on_any_unicode(unicode_tok, unicode_tiktoken, text):
    ids = unicode_tok.encode(text)
    assert ids == unicode_tiktoken.encode(text, allowed_special="all")
    assert unicode_tok.decode(ids) == text
    assert unicode_tok.encode(text, allowed_special=()) == unicode_tiktoken.encode_ordinary(text)


def test_byte_level_tokens_can_hold_whole_or_partial_characters(unicode_tok):
    assert "😀".encode() in unicode_tok.vocab and " 中文字符".encode() in unicode_tok.vocab
    assert b"\xf0\x9f" in unicode_tok.vocab  # the first half of most emoji: not a character by itself


def test_lone_surrogates_become_replacement_characters_like_in_tiktoken(unicode_tok, unicode_tiktoken):
    text = "a\ud800b"  # not encodable as UTF-8
    assert unicode_tok.encode(text) == unicode_tiktoken.encode(text)
    assert unicode_tok.decode(unicode_tok.encode(text)) == "a\ufffdb"


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(unicode_tok):
    emoji = unicode_tok.encode("😀")
    assert unicode_tok.decode([0xF0]) == "\ufffd" and unicode_tok.decode(emoji) == "😀"
    with pytest.raises(ValueError, match="not in this vocabulary"):
        unicode_tok.decode([1, unicode_tok.vocab_size])
    # a negative id is no id either (Python's [-1] would quietly give the last token, <|endoftext|>)
    for ids in ([-1], [5, -1], torch.tensor([3, -700])):
        bad = min(ids) if isinstance(ids, list) else min(ids.tolist())
        with pytest.raises(ValueError, match=rf"token id {bad} is not in this vocabulary \(ids 0\.\.699\)"):
            unicode_tok.decode(ids)
    assert unicode_tok.decode(torch.tensor([unicode_tok.eot_token])) == ENDOFTEXT


# --- Long runs of one character: one chunk, many merges ------------------------------------------------------


@pytest.fixture(scope="module")
def runs_tok(corpus) -> Tokenizer:
    """Trained on long runs, so it has tokens "aa", "aaaa", ... up to 128 "a"s, and runs of "ab" and spaces."""
    tok = train(("a" * 300 + " " + "ab" * 40 + "\n" + " " * 50 + "x") * 20 + corpus[:20_000], 500)
    assert b"a" * 128 in tok.vocab and b"abababab" in tok.vocab
    return tok


class CountingRanks(dict):
    """The tokenizer's bytes -> id table, counting the lookups the encoder makes."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        self.lookups += 1
        return super().__contains__(key)


@pytest.mark.parametrize("text", ["a" * 20_000, "ab" * 10_000, " " * 20_000 + "x", ("a" * 999 + "b") * 20])
def test_a_long_run_encodes_like_tiktoken(runs_tok, text):
    assert runs_tok.encode(text) == runs_tok.to_tiktoken().encode(text, allowed_special="all")


@pytest.mark.parametrize("n", [1_000, 4_000])
def test_encoding_a_run_takes_a_number_of_lookups_proportional_to_its_length(runs_tok, n):
    # Scanning every pair before every merge would look up ~n^2 / 4 pairs here (4 million at n = 4000).
    runs_tok.ranks = CountingRanks(runs_tok.ranks)
    try:
        ids = runs_tok.encode("a" * n)
        lookups = runs_tok.ranks.lookups
    finally:
        runs_tok.ranks = dict(runs_tok.ranks)
    assert runs_tok.decode(ids) == "a" * n
    assert lookups <= 4 * n, f"{lookups} lookups of the vocabulary to encode {n} bytes"


runs_of_characters = st.lists(st.tuples(st.sampled_from(["a", "b", "ab", " ", "\n", "😀", "x"]), st.integers(1, 400)),
                              max_size=8).map(lambda runs: "".join(piece * count for piece, count in runs))


@settings(max_examples=100, deadline=None)
@given(text=runs_of_characters)
def test_ours_equals_tiktoken_on_random_runs(runs_tok, text):
    assert runs_tok.encode(text) == runs_tok.to_tiktoken().encode(text, allowed_special="all")


# --- Special tokens --------------------------------------------------------------------------------------------


def test_special_tokens_come_after_the_merges_and_are_never_merged():
    tok = train(("hello world" + ENDOFTEXT) * 50, 265)
    assert tok.eot_token == tok.vocab_size - 1 == 256 + len(tok.merges)
    assert not any(b"<|" in token or b"|>" in token for token in tok.vocab)  # the training text's specials were cut out
    ids = tok.encode(f"hello{ENDOFTEXT}world")
    assert ids.count(tok.eot_token) == 1 and tok.decode(ids) == f"hello{ENDOFTEXT}world"
    as_text = tok.encode(f"hello{ENDOFTEXT}", allowed_special=())  # not allowed: plain text
    assert tok.eot_token not in as_text and tok.decode(as_text) == f"hello{ENDOFTEXT}"
    assert tok.to_tiktoken().encode(ENDOFTEXT, allowed_special="all") == [tok.eot_token]


# --- The trap: rank by bytes, not by (id, id) pair -------------------------------------------------------------


def encode_by_id_pairs(tokenizer: Tokenizer, text: str) -> list[int]:
    """minbpe's encoder: merge the (id, id) pair learned first, until no learned pair is left."""
    ranks = {pair: 256 + i for i, pair in enumerate(tokenizer.merges)}
    out = []
    for chunk in split_chunks(text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, math.inf))
            if pair not in ranks:
                break
            ids = merge(ids, pair, ranks[pair])
        out += ids
    return out


def test_encoder_ranks_pairs_by_their_bytes_like_tiktoken():
    # 256 = "ab", 257 = "bc", 258 = "abc" made as (a, bc). Reading "abcd", "ab" comes first; the pair
    # (ab, c) is not in the merge list, but its bytes "abc" are token 258: tiktoken and we merge it.
    tok = Tokenizer([(A, B), (B, C), (A, 257)], special_tokens=())
    assert tok.encode("abcd") == tok.to_tiktoken().encode("abcd") == [258, D]
    assert encode_by_id_pairs(tok, "abcd") == [256, C, D]  # minbpe's reading of the same merges


def test_two_tokens_with_the_same_bytes_are_refused():
    with pytest.raises(ValueError, match=r"tokens 257 and 259 are both b'abc'"):
        Tokenizer([(A, B), (256, C), (B, C), (A, 258)])  # (ab, c) and (a, bc)
    vocab = [bytes([b]) for b in range(256)] + [b"ab", b"bc"]
    with pytest.raises(RuntimeError, match="second token b'abc'"):
        add_token((256, C), vocab + [b"abc"], {t: i for i, t in enumerate(vocab + [b"abc"])}, [])


def test_on_trained_merges_id_pair_and_byte_ranks_agree(shakespeare_tok, corpus):
    text = corpus[-20_000:]  # see the comment above bpe.add_token for why
    assert encode_by_id_pairs(shakespeare_tok, text) == shakespeare_tok.encode(text, allowed_special=())


# --- Save, load and the cache ------------------------------------------------------------------------------


def test_to_dict_holds_what_save_writes_and_survives_a_weights_only_checkpoint(unicode_tok, tmp_path):
    state = unicode_tok.to_dict()
    unicode_tok.save(tmp_path / "tok.json")
    assert json.loads((tmp_path / "tok.json").read_text()) == state
    torch.save({"tokenizer": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]  # plain str/int/list/dict only
    assert loaded == state
    rebuilt = Tokenizer.from_dict(loaded)
    assert rebuilt.merges == unicode_tok.merges and rebuilt.special_tokens == unicode_tok.special_tokens
    assert rebuilt.encode(UNICODE_SAMPLE + ENDOFTEXT) == unicode_tok.encode(UNICODE_SAMPLE + ENDOFTEXT)


@pytest.mark.parametrize("change, reason", [
    (lambda d: [1, 2], "format"),
    (lambda d: {**d, "format": "something else"}, "format"),
    (lambda d: {k: v for k, v in d.items() if k != "pattern"}, "missing field 'pattern'"),
    (lambda d: {**d, "merges": [[97, 300]]}, r"merge 0 \(97, 300\) uses an id that does not exist yet"),
    (lambda d: {**d, "merges": "97 98"}, "pairs"),
    (lambda d: {**d, "merges": [[97, True]]}, "pairs"),
    (lambda d: {**d, "special_tokens": [ENDOFTEXT, 3]}, "list of strings"),
    (lambda d: {**d, "special_tokens": [ENDOFTEXT, ENDOFTEXT]}, "distinct"),
    (lambda d: {**d, "pattern": "(unclosed"}, "missing \\)"),
    (lambda d: {**d, "pattern": 5}, "pattern"),
])
def test_from_dict_refuses_a_malformed_dict(unicode_tok, change, reason):
    with pytest.raises(ValueError, match=f"not a valid tokenizer: .*{reason}"):
        Tokenizer.from_dict(change(unicode_tok.to_dict()))


def test_save_and_load_round_trip(unicode_tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    unicode_tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == unicode_tok.merges and loaded.special_tokens == unicode_tok.special_tokens
    assert loaded.encode(UNICODE_SAMPLE + ENDOFTEXT) == unicode_tok.encode(UNICODE_SAMPLE + ENDOFTEXT)
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # the temp file was renamed away


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    ('{"merges": []}', "format"),
    (json.dumps({"format": bpe.FILE_FORMAT, "pattern": ".", "special_tokens": []}), "missing field 'merges'"),
    (json.dumps({"format": bpe.FILE_FORMAT, "pattern": ".", "special_tokens": [], "merges": [[1, 300]]}),
     "does not exist yet"),
    (json.dumps({"format": bpe.FILE_FORMAT, "pattern": ".", "special_tokens": [], "merges": [[1]]}), "pairs"),
])
def test_loading_a_malformed_file_says_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / "tok.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"not a valid tokenizer file.*{reason}.*delete it"):
        Tokenizer.load(path)


def test_loading_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file.*get_tokenizer"):
        Tokenizer.load(tmp_path / "nothing.json")


def test_get_tokenizer_trains_once_then_loads_and_rebuilds_a_broken_cache(tmp_path, monkeypatch, corpus):
    data = tmp_path / "text.txt"
    data.write_text(corpus[:20_000])
    first = get_tokenizer(300, data=str(data), cache_dir=tmp_path / "cache")
    [path] = (tmp_path / "cache").iterdir()
    assert path.name.startswith("bpe_text_300_") and first.vocab_size == 300
    assert first.merges == train(corpus[:18_000], 300).merges  # trained on the training split only

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(bpe, "train", no_training)
    assert get_tokenizer(300, data=str(data), cache_dir=tmp_path / "cache").merges == first.merges
    path.write_text('{"format": "half a fi')
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = get_tokenizer(300, data=str(data), cache_dir=tmp_path / "cache")
    assert rebuilt.merges == first.merges and Tokenizer.load(path).merges == first.merges


# --- The benchmark script ----------------------------------------------------------------------------------


def test_bench_compares_trainers_encoders_and_compression(tmp_path, corpus):
    data = tmp_path / "text.txt"
    data.write_text(corpus[:40_000])
    results = bench_bpe.main(["--data", str(data), "--naive_bytes", "10000", "--small_bytes", "20000",
                              "--small_vocab_sizes", "300", "--full_vocab_size", "400",
                              "--compression_vocab_sizes", "256,300,400", "--out", str(tmp_path / "bench.json")])
    assert [(r["trainer"], r["text_bytes"]) for r in results["training"]] == [
        ("naive", 10_000), ("fast", 10_000), ("fast", 20_000), ("fast", 40_000)]
    assert results["encoding"]["identical"] and results["encoding"]["tokens"] > 0
    bytes_per_token = [r["bytes_per_token"] for r in results["compression"]]
    assert bytes_per_token[0] == 1.0 and bytes_per_token[0] < bytes_per_token[1] < bytes_per_token[2]
    assert json.loads((tmp_path / "bench.json").read_text())["compression"] == results["compression"]


def test_bench_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_bpe.main(["--help"])
    assert exit_info.value.code == 0 and "--naive_bytes" in capsys.readouterr().out
