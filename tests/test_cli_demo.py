"""cli_demo.py as a person uses it: a real pseudo-terminal, typed lines, Ctrl-C and Ctrl-D.

What the demo prints is compared with what sft.chat (tested against plain `generate` in test_chat.py) replies to
the conversation the demo should be holding, computed on the same machine. Whether the right conversation, settings
and seed reach the model is checked in-process by watching the real `generate` calls (the tests in the middle), not
by hoping that a tiny model answers differently when they change.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pexpect
import pytest
import torch

import cli_demo
from sft.chat import GenerationSettings, conversation, load_for_chat, stream_reply
from sft.data import render
from sft.errors import ConfigurationError
from sft.modeling import ModelPathError

PROMPT = cli_demo.USER_PROMPT
TIMEOUT = 60  # loading on a busy machine; a reply of the tiny model takes well under a second


@pytest.fixture(scope="module")
def expected(chat_adapter):
    """The reply sft.chat gives: greedy by default (the tiny model's generation_config), like the demo."""
    model, tokenizer = load_for_chat(chat_adapter)
    default = GenerationSettings.from_model(model)

    def expected_reply(history, query, system=None, seed=1234, **settings) -> str:
        chosen = replace(default, **settings).checked()
        return "".join(stream_reply(model, tokenizer, conversation(history, query, system), chosen, seed)).strip()

    return expected_reply


def start(adapter: str, *args: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    cli = pexpect.spawn(
        sys.executable, ["cli_demo.py", "-c", adapter, *args], env=env, encoding="utf-8", timeout=TIMEOUT
    )
    cli.expect_exact(PROMPT)
    return cli


def ask(cli: pexpect.spawn, text: str) -> str:
    cli.sendline(text)
    cli.expect_exact(cli_demo.ASSISTANT_PREFIX)
    cli.expect_exact("\r\n" + PROMPT)
    return cli.before.replace("\r\n", "\n").strip()


def command(cli: pexpect.spawn, text: str) -> str:
    """What the command printed (the echoed line left out)."""
    cli.sendline(text)
    cli.expect_exact("\r\n" + PROMPT)
    return cli.before.replace("\r\n", "\n").split("\n", 1)[-1].strip()


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]


def test_answers_keeps_history_and_forgets_on_clh(chat_adapter, expected):
    first_q, second_q = "What is your name?", "Who built you?"
    first = expected([], first_q)
    with_history = expected(turns((first_q, first)), second_q)
    fresh = expected([], second_q)  # may equal with_history: what reaches the model is checked in-process below

    cli = start(chat_adapter)
    assert ask(cli, first_q) == first
    assert ask(cli, second_q) == with_history
    history = command(cli, ":his")
    assert history == "\n".join(
        [f"[user] {first_q}", f"[assistant] {first}", f"[user] {second_q}", f"[assistant] {with_history}"]
    )
    assert command(cli, ":clh") == "History cleared."
    assert command(cli, ":history") == "(no history)"
    assert ask(cli, second_q) == fresh

    assert "Unknown command :tell" in command(cli, ":tell me a joke")
    assert command(cli, ":his").count("[user]") == 1  # the unknown command did not go to the model
    assert ":clear-history" in command(cli, ":h") and ":reset-conf" in command(cli, ":help")
    cli.sendline(":cl")
    cli.expect_exact(cli_demo.CLEAR_SCREEN + PROMPT)
    cli.sendeof()  # Ctrl-D
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0


@pytest.fixture
def session(chat_adapter) -> cli_demo.Session:
    model, tokenizer = load_for_chat(chat_adapter)
    return cli_demo.Session(model, tokenizer, GenerationSettings.from_model(model), seed=1234)


@pytest.fixture
def generate_calls(session, monkeypatch) -> list[dict]:
    """What each reply hands to the model's real `generate` (which still runs): prompt ids, config, RNG state."""
    calls: list[dict] = []
    real_generate = session.model.generate

    def observed(*args, **kwargs):
        calls.append(
            {
                "ids": kwargs["input_ids"][0].tolist(),
                "config": kwargs["generation_config"],
                "seed": torch.initial_seed(),
                "rng": torch.get_rng_state(),
            }
        )
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(session.model, "generate", observed)
    return calls


def prompt_ids(session: cli_demo.Session, messages: list[dict]) -> list[int]:
    """The ids of the conversation as sft.data renders it for the next reply (the template training used)."""
    return session.tokenizer(render(session.tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]


def run(session: cli_demo.Session, line: str, capsys) -> str:
    """A typed line carried out as the demo's loop does: a :command, else a message to the model; what it printed."""
    if line.startswith(":"):
        assert cli_demo.run_command(session, line)
    else:
        cli_demo.answer(session, line)
    return capsys.readouterr().out.strip()


# In-process, watching the real generate calls: what the demo decides (prompt, settings, seed) is checked, not what
# a tiny model happens to answer, so this holds on any CPU, BLAS and thread count.
def test_conf_seed_and_system_apply_to_the_next_reply(session, generate_calls, capsys):
    question = "What color is the sky on Mars?"
    assert "max_new_tokens=3" in run(session, ":conf max_new_tokens=3", capsys)
    run(session, question, capsys)
    assert generate_calls[-1]["config"].max_new_tokens == 3
    assert "Settings unchanged" in run(session, ":conf max_new_tokens=3 top_k=eval('1')", capsys)
    assert "max_new_tokens=3 " in run(session, ":conf", capsys)
    assert "max_new_tokens=64" in run(session, ":reset-conf", capsys)
    run(session, ":clh", capsys)
    run(session, question, capsys)
    config = generate_calls[-1]["config"]
    assert (config.max_new_tokens, config.do_sample) == (64, False)  # the tiny model's generation_config: greedy

    run(session, ":clh", capsys)
    assert run(session, ":conf temperature=1.5 top_p=1.0 top_k=0", capsys).startswith("max_new_tokens=64")
    assert run(session, ":seed", capsys) == "seed=1234"
    assert run(session, ":seed 7", capsys) == "seed=7"
    for _ in range(2):
        run(session, ":clh", capsys)
        run(session, question, capsys)
        config = generate_calls[-1]["config"]
        assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 1.5, 1.0, 0)
        assert generate_calls[-1]["seed"] == 7
    # The seed is set again before every reply: the second reply starts from the same random state as the first,
    # although the first one drew random numbers while sampling.
    assert torch.equal(generate_calls[-1]["rng"], generate_calls[-2]["rng"])
    assert run(session, ":seed 8", capsys) == "seed=8"
    run(session, question, capsys)
    assert generate_calls[-1]["seed"] == 8 and not torch.equal(generate_calls[-1]["rng"], generate_calls[-2]["rng"])
    assert "Not an integer" in run(session, ":seed x", capsys)
    assert session.seed == 8

    run(session, ":reset-conf", capsys)
    run(session, ":clh", capsys)
    assert run(session, ":system", capsys) == "system: (the chat template's default)"
    run(session, question, capsys)
    assert generate_calls[-1]["ids"] == prompt_ids(session, conversation([], question))
    system = "You are a pirate."
    assert run(session, f":system {system}", capsys) == f"system: {system}"
    run(session, ":clh", capsys)
    run(session, question, capsys)
    assert generate_calls[-1]["ids"] == prompt_ids(session, conversation([], question, system))
    assert system in session.tokenizer.decode(generate_calls[-1]["ids"])


def test_each_reply_is_generated_from_the_history_and_joins_it(session, generate_calls, capsys):
    first_q, second_q = "What is your name?", "Who built you?"
    shown = run(session, first_q, capsys)
    first = session.history[-1]["content"]
    assert session.history == turns((first_q, first))
    assert shown.removeprefix(cli_demo.ASSISTANT_PREFIX.strip()).strip() == first  # what was shown is kept
    run(session, second_q, capsys)
    assert generate_calls[-1]["ids"] == prompt_ids(session, conversation(turns((first_q, first)), second_q))
    assert [message["content"] for message in session.history[::2]] == [first_q, second_q]
    run(session, ":clh", capsys)
    run(session, second_q, capsys)
    assert generate_calls[-1]["ids"] == prompt_ids(session, conversation([], second_q))


def test_ctrl_c_stops_the_reply_and_keeps_the_session(chat_adapter, expected):
    # At least 5000 tokens: seconds of output, so Ctrl-C lands in the middle of it.
    cli = start(chat_adapter, "--min_new_tokens", "5000", "--max_new_tokens", "5000")
    cli.sendline("Tell me a long story.")
    cli.expect_exact(cli_demo.ASSISTANT_PREFIX)
    cli.expect(r"\S{3}")  # it is streaming
    cli.sendintr()  # Ctrl-C
    cli.expect_exact("[reply stopped]")
    cli.expect_exact(PROMPT)
    history = command(cli, ":his")
    assert history.startswith("[user] Tell me a long story.\n[assistant] ")
    command(cli, ":conf min_new_tokens=0 max_new_tokens=64")
    assert ask(cli, "What is your name?")  # the session goes on
    assert command(cli, ":his").count("[user]") == 2
    cli.sendeof()
    cli.expect_exact("Bye.")
    cli.expect(pexpect.EOF)


def test_query_prints_one_reply_and_exits(chat_adapter, expected):
    system = "Be brief."
    output = pexpect.run(
        f"{sys.executable} cli_demo.py -c {chat_adapter} --system '{system}' --query 'What is 2 + 3?'",
        encoding="utf-8",
        timeout=TIMEOUT,
        env={**os.environ, "TERM": "dumb"},
    )
    assert output.replace("\r\n", "\n").strip().endswith(expected([], "What is 2 + 3?", system=system))


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ModelPathError, match="no such folder"):
        cli_demo.parse_args(["-c", str(tmp_path / "missing")])
    with pytest.raises(ConfigurationError, match=r"top_p must be in \(0, 1\]"):
        cli_demo.parse_args(["-c", str(tmp_path), "--top_p", "2"])


def test_a_folder_that_is_not_a_model_is_one_error_line(tmp_path, user_error):
    (tmp_path / "notes.txt").write_text("not a model")
    error = user_error("cli_demo.py", "-c", str(tmp_path), "--query", "Hello")
    assert error == (
        f"error: {tmp_path}: not a model folder (no config.json) nor an adapter folder (no adapter_config.json)"
    )


def test_a_message_the_template_refuses_is_reported_and_the_session_goes_on(refusing_model):
    # The user expects to rephrase: the refused message is said to be left out, not kept in the history.
    cli = start(refusing_model)
    cli.sendline("Say forbidden")
    cli.expect_exact(
        "error: the chat template refuses this conversation: the word forbidden is not allowed "
        "(the message was not added to the conversation)"
    )
    cli.expect_exact(PROMPT)
    ask(cli, "Hello")
    history = command(cli, ":his")
    assert history.startswith("[user] Hello\n[assistant] ") and "forbidden" not in history
    cli.sendeof()
    cli.expect_exact("Bye.")
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0
