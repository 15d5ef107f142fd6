"""Chat with a fine-tuned model in the browser (Gradio), the reply streaming as it is generated.

Takes the same folders as cli_demo.py (adapter, merged, full fine-tune, GPTQ). Gradio is an optional requirement:

    pip install -r requirements-web.txt
    python web_demo.py -c output_qwen                        # http://127.0.0.1:8000
    python web_demo.py -c output_qwen --server-name 0.0.0.0 --server-port 7860   # reachable from other machines
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import argparse
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace

import gradio as gr
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sft.chat import ChatTemplateError, GenerationSettings, conversation, load_for_chat, stream_reply
from sft.data import Conversation, load_tools
from sft.errors import run_main
from sft.modeling import ModelPathError

# What the page shows for a state: the visible turns, without the system prompt.
ChatUpdate = tuple[str, Conversation, Conversation]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-c", "--checkpoint-path", required=True, help="adapter, merged, full fine-tune or GPTQ output folder"
    )
    parser.add_argument("--system", default="", help="initial system prompt (empty: the chat template's default)")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when there is a GPU")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model folder's own code")
    parser.add_argument("--server-name", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--server-port", type=int, default=8000)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    parser.add_argument("--tools", default=None, help="JSON file with a list of tool schemas the model may call")
    args = parser.parse_args()
    if not os.path.isdir(args.checkpoint_path):
        raise ModelPathError(f"--checkpoint-path {args.checkpoint_path}: no such folder")
    args.tools = load_tools(args.tools) if args.tools else None  # a bad file fails here, before the model loads
    return args


def tool_name(tool: dict) -> str:
    """A schema's function name, in OpenAI's form ({"type": "function", "function": {...}}) or bare."""
    return str(tool.get("function", tool).get("name", "?"))


def build_demo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: GenerationSettings,
    name: str,
    system: str,
    tools: list[dict] | None = None,
) -> gr.Blocks:
    """The chat page; `tools` (schemas, as cli_demo.py --tools takes them) go with every message, rendered by the
    chat template as in training."""

    def respond(
        query: str, history: Conversation, system: str, temperature: float, top_p: float, max_new_tokens: int
    ) -> Iterator[ChatUpdate]:
        query = query.strip()
        if not query:
            yield "", history, history
            return
        reply_settings = replace(
            settings, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens)
        ).checked()
        messages = conversation(history, query, system.strip() or None, tools)
        try:
            stream = stream_reply(model, tokenizer, messages, reply_settings)
        except ChatTemplateError as error:  # shown on the page; the message stays in the box to be rephrased
            raise gr.Error(str(error)) from None
        shown = history + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        yield "", shown, shown
        with closing(stream) as stream:  # Stop closes it
            for piece in stream:
                shown[-1] = {"role": "assistant", "content": shown[-1]["content"] + piece}
                yield "", shown, shown
        shown[-1] = {"role": "assistant", "content": shown[-1]["content"].strip()}
        yield "", shown, shown

    # No telemetry or version check, and system fonts rather than Google's: the page talks only to this server.
    with gr.Blocks(title=f"Chat: {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## Chat with `{name}`")
        if tools:
            names = ", ".join(f"`{tool_name(tool)}`" for tool in tools)
            gr.Markdown(f"Tools the model may call: {names}", elem_id="tools")
        history = gr.State([])
        chatbot = gr.Chatbot(elem_id="chatbot", height=460, label="Conversation", buttons=["copy", "copy_all"])
        with gr.Row():
            message = gr.Textbox(
                placeholder="Type a message; Enter sends", show_label=False, scale=8, elem_id="message", autofocus=True
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop")
            clear = gr.Button("Clear history", elem_id="clear")
        with gr.Accordion("Settings", open=True):
            system_box = gr.Textbox(
                value=system, label="System prompt", placeholder="(empty: the chat template's default)", lines=2
            )
            with gr.Row():
                temperature = gr.Slider(0, 2, value=settings.temperature, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=settings.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, 4096, value=settings.max_new_tokens, step=1, label="Max new tokens")

        inputs = [message, history, system_box, temperature, top_p, max_new_tokens]
        outputs = [message, chatbot, history]
        events = [trigger(respond, inputs, outputs) for trigger in (message.submit, send.click)]
        stop.click(None, cancels=events)
        clear.click(lambda: ("", [], []), None, outputs, cancels=events)
        chatbot.clear(lambda: [], None, history, cancels=events)  # the chat box's own trash button
    return demo


def main() -> None:
    args = parse_args()
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar in the chat
    model, tokenizer = load_for_chat(args.checkpoint_path, args.trust_remote_code, cpu_only=args.cpu_only)
    settings = GenerationSettings.from_model(model)
    name = os.path.basename(os.path.normpath(args.checkpoint_path))
    demo = build_demo(model, tokenizer, settings, name, args.system, args.tools)
    # One reply at a time: the model is shared by every browser tab.
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.server_name, server_port=args.server_port, share=args.share, theme=theme
    )


if __name__ == "__main__":
    run_main(main)
