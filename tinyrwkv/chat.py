"""`tinyrwkv chat`: a conversation kept in the model's state, resumable from a state file.

    python -m tinyrwkv chat --model rwkv7-g1-0.1b.pth --save-state talk.npz
    python -m tinyrwkv chat --model rwkv7-g1-0.1b.pth --state talk.npz      # goes on from there

Because RWKV is an RNN, the state after a reply is all the conversation needs: each turn feeds
only the new user message, and saving the state (406 kB for the shipped model, 2.4 MB at the
0.1B size, whatever the conversation's length) saves the conversation. The prompts are those of tinyrwkv/chat_format.py
(docs/sampling.md §4): the World format (`User: ...\\n\\nAssistant:`) or the G1 format, with or
without a thinking turn.

`Chat` is the conversation (a Session, its style, and how the state's text ends); `ThinkingFilter`
turns a G1 reply's text into what is shown; `run` is the command. A state file saved here gets a
small JSON sidecar beside it (`talk.npz.json`: style, model, how the text ends) so that loading
it continues exactly where the conversation stopped, and warns when the model or style differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .chat_format import STYLES, clean, stop_strings, style_of, user_turn

SIDECAR_FORMAT = "tinyrwkv-chat-v1"
SIDECAR_MAX_BYTES = 64 * 1024      # a sidecar is a few hundred bytes; a larger one is not ours
TURN_END = "\n\n"                  # every turn of both formats ends with a blank line
THINK_END = "</think>"
COMMANDS = """\
  /save FILE   save the conversation (its state, FILE.npz, and FILE.npz.json beside it)
  /load FILE   go on from a saved conversation (or any state file of this model)
  /reset       forget the conversation: back to the start (--state, then --system)
  /help        this list
  /exit        end the chat (also /quit, Ctrl-D; Ctrl-C too)
  //text       send a message that starts with '/' ("/text")"""


# ---------------------------------------------------------------------------------------------
# the conversation
# ---------------------------------------------------------------------------------------------

def join_turn(tail, turn):
    """The text to feed for `turn` after a state whose text ends with `tail`.

    A reply ends at a stop string, which stays in the state (chat_format: the next turn starts
    right after it). The World format's stop, "\\n\\n", ends the turn: the next turn follows as it
    is. G1's "\\n\\nUser:" already holds the start of the next turn: only the rest is fed (the
    longest end of `tail` that begins `turn` is not fed again). A reply that ended otherwise (the
    end-of-text token, which is not fed, or --max-tokens) stopped mid-turn: "\\n\\n" ends it first.
    """
    for k in range(min(len(tail), len(turn)), 0, -1):
        if tail.endswith(turn[:k]):
            return turn[k:]
    return turn if tail.endswith(TURN_END) else TURN_END + turn


class Chat:
    """A conversation with `model` in chat `style` ("world" or "g1"), kept in a Session.

    `state`: where it starts (None: the zero state); `system`: a "System:" message fed after it.
    `tail`: the end of the text the state has read, as far as the next turn needs it (join_turn);
    "\\n\\n" at a turn boundary. `start` keeps the state and tail that /reset returns to.
    """

    def __init__(self, model, style="world", think=False, state=None, tail=TURN_END,
                 system=None, seed=None):
        from .generate import Session
        if style not in STYLES:
            raise ValueError(f"chat style must be one of {', '.join(STYLES)}, not {style!r}")
        self.model, self.style, self.think = model, style, bool(think and style == "g1")
        self.session = Session(model, model.tokenizer, state=state, seed=seed)
        self.tail = tail
        if system and clean(system):
            self.session.feed(join_turn(self.tail, f"System: {clean(system)}{TURN_END}"))
            self.tail = TURN_END
        self.start = (self._state_copy(), self.tail)

    def _state_copy(self):
        state = self.session.state
        return None if state is None else state.copy()

    @property
    def state(self):
        """The conversation's state (the zero state before anything was read)."""
        return self.session.state if self.session.state is not None else self.model.zero_state()

    def turn_text(self, message):
        """What the next turn feeds for the user's `message` (the reply's cue included)."""
        return join_turn(self.tail, user_turn(message, self.style, self.think))

    def reply(self, message, max_tokens=500, sampling=None):
        """Feed the user's `message`, then yield the reply's text pieces as the model writes them
        (without the stop string, which goes into the state). Afterwards `self.tail` says how the
        reply ended and `self.reply_tokens` how many tokens it took. sampling: a SamplingParams
        (default: the chat command's defaults, ChatRWKV's)."""
        if sampling is None:
            from .generate import CHAT_SAMPLING
            from .sampling import SamplingParams
            sampling = SamplingParams(**CHAT_SAMPLING)
        if self.style == "world" and 0 not in tuple(sampling.ban_tokens):
            # ChatRWKV's World chat bans end-of-text: a reply ends at its blank line ("\n\n")
            from dataclasses import replace
            sampling = replace(sampling, ban_tokens=tuple(sampling.ban_tokens) + (0,))
        session = self.session
        text = self.turn_text(message)
        self.tail = ""                          # mid-turn, until the reply has ended cleanly
        session.feed(text)
        first = len(session.generated)
        yield from session.stream(max_tokens, sampling, stop=stop_strings(self.style),
                                  stop_at_eot=True)
        written = session.tokenizer.decode(session.generated[first:])
        self.reply_tokens = len(session.generated) - first
        self.tail = _tail_after(written, stop_strings(self.style))

    def reset(self):
        state, self.tail = self.start
        self.session.state = None if state is None else state.copy()
        self.session.logits = None

    def load(self, path, warn):
        """Go on from the state file at `path` (sidecar checked: warnings through `warn`)."""
        state, tail = read_conversation(path, self.model, self.style, warn)
        self.session.state, self.session.logits, self.tail = state, None, tail

    def save(self, path):
        """Save the conversation at `path` (atomic; the sidecar beside it). Returns the path."""
        return save_conversation(self.state, path, self.model, self.style, self.think, self.tail)


def _tail_after(written, stops):
    """How a reply's text `written` leaves the state: from its first stop string on (that text is
    in the state, the next turn follows it), or "" when it ended without one (mid-turn)."""
    found = [i for i in (written.find(s) for s in stops) if i >= 0]
    return written[min(found):] if found else ""


class ThinkingFilter:
    """What to show of a reply while it streams. Pieces in, text to print out.

    Outside a thinking turn (World, or G1 --no-think) the reply is shown as written. In a G1
    thinking turn the prompt ends with "<think" and the model writes ">reasoning</think> answer":
    shown, it is printed from "<think" on; hidden, nothing is printed until "</think>", then the
    answer. `thought_tokens` counts the tokens written up to and with "</think>" (None until it
    appears), from the token counts passed to `add`.
    """

    def __init__(self, thinking=False, show=True):
        self.thinking, self.show = thinking, show
        self.seen = ""                 # the reply so far (only kept while thinking is hidden)
        self.answering = not thinking  # past "</think>" (or no thinking turn)
        self.started = False           # something was printed (leading space dropped before)
        self.thought_tokens = None

    def add(self, piece, tokens_so_far=None):
        if not self.answering and self.show:
            if THINK_END in self.seen + piece:
                self.answering = True
                self.thought_tokens = tokens_so_far
            self.seen = (self.seen + piece)[-len(THINK_END):]
            return self._out(("<think" if not self.started else "") + piece)
        if not self.answering:
            self.seen += piece
            head, mark, answer = self.seen.partition(THINK_END)
            if not mark:
                return ""
            self.answering, self.seen = True, ""
            self.thought_tokens = tokens_so_far
            return self._out(answer)
        return self._out(piece)

    def _out(self, text):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    def hidden_note(self, reply_tokens):
        """The stderr note for a hidden thought ("" when nothing was hidden)."""
        if not self.thinking or self.show:
            return ""
        if self.thought_tokens is None:
            return (f"(thought for {reply_tokens} tokens and gave no answer: the reply ended "
                    f"while thinking; raise --max-tokens, or --show-thinking to see it)")
        return f"(thought for {self.thought_tokens} tokens)"


def split_shown(reply, thinking=True, show=False):
    """The text ThinkingFilter shows for a whole reply (for tests and callers with no stream)."""
    f = ThinkingFilter(thinking, show)
    return f.add(reply)


# ---------------------------------------------------------------------------------------------
# state files with a sidecar
# ---------------------------------------------------------------------------------------------

def sidecar_path(state_path):
    """The JSON beside a state file: talk.npz -> talk.npz.json."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + ".json")


def model_identity(model):
    """What a sidecar records of the model, to warn when a state goes on with another one."""
    c = model.config
    return {"name": str(getattr(model, "name", None) or ""), "n_layer": c.n_layer,
            "n_embd": c.n_embd, "head_size": c.head_size, "vocab_size": c.vocab_size,
            "n_params": int(model.n_params)}


def save_conversation(state, path, model, style, think, tail):
    """The state file (formats/state_file.py save_state, atomic) and then its sidecar (atomic),
    which names the state file's SHA-256: a sidecar left from an older save (a kill between the
    two writes) is recognised and ignored. Returns the state file's path."""
    from .files import atomic_open
    from .formats.state_file import save_state
    written = save_state(state, path)
    meta = {"format": SIDECAR_FORMAT, "style": style, "think": bool(think), "tail": tail,
            "model": model_identity(model), "state_sha256": _sha256(written)}
    with atomic_open(sidecar_path(written), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return written


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_conversation(path, model, style, warn):
    """(State, tail) from a state file: a tinyrwkv state (.npz, checked against the model: one of
    another model is refused, naming the shapes) or a state-tuning checkpoint (.pth/.safetensors,
    as generate --state reads). The sidecar, when there is one, gives the tail; differences in
    model or style are passed to `warn`, and a sidecar that cannot be used is ignored with a
    warning (the state itself is still checked)."""
    from .cli_support import load_state
    from .formats.state_file import state_file_path
    path = Path(path)
    if not path.exists() and state_file_path(path).is_file():    # /save talk wrote talk.npz
        path = state_file_path(path)
    state = load_state(path, model.config)
    tail = TURN_END
    meta = _read_sidecar(path, warn)
    if meta is not None:
        tail = meta["tail"]
        saved, now = meta["model"], model_identity(model)
        differ = [k for k in now if saved.get(k) != now[k]]
        if differ:
            what = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in differ)
            warn(f"{path} was saved with another model ({what}); the state fits this model's "
                 f"shapes, but its replies may not make sense")
        if meta["style"] != style:
            warn(f"{path} was saved in the {meta['style']} chat style, this chat uses {style} "
                 f"(--style {meta['style']} goes on in the same style)")
    return state, tail


def _read_sidecar(path, warn):
    """The sidecar's checked contents, or None (none there, or unusable: warned)."""
    state_path = Path(path)
    side = sidecar_path(state_path)
    if not side.is_file():
        return None
    ignored = f"{side} is ignored (the conversation goes on after a blank line)"
    try:
        if side.stat().st_size > SIDECAR_MAX_BYTES:
            raise ValueError(f"larger than {SIDECAR_MAX_BYTES} bytes")
        meta = json.loads(side.read_text(encoding="utf-8"))
        ok = (isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT
              and meta.get("style") in STYLES and isinstance(meta.get("tail"), str)
              and len(meta["tail"]) <= 256 and isinstance(meta.get("model"), dict)
              and isinstance(meta.get("state_sha256"), str))
        if not ok:
            raise ValueError(f"not a {SIDECAR_FORMAT} sidecar")
    except (OSError, ValueError) as e:               # JSONDecodeError, UnicodeDecodeError too
        warn(f"{ignored}: {e}")
        return None
    if meta["state_sha256"] != _sha256(state_path):
        warn(f"{ignored}: it describes another save of {state_path.name} (the state file "
             "changed after it was written)")
        return None
    return meta


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

SHIPPED_NOTE = ("the shipped model was trained on children's stories (TinyStories), not on "
                "conversations: its replies will be stories")


def not_chat_warning(model):
    """The warning for a model style_of does not know as a chat model, or None for one it does."""
    if style_of(model) is not None:
        return None
    from .errors import CheckpointError
    from .loader import shipped_model_path
    try:
        shipped = Path(shipped_model_path()).resolve()
    except CheckpointError:
        shipped = None
    path = getattr(model, "path", None)
    is_shipped = path is not None and shipped is not None and Path(path).resolve() == shipped
    what = SHIPPED_NOTE if is_shipped else (
        f"its {model.config.vocab_size}-token vocabulary is not the 65536-token World vocabulary "
        f"of RWKV's chat models (World, G1): it was not trained to chat, and its replies will "
        f"continue the text rather than answer")
    return (f"{getattr(model, 'name', None) or 'this model'} is not a chat model: {what}. "
            f"Chatting anyway, in the World format.")


def sampling_of(args):
    """The chat's sampling (ChatRWKV API_DEMO_CHAT.py's defaults are the options' defaults). In
    the World style end-of-text is banned, as ChatRWKV does (Chat.reply); a G1 reply may end
    with it."""
    from .sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty,
                          penalty_decay=args.penalty_decay, penalty_exempt="")


def run(args):
    """The chat command: stdin lines in (a terminal or a pipe), replies out on stdout; notes,
    warnings and speed on stderr."""
    from .cli_support import load_model
    from .files import refuse_overwriting
    from .formats.state_file import state_file_path
    if args.save_state:
        state_file_path(args.save_state)             # a folder is refused before loading
    model = load_model(args)
    if args.save_state:
        refuse_overwriting(state_file_path(args.save_state), [model.path])
    err = lambda text: print(f"tinyrwkv: {text}", file=sys.stderr)
    warn = lambda text: err(f"warning: {text}")
    detected = style_of(model)
    note = not_chat_warning(model)
    if note:
        warn(note)
    style = args.style if args.style != "auto" else (detected or "world")
    if args.think and style != "g1":
        warn(f"--think is for G1 models (the g1 style); the {style} style has no thinking turn")
    state, tail = None, TURN_END
    if args.state:
        state, tail = read_conversation(args.state, model, style, warn)
    chat = Chat(model, style, think=bool(args.think), state=state, tail=tail, system=args.system,
                seed=None if args.seed < 0 else args.seed)
    if args.show_thinking is not None and not chat.think:
        warn("--show-thinking/--hide-thinking apply to a G1 chat with --think")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chat with the model ({style} format{', thinking' if chat.think else ''}). "
              "/help lists the commands; /exit (or Ctrl-D) quits.", file=sys.stderr)
    try:
        converse(chat, args, interactive, err)
    finally:                                           # also on Ctrl-C and errors
        if args.save_state:
            written = chat.save(args.save_state)
            err(f"conversation saved to {written} (and {sidecar_path(written).name})")
    s = chat.session.stats
    if s["tokens"]:
        from .cli_support import rate
        err(f"generated {rate(s['tokens'], s['seconds'])}")


def converse(chat, args, interactive, err, lines=None, out=None):
    """The chat loop: messages from `lines` (default: stdin), replies to `out` (default stdout,
    through cli.emit). Piped input is echoed as "User: ..." lines. A failed /save or /load is
    reported and the chat goes on in a terminal; in piped input it ends the run (exit status 1),
    as a script should stop at a failed step."""
    from .cli_support import emit, fail
    write = emit if out is None else out.write
    sampling = sampling_of(args)
    show = args.show_thinking if args.show_thinking is not None else True
    source = iter(lines) if lines is not None else None
    while True:
        try:
            if source is not None:
                message = next(source, "")
            else:
                message = input("User: ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except UnicodeDecodeError as e:
            fail(f"stdin: the message is not UTF-8 text ({e.reason}); type or pipe UTF-8")
        if not interactive and message == "":
            break                                      # end of piped input
        message = message.strip()
        if not message:
            continue
        if message.startswith("/") and not message.startswith("//"):
            if command(chat, message, err, interactive, fail) == "exit":
                break
            continue
        if message.startswith("//"):
            message = message[1:]
        if not interactive:
            write(f"User: {message}\n")
        write("Assistant: ")
        shown = ThinkingFilter(thinking=chat.think, show=show)
        tokens = chat.session.stats["tokens"]
        for piece in chat.reply(message, args.max_tokens, sampling):
            text = shown.add(piece, chat.session.stats["tokens"] - tokens)
            if text:
                write(text)
        write("\n\n")
        hidden = shown.hidden_note(chat.reply_tokens)
        if hidden:
            print(hidden, file=sys.stderr)


def command(chat, line, err, interactive, fail):
    """One /command. Returns "exit" to end the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        print("Commands:\n" + COMMANDS, file=sys.stderr)
    elif name == "/reset":
        chat.reset()
        err("(conversation reset to its start)")
    elif name in ("/save", "/load"):
        if not arg:
            problem = f"{name} needs a file name: {name} talk.npz"
        else:
            try:
                if name == "/save":
                    written = chat.save(arg)
                    err(f"(conversation saved to {written})")
                else:
                    chat.load(arg, lambda text: err(f"warning: {text}"))
                    err(f"(conversation loaded from {arg})")
                return None
            except (OSError, ValueError) as e:
                from .cli_support import describe_os_error
                problem = describe_os_error(e) if isinstance(e, OSError) else str(e)
        if not interactive:
            fail(problem)
        err(f"error: {problem}")
    else:
        problem = f"unknown command {name}; /help lists the commands (//text sends '/text')"
        if not interactive:
            fail(problem)
        err(f"error: {problem}")
    return None


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------

def add_parser(sub, formatter_class):
    """Add `chat` to the subparsers `sub`."""
    from .cli_support import add_model_options, add_sampling_options
    c = sub.add_parser(
        "chat", help="chat with a model (World and G1 formats), resumable from a saved state",
        formatter_class=_with_raw_epilog(formatter_class),
        description="Chat with an RWKV-7 model. The model's state carries the conversation: "
                    "each turn reads only the new message, and --save-state / /save keep the "
                    "whole conversation in a state file (docs/sampling.md §4). Messages come "
                    "from the terminal, or one per line from a pipe.",
        epilog="Commands inside the chat:\n" + COMMANDS)
    add_model_options(c, model_help="RWKV-7 model: .pth, .safetensors, .gguf or a Hugging Face "
                                    "folder; default: the model in weights/ (a story model, "
                                    "not a chat model)")
    f = c.add_argument_group("chat format")
    f.add_argument("--style", choices=["auto", *STYLES], default="auto",
                   help="the prompt format: world (User:/Assistant: turns, RWKV World models), "
                        "g1 (the G1 reasoning models' turns, with a thinking turn), or auto: "
                        "g1 for a model whose name says G1, world for another World-vocabulary "
                        "model (and world, with a warning, for a model not trained to chat)")
    f.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="G1: let the model think before it answers (<think>...</think>); "
                        "default --no-think: it answers at once")
    shown = f.add_mutually_exclusive_group()
    shown.add_argument("--show-thinking", dest="show_thinking", action="store_const", const=True,
                       default=None, help="G1 with --think: print the thinking, then the answer "
                                          "(the default)")
    shown.add_argument("--hide-thinking", dest="show_thinking", action="store_const", const=False,
                       help="G1 with --think: print the answer only, and on stderr how many "
                            "tokens the thought took; the state holds the whole reply either way")
    f.add_argument("--system", metavar="TEXT", help="a 'System:' message before the first turn")
    s = c.add_argument_group("state")
    s.add_argument("--state", metavar="FILE",
                   help="start from a saved conversation (--save-state, /save) or any state of "
                        "this model (generate --save-state .npz, or a state-tuning "
                        ".pth/.safetensors); a state of another model is refused")
    s.add_argument("--save-state", metavar="FILE",
                   help="when the chat ends (/exit, end of input, Ctrl-C), save the "
                        "conversation to FILE (.npz appended when missing; atomic) and "
                        "FILE.npz.json beside it (style, model, how the text ends)")
    add_sampling_options(c.add_argument_group("sampling (ChatRWKV's chat settings)"),
                         temperature=1.0, top_p=0.3, presence=0.5, frequency=0.5, max_tokens=500)
    c.set_defaults(func=run)
    return c


def _with_raw_epilog(formatter_class):
    """formatter_class, keeping the epilog's lines (the command list) as written."""
    class Formatter(formatter_class):
        def _fill_text(self, text, width, indent):
            if text.startswith("Commands inside"):
                return "".join(indent + line for line in text.splitlines(keepends=True))
            return super()._fill_text(text, width, indent)
    return Formatter


def main(argv=None):
    """`python -m tinyrwkv.chat ARGS` = `tinyrwkv chat ARGS` (until cli.py wires it in)."""
    from .cli_support import HelpFormatter, Parser, one_line_errors
    parser = Parser(prog="tinyrwkv")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, HelpFormatter)
    args = parser.parse_args(["chat", *(sys.argv[1:] if argv is None else argv)])
    with one_line_errors():
        args.func(args)


if __name__ == "__main__":
    main()
