"""Sample text from a model that train.py saved (out_dir/ckpt.pt).

    python part02_tiny_llm/sample.py                                   # 3 samples from the main run
    python part02_tiny_llm/sample.py --start "ROMEO:" --temperature 0.5
    python part02_tiny_llm/sample.py --top_k 5 --top_p none            # only the 5 likeliest bytes
    python part02_tiny_llm/sample.py --temperature 0                   # greedy: always the likeliest
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch

from part02_tiny_llm.model import GPT, GPTConfig
from part02_tiny_llm.tokenizer import decode, encode
from shared.config import parse_config
from shared.device import pick_device


@dataclass
class SampleConfig:
    out_dir: str = field(default="runs/part02_tiny_llm", metadata={"help": "folder holding ckpt.pt"})
    start: str = field(default="\n", metadata={"help": "the prompt every sample continues; default: a newline"})
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = field(default=0.8, metadata={"help": "< 1 sharper, > 1 flatter, 0 = greedy"})
    top_k: int | None = field(default=None, metadata={"help": "keep the k likeliest tokens; none = off"})
    top_p: float | None = field(default=0.95, metadata={"help": "nucleus sampling; none = off"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})


def load_model(ckpt_path, device: str = "cpu") -> GPT:
    """Rebuild the GPT that train.py saved: its config, then its weights."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first: python part02_tiny_llm/train.py")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def generate_text(model: GPT, start: str, num_samples: int, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> list[str]:
    """num_samples continuations of the prompt `start`, sampled as one batch; each includes the prompt."""
    if not start:
        raise ValueError("the prompt (--start) is empty; give the model at least one character, e.g. a newline")
    device = next(model.parameters()).device
    prompt = torch.tensor([encode(start)] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    out = model.generate(prompt, max_new_tokens, temperature, top_k, top_p)
    return [decode(row) for row in out]


def main(argv=None) -> list[str]:
    cfg = parse_config(SampleConfig, argv, description=__doc__.splitlines()[0])
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(Path(cfg.out_dir) / "ckpt.pt", device)
    samples = generate_text(model, cfg.start, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                            cfg.top_p)
    for sample in samples:
        print(sample + "\n" + "-" * 80)
    return samples


if __name__ == "__main__":
    main()
