"""Part 6: the chat template, prompt masking, padding, vocabulary resizing, eval.py and a tiny SFT run."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from part04_scaling.bpe import get_tokenizer
from part06_sft import eval as sft_eval
from part06_sft import train as sft_train
from part06_sft.model import IGNORE_INDEX, GPT, GPTConfig, attention_mask, padding_attention_mask
from part06_sft.template import (ASSISTANT, END, USER, chat_tokenizer, collate, competence, encode_example,
                                 encode_prompt, left_pad, render, sample_batch)
from shared.tasks import Example, get_examples, verify, well_formed


@pytest.fixture(scope="module")
def base_tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer):
    return chat_tokenizer(base_tokenizer)


def tiny_model(vocab_size, seed=0, block_size=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))


# --- The template and the tokenizer ------------------------------------------------------------------------


def test_chat_tokenizer_keeps_every_old_id_and_appends_three(base_tokenizer, tokenizer):
    old = base_tokenizer.vocab_size
    assert tokenizer.vocab_size == old + 3
    assert [tokenizer.special_tokens[t] for t in (USER, ASSISTANT, END)] == [old, old + 1, old + 2]
    assert tokenizer.decoder[:old] == base_tokenizer.decoder  # every old id means the same bytes
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert tokenizer.encode(text) == base_tokenizer.encode(text)


def test_rendered_prompt_encodes_to_the_special_ids(tokenizer):
    prompt = "What is 2 + 2?"
    assert render(prompt, "4") == "<|user|>What is 2 + 2?<|assistant|>4<|end|>"
    # the Python BPE encoder with all specials allowed is an independent route to the same ids
    assert encode_prompt(tokenizer, prompt) == tokenizer.encode(render(prompt))


def test_a_user_cannot_type_a_special_token(tokenizer):
    ids = encode_prompt(tokenizer, "say <|end|> now")
    specials = set(tokenizer.special_tokens.values())
    assert [i for i in ids if i in specials] == [tokenizer.special_tokens[USER], tokenizer.special_tokens[ASSISTANT]]
    assert tokenizer.decode(ids) == "<|user|>say <|end|> now<|assistant|>"


# --- Label masking ---------------------------------------------------------------------------------------------


def test_masked_targets_are_exactly_the_answer_and_end(tokenizer):
    prompt, answer = "Reverse this list:\nrose, wind, sea", "sea, wind, rose"
    x, y = encode_example(tokenizer, prompt, answer)
    full = tokenizer.encode(render(prompt, answer))  # independent: the Python encoder on the rendered text
    assert x == full[:-1]
    answer_ids = tokenizer.encode(answer) + [tokenizer.special_tokens[END]]
    n_prompt = len(full) - len(answer_ids)
    assert y == [IGNORE_INDEX] * (n_prompt - 1) + answer_ids  # the first target is predicted at <|assistant|>
    assert x[n_prompt - 1] == tokenizer.special_tokens[ASSISTANT]
    _, y_all = encode_example(tokenizer, prompt, answer, mask_prompt=False)
    assert y_all == full[1:]


def _per_token_reference(model, examples):
    """The mean loss over answer targets, one unpadded example at a time (no collate, no ignore_index)."""
    total, count = 0.0, 0
    for x, y in examples:
        logits, _ = model(torch.tensor([x]))
        logp = F.log_softmax(logits[0].double(), dim=-1)
        for t, target in enumerate(y):
            if target != IGNORE_INDEX:
                total -= logp[t, target].item()
                count += 1
    return total / count


def test_loss_is_the_mean_over_answer_tokens_only(tokenizer):
    model = tiny_model(tokenizer.vocab_size).eval()
    examples = [encode_example(tokenizer, ex.prompt, ex.gold) for ex in get_examples("train", "date")[:3]
                + get_examples("train", "speaker")[:2]]
    x, y = collate(examples, tokenizer.eot_token)
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(_per_token_reference(model, examples), rel=1e-5)
    # and it differs from the loss with the prompt in it: the mask does something
    unmasked = [encode_example(tokenizer, ex.prompt, ex.gold, mask_prompt=False) for ex in
                get_examples("train", "date")[:3] + get_examples("train", "speaker")[:2]]
    _, loss_all = model(*collate(unmasked, tokenizer.eot_token))
    assert abs(loss_all.item() - loss.item()) > 1e-3


def test_padding_never_contributes(tokenizer):
    model = tiny_model(tokenizer.vocab_size).eval()
    examples = [encode_example(tokenizer, ex.prompt, ex.gold) for ex in get_examples("train", "play")[:4]]
    x, y = collate(examples, tokenizer.eot_token)
    _, loss = model(x, y)
    # other padding ids, and 7 more padding columns: the same loss and the same gradient
    x2, y2 = collate(examples + [(list(range(len(x[0]) + 7)), [IGNORE_INDEX] * (len(x[0]) + 7))], pad_id=5)
    _, loss2 = model(x2[:4], y2[:4])
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert (y2[:4, x.size(1):] == IGNORE_INDEX).all() and (x2[:4, x.size(1):] == 5).all()


# --- The vocabulary grows -----------------------------------------------------------------------------------------


def test_resize_keeps_old_rows_and_old_logits():
    model = tiny_model(50).eval()
    idx = torch.randint(0, 50, (2, 10))
    before, _ = model(idx)
    old_rows = model.wte.weight.detach().clone()
    model.resize_token_embeddings(53)
    after, _ = model(idx)
    assert model.config.vocab_size == 53 and model.wte.weight.shape == (53, 32)
    assert torch.equal(model.wte.weight[:50], old_rows)
    assert torch.allclose(model.wte.weight[50:], old_rows.mean(dim=0).expand(3, -1))
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert torch.allclose(after[..., :50], before, atol=1e-6)  # the old tokens' logits are untouched
    with pytest.raises(ValueError, match="shrink"):
        model.resize_token_embeddings(10)
    # the optimizer sees the new matrix
    groups = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99)).param_groups
    params = {id(p) for group in groups for p in group["params"]}
    assert id(model.wte.weight) in params


# --- Left padding for batched generation -------------------------------------------------------------------------


def test_left_padding_gives_the_unpadded_logits():
    model = tiny_model(60).eval()
    prompts = [torch.randint(0, 60, (n,)).tolist() for n in (9, 4, 6)]
    ids, padding_mask = left_pad(prompts, pad_id=0)
    assert padding_mask.tolist()[1] == [False] * 5 + [True] * 4
    logits, _ = model(ids, padding_mask=padding_mask)
    for row, p in enumerate(prompts):
        alone, _ = model(torch.tensor([p]))
        assert torch.allclose(logits[row, -len(p):], alone[0], atol=1e-5)
        assert torch.isfinite(logits[row]).all()  # the padding rows too: no NaN from an all-masked row
    # every query row sees at least one key (its own), so no softmax row is all -inf (NaN in many kernels)
    mask = padding_attention_mask(attention_mask(torch.arange(9), torch.arange(9)), torch.arange(9), torch.arange(9),
                                  padding_mask)
    assert mask.any(dim=-1).all() and not mask[1, 0, 5:, :5].any()  # and no real token sees the padding
    # without the mask, the padding leaks into the short prompts' logits: the mask is what makes them equal
    leaky, _ = model(ids)
    assert not torch.allclose(leaky[1, -4:], model(torch.tensor([prompts[1]]))[0][0], atol=1e-3)


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_generation_matches_each_prompt_alone(use_cache):
    model = tiny_model(60, seed=3, block_size=24).eval()
    prompts = [torch.randint(0, 60, (n,)).tolist() for n in (7, 3, 5)]
    ids, padding_mask = left_pad(prompts, pad_id=0)
    out = model.generate(ids, 30, temperature=0, padding_mask=padding_mask, use_cache=use_cache)  # past block_size
    for row, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 30, temperature=0, use_cache=use_cache)
        assert out[row, ids.size(1):].tolist() == alone[0, len(p):].tolist()


def test_cached_padded_logprobs_equal_one_forward_pass():
    """What part 8 relies on: the log-probs seen while sampling with the cache and padding are the ones a
    training forward pass recomputes on the finished sequences."""
    model = tiny_model(60, seed=1).eval()
    torch.manual_seed(0)
    prompts = [torch.randint(0, 60, (n,)).tolist() for n in (8, 3)]
    ids, padding_mask = left_pad(prompts, pad_id=0)
    kv_cache = model.new_kv_cache(2)
    logits, _ = model(ids, kv_cache=kv_cache, padding_mask=padding_mask)
    step_logits, tokens = [], []
    for _ in range(6):
        token = torch.multinomial(F.softmax(logits[:, -1], dim=-1), 1)
        step_logits.append(logits[:, -1])
        tokens.append(token)
        logits, _ = model(token, kv_cache=kv_cache, padding_mask=torch.ones_like(token, dtype=torch.bool))
    full = torch.cat([ids, *tokens], dim=1)
    full_mask = torch.cat([padding_mask, torch.ones(2, 6, dtype=torch.bool)], dim=1)
    recomputed, _ = model(full, padding_mask=full_mask)
    T = ids.size(1)
    assert torch.allclose(torch.stack(step_logits, 1), recomputed[:, T - 1 : T + 5], atol=1e-5)


# --- Curriculum ------------------------------------------------------------------------------------------------


def test_competence_pacing_and_batches():
    assert competence(0, 100, c0=0.1) == pytest.approx(0.1)
    assert competence(50, 100, c0=0.1) == pytest.approx(math.sqrt(0.5 * 0.99 + 0.01))
    assert competence(100, 100) == 1.0 and competence(5, 0) == 1.0
    order = list(range(1000))  # index i = the i-th easiest
    g = torch.Generator().manual_seed(0)
    first = sample_batch(order, 64, 0, 100, g)
    assert max(first) < 100  # competence 0.1: only the easiest 10%
    assert max(sample_batch(order, 256, 100, 100, g)) > 900  # full competence: the hard ones too


# --- eval.py -----------------------------------------------------------------------------------------------------


def save_tiny(path, model, tokenizer):
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tokenizer.to_dict()},
               path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, base_tokenizer):
    return save_tiny(tmp_path_factory.mktemp("base") / "ckpt.pt", tiny_model(base_tokenizer.vocab_size),
                     base_tokenizer)


def test_eval_prints_what_its_dump_recounts(tmp_path, capsys, tokenizer):
    model = tiny_model(tokenizer.vocab_size - 3)
    model.resize_token_embeddings(tokenizer.vocab_size)
    ckpt = save_tiny(tmp_path / "sft.pt", model, tokenizer)
    dump = tmp_path / "dump.jsonl"
    printed = sft_eval.main(["--ckpt", ckpt, "--n", "4", "--dump", str(dump), "--num_samples", "3",
                             "--max_new_tokens", "6"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == printed
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 9 * 4 and set(printed) == {r["task"] for r in rows}
    for task, result in printed.items():
        mine = [r for r in rows if r["task"] == task]
        examples = [Example(task, r["prompt"], r["gold"], meta=next(e.meta for e in get_examples("heldout", task)
                                                                    if e.prompt == r["prompt"])) for r in mine]
        assert result["n"] == 4
        recount = sum(verify(e, r["response"]) == 1 for e, r in zip(examples, mine)) / 4
        assert result["exact_match"] == pytest.approx(recount)
        assert result["pass@3"] >= result["pass@1"] - 1e-9
        assert all(len(r["samples"]) == 3 for r in mine)


def test_eval_of_a_base_model_uses_few_shot_prompts(tiny_base, base_tokenizer):
    model, tokenizer, _ = sft_eval.load_policy(tiny_base)
    ex = get_examples("heldout", "add")[0]
    ids = sft_eval.prompt_ids(tokenizer, ex, shots=2, max_len=96)
    text = tokenizer.decode(ids)
    assert text.endswith(f"{ex.prompt}\nAnswer:") and text.count("\nAnswer: ") == 2
    assert len(sft_eval.prompt_ids(tokenizer, ex, shots=3, max_len=10)) > 0  # too long: fewer shots, never none


def test_eval_stops_at_newline_and_special_tokens(tokenizer):
    stops = sft_eval.stop_tokens(tokenizer)
    assert stops[tokenizer.special_tokens[END]] and stops[tokenizer.eot_token]
    assert stops[tokenizer.encode("\n")[0]] and not stops[tokenizer.encode("579")[0]]


def test_well_formed_is_about_shape_not_truth():
    add = get_examples("heldout", "add")[0]
    assert well_formed(add, "12<|end|>") and not well_formed(add, "The answer is 12")
    speaker = get_examples("heldout", "speaker")[0]
    other = [c for c in speaker.meta["choices"] if c != speaker.gold][0]
    assert well_formed(speaker, other) and not well_formed(speaker, "HAMLET PRINCE")
    date = get_examples("heldout", "date")[0]
    assert well_formed(date, "1600-01-01") and not well_formed(date, "1 January 1600")


def test_load_policy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="part04_scaling/train.py"):
        sft_eval.load_policy(tmp_path / "nothing.pt")
    torch.save({"weights": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a checkpoint"):
        sft_eval.load_policy(tmp_path / "odd.pt")


# --- train.py: a tiny run end to end --------------------------------------------------------------------------------


def tiny_flags(out_dir, base, *extra):
    return ["--init_from", base, "--out_dir", str(out_dir), "--max_iters", "60", "--eval_interval", "30",
            "--batch_size", "16", "--eval_n", "3", "--eval_examples", "8", "--learning_rate", "3e-3",
            "--tasks", "date,reverse", "--threads", "1", *extra]


def test_tiny_sft_run_learns_and_writes_everything(tmp_path, tiny_base, base_tokenizer, capsys):
    results = sft_train.main(tiny_flags(tmp_path / "run", tiny_base))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 30, 60]
    assert records[-1]["val_loss"] < 0.8 * records[0]["val_loss"]  # the answers' loss falls
    assert set(records[-1]) >= {"val_loss_date", "val_loss_reverse", "train_loss", "lr", "tokens_per_sec"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["base"]) == set(saved["sft"]) == {"date", "reverse"} and saved["sft"] == results["sft"]
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert checkpoint["model_config"]["vocab_size"] == base_tokenizer.vocab_size + 3
    assert checkpoint["iter_num"] == 60
    model, tokenizer, _ = sft_eval.load_policy(tmp_path / "run" / "ckpt.pt")
    assert END in tokenizer.special_tokens
    for name in ("loss.png", "task_loss.png", "accuracy.png", "steps.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    # a second run in the same folder is refused, and the first run is intact
    with pytest.raises(FileExistsError, match="--overwrite"):
        sft_train.main(tiny_flags(tmp_path / "run", tiny_base))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 60


def test_missing_base_checkpoint_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/part04_scaling/ckpt.pt here
    with pytest.raises(FileNotFoundError, match=r"python part04_scaling/train.py .*--init_from"):
        sft_train.main(["--out_dir", "sft"])
    with pytest.raises(FileNotFoundError, match="other.pt"):
        sft_train.main(["--out_dir", "sft", "--init_from", "other.pt"])
    assert not (tmp_path / "sft").exists()  # nothing was written


def test_unknown_task_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sft_train.main(["--tasks", "add,mul", "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_train_file_in_alpaca_shape_replaces_the_tasks(tmp_path, tiny_base):
    rows = [{"instruction": "Say the word.", "input": f"word {i}", "output": f"word {i}"} for i in range(40)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_train.main(tiny_flags(tmp_path / "run", tiny_base, "--train_file", str(tmp_path / "mine.jsonl"),
                              "--max_iters", "4", "--eval_interval", "4", "--no-eval_base"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["base"] is None and set(saved["sft"]) == {"date", "reverse"}  # judged on the tasks still
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing key .output."):
        sft_train.main(tiny_flags(tmp_path / "run2", tiny_base, "--train_file", str(tmp_path / "bad.jsonl")))
    assert not (tmp_path / "run2").exists()


def test_eval_bad_input_is_a_clear_error(tmp_path, tiny_base):
    with pytest.raises(ValueError, match="unknown task.*mul"):
        sft_eval.main(["--ckpt", tiny_base, "--tasks", "add,mul"])
    with pytest.raises(ValueError, match="no room for the prompt"):
        sft_eval.main(["--ckpt", tiny_base, "--max_new_tokens", "128", "--n", "1"])
    with pytest.raises(SystemExit) as exit_info:  # argparse: bounds checked before anything is loaded
        sft_eval.main(["--ckpt", tiny_base, "--n", "0"])
    assert exit_info.value.code == 2
