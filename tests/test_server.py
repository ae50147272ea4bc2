"""tinyrwkv serve (tinyrwkv/server.py) with the official `openai` client: completions and chat,
streamed and not, several clients at once (decoded as one batch), the state cache's hit path,
embeddings, and bad requests (OpenAI-style errors, and the server goes on serving)."""

import argparse
import http.client
import json
import threading
import time

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.chat_format import render
from tinyrwkv.formats import save_safetensors
from tinyrwkv.generate import generate
from tinyrwkv.server import Server, make_cache
from tinyrwkv.synthetic import make_weights

openai = pytest.importorskip("openai")

GREEDY = dict(temperature=0, presence_penalty=0, frequency_penalty=0)


def start(model, **options):
    server = Server(model, port=0, quiet=True, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                           max_retries=0, timeout=60)
    return server, client


@pytest.fixture(scope="module")
def shipped():
    model = tinyrwkv.load()
    server, client = start(model, cache=make_cache(64), max_prompt_tokens=200)   # the real one
    yield model, server, client
    server.close()


def test_models_and_completion_match_generate(shipped):
    model, server, client = shipped
    assert [m.id for m in client.models.list().data] == [server.model_id] == ["model"]
    prompt = "Once upon a time, there was a little dog"
    r = client.completions.create(model="model", prompt=prompt, max_tokens=12, **GREEDY)
    alone = "".join(generate(model, prompt, max_tokens=12, **GREEDY))
    assert r.choices[0].text == alone and alone
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    pieces = [c.choices[0].text for c in client.completions.create(
        model="model", prompt=prompt, max_tokens=12, stream=True, **GREEDY)]
    assert "".join(pieces) == alone and len([p for p in pieces if p]) > 1


def test_completion_stop_seed_and_token_ids(shipped):
    model, _, client = shipped
    prompt = "Lily went to the park. She saw a big"
    alone = "".join(generate(model, prompt, max_tokens=20, **GREEDY))
    stop = alone.split()[3]
    r = client.completions.create(model="model", prompt=prompt, max_tokens=20, stop=stop,
                                  **GREEDY)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == alone[:alone.find(stop)]
    ids = model.tokenizer.encode(prompt)
    r2 = client.completions.create(model="model", prompt=ids, max_tokens=20, **GREEDY)
    assert r2.choices[0].text == alone
    sampled = [client.completions.create(model="model", prompt=prompt, max_tokens=15, seed=7,
                                         temperature=1.0).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    several = client.completions.create(model="model", prompt=[prompt, "Tom had a red"],
                                        max_tokens=8, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == "".join(generate(model, prompt, max_tokens=8, **GREEDY))


def test_chat_streamed_and_not_with_warning(shipped):
    _, server, client = shipped
    messages = [{"role": "user", "content": "Tell me about a cat."}]
    r = client.chat.completions.create(model="model", messages=messages, max_tokens=20, **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert "not a chat model" in r.model_extra["warning"] and server.style is None
    chunks = list(client.chat.completions.create(model="model", messages=messages,
                                                 max_tokens=20, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_concurrent_requests_are_batched(shipped):
    model, server, client = shipped
    prompts = ["The sun was", "A little bird", "Ben and Mia", "One day, a girl named"]
    before = server.engine.stats()["batched_steps"]
    results, errors = [None] * 4, []

    def ask(i):
        try:
            results[i] = client.completions.create(model="model", prompt=prompts[i],
                                                   max_tokens=30, **GREEDY).choices[0].text
        except Exception as e:     # noqa: BLE001: reported below
            errors.append(e)
    # Hold the engine (a function in its queue) until all 4 requests wait in its queue, so that
    # it admits them together however the threads are scheduled.
    release = threading.Event()
    server.engine.queue.put(lambda: release.wait(30))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(600):
        if server.engine.queue.qsize() >= 4:
            break
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert not errors
    stats = server.engine.stats()
    assert stats["batched_steps"] >= before + 29 and stats["max_batch_seen"] == 4
    for prompt, text in zip(prompts, results):      # batched: the same text as alone
        assert text == "".join(generate(model, prompt, max_tokens=30, **GREEDY))


def test_second_chat_turn_reads_only_new_tokens(shipped):
    """Turn 2 starts from the state after turn 1's reply (the prompt's and the reply's tokens
    come from the cache): only the text after the reply is read."""
    model, server, client = shipped
    messages = [{"role": "user", "content": "Where did the frog go?"}]
    first = client.chat.completions.create(model="model", messages=messages, max_tokens=16,
                                           **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reply = first.choices[0].message.content
    turn_1 = render(messages) + " " + reply                 # what the state after turn 1 read
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="model", messages=messages, max_tokens=8,
                                            **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    read = second.usage.model_extra["prompt_tokens_read"]
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens
    assert read == second.usage.prompt_tokens - cached
    assert read == len(model.tokenizer.encode(render(messages)[len(turn_1):]))
    assert server.engine.stats()["prompt_tokens_cached"] >= cached


def test_embeddings(shipped):
    model, _, client = shipped
    r = client.embeddings.create(model="model", input=["a dog", "the sea"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == model.config.n_embd
    expect = model.embed(model.tokenizer.encode("the sea"))
    np.testing.assert_allclose(r.data[1].embedding, expect, rtol=1e-5, atol=1e-6)


def raw(server, method, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


@pytest.mark.parametrize("change, status, code", [
    (dict(model="gpt-4"), 404, "model_not_found"),
    (dict(max_tokens=-1), 400, "invalid_value"),
    (dict(max_tokens=10 ** 6), 400, "invalid_value"),
    (dict(prompt="once upon a time " * 100), 400, "context_length_exceeded"),
    (dict(n=2), 400, "unsupported_parameter"),
    (dict(logprobs=2), 400, "unsupported_parameter"),
    (dict(temperature="hot"), 400, "invalid_type"),
    (dict(top_p=1.5), 400, "invalid_value"),
    (dict(prompt=[5000000]), 400, "invalid_value"),
    (dict(prompt=""), 400, "invalid_value"),
    (dict(mirostat=2), 400, "unknown_parameter"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(shipped, change, status, code):
    _, server, client = shipped
    body = {**dict(model="model", prompt="Hello", max_tokens=2), **change}
    got, data = raw(server, "POST", "/v1/completions", json.dumps(body))
    assert got == status and data["error"]["code"] == code
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error" and data["error"]["message"]
    assert client.completions.create(model="model", prompt="Hi", max_tokens=2).choices


def test_malformed_requests_through_the_client_and_raw(shipped):
    _, server, client = shipped
    got, data = raw(server, "POST", "/v1/chat/completions", b'{"model": "model", "messages": [')
    assert got == 400 and data["error"]["code"] == "invalid_json"
    got, data = raw(server, "POST", "/v1/nothing", b"{}")
    assert got == 404 and data["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="model", max_tokens=-5,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="model", messages=[{"role": "robot", "content": "x"}])
    r = client.chat.completions.create(model="model", max_tokens=3,
                                       messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.role == "assistant"


def test_synthetic_world_model_shapes(tmp_path):
    """A 65536-token model loads with the World tokenizer and chats in the World format (no
    warning); token-id prompts and embeddings have its shapes."""
    path = tmp_path / "tiny-world.safetensors"
    save_safetensors(path, make_weights(n_layer=2, n_embd=64, vocab_size=65536, seed=3))
    model = tinyrwkv.load(path)
    server, client = start(model, cache=None, max_batch=2, max_tokens_limit=10 ** 6)
    try:
        assert server.style == "world" and server.warning is None
        r = client.chat.completions.create(model="tiny-world", max_tokens=4, seed=1,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert "warning" not in (r.model_extra or {}) and r.usage.completion_tokens <= 4
        r = client.completions.create(model="tiny-world", prompt=[[1, 2, 3], [4, 5]],
                                      max_tokens=3, **GREEDY)
        assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
        e = client.embeddings.create(model="tiny-world", input=[[10, 20, 30]])
        assert len(e.data[0].embedding) == 64
        assert server.engine.stats()["cache"] is None
        # A client that leaves mid-stream: its sequence leaves the batch (greedy on these
        # weights never samples end-of-text, so only the client's going can end it early).
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps(dict(model="tiny-world", prompt=[1, 2], max_tokens=10 ** 6,
                                          stream=True, **GREEDY)))
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        response.close()                                 # the client goes away
        conn.close()
        deadline = time.monotonic() + 60                 # noticed at its next writes (a busy
        while time.monotonic() < deadline:               # machine may be slow to get there)
            if server.engine.stats()["dropped"]:
                break
            time.sleep(0.05)
        stats = server.engine.stats()
        assert stats["dropped"] == 1 and stats["running"] == 0
        assert client.completions.create(model="tiny-world", prompt=[3], max_tokens=2).choices
    finally:
        server.close()


def parse(*argv):
    from tinyrwkv.cli import HelpFormatter
    from tinyrwkv.server import add_parser
    parser = argparse.ArgumentParser(prog="tinyrwkv")
    add_parser(parser.add_subparsers(dest="command"), HelpFormatter)
    return parser, parser.parse_args(["serve", *argv])


def test_cli_options(capsys):
    _, args = parse()
    assert (args.host, args.port, args.max_batch, args.cache_mb, args.model) == \
        ("127.0.0.1", 8000, 16, 256, None)
    _, args = parse("--port", "0", "--cache-mb", "0", "--cache-dir", "somewhere")
    with pytest.raises(SystemExit) as exit:
        args.func(args)
    assert exit.value.code == 1 and "--cache-mb 0 turns the cache off" in capsys.readouterr().err
    parser, _ = parse()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "OpenAI" in out and "--max-prompt-tokens" in out and "default: 8192" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-batch", "0"])
