"""Loss of trained part 2 and part 3 runs (and, optionally, of nanoGPT) on the WHOLE validation split.

train.py's `val loss` averages 50 batches of random windows: fine for a curve, noisy for comparing two runs
that differ by a few hundredths of a nat. Here every byte of the validation split is scored once, in
non-overlapping windows of the model's block_size, in eval mode. An equal-size slice from the start of the
training split is scored too: the gap between the two is what the model memorised.

    python part03_modern/eval_full_val.py --run_dirs runs/part02_tiny_llm,runs/part03_modern

nanoGPT (https://github.com/karpathy/nanoGPT) on the same bytes, to compare the code itself: write the corpus in
its format, train it at part 2's settings (README), then score its checkpoint here with the same windows:

    python part03_modern/eval_full_val.py --write_nanogpt_data ../nanoGPT/data/shakespeare_bytes
    python part03_modern/eval_full_val.py --run_dirs runs/part02_tiny_llm \\
        --nanogpt_dir ../nanoGPT --nanogpt_ckpt ../nanoGPT/out-bytes/ckpt.pt

Writes full_val.json into each run folder.
"""
import importlib.util
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import numpy as np
import torch
from tqdm import tqdm

from part02_tiny_llm.sample import load_model as load_part2_model
from part03_modern.generate import load_model as load_part3_model
from part03_modern.tokenizer import VOCAB_SIZE, encode_tensor
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split


@dataclass
class EvalConfig:
    run_dirs: str = field(default="runs/part02_tiny_llm,runs/part03_modern", metadata={
        "help": "comma-separated part 2 or part 3 train.py run folders (each with its ckpt.pt); empty = none"})
    data: str = field(default="shakespeare", metadata={"help": "the corpus the runs trained on (train.py --data)"})
    batch_size: int = field(default=32, metadata={"help": "windows per forward pass", "min": 1})
    nanogpt_dir: str | None = field(default=None, metadata={"help": "a nanoGPT checkout, for --nanogpt_ckpt"})
    nanogpt_ckpt: str | None = field(default=None, metadata={"help": "a nanoGPT ckpt.pt trained on "
                                                                     "--write_nanogpt_data's files: scored too"})
    write_nanogpt_data: str | None = field(default=None, metadata={
        "help": "write the corpus as nanoGPT's train.bin, val.bin and meta.pkl (bytes, our split) into this "
                "folder, then stop"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})


@torch.no_grad()
def windows_loss(model, data: torch.Tensor, block_size: int, batch_size: int) -> float:
    """Mean next-byte loss (nats) over data cut into non-overlapping block_size windows; the tail that does
    not fill a window is left out. model(x, y) -> (logits, mean loss), as in our GPTs and nanoGPT's."""
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size).long()
    y = data[1 : n * block_size + 1].view(n, block_size).long()
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc="windows", leave=False, dynamic_ncols=True):
        _, loss = model(x[i : i + batch_size], y[i : i + batch_size])  # mean over the batch's tokens
        total += loss.item() * x[i : i + batch_size].numel()
    return total / (n * block_size)


def load_run(run_dir: Path):
    """The model a part 2 or part 3 train.py saved in run_dir: part 3's config has key/value heads."""
    ckpt = run_dir / "ckpt.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; train one first: python part02_tiny_llm/train.py or "
                                "python part03_modern/train.py")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    part3 = "n_kv_head" in checkpoint["model_config"]
    return (load_part3_model if part3 else load_part2_model)(ckpt), checkpoint["iter_num"]


def write_nanogpt_data(folder: Path, train: torch.Tensor, val: torch.Tensor) -> None:
    """nanoGPT's character-level format: the token ids as uint16 in train.bin / val.bin, and meta.pkl with the
    vocabulary (its train.py reads the size, its sample.py the tables). Our ids are the UTF-8 bytes, split as
    our train.py splits; sample.py shows each byte as one character (Latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    train.numpy().astype(np.uint16).tofile(folder / "train.bin")
    val.numpy().astype(np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": VOCAB_SIZE, "itos": {i: chr(i) for i in range(VOCAB_SIZE)},
                     "stoi": {chr(i): i for i in range(VOCAB_SIZE)}}, f)


def load_nanogpt(nanogpt_dir: Path, ckpt_path: Path):
    """nanoGPT's GPT from its own model.py, with the weights of a checkpoint its train.py saved."""
    model_file = nanogpt_dir / "model.py"
    if not model_file.is_file() or not ckpt_path.is_file():
        raise FileNotFoundError(f"need nanoGPT's {model_file} and a checkpoint at {ckpt_path}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", model_file)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = nanogpt.GPT(nanogpt.GPTConfig(**checkpoint["model_args"]))
    # a torch.compile'd model saves its weights under _orig_mod.
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    return model.eval(), checkpoint["iter_num"]


def main(argv=None) -> list[dict]:
    cfg = parse_config(EvalConfig, argv, description=__doc__.splitlines()[0])
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    train_data, val_data = train_val_split(encode_tensor(load_text(cfg.data)))
    if cfg.write_nanogpt_data:
        write_nanogpt_data(Path(cfg.write_nanogpt_data), train_data, val_data)
        print(f"wrote {len(train_data):,} train and {len(val_data):,} val bytes to {cfg.write_nanogpt_data}")
        return []
    if (cfg.nanogpt_dir is None) != (cfg.nanogpt_ckpt is None):
        raise ValueError("--nanogpt_dir and --nanogpt_ckpt go together")
    runs = [(Path(d.strip()), *load_run(Path(d.strip()))) for d in cfg.run_dirs.split(",") if d.strip()]
    if cfg.nanogpt_ckpt:  # its results go next to its checkpoint
        runs.append((Path(cfg.nanogpt_ckpt).parent, *load_nanogpt(Path(cfg.nanogpt_dir), Path(cfg.nanogpt_ckpt))))
    rows = []
    for run_dir, model, iter_num in runs:
        block_size = model.config.block_size
        row = dict(run=str(run_dir), iter=iter_num, params=sum(p.numel() for p in model.parameters()),
                   full_val_loss=windows_loss(model, val_data, block_size, cfg.batch_size),
                   train_slice_loss=windows_loss(model, train_data[: len(val_data)], block_size, cfg.batch_size),
                   val_tokens=(len(val_data) - 1) // block_size * block_size)
        (run_dir / "full_val.json").write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
    print("| run | steps | params | val loss, whole split | train loss, same-size slice |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['run']} | {row['iter']:,} | {row['params']:,} | {row['full_val_loss']:.4f} | "
              f"{row['train_slice_loss']:.4f} |")
    return rows


if __name__ == "__main__":
    run_cli(main)
