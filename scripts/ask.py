"""Asks a model the questions of a data file and compares its answers with the file's.

Each sample's last assistant turn is the expected answer; everything before it is the prompt.

    python -m scripts.ask --model output --data data/example_chatml.jsonl
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse

from sft.chat import ChatTemplateError, load_for_chat, reply
from sft.data import DataError, load_conversations
from sft.errors import run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model, merged model or adapter folder")
    parser.add_argument("--data", required=True, help="data file in any supported format")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args()

    conversations = load_conversations(args.data)
    model, tokenizer = load_for_chat(args.model)
    correct = 0
    for messages, where in zip(conversations, conversations.wheres):
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        expected = messages[last]["content"]
        try:
            answer = reply(model, tokenizer, messages[:last], max_new_tokens=args.max_new_tokens)
        except ChatTemplateError as error:  # named by its place in the data file
            raise DataError(args.data, where, None, str(error)) from None
        correct += answer == expected
        print(f"Q: {messages[last - 1]['content']}\n   expected: {expected}\n   answer:   {answer}")
    print(f"{correct}/{len(conversations)} answers match exactly")


if __name__ == "__main__":
    run_main(main)
