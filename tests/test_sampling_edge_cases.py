"""sample_next_token's edge cases, in every chapter that has it (parts 2-5 share the function, copied forward):
the most likely token always survives the filters, so top_p = 0 and top_k = 0 or 1 are greedy decoding (not NaN
probabilities), and a negative temperature, a negative top_k or a top_p outside [0, 1] is refused by name."""
import importlib

import pytest
import torch

CHAPTERS = ["part02_tiny_llm", "part03_modern", "part04_scaling", "part05_moe"]


def chapter_model(chapter: str):
    return importlib.import_module(f"{chapter}.model")


def random_logits(rows: int = 64, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chapter", CHAPTERS)
@pytest.mark.parametrize("filters", [dict(top_p=0.0), dict(top_p=1e-9), dict(top_k=0), dict(top_k=1),
                                     dict(top_k=0, top_p=0.0), dict(top_k=5, top_p=0.0)])
def test_filters_that_keep_nothing_keep_the_most_likely_token(chapter, filters):
    sample_next_token = chapter_model(chapter).sample_next_token
    logits = random_logits()
    for temperature in (1.0, 0.5, 2.0):
        torch.manual_seed(0)
        tokens = sample_next_token(logits, temperature=temperature, **filters)  # NaN probabilities would raise
        assert tokens.shape == (64, 1)
        assert torch.equal(tokens[:, 0], logits.argmax(dim=-1)), f"{filters}, temperature {temperature}: not greedy"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_a_small_top_p_still_samples_among_the_likely_tokens(chapter):
    # the fix keeps only the first token in addition to what top_p keeps: a nucleus of two stays two
    sample_next_token = chapter_model(chapter).sample_next_token
    logits = torch.tensor([0.45, 0.45, 0.1]).log().expand(4000, -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, top_p=0.5)[:, 0], minlength=3)
    assert counts[2] == 0 and counts[0] > 1500 and counts[1] > 1500, counts.tolist()


@pytest.mark.parametrize("chapter", CHAPTERS)
@pytest.mark.parametrize("kwargs,name", [(dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")),
                                                                                   "temperature"),
                                         (dict(top_k=-1), "top_k"), (dict(top_p=-0.1), "top_p"),
                                         (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p")])
def test_out_of_range_settings_are_refused_by_name(chapter, kwargs, name):
    sample_next_token = chapter_model(chapter).sample_next_token
    with pytest.raises(ValueError, match=name):
        sample_next_token(random_logits(rows=2), **kwargs)
    if "temperature" not in kwargs:  # refused also when greedy decoding would not look at the filter
        with pytest.raises(ValueError, match=name):
            sample_next_token(random_logits(rows=2), temperature=0, **kwargs)


def tiny_gpt(chapter: str):
    module = chapter_model(chapter)
    torch.manual_seed(0)
    extra = dict(n_expert=2, moe_top_k=1) if chapter == "part05_moe" else {}
    return module.GPT(module.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, **extra)).eval()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_generate_with_top_p_zero_is_greedy_generation(chapter):
    model = tiny_gpt(chapter)
    prompt = torch.randint(50, (2, 3), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 20, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_p=0.0), greedy)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_k=0), greedy)
