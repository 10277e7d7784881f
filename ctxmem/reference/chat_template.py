"""The chat template of the reference model (Jinja, as transformers renders chat templates).

Layout, one block per message, each closed by the end-of-turn token `<|end|>`:

    <|bos|><|system|>
    You are a helpful assistant.
    Tools:
    - clock(city): Get the current time in a city.<|end|>
    <|user|>
    What time is it in Oslo?<|end|>
    <|assistant|>
    <tool_call>{"name": "clock", "arguments": {"city": "Oslo"}}</tool_call><|end|>
    <|tool|>
    09:14<|end|>
    <|assistant|>
    It is 09:14 in Oslo.<|end|>

Tools are listed one line each (name, parameter names, description) rather than as whole JSON
schemas, because the model's training context is only 256 tokens.
"""

CHAT_TEMPLATE = """
{%- macro render_tools(tools) -%}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{%- set params = (f.parameters.properties | list | join(', ')) if (f.parameters is defined and f.parameters.properties is defined) else '' -%}
{{ '\\n- ' + f.name + '(' + params + '): ' + (f.description | default('')) }}
{%- endfor -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
{%- set system = messages[0].content -%}
{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set rest = messages -%}
{%- endif -%}
{%- if system or tools -%}
{{ '<|system|>\\n' + system }}
{%- if tools -%}
{{ ('\\n' if system else '') + 'Tools:' + render_tools(tools) }}
{%- endif -%}
{{ '<|end|>\\n' }}
{%- endif -%}
{%- for message in rest -%}
{%- if message.role == 'assistant' -%}
{{ '<|assistant|>\\n' + (message.content if message.content is string else '') }}
{%- for call in (message.tool_calls or []) -%}
{%- set f = call.function if call.function is defined else call -%}
{{ '<tool_call>{"name": ' + (f.name | tojson) + ', "arguments": ' + (f.arguments if f.arguments is string else (f.arguments | tojson)) + '}</tool_call>' }}
{%- endfor -%}
{{ '<|end|>\\n' }}
{%- else -%}
{{ '<|' + message.role + '|>\\n' + (message.content if message.content is string else '') + '<|end|>\\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|assistant|>\\n' }}
{%- endif -%}
""".strip()
