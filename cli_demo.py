"""Chat with a fine-tuned model in the terminal, the reply streaming as it is generated.

Takes any output folder: a LoRA adapter (its base model is loaded under it), a merged model, a full fine-tune or a
GPTQ model. The conversation is rendered with the same chat template code as training.

    python cli_demo.py -c output_qwen                       # interactive; :help lists the commands
    python cli_demo.py -c output_qwen --system "Answer in French." --temperature 0
    python cli_demo.py -c output_qwen --query "What is your name?"   # one reply, then exit
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import os
import signal
import sys
from dataclasses import dataclass, field

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft.chat import ChatTemplateError, GenerationSettings, conversation, load_for_chat, stream_reply
from sft.data import Conversation, load_tools
from sft.errors import run_main
from sft.modeling import ModelPathError

HELP = """Commands:
  :help            :h     show this help
  :exit :quit      :q     exit (Ctrl-D too)
  :clear           :cl    clear the screen
  :clear-history   :clh   forget the conversation so far
  :history         :his   show the conversation so far
  :seed [N]               show the random seed, or set it to N (it is set again before every reply)
  :conf [key=value ...]   show the generation settings, or change them for the next replies
                          (e.g. :conf temperature=0 max_new_tokens=128; temperature=0 is greedy)
  :reset-conf             go back to the settings the demo started with
  :system [text]          show the system prompt, or set it for the next replies
Ctrl-C stops a reply and keeps the conversation; Ctrl-D exits."""

USER_PROMPT = "User> "
ASSISTANT_PREFIX = "Assistant: "
CLEAR_SCREEN = "\033[H\033[2J"


@dataclass
class Session:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    settings: GenerationSettings
    seed: int
    system: str | None = None
    history: Conversation = field(default_factory=list)
    tools: list[dict] | None = None
    initial_settings: GenerationSettings = field(init=False)

    def __post_init__(self) -> None:
        self.initial_settings = self.settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-c", "--checkpoint-path", required=True, help="adapter, merged, full fine-tune or GPTQ output folder"
    )
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    parser.add_argument("--tools", default=None, help="JSON file with a list of tool schemas the model may call")
    parser.add_argument("-s", "--seed", type=int, default=1234, help="random seed, set before every reply")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when there is a GPU")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model folder's own code")
    parser.add_argument("--query", default=None, help="print the reply to this message and exit")
    generation = parser.add_argument_group("generation (default: the model's generation_config.json)")
    generation.add_argument("--max_new_tokens", type=int, default=None)
    generation.add_argument("--temperature", type=float, default=None, help="0 means greedy decoding")
    generation.add_argument("--top_p", type=float, default=None)
    generation.add_argument("--top_k", type=int, default=None, help="0 turns top-k sampling off")
    generation.add_argument("--repetition_penalty", type=float, default=None)
    generation.add_argument("--min_new_tokens", type=int, default=None, help="generate at least this many tokens")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint_path):
        raise ModelPathError(f"--checkpoint-path {args.checkpoint_path}: no such folder")
    # Bad values fail here, before the model is loaded (ConfigurationError, DataError).
    GenerationSettings(**_overrides(args)).checked()
    args.tools = load_tools(args.tools) if args.tools else None
    return args


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def answer(session: Session, query: str) -> None:
    """Streams the reply to the terminal and adds the exchange to the history; Ctrl-C keeps what was said so far.

    A message the chat template refuses (a role or tools it does not support) is reported and left out of the
    history: the session goes on as before it, so the user can rephrase or change the system prompt."""
    messages = conversation(session.history, query, session.system, session.tools)
    try:
        stream = stream_reply(session.model, session.tokenizer, messages, session.settings, session.seed)
    except ChatTemplateError as error:
        print(f"error: {error} (the message was not added to the conversation)", file=sys.stderr, flush=True)
        return
    print(ASSISTANT_PREFIX, end="", flush=True)
    pieces: list[str] = []
    try:
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
    except KeyboardInterrupt:
        stream.close()  # stops the generation thread
        print("\n[reply stopped]")
        if not pieces:
            return
    session.history += [{"role": "user", "content": query}, {"role": "assistant", "content": "".join(pieces).strip()}]


def show_history(session: Session) -> None:
    if not session.history:
        print("(no history)")
    for message in session.history:
        print(f"[{message['role']}] {message['content']}")


def run_command(session: Session, line: str) -> bool:
    """Carries out a :command; False means exit."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in (":exit", ":quit", ":q"):
        return False
    if command in (":help", ":h"):
        print(HELP)
    elif command in (":clear", ":cl"):
        print(CLEAR_SCREEN, end="", flush=True)
    elif command in (":clear-history", ":clh"):
        session.history = []
        print("History cleared.")
    elif command in (":history", ":his"):
        show_history(session)
    elif command == ":seed":
        if argument:
            try:
                session.seed = int(argument)
            except ValueError:
                print(f"Not an integer: {argument}")
                return True
        print(f"seed={session.seed}")
    elif command == ":conf":
        if argument:
            try:
                session.settings = session.settings.updated(argument.split())
            except ValueError as error:
                print(f"Settings unchanged: {error}")
                return True
        print(session.settings.describe())
    elif command == ":reset-conf":
        session.settings = session.initial_settings
        print(session.settings.describe())
    elif command == ":system":
        if argument:
            session.system = argument
        print(f"system: {session.system}" if session.system else "system: (the chat template's default)")
    else:
        print(f"Unknown command {command}. Type :help for the list of commands.")
    return True


def chat(session: Session) -> None:
    print(f"{HELP}\n")
    while True:
        try:
            line = input(USER_PROMPT).strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line
            print()
            continue
        if not line:
            continue
        if line.startswith(":"):
            if not run_command(session, line):
                return
            continue
        answer(session, line)


def main() -> None:
    args = parse_args()
    # Ctrl-C must raise KeyboardInterrupt even where it was started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar in the chat
    model, tokenizer = load_for_chat(args.checkpoint_path, args.trust_remote_code, cpu_only=args.cpu_only)
    # A flag that does not fit the model's own settings (e.g. --min_new_tokens) is a ConfigurationError.
    settings = GenerationSettings.from_model(model, **_overrides(args))
    session = Session(model, tokenizer, settings, args.seed, args.system, tools=args.tools)
    if args.query is not None:
        for piece in stream_reply(
            model, tokenizer, conversation([], args.query, args.system, args.tools), settings, args.seed
        ):
            print(piece, end="", flush=True)
        print()
        return
    print(f"Model: {args.checkpoint_path} on {model.device}. Settings: {settings.describe()}")
    chat(session)
    print("Bye.")


if __name__ == "__main__":
    run_main(main)
