"""Part 10, context-aware and gated attention: with both flags off the model is part 9's exactly; each gate is
causal, gives the same outputs with and without the KV cache and with left padding, and matches a hand
computation; the attention-sink measurement matches softmax(QK^T) and SDPA; a tiny end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from part09_grpo import model as part9
from part10_semantic import context_attention as ca
from part10_semantic.model import GPT, GPTConfig, ContextGate, OutputGate, causal_context

GATED = [dict(context_gate=True), dict(output_gate=True), dict(context_gate=True, output_gate=True)]
GATE_IDS = ["context_gate", "output_gate", "both"]


def tiny(seed=0, block_size=32, n_kv_head=2, **flags):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=n_kv_head,
                          **flags))
    # the gates start near 1/2 and their effect is small; random weights make every test sensitive to them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".context_" in name or ".output_gate." in name:
                p.normal_(0, 0.5)
    return model.eval()


def left_pad(prompts, pad_id=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


# --- Flags off: part 9's model ------------------------------------------------------------------------------------


def test_flags_off_is_part9s_gpt_exactly():
    config = dict(block_size=24, vocab_size=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=2)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**config))
    torch.manual_seed(0)
    theirs = part9.GPT(part9.GPTConfig(**config))
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, 64, (3, 20))
    assert torch.equal(ours(idx)[0], theirs(idx)[0])
    ids, mask = left_pad([idx[0, :12].tolist(), idx[1].tolist()])
    assert torch.equal(ours(ids, padding_mask=mask)[0], theirs(ids, padding_mask=mask)[0])
    assert torch.equal(ours.generate(idx[:, :5], 10, temperature=0), theirs.generate(idx[:, :5], 10, temperature=0))
    # a gated model has more parameters, and every one of the baseline's under the same names
    gated = GPT(GPTConfig(**config, context_gate=True, output_gate=True)).state_dict()
    extra = set(gated) - set(a)
    assert set(a) <= set(gated) and extra and all(".context_" in k or ".output_gate." in k for k in extra)


# --- Causality, the cache, padding --------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", GATED, ids=GATE_IDS)
def test_changing_a_future_byte_leaves_earlier_logits_unchanged(flags):
    model = tiny(**flags)
    idx = torch.randint(0, 64, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 7) % 64
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)


def test_a_global_context_would_leak_the_future():
    """The paper's global context (the mean of the whole sequence) in place of the cumulative mean: position 0
    then sees position 5. causal_context is what stops it."""
    x = torch.randn(1, 6, 4)
    later = x.clone()
    later[:, 5] += 1.0
    assert torch.equal(causal_context(x)[0][:, :5], causal_context(later)[0][:, :5])
    assert not torch.allclose(x.mean(dim=1), later.mean(dim=1))


@pytest.mark.parametrize("growing", [False, True])
@pytest.mark.parametrize("flags", GATED, ids=GATE_IDS)
def test_kv_cache_gives_the_logits_of_one_pass(flags, growing):
    model = tiny(**flags)
    idx = torch.randint(0, 64, (2, 30))
    full = model(idx)[0]
    cache = model.new_kv_cache(2, growing=growing)
    pieces = [model(idx[:, :11], kv_cache=cache)[0]]  # prefill, then one byte at a time, then a chunk
    pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(11, 25)]
    pieces.append(model(idx[:, 25:], kv_cache=cache)[0])
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    if "context_gate" in flags:  # the cache's running context is what makes it work: without it, no match
        cache = model.new_kv_cache(2, growing=growing)
        model(idx[:, :11], kv_cache=cache)
        for layer in cache:
            layer.context = None  # forget the sum and count of the prompt
        wrong = model(idx[:, 11:12], kv_cache=cache)[0]
        assert not torch.allclose(wrong, full[:, 11:12], atol=1e-3)


@pytest.mark.parametrize("flags", GATED, ids=GATE_IDS)
def test_generation_with_and_without_cache_agree(flags):
    model = tiny(seed=1, **flags)
    prompt = torch.randint(0, 64, (2, 6))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 20, temperature=0, use_cache=False))  # within block_size


@pytest.mark.parametrize("flags", GATED, ids=GATE_IDS)
def test_left_padding_gives_the_unpadded_logits_and_generations(flags):
    model = tiny(seed=2, **flags)
    prompts = [torch.randint(1, 64, (n,)).tolist() for n in (9, 4, 6)]
    ids, mask = left_pad(prompts)
    logits = model(ids, padding_mask=mask)[0]
    for row, p in enumerate(prompts):
        assert torch.allclose(logits[row, -len(p):], model(torch.tensor([p]))[0][0], atol=1e-5)
    out = model.generate(ids, 8, temperature=0, padding_mask=mask)  # with the cache
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 8, temperature=0)
        assert out[row, ids.size(1):].tolist() == alone[0, len(p):].tolist()


# --- The gates by hand --------------------------------------------------------------------------------------------


def test_causal_context_by_hand():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])  # (1, 3, 2)
    context, (total, count) = causal_context(x)
    assert torch.allclose(context, torch.tensor([[[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]]]))
    assert torch.equal(total, torch.tensor([[9.0, 6.0]])) and torch.equal(count, torch.tensor([[3.0]]))
    # padding is skipped: a padded first position gets c = 0, the others the mean of the real tokens
    context, _ = causal_context(x, valid=torch.tensor([[False, True, True]]))
    assert torch.allclose(context, torch.tensor([[[0.0, 0.0], [3.0, 2.0], [4.0, 3.0]]]))
    # one more token, continuing from the state (sum 9, 6 over 3 tokens): (9 + 7) / 4, (6 + 2) / 4
    context, _ = causal_context(torch.tensor([[[7.0, 2.0]]]), state=(total, count))
    assert torch.allclose(context, torch.tensor([[[4.0, 2.0]]]))


def test_context_gate_by_hand():
    gate = ContextGate(n_embd=2, dim=2)
    with torch.no_grad():
        gate.context_map.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # c U: (c0, c0 + c1)
        gate.score_own.weight.copy_(torch.tensor([[1.0, -1.0]]))
        gate.score_context.weight.copy_(torch.tensor([[0.5, 0.0]]))
    h = torch.tensor([[[2.0, 1.0]]])
    c = torch.tensor([[[1.0, 3.0]]])
    cu = torch.tensor([1.0, 4.0])
    lam = 1 / (1 + math.exp(-((2 - 1) + 0.5 * 1.0)))  # sigmoid(h . v_H + (c U) . v_C) = sigmoid(1.5)
    expected = (1 - lam) * torch.tensor([2.0, 1.0]) + lam * cu
    assert torch.allclose(gate(h, c)[0, 0], expected)
    assert gate.mix_weight(h, gate.context_map(c)).item() == pytest.approx(lam)
    # a plausible mistake, mixing in c itself instead of c U, gives another answer
    assert not torch.allclose(gate(h, c)[0, 0], (1 - lam) * h[0, 0] + lam * c[0, 0])


def test_output_gate_by_hand_and_its_initial_behaviour():
    config = GPTConfig(n_embd=2, n_head=1)
    gate = OutputGate(config)
    with torch.no_grad():
        gate.w_theta.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    x, y = torch.tensor([[[0.5, 1.0]]]), torch.tensor([[[4.0, 3.0]]])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert torch.allclose(gate(y, x), torch.tensor([[[4.0 * sigmoid(0.5), 3.0 * sigmoid(-2.0)]]]))
    # the initial behaviour: W_theta has the std-0.02 init of every Linear, so the gate starts near 1/2 (the
    # attention output is halved); with W_theta = 0 exactly, the attention is exactly half the ungated one
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4))
    torch.manual_seed(0)
    gated = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, output_gate=True))
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 10, 32)
    scores = gated.blocks[0].attn.output_gate.scores(F.rms_norm(x, (32,)))
    assert 0.4 < scores.min() and scores.max() < 0.6
    nn_init = gated.blocks[0].attn.output_gate.w_theta.weight.std().item()
    assert nn_init == pytest.approx(0.02, rel=0.2)
    with torch.no_grad():
        gated.blocks[0].attn.output_gate.w_theta.weight.zero_()
    pos = torch.arange(10)
    cos, sin = plain.rope_cos[:10], plain.rope_sin[:10]
    assert torch.allclose(gated.blocks[0].attn(x, pos, cos, sin), 0.5 * plain.blocks[0].attn(x, pos, cos, sin),
                          atol=1e-6)


def test_context_aware_attention_against_a_written_out_reference():
    """Yang et al.'s Eqs. 5-6 with the causal context, then softmax attention, all from the raw parameters."""
    model = tiny(seed=4, n_kv_head=2, context_gate=True)
    attn = model.blocks[0].attn
    B, T, C, H, hs = 2, 9, 32, 4, 8
    x = torch.randn(B, T, C)
    pos = torch.arange(T)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    W = attn.qkv.weight  # (C + 2 * 2 * hs, C)
    q, k, v = x @ W[:C].T, x @ W[C:C + 2 * hs].T, x @ W[C + 2 * hs:].T
    c = torch.stack([x[:, :t + 1].mean(dim=1) for t in range(T)], dim=1)  # the mean of the inputs so far

    def gate(h, g):
        cu = c @ g.context_map.weight.T
        lam = torch.sigmoid(h @ g.score_own.weight.T + cu @ g.score_context.weight.T)  # (B, T, 1)
        return (1 - lam) * h + lam * cu

    q, k = gate(q, attn.context_q), gate(k, attn.context_k)
    def rotate(t, n):  # RoPE: each channel pair (a, b) of each head turned by its angle; (B, n, T, hs)
        pairs = t.view(B, T, n, hs // 2, 2).transpose(1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)

    q, k = rotate(q, H), rotate(k, 2)
    k, v = k.repeat_interleave(2, dim=1), v.view(B, T, 2, hs).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~torch.ones(T, T).tril().bool(), -math.inf)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.T
    assert torch.allclose(attn(x, pos, cos, sin), y, atol=1e-5)


# --- Measuring the sink -------------------------------------------------------------------------------------------


def test_attention_weights_match_an_explicit_softmax_and_sdpa():
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    weights = ca.attention_weights(q, k)
    kk = torch.cat([k[:, :1], k[:, :1], k[:, 1:], k[:, 1:]], dim=1)  # GQA: heads 0, 1 read key head 0
    explicit = torch.empty(2, 4, 7, 7)
    for t in range(7):
        row = torch.einsum("bhd,bhsd->bhs", q[:, :, t], kk[:, :, :t + 1]) / math.sqrt(8)
        explicit[:, :, t] = F.pad(row.softmax(-1), (0, 6 - t))
    assert torch.allclose(weights, explicit, atol=1e-6)
    vv = v.repeat_interleave(2, dim=1)
    assert torch.allclose(weights @ vv, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                          atol=1e-5)


def test_first_token_attention_by_hand():
    T = 6
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 2, T, T)  # each query spreads evenly
    expected = (1 / 2 + 1 / 3 + 1 / 4 + 1 / 5 + 1 / 6) / 5
    assert torch.allclose(ca.first_token_attention(uniform), torch.full((2,), expected))
    assert ca.uniform_first_token_attention(T) == pytest.approx(expected)
    # counting the first query (which has no choice but itself) would inflate it
    assert uniform[..., 0].mean().item() > expected + 0.05
    sink = torch.zeros(1, 1, T, T)
    sink[..., 0] = 1.0
    assert ca.first_token_attention(sink).item() == 1.0


@pytest.mark.parametrize("flags", [{}] + GATED, ids=["baseline"] + GATE_IDS)
def test_look_inside_recomputes_what_the_layer_computed(flags):
    model = tiny(seed=6, **flags)
    idx = torch.randint(0, 64, (2, 12))
    captured = {}
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    records = ca.look_inside(model, idx)
    attn = model.blocks[1].attn
    r = records[1]
    assert r["weights"].shape == (2, 4, 12, 12) and torch.allclose(r["weights"].sum(-1), torch.ones(2, 4, 12))
    _, _, v = attn.heads(captured["x"], model.rope_cos[:12], model.rope_sin[:12])
    y = (r["weights"] @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(2, 12, 32)
    if "output_gate" in r:
        y = y * r["output_gate"]
    assert torch.allclose(attn.proj(y), captured["out"], atol=1e-5)  # the weights are the layer's own
    if flags.get("context_gate"):
        assert r["lambda_q"].shape == (2, 12) and ((r["lambda_q"] >= 0) & (r["lambda_q"] <= 1)).all()
        assert torch.allclose(r["context"], causal_context(captured["x"])[0], atol=1e-6)
    else:
        assert "lambda_q" not in r and "context" not in r


# --- Equal time, the scene, the context shifts --------------------------------------------------------------------


def test_curve_interpolation():
    run = ca.Trainee("x", None, None, None, curve=[{"iter": 0, "val_bits_per_byte": 8.0},
                                                    {"iter": 10, "val_bits_per_byte": 4.0},
                                                    {"iter": 20, "val_bits_per_byte": 3.0}])
    assert ca.curve_at(run, 5) == pytest.approx(6.0)
    assert ca.curve_at(run, 15) == pytest.approx(3.5)
    assert ca.curve_at(run, 20) == 3.0 and ca.curve_at(run, 20.5) is None


def test_context_shifts_split_steps_at_speaker_turns():
    positions = torch.tensor([0, 4, 8, 12, 16])
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    contexts = torch.stack([e0, e0, e0, e1, e1])[None]  # (1 layer, 5, 2): it turns between 8 and 12
    out = ca.context_shifts(positions, contexts, turn_offsets=[0, 10], block_size=4)
    assert out["at_turn"] == [1.0] and out["within"] == [0.0]  # 1 - cos(90 degrees) = 1
    assert (out["n_at_turn"], out["n_within"]) == (1, 2)  # the step 0 -> 4 starts inside the first block


def test_held_out_scene_is_a_scene_of_the_held_out_split():
    data = ca.encode_tensor(ca.load_text("shakespeare"))
    train, _ = ca.train_val_split(data)
    name, scene, turns = ca.held_out_scene(data, len(train), 3000)
    text = bytes(scene.tolist()).decode("utf-8", "replace")
    assert 1000 < len(scene) <= 3000 and " / SCENE " in name
    assert turns[0][0] == 0 and all(text[o:].startswith(speaker + ":\n") for o, speaker in turns if o < 2900)
    # it is where the data says it is, after the split
    start = bytes(data.tolist()).find(bytes(scene.tolist()), len(train))
    assert start >= len(train)
    assert ca.held_out_scene(torch.tensor(list(b"not the corpus at all" * 100)), 10, 100) is None


# --- The script ---------------------------------------------------------------------------------------------------


TINY = ["--max_iters", "30", "--eval_interval", "10", "--eval_batches", "2", "--batch_size", "8", "--block_size",
        "48", "--n_layer", "2", "--n_embd", "32", "--scene_bytes", "400", "--scene_stride", "16", "--threads", "1",
        "--learning_rate", "3e-3"]


def test_tiny_run_writes_results_and_plots(tmp_path):
    out = tmp_path / "run"
    results = ca.main(TINY + ["--out_dir", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("python part10_semantic/context_attention.py --max_iters 30")
    for name in ca.VARIANTS:
        for key in (f"bits_per_byte_{name}", f"first_token_attention_{name}", f"params_{name}",
                    f"train_seconds_{name}", f"step_time_ratio_{name}"):
            assert saved[key] == results[key] and saved[key] > 0, key
        curve = saved["curves"][name]
        assert curve[0]["iter"] == 0 and curve[-1]["val_bits_per_byte"] < curve[0]["val_bits_per_byte"] - 0.5
        assert curve[0]["val_bits_per_byte"] == pytest.approx(math.log2(256), abs=0.3)  # starts near uniform
    for name in ("context_gate", "output_gate", "both"):
        assert f"bits_per_byte_{name}_equal_time" in saved and f"bits_per_byte_baseline_at_time_of_{name}" in saved
        assert saved[f"params_{name}"] > saved["params_baseline"]
    for key in ("mean_gate_output_gate", "mean_gate_both", "mean_gate_context_gate_lambda_q",
                "mean_gate_context_gate_lambda_k"):
        assert 0 < saved[key] < 1, key
    assert len(saved["first_token_attention_baseline_per_head"]) == 2
    assert saved["first_token_attention_uniform"] == pytest.approx(ca.uniform_first_token_attention(48), abs=1e-4)
    assert saved["context_shift_at_speaker_turn"] is None or len(saved["context_shift_at_speaker_turn"]) == 2
    for png in ("loss.png", "gates.png", "attention_sink.png", "context_dynamics.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in rows} == set(ca.VARIANTS)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_configs"]["both"]))
    model.load_state_dict(ckpt["models"]["both"])
    with pytest.raises(FileExistsError):  # a second run into the same folder is refused
        ca.main(TINY + ["--out_dir", str(out)])


@pytest.mark.parametrize("flags, message", [
    (["--variants", "baseline,bogus"], "unknown bogus"),
    (["--variants", "output_gate"], "must include baseline"),
    (["--n_embd", "30", "--n_head", "4"], "divisible by --n_head"),
    (["--max_iters", "0"], "--max_iters must be >= 1"),
])
def test_bad_flags_are_refused_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ca.main(flags + ["--out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
