"""Tool calling for ``ggq serve``: tools into the prompt, the model's call syntax out of the reply.

Three call syntaxes, told apart by the chat template's text (:func:`detect`):

``hermes`` (Qwen 2/2.5/3, Hermes, SmolLM3, ... : the template mentions ``<tool_call>``)
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call.
``llama3`` (Llama 3.1-3.3: the template mentions ``<|python_tag|>`` or ``"parameters"``)
    the reply is one JSON object ``{"name": ..., "parameters": {...}}`` (after an optional
    ``<|python_tag|>``).
``mistral`` (the template mentions ``[TOOL_CALLS]``)
    ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, or the newer
    ``[TOOL_CALLS]name[ARGS]{...}``.

A template that renders ``tools`` itself gets them as ``tools=`` (OpenAI's list of
``{"type": "function", "function": {...}}``, as transformers passes them), assistant
``tool_calls`` (arguments as JSON objects, what templates expect) and ``tool`` messages. A template
that never mentions ``tools`` (SmolLM2's, for one) gets the ``hermes`` syntax described in a system
message, as Qwen 2.5's template writes it, and the history in that syntax (calls as
``<tool_call>`` blocks in the assistant turn, results as ``<tool_response>`` blocks in a user
turn).

``tool_choice`` ``"required"`` or ``{"type": "function", "function": {"name": N}}`` constrains the
reply with llguidance to exactly one call in the model's syntax, its arguments valid against the
function's ``parameters`` schema; ``"auto"`` leaves the model free and parses whatever calls it
wrote; ``"none"`` renders no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ggq.errors import GGQError

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"

_HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ToolFormat:
    """The call syntax (``hermes``, ``llama3``, ``mistral``) and whether the template renders
    tools itself (``native``)."""

    name: str
    native: bool

    @property
    def special_text(self) -> bool:
        """Whether the call marker is a control token, whose text the decoder must keep."""
        return self.name in (LLAMA3, MISTRAL)


def detect(template_source: str) -> ToolFormat:
    """The tool-call syntax of a chat template (see the module docstring)."""
    src = template_source or ""
    native = "tools" in src
    if not native:
        return ToolFormat(HERMES, False)
    if "[TOOL_CALLS]" in src:
        return ToolFormat(MISTRAL, True)
    if "<tool_call>" in src:
        return ToolFormat(HERMES, True)
    if "<|python_tag|>" in src or '"parameters"' in src or "<|start_header_id|>" in src:
        return ToolFormat(LLAMA3, True)
    return ToolFormat(HERMES, True)


def _args_object(arguments):
    """OpenAI's ``arguments`` (a JSON string) as the object templates expect (the string itself
    if it is not JSON)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _call_json(call: dict) -> str:
    fn = call.get("function") or {}
    return json.dumps({"name": fn.get("name"), "arguments": _args_object(fn.get("arguments", "{}"))},
                      ensure_ascii=False)


def prepare(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat) -> tuple[list[dict], list | None]:
    """``(messages, tools)`` to render: native templates get OpenAI's shapes (arguments as
    objects); other templates get the hermes syntax in a system message and in the history."""
    if fmt.native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c.get("function", {}),
                                                      "arguments": _args_object(c.get("function", {}).get(
                                                          "arguments", "{}"))}} for c in m["tool_calls"]]
            out.append(m)
        return out, tools or None
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in m["tool_calls"])
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = _HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def _call_schema(fn: dict, args_key: str) -> dict:
    params = fn.get("parameters")
    if not isinstance(params, dict) or not params:
        params = {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def grammar_lark(fmt: ToolFormat, functions: list[dict], special_token) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call to one of ``functions``
    (OpenAI ``function`` objects: ``name``, ``parameters``) in ``fmt``'s syntax.
    ``special_token(text)``: the grammar name of a special token, or None if ``text`` is not one."""
    args_key = "parameters" if fmt.name == LLAMA3 else "arguments"
    schemas = [_call_schema(f, args_key) for f in functions]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                       "key_separator": ": "}}
    call = "call: %json " + json.dumps(schema, ensure_ascii=False)

    def lit(text: str) -> str:
        return special_token(text) or json.dumps(text)

    if fmt.name == HERMES:
        start = f'start: {lit("<tool_call>")} "\\n" call "\\n" {lit("</tool_call>")}'
    elif fmt.name == MISTRAL:
        start = f'start: {lit("[TOOL_CALLS]")} "[" call "]"'
    else:
        start = "start: call"
    return f"{start}\n{call}\n"


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj, args_keys=("arguments", "parameters")) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": _new_id(), "type": "function", "function": {"name": obj["name"], "arguments": args}}


_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse(text: str, fmt: ToolFormat) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a reply: OpenAI ``tool_calls`` (``id``, ``type``,
    ``function.name``, ``function.arguments`` as a JSON string) found in ``text`` in ``fmt``'s
    syntax, and the text around them (None if empty). Text that does not parse stays content."""
    calls: list[dict] = []
    if fmt.name == HERMES:
        rest = []
        pos = 0
        for m in _HERMES_RE.finditer(text):
            try:
                call = _as_call(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                continue
            calls.append(call)
            rest.append(text[pos:m.start()])
            pos = m.end()
        rest.append(text[pos:])
        content = "".join(rest).strip()
    elif fmt.name == LLAMA3:
        s = text.strip().removeprefix("<|python_tag|>").strip()
        content = text.strip()
        try:
            obj = json.loads(s) if s.startswith("{") else None
        except ValueError:
            obj = None
        call = _as_call(obj, ("parameters", "arguments"))
        if call is not None:
            calls, content = [call], ""
    else:
        i = text.find("[TOOL_CALLS]")
        content = text.strip()
        if i >= 0:
            s = text[i + len("[TOOL_CALLS]"):].strip()
            found: list[dict] = []
            try:
                obj, _ = json.JSONDecoder().raw_decode(s)
                objs = obj if isinstance(obj, list) else [obj]
                found = [c for c in (_as_call(o) for o in objs) if c is not None]
            except ValueError:
                for m in re.finditer(r"([\w.-]+)\[ARGS\]", s):  # name[ARGS]{...}
                    try:
                        args, _ = json.JSONDecoder().raw_decode(s[m.end():])
                    except ValueError:
                        continue
                    found.append(_as_call({"name": m.group(1), "arguments": args}))
            if found:
                calls, content = found, text[:i].strip()
    return (content or None), calls


_MARKERS = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]"}


class CallStream:
    """Streams a reply's text while it cannot be part of a tool call, and holds the rest for
    :func:`parse`: from the ``<tool_call>`` / ``[TOOL_CALLS]`` marker on (text that could be the
    start of the marker is held until it cannot), or, for ``llama3``, the whole reply when it
    starts with ``{`` or ``<|python_tag|>``. ``forced``: the reply is a call (constrained), hold it
    all. :meth:`push` returns the text to send now; :meth:`finish` returns ``(content, calls)`` for
    the held rest (content: the held text itself when it holds no call)."""

    def __init__(self, fmt: ToolFormat, forced: bool = False):
        self.fmt = fmt
        self.text = ""
        self.sent = 0
        self.hold_from: int | None = 0 if forced else None

    def push(self, piece: str) -> str:
        self.text += piece
        if self.hold_from is not None:
            return ""
        if self.fmt.name == LLAMA3:
            head = self.text.lstrip()
            if not head:
                return ""
            if head.startswith("{") or head.startswith("<|python_tag|>"):
                self.hold_from = self.sent
                return ""
            if "<|python_tag|>".startswith(head):
                return ""
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        marker = _MARKERS[self.fmt.name]
        i = self.text.find(marker, self.sent)
        if i >= 0:
            out, self.sent, self.hold_from = self.text[self.sent:i], i, i
            return out
        tail = self.text[self.sent:]
        hold = next((k for k in range(min(len(marker) - 1, len(tail)), 0, -1) if marker.startswith(tail[-k:])), 0)
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str | None, list[dict]]:
        rest = self.text[self.sent:]
        content, calls = parse(rest, self.fmt) if self.hold_from is not None else (None, [])
        if not calls:
            return (rest or None), []
        return content, calls


def check_tools(tools: list[dict]) -> list[dict]:
    """The ``function`` objects of OpenAI ``tools``; GGQError naming the problem for a malformed
    one."""
    fns = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise GGQError(f"tools.{i}: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GGQError(f"tools.{i}.function.name: a function name is needed")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise GGQError(f"tools.{i}.function.parameters: must be a JSON schema object")
        fns.append(fn)
    return fns
