"""Loss of trained runs on the WHOLE validation split, to compare runs fairly.

train.py's `val loss` averages 40 random batches: fine for a curve, noisy for a comparison of two runs
that differ by a few hundredths of a nat. Here every token of the validation split is scored once, in
non-overlapping windows of the model's block_size, in eval mode (no capacity dropping), with the
tokenizer and the data stored in each run's checkpoint. An equal-size slice from the start of the
training split is scored too: the gap between the two is what the model memorised.

    python part05_moe/eval_full_val.py                                      # runs/part05_moe
    python part05_moe/eval_full_val.py --run_dirs runs/a,runs/b --threads 1  # several runs, one table

Writes full_val.json into each run folder.
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
from tqdm import tqdm

from part05_moe.generate import load_run
from part05_moe.tokenizer import encode_tensor
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split


@dataclass
class EvalConfig:
    run_dirs: str = field(default="runs/part05_moe", metadata={"help": "comma-separated train.py run folders "
                                                                          "(each with its ckpt.pt)"})
    batch_size: int = field(default=32, metadata={"help": "windows per forward pass", "min": 1})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})


@torch.no_grad()
def windows_loss(model, data: torch.Tensor, block_size: int, batch_size: int) -> float:
    """Mean next-token loss (nats) over data cut into non-overlapping block_size windows; the tail that does
    not fill a window is left out."""
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size).long()
    y = data[1 : n * block_size + 1].view(n, block_size).long()
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc="windows", leave=False, dynamic_ncols=True):
        _, loss = model(x[i : i + batch_size], y[i : i + batch_size])  # mean over the batch's tokens
        total += loss.item() * x[i : i + batch_size].numel()
    return total / (n * block_size)


def main(argv=None) -> list[dict]:
    cfg = parse_config(EvalConfig, argv, description=__doc__.splitlines()[0])
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    splits = {}  # (tokenizer, data) -> (train, val): runs that share them encode the corpus once
    rows = []
    for run_dir in [Path(d.strip()) for d in cfg.run_dirs.split(",") if d.strip()]:
        model, tokenizer, checkpoint = load_run(run_dir)
        data_name = checkpoint["train_config"]["data"]
        key = (json.dumps(checkpoint.get("tokenizer"), sort_keys=True), data_name)
        if key not in splits:
            splits[key] = train_val_split(encode_tensor(tokenizer, load_text(data_name)))
        train_data, val_data = splits[key]
        block_size = model.config.block_size
        row = dict(run=str(run_dir), iter=checkpoint["iter_num"], params=model.num_params(),
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
