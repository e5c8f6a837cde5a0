"""Record formats: recognise a raw JSON object's format and normalise it to a canonical record.

Pure functions. The result always goes through :func:`parallel.layout.parse_record`, so the
contract stays the single authority on what a canonical record is.

Formats (``--format``; ``auto`` detects per record, in this order):

- ``canonical``  ``{"main": str, "branches": [...]}`` (detected); forced, any canonical record
- ``messages``   ``{"messages": [{"role", "content"}, ...]}`` (OpenAI chat)
- ``sharegpt``   ``{"conversations": [{"from", "value"}, ...]}``
- ``alpaca``     ``{"instruction", "input"?, "output", "system"?}``
- ``prompt-response``  ``prompt``/``response``, ``prompt``/``completion`` or ``question``/``answer``
                 (``system`` optional)
- ``text``       ``{"text": str}``

Chat turns accept either key style (``role``/``content`` or ``from``/``value``) under both
``messages`` and ``conversations``. Roles are matched case-insensitively through
:data:`ROLE_ALIASES`; any other role rejects the record. Empty system turns (common in ShareGPT
dumps) carry nothing and are left out; any other empty text rejects the record. Keys a format
does not use (ids, metadata) are ignored, in canonical records too (only the contract's fields
are read). ``auto`` refuses an object holding the keys of two canonical record kinds
(``text`` and ``messages``, say): a forced ``--format`` says which one to read.

Modes: ``sft`` keeps chats as ``messages``; ``pretrain`` turns chats (and Alpaca and
prompt/response records) into ``text``: the turns' contents joined by blank lines, system
prompt included. Parallel records stay as they are in both modes: each is already a training
sample of its own.
"""

from __future__ import annotations

from typing import Any

from parallel.layout import (
    OPTIONAL_KEYS,
    RECORD_KEYS,
    ChatRecord,
    Record,
    RecordError,
    TextRecord,
    parse_record,
    record_kinds,
)

CANONICAL_KEYS: frozenset[str] = frozenset().union(*RECORD_KEYS.values(), *OPTIONAL_KEYS.values())
FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "prompt-response", "text", "canonical")
MODES: tuple[str, ...] = ("sft", "pretrain")

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
}
PROMPT_RESPONSE_KEYS: tuple[tuple[str, str], ...] = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("question", "answer"),
)
CHAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "conversation"),
}
PRETRAIN_SEPARATOR = "\n\n"


def detect(obj: Any) -> str | None:
    """The format of a raw record, or None when no format fits."""
    if not isinstance(obj, dict) or len(record_kinds(obj)) > 1:
        return None  # {"text", "messages"}: which one is the record is not for us to guess
    if "main" in obj or "branches" in obj:
        return "canonical"
    if "messages" in obj:
        return "messages"
    if any(key in obj for key in CHAT_KEYS["sharegpt"]):
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if any(p in obj and r in obj for p, r in PROMPT_RESPONSE_KEYS):
        return "prompt-response"
    if "text" in obj:
        return "text"
    return None


def normalise(obj: Any, fmt: str, mode: str = "sft") -> Record:
    """The canonical record of ``obj`` read as format ``fmt``; RecordError says what was expected."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(obj, dict):
        raise RecordError(unknown_format_reason(obj))
    if fmt == "canonical":
        canonical = {key: value for key, value in obj.items() if key in CANONICAL_KEYS}
    elif fmt in CHAT_KEYS:
        canonical = {"messages": _chat(obj, fmt)}
    elif fmt == "alpaca":
        canonical = {"messages": _alpaca(obj)}
    elif fmt == "prompt-response":
        canonical = {"messages": _prompt_response(obj)}
    elif fmt == "text":
        canonical = {"text": _string(obj, "text")}
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    try:
        record = parse_record(canonical)
    except RecordError as err:
        raise RecordError(f"invalid record: {err}") from None
    if mode == "pretrain" and isinstance(record, ChatRecord):
        return TextRecord(PRETRAIN_SEPARATOR.join(m.content for m in record.messages))
    return record


def empty_branches(obj: Any) -> list[int]:
    """The indices of a canonical parallel record's branches whose response is blank."""
    branches = obj.get("branches") if isinstance(obj, dict) else None
    if not isinstance(branches, list):
        return []
    responses = [b.get("response") if isinstance(b, dict) else b for b in branches]
    return [i for i, r in enumerate(responses) if isinstance(r, str) and not r.strip()]


def unknown_format_reason(obj: Any, nulls: tuple[str, ...] = ()) -> str:
    """Why :func:`detect` found no format, saying what was expected. ``nulls``: the table columns
    that were null in this row (and so are not keys of ``obj``)."""
    if not isinstance(obj, dict):
        return f"not an object: got a JSON {_json_type(obj)}; expected a JSON object"
    kinds = record_kinds(obj)
    if len(kinds) > 1:
        return (
            f"ambiguous record: keys {sorted(obj)} hold {' and '.join(kinds)} records at once; "
            "pass --format to say which one to read"
        )
    expected = "text, messages, conversations, instruction+output, prompt+response, main+branches"
    if nulls:
        names = ", ".join(repr(name) for name in sorted(nulls))
        others = f" (other keys {sorted(obj)})" if obj else ""
        verb = "is" if len(nulls) == 1 else "are"
        return f"null field: {names} {verb} null{others}; expected one of {expected} with a value"
    return f"unknown format: keys {sorted(obj)}; expected one of {expected}"


def _chat(obj: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    key = next((k for k in CHAT_KEYS[fmt] if k in obj), CHAT_KEYS[fmt][0])
    turns = obj.get(key)
    if turns is None:
        raise RecordError(f"missing field: {key!r}; expected a list of chat turns")
    if not isinstance(turns, list):
        raise RecordError(f"wrong type: {key!r} is a {_json_type(turns)}; expected a list of chat turns")
    messages = []
    for index, turn in enumerate(turns):
        message = _turn(turn, index)
        if not message["content"].strip():
            if message["role"] == "system":
                continue
            raise RecordError(f"empty text: turn {index} ({message['role']}) is empty; expected some text")
        messages.append(message)
    return messages


def _turn(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise RecordError(f"wrong type: turn {index} is a {_json_type(turn)}; expected an object")
    role_key = "role" if "role" in turn else "from"
    content_key = "content" if "content" in turn else "value"
    if role_key not in turn or content_key not in turn:
        raise RecordError(f"missing field: turn {index} needs 'role' and 'content' (or 'from' and 'value')")
    role = turn[role_key]
    canonical_role = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
    if canonical_role is None:
        accepted = ", ".join(ROLE_ALIASES)
        raise RecordError(f"unknown role: turn {index} has role {role!r}; expected one of {accepted}")
    return {"role": canonical_role, "content": _content(turn[content_key], index, content_key)}


def _content(value: Any, index: int, key: str) -> str:
    # OpenAI content may be a list of parts; text parts are joined, anything else is refused
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        )
    ):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise RecordError(f"wrong type: turn {index} {key!r} is a {_json_type(value)}; expected a string")
    return value


def _alpaca(obj: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _string(obj, "instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError(f"wrong type: 'input' is a {_json_type(extra)}; expected a string")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    output = _string(obj, "output")
    return [*_system(obj), {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_response(obj: dict[str, Any]) -> list[dict[str, str]]:
    pair = next(((p, r) for p, r in PROMPT_RESPONSE_KEYS if p in obj and r in obj), None)
    if pair is None:
        pairs = ", ".join(f"{p}+{r}" for p, r in PROMPT_RESPONSE_KEYS)
        raise RecordError(f"missing field: keys {sorted(obj)}; expected one of {pairs}")
    prompt, response = (_string(obj, key) for key in pair)
    return [*_system(obj), {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _system(obj: dict[str, Any]) -> list[dict[str, str]]:
    system = obj.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    return [{"role": "system", "content": _string(obj, "system")}]


def _string(obj: dict[str, Any], key: str) -> str:
    """A required, non-empty string field."""
    if key not in obj or obj[key] is None:
        raise RecordError(f"missing field: {key!r}; expected a non-empty string")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"wrong type: {key!r} is a {_json_type(value)}; expected a string")
    if not value.strip():
        raise RecordError(f"empty text: {key!r} is empty; expected some text")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
