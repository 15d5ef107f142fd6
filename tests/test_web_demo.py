"""web_demo.py as a person uses it: started on a free localhost port, driven by a real headless chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
from ports import free_port

from sft.chat import GenerationSettings, conversation, load_for_chat, stream_reply
from sft.data import render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium); scripts/test.sh installs it"
)
SCREENSHOT = os.environ.get("WEB_DEMO_SCREENSHOT")  # where to save a picture of the page, if anywhere


@contextlib.contextmanager
def serving(checkpoint: str, *extra: str) -> Iterator[str]:
    """web_demo.py on a free localhost port, as a user starts it; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    command = [sys.executable, "web_demo.py", "-c", checkpoint, "--server-port", str(port), *extra]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"web_demo.py did not start:\n{server.communicate()[0]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def web_demo(chat_adapter):
    with serving(chat_adapter) as url:
        yield url


@needs_chromium
def test_browser_gets_streamed_replies_with_history_and_clear_forgets(web_demo, chat_adapter):
    from playwright.sync_api import expect, sync_playwright

    model, tokenizer = load_for_chat(chat_adapter)
    settings = GenerationSettings.from_model(model)

    def expected(history: list[dict], query: str) -> str:
        return "".join(stream_reply(model, tokenizer, conversation(history, query), settings)).strip()

    first_q, second_q = "What is your name?", "Who built you?"
    first = expected([], first_q)
    second_fresh = expected([], second_q)
    second_after_first = expected(
        [{"role": "user", "content": first_q}, {"role": "assistant", "content": first}], second_q
    )
    # second_fresh may equal second_after_first: that the history reaches the model is checked in-process below.

    outside: list[str] = []

    def only_this_server(route) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.route("**/*", only_this_server)
        page.goto(web_demo)
        message = page.locator("#message textarea")
        message.wait_for(timeout=60_000)
        bot = page.locator("#chatbot .message.bot")
        # Every text the last reply bubble shows as the page changes: a streamed reply grows piece by piece.
        page.evaluate(
            """() => {
                window.shown = [];
                new MutationObserver(() => {
                    const bubbles = document.querySelectorAll('#chatbot .message.bot');
                    if (bubbles.length) window.shown.push(bubbles[bubbles.length - 1].innerText.trim());
                }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
            }"""
        )
        message.fill(first_q)
        page.locator("#send").click()
        expect(bot.last).to_have_text(first, timeout=60_000)
        expect(page.locator("#chatbot .message.user").last).to_have_text(first_q)
        shown = page.evaluate("window.shown")
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT, full_page=True)

        message.fill(second_q)
        message.press("Enter")
        expect(bot).to_have_count(2)
        expect(bot.last).to_have_text(second_after_first, timeout=60_000)  # the history went with it

        page.locator("#clear").click()
        expect(bot).to_have_count(0)
        message.fill(second_q)
        message.press("Enter")
        expect(bot.last).to_have_text(second_fresh, timeout=60_000)
        expect(bot).to_have_count(1)
        browser.close()

    assert outside == [], "the page asked for something beyond this server"
    growing = [text for text in shown if text and text != first and first.startswith(text)]
    assert growing, f"no partial reply was ever on screen: {shown}"


def test_reply_is_generated_from_history_system_prompt_and_sliders(chat_adapter, monkeypatch):
    """In-process, watching the real generate calls: what reaches the model, not what a tiny model happens to say."""
    import web_demo

    model, tokenizer = load_for_chat(chat_adapter)
    demo = web_demo.build_demo(model, tokenizer, GenerationSettings.from_model(model), "tiny", "")
    respond = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "respond")
    calls: list[dict] = []
    real_generate = model.generate

    def observed(**kwargs):
        calls.append({"ids": kwargs["input_ids"][0].tolist(), "config": kwargs["generation_config"]})
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", observed)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    *_, (_, shown, kept) = respond("  Who built you? ", history, " Be brief. ", 1.5, 0.9, 7)
    messages = conversation(history, "Who built you?", "Be brief.")
    rendered = render(tokenizer, messages, add_generation_prompt=True)
    assert [call["ids"] for call in calls] == [tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    config = calls[0]["config"]
    assert (config.do_sample, config.temperature, config.top_p, config.max_new_tokens) == (True, 1.5, 0.9, 7)
    assert shown == kept and kept[:3] == [*history, {"role": "user", "content": "Who built you?"}]
    assert kept[3]["role"] == "assistant" and len(kept) == 4
    assert list(respond("   ", history, "", 0, 1, 7)) == [("", history, history)]  # nothing sent for an empty line
    assert len(calls) == 1


def test_a_message_the_template_refuses_is_shown_as_an_error_and_changes_nothing(refusing_model):
    import gradio as gr

    import web_demo

    model, tokenizer = load_for_chat(refusing_model)
    demo = web_demo.build_demo(model, tokenizer, GenerationSettings.from_model(model), "tiny", "")
    respond = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "respond")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    replies = respond("Say forbidden", history, "", 0, 1, 7)
    with pytest.raises(gr.Error, match="the chat template refuses this conversation: the word forbidden"):
        next(replies)  # before anything is shown: the message stays in its box, the history as it was
    assert history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory) -> str:
    """The tool schemas of data/example_tools.jsonl's first sample, as a --tools file."""
    import json
    from pathlib import Path

    schemas = json.loads(Path("data/example_tools.jsonl").read_text().splitlines()[0])["tools"]
    path = tmp_path_factory.mktemp("tools") / "tools.json"
    path.write_text(json.dumps(schemas))
    return str(path)


def test_tools_go_with_every_message(tool_model, tools_file, monkeypatch):
    import web_demo
    from sft.data import load_tools

    tools = load_tools(tools_file)
    model, tokenizer = load_for_chat(tool_model)
    demo = web_demo.build_demo(model, tokenizer, GenerationSettings.from_model(model), "tiny", "", tools)
    respond = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "respond")
    calls: list[list[int]] = []
    real_generate = model.generate

    def observed(**kwargs):
        calls.append(kwargs["input_ids"][0].tolist())
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", observed)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    list(respond("Weather in Paris?", history, "", 0, 1, 5))
    rendered = render(tokenizer, conversation(history, "Weather in Paris?", None, tools), add_generation_prompt=True)
    assert "get_weather" in rendered  # the template wrote the schemas into the prompt
    assert calls == [tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def test_a_bad_tools_file_stops_before_the_model_loads(chat_adapter, tmp_path, user_error):
    missing = tmp_path / "nowhere.json"
    line = user_error("web_demo.py", "-c", chat_adapter, "--tools", str(missing))
    assert line.startswith("error: ") and str(missing) in line


@needs_chromium
def test_browser_shows_the_tools_and_the_reply_made_with_them(tool_model, tools_file):
    from playwright.sync_api import expect, sync_playwright

    from sft.data import load_tools

    model, tokenizer = load_for_chat(tool_model)
    settings = GenerationSettings.from_model(model)
    query = "What is the weather in Paris?"
    conversation_with_tools = conversation([], query, None, load_tools(tools_file))
    expected = "".join(stream_reply(model, tokenizer, conversation_with_tools, settings)).strip()

    with serving(tool_model, "--tools", tools_file) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(url)
        expect(page.locator("#tools")).to_contain_text("Tools the model may call: get_weather", timeout=60_000)
        message = page.locator("#message textarea")
        message.fill(query)
        message.press("Enter")
        expect(page.locator("#chatbot .message.bot").last).to_have_text(expected, timeout=60_000)
        browser.close()
