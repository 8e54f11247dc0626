"""Generate text from a model that train.py saved (out_dir/ckpt.pt), streaming with the KV cache.

The cache is a rolling buffer (see KVCache in model.py): its memory stays the same however many
tokens we generate, so this can run for as long as you like.

    python part03_modern/generate.py                                   # 2000 bytes, with a progress bar
    python part03_modern/generate.py --stream --max_new_tokens 20000   # print the text as it comes
    python part03_modern/generate.py --no-use_cache                    # recompute everything: slow
    python part03_modern/generate.py --start "ROMEO:" --temperature 0.5
"""
import codecs
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part03_modern.model import GPT, GPTConfig
from part03_modern.tokenizer import decode, encode
from shared.config import parse_config, run_cli
from shared.device import pick_device


@dataclass
class GenerateConfig:
    out_dir: str = field(default="runs/part03_modern", metadata={"help": "folder holding ckpt.pt"})
    start: str = field(default="\n", metadata={"help": "the prompt to continue; default: a newline"})
    max_new_tokens: int = field(default=2000, metadata={"help": "bytes to generate", "min": 1})
    temperature: float = field(default=0.8, metadata={"help": "< 1 sharper, > 1 flatter, 0 = greedy", "min": 0})
    top_k: int | None = field(default=None, metadata={"help": "keep the k likeliest tokens (1 = greedy); none = off",
                                                      "min": 1})
    top_p: float | None = field(default=0.95, metadata={"help": "nucleus sampling, a probability mass in (0, 1]; "
                                                                "none = off", "max": 1})
    use_cache: bool = field(default=True, metadata={"help": "KV cache (rolling buffer); off = recompute each step"})
    stream: bool = field(default=False, metadata={"help": "print the text as it is generated (no progress bar)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})


def check_config(cfg) -> None:
    """The rules min/max cannot say. (--top_k 0 and --top_p 0 would keep no token at all: refused; greedy
    decoding is --temperature 0, or --top_k 1.)"""
    if cfg.top_p is not None and cfg.top_p <= 0:
        raise ValueError(f"--top_p must be in (0, 1], got {cfg.top_p}; --top_p none turns nucleus sampling off")
    if not math.isfinite(cfg.temperature):
        raise ValueError(f"--temperature must be a finite number >= 0, got {cfg.temperature}")


def load_model(ckpt_path, device: str = "cpu") -> GPT:
    """Rebuild the GPT that train.py saved: its config, then its weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first: python part03_modern/train.py")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def prompt_tensor(model: GPT, start: str, num_samples: int = 1) -> torch.Tensor:
    if not start:
        raise ValueError("the prompt (--start) is empty; give the model at least one character, e.g. a newline")
    device = next(model.parameters()).device
    return torch.tensor([encode(start)] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)


def generate_text(model: GPT, start: str, num_samples: int, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> list[str]:
    """num_samples continuations of the prompt `start`, sampled as one batch; each includes the prompt."""
    out = model.generate(prompt_tensor(model, start, num_samples), max_new_tokens, temperature, top_k, top_p)
    return [decode(row) for row in out]


def main(argv=None) -> dict:
    cfg = parse_config(GenerateConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(Path(cfg.out_dir) / "ckpt.pt", device)
    kv_cache = model.new_kv_cache(batch_size=1) if cfg.use_cache else None
    prompt = prompt_tensor(model, cfg.start)
    tokens = model.stream(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          use_cache=cfg.use_cache, kv_cache=kv_cache)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span several bytes
    start = decode(prompt[0])  # the prompt as the model sees it: a lone surrogate ($'\xff') is U+FFFD
    pieces = [start]
    if cfg.stream:
        sys.stdout.write(start)
    else:
        tokens = tqdm(tokens, total=cfg.max_new_tokens, desc="generate", unit="tok", dynamic_ncols=True)
    begin = time.perf_counter()
    for token in tokens:
        piece = utf8.decode(bytes([token.item()]))
        pieces.append(piece)
        if cfg.stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    seconds = time.perf_counter() - begin
    text = "".join(pieces) + utf8.decode(b"", final=True)
    if not cfg.stream:
        print(text)
    cache_kib = sum(layer.nbytes() for layer in kv_cache) / 2**10 if kv_cache else 0.0
    print(f"\n{'-' * 80}\n{cfg.max_new_tokens} tokens in {seconds:.1f} s = {cfg.max_new_tokens / seconds:,.0f} tokens/s"
          + (f"; KV cache {cache_kib:,.0f} KiB (a rolling buffer: the same size from the first token to the last)"
             if kv_cache else "; no KV cache"))
    return dict(text=text, seconds=seconds, tokens_per_sec=cfg.max_new_tokens / seconds, cache_kib=cache_kib)


if __name__ == "__main__":
    run_cli(main)
