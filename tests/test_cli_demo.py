"""cli_demo.py as a person uses it: a real pseudo-terminal, typed lines, Ctrl-C and Ctrl-D.

What the demo prints is compared with what sft.chat (tested against plain `generate` in test_chat.py) replies to
the conversation the demo should be holding, so each check fails if the demo loses or keeps the wrong context.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pexpect
import pytest

import cli_demo
from sft.chat import GenerationSettings, conversation, load_for_chat, stream_reply

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
    fresh = expected([], second_q)
    assert with_history != fresh, "pick questions whose reply depends on the history"

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


def test_conf_seed_and_system_apply_to_the_next_reply(chat_adapter, expected):
    question = "What color is the sky on Mars?"
    full, short = expected([], question), expected([], question, max_new_tokens=3)
    assert short != full
    sampled = {"temperature": 1.5, "top_p": 1.0, "top_k": 0}
    seven, eight = expected([], question, seed=7, **sampled), expected([], question, seed=8, **sampled)
    assert seven != eight
    # A system prompt that changes this tiny model's greedy answer, so the check below can fail.
    system = next(
        text
        for text in ("You are a pirate.", "Answer in French.", "你好", "Be brief. Be brief. Be brief.")
        if expected([], question, system=text) != full
    )
    pirate = expected([], question, system=system)

    cli = start(chat_adapter)
    assert "max_new_tokens=3" in command(cli, ":conf max_new_tokens=3")
    assert ask(cli, question) == short
    assert "Settings unchanged" in command(cli, ":conf max_new_tokens=3 top_k=eval('1')")
    assert "max_new_tokens=3 " in command(cli, ":conf")
    assert "max_new_tokens=64" in command(cli, ":reset-conf")
    command(cli, ":clh")
    assert ask(cli, question) == full

    command(cli, ":clh")
    assert command(cli, ":conf temperature=1.5 top_p=1.0 top_k=0").startswith("max_new_tokens=64")
    assert command(cli, ":seed") == "seed=1234"
    assert command(cli, ":seed 7") == "seed=7"
    assert ask(cli, question) == seven
    command(cli, ":clh")
    assert ask(cli, question) == seven  # the seed is set again before every reply
    command(cli, ":clh")
    command(cli, ":seed 8")
    assert ask(cli, question) == eight
    assert "Not an integer" in command(cli, ":seed x")

    command(cli, ":reset-conf")
    command(cli, ":clh")
    assert command(cli, ":system") == "system: (the chat template's default)"
    assert command(cli, f":system {system}") == f"system: {system}"
    assert ask(cli, question) == pirate
    cli.sendline(":q")
    cli.expect_exact("Bye.")
    cli.expect(pexpect.EOF)


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


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_demo.parse_args(["-c", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_demo.parse_args(["-c", str(tmp_path), "--top_p", "2"])
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
