"""Part 1: every piece of the Transformer against an independent reference, then training on digit reversal."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from part01_transformer.model import (GPT, MLP, Block, GPTConfig, Head, LayerNorm, MultiHeadAttention, attention,
                                      sinusoidal_positions)
from part01_transformer.train import (TrainConfig, attention_maps, decode, encode, inputs_and_targets, main,
                                      make_examples, train)
from shared.config import parse_config
from shared.metrics import read_metrics
from tests.notebooks import run_notebook
from tests.test_part01_exercises import assert_close, randn

CONFIG = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sinusoid_by_formula(block_size, n_embd):
    """The paper's formula, one entry at a time in float64."""
    table = torch.zeros(block_size, n_embd, dtype=torch.float64)
    for pos in range(block_size):
        for i in range(n_embd // 2):
            table[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / n_embd))
            table[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / n_embd))
    return table

def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (default inits leave biases and norms trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return module.eval()


def random_tokens(B, T, seed=0, vocab_size=CONFIG.vocab_size):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- Positional embeddings ---------------------------------------------------------------------


def test_sinusoidal_table_matches_the_paper():
    assert_close(sinusoidal_positions(32, 16), sinusoid_by_formula(32, 16), "sinusoidal_positions(32, 16)")


def test_sinusoidal_similarity_depends_only_on_the_offset():
    """PE[p] . PE[p+k] = sum_i cos(w_i k): how alike two positions look depends on their distance only."""
    table = sinusoidal_positions(64, 16).double()
    for offset in (1, 3, 10):
        dots = (table[:-offset] * table[offset:]).sum(dim=1)
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-4), f"offset {offset}: {dots[:5]}"


def test_learned_vs_sinusoidal_positions():
    learned = GPT(CONFIG)
    fixed = GPT(replace(CONFIG, pos_embedding="sinusoidal"))
    # The learned table is block_size x n_embd parameters; the sinusoidal one is a buffer, not trained or saved.
    assert learned.num_params() - fixed.num_params() == CONFIG.block_size * CONFIG.n_embd
    assert "sinusoid" not in fixed.state_dict() and not hasattr(fixed, "wpe")
    idx = random_tokens(2, 10)
    for model in (learned, fixed):
        logits, loss = model(idx)
        assert logits.shape == (2, 10, CONFIG.vocab_size) and loss is None


# --- Attention ---------------------------------------------------------------------------------

# The worked example of the README and the notebook: 3 tokens, head_size 2.
WORKED_Q = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
WORKED_K = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
WORKED_V = [[10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]


def test_worked_example_numbers():
    q, k, v = (torch.tensor(m) for m in (WORKED_Q, WORKED_K, WORKED_V))
    out, weights = attention(q, k, v)
    expected_weights = torch.tensor([[1.0, 0.0, 0.0], [0.1956, 0.8044, 0.0], [0.2483, 0.2483, 0.5035]])
    expected_out = torch.tensor([[10.0, 0.0], [1.9557, 8.0443], [7.5174, 7.5174]])
    assert_close(weights, expected_weights, "worked example weights (as printed in the README)", atol=1e-4)
    assert_close(out, expected_out, "worked example output (as printed in the README)", atol=1e-4)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), "worked example vs SDPA")


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_scaled_dot_product_attention(causal):
    q, k, v = (randn(2, 3, 7, 8, seed=s) for s in (1, 2, 3))
    out, weights = attention(q, k, v, causal=causal)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), f"attention(causal={causal})")
    assert_close(weights.sum(-1), torch.ones(2, 3, 7), "each row of weights sums to 1")
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert (weights[..., future] == 0).all() == causal, "causal attention puts exactly zero weight on the future"


def test_multihead_equals_separate_heads_concatenated_and_projected():
    mha = randomized(MultiHeadAttention(CONFIG))
    C, n_head = CONFIG.n_embd, CONFIG.n_head
    head_size = C // n_head
    heads = []
    for h in range(n_head):
        head = Head(C, head_size)
        rows = slice(h * head_size, (h + 1) * head_size)  # head h's rows inside the q, k and v blocks of qkv
        with torch.no_grad():
            for part, linear in enumerate((head.query, head.key, head.value)):
                linear.weight.copy_(mha.qkv.weight[part * C :][rows])
                linear.bias.copy_(mha.qkv.bias[part * C :][rows])
        heads.append(head)
    x = randn(2, 9, C, seed=4)
    with torch.no_grad():
        expected = mha.proj(torch.cat([head(x) for head in heads], dim=-1))
        assert_close(mha(x), expected, "MultiHeadAttention vs n_head separate Heads", atol=1e-5)


def test_multihead_equals_torch_multiheadattention():
    mha = randomized(MultiHeadAttention(CONFIG))
    reference = nn.MultiheadAttention(CONFIG.n_embd, CONFIG.n_head, batch_first=True).eval()
    with torch.no_grad():  # torch packs q, k, v into in_proj in the same order and splits heads the same way
        reference.in_proj_weight.copy_(mha.qkv.weight)
        reference.in_proj_bias.copy_(mha.qkv.bias)
        reference.out_proj.weight.copy_(mha.proj.weight)
        reference.out_proj.bias.copy_(mha.proj.bias)
    T = 9
    x = randn(2, T, CONFIG.n_embd, seed=5)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # torch's bool mask: True = may NOT attend
    with torch.no_grad():
        expected, expected_weights = reference(x, x, x, attn_mask=future, need_weights=True, average_attn_weights=False)
        assert_close(mha(x), expected, "MultiHeadAttention vs nn.MultiheadAttention", atol=1e-5)
    assert_close(mha.attn_weights, expected_weights, "per-head attention weights", atol=1e-6)


# --- MLP, LayerNorm, the block ---------------------------------------------------------------------


def test_mlp_expands_4x_with_gelu_and_works_per_token():
    mlp = randomized(MLP(CONFIG))
    assert mlp.fc.out_features == 4 * CONFIG.n_embd and mlp.proj.in_features == 4 * CONFIG.n_embd
    x = randn(2, 6, CONFIG.n_embd, seed=6)
    hidden = mlp.fc(x)
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # GELU (Hendrycks & Gimpel 2016), exact form
    with torch.no_grad():
        assert_close(mlp(x), mlp.proj(gelu), "MLP = proj(GELU(fc(x)))", atol=1e-5)
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        assert_close(mlp(x[:, perm]), mlp(x)[:, perm], "the MLP sees each token alone", atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    ours = randomized(LayerNorm(12, bias=bias))
    reference = nn.LayerNorm(12, bias=bias)
    reference.load_state_dict(ours.state_dict())
    x = 4.0 + 3.0 * randn(3, 5, 12, seed=7)
    with torch.no_grad():
        assert_close(ours(x), reference(x), f"LayerNorm(bias={bias}) vs nn.LayerNorm", atol=1e-5)
    plain = LayerNorm(12)  # weight 1, bias 0: every token comes out with mean 0 and variance 1
    with torch.no_grad():
        y = plain(x)
    assert_close(y.mean(-1), torch.zeros(3, 5), "mean after LayerNorm", atol=1e-5)
    assert_close(y.var(-1, unbiased=False), torch.ones(3, 5), "variance after LayerNorm", atol=1e-3)


def test_block_is_identity_when_its_sublayers_write_nothing():
    block = randomized(Block(CONFIG))
    with torch.no_grad():  # the two projections that write into the residual stream
        for linear in (block.attn.proj, block.mlp.proj):
            linear.weight.zero_()
            linear.bias.zero_()
    x = randn(2, 7, CONFIG.n_embd, seed=8)
    with torch.no_grad():
        assert torch.equal(block(x), x), "the residual path must carry x through unchanged"


def test_block_is_pre_norm():
    """Pre-norm (GPT-2): each sublayer reads a LayerNorm'd copy of the stream and adds its output to the
    un-normalized stream: out = x + a + m with a = attn(ln_1(x)), m = mlp(ln_2(x + a)). Post-norm,
    ln(x + sublayer(x)), would normalize the stream itself."""
    block = randomized(Block(CONFIG))
    seen = {}
    for name in ("attn", "mlp"):  # record what each sublayer reads and writes
        getattr(block, name).register_forward_hook(lambda _, args, out, name=name: seen.update({name: (args[0], out)}))
    x = 2.0 + 3.0 * randn(2, 7, CONFIG.n_embd, seed=9)
    with torch.no_grad():
        out = block(x)
        (attn_in, a), (mlp_in, m) = seen["attn"], seen["mlp"]
        assert_close(attn_in, block.ln_1(x), "the attention reads ln_1(x)")
        assert_close(mlp_in, block.ln_2(x + a), "the MLP reads ln_2(x + attention output)")
    assert_close(out, x + a + m, "the block returns x + attention output + MLP output", atol=1e-5)


# --- The stacked model ----------------------------------------------------------------------------


def test_causality_future_tokens_do_not_change_earlier_logits():
    model = randomized(GPT(CONFIG))
    idx = random_tokens(1, 12)
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :7], after[:, :7]), "logits before position 7 must not see token 7"
    assert not torch.allclose(before[:, 7:], after[:, 7:]), "logits from position 7 on should see the change"


def test_attention_without_positions_is_permutation_equivariant():
    """Without positions, attention treats its input as a set: permute the tokens, the outputs permute alike."""
    x = randn(10, 8, seed=10)
    w_q, w_k, w_v = (randn(8, 8, seed=s) for s in (11, 12, 13))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    out, _ = attention(x @ w_q, x @ w_k, x @ w_v, causal=False)
    out_perm, _ = attention(x[perm] @ w_q, x[perm] @ w_k, x[perm] @ w_v, causal=False)
    assert_close(out_perm, out[perm], "attention(permuted x) vs permuted attention(x)", atol=1e-5)


def test_positions_make_word_order_visible():
    """The causal GPT's last position reads tokens 0..T-1 as a set (one layer): without positions,
    shuffling the earlier tokens leaves its prediction unchanged; with positions it does not."""
    model = randomized(GPT(replace(CONFIG, n_layer=1)))
    idx = random_tokens(1, 10, seed=2)
    shuffled = torch.cat([idx[:, :-1].flip(1), idx[:, -1:]], dim=1)  # same tokens, earlier ones reversed
    assert not torch.equal(idx, shuffled)
    with torch.no_grad():
        with_positions = [model(i)[0][0, -1] for i in (idx, shuffled)]
        model.wpe.weight.zero_()
        without_positions = [model(i)[0][0, -1] for i in (idx, shuffled)]
    assert_close(without_positions[1], without_positions[0], "last logits without positions", atol=1e-5)
    assert (with_positions[1] - with_positions[0]).abs().max() > 1e-2, "with positions, order should matter"


def test_loss_at_init_is_uniform_and_ignores_minus_one():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    assert model.lm_head.weight is model.wte.weight, "weight tying: one matrix for the embedding and the head"
    idx, targets = random_tokens(4, 16, seed=3), random_tokens(4, 16, seed=4)
    logits, loss = model(idx, targets)
    assert abs(loss.item() - math.log(CONFIG.vocab_size)) < 0.05, "a fresh model should guess uniformly"
    targets[:, :10] = -1  # -1 = ignore: only the last 6 positions count
    _, partial = model(idx, targets)
    expected = F.cross_entropy(logits[:, 10:].reshape(-1, CONFIG.vocab_size), targets[:, 10:].reshape(-1))
    assert_close(partial, expected, "loss with targets -1 ignored", atol=1e-6)


def test_generate_greedy_appends_argmax_and_crops_context():
    model = randomized(GPT(CONFIG))
    prompt = random_tokens(2, 14, seed=5)
    out = model.generate(prompt, max_new_tokens=5, temperature=0)  # runs past block_size=16: context is cropped
    assert out.shape == (2, 19) and torch.equal(out[:, :14], prompt)
    with torch.no_grad():
        first = model(prompt)[0][:, -1].argmax(-1)
    assert torch.equal(out[:, 14], first)


# --- Training on digit reversal --------------------------------------------------------------------

TINY = ["--seq_len", "4", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "32",
        "--max_iters", "150", "--eval_interval", "50", "--eval_iters", "2", "--val_size", "100", "--device", "cpu"]


def test_task_lines_and_targets():
    lines = make_examples("reverse", 3, 4, torch.Generator().manual_seed(0))
    for line in lines:
        text = decode(line)
        assert text[4] == "|" and text[5:] == text[:4][::-1] and encode(text) == line.tolist()
    x, y = inputs_and_targets(lines, 4)
    assert x.shape == y.shape == (3, 8)
    assert (y[:, :4] == -1).all(), "no loss on the random digits and the separator"
    assert torch.equal(y[:, 4:], lines[:, 5:]), "position 4 (the separator) predicts the first answer digit"
    copy = make_examples("copy", 3, 4, torch.Generator().manual_seed(0))
    assert torch.equal(copy[:, 5:], copy[:, :4])


def test_train_learns_reversal_and_draws_the_anti_diagonal(tmp_path):
    model, results = train(parse_config(TrainConfig, TINY + ["--out_dir", str(tmp_path)]))
    assert results["accuracy"] >= 0.9, results  # exact match on 100 held-out lines, greedy decoding
    assert results["val_loss"] < 0.5, results  # from ln(10) = 2.3 at init
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records] == [0, 50, 100, 150]
    assert records[0]["val_loss"] > 2.0, "at init the loss is near ln(10)"
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_sec", "accuracy"} <= records[-1].keys()
    for png in ("loss.png", "attention.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    # What the head learned: the query at position 4+j (writing answer digit j) reads input digit 3-j.
    maps = attention_maps(model, make_examples("reverse", 1, 4, torch.Generator().manual_seed(1))[0])
    assert maps.shape == (1, 2, 8, 8)
    answer_rows = torch.arange(4, 8)
    mirrored = maps[0][:, answer_rows, 7 - answer_rows].max(dim=0).values  # the best head, per answer row
    assert (mirrored > 0.5).all(), f"attention on the mirrored digit: {mirrored}"


def test_train_is_reproducible_and_checks_its_flags(tmp_path):
    short = TINY + ["--max_iters", "5", "--eval_interval", "5"]
    runs = [main(short + ["--out_dir", str(tmp_path / name)]) for name in ("a", "b")]
    assert runs[0]["val_loss"] == runs[1]["val_loss"] and runs[0]["train_loss"] == runs[1]["train_loss"]
    with pytest.raises(SystemExit):  # refused while parsing: "--block_size 6 is too short" (tests/test_bad_input.py)
        main(TINY + ["--block_size", "6", "--out_dir", str(tmp_path / "c")])


def test_notebook_runs():
    run_notebook("part01_transformer/notebook.ipynb")
