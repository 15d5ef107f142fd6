"""Builds a tiny Qwen2-style chat model and tokenizer from scratch, for tests and the demo.

Nothing is downloaded: a byte-level BPE tokenizer is trained with `tokenizers` on English and Chinese text
generated here, given the ChatML special tokens and chat template, and a Qwen2ForCausalLM of a few hundred
thousand parameters is briefly pre-trained on the same kind of text (plain text only, like a base model: the
ChatML tokens stay untrained). Deterministic for a given seed.

    python -m scripts.make_tiny_model --output tiny-qwen2
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from sft.data import CHATML_TEMPLATE, render

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ENGLISH_SUBJECTS = [
    "the cat",
    "a student",
    "my friend",
    "the model",
    "our team",
    "the river",
    "a teacher",
    "the city",
    "the user",
    "the assistant",
    "the system",
]
ENGLISH_VERBS = ["likes", "reads", "builds", "answers", "remembers", "visits", "explains", "writes"]
ENGLISH_OBJECTS = [
    "a short story",
    "the question",
    "every morning",
    "the old bridge",
    "a new language",
    "the small garden",
    "many books",
    "the weather",
]
CHINESE_SUBJECTS = ["我", "你", "他们", "老师", "学生", "这个模型", "我的朋友", "小猫"]
CHINESE_VERBS = ["喜欢", "阅读", "回答", "记得", "学习", "写", "参观", "解释"]
CHINESE_OBJECTS = ["一个问题", "中文", "这本书", "天气", "新的语言", "小花园", "长城", "今天的新闻"]


def random_characters(rng: random.Random) -> str:
    """Random printable ASCII words or Chinese characters: every byte token gets trained, not only the sentences'."""
    if rng.random() < 0.5:
        words = ["".join(chr(rng.randint(33, 126)) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(2, 8))]
        return " ".join(words)
    return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(2, 12)))


def generate_text(rng: random.Random, count: int) -> list[str]:
    """Simple English and Chinese sentences, with digits and punctuation, as training text."""
    lines = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.25:
            lines.append(random_characters(rng))
        elif kind < 0.6:
            sentence = f"{rng.choice(ENGLISH_SUBJECTS)} {rng.choice(ENGLISH_VERBS)} {rng.choice(ENGLISH_OBJECTS)}"
            lines.append(sentence.capitalize() + rng.choice([".", "!", "?", f" {rng.randint(0, 999)} times."]))
        else:
            sentence = rng.choice(CHINESE_SUBJECTS) + rng.choice(CHINESE_VERBS) + rng.choice(CHINESE_OBJECTS)
            lines.append(sentence + rng.choice(["。", "！", "？", f"{rng.randint(0, 99)}次。"]))
    return lines


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def pretrain(model: Qwen2ForCausalLM, token_stream: list[int], steps: int, seq_len: int, seed: int) -> float:
    """A few hundred steps of next-token prediction on plain text; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_stream)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (32,), generator=generator)
        batch = torch.stack([data[start : start + seq_len] for start in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def build_tiny_model(
    output: str | Path,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    pretrain_steps: int = 300,
    chat: bool = True,
) -> Path:
    """Writes tokenizer, config, generation config and weights of a tiny model to `output`.

    `chat=False` makes a base model: pre-trained on plain text only, its ChatML tokens never seen.
    """
    output = Path(output)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    texts = generate_text(rng, 4000)
    tokenizer = train_tokenizer(texts, vocab_size)

    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    model = Qwen2ForCausalLM(config)
    token_stream = []
    for index, text in enumerate(texts):
        if chat and index % 2:
            # A chat model: it has seen ChatML turns, so its special tokens are trained.
            text = render(
                tokenizer, [{"role": "user", "content": texts[index - 1]}, {"role": "assistant", "content": text}]
            )
        token_stream += tokenizer.encode(text + "\n", add_special_tokens=False) + [endoftext]
    loss = pretrain(model, token_stream, pretrain_steps, seq_len=64, seed=seed)

    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=False, max_new_tokens=64
    )
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    parameters = sum(p.numel() for p in model.parameters())
    trained = f"pre-training loss {loss:.2f}" if pretrain_steps else "not pre-trained"
    print(f"tiny model: {parameters:,} parameters, vocab {len(tokenizer)}, {trained} -> {output}")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tiny-qwen2", help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--pretrain_steps", type=int, default=300, help="0 leaves the weights random")
    parser.add_argument("--base", action="store_true", help="pre-train on plain text only: ChatML tokens untrained")
    args = parser.parse_args()
    build_tiny_model(
        args.output, args.seed, args.vocab_size, args.hidden_size, args.num_layers, args.pretrain_steps, not args.base
    )


if __name__ == "__main__":
    main()
