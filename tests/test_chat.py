"""tinyrwkv/chat.py: the chat command's conversation, its formats, and resuming from state files.

In-process tests drive `Chat` and `converse` on a tiny synthetic model with the World vocabulary
(named as a G1 model, so `style_of` calls it one); command-line tests run `python -m
tinyrwkv.chat` on the shipped story model with the numpy backend (no JIT compilation to wait for).
"""
import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.chat import (Chat, ThinkingFilter, add_parser, converse, join_turn,
                           not_chat_warning, read_conversation, sidecar_path, split_shown)
from tinyrwkv.chat_format import stop_strings, style_of, user_turn
from tinyrwkv.formats import save_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT


def chat_args(*argv):
    """The chat command's options as its own parser reads them."""
    parser = argparse.ArgumentParser(prog="tinyrwkv")
    add_parser(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    return parser.parse_args(["chat", *argv])


@pytest.fixture(scope="module")
def g1_model(tmp_path_factory):
    """1 layer, C=64, the World vocabulary's 65536 rows, a G1 name: the World tokenizer, style g1."""
    path = tmp_path_factory.mktemp("chat") / "rwkv7-g1-tiny.safetensors"
    save_safetensors(path, make_weights(n_layer=1, n_embd=64, vocab_size=65536, seed=5))
    return tinyrwkv.load(path, backend="numpy")


def sampling(**kw):
    return tinyrwkv.sampling.SamplingParams(**{"penalty_exempt": "", **kw})


def reply(chat, message, max_tokens=6, **kw):
    return "".join(chat.reply(message, max_tokens, sampling(**kw)))


# --- joining turns and showing thinking: fixed strings ----------------------------------------

def test_join_turn_follows_the_stop_string():
    turn = "User: hi\n\nAssistant:"
    assert join_turn("\n\n", turn) == turn                       # World: "\n\n" ended the turn
    assert join_turn("\n\nUser:", turn) == " hi\n\nAssistant:"   # G1: "User:" is in the state
    assert join_turn("\n\nUser: ", turn) == "hi\n\nAssistant:"
    assert join_turn("", turn) == "\n\n" + turn                  # end-of-text / max-tokens
    assert join_turn("\n\nSystem:", turn) == "\n\n" + turn       # an empty system turn ends


def test_hidden_thinking_shows_the_answer_only():
    f = ThinkingFilter(thinking=True, show=False)
    pieces = [">", "Let me", " think.\n\nIt is", " 4.</th", "ink>", "\nThe answer", " is 4."]
    shown = "".join(f.add(p, i + 1) for i, p in enumerate(pieces))
    assert shown == "The answer is 4."
    assert f.thought_tokens == 5 and f.hidden_note(7) == "(thought for 5 tokens)"
    cut = ThinkingFilter(thinking=True, show=False)
    assert cut.add(">still thinking", 3) == "" and "gave no answer" in cut.hidden_note(3)
    assert split_shown("> a\n\nb </think>  Yes.") == "Yes."


def test_shown_thinking_and_no_thinking():
    f = ThinkingFilter(thinking=True, show=True)
    shown = "".join(f.add(p, i + 1) for i, p in enumerate([">hm", "</think>", " Yes."]))
    assert shown == "<think>hm</think> Yes." and f.hidden_note(3) == ""
    plain = ThinkingFilter(thinking=False)
    assert plain.add(" Hello", 1) + plain.add(" there", 2) == "Hello there"   # leading space off


# --- the conversation on a model ----------------------------------------------------------------

def test_g1_prompt_is_what_the_state_read(g1_model):
    assert style_of(g1_model) == "g1" and not_chat_warning(g1_model) is None
    tok = g1_model.tokenizer
    chat = Chat(g1_model, "g1", think=True, seed=1)
    assert chat.turn_text("What is 2+2?") == "User: What is 2+2?\n\nAssistant: <think"
    reply(chat, "What is 2+2?")
    # the state is that of the G1 prompt, then every token the model wrote (fed, not re-encoded)
    _, expect = g1_model.forward(tok.encode(user_turn("What is 2+2?", "g1", think=True)))
    for token in chat.session.generated:                 # one at a time, as they were written
        _, expect = g1_model.forward([token], expect)
    np.testing.assert_array_equal(chat.state.wkv, expect.wkv)
    no_think = Chat(g1_model, "g1", think=False)
    assert no_think.turn_text("Hi") == "User: Hi\n\nAssistant: <think>\n</think>"
    assert Chat(g1_model, "world").turn_text("Hi") == "User: Hi\n\nAssistant:"


def test_reply_tail_and_stop_strings(g1_model):
    chat = Chat(g1_model, "world", seed=3)
    text = reply(chat, "Hi", max_tokens=40)
    written = g1_model.tokenizer.decode(chat.session.generated)
    # random weights rarely write "\n\n": then the reply ended mid-turn and the tail says so
    assert chat.tail == ("" if "\n\n" not in written else written[written.find("\n\n"):])
    assert "\n\n" not in text and stop_strings("world") == ["\n\n"]
    assert chat.turn_text("Next").startswith("\n\nUser: Next" if chat.tail == "" else "User:")


def test_save_then_load_continues_exactly(g1_model, tmp_path):
    for style, think in (("world", False), ("g1", True)):
        a = Chat(g1_model, style, think=think, system="Be brief.", seed=7)
        reply(a, "Hello")
        saved = a.save(tmp_path / f"talk-{style}")                # .npz appended
        a_tail = a.tail
        assert saved.name == f"talk-{style}.npz" and sidecar_path(saved).is_file()
        reply(a, "And then?", temperature=0)                       # greedy: no RNG involved
        logits_a = a.session.feed(a.turn_text("Why?"))            # the uninterrupted session

        b = Chat(g1_model, style, think=think, seed=99)
        warnings = []
        b.load(tmp_path / f"talk-{style}", warnings.append)       # the name as /save took it
        assert warnings == [] and b.tail == a_tail
        reply(b, "And then?", temperature=0)
        logits_b = b.session.feed(b.turn_text("Why?"))
        np.testing.assert_array_equal(logits_b, logits_a)
        np.testing.assert_array_equal(b.state.wkv, a.state.wkv)


def test_sidecar_warns_and_is_checked(g1_model, tmp_path):
    chat = Chat(g1_model, "g1", seed=2)
    reply(chat, "Hi")
    saved = chat.save(tmp_path / "t.npz")
    warnings = []
    _, tail = read_conversation(saved, g1_model, "world", warnings.append)
    assert tail == chat.tail and len(warnings) == 1 and "g1 chat style" in warnings[0]
    side = sidecar_path(saved)
    meta = json.loads(side.read_text())
    meta["model"]["name"] = "another.pth"
    side.write_text(json.dumps(meta))
    warnings.clear()
    read_conversation(saved, g1_model, "g1", warnings.append)
    assert len(warnings) == 1 and "another model" in warnings[0] and "another.pth" in warnings[0]
    side.write_text("{not json")
    warnings.clear()
    _, tail = read_conversation(saved, g1_model, "g1", warnings.append)
    assert tail == "\n\n" and "is ignored" in warnings[0]
    # a sidecar from another save of the file (a kill between the two writes) is not trusted
    Chat(g1_model, "g1").save(tmp_path / "u.npz")
    side.write_text(sidecar_path(tmp_path / "u.npz").read_text())
    warnings.clear()
    read_conversation(saved, g1_model, "g1", warnings.append)
    assert "another save" in warnings[0]


def test_commands_in_piped_chat(g1_model, tmp_path):
    args = chat_args("-n", "4", "--seed", "1", "--system", "Be kind.")
    chat = Chat(g1_model, "g1", system=args.system, seed=1)
    start = chat.state.copy()
    out, err = io.StringIO(), []
    save = tmp_path / "mid.npz"
    lines = ["Hi\n", f"/save {save}\n", "More\n", "/reset\n", "//slash\n", f"/load {save}\n",
             "/help\n", "/exit\n", "never read\n"]
    converse(chat, args, False, err.append, lines=lines, out=out)
    text = out.getvalue()
    assert text.count("User: ") == 3 and "User: /slash\n" in text and "never read" not in text
    assert any("reset" in e for e in err) and any("loaded" in e for e in err)
    np.testing.assert_array_equal(chat.state.wkv, tinyrwkv.load_state(save).wkv)   # /load'ed
    chat.reset()
    np.testing.assert_array_equal(chat.state.wkv, start.wkv)                        # /reset
    with pytest.raises(SystemExit):                    # piped: a failed /load ends the run
        converse(chat, args, False, err.append, lines=[f"/load {tmp_path / 'none.npz'}\n"],
                 out=io.StringIO())


# --- the command line -------------------------------------------------------------------------

def cli(*args, stdin=""):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv.chat", "--backend", "numpy",
                           *map(str, args)], input=stdin.encode(), capture_output=True,
                          timeout=120, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def test_cli_story_model_warns_saves_and_resumes(tmp_path):
    save = tmp_path / "story"
    rc, out, err = cli("-n", "5", "--save-state", save, stdin="Hi\n")
    assert rc == 0, err
    assert "is not a chat model" in err and "stories" in err and "World format" in err
    assert out.startswith("User: Hi\nAssistant: ")
    assert (tmp_path / "story.npz").is_file() and (tmp_path / "story.npz.json").is_file()
    rc, out, err = cli("-n", "5", "--state", tmp_path / "story.npz", stdin="Go on\n")
    assert rc == 0, err
    assert "warning: " + str(tmp_path) not in err                 # same model, same style


def test_cli_bad_state_files(tmp_path, g1_model):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    rc, _, err = cli("--state", bad, stdin="Hi\n")
    assert rc == 1 and "tinyrwkv: error:" in err and str(bad) in err and "Traceback" not in err
    other = Chat(g1_model, "g1").save(tmp_path / "g1.npz")          # a state of another model
    rc, _, err = cli("--state", other, stdin="Hi\n")
    assert rc == 1 and "this model needs" in err and "use a state saved from this model" in err
    rc, _, err = cli("--save-state", tmp_path, stdin="Hi\n")         # a folder
    assert rc == 1 and "is a folder" in err


def test_help_lists_the_options_and_commands():
    parser = argparse.ArgumentParser(prog="tinyrwkv")
    add_parser(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    text = parser._subparsers._group_actions[0].choices["chat"].format_help()
    for option in ("--state", "--save-state", "--style", "--think", "--no-think",
                   "--show-thinking", "--hide-thinking", "/save FILE", "/load FILE", "/reset"):
        assert option in text, option
