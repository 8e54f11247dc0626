"""Benchmark our BPE: the fast trainer against the naive one, our encoder against tiktoken, and compression.

Four measurements, printed as tables (and saved as JSON with --out):
  1. training time of train() and train_naive() on the same text (they must learn the same merges);
  2. train() on the first 1.1 MB (the size of TinyShakespeare) and on the whole corpus;
  3. encoding throughput in MB/s: our pure-Python encoder against tiktoken's Rust one, on the whole
     corpus, checking that both give the same ids;
  4. compression on the validation split (bytes per token) for several vocabulary sizes, from one
     tokenizer trained on the training split: BPE is greedy, so the first k merges of a big vocabulary
     are exactly the merges of a vocabulary with k merges.

    python part04_scaling/bench_bpe.py                           # ~2 min on a 2-core CPU
    python part04_scaling/bench_bpe.py --naive_bytes 1100000     # the naive trainer on 1.1 MB too (~15 min)
    python part04_scaling/bench_bpe.py --no-naive                # skip the naive trainer
"""
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

from part04_scaling.bpe import Tokenizer, train, train_naive
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split


@dataclass
class BenchConfig:
    data: str = field(default="shakespeare", metadata={"help": "shakespeare, tinyshakespeare or a UTF-8 text file"})
    small_bytes: int = field(default=1_100_000, metadata={"help": "train on the first this many bytes (the size of "
                                                                   "TinyShakespeare)", "min": 1})
    small_vocab_sizes: str = field(default="512,1024", metadata={"help": "comma-separated vocab sizes for those"})
    naive: bool = field(default=True, metadata={"help": "also time the naive trainer, on --naive_bytes of text"})
    naive_bytes: int = field(default=110_000, metadata={"help": "text for naive vs fast; the naive trainer needs "
                                                                "~0.7 s per merge per MB of text", "min": 1})
    full_vocab_size: int = field(default=4096, metadata={"help": "vocab size for training on the whole text",
                                                         "min": 257})
    compression_vocab_sizes: str = field(default="256,512,1024,2048,4096,8192",
                                         metadata={"help": "vocab sizes (bytes + merges) for the compression table"})
    repeats: int = field(default=3, metadata={"help": "tiktoken encodes this many times; we report the fastest",
                                              "min": 1})
    out: str | None = field(default="runs/part04_scaling/bench_bpe.json", metadata={"help": "JSON results; none = "
                                                                                           "don't write"})


def head(text: str, n_bytes: int) -> str:
    """The first n_bytes of text's UTF-8 (a character cut in two is dropped)."""
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def check_config(cfg: BenchConfig) -> None:
    # The trained tokenizers hold the 256 bytes and <|endoftext|>; the compression table's, the bytes only.
    for flag, text, smallest in (("--small_vocab_sizes", cfg.small_vocab_sizes, 257),
                                 ("--compression_vocab_sizes", cfg.compression_vocab_sizes, 256)):
        try:
            values = sizes(text)
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
        if min(values, default=smallest) < smallest or (flag == "--compression_vocab_sizes" and not values):
            raise ValueError(f"{flag} must list vocabulary sizes >= {smallest}, got {text!r}")


def main(argv=None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    text = load_text(cfg.data)
    results = dict(config=asdict(cfg), training=[], encoding={}, compression=[])

    # 1 + 2. Training time
    naive_text, small_text = head(text, cfg.naive_bytes), head(text, cfg.small_bytes)
    for vocab_size in sizes(cfg.small_vocab_sizes):
        if cfg.naive:
            naive_tok, naive_s = timed(train_naive, naive_text, vocab_size, verbose=True)
            fast_tok, fast_s = timed(train, naive_text, vocab_size, verbose=False)
            if naive_tok.merges != fast_tok.merges:
                raise AssertionError(f"train and train_naive learned different merges at vocab {vocab_size}")
            results["training"].append(dict(trainer="naive", text_bytes=len(naive_text.encode()), vocab_size=vocab_size,
                                            seconds=naive_s, speedup=naive_s / fast_s))
            results["training"].append(dict(trainer="fast", text_bytes=len(naive_text.encode()), vocab_size=vocab_size,
                                            seconds=fast_s))
        if not cfg.naive or len(small_text) != len(naive_text):
            _, fast_s = timed(train, small_text, vocab_size, verbose=False)
            results["training"].append(dict(trainer="fast", text_bytes=len(small_text.encode()), vocab_size=vocab_size,
                                            seconds=fast_s))
    tokenizer, fast_s = timed(train, text, cfg.full_vocab_size, verbose=True)
    results["training"].append(dict(trainer="fast", text_bytes=len(text.encode()), vocab_size=cfg.full_vocab_size,
                                    seconds=fast_s))

    # 3. Encoding throughput, ours vs tiktoken, on the whole text
    n_bytes = len(text.encode("utf-8"))
    ours, ours_s = timed(tokenizer.encode, text)
    encoding = tokenizer.to_tiktoken()
    reference, tiktoken_s = min((timed(encoding.encode, text, allowed_special="all") for _ in range(cfg.repeats)),
                                key=lambda result: result[1])
    results["encoding"] = dict(text_bytes=n_bytes, tokens=len(ours), identical=ours == reference,
                               ours_mb_per_s=n_bytes / ours_s / 1e6, tiktoken_mb_per_s=n_bytes / tiktoken_s / 1e6)

    # 4. Compression on the validation split; tokenizers trained on the training split only
    train_text, val_text = train_val_split(text)
    val_bytes = len(val_text.encode("utf-8"))
    compression_sizes = sizes(cfg.compression_vocab_sizes)
    biggest = train(train_text, max(compression_sizes), special_tokens=(), verbose=True)
    for vocab_size in compression_sizes:
        truncated = Tokenizer(biggest.merges[:vocab_size - 256], special_tokens=())
        n_tokens = len(truncated.to_tiktoken().encode_ordinary(val_text))
        results["compression"].append(dict(vocab_size=vocab_size, val_tokens=n_tokens,
                                           bytes_per_token=val_bytes / n_tokens))

    print(f"\nBPE training ({cfg.data}; one run each, wall-clock seconds)")
    print(f"{'trainer':>8} {'text MB':>8} {'vocab':>6} {'seconds':>9} {'speed-up':>9}")
    for row in results["training"]:
        speedup = f"{row['speedup']:8.0f}x" if "speedup" in row else ""
        print(f"{row['trainer']:>8} {row['text_bytes'] / 1e6:8.2f} {row['vocab_size']:6d} {row['seconds']:9.2f} "
              f"{speedup:>9}")
    enc = results["encoding"]
    print(f"\nEncoding {enc['text_bytes'] / 1e6:.2f} MB with vocab {cfg.full_vocab_size} ({enc['tokens']:,} tokens): "
          f"ours {enc['ours_mb_per_s']:.2f} MB/s, tiktoken {enc['tiktoken_mb_per_s']:.2f} MB/s; "
          f"identical ids: {enc['identical']}")
    print(f"\nCompression of the validation split ({val_bytes / 1e6:.2f} MB), trained on the training split")
    print(f"{'vocab':>6} {'tokens':>9} {'bytes/token':>12}")
    for row in results["compression"]:
        print(f"{row['vocab_size']:6d} {row['val_tokens']:9,d} {row['bytes_per_token']:12.2f}")
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    run_cli(main)
