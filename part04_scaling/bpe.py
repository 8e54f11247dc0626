"""Byte-level BPE (byte-pair encoding), from scratch: train it, encode and decode with it, export it to tiktoken.

Part 2's model read one byte per token. BPE keeps those 256 byte tokens and adds new ones by merging:
find the most frequent pair of adjacent tokens in the training text, make it a new token, replace
every occurrence, repeat until the vocabulary has the size you asked for (Sennrich et al. 2016,
https://arxiv.org/abs/1508.07909; byte-level as in GPT-2, Radford et al. 2019). Frequent words
become one token, so the same context window holds ~3x more text and the model spends no capacity
on spelling common words; rare words and any other string still encode, as bytes.

Read top to bottom:
  1. pre-tokenization: GPT-4's regex cuts the text into chunks (words, numbers, punctuation, spaces);
     merges never cross a chunk boundary, so " dog." and " dog!" share the token " dog".
  2. train_naive: the textbook trainer. It recounts every pair of the whole text after every merge.
  3. train: the same merges, fast. Count each distinct chunk once (with its frequency), keep the pair
     counts and an index pair -> chunks, and after a merge update only the chunks that contained the pair.
  4. Tokenizer: encode (the same ids as tiktoken), decode, save/load (to_dict/from_dict), to_tiktoken.
  5. get_tokenizer: train once, cache the JSON in data/, reload it afterwards.

    from part04_scaling.bpe import get_tokenizer
    tok = get_tokenizer()                      # trains on the first use (seconds), then loads data/bpe_*.json
    ids = tok.encode("O Romeo, Romeo!<|endoftext|>")
    tok.decode(ids)
    enc = tok.to_tiktoken()                    # the same ids from tiktoken's Rust encoder, ~10x faster
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import regex  # the `re` module knows no \p{L} (any letter) or \p{N} (any digit); tiktoken uses `regex` too
from tqdm import tqdm

from shared.data import DATA_DIR, load_text, train_val_split

# GPT-4's split pattern (tiktoken's cl100k_base). Alternatives, tried left to right at each position:
#   's 't 're 've 'm 'll 'd     contractions (any case)            "don't" -> "don", "'t"
#   [^\r\n\p{L}\p{N}]?+\p{L}++  letters, with one optional leading space or symbol   " Romeo"
#   \p{N}{1,3}+                 numbers in groups of at most three digits   "12345" -> "123", "45"
#    ?[^\s\p{L}\p{N}]++[\r\n]*+ punctuation runs, with an optional leading space and trailing newlines
#   \s++$ | \s*[\r\n] | \s+(?!\S) | \s     whitespace; a run before a word leaves its last space to the word
# (?+ ++ *+ are possessive: they never give back what they matched, which keeps the matching linear.)
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                      r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
ENDOFTEXT = "<|endoftext|>"  # separates documents; GPT-2's name for it
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT,)
DEFAULT_VOCAB_SIZE = 2048  # 256 bytes + 1791 merges + <|endoftext|>; see get_tokenizer for why this size


# --- 1. Pre-tokenization -------------------------------------------------------------------------------


def split_on_specials(text: str, specials) -> list[str]:
    """text -> [text, special, text, special, ..., text]: the special tokens sit at the odd positions.

    Special tokens are cut out before anything else, so they are never split by the regex and never
    merged with their neighbours. The longest one is tried first, in case one is a prefix of another.
    """
    if not specials:
        return [text]
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.split(f"({alternatives})", text)


def split_chunks(text: str, pattern: str = GPT4_SPLIT_PATTERN) -> list[str]:
    """The chunks that BPE merges within, e.g. "Hello world!!" -> ["Hello", " world", "!!"]."""
    return regex.findall(pattern, text)


def check_vocab_size(vocab_size: int, special_tokens) -> int:
    """The number of merges a vocabulary of vocab_size ids leaves room for (specials count as ids)."""
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} "
                         f"special token(s) alone need {256 + len(special_tokens)}")
    return n_merges


def training_chunks(text: str, special_tokens, pattern: str) -> list[str]:
    """Every chunk of the training text, in order. Special tokens in the text separate chunks and are dropped."""
    return [chunk for piece in split_on_specials(text, special_tokens)[::2] for chunk in split_chunks(piece, pattern)]


# --- 2. The naive trainer ------------------------------------------------------------------------------


def get_stats(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict:
    """Add `weight` to counts[pair] for each adjacent pair: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}.

    Overlapping pairs count: [7, 7, 7] has the pair (7, 7) twice.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of pair in ids by new_id, left to right: merge([7, 7, 7], (7, 7), 9) -> [9, 7]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(counts: dict) -> tuple[int, int]:
    """The most frequent pair; a tie goes to the smallest (id, id), so every run picks the same merges."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


# The trap. Two encoders can read the same merges differently. tiktoken stores a vocabulary as
# mergeable_ranks = {token bytes: rank} and, within a chunk, merges the adjacent pair whose concatenated
# bytes is the token of lowest rank. minbpe-style encoders look the (id, id) pair up in the merge list.
# They disagree when the bytes of a pair (P, Q) spell a token that was made from a different split:
# with the merges (a, b), (b, c), (a, bc), tiktoken turns "abc" into the token "abc", minbpe into
# [ab, c], because (ab, c) is not in its list. Worse, two merges (ab, c) and (a, bc) would make two
# tokens with the same bytes, which mergeable_ranks cannot even hold (one key, one rank).
# Our way out, by construction:
#   * our encoder ranks by bytes exactly like tiktoken (Tokenizer._encode_chunk), so the two agree on
#     any list of merges, and Tokenizer refuses a vocabulary with two tokens of the same bytes;
#   * the trainers never make such a token (checked below). They cannot: a merge is applied to every
#     chunk, left to right. A stretch of text whose two ends stay token boundaries is therefore merged
#     the same way wherever it occurs, so once some bytes became a token, every later occurrence of
#     those bytes (with token boundaries around them) is that token, never a new pair spelling it.
#     The same argument shows that on trained merges tiktoken's rule and minbpe's give the same ids.


def add_token(pair, vocab: list[bytes], token_ids: dict[bytes, int], merges: list) -> int:
    """Record the merge of `pair` and return the new token's id (the next free one); its bytes are both halves'."""
    merged = vocab[pair[0]] + vocab[pair[1]]
    if merged in token_ids:  # cannot happen with train/train_naive (see above): a bug if it does
        raise RuntimeError(f"merge {pair} would make a second token {merged!r} (token {token_ids[merged]} has those "
                           "bytes); every chunk must be merged the same way, left to right")
    token_ids[merged] = len(vocab)
    vocab.append(merged)
    merges.append(pair)
    return len(vocab) - 1


def progress_bar(total: int, desc: str, verbose: bool | None, big: bool):
    """A tqdm bar over the merges: always with verbose=True, never with False, for big jobs with None."""
    return tqdm(total=total, desc=desc, unit="merge", disable=not (big if verbose is None else verbose))


def finished(merges, n_merges: int, special_tokens, pattern: str) -> Tokenizer:
    """The trained Tokenizer; a warning if the text was too short for all the merges asked for."""
    if len(merges) < n_merges:
        warnings.warn(f"the text ran out of pairs after {len(merges)} of {n_merges} merges; "
                      f"the vocabulary has {256 + len(merges) + len(special_tokens)} tokens")
    return Tokenizer(merges, special_tokens, pattern)


def train_naive(text: str, vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern: str = GPT4_SPLIT_PATTERN,
                verbose: bool | None = None) -> Tokenizer:
    """Train BPE the simple way (as minbpe does): after every merge, count all pairs of the text again.

    Each merge costs a pass over the whole text in Python: ~0.8 s per merge on 1.1 MB, minutes for a
    vocabulary of 1024. train() learns exactly the same merges, much faster.
    """
    n_merges = check_vocab_size(vocab_size, special_tokens)
    chunks = [list(chunk.encode("utf-8")) for chunk in training_chunks(text, special_tokens, pattern)]
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes; ids 0..255 are the bytes themselves
    token_ids = {token: i for i, token in enumerate(vocab)}  # bytes -> id
    merges = []
    with progress_bar(n_merges, "bpe (naive)", verbose, big=len(text) > 100_000) as bar:
        while len(merges) < n_merges:
            counts = {}
            for ids in chunks:  # pairs never cross a chunk boundary
                get_stats(ids, counts)
            if not counts:
                break
            pair = best_pair(counts)
            new_id = add_token(pair, vocab, token_ids, merges)
            chunks = [merge(ids, pair, new_id) for ids in chunks]
            bar.update()
    return finished(merges, n_merges, special_tokens, pattern)


# --- 3. The fast trainer -------------------------------------------------------------------------------


class PairIndex:
    """The fast trainer's state, kept up to date merge by merge instead of recounted.

    words[w]: the token ids of the w-th distinct chunk, which occurs freqs[w] times in the text.
        Natural text repeats its words: the first 1.1 MB of our corpus has 263k chunks but only 16k distinct ones.
    pair_counts[pair]: how often the pair occurs in the text (a word's pairs count freqs[w] times).
    where[pair]: the words that contain the pair (or did: stale entries are skipped when met).
    heap: (-count, pair) entries; the top is the best pair. When a count changes we push the new
        entry and leave the old one; a popped entry whose count is out of date is dropped ("lazy deletion").
    """

    def __init__(self, chunk_counts: Counter):
        self.words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        self.freqs = list(chunk_counts.values())
        self.pair_counts = {}
        self.where = defaultdict(set)
        for w, (ids, freq) in enumerate(zip(self.words, self.freqs)):
            get_stats(ids, self.pair_counts, freq)
            for pair in zip(ids, ids[1:]):
                self.where[pair].add(w)
        # (-count, pair): the smallest entry is the biggest count, then the smallest pair, as in best_pair
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def best_pair(self) -> tuple[int, int] | None:
        while self.heap:
            neg_count, pair = self.heap[0]
            if self.pair_counts.get(pair) == -neg_count:
                return pair
            heapq.heappop(self.heap)  # stale: the pair's count changed since this entry was pushed
        return None

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Merge pair into new_id in every word that contains it; update the counts of those words only."""
        delta = {}  # pair -> change of its count
        for w in self.where.pop(pair):
            ids = self.words[w]
            new_ids = merge(ids, pair, new_id)
            if len(new_ids) == len(ids):
                continue  # a stale index entry: this word lost the pair in an earlier merge
            get_stats(ids, delta, -self.freqs[w])  # take out all pairs of the old word ...
            get_stats(new_ids, delta, self.freqs[w])  # ... and put in those of the new one
            for new_pair in zip(new_ids, new_ids[1:]):
                if new_id in new_pair:
                    self.where[new_pair].add(w)
            self.words[w] = new_ids
        for changed, d in delta.items():
            if d == 0:
                continue  # a pair away from the merge: taken out with the old word, put back with the new one
            count = self.pair_counts.get(changed, 0) + d
            if count:
                self.pair_counts[changed] = count
                heapq.heappush(self.heap, (-count, changed))
            else:
                del self.pair_counts[changed]


def train(text: str, vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern: str = GPT4_SPLIT_PATTERN,
          verbose: bool | None = None) -> Tokenizer:
    """Train BPE fast: the same merges as train_naive (same tie rule), in seconds instead of minutes.

    Two ideas. (1) Count each distinct chunk once: BPE never merges across chunks, so a chunk that occurs
    1000 times is merged the same way 1000 times; do it once and weight its pairs by 1000. (2) A merge
    only changes the pair counts of the words that contain the merged pair, usually a few hundred of
    the 16k words: update those (PairIndex.merge) instead of recounting the whole text.
    """
    n_merges = check_vocab_size(vocab_size, special_tokens)
    index = PairIndex(Counter(training_chunks(text, special_tokens, pattern)))
    vocab = [bytes([b]) for b in range(256)]
    token_ids = {token: i for i, token in enumerate(vocab)}
    merges = []
    with progress_bar(n_merges, "bpe", verbose, big=len(text) > 1_000_000 or vocab_size > 2048) as bar:
        while len(merges) < n_merges:
            pair = index.best_pair()
            if pair is None:
                break
            index.merge(pair, add_token(pair, vocab, token_ids, merges))
            bar.update()
    return finished(merges, n_merges, special_tokens, pattern)


# --- 4. The tokenizer ----------------------------------------------------------------------------------

FILE_FORMAT = "llm-from-scratch bpe"


class Tokenizer:
    """A trained BPE vocabulary: ids 0..255 are the bytes, 256.. the merges in order, then the special tokens."""

    def __init__(self, merges, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern: str = GPT4_SPLIT_PATTERN):
        self.merges = [tuple(pair) for pair in merges]  # merges[i] made token 256 + i
        self.pattern = pattern
        self.vocab = [bytes([b]) for b in range(256)]  # id -> bytes
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} {(a, b)} uses an id that does not exist yet (ids so far: 0..{255 + i})")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id, which is also the merge rank
        if len(self.ranks) < len(self.vocab):
            dup = next(i for i, token in enumerate(self.vocab) if self.ranks[token] != i)
            raise ValueError(f"tokens {dup} and {self.ranks[self.vocab[dup]]} are both {self.vocab[dup]!r}: a byte "
                             "string can have only one id (tiktoken's mergeable_ranks is keyed by bytes)")
        if len(set(special_tokens)) < len(special_tokens) or not all(special_tokens):
            raise ValueError(f"special tokens must be distinct, non-empty strings, got {list(special_tokens)}")
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(special_tokens)}  # after the merges
        self.decoder = self.vocab + [s.encode("utf-8") for s in special_tokens]  # every id -> its bytes
        self._regex = regex.compile(pattern)

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    @property
    def eot_token(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, specials={self.special_tokens})"

    # --- encoding: exactly tiktoken's rule, in Python

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Text -> ids. Special tokens in allowed_special ("all", or a set of strings) become their id; any
        other special-token string in the text is encoded as ordinary text (tiktoken raises instead by default).

        Careful with "all" on text you did not write: a user typing <|endoftext|> gets the real token.
        """
        specials = self.special_tokens
        if allowed_special != "all":
            specials = {s: self.special_tokens[s] for s in allowed_special}
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800") have no UTF-8; tiktoken replaces them by U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = []
        for i, piece in enumerate(split_on_specials(text, specials)):
            if i % 2:
                ids.append(specials[piece])
                continue
            for chunk in self._regex.findall(piece):
                ids.extend(self._encode_chunk(chunk.encode("utf-8")))
        return ids

    def _encode_chunk(self, piece: bytes) -> list[int]:
        """One chunk's bytes -> ids, with the same result as tiktoken's Rust _byte_pair_merge.

        The rule: repeatedly merge the adjacent pair whose concatenated bytes is the token with the
        lowest rank (= id = the order in which training made it), the leftmost such pair on a tie, until
        no adjacent pair is a token. Ranking by bytes, not by (id, id) pair, is what makes us agree with
        tiktoken (see the trap above add_token). If the whole chunk is a token, tiktoken returns it at
        once; so do we.

        The obvious way, scanning all pairs for the best one before every merge, costs n^2 steps on a
        chunk of n bytes: nothing on a word, but seconds on a long run of one letter ("aaaa...", one
        chunk, which a user can type as a prompt). So we keep
        the pairs in a heap ordered by (rank, start): the top is the best pair, the leftmost on a tie. A
        merge changes only the two pairs around it; we push their new ranks and leave the old entries in
        the heap, skipping them when they come up ("lazy deletion", as in PairIndex). n log n steps.
        """
        ranks = self.ranks
        if piece in ranks:
            return [ranks[piece]]
        n = len(piece)
        # The parts, as a linked list over byte offsets: a part starts at i and ends at end[i]; prev[i] is
        # the start of the part before it. pair_rank[i]: the rank of the bytes of part i + the next part,
        # None if they are no token (or i is no longer the start of a part).
        end, prev = list(range(1, n + 1)), list(range(-1, n - 1))
        pair_rank = [ranks.get(piece[i:i + 2]) for i in range(n - 1)] + [None]
        heap = [(rank, i) for i, rank in enumerate(pair_rank) if rank is not None]
        heapq.heapify(heap)

        def update(i: int) -> None:  # part i or its neighbour changed: rank its pair anew
            rank = ranks.get(piece[i:end[end[i]]]) if end[i] < n else None
            pair_rank[i] = rank
            if rank is not None:
                heapq.heappush(heap, (rank, i))

        while heap:
            rank, i = heapq.heappop(heap)
            if pair_rank[i] != rank:
                continue  # stale: part i or its neighbour changed since this entry was pushed
            j = end[i]  # merge part i with the next part, which starts at j
            end[i], pair_rank[j] = end[j], None
            if end[i] < n:
                prev[end[i]] = i
            update(i)
            if prev[i] >= 0:
                update(prev[i])
        ids, i = [], 0
        while i < n:
            ids.append(ranks[piece[i:end[i]]])
            i = end[i]
        return ids

    def decode(self, ids) -> str:
        """Ids (a list or a 1-D tensor) -> text. Byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            if min(ids, default=0) < 0:  # self.decoder[-1] would quietly be the last token, <|endoftext|>
                raise IndexError
            data = b"".join(self.decoder[i] for i in ids)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size))
            raise ValueError(f"token id {bad!r} is not in this vocabulary (ids 0..{self.vocab_size - 1})") from None
        return data.decode("utf-8", errors="replace")

    # --- tiktoken export: its Rust encoder gives the same ids, ~10x faster

    def to_tiktoken(self, name: str = "llm-from-scratch-bpe"):
        import tiktoken

        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=dict(self.ranks),
                                 special_tokens=dict(self.special_tokens))

    # --- save and load: a small dict of strings, ints and lists, as a JSON file or inside a checkpoint

    def to_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain str/int/list/dict: JSON can write it, and
        train.py stores it in ckpt.pt, where torch.load(..., weights_only=True) accepts it."""
        return {"format": FILE_FORMAT, "version": 1, "pattern": self.pattern,
                "special_tokens": list(self.special_tokens), "merges": [list(pair) for pair in self.merges]}

    @classmethod
    def from_dict(cls, state) -> Tokenizer:
        """The tokenizer that to_dict() described; a ValueError says what is wrong with a malformed dict."""
        try:
            if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
                raise ValueError(f"it has no \"format\": \"{FILE_FORMAT}\" field")
            merges, specials = state["merges"], state["special_tokens"]
            if not isinstance(merges, list) or not all(
                    isinstance(m, list) and len(m) == 2 and all(type(i) is int for i in m) for m in merges):
                raise ValueError("\"merges\" must be a list of [id, id] pairs")
            if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
                raise ValueError("\"special_tokens\" must be a list of strings")
            if not isinstance(state["pattern"], str):
                raise ValueError("\"pattern\" must be a string (a regular expression)")
            return cls(merges, specials, state["pattern"])
        except (ValueError, KeyError, regex.error) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"not a valid tokenizer: {reason}") from err

    def save(self, path) -> None:
        """Write the tokenizer as JSON, atomically (temp file + os.replace): a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"))
            os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a tokenizer can be world-readable
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; train one with part04_scaling.bpe.get_tokenizer() "
                                    "or train(...).save(path)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:  # also a JSON syntax error (json.JSONDecodeError) or bytes that are not UTF-8
            reason = str(err).removeprefix("not a valid tokenizer: ")
            raise ValueError(f"{path} is not a valid tokenizer file ({reason}); delete it and train again") from err


# --- 5. A cached tokenizer for the later chapters --------------------------------------------------------


def get_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, data: str = "shakespeare", cache_dir=DATA_DIR,
                  verbose: bool | None = None) -> Tokenizer:
    """The BPE tokenizer of `data`'s training split (the first 90%), trained once and cached as JSON.

    Trained on the training split only, so the validation text is as new to the tokenizer as it is to
    the model. The cache file name holds a hash of the text: a different corpus gets its own file.
    A malformed cache file is deleted and rebuilt.

    Why 2048 by default: on this corpus it gives 2.9 bytes per token on the validation text (bytes: 1.0,
    1024: 2.5, 4096: 3.2; bench_bpe.py), so a 256-token context holds ~740 characters instead of 256. Doubling
    to 4096 compresses only 11% more but doubles the embedding, which a ~1M-parameter model pays for in
    parameters (vocab_size * n_embd, tied with the lm_head: 2048 x 128 = 262k, a quarter of the model) and
    in compute (the lm_head's 2 * vocab_size * n_embd FLOPs per token); and in a 10-minute CPU run each rare
    token is seen too few times to learn much. 2048 is also a multiple of 64, which matrix kernels like.
    """
    text = load_text(data)
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    path = Path(cache_dir) / f"bpe_{Path(data).stem}_{vocab_size}_{digest}.json"
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except ValueError as err:
            warnings.warn(f"{err}: rebuilding it")
            path.unlink()
    tokenizer = train(train_val_split(text)[0], vocab_size, verbose=verbose)
    tokenizer.save(path)
    return tokenizer
