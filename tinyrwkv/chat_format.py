"""Chat prompts in the formats RWKV models were trained on (docs/sampling.md §4).

    render([{"role": "user", "content": "Hi"}], style="world")  ->  "User: Hi\n\nAssistant:"

world: the RWKV World models and the ChatRWKV demos. A turn is "User: {text}\n\n" or
"Assistant: {text}\n\n", an optional "System: {text}\n\n" comes first, and the prompt ends with
"Assistant:" (no space: the model writes it). Texts are cleaned as ChatRWKV does: "\r\n" -> "\n",
runs of newlines collapsed to one (a blank line would end the turn), stripped. The reply ends at
the first "\n\n", which stays in the state so the next turn starts right after it.

g1: the RWKV-7 G1 reasoning models (RWKV-LM's G1 templates). The same turns, but the reply may
think first: with think=True the prompt ends "Assistant: <think" and the model writes its
reasoning, then "</think>", then the answer; with think=False it ends with an empty thought,
"Assistant: <think>\n</think>", and the model answers at once. A thinking reply can hold blank
lines, so a G1 reply ends at "\n\nUser:" or the end-of-text token (0), not at "\n\n".
"""
import re

STYLES = ("world", "g1")
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def clean(text):
    """A message as the models saw them in training: newlines normalised, blank lines collapsed
    (a blank line ends a turn), stripped."""
    return re.sub(r"\n+", "\n", str(text).replace("\r\n", "\n")).strip()


def render(messages, style="world", think=False):
    """The prompt for the model's next reply: every message as a turn, then the reply's cue.
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. A system message must
    come first; an assistant message's thinking (G1: "<think>...</think>") is dropped from the
    history, as the G1 templates do."""
    if style not in STYLES:
        raise ValueError(f"chat style must be one of {', '.join(STYLES)}, not {style!r}")
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, not {role!r}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message must come first")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        if role == "assistant":
            content = split_thinking(content)[1]
        parts.append(f"{ROLES[role]}: {clean(content)}\n\n")
    return "".join(parts) + reply_cue(style, think)


def reply_cue(style="world", think=False):
    """What the prompt ends with, so that the model writes the assistant's reply."""
    if style == "g1":
        return "Assistant: <think" if think else "Assistant: <think>\n</think>"
    return "Assistant:"


def user_turn(text, style="world", think=False):
    """One user turn and the reply's cue, to feed after a state that ends a previous turn."""
    return f"User: {clean(text)}\n\n" + reply_cue(style, think)


def stop_strings(style="world"):
    """Where a reply ends (the text before it is the reply)."""
    return ["\n\n"] if style == "world" else ["\n\nUser:", "\n\nSystem:"]


def split_thinking(reply):
    """(thinking, answer) of a G1 reply: the text up to "</think>" and the rest, stripped; a
    reply without "</think>" is all answer."""
    head, mark, tail = reply.partition("</think>")
    if not mark:
        return "", reply.strip()
    return head.replace("<think>", "", 1).lstrip(">").strip(), tail.strip()


def style_of(model):
    """The chat style a model was trained for: "g1" for a G-series model (its name says so),
    "world" for another model with the 65536-token World vocabulary, None for a model that was
    not trained to chat (such as the shipped TinyStories model)."""
    config = getattr(model, "config", None)
    if config is None or config.vocab_size != 65536:
        return None
    name = str(getattr(model, "name", "") or getattr(model, "path", "") or "").lower()
    return "g1" if re.search(r"(^|[^a-z])g[01][a-z]*([^a-z]|$)", name.replace("rwkv7", "")) else "world"
