"""Part 10, continuous thoughts (Coconut): the task generator against an independent solver, the sequences of every
method and every curriculum stage by hand, the thought mechanism (fed-back hidden states, no loss on thoughts, the
cached multi-pass forward against a naive recomputation), greedy generation, and a tiny end-to-end run."""
import json

import pytest
import torch
import torch.nn.functional as F

from part10_semantic import thoughts as th
from part10_semantic.model import IGNORE_INDEX, GPT, GPTConfig

# --- The task -----------------------------------------------------------------------------------------------------


def solve_by_eval(question: str) -> int:
    """Independent solver: nest the updates in parentheses (left to right), let Python evaluate the integer
    expression, then reduce mod 10 once (+, - and * are compatible with the reduction)."""
    text = question.rstrip("?")
    expr = text[0]
    for i in range(1, len(text), 2):
        expr = f"({expr}{text[i]}{text[i + 1]})"
    return eval(expr) % 10


def test_answers_and_every_cot_step_agree_with_an_independent_solver():
    train, heldout = th.make_split(2000, 200, 4, seed=0)
    for p in train[:500] + heldout:
        q = p.question()
        assert len(q) == 2 * 4 + 2 and q.endswith("?")
        assert p.answer() == f"#{solve_by_eval(q)}"
        # each written step is a true equation mod 10, chained: its left operand is the previous step's result
        prev = int(q[0])
        for i, step in enumerate(p.steps()):
            lhs, rhs = step.rstrip(";").split("=")
            assert int(lhs[0]) == prev and lhs[1:] == q[1 + 2 * i : 3 + 2 * i]
            assert eval(f"({lhs}) % 10") == int(rhs)
            prev = int(rhs)
        assert p.answer() == f"#{prev}"


def test_a_problem_by_hand():
    p = th.Problem(3, "+*-", (4, 7, 5))  # 3+4 = 7, 7*7 = 49 -> 9, 9-5 = 4
    assert p.question() == "3+4*7-5?"
    assert p.steps() == ["3+4=7;", "7*7=9;", "9-5=4;"]
    assert p.answer() == "#4"
    assert th.Problem(2, "-", (8,)).answer() == "#4"  # -6 mod 10 = 4, never a negative digit


def test_every_update_is_a_permutation_of_the_digits():
    """The no-shortcut argument: each update maps the ten digits one-to-one (a *2 or *5 would not)."""
    for op, k in th.UPDATES:
        assert sorted(th.apply_update(v, op, k) for v in range(10)) == list(range(10))
    assert sorted(th.apply_update(v, "*", 2) for v in range(10)) != list(range(10))  # the check can fail


def test_splits_are_distinct_disjoint_and_deterministic():
    train, heldout = th.make_split(3000, 300, 3, seed=5)
    q_train, q_held = [p.question() for p in train], [p.question() for p in heldout]
    assert len(train) == 3000 and len(heldout) == 300
    assert len(set(q_train)) == 3000 and len(set(q_held)) == 300
    assert not set(q_train) & set(q_held)
    again = th.make_split(3000, 300, 3, seed=5)
    assert [p.question() for p in again[0]] == q_train and [p.question() for p in again[1]] == q_held
    other = th.make_split(3000, 300, 3, seed=6)
    assert [p.question() for p in other[1]] != q_held
    # the held-out set does not depend on how many training problems are drawn
    assert [p.question() for p in th.make_split(100, 300, 3, seed=5)[1]] == q_held
    with pytest.raises(ValueError, match="distinct problems"):
        th.make_split(200, 20, 1, seed=0)  # only 10 * 21 = 210 one-step problems exist


# --- The sequences of every method and stage, by hand -------------------------------------------------------------

P3 = th.Problem(3, "+*-", (4, 7, 5))
Q3 = list("3+4*7-5?")


def test_baseline_sequences_by_hand():
    s = th.no_cot_sequence(P3)
    assert s.tokens == Q3 + ["#", "4", "<end>"] and s.n_prompt == 8 and s.n_thoughts == 0
    s = th.cot_sequence(P3)
    assert s.tokens == Q3 + list("3+4=7;7*7=9;9-5=4;#4") + ["<end>"] and s.n_prompt == 8
    s = th.pause_sequence(P3, 3)
    assert s.tokens == Q3 + ["<pause>"] * 3 + ["#", "4", "<end>"] and s.n_prompt == 11 and s.n_thoughts == 0


@pytest.mark.parametrize("c", [1, 2])
def test_the_staged_curriculum_by_hand(c):
    t = ["<thought>"] * c
    expected = {
        0: (Q3 + list("3+4=7;7*7=9;9-5=4;#4") + ["<end>"], 8, 0),
        1: (Q3 + ["<bot>"] + t + ["<eot>"] + list("7*7=9;9-5=4;#4") + ["<end>"], 8 + 2 + c, c),
        2: (Q3 + ["<bot>"] + t * 2 + ["<eot>"] + list("9-5=4;#4") + ["<end>"], 8 + 2 + 2 * c, 2 * c),
        3: (Q3 + ["<bot>"] + t * 3 + ["<eot>"] + ["#", "4", "<end>"], 8 + 2 + 3 * c, 3 * c),
    }
    for stage, (tokens, n_prompt, n_thoughts) in expected.items():
        s = th.coconut_sequence(P3, stage, c)
        assert s.tokens == tokens, stage
        assert (s.n_prompt, s.n_thoughts) == (n_prompt, n_thoughts), stage
        if n_thoughts:
            assert s.thought_start == 9 and s.tokens[s.thought_start - 1] == "<bot>"
    # past the last stage every step stays replaced (the paper's max_latent_stage)
    assert th.coconut_sequence(P3, 5, c).tokens == expected[3][0]


def test_the_loss_starts_after_eot_and_skips_question_markers_and_thoughts():
    enc = th.encode_sequences([th.coconut_sequence(P3, 1, 2)])
    tokens = th.coconut_sequence(P3, 1, 2).tokens
    targets = enc.targets[0].tolist()
    # target t is token t + 1; learned exactly the tokens after <eot>
    learned = [th.VOCAB[x] for x in targets if x != IGNORE_INDEX]
    assert learned == list("7*7=9;9-5=4;#4") + ["<end>"]
    first = targets.index(next(x for x in targets if x != IGNORE_INDEX))
    assert tokens[first] == "<eot>"  # predicted from the <eot> position: the first word after the thoughts
    assert all(x == IGNORE_INDEX for x in targets[:first])
    # the last stage: no written step left, the answer follows <eot> at once and is read at <eot> and at "#"
    last = th.coconut_sequence(P3, 3, 2)
    targets = th.encode_sequences([last]).targets[0].tolist()
    assert [th.VOCAB[x] for x in targets if x != IGNORE_INDEX] == ["#", "4", "<end>"]
    first = targets.index(next(x for x in targets if x != IGNORE_INDEX))
    assert last.tokens[first] == "<eot>" and last.tokens[first + 1] == "#"
    # CoT: everything after the question is learned, the question is not
    cot = th.encode_sequences([th.cot_sequence(P3)]).targets[0].tolist()
    assert cot[:7] == [IGNORE_INDEX] * 7 and IGNORE_INDEX not in cot[7:]
    with pytest.raises(ValueError, match="layout"):
        th.encode_sequences([th.coconut_sequence(P3, 1, 1), th.coconut_sequence(P3, 2, 1)])


# --- The thought mechanism ----------------------------------------------------------------------------------------


def tiny_model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=40, vocab_size=len(th.VOCAB), n_layer=n_layer, n_head=2, n_embd=16)).eval()


def batch(stage=2, c=2, n=3, seed=0):
    problems = th.make_split(n, 1, 3, seed=seed)[0]
    return th.encode_sequences([th.coconut_sequence(p, stage, c) for p in problems])


def naive_thought_forward(model, idx, start, n):
    """The definition, by recomputation: run the whole sequence so far for every thought, append the last hidden
    state as the next input, and finally run everything once more."""
    x = model.wte(idx[:, :start])
    for _ in range(n):
        h = model.hidden_states(None, inputs_embeds=x)
        x = torch.cat((x, h[:, -1:]), dim=1)
    x = torch.cat((x, model.wte(idx[:, start + n :])), dim=1)
    return model.hidden_states(None, inputs_embeds=x)


def test_the_input_at_a_thought_position_is_the_previous_last_hidden_state():
    model, enc = tiny_model(), batch()
    idx = enc.ids[:, :-1]
    inputs = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            hidden = th.continuous_forward(model, idx, enc.thought_start, enc.n_thoughts)
    finally:
        hook.remove()
    assert len(inputs) == enc.n_thoughts + 1  # the paper's n + 1 sequential passes
    x = torch.cat(inputs, dim=1)  # what the first block read at every position
    assert x.shape == hidden.shape
    start, n = enc.thought_start, enc.n_thoughts
    for p in range(start, start + n):
        assert torch.equal(x[:, p], hidden[:, p - 1])
    words = torch.cat((x[:, :start], x[:, start + n :]), dim=1)
    assert torch.equal(words, model.wte(torch.cat((idx[:, :start], idx[:, start + n :]), dim=1)))
    # and not the placeholder's embedding: the check can fail
    assert not torch.allclose(x[:, start], model.wte(idx[:, start]))


@pytest.mark.parametrize("stage", [2, 3])  # 3: the last stage, no written step left after <eot>
def test_cached_multi_pass_forward_equals_naive_recomputation_with_gradients(stage):
    model, enc = tiny_model(), batch(stage=stage)
    idx = enc.ids[:, :-1]
    fast = th.continuous_forward(model, idx, enc.thought_start, enc.n_thoughts)
    slow = naive_thought_forward(model, idx, enc.thought_start, enc.n_thoughts)
    assert torch.allclose(fast, slow, atol=1e-5)
    # the same gradients reach the parameters through the KV cache as through recomputation
    g_fast = torch.autograd.grad(fast.pow(2).sum(), list(model.parameters()))
    g_slow = torch.autograd.grad(slow.pow(2).sum(), list(model.parameters()))
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # without the feedback (placeholder embeddings as inputs) the outputs differ: the comparison can fail
    plain = model.hidden_states(idx)
    assert not torch.allclose(plain[:, enc.thought_start :], slow[:, enc.thought_start :], atol=1e-3)
    # the words before the thoughts are the same either way (causality)
    assert torch.allclose(plain[:, : enc.thought_start], slow[:, : enc.thought_start], atol=1e-5)


def test_thought_positions_get_no_loss_and_the_gradient_flows_through_the_thoughts():
    model, enc = tiny_model(), batch()
    idx, targets = enc.ids[:, :-1], enc.targets
    inputs = []  # what the first block reads in each pass: the prefix, then each thought (the last with the rest)
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    try:
        hidden = th.continuous_forward(model, idx, enc.thought_start, enc.n_thoughts)
    finally:
        hook.remove()
    logits = model.lm_head(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(th.sequence_loss(model, enc.ids, targets, enc.thought_start,
                                                         enc.n_thoughts).item(), rel=1e-6)
    g_logits, *g_inputs = torch.autograd.grad(loss, [logits, *inputs])
    silent = g_logits.abs().sum(-1)[0]  # (T,)
    # the outputs at the question, <bot> and the thoughts (predicting thoughts and <eot>) have no loss
    assert torch.all(silent[: enc.n_prompt - 1] == 0)
    assert torch.all(silent[enc.n_prompt - 1 :] > 0)
    # yet every thought gets a gradient as an input: the answer's loss flows back through the fed-back states
    for g in g_inputs[1:]:
        assert g[:, 0].abs().sum(-1).min() > 0
    # the placeholder tokens' own ids do not matter (their embeddings are never read)
    other = idx.clone()
    other[:, enc.thought_start : enc.thought_start + enc.n_thoughts] = th.TOKEN_ID["7"]
    assert torch.equal(th.continuous_forward(model, other, enc.thought_start, enc.n_thoughts).detach(),
                       hidden.detach())


def test_new_markers_start_as_a_copy_of_the_step_separator():
    """As the reference code starts <bot>, <eot> and the latent token from a known token's embedding."""
    model = tiny_model()
    semicolon = model.wte.weight[th.TOKEN_ID[";"]].detach().clone()
    assert not torch.equal(model.wte.weight[th.TOKEN_ID["<bot>"]], semicolon)
    th.init_thought_markers(model)
    for token in ("<bot>", "<eot>", "<thought>"):
        assert torch.equal(model.wte.weight[th.TOKEN_ID[token]], semicolon)
        assert torch.equal(model.lm_head.weight[th.TOKEN_ID[token]], semicolon)  # tied head
    assert torch.equal(model.wte.weight[th.TOKEN_ID[";"]], semicolon)


def test_generate_continues_exactly_as_a_full_forward_would():
    model, enc = tiny_model(seed=3), batch(stage=1, c=2, n=4, seed=1)
    prompt = enc.ids[:, : enc.n_prompt]
    out = th.generate(model, prompt, enc.thought_start, enc.n_thoughts, max_new=6)
    full = torch.cat((prompt, out), dim=1)
    with torch.no_grad():
        hidden = naive_thought_forward(model, full, enc.thought_start, enc.n_thoughts)
    greedy = model.lm_head(hidden).argmax(-1)[:, enc.n_prompt - 1 : -1]
    assert torch.equal(greedy, out)


def test_parse_answer():
    assert th.parse_answer("3+4=7;#7<end>#2") == "7"
    assert th.parse_answer("#5") == "5"
    assert th.parse_answer("7;#") is None and th.parse_answer("abc") is None


def test_decode_thoughts_matches_a_loop_over_problems_thoughts_and_steps():
    """The match matrix of decode_thoughts against a plain Python count over the naive forward's thoughts."""
    model = tiny_model(seed=4)
    problems = th.make_split(6, 1, 3, seed=2)[0]
    c = 2
    enc = th.encode_sequences([th.coconut_sequence(p, 3, c) for p in problems])
    a = th.decode_thoughts(model, enc, problems, c)
    with torch.no_grad():
        hidden = naive_thought_forward(model, enc.ids[:, : enc.n_prompt], enc.thought_start, enc.n_thoughts)
        logits = model.lm_head(hidden)
    digits = [th.TOKEN_ID[str(d)] for d in range(10)]
    expected = [[0.0] * 3 for _ in range(3 * c)]
    for i, p in enumerate(problems):
        for j in range(3 * c):
            row = logits[i, enc.thought_start - 1 + j]  # thought j is the hidden state one position before it
            top = max(range(10), key=lambda d: row[digits[d]].item())
            for s, value in enumerate(p.values()[1:]):
                expected[j][s] += (top == value) / len(problems)
    assert torch.allclose(torch.tensor(a["digit_match"]), torch.tensor(expected), atol=1e-3)
    assert len(a["example_top3"]) == 3 * c and a["example_question"] == problems[0].question()


def test_the_answers_parity_needs_no_intermediate_value():
    """The shortcut that evaluate's accuracy_mod2 measures: x3, x7, x9 keep the parity and +k, -k add k mod 2, so the
    parity of the answer is the start plus the constants of the + and - updates, mod 2: no chain needed. Mod 5, the
    same sum misses most answers of the problems with a multiplication."""
    train, _ = th.make_split(3000, 10, 3, seed=3)
    def additive(p, m):
        return (p.start + sum(k if op == "+" else -k for op, k in zip(p.ops, p.consts) if op in "+-")) % m
    assert all(additive(p, 2) == p.values()[-1] % 2 for p in train)
    with_products = [p for p in train if "*" in p.ops]
    assert sum(additive(p, 5) == p.values()[-1] % 5 for p in with_products) < 0.5 * len(with_products)


@pytest.mark.parametrize("shift, expected", [(0, (1, 1, 1)), (5, (0, 0, 1)), (6, (0, 1, 0)), (1, (0, 0, 0))])
def test_evaluate_scores_the_answer_and_its_halves_mod_2_and_mod_5(monkeypatch, shift, expected):
    """A fake generator answers gold + shift: +5 keeps the digit mod 5 and flips the parity, +6 the reverse."""
    problems = th.make_split(40, 1, 3, seed=4)[0]
    data = th.encode_sequences([th.no_cot_sequence(p) for p in problems])
    answers = iter([p.values()[-1] for p in problems])

    def fake_generate(model, prompt, thought_start, n_thoughts, max_new):
        rows = [th.encode(["#", str((next(answers) + shift) % 10), "<end>"]) for _ in range(prompt.size(0))]
        return torch.tensor(rows)

    monkeypatch.setattr(th, "generate", fake_generate)
    scores = th.evaluate(tiny_model(), data, problems)
    assert (scores["accuracy"], scores["accuracy_mod2"], scores["accuracy_mod5"]) == expected
    assert scores["positions"] == 3  # "#", the digit, <end>


def test_linear_probe_finds_a_value_that_is_linearly_encoded_and_only_that(monkeypatch):
    """Fake thoughts: thought 1 is the one-hot of the first value plus noise, thought 2 pure noise. The probe must
    read value 1 off thought 1 (nearly always), and nothing off thought 2; value 2 (value 1 pushed through an update
    the thought does not hold) stays near chance even from thought 1."""
    train_p, held_p = th.make_split(1500, 300, 3, seed=6)
    train = th.encode_sequences([th.coconut_sequence(p, 3, 1) for p in train_p])
    held = th.encode_sequences([th.coconut_sequence(p, 3, 1) for p in held_p])
    gen = torch.Generator().manual_seed(0)

    def fake_thoughts(problems):
        v1 = torch.tensor([p.values()[1] for p in problems])
        signal = F.one_hot(v1, 16).float()
        return torch.stack((signal + 0.15 * torch.randn(len(problems), 16, generator=gen),
                            torch.randn(len(problems), 16, generator=gen)), dim=1)  # (N, 2 thoughts, 16)

    fakes = {id(train): fake_thoughts(train_p), id(held): fake_thoughts(held_p)}
    monkeypatch.setattr(th, "thought_states", lambda model, data: fakes[id(data)])
    acc = th.probe_thoughts(None, train, train_p, held, held_p)
    assert len(acc) == 2 and len(acc[0]) == 3
    assert acc[0][0] > 0.95  # value 1 from thought 1
    assert acc[0][1] < 0.3 and acc[0][2] < 0.3  # values 2 and 3 are not linear in value 1 alone
    assert max(acc[1]) < 0.3  # noise carries nothing


# --- The run ------------------------------------------------------------------------------------------------------


def test_tiny_end_to_end_run(tmp_path):
    results = th.main(["--n_steps", "2", "--n_train", "400", "--n_heldout", "30", "--n_layer", "1", "--n_head", "2",
                       "--n_embd", "16", "--batch_size", "16", "--baseline_iters", "40", "--stage_iters", "5",
                       "--final_stage_iters", "10", "--thoughts_per_step", "1,2", "--eval_interval", "10",
                       "--warmup_iters", "5", "--threads", "1", "--device", "cpu", "--out_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ["accuracy_no_cot", "accuracy_cot", "accuracy_pause", "accuracy_coconut_c1", "accuracy_coconut_c2",
                "tokens_per_answer_cot", "tokens_per_answer_coconut_c2", "seconds_cot", "seconds", "command",
                "accuracy_mod2_no_cot", "accuracy_mod5_coconut_c2"]:
        assert key in saved, key
    assert saved["accuracy_cot"] == results["accuracy_cot"]
    assert all(0 <= saved[k] <= 1 for k in saved if k.startswith("accuracy_"))
    # positions per answer: the fixed prompt part (c=2: <bot>, 2 * 2 thoughts, <eot>; pause: 2 * 2 pauses), plus what
    # the model generated up to <end>: at least 1, at most the gold continuation "#d<end>" + 2 tokens of slack
    assert saved["pause_tokens"] == 2 * 2
    for name, fixed in (("no_cot", 0), ("pause", 4), ("coconut_c2", 6), ("coconut_c1", 4)):
        assert 1 <= saved[f"tokens_per_answer_{name}"] - fixed <= 5, name
    assert 1 <= saved["tokens_per_answer_cot"] <= 2 * 6 + 3 + 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cot = [r["train_loss"] for r in rows if r["run"] == "cot"]
    assert cot[-1] < cot[0]  # the loss fell
    assert len(saved["coconut_stages"]["c1"]) == 3  # stage 0 (the CoT model), 1, 2
    for a in saved["thought_analysis"]:  # one LM-head matrix and one probe matrix (n_thoughts, n_steps) per stage
        assert len(a["probe_accuracy"]) == len(a["digit_match"]) == a["stage"] * a["c"]
        assert all(len(row) == 2 and all(0 <= x <= 1 for x in row) for row in a["probe_accuracy"])
    for name in ("accuracy.png", "loss.png", "thoughts.png"):
        assert (tmp_path / name).stat().st_size > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["models"]) == {"no_cot", "cot", "pause", "coconut_c1", "coconut_c2"}


@pytest.mark.parametrize("flags, message", [(["--thoughts_per_step", "0"], "thoughts_per_step"),
                                            (["--n_embd", "30", "--n_head", "4"], "divisible")])
def test_bad_flags_get_a_one_line_error(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        th.main(flags + ["--out_dir", str(tmp_path)])
    assert message in capsys.readouterr().err
