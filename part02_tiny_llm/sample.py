"""Sample text from a model that train.py saved (out_dir/ckpt.pt).

    python part02_tiny_llm/sample.py                                   # 3 samples from the main run
    python part02_tiny_llm/sample.py --start "ROMEO:" --temperature 0.5
    python part02_tiny_llm/sample.py --top_k 5 --top_p none            # only the 5 likeliest bytes
    python part02_tiny_llm/sample.py --temperature 0                   # greedy: always the likeliest
    python part02_tiny_llm/sample.py --num_samples 1 --max_new_tokens 100000   # long: a progress bar on stderr
"""
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part02_tiny_llm.model import GPT, GPTConfig, sample_next_token
from part02_tiny_llm.tokenizer import decode, encode
from shared.config import parse_config, run_cli
from shared.device import pick_device


@dataclass
class SampleConfig:
    out_dir: str = field(default="runs/part02_tiny_llm", metadata={"help": "folder holding ckpt.pt"})
    start: str = field(default="\n", metadata={"help": "the prompt every sample continues; default: a newline"})
    num_samples: int = field(default=3, metadata={"help": "samples, generated side by side as one batch", "min": 1})
    max_new_tokens: int = field(default=500, metadata={"help": "bytes to generate per sample", "min": 1})
    temperature: float = field(default=0.8, metadata={"help": "< 1 sharper, > 1 flatter, 0 = greedy", "min": 0})
    top_k: int | None = field(default=None, metadata={"help": "keep the k likeliest tokens (1 = greedy); none = off",
                                                      "min": 1})
    top_p: float | None = field(default=0.95, metadata={"help": "nucleus sampling, a probability mass in (0, 1]; "
                                                                "none = off", "max": 1})
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
        raise FileNotFoundError(f"no checkpoint at {path}; train one first: python part02_tiny_llm/train.py")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


@torch.no_grad()
def generate_text(model: GPT, start: str, num_samples: int, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, progress: bool = False) -> list[str]:
    """num_samples continuations of the prompt `start`, sampled as one batch; each includes the prompt.

    The same tokens as model.generate (the same forward passes, the same random draws), but its
    torch.cat((idx, idx_next)) copies the whole text at every step, so its cost grows with the square of
    the length. Here the model gets only the last block_size tokens (all it can see anyway) and each new
    byte goes into an output buffer allocated once, 1 byte per token: the cost grows linearly, so long
    texts work. progress=True shows a progress bar (on stderr).
    """
    if not start:
        raise ValueError("the prompt (--start) is empty; give the model at least one character, e.g. a newline")
    device = next(model.parameters()).device
    prompt = torch.tensor([encode(start)] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    T = prompt.size(1)
    out = torch.empty(num_samples, T + max_new_tokens, dtype=torch.uint8, device=device)
    out[:, :T] = prompt
    context = prompt[:, -model.config.block_size :]  # the model sees at most block_size tokens
    for t in tqdm(range(T, T + max_new_tokens), desc="sample", unit="tok", disable=not progress, dynamic_ncols=True):
        logits, _ = model(context)
        idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)  # (num_samples, 1)
        out[:, t] = idx_next[:, 0]
        context = torch.cat((context, idx_next), dim=1)[:, -model.config.block_size :]  # a bounded copy per step
    return [decode(row) for row in out]


def main(argv=None) -> list[str]:
    cfg = parse_config(SampleConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(Path(cfg.out_dir) / "ckpt.pt", device)
    samples = generate_text(model, cfg.start, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                            cfg.top_p, progress=True)
    for sample in samples:
        print(sample + "\n" + "-" * 80)
    return samples


if __name__ == "__main__":
    run_cli(main)
