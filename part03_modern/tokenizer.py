"""A byte-level tokenizer: one token per byte of the text's UTF-8 encoding.

The vocabulary is the 256 possible byte values, so nothing is ever out of vocabulary: any string,
in any script, with emoji, encodes. ASCII letters are one token each; "é" is two tokens (0xC3 0xA9),
"€" three, most emoji four. GPT-2's BPE tokenizer starts from the same 256 bytes and then merges
frequent pairs into longer tokens (a later chapter); here we stop at the bytes, so the model learns spelling too.

Decoding can meet byte sequences that are not valid UTF-8: a model can sample 0xC3 and then a byte
that cannot follow it, or stop in the middle of a character. We decode with errors="replace", so each
broken sequence becomes U+FFFD (the "?" diamond) instead of an exception in the middle of sampling.

Encoding can meet a str that has no UTF-8 at all: one with lone surrogates (U+D800..U+DFFF). Python makes
them out of bytes that are not UTF-8, e.g. a prompt typed as $'\xff' in a shell arrives in sys.argv as
"\udcff". Like tiktoken and part 4's BPE, we encode each lone surrogate as U+FFFD instead of crashing.
"""
import numpy as np
import torch

VOCAB_SIZE = 256  # every byte value 0..255 is a token


def utf8(text: str) -> bytes:
    """text's UTF-8 bytes; a lone surrogate (no UTF-8 exists for it) becomes U+FFFD, as in tiktoken."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def encode(text: str) -> list[int]:
    """Text -> token ids in 0..255 (its UTF-8 bytes). decode(encode(s)) == s for every string s without
    lone surrogates."""
    return list(utf8(text))


def decode(tokens) -> str:
    """Token ids (a list or a 1-D tensor of ints in 0..255) -> text. Invalid UTF-8 becomes U+FFFD."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    return bytes(tokens).decode("utf-8", errors="replace")


def encode_tensor(text: str) -> torch.Tensor:
    """The same ids as encode(text), as a uint8 tensor: fast for a whole corpus (1 byte per token)."""
    return torch.from_numpy(np.frombuffer(utf8(text), dtype=np.uint8).copy())  # copy: writable
