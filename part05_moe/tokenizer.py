"""The tokenizer from part 4 on: the byte-level BPE of part04_scaling/bpe.py, run through tiktoken for speed.

Part 5 re-uses part 4's BPE as it is (imported from part04_scaling, the chapter that teaches it, rather
than copied): the same vocabulary and the same cached tokenizer file, so the losses are comparable.

Part 3 had one token per byte (vocab 256). Now a token is a whole frequent chunk: " Romeo", "ing",
"\n\n"; ~2.9 bytes per token on average at vocab 2048, so the same block_size sees ~3x more text.
train.py trains the tokenizer on the training split (cached in data/), stores it inside the checkpoint
(the ids mean nothing without it) and saves a copy as out_dir/tokenizer.json; generate.py and the later
chapters load it with load_tokenizer (the checkpoint's copy; tokenizer.json for a checkpoint without one).

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


def load_tokenizer(out_dir, checkpoint: dict | None = None) -> Tokenizer:
    """The tokenizer of the run in out_dir: the copy inside its checkpoint if given (train.py stores it
    there as checkpoint["tokenizer"], so the two cannot be separated), else out_dir/tokenizer.json.

    With a checkpoint, the tokenizer's vocabulary must have the model's size: another run's tokenizer
    would turn the model's ids into the wrong text, or into ids that do not exist.
    """
    if checkpoint is not None and "tokenizer" in checkpoint:
        try:
            tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
        except ValueError as err:
            raise ValueError(f"{Path(out_dir) / 'ckpt.pt'}: {err}") from err
    else:
        path = Path(out_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; train a model first: python part05_moe/train.py")
        tokenizer = Tokenizer.load(path)
    model_vocab_size = checkpoint["model_config"]["vocab_size"] if checkpoint is not None else None
    if model_vocab_size is not None and tokenizer.vocab_size != model_vocab_size:
        source = "the tokenizer stored in it" if "tokenizer" in checkpoint else str(path)
        raise ValueError(f"{Path(out_dir) / 'ckpt.pt'} holds a model with vocab_size {model_vocab_size}, but "
                         f"{source} has {tokenizer.vocab_size} tokens: they are not from the same run; "
                         "put the run's own tokenizer.json beside its ckpt.pt, or train again")
    return tokenizer
