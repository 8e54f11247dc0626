"""The tokenizer from part 4 on: the byte-level BPE of part04_scaling/bpe.py, run through tiktoken for speed.

Part 5 re-uses part 4's BPE as it is (imported from part04_scaling, the chapter that teaches it, rather
than copied): the same vocabulary and the same cached tokenizer file, so the losses are comparable.

Part 3 had one token per byte (vocab 256). Now a token is a whole frequent chunk: " Romeo", "ing",
"\n\n"; ~2.9 bytes per token on average at vocab 2048, so the same block_size sees ~3x more text.
train.py trains the tokenizer on the training split (cached in data/) and saves a copy as
out_dir/tokenizer.json beside the checkpoint; generate.py and the later chapters load it from there.

Encoding a whole corpus goes through tiktoken's Rust encoder (the same ids as bpe.Tokenizer.encode,
tested on the whole corpus, ~20x faster); decoding is a lookup of each id's bytes either way.
"""
from pathlib import Path

import numpy as np
import torch

from part04_scaling.bpe import Tokenizer, get_tokenizer  # noqa: F401  (part 4's BPE; get_tokenizer: for train.py)


def encode_tensor(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The ids of a whole text as a 1-D int32 tensor, encoded by tiktoken (special tokens allowed)."""
    ids = tokenizer.to_tiktoken().encode(text, allowed_special="all")
    return torch.from_numpy(np.array(ids, dtype=np.int32))


def load_tokenizer(out_dir) -> Tokenizer:
    """The tokenizer train.py saved beside its checkpoint."""
    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; train a model first: python part05_moe/train.py")
    return Tokenizer.load(path)
