"""Talk to the fine-tuned model in the terminal: each answer streams in token by token.

Every line you type becomes one conversation in the chat template the model was trained on,
<|user|>your line<|assistant|>, and the model writes its answer until it emits <|end|> (or any other
special token) or reaches --max_new_tokens. The conversations are single-turn: SFT (train.py) showed
the model one question per conversation, so it has never seen a second <|user|> turn, and each line
starts afresh: nothing of the earlier lines is in the context.

The model knows the nine tasks of shared/tasks.py and little else; ask in their wording ("What is
201 + 144?", "Write 20 July 1608 as YYYY-MM-DD."). Some prompts have two lines ("Who speaks this line,
ROMEO or JULIET?" then the line): type \\n for the line break.

    python part06_sft/chat.py                                # chat; /quit or Ctrl-D (end of input) ends
    python part06_sft/chat.py --prompt "What is 12 + 30?"    # one answer, then exit (for scripts)
    echo "Write 3 March 1599 as YYYY-MM-DD." | python part06_sft/chat.py    # lines from a pipe work too
    python part06_sft/chat.py --temperature 0.8              # sample instead of the greedy answer
"""
import codecs
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `shared` and the chapter import from anywhere

import torch

from part04_scaling.bpe import Tokenizer
from part06_sft.eval import load_policy
from part06_sft.model import GPT
from part06_sft.template import CHAT_TOKENS, encode_prompt, has_chat_tokens
from shared.config import parse_config, run_cli
from shared.device import pick_device

QUIT = "/quit"


@dataclass
class ChatConfig:
    ckpt: str = field(default="runs/part06_sft/ckpt.pt", metadata={"help": "the fine-tuned checkpoint "
                                                                           "(python part06_sft/train.py writes it)"})
    prompt: str | None = field(default=None, metadata={"help": "answer this one prompt and exit (\\n = a line "
                                                                "break); none = chat, one line per conversation"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (the answer eval.py scores); > 0 samples",
                                                      "min": 0})
    max_new_tokens: int = field(default=64, metadata={"help": "the longest answer, in tokens", "min": 1})
    seed: int = field(default=1337, metadata={"help": "for sampling (--temperature > 0)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})


def check_config(cfg: ChatConfig) -> None:
    if not math.isfinite(cfg.temperature):
        raise ValueError(f"--temperature must be a finite number >= 0, got {cfg.temperature}")


def load_chat_model(ckpt_path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The fine-tuned model and its tokenizer; a clear error for a missing file or a model that cannot chat."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}; fine-tune the model first: python part06_sft/train.py")
    model, tokenizer, _ = load_policy(ckpt_path, device)
    if not has_chat_tokens(tokenizer):  # e.g. part 4's base model: it never saw the template
        raise ValueError(f"{ckpt_path} has no chat tokens ({', '.join(CHAT_TOKENS)}): it is a base model, not a "
                         "fine-tuned one; run python part06_sft/train.py first and chat with its checkpoint")
    return model, tokenizer


def chat_reply(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
               on_token=None) -> str:
    """The model's answer to one prompt, without the token that ended it.

    on_token(text), if given, receives the answer as it grows, piece by piece: the text each new token
    completes. A BPE token may end in the middle of a character ("é" is two bytes), so the incremental
    UTF-8 decoder holds such bytes back until the character is whole; the pieces joined are the answer.
    """
    ids = encode_prompt(tokenizer, prompt)  # the prompt as ordinary text: typing "<|end|>" cannot end the turn
    if len(ids) > model.config.block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens with the template; the model reads at most "
                         f"{model.config.block_size}: shorten it")
    device = next(model.parameters()).device
    stops = set(tokenizer.special_tokens.values())  # <|end|> ends the answer; any other special token, too
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    # model.stream: the prompt fills the KV cache once, then each step feeds only the newest token
    for token in model.stream(idx, max_new_tokens, temperature=temperature):
        token_id = token.item()
        if token_id in stops:
            break
        piece = utf8.decode(tokenizer.decoder[token_id])  # the token's bytes; "" while a character is incomplete
        pieces.append(piece)
        if on_token is not None and piece:
            on_token(piece)
    tail = utf8.decode(b"", final=True)  # an answer cut off mid-character ends in U+FFFD
    if tail:
        pieces.append(tail)
        if on_token is not None:
            on_token(tail)
    return "".join(pieces)


def print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()  # show each token as soon as it exists


def read_prompt(line: str) -> str:
    """A typed line -> the prompt: the two characters \\n become a line break."""
    return line.rstrip("\r\n").replace("\\n", "\n")


def repl(model: GPT, tokenizer: Tokenizer, cfg: ChatConfig, lines) -> list[str]:
    """Answer each line of `lines` (stdin) until /quit or the end of input; return the answers."""
    interactive = lines.isatty()  # a person at a terminal, not a pipe or a file
    replies = []
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = lines.readline()
        if not line or line.strip() == QUIT:  # "" is the end of input (Ctrl-D, or the end of a pipe)
            if interactive:
                print()
            return replies
        prompt = read_prompt(line)
        if not prompt.strip():
            continue
        if not interactive:  # piped input is not echoed by the terminal: show what is being answered
            print(f"you> {line.strip()}")
        print("model> ", end="", flush=True)
        try:
            replies.append(chat_reply(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, print_piece))
        except ValueError as err:  # a prompt too long: say so, and keep chatting
            print(f"error: {err}", end="")
        print()


def main(argv=None) -> list[str]:
    cfg = parse_config(ChatConfig, argv, description=__doc__.splitlines()[0], check=check_config)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_chat_model(cfg.ckpt, device)
    if cfg.prompt is not None:
        reply = chat_reply(model, tokenizer, read_prompt(cfg.prompt), cfg.max_new_tokens, cfg.temperature,
                           print_piece)
        print()
        return [reply]
    print(f"{cfg.ckpt}: one line = one conversation (single-turn); \\n for a line break; {QUIT} or Ctrl-D ends",
          file=sys.stderr)
    try:
        return repl(model, tokenizer, cfg, sys.stdin)
    except KeyboardInterrupt:  # Ctrl-C: leave quietly
        print()
        return []


if __name__ == "__main__":
    run_cli(main)
