"""Part 4 reference solutions. Try exercises.py first; `pytest tests/test_part04_exercises.py -rs` checks both."""
import math

import regex
import torch

from part04_scaling.bpe import GPT4_SPLIT_PATTERN


def _pair_counts(chunks: list[list[int]]) -> dict[tuple[int, int], int]:
    counts = {}
    for ids in chunks:  # pairs never cross a chunk boundary
        for pair in zip(ids, ids[1:]):  # overlapping pairs count: [7, 7, 7] has (7, 7) twice
            counts[pair] = counts.get(pair, 0) + 1
    return counts


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2  # both ids are used up
        else:
            out.append(ids[i])
            i += 1
    return out


def ex01_train_bpe(text: str, n_merges: int) -> list[tuple[int, int]]:
    chunks = [list(chunk.encode("utf-8")) for chunk in regex.findall(GPT4_SPLIT_PATTERN, text)]
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = _pair_counts(chunks)  # recount: a merge changes its neighbours' pairs
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent; the smallest pair on a tie
        chunks = [_merge(ids, pair, new_id) for ids in chunks]
        merges.append(pair)
    return merges


def ex02_bpe_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    vocab = [bytes([b]) for b in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    rank = {token: i for i, token in enumerate(vocab)}  # bytes -> id, tiktoken's mergeable_ranks
    ids = []
    for chunk in regex.findall(GPT4_SPLIT_PATTERN, text):
        piece = chunk.encode("utf-8")
        if piece in rank:  # tiktoken: a chunk that is a token is that token
            ids.append(rank[piece])
            continue
        # tiktoken's rule: merge the adjacent pair whose concatenated BYTES form the lowest-ranked token
        # (leftmost on a tie), until no adjacent pair is a token. Not "replay the (id, id) merges": with
        # merges (a, b), (b, c), (a, bc), "abcd" becomes [abc, d] here but [ab, c, d] by replaying.
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while True:
            candidates = [(rank[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in rank]
            if not candidates:
                break
            _, i = min(candidates)  # the lowest rank; the leftmost on a tie
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(rank[part] for part in parts)
    return ids


def ex03_lr_warmup_cosine(it: int, warmup_iters: int, decay_iters: int, lr: float, min_lr: float) -> float:
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (decay_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def ex04_accumulate_gradients(model: torch.nn.Module, micro_batches: list) -> float:
    total = 0.0
    for x, y in micro_batches:
        _, loss = model(x, y)
        loss = loss / len(micro_batches)  # the big batch's loss is the mean of the micro-batch losses
        loss.backward()  # adds this micro-batch's share to .grad
        total += loss.item()
    return total


def ex05_resume(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> int:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["rng"]["batches"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return checkpoint["iter_num"]


def ex06_int8_quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): one scale per row
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def ex07_bpe_bytes_per_token(train_text: str, val_text: str, vocab_size: int) -> float:
    from part04_scaling.bpe import train

    tokenizer = train(train_text, vocab_size, special_tokens=(), verbose=False)
    return len(val_text.encode("utf-8")) / len(tokenizer.encode(val_text))
