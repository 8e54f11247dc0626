"""Part 4: int8 weight quantization (quantize.py) and the mixed-precision benchmark (bench_precision.py)."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from part04_scaling import bench_precision, quantize, train
from part04_scaling.generate import load_model
from part04_scaling.model import GPT, GPTConfig
from part04_scaling.quantize import Int8Linear, dequantize_weight, quantize_model, quantize_weight
from tests.test_part04_scaling import tiny_run_flags


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))


# --- quantize_weight: per-channel symmetric absmax -------------------------------------------------------


def grid_weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight already on the int8 grid: integers in [-127, 127] (each row reaching +-127) times a
    power-of-two scale per row, so absmax / 127 recovers each scale exactly in float32."""
    gen = torch.Generator().manual_seed(0)
    ints = torch.randint(-127, 128, (6, 20), generator=gen)
    ints[:, 0] = torch.tensor([127, -127, 127, -127, 127, 127])  # every row's absmax is 127 steps
    scales = 2.0 ** torch.tensor([-3.0, -7.0, 0.0, -12.0, 4.0, -5.0])
    return ints * scales[:, None], ints.to(torch.int8), scales


def one_big_row_weight() -> torch.Tensor:
    """Small Gaussian weights with one row 100x larger: the case per-tensor scales handle badly."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    weight[3] *= 100
    return weight


def check_quantize_weight(fn):
    """fn(weight (out, in)) -> (int8 (out, in), scale (out,)) must be symmetric absmax per output channel."""
    weight, ints, scales = grid_weight()
    w_int8, scale = fn(weight)
    assert w_int8.dtype == torch.int8 and w_int8.shape == weight.shape, (w_int8.dtype, w_int8.shape)
    assert scale.shape == (weight.size(0),), f"one scale per output channel (row), got shape {tuple(scale.shape)}"
    assert torch.equal(scale.float(), scales), "scale must be max|row| / 127, exact for weights on the int8 grid"
    assert torch.equal(w_int8, ints), "weights already on the int8 grid must quantize exactly"
    # Off the grid: rounding to the nearest level errs by at most half a step (row absmax / 254) per entry.
    weight = one_big_row_weight()
    w_int8, scale = fn(weight)
    error = (w_int8.float() * scale.float()[:, None] - weight).abs().amax(dim=1)  # (out,)
    bound = weight.abs().amax(dim=1) / 254 * (1 + 1e-5)
    assert (error <= bound).all(), f"error per row {error.tolist()} exceeds half a step {bound.tolist()}"


def per_tensor(weight):  # one scale for the whole matrix, repeated per row
    scale = weight.abs().amax() / 127
    return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale.expand(weight.size(0)).clone()


def truncating(weight):  # .to(int8) truncates towards 0 instead of rounding
    scale = weight.abs().amax(dim=1) / 127
    return (weight / scale[:, None]).to(torch.int8), scale


def by_128(weight):  # 128 levels: the largest weight lands on 128, outside int8's symmetric range
    scale = weight.abs().amax(dim=1) / 128
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def test_quantize_weight_is_per_channel_absmax():
    check_quantize_weight(quantize_weight)
    weight, ints, scales = grid_weight()
    assert torch.equal(dequantize_weight(ints, scales), weight)  # exact reconstruction on the grid


@pytest.mark.parametrize("wrong", [per_tensor, truncating, by_128])
def test_quantize_weight_check_rejects_plausible_mistakes(wrong):
    with pytest.raises(AssertionError):
        check_quantize_weight(wrong)


def test_per_channel_scales_beat_one_scale_on_a_matrix_with_one_big_row():
    weight = one_big_row_weight()
    small_rows = torch.arange(16) != 3
    errors = {}
    for fn in (quantize_weight, per_tensor):
        w_int8, scale = fn(weight)
        errors[fn.__name__] = (dequantize_weight(w_int8, scale) - weight)[small_rows].abs().max().item()
    # per tensor, the small rows get ~100x coarser steps (most of their weights round to 0 or +-1): ~74x the error
    assert errors["per_tensor"] > 20 * errors["quantize_weight"], errors


def test_an_all_zero_row_stays_zero():
    weight = torch.zeros(3, 8)
    weight[1] = torch.linspace(-1, 1, 8)
    w_int8, scale = quantize_weight(weight)
    assert scale[0] == 0 and torch.equal(dequantize_weight(w_int8, scale)[0], torch.zeros(8))
    assert torch.isfinite(dequantize_weight(w_int8, scale)).all()


# --- Int8Linear ---------------------------------------------------------------------------------------


def test_int8_linear_matches_the_float_linear_within_the_rounding_bound():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, got = linear(x), layer(x)
    # each weight errs by at most scale_j / 2, so output j errs by at most sum_k |x_k| * scale_j / 2
    bound = x.abs().sum(-1, keepdim=True) * layer.scale / 2 + 1e-5
    assert ((got - expected).abs() <= bound).all()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2  # ~0.1-0.5% in practice
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.bias, linear.bias.detach())
    assert ((layer.dequantize() - linear.weight).abs() <= layer.scale[:, None] / 2 * (1 + 1e-5)).all()


def test_int8pack_kernel_agrees_with_the_clear_version_and_falls_back_when_broken(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(32, 24, bias=False)
    clear, packed = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear, use_int8pack=True)
    x = torch.randn(3, 7, 32)
    if quantize.int8pack_mm_works("cpu", torch.float32):
        torch.testing.assert_close(packed(x), clear(x), rtol=1e-4, atol=1e-5)

    def broken(*args):
        raise RuntimeError("no such kernel")

    quantize.int8pack_mm_works.cache_clear()
    monkeypatch.setattr(torch, "_weight_int8pack_mm", broken)
    try:
        assert not quantize.int8pack_mm_works("cpu", torch.float32)
        assert torch.equal(packed(x), clear(x))  # the guard fell back to the clear version
    finally:
        quantize.int8pack_mm_works.cache_clear()


# --- A quantized model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for 20 steps by train.py, with its tokenizer: tmp/run/{ckpt.pt,tokenizer.json}."""
    tmp_path = tmp_path_factory.mktemp("quantize")
    train.main(tiny_run_flags(tmp_path, "--max_iters", "20"))
    return tmp_path


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("variant", ["int8", "int8_head", "dynamic"])
def test_quantized_model_logits_stay_close_and_its_weights_shrink(tiny_checkpoint, variant):
    model = load_model(tiny_checkpoint / "run" / "ckpt.pt")  # trained weights, not the random init
    idx = torch.randint(model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = logits_of(model, idx)
    quantized = quantize.VARIANTS[variant][1](copy.deepcopy(model)).eval()
    got = logits_of(quantized, idx)
    relative = ((got - reference).norm() / reference.norm()).item()
    assert relative < 0.01, f"{variant}: logits moved by {relative:.2%}"  # measured: 0.03% to 0.3%
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.85  # a few near-ties may flip
    assert quantize.state_dict_megabytes(quantized) < 0.7 * quantize.state_dict_megabytes(model)


def test_quantize_model_replaces_every_block_linear_and_keeps_the_tied_head_float():
    model = quantize_model(tiny_model())
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    int8 = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert linears == ["lm_head"] and model.lm_head.weight is model.wte.weight  # still tied, still float
    assert len(int8) == 2 * 5  # per block: qkv, proj, gate, up, mlp.proj
    with_head = quantize_model(tiny_model(), include_lm_head=True)
    assert isinstance(with_head.lm_head, Int8Linear) and isinstance(with_head.wte, nn.Embedding)
    # the int8 head is a copy: the file holds the float table (wte) and the int8 head, 5 bytes per entry
    float_bytes = quantize.state_dict_megabytes(model)
    assert quantize.state_dict_megabytes(with_head) == pytest.approx(float_bytes + (50 * 32 + 50 * 4) / 1e6, abs=2e-3)


def test_a_quantized_state_dict_loads_back_with_weights_only(tmp_path):
    model = quantize_model(tiny_model()).eval()
    torch.save(model.state_dict(), tmp_path / "int8.pt")
    torch.manual_seed(1)  # different float weights, overwritten by the loaded int8 ones
    other = quantize_model(GPT(model.config)).eval()
    other.load_state_dict(torch.load(tmp_path / "int8.pt", weights_only=True))
    idx = torch.randint(50, (1, 16), generator=torch.Generator().manual_seed(0))
    assert other.blocks[0].mlp.up.weight.dtype == torch.int8
    assert torch.equal(logits_of(other, idx), logits_of(model, idx))


# --- The scripts ----------------------------------------------------------------------------------------


def test_quantize_script_reports_every_variant(tiny_checkpoint):
    run = tiny_checkpoint / "run"
    results = quantize.main(["--out_dir", str(run), "--new_tokens", "8", "--eval_iters", "2", "--eval_batch_size", "2",
                             "--forward_batch_size", "2", "--rounds", "1", "--device", "cpu"])
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == list(quantize.VARIANTS)
    for row in rows.values():
        for key in ("megabytes", "val_loss", "generate_tokens_per_sec", "forward_tokens_per_sec"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["variant"], key, row[key])
        assert f"| {row['variant']}: " in results["table"]
        assert abs(row["val_loss_delta"]) < 0.05, row  # int8 weights barely move the loss
    assert rows["int8"]["megabytes"] < 0.7 * rows["fp32"]["megabytes"]
    assert rows["int8"]["megabytes"] < rows["int8_head"]["megabytes"]  # the head's int8 copy costs bytes
    assert json.loads((run / "quantize.json").read_text())["rows"][0]["variant"] == "fp32"


def test_quantize_script_without_a_checkpoint_says_to_train_first(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train a model first"):
        quantize.main(["--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # a bad flag: argparse's one-line error, before anything loads
        quantize.main(["--out_dir", str(tmp_path), "--variants", "fp32,int4"])
    assert exit_info.value.code == 2 and "error: --variants: unknown ['int4']" in capsys.readouterr().err
    assert quantize.variant_names("int8, dynamic") == ["fp32", "int8", "dynamic"]  # the baseline comes first


def test_bench_precision_trains_each_dtype_from_the_same_start(tiny_checkpoint, tmp_path):
    flags = tiny_run_flags(tiny_checkpoint)  # the same tiny data and model as the checkpoint
    pick = {flag: value for flag, value in zip(flags, flags[1:]) if flag in (
        "--data", "--vocab_size", "--n_layer", "--n_head", "--n_kv_head", "--n_embd", "--block_size", "--batch_size")}
    argv = [item for pair in pick.items() for item in pair]
    results = bench_precision.main([*argv, "--steps", "6", "--skip_steps", "1", "--eval_iters", "2",
                                    "--device", "cpu", "--out_dir", str(tmp_path)])
    rows = {row["dtype"]: row for row in results["rows"]}
    assert list(rows) == ["float32", "bfloat16"]  # CPU: no float16 autocast
    assert rows["float32"]["step_losses"][0] == pytest.approx(rows["bfloat16"]["step_losses"][0], abs=0.05)
    for row in rows.values():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < math.log(320)  # it learned something
        assert row["tokens_per_sec"] > 0 and f"| {row['dtype']} |" in results["table"]
    assert (tmp_path / "bench_precision.json").is_file()
    with pytest.raises(ValueError, match="float16"):
        bench_precision.main([*argv, "--dtypes", "float32,float16", "--device", "cpu", "--out_dir", str(tmp_path)])


@pytest.mark.parametrize("script", [quantize, bench_precision])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--device" in capsys.readouterr().out
