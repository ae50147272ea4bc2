"""`tinyrwkv serve` under load: requests per second and time to first token (TTFT) for 1, 4 and
16 concurrent clients, each a chat of a few turns, with and without the state cache; and the
TTFT of turn 10 of one chat with and without the cache.

    PYTHONPATH=$PWD python benchmarks/serve_bench.py [--models shipped 0.1B] [--clients 1 4 16]
        [--turns 3] [--max-tokens 32] [--out results.jsonl]

The server runs in this process (tinyrwkv.server.Server on a free port, its engine thread and
HTTP threads), the clients are threads speaking plain HTTP (http.client) to it, each request
streamed (server-sent events): TTFT is the time from sending a request to the first chunk with
text, the time a user waits before the reply starts (it includes reading the prompt, or only its
new tokens when the cache holds the conversation so far). Requests per second: all the chat
turns of all clients over the wall time of the run. Each client's chat: turn k sends the whole
conversation so far (as OpenAI clients do) plus a new user message; replies are greedy and at
most --max-tokens tokens.

Models: "shipped" (weights/, the 4096-token story model: it is not a chat model, the server
renders the World chat format and warns) and "0.1B" (the synthetic 0.1B shape,
make_weights(12, 768, 65536, head_size=64), random weights saved to a temporary .safetensors and
loaded with the World tokenizer: its replies are random tokens, so their text rarely comes back
unchanged in the next turn, and its cache hits are mostly the previous turn's prompt, not its
reply). On a 2-core machine the 0.1B part takes many minutes.

--threads 1 (the default here): one thread for the kernels, so the numbers measure the server
and not the machine's other load (see --help); on a quiet machine pass --threads 0.

Output: one JSON line per measurement (to --out, or stdout), then a table. The machine's load
is printed with them: on a shared machine the numbers are only as good as its quiet.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tinyrwkv
from tinyrwkv.server import Server, make_cache

QUESTIONS = ["Tell me a story about a cat.", "What did the cat find?", "Who helped her?",
             "Where did they go next?", "What was in the box?", "Was the dog happy?",
             "What did mom say?", "How did the day end?", "What did they learn?",
             "Tell me one more thing."]


def load_average():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(uptime not available)"


def chat_turn(port, model_id, messages, max_tokens):
    """One streamed chat request: (reply text, TTFT s, total s, usage)."""
    body = json.dumps({"model": model_id, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    ttft, pieces, usage = None, [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            text = choice["delta"].get("content")
            if text:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(text)
    total = time.perf_counter() - t0
    conn.close()
    return "".join(pieces), (total if ttft is None else ttft), total, usage


def client(port, model_id, turns, max_tokens, first_question, results):
    messages = []
    for turn in range(turns):
        messages.append({"role": "user",
                         "content": QUESTIONS[(first_question + turn) % len(QUESTIONS)]})
        reply, ttft, total, usage = chat_turn(port, model_id, messages, max_tokens)
        messages.append({"role": "assistant", "content": reply.strip() or "..."})
        results.append(dict(turn=turn + 1, ttft=ttft, seconds=total, usage=usage))


def run_clients(server, n_clients, turns, max_tokens):
    results = []
    threads = [threading.Thread(target=client, args=(server.port, server.model_id, turns,
                                                     max_tokens, i, results))
               for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(results) != n_clients * turns:
        raise RuntimeError(f"{n_clients * turns - len(results)} requests failed (see above)")
    return results, wall


def measure(model, name, cache_mb, clients, turns, max_tokens, emit):
    for n in clients:
        cache = make_cache(cache_mb)
        server = Server(model, port=0, quiet=True, max_batch=16, cache=cache)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            chat_turn(server.port, server.model_id, [{"role": "user", "content": "Hi"}], 2)  # warm
            before = server.engine.stats()
            results, wall = run_clients(server, n, turns, max_tokens)
            stats = server.engine.stats()
        finally:
            server.close()
        ttfts = sorted(r["ttft"] for r in results)
        read = stats["prompt_tokens_read"] - before["prompt_tokens_read"]
        cached = stats["prompt_tokens_cached"] - before["prompt_tokens_cached"]
        emit(dict(kind="concurrent", model=name, cache_mb=cache_mb, clients=n, turns=turns,
                  max_tokens=max_tokens, requests=len(results), seconds=round(wall, 3),
                  requests_per_s=round(len(results) / wall, 3),
                  ttft_median_ms=round(1000 * statistics.median(ttfts), 1),
                  ttft_max_ms=round(1000 * ttfts[-1], 1),
                  completion_tokens=stats["completion_tokens"] - before["completion_tokens"],
                  prompt_tokens_read=read, prompt_tokens_cached=cached,
                  batched_steps=stats["batched_steps"] - before["batched_steps"],
                  max_batch_seen=stats["max_batch_seen"], load=os.getloadavg()[0]
                  if hasattr(os, "getloadavg") else None))


def turn_10(model, name, cache_mb, max_tokens, emit):
    server = Server(model, port=0, quiet=True, cache=make_cache(cache_mb))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results = []
        client(server.port, server.model_id, 10, max_tokens, 0, results)
    finally:
        server.close()
    last = results[-1]
    usage = last["usage"] or {}
    emit(dict(kind="turn10", model=name, cache_mb=cache_mb, max_tokens=max_tokens,
              ttft_turn1_ms=round(1000 * results[0]["ttft"], 1),
              ttft_turn10_ms=round(1000 * last["ttft"], 1),
              prompt_tokens_turn10=usage.get("prompt_tokens"),
              prompt_tokens_read_turn10=usage.get("prompt_tokens_read")))


def load(name, folder, threads):
    if name == "shipped":
        return tinyrwkv.load(threads=threads)
    from tinyrwkv.formats import save_safetensors
    from tinyrwkv.synthetic import make_weights
    path = Path(folder) / "synthetic-0.1B.safetensors"
    if not path.exists():
        save_safetensors(path, make_weights(12, 768, 65536, head_size=64, seed=0))
    return tinyrwkv.load(path, threads=threads)


def table(rows):
    lines = ["| model | cache | clients | req/s | TTFT median ms | TTFT max ms | prompt tokens "
             "read / cached | batched steps |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "concurrent":
            lines.append(f"| {r['model']} | {'%g MiB' % r['cache_mb'] if r['cache_mb'] else 'off'}"
                         f" | {r['clients']} | {r['requests_per_s']:.2f} | {r['ttft_median_ms']}"
                         f" | {r['ttft_max_ms']} | {r['prompt_tokens_read']} / "
                         f"{r['prompt_tokens_cached']} | {r['batched_steps']} |")
    lines += ["", "| model | cache | TTFT turn 1 ms | TTFT turn 10 ms | turn-10 prompt tokens "
                  "(read) |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "turn10":
            lines.append(f"| {r['model']} | {'%g MiB' % r['cache_mb'] if r['cache_mb'] else 'off'}"
                         f" | {r['ttft_turn1_ms']} | {r['ttft_turn10_ms']} | "
                         f"{r['prompt_tokens_turn10']} ({r['prompt_tokens_read_turn10']}) |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["shipped", "0.1B"], default=["shipped"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--turns", type=int, default=3, help="chat turns per client")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length at most")
    p.add_argument("--cache-mb", type=float, default=256, help="the cache's budget when on")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for the model's kernels (0: the default, all cores). 1 by "
                        "default: on a busy machine a parallel prefill waits at every barrier "
                        "for a descheduled thread (seconds, measured on a shared 2-core box)")
    p.add_argument("--out", help="append the JSON lines to this file (default: stdout)")
    args = p.parse_args()
    rows = []
    out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout

    def emit(row):
        rows.append(row)
        print(json.dumps(row), file=out, flush=True)

    print(f"# {load_average()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model = load(name, folder, args.threads or None)
            for cache_mb in (0, args.cache_mb):
                measure(model, name, cache_mb, args.clients, args.turns, args.max_tokens, emit)
            for cache_mb in (0, args.cache_mb):
                turn_10(model, name, cache_mb, args.max_tokens, emit)
            del model
    print(f"# {load_average()}", file=sys.stderr)
    print(table(rows))
    if args.out:
        out.close()


if __name__ == "__main__":
    main()
