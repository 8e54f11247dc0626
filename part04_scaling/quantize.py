"""Int8 weight quantization for inference: Linear weights in 1 byte instead of 4, nearly the same loss.

A trained float32 weight matrix is stored as int8 numbers plus one float scale per output channel
(per row): w ~= w_int8 * scale, with scale = max|row| / 127 (symmetric "absmax" quantization, as in
LLM.int8(), Dettmers et al. 2022, https://arxiv.org/abs/2208.07339, without its outlier handling; and
the per-channel weight quantization of Jacob et al. 2017, https://arxiv.org/abs/1712.05877). Weights
shrink 4x; what it costs in validation loss, and what it does to speed on your machine, the script
measures: on a laptop CPU the answer about speed is often "nothing good" (see the README).

Variants, each a copy of the checkpoint's model:
- fp32: the model as trained;
- int8: every Linear of the blocks -> Int8Linear; forward = F.linear(x, w_int8.to(x.dtype)) * scale,
  the clear version: it converts the weight back to float on every call, so it saves memory, not time;
- int8_head: the same, plus an int8 copy of the tied lm_head (see quantize_model);
- int8pack: Int8Linear calling torch._weight_int8pack_mm, PyTorch's fused int8-weight matmul (private API);
- dynamic: torch.ao.quantization.quantize_dynamic (deprecated), the reference: int8 weights *and*
  activations (quantized on the fly per batch), int8 x int8 matmuls in fbgemm/oneDNN.

    python part04_scaling/quantize.py                              # the checkpoint of train.py
    python part04_scaling/quantize.py --out_dir runs/part04_dev --new_tokens 500
    python part04_scaling/quantize.py --variants fp32,int8,dynamic --threads 2

Prints a markdown table and writes quantize.json into --out_dir.
"""
import copy
import functools
import io
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from part04_scaling.generate import load_run, prompt_tensor
from part04_scaling.model import GPT
from part04_scaling.tokenizer import encode_tensor
from part04_scaling.train import TrainConfig, estimate_loss, get_batch
from shared.config import parse_config, run_cli
from shared.data import load_text, train_val_split
from shared.device import pick_device, synchronize

# --- Quantizing a weight matrix --------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (out, in) int8 weight and (out,) float32 scale, weight ~= w_int8 * scale[:, None].

    Symmetric absmax, per output channel: each row gets its own scale, max|row| / 127, so its largest
    entry maps to +-127 and 0 stays exactly 0. One scale for the whole matrix (per tensor) would let
    a single large row set the step size for all the others and round their small weights to a few
    levels; per row, each row uses all 255 levels. The rounding error is at most scale / 2 per entry.
    """
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127  # (out,)
    # an all-zero row has scale 0: divide by a tiny number instead, the row stays 0
    w_int8 = torch.round(weight / scale.clamp(min=1e-12)[:, None]).clamp(-127, 127).to(torch.int8)
    return w_int8, scale


def dequantize_weight(w_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float weight that int8 values and their per-row scales stand for: (out, in) float32."""
    return w_int8.float() * scale[:, None]


@functools.cache
def int8pack_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Does torch._weight_int8pack_mm exist here and compute x @ (w_int8 * scale).T on this device and dtype?

    It is a private PyTorch op (aten::_weight_int8pack_mm(Tensor x, Tensor w_int8, Tensor scales): x (M, K)
    2-D, w_int8 (N, K), scales (N,) in x's dtype -> (M, N)); private ops change or vanish between
    releases, so we test it once on a small case against the clear version and fall back if it fails.
    """
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=gen).to(device_type, dtype)
    w_int8 = torch.randint(-127, 128, (16, 32), generator=gen, dtype=torch.int8).to(device_type)
    scale = torch.rand(16, generator=gen).to(device_type, dtype)
    try:
        y = torch._weight_int8pack_mm(x, w_int8, scale)
    except (RuntimeError, NotImplementedError):
        return False
    expected = F.linear(x.float(), w_int8.float()) * scale.float()
    return y.shape == expected.shape and torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2)


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with one float32 scale per output channel.

    Buffers, not parameters: this module is for inference, nothing here is trained. The state_dict
    holds weight (out, in) int8, scale (out,) float32 and the float bias if any: ~1 byte per weight
    instead of 4.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, use_int8pack: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_int8pack = use_int8pack
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_int8pack: bool = False) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, use_int8pack)
        layer.weight, layer.scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def dequantize(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in): compare it with the original."""
        return dequantize_weight(self.weight, self.scale)

    def forward(self, x):
        if self.use_int8pack and int8pack_mm_works(x.device.type, x.dtype):
            # the fused kernel wants a 2-D input and the scales in x's dtype
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            # The clear version: x @ (w_int8 * s).T = (x @ w_int8.T) * s, because each output channel j has
            # one scale s_j. So we multiply by the int8 weight (converted to x's dtype, exactly: int8 values
            # are small integers) and scale the output columns afterwards, (out,) floats instead of (out, in).
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8pack={self.use_int8pack}")


def quantize_model(model: GPT, include_lm_head: bool = False, use_int8pack: bool = False) -> GPT:
    """Replace the nn.Linear layers of model (in place) with Int8Linear; returns the model.

    The token embedding (wte) stays float: it is a table lookup, not a matmul, and it is small next to
    the blocks of a big model. The lm_head shares its weight with wte (weight tying), so by default it
    stays float too: the tied matrix is stored once, in float. include_lm_head=True quantizes a separate
    int8 *copy* for the lm_head and keeps the float table for wte: the head's matmul (the biggest one per
    token at vocab 2048) runs on int8 weights, but the file holds that matrix 1.25 times instead of once,
    and the state_dict bytes we report count exactly that. (A third way, which llama.cpp-style formats
    use: quantize the shared table once and let the embedding look up int8 rows times their scale.)
    """
    for name, module in list(model.named_modules()):
        for child_name, child in module.named_children():
            full_name = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and (include_lm_head or full_name != "lm_head"):
                setattr(module, child_name, Int8Linear.from_linear(child, use_int8pack))
    return model


def quantize_dynamic_reference(model: GPT) -> GPT:
    """PyTorch's own int8 inference, the reference row: quantize_dynamic on the blocks' Linears (the same
    layers as quantize_model's default), per-channel int8 weights, activations quantized per batch."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # torch.ao.quantization is deprecated in favour of torchao (a separate package); it still works in
    # torch 2.13 and warns on every call. We use it only as a reference row, so we silence that here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        model.blocks = quantize_dynamic(model.blocks, {nn.Linear: per_channel_dynamic_qconfig})
    return model


# --- Measuring -------------------------------------------------------------------------------------


VARIANTS = {  # name -> (description, how to make it from a copy of the float model)
    "fp32": ("float32, as trained", lambda m: m),
    "int8": ("Int8Linear: F.linear(x, w_int8.float()) * scale", lambda m: quantize_model(m)),
    "int8_head": ("Int8Linear + an int8 copy of the tied lm_head", lambda m: quantize_model(m, include_lm_head=True)),
    "int8pack": ("Int8Linear calling torch._weight_int8pack_mm", lambda m: quantize_model(m, use_int8pack=True)),
    "dynamic": ("quantize_dynamic (int8 weights + activations)", quantize_dynamic_reference),
}


@dataclass
class QuantizeConfig:
    out_dir: str = field(default="runs/part04_scaling", metadata={"help": "folder with ckpt.pt + tokenizer.json; "
                                                                          "quantize.json goes here"})
    variants: str = field(default="fp32,int8,int8_head,int8pack,dynamic",
                          metadata={"help": f"comma-separated, from {', '.join(VARIANTS)}"})
    eval_iters: int = field(default=10, metadata={"help": "fixed validation batches for the loss", "min": 1})
    eval_batch_size: int = field(default=8, metadata={"help": "sequences per validation batch (of block_size)",
                                                      "min": 1})
    new_tokens: int = field(default=200, metadata={"help": "tokens to generate (greedy, batch 1, KV cache)", "min": 1})
    forward_batch_size: int = field(default=8, metadata={"help": "sequences of block_size in the timed forward",
                                                         "min": 1})
    rounds: int = field(default=3, metadata={"help": "timed runs per variant; we report the median", "min": 1})
    start: str = field(default="\n", metadata={"help": "the prompt for generation; default: a newline"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; none = PyTorch's default",
                                                        "min": 1})
    device: str = field(default="cpu", metadata={"help": "cpu (quantize_dynamic is CPU only), cuda or mps"})
    seed: int = 1337


def variant_names(text: str) -> list[str]:
    """"int8,dynamic" -> ["fp32", "int8", "dynamic"]: the listed variants, fp32 (the baseline) first."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    return names if "fp32" in names else ["fp32", *names]  # the baseline every delta is measured against


def check_config(cfg) -> None:
    variant_names(cfg.variants)
    if not cfg.start:
        raise ValueError("--start is empty; give the model at least one character, e.g. a newline")


def state_dict_megabytes(model: nn.Module) -> float:
    """The size of the model's weights as torch.save writes them (a tensor shared by two names, like the
    tied wte/lm_head weight, is written once)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def val_data_for(tokenizer, train_config: dict) -> torch.Tensor:
    """The validation tokens the model was evaluated on: the last 10% of its data, with its tokenizer."""
    return train_val_split(encode_tensor(tokenizer, load_text(train_config["data"])))[1]


def time_generation(model: GPT, prompt: torch.Tensor, n_new: int, device: str) -> tuple[float, list[int]]:
    """Greedy generation of n_new tokens with the KV cache, batch 1: (seconds, tokens)."""
    synchronize(device)
    begin = time.perf_counter()
    tokens = [t.item() for t in model.stream(prompt, n_new, temperature=0)]
    synchronize(device)
    return time.perf_counter() - begin, tokens


@torch.no_grad()
def time_forward(model: GPT, x: torch.Tensor, device: str) -> float:
    """Seconds for one forward pass over the batch x (B, T): the prefill / scoring workload."""
    synchronize(device)
    begin = time.perf_counter()
    model(x)
    synchronize(device)
    return time.perf_counter() - begin


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | weights (MB) | vs fp32 | val loss | Δ loss vs fp32 | greedy tokens = fp32 | "
             "generate (tok/s) | forward (tok/s) |",
             "| --- |" + " ---: |" * 7]
    for row in rows:
        lines.append(f"| {row['variant']}: {row['description']} | {row['megabytes']:.3f} | {row['size_ratio']:.2f}x | "
                     f"{row['val_loss']:.4f} | {row['val_loss_delta']:+.4f} | {row['greedy_match']} | "
                     f"{row['generate_tokens_per_sec']:,.0f} | {row['forward_tokens_per_sec']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    cfg = parse_config(QuantizeConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    names = variant_names(cfg.variants)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}; train a model first: python part04_scaling/train.py "
                                f"(or point --out_dir at a folder holding its ckpt.pt)")
    if device != "cpu" and "dynamic" in names:
        print(f"note: quantize_dynamic runs on the CPU only; skipping it on {device}")
        names.remove("dynamic")
    if "int8pack" in names and not int8pack_mm_works(device.split(":")[0], torch.float32):
        print("note: torch._weight_int8pack_mm is missing or wrong in this PyTorch; the int8pack row uses the "
              "clear version")

    float_model, tokenizer, checkpoint = load_run(out_dir, device)  # the tokenizer: the checkpoint's own
    train_config = checkpoint["train_config"]
    del checkpoint  # it also holds AdamW's moments, twice the size of the weights: let them go
    # estimate_loss scores eval_iters fixed windows (seed + 1) of the validation split, in float32
    known = {k: v for k, v in train_config.items() if k in TrainConfig.__dataclass_fields__}  # older checkpoints too
    eval_cfg = replace(TrainConfig(**known), eval_iters=cfg.eval_iters, batch_size=cfg.eval_batch_size, dtype="float32")
    val_data = val_data_for(tokenizer, train_config)
    forward_x = get_batch(val_data, cfg.forward_batch_size, eval_cfg.block_size,
                          torch.Generator().manual_seed(cfg.seed))[0].to(device)
    prompt = prompt_tensor(float_model, tokenizer, cfg.start)
    print(f"{ckpt_path} | {float_model.num_params():,} parameters | device {device} | threads {torch.get_num_threads()}"
          f" | load average {os.getloadavg()[0]:.2f}")

    models = {name: VARIANTS[name][1](copy.deepcopy(float_model)).eval() for name in names}
    stats = {}
    for name, model in tqdm(models.items(), desc="val loss", dynamic_ncols=True):
        time_generation(model, prompt, 4, device)  # warm up (first calls allocate and pick kernels)
        stats[name] = dict(megabytes=state_dict_megabytes(model), generate_seconds=[], forward_seconds=[],
                           val_loss=estimate_loss(model, val_data, eval_cfg, device))
    for r in tqdm(range(cfg.rounds), desc="timing", dynamic_ncols=True):
        for name in names if r % 2 == 0 else reversed(names):  # alternate who goes first: noise hits all alike
            seconds, stats[name]["tokens"] = time_generation(models[name], prompt, cfg.new_tokens, device)
            stats[name]["generate_seconds"].append(seconds)
            stats[name]["forward_seconds"].append(time_forward(models[name], forward_x, device))

    base = stats["fp32"]
    rows = []
    for name in names:
        s = stats[name]
        same = next((i for i, (a, b) in enumerate(zip(s["tokens"], base["tokens"])) if a != b), len(s["tokens"]))
        rows.append(dict(
            variant=name, description=VARIANTS[name][0], megabytes=s["megabytes"],
            size_ratio=s["megabytes"] / base["megabytes"], val_loss=s["val_loss"],
            val_loss_delta=s["val_loss"] - base["val_loss"],
            greedy_match=f"{same}/{cfg.new_tokens}",  # greedy tokens identical to fp32's before the first difference
            generate_tokens_per_sec=statistics.median(cfg.new_tokens / t for t in s["generate_seconds"]),
            forward_tokens_per_sec=statistics.median(forward_x.numel() / t for t in s["forward_seconds"]),
        ))
    table = markdown_table(rows)
    print(table)
    results = dict(checkpoint=str(ckpt_path), num_params=float_model.num_params(), device=device,
                   threads=torch.get_num_threads(), load_average=os.getloadavg(), config=asdict(cfg),
                   eval_tokens=cfg.eval_iters * cfg.eval_batch_size * eval_cfg.block_size,
                   forward_batch=list(forward_x.shape), int8pack_available=int8pack_mm_works(device.split(":")[0],
                                                                                            torch.float32),
                   rows=rows, table=table)
    json_path = out_dir / "quantize.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path}")
    return results


if __name__ == "__main__":
    run_cli(main)
