"""BoundlessBPE: BPE whose tokens may cross pre-token boundaries, e.g. " of" + " the" -> " of the".

Part 4's BPE never merges across a chunk (a pre-token: a word with its leading space, a number, a run of
punctuation). So its biggest tokens are whole words, and once the frequent words are tokens, each new
token is a rarer word: the token distribution stays skewed towards " the", " and", " I", and a bigger
vocabulary buys less and less. BoundlessBPE (Schmidt, Reddy, Tanner & Pinter 2025,
https://arxiv.org/abs/2504.00178, reference code github.com/kensho-technologies/boundlessbpe) adds two
ideas to BPE:
  1. supermerges: two adjacent pre-tokens may merge into one "superword" token, but only when each of
     them is already fully merged into a single token and is made of letters (an optional leading space,
     underscore or apostrophe allowed): " of" + " the" -> " of the", "don" + "'t" -> "don't", never
     " the" + "," or "12" + "34". A superword can merge again (" of the" + " king"). At every step the
     trainer takes the most frequent candidate, an ordinary pair or a pair of pre-tokens: the two kinds
     are interleaved by their counts, no schedule to tune.
  2. deletions (from PickyBPE, Chizhov et al. 2024, https://arxiv.org/abs/2409.04599): after merging
     (a, b), a token a that now occurs almost only inside ab (Intersection over Self = count(ab) / count(a)
     >= tau, tau = 0.9 in the paper) is an intermediate token nobody needs any more (" Capul" once
     " Capulet" exists): it leaves the vocabulary and its remaining occurrences fall back to bytes. The
     freed id goes to the next merge.

Read top to bottom:
  1. the supermerge rule: which pre-tokens may join (can_join);
  2. WordIndex: Part 4's PairIndex (pairs inside pre-tokens), plus token counts and deletions;
  3. PhraseIndex: pairs of adjacent pre-tokens, counted like Part 4's words: a run of letter pre-tokens
     between two punctuation marks ("a phrase") that occurs 500 times is stored once with weight 500
     (the frequency aggregation of Schmidt et al.'s follow-up, https://arxiv.org/abs/2604.05192);
  4. BoundlessTrainer: the interleaved loop; train_boundless trains to a vocabulary size;
  5. BoundlessTokenizer: encode = BPE inside each pre-token (replaying the merges and deletions in
     training order), then supermerges across pre-tokens, greedily by rank; decode = join the bytes;
  6. the metrics: bytes per token, Renyi efficiency (Zouhar et al. 2023, https://arxiv.org/abs/2306.16842),
     the share of tokens that span a pre-token boundary, the rank-frequency plot;
  7. main: BPE (Part 4's trainer) against BoundlessBPE at equal vocabulary on the held-out split.

    python part10_semantic/boundless_bpe.py                       # ~1 minute on 2 CPU cores; see the README
    python part10_semantic/boundless_bpe.py --tau 2 --no-ablation # supermerges only, no deletions
    python part10_semantic/boundless_bpe.py --vocab_sizes 1024,2048 --vocab_size 1024
    python part10_semantic/boundless_bpe.py --help
"""
from __future__ import annotations

import heapq
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import regex
from matplotlib.figure import Figure
from tqdm import tqdm

from part04_scaling.bpe import (DEFAULT_SPECIAL_TOKENS, GPT4_SPLIT_PATTERN, PairIndex, Tokenizer, get_stats, merge,
                                split_on_specials, training_chunks)
from part04_scaling.bpe import train as train_bpe
from shared.checkpoint import lock_run_dir
from shared.config import parse_config, parse_int_list, run_cli
from shared.data import load_text, train_val_split

# --- 1. Which pre-tokens may join ---------------------------------------------------------------------------

# The reference code's rule (IMPROVED_MERGE_PATTERN): at least one letter; otherwise only letters (with
# their combining marks), spaces, underscores and apostrophes (straight or curly). The space is what lets
# a superword join again: " of the" + " king". Digits, punctuation, newlines never join, so a superword
# never swallows the comma or the line break that ends a phrase. (The reference writes the look-ahead as
# (?=.+\p{L}), which needs two characters and so leaves out one-letter words like "I" or "O"; its authors
# call it the same as (?=.*\p{L}), which we use.)
SUPERWORD_PATTERN = regex.compile(r"(?=.*\p{L})(?:\p{L}\p{M}*|[ _'\u2019])+")


def can_join(pretoken: str) -> bool:
    """True if this pre-token may take part in a supermerge once it is a single token: " the", "don", "'t"."""
    return SUPERWORD_PATTERN.fullmatch(pretoken) is not None


def phrases_of(chunks: list[str]) -> list[tuple[str, ...]]:
    """The maximal runs of joinable pre-tokens: [" my", " lord", ",", " I"] -> [(" my", " lord"), (" I",)].

    A supermerge can only happen inside such a run, so the runs are all the supermerge side needs to
    see of the text."""
    runs, run = [], []
    joinable = {}  # pre-token -> can_join; ~30k distinct pre-tokens among ~1M, so test each once
    for chunk in chunks:
        ok = joinable.get(chunk)
        if ok is None:
            ok = joinable[chunk] = can_join(chunk)
        if ok:
            run.append(chunk)
        elif run:
            runs.append(tuple(run))
            run = []
    if run:
        runs.append(tuple(run))
    return runs


def apply_delta(index: PairIndex, delta: dict) -> None:
    """Add delta[pair] to index.pair_counts and push the new counts on the heap (as PairIndex.merge does)."""
    for pair, d in delta.items():
        if d == 0:
            continue
        count = index.pair_counts.get(pair, 0) + d
        if count:
            index.pair_counts[pair] = count
            heapq.heappush(index.heap, (-count, pair))
        else:
            del index.pair_counts[pair]


def best_allowed(index: PairIndex, spells_old_token) -> tuple[int, int] | None:
    """index.best_pair(), skipping pairs whose bytes were ever a token.

    Part 4 showed that plain BPE never makes a token twice. Here it could: after a deletion the bytes
    of a word can be paired up differently, and ((" of", " the"), " king") and (" of", (" the", " king"))
    spell the same superword. As in the reference code, such a pair is never merged. We also never make
    a deleted token again (the reference code may), so every byte string has at most one merge and one
    deletion in the history, and the encoder can replay the training by bytes. The skipped pair's heap
    entry is dropped; if its count changes, a new entry comes up and is dropped again."""
    while (pair := index.best_pair()) is not None and spells_old_token(pair):
        heapq.heappop(index.heap)
    return pair


# --- 2. Pairs inside pre-tokens: Part 4's index, plus deletions ----------------------------------------------


class WordIndex(PairIndex):
    """Part 4's PairIndex (words = distinct pre-tokens, with their frequency) and what deletions need:
    how often each token occurs (for Intersection over Self) and a way to blow a token back into bytes."""

    def __init__(self, chunk_counts: Counter):
        super().__init__(chunk_counts)
        self.chunks = list(chunk_counts)  # words[w] are the token ids of the pre-token chunks[w]
        self.made_in: dict[int, list[int]] = {}  # token -> the words it was made in: all that can hold it
        self.token_counts = Counter()
        for ids, freq in zip(self.words, self.freqs):
            for i in ids:
                self.token_counts[i] += freq

    def merge(self, pair: tuple[int, int], new_id: int) -> tuple[int, list[int]]:
        """Part 4's merge; returns how many times the pair was merged and the words that became one token."""
        lengths = {w: len(self.words[w]) for w in self.where.get(pair, ())}
        super().merge(pair, new_id)
        n_merged, whole = 0, []
        for w, length in lengths.items():
            made = length - len(self.words[w])  # merges in this word (0 for a stale index entry)
            n_merged += made * self.freqs[w]
            if made and len(self.words[w]) == 1:
                whole.append(w)
        self.made_in[new_id] = [w for w, length in lengths.items() if length > len(self.words[w])]
        self.token_counts[new_id] += n_merged
        self.token_counts[pair[0]] -= n_merged
        self.token_counts[pair[1]] -= n_merged
        return n_merged, whole

    def delete(self, token: int, token_bytes: bytes) -> None:
        """Replace every occurrence of token by its bytes (the paper's choice; PickyBPE splits it in two)."""
        delta = {}
        for w in self.made_in.pop(token):
            ids = self.words[w]
            if token not in ids:
                continue  # merged into something bigger since
            new_ids = [part for i in ids for part in (token_bytes if i == token else (i,))]  # bytes are ids 0..255
            get_stats(ids, delta, -self.freqs[w])
            get_stats(new_ids, delta, self.freqs[w])
            for pair in zip(new_ids, new_ids[1:]):
                self.where[pair].add(w)
            for byte in token_bytes:
                self.token_counts[byte] += self.freqs[w] * ids.count(token)
            self.words[w] = new_ids
        self.token_counts.pop(token, None)
        apply_delta(self, delta)


# --- 3. Pairs of pre-tokens --------------------------------------------------------------------------------


class PhraseIndex(PairIndex):
    """The supermerge side: phrases (runs of joinable pre-tokens) as lists of units, a unit being a whole
    pre-token or a superword. A pair of adjacent units counts only when both are unlocked, i.e. each is a
    single token: a pre-token unlocks when BPE has merged it completely, a superword is born unlocked.

    It reuses PairIndex's fields and heap (best_pair), with units instead of byte ids."""

    def __init__(self, phrase_counts: Counter):
        self.units: list[bytes] = []  # unit id -> its bytes
        self.unit_ids: dict[bytes, int] = {}
        self.words, self.freqs = [], []  # PairIndex's names: words[w] = the unit ids of phrase w
        self.start_lengths = []
        self.holders = defaultdict(list)  # unit -> the phrases it occurs in, until it is unlocked
        for phrase, freq in phrase_counts.items():
            ids = [self.unit(chunk.encode("utf-8")) for chunk in phrase]
            for u in set(ids):
                self.holders[u].append(len(self.words))
            self.words.append(ids)
            self.freqs.append(freq)
            self.start_lengths.append(len(ids))
        self.unlocked: set[int] = set()
        self.pair_counts, self.where, self.heap = {}, defaultdict(set), []  # nothing is unlocked yet: no pairs

    def unit(self, unit_bytes: bytes) -> int:
        if unit_bytes not in self.unit_ids:
            self.unit_ids[unit_bytes] = len(self.units)
            self.units.append(unit_bytes)
        return self.unit_ids[unit_bytes]

    def unlocked_pairs(self, ids: list[int], counts: dict, weight: int) -> None:
        """get_stats, counting only the pairs whose two units are both unlocked."""
        for pair in zip(ids, ids[1:]):
            if pair[0] in self.unlocked and pair[1] in self.unlocked:
                counts[pair] = counts.get(pair, 0) + weight

    def unlock(self, u: int) -> None:
        """Unit u just became one token: count its pairs with its unlocked neighbours."""
        if u in self.unlocked:
            return
        self.unlocked.add(u)
        delta = {}
        for w in self.holders.pop(u, ()):
            ids = self.words[w]
            for pair in zip(ids, ids[1:]):
                if u in pair and pair[0] in self.unlocked and pair[1] in self.unlocked:
                    delta[pair] = delta.get(pair, 0) + self.freqs[w]
                    self.where[pair].add(w)
        apply_delta(self, delta)

    def merge(self, pair: tuple[int, int], new_unit: int) -> None:
        """The supermerge: replace pair by new_unit in every phrase that holds it (as PairIndex.merge does)."""
        self.unlocked.add(new_unit)  # a superword is one token: it may join again at once
        delta = {}
        for w in self.where.pop(pair):
            ids = self.words[w]
            new_ids = merge(ids, pair, new_unit)
            if len(new_ids) == len(ids):
                continue  # a stale index entry
            self.unlocked_pairs(ids, delta, -self.freqs[w])
            self.unlocked_pairs(new_ids, delta, self.freqs[w])
            for new_pair in zip(new_ids, new_ids[1:]):
                if new_unit in new_pair:
                    self.where[new_pair].add(w)
            self.words[w] = new_ids
        apply_delta(self, delta)


# --- 4. The trainer ------------------------------------------------------------------------------------------


class BoundlessTrainer:
    """BoundlessBPE training, one step at a time: step() does the most frequent merge or supermerge (a tie
    goes to the supermerge, as in the reference code), then the deletions the merge calls for.

    ops records what happened, in order: ("merge", a, b), ("delete", t), ("super", a, b), with tokens
    as bytes. It is all the tokenizer needs.
    tau: delete a merged token whose Intersection over Self reaches tau; tau > 1 turns deletions off.
    supermerges=False (and tau > 1) is plain BPE: the same merges as Part 4's train().
    """

    def __init__(self, text: str, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern: str = GPT4_SPLIT_PATTERN,
                 tau: float = 0.9, supermerges: bool = True):
        self.tau = tau
        chunks = training_chunks(text, special_tokens, pattern)
        self.words = WordIndex(Counter(chunks))
        # Each special token ends a phrase, like punctuation does; a phrase of one pre-token has no pairs.
        runs = [run for piece in split_on_specials(text, special_tokens)[::2]
                for run in phrases_of(regex.findall(pattern, piece)) if len(run) > 1] if supermerges else []
        self.phrases = PhraseIndex(Counter(runs)) if supermerges else None
        self.vocab = [bytes([b]) for b in range(256)]  # word-token id -> bytes, deleted ones included
        self.ever = set(self.vocab)  # the bytes of every token made so far, superwords and deleted ones included
        self.live = 256  # tokens in the vocabulary now (specials not counted)
        self.protected: set[int] = set()  # word tokens that are unlocked pre-tokens: never deleted (_whole)
        self.ops: list[tuple] = []
        self.n_merges = self.n_supermerges = self.n_deletions = 0
        for w, ids in enumerate(self.words.words):  # one-byte pre-tokens ("I", "O", "a") are whole from the start
            if len(ids) == 1:
                self._whole(w)

    def _whole(self, w: int) -> None:
        """Word w is now a single token: if it is a joinable pre-token, unlock it for supermerges."""
        if self.phrases is None:
            return
        u = self.phrases.unit_ids.get(self.words.chunks[w].encode("utf-8"))
        if u is not None:
            self.phrases.unlock(u)
            # A token that is a whole pre-token able to join (it has a letter neighbour somewhere) is never
            # deleted: superwords are built on it and the encoder (BPE first, supermerges after) relies on it
            # staying whole. The reference code leaves this case open (a TODO); a complete word is not an
            # intermediate token anyway.
            self.protected.add(self.words.words[w][0])

    def step(self) -> bool:
        """One merge or supermerge, and its deletions. False when there is nothing left to merge."""
        vocab = self.vocab
        word_pair = best_allowed(self.words, lambda p: vocab[p[0]] + vocab[p[1]] in self.ever)
        super_pair = None
        if self.phrases is not None:
            units = self.phrases.units
            super_pair = best_allowed(self.phrases, lambda p: units[p[0]] + units[p[1]] in self.ever)
        if word_pair is None and super_pair is None:
            return False
        word_count = self.words.pair_counts[word_pair] if word_pair else 0
        if super_pair is not None and self.phrases.pair_counts[super_pair] >= word_count:
            left, right = (units[i] for i in super_pair)
            self.phrases.merge(super_pair, self.phrases.unit(left + right))
            self.ever.add(left + right)
            self.ops.append(("super", left, right))
            self.live += 1
            self.n_supermerges += 1
            return True
        a, b = word_pair
        counts_before = {t: self.words.token_counts[t] for t in (a, b)}
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        self.ever.add(vocab[new_id])
        n_merged, whole = self.words.merge(word_pair, new_id)
        self.ops.append(("merge", vocab[a], vocab[b]))
        self.live += 1
        self.n_merges += 1
        for w in whole:
            self._whole(w)
        # PickyBPE: a part that now lives almost only inside the new token is an intermediate token. Single
        # bytes stay (every string must stay encodable).
        for t in counts_before:
            if len(vocab[t]) > 1 and t not in self.protected and n_merged >= self.tau * counts_before[t]:
                self.words.delete(t, vocab[t])
                self.ops.append(("delete", vocab[t]))
                self.live -= 1
                self.n_deletions += 1
        return True

    def n_tokens(self) -> int:
        """How many tokens the training text is now (special tokens not counted): the tokens of every
        pre-token, less one for every supermerge made in a phrase."""
        n = sum(len(ids) * freq for ids, freq in zip(self.words.words, self.words.freqs))
        if self.phrases is not None:
            n -= sum((start - len(ids)) * freq for ids, freq, start in
                     zip(self.phrases.words, self.phrases.freqs, self.phrases.start_lengths))
        return n


def train_boundless(text: str, vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS,
                    pattern: str = GPT4_SPLIT_PATTERN, tau: float = 0.9, supermerges: bool = True,
                    verbose: bool = False) -> BoundlessTokenizer:
    """Train BoundlessBPE until the vocabulary (bytes + tokens + specials) has vocab_size ids.

    The returned tokenizer has .train_stats: seconds, merges, supermerges, deletions, and train_tokens
    (the trainer's own count of the tokens in `text`, which the encoder must reproduce)."""
    n_live = vocab_size - len(special_tokens)
    if n_live < 256:
        raise ValueError(f"vocab_size {vocab_size} is too small: the 256 bytes and {len(special_tokens)} special "
                         f"token(s) alone need {256 + len(special_tokens)}")
    start = time.perf_counter()
    trainer = BoundlessTrainer(text, special_tokens, pattern, tau, supermerges)
    with tqdm(total=n_live - 256, desc="boundless bpe" if supermerges else "bpe (ours)", unit="token",
              disable=not verbose) as bar:
        while trainer.live < n_live and trainer.step():
            bar.update(trainer.live - 256 - bar.n)  # a deletion can take one back
    tokenizer = BoundlessTokenizer(trainer.ops, special_tokens, pattern)
    tokenizer.train_stats = dict(seconds=time.perf_counter() - start, merges=trainer.n_merges,
                                 supermerges=trainer.n_supermerges, deletions=trainer.n_deletions,
                                 train_tokens=trainer.n_tokens())
    return tokenizer


# --- 5. The tokenizer ----------------------------------------------------------------------------------------


class BoundlessTokenizer:
    """The vocabulary of a list of ops. Ids: 0..255 the bytes, then the surviving tokens in the order they
    were made (merges and superwords), then the special tokens. With merges only, the ids are Part 4's."""

    def __init__(self, ops, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern: str = GPT4_SPLIT_PATTERN):
        self.ops = [tuple(op) for op in ops]
        self.pattern, self._regex = pattern, regex.compile(pattern)
        live = {bytes([b]): None for b in range(256)}  # an ordered set
        self.merge_rank, self.delete_rank, self.super_rank = {}, {}, {}  # op -> its index in ops
        for i, (kind, *args) in enumerate(self.ops):
            if kind == "delete":
                if args[0] not in live or len(args[0]) < 2:
                    raise ValueError(f"op {i} deletes {args[0]!r}, which is not a deletable token")
                del live[args[0]]
                self.delete_rank[args[0]] = i
                continue
            a, b = args
            if a not in live or b not in live or a + b in live or a + b in self.delete_rank:
                raise ValueError(f"op {i} {kind} {a!r} + {b!r} needs two tokens and a new byte string")
            live[a + b] = None
            (self.merge_rank if kind == "merge" else self.super_rank)[(a, b)] = i
        self.super_units = {u for pair in self.super_rank for u in pair}  # the tokens a superword can start from
        self.vocab = list(live)
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(special_tokens)}
        self.decoder = self.vocab + [s.encode("utf-8") for s in special_tokens]
        self._cache: dict[bytes, tuple[bytes, ...]] = {}
        self.train_stats: dict = {}

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def truncated(self, vocab_size: int) -> BoundlessTokenizer:
        """The tokenizer the trainer had when its vocabulary first reached vocab_size ids: a prefix of the ops,
        cut between steps (a merge and its deletions stay together). Like BPE's merges, a bigger vocabulary's
        ops start with a smaller one's, so one training run gives every smaller size."""
        live = 256 + len(self.special_tokens)
        for i, (kind, *_) in enumerate(self.ops):
            if live >= vocab_size and kind != "delete":
                return BoundlessTokenizer(self.ops[:i], self.special_tokens, self.pattern)
            live += -1 if kind == "delete" else 1
        if live < vocab_size:
            raise ValueError(f"this tokenizer never had {vocab_size} ids (at most {live})")
        return BoundlessTokenizer(self.ops, self.special_tokens, self.pattern)

    # --- encoding

    def _encode_chunk(self, piece: bytes) -> tuple[bytes, ...]:
        """One pre-token's bytes -> its tokens (as bytes), by replaying the training: from single bytes,
        repeatedly take the earliest op (merge or deletion) that applies, later than the last one applied,
        and apply it everywhere in the pre-token. That is what the trainer did to this pre-token. Without
        deletions it is Part 4's encoder (a merge never makes an earlier one applicable again); with them,
        the bytes of a deleted token are not merged again by the merges that made it.

        Quadratic in the pre-token's length, which is fine for words; results are cached per pre-token."""
        if piece in self._cache:
            return self._cache[piece]
        tokens, last = [bytes([b]) for b in piece], -1
        while True:
            best, op = None, None
            for pair in zip(tokens, tokens[1:]):
                rank = self.merge_rank.get(pair)
                if rank is not None and last < rank and (best is None or rank < best):
                    best, op = rank, pair
            for token in tokens:
                rank = self.delete_rank.get(token)
                if rank is not None and last < rank and (best is None or rank < best):
                    best, op = rank, token
            if best is None:
                break
            if isinstance(op, tuple):
                tokens = merge(tokens, op, op[0] + op[1])
            else:
                tokens = [part for t in tokens for part in ([bytes([b]) for b in t] if t == op else [t])]
            last = best
        self._cache[piece] = tuple(tokens)
        return self._cache[piece]

    def _supermerge(self, run: list[bytes]) -> list[tuple[bytes, int]]:
        """Adjacent single-token pre-tokens -> superwords, greedily: merge the pair of lowest rank (the
        leftmost on a tie) until no adjacent pair is a supermerge. Returns (token, pre-tokens it spans)."""
        units = [(token, 1) for token in run]
        while len(units) > 1:
            ranked = [(self.super_rank[(a[0], b[0])], i) for i, (a, b) in enumerate(zip(units, units[1:]))
                      if (a[0], b[0]) in self.super_rank]
            if not ranked:
                break
            _, i = min(ranked)
            units[i:i + 2] = [(units[i][0] + units[i + 1][0], units[i][1] + units[i + 1][1])]
        return units

    def encode_with_spans(self, text: str, allowed_special="all") -> tuple[list[int], list[int]]:
        """Text -> (ids, spans): spans[k] is how many pre-tokens token k covers (2 or more for a superword)."""
        specials = self.special_tokens
        if allowed_special != "all":
            specials = {s: self.special_tokens[s] for s in allowed_special}
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates have no UTF-8; like Part 4 (and tiktoken), replace them
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        tokens: list[tuple[bytes, int]] = []
        ids: list[int] = []
        for i, piece in enumerate(split_on_specials(text, specials)):
            if i % 2:
                ids.append(specials[piece])
                tokens.append((b"", 1))
                continue
            run: list[bytes] = []  # consecutive pre-tokens that are each one token and may join
            for chunk in self._regex.findall(piece):
                parts = self._encode_chunk(chunk.encode("utf-8"))
                if len(parts) == 1 and parts[0] in self.super_units:
                    run.append(parts[0])
                    continue
                for token, span in self._supermerge(run) + [(p, 1) for p in parts]:
                    ids.append(self.ranks[token])
                    tokens.append((token, span))
                run = []
            for token, span in self._supermerge(run):
                ids.append(self.ranks[token])
                tokens.append((token, span))
        return ids, [span for _, span in tokens]

    def encode(self, text: str, allowed_special="all") -> list[int]:
        return self.encode_with_spans(text, allowed_special)[0]

    def decode(self, ids) -> str:
        """Ids -> text. Byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is not in this vocabulary (ids 0..{self.vocab_size - 1})")
        return b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")


# --- 6. Metrics ----------------------------------------------------------------------------------------------


def bytes_per_token(text: str, ids: list[int]) -> float:
    """UTF-8 bytes of the text per token: higher is better compression."""
    return len(text.encode("utf-8")) / max(len(ids), 1)


def renyi_efficiency(ids: list[int], vocab_size: int, alpha: float = 2.5) -> float:
    """Renyi entropy of the unigram token distribution divided by log(vocab size) (Zouhar et al. 2023).

    H_alpha(p) = log(sum_t p_t^alpha) / (1 - alpha), the Shannon entropy at alpha = 1. It is log(V), the
    most it can be, for a uniform distribution over all V tokens, so the efficiency is 1 there; alpha > 1
    weighs the frequent tokens more, penalising a distribution where a few tokens take most of the text
    (Zouhar et al. found alpha = 2.5 to correlate best with downstream BLEU)."""
    counts = Counter(ids).values()
    total = sum(counts)
    if total == 0 or vocab_size < 2:
        return 0.0
    if alpha == 1:
        entropy = -sum(c / total * math.log(c / total) for c in counts)
    else:
        entropy = math.log(sum((c / total) ** alpha for c in counts)) / (1 - alpha)
    return entropy / math.log(vocab_size)


def boundary_share(spans: list[int]) -> float:
    """The share of tokens that cover two or more pre-tokens (always 0 for BPE)."""
    return sum(span > 1 for span in spans) / max(len(spans), 1)


def plot_rank_frequency(curves: dict[int, dict[str, list[int]]], path) -> None:
    """Log-log rank-frequency plot: one panel per vocabulary size, one line per tokenizer."""
    fig = Figure(figsize=(4.2 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (vocab_size, lines) in zip(axes, curves.items()):
        for name, ids in lines.items():
            freqs = sorted(Counter(ids).values(), reverse=True)
            ax.loglog(range(1, len(freqs) + 1), freqs, label=name, lw=1.3)
        ax.set(title=f"vocabulary {vocab_size}", xlabel="rank", ylabel="count on the held-out text")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


# --- 7. The experiment ---------------------------------------------------------------------------------------


@dataclass
class BoundlessConfig:
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file; "
                                                               "trained on its first 90%, measured on the rest"})
    train_bytes: int = field(default=0, metadata={"help": "train on the first this many characters of the training "
                                                          "split (0 = all of it)", "min": 0})
    vocab_sizes: str = field(default="2048,4096,8192", metadata={"help": "comma-separated vocabulary sizes (bytes + "
                                                                          "tokens + <|endoftext|>) to compare at"})
    vocab_size: int = field(default=2048, metadata={"help": "the headline vocabulary (Part 4's default); must be "
                                                            "one of --vocab_sizes", "min": 257})
    tau: float = field(default=0.9, metadata={"help": "delete a merged token whose Intersection over Self reaches "
                                                      "tau (the paper's 0.9); above 1: no deletions", "min": 0})
    alpha: float = field(default=2.5, metadata={"help": "order of the Renyi entropy (Zouhar et al.'s 2.5)",
                                                "min": 0})
    ablation: bool = field(default=True, metadata={"help": "also train BoundlessBPE without deletions (supermerges "
                                                           "only), to see what each idea brings"})
    out_dir: str = field(default="runs/part10_semantic/boundless_bpe", metadata={"help": "where results.json and "
                                                                                          "rank_frequency.png go"})


def parse_sizes(text: str) -> list[int]:
    """--vocab_sizes, sorted and without repeats."""
    return sorted(set(parse_int_list(text, "vocab_sizes", minimum=257,
                                     what="vocabulary sizes",
                                     why=" (256 bytes + <|endoftext|>)")))


def check_config(cfg: BoundlessConfig) -> None:
    if cfg.vocab_size not in parse_sizes(cfg.vocab_sizes):
        raise ValueError(f"--vocab_size {cfg.vocab_size} is not one of --vocab_sizes {cfg.vocab_sizes}")


def measure(tokenizer, text: str, alpha: float) -> dict:
    """The held-out numbers of one tokenizer (and its ids, for the rank-frequency plot)."""
    if isinstance(tokenizer, Tokenizer):  # Part 4's: no token crosses a pre-token
        ids = tokenizer.encode(text)
        spans = [1] * len(ids)
    else:
        ids, spans = tokenizer.encode_with_spans(text)
    return dict(tokens=len(ids), ids=ids, bytes_per_token=bytes_per_token(text, ids),
                renyi_efficiency=renyi_efficiency(ids, tokenizer.vocab_size, alpha),
                shannon_efficiency=renyi_efficiency(ids, tokenizer.vocab_size, 1.0),
                boundary_share=boundary_share(spans))


def main(argv=None) -> dict:
    cfg = parse_config(BoundlessConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    with lock_run_dir(cfg.out_dir):  # one run per out_dir at a time
        return run(cfg, argv)


def run(cfg: BoundlessConfig, argv=None) -> dict:
    sizes = parse_sizes(cfg.vocab_sizes)
    out_dir = Path(cfg.out_dir)
    train_text, val_text = train_val_split(load_text(cfg.data))
    if cfg.train_bytes:
        train_text = train_text[:cfg.train_bytes]
    print(f"training text: {len(train_text.encode()) / 1e6:.2f} MB, "
          f"held-out text: {len(val_text.encode()) / 1e6:.2f} MB")

    # Train each tokenizer once, to the biggest vocabulary, in this run (so the times compare); the smaller
    # vocabularies are prefixes of it.
    start = time.perf_counter()
    bpe = train_bpe(train_text, sizes[-1], verbose=True)
    bpe_seconds = time.perf_counter() - start
    trained = {"boundless": train_boundless(train_text, sizes[-1], tau=cfg.tau, verbose=True)}
    if cfg.ablation:
        trained["boundless_no_deletion"] = train_boundless(train_text, sizes[-1], tau=math.inf, verbose=True)

    rows, curves = [], {}
    for vocab_size in tqdm(sizes, desc="measuring on the held-out text", unit="vocab"):
        tokenizers = {"bpe": Tokenizer(bpe.merges[:vocab_size - 257])}
        if tokenizers["bpe"].vocab_size < vocab_size:
            raise ValueError(f"the training text is too short for a vocabulary of {vocab_size}: BPE ran out of pairs "
                             f"at {tokenizers['bpe'].vocab_size}; use smaller --vocab_sizes or more text")
        tokenizers.update({name: tok.truncated(vocab_size) for name, tok in trained.items()})
        row = dict(vocab_size=vocab_size)
        curves[vocab_size] = {}
        for name, tok in tokenizers.items():
            row[name] = measure(tok, val_text, cfg.alpha)
            curves[vocab_size][name] = row[name].pop("ids")
            if name != "bpe":
                row[name].update(supermerges=len(tok.super_rank), deletions=len(tok.delete_rank))
        rows.append(row)

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_rank_frequency(curves, out_dir / "rank_frequency.png")
    head = next(row for row in rows if row["vocab_size"] == cfg.vocab_size)
    headline = trained["boundless"].truncated(cfg.vocab_size)
    ids, spans = headline.encode_with_spans(val_text)
    top_superwords = Counter(headline.decoder[i].decode("utf-8", "replace")
                             for i, span in zip(ids, spans) if span > 1).most_common(15)
    results = dict(
        command="python part10_semantic/boundless_bpe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        config=asdict(cfg), train_bytes=len(train_text.encode()), val_bytes=len(val_text.encode()),
        vocab_size=cfg.vocab_size,
        bytes_per_token_bpe=head["bpe"]["bytes_per_token"],
        bytes_per_token_boundless=head["boundless"]["bytes_per_token"],
        renyi_efficiency_bpe=head["bpe"]["renyi_efficiency"],
        renyi_efficiency_boundless=head["boundless"]["renyi_efficiency"],
        boundary_share_boundless=head["boundless"]["boundary_share"],
        train_seconds_bpe=bpe_seconds, train_seconds_boundless=trained["boundless"].train_stats["seconds"],
        train_stats={name: tok.train_stats for name, tok in trained.items()},
        top_superwords=top_superwords, per_vocab=rows)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nheld-out text, {len(val_text.encode()) / 1e6:.2f} MB; Renyi efficiency at alpha = {cfg.alpha} "
          f"(Shannon: alpha = 1)")
    print(f"{'vocab':>6} {'tokenizer':>22} {'bytes/token':>12} {'Renyi eff.':>11} {'Shannon eff.':>13} "
          f"{'cross-boundary':>15} {'supermerges':>12} {'deletions':>10}")
    for row in rows:
        for name in ["bpe", *trained]:
            m = row[name]
            print(f"{row['vocab_size']:6d} {name:>22} {m['bytes_per_token']:12.3f} {m['renyi_efficiency']:11.4f} "
                  f"{m['shannon_efficiency']:13.4f} {m['boundary_share']:15.1%} {m.get('supermerges', 0):12d} "
                  f"{m.get('deletions', 0):10d}")
    mb = len(train_text.encode()) / 1e6
    print(f"training to {sizes[-1]} on {mb:.2f} MB: BPE (Part 4's train) {bpe_seconds:.1f} s, BoundlessBPE "
          f"{results['train_seconds_boundless']:.1f} s")
    print("most frequent superwords:", ", ".join(repr(s) for s, _ in top_superwords[:10]))
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'rank_frequency.png'}")
    return results


if __name__ == "__main__":
    run_cli(main)
