#!/usr/bin/env python3
"""Renders every chat template in tests/data/templates/ with Python jinja2, the
way transformers' apply_chat_template does (ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, transformers' own
tojson, raise_exception, strftime_now), over many conversations, and writes
tests/data/templates/cases.json: what tests/test_jinja.c renders with our C
engine and compares byte for byte.

strftime_now uses a fixed date (FIXED_NOW), which the C test sets too.
Numbers in the conversations are ints or non-integral floats: cJSON keeps no
int/float distinction (see tp_template_render in runtime/runtime.h).

Run from the repository root: python3 tools/make_template_fixtures.py
"""
import datetime
import json
import os
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DIR = os.path.join("tests", "data", "templates")
FIXED_NOW = datetime.datetime(2025, 3, 14, 9, 26, 53)

TOKENS = {
    "qwen2.5-7b-instruct": {"eos_token": "<|im_end|>"},
    "qwen3-0.6b": {"eos_token": "<|im_end|>"},
    "llama-3.1-8b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama-3.2-3b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama-3.3-70b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral-nemo-instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
}


class RaisedByTemplate(Exception):
    pass


def environment():
    # transformers.utils.chat_template_utils._compile_jinja_template
    def raise_exception(message):
        raise RaisedByTemplate(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return FIXED_NOW.strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, with \"quotes\" and ünïcödé",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "threshold": {"type": "number", "default": 0.5},
                "verbose": {"type": "boolean", "default": False},
                "tags": {"type": "array", "items": {"type": "string"}},
                "extra": {"type": ["object", "null"], "default": None},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        "return": {"type": "string"},
    },
}

TRICKY = "He said \"hi\" and 'bye' {{ not a tag }} {% if x %} {# no #} \\ back\\slash\n\ttab ü 日本語 🎉 </s> [INST]"


def tool_call(name, args, call_id):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def conversations():
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    s = lambda c: {"role": "system", "content": c}
    yield "user", [u("Hello!")], {}
    yield "system_user", [s("You are a helpful assistant."), u("What is 2+2?")], {}
    yield "multi_turn", [s("Be brief."), u("Hi"), a("Hello! How can I help?"), u("Tell me a joke.")], {}
    yield "multi_turn_no_system", [u("Hi"), a("Hello."), u("Bye"), a("Goodbye!")], {}
    yield "tricky_content", [s("  System with spaces  \n"), u(TRICKY), a(TRICKY), u("  padded  ")], {}
    yield "empty_content", [u("")], {}
    yield "tools", [u("Weather in Paris?")], {"tools": [WEATHER_TOOL, SEARCH_TOOL]}
    yield "tools_system", [s("Use tools wisely."), u("Weather in Paris?")], {"tools": [WEATHER_TOOL]}
    calls = [u("Weather in Paris?"),
             {"role": "assistant", "content": "",
              "tool_calls": [tool_call("get_weather", {"city": "Paris", "days": 3, "threshold": 0.25,
                                                        "tags": ["a", "b"], "verbose": True, "extra": None},
                                       "abc123XYZ")]},
             {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"}]
    yield "tool_call", calls, {"tools": [WEATHER_TOOL]}
    yield "tool_call_then_answer", calls + [a("It is 21.5 degrees and clear in Paris."), u("Thanks!")], \
        {"tools": [WEATHER_TOOL]}
    two_calls = [u("Weather in Paris and Rome?"),
                 {"role": "assistant", "content": "Let me check.",
                  "tool_calls": [tool_call("get_weather", {"city": "Paris"}, "call00001"),
                                 tool_call("get_weather", {"city": "Rome"}, "call00002")]},
                 {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
                 {"role": "tool", "tool_call_id": "call00002", "content": "rainy"}]
    yield "two_tool_calls", two_calls, {"tools": [WEATHER_TOOL]}
    yield "string_arguments", [u("Search cats"),
                               {"role": "assistant", "content": "",
                                "tool_calls": [tool_call("search", "{\"q\": \"cats\"}", "srch00001")]},
                               {"role": "tool", "tool_call_id": "srch00001", "content": "Cats are great."}], \
        {"tools": [SEARCH_TOOL]}
    yield "thinking_history", [u("What is 3*7?"), a("<think>\n3 times 7 is 21.\n</think>\n\n21"), u("And 4*5?")], {}
    yield "thinking_last", [u("What is 3*7?"), a("<think>\nEasy.\n</think>\n\nIt is 21.")], {}
    yield "reasoning_content", [u("Q"), {"role": "assistant", "content": "A", "reasoning_content": "thought"},
                                u("Q2")], {}
    yield "enable_thinking_false", [u("Quick answer please.")], {"enable_thinking": False}
    yield "enable_thinking_true", [u("Think hard.")], {"enable_thinking": True}
    yield "roles_not_alternating", [u("one"), u("two")], {}
    yield "date_string", [u("What day is it?")], {"date_string": "01 Jan 2030"}
    yield "tools_in_system", [u("Weather?")], {"tools": [WEATHER_TOOL], "tools_in_user_message": False}
    yield "builtin_tools", [u("Search for llamas")], {"builtin_tools": ["brave_search", "code_interpreter"]}
    yield "system_only", [s("Only a system message.")], {}


def main():
    env = environment()
    cases = []
    names = sorted(f[:-6] for f in os.listdir(DIR) if f.endswith(".jinja"))
    for name in names:
        with open(os.path.join(DIR, name + ".jinja"), encoding="utf-8") as f:
            template = env.from_string(f.read())
        for conv_name, messages, extra in conversations():
            for add_generation_prompt in (True, False):
                ctx = {"messages": messages, "add_generation_prompt": add_generation_prompt}
                ctx.update(TOKENS[name])
                ctx.update(extra)
                case = {"template": name + ".jinja", "name": f"{conv_name}/agp={int(add_generation_prompt)}",
                        "context": ctx}
                try:
                    case["output"] = template.render(**ctx)
                except RaisedByTemplate as e:
                    case["raises"] = str(e)
                except jinja2.TemplateError as e:
                    case["error"] = f"{type(e).__name__}: {e}"
                cases.append(case)
    out = os.path.join(DIR, "cases.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_out = sum("output" in c for c in cases)
    print(f"{out}: {len(cases)} cases ({n_out} rendered, {len(cases) - n_out} failing as expected)", file=sys.stderr)


if __name__ == "__main__":
    main()
