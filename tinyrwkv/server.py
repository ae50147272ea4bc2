"""`tinyrwkv serve`: an OpenAI-compatible HTTP server (docs/serving.md §1).

    GET  /v1/models              the one model served
    POST /v1/completions         prompt: a string, a list of strings, token ids, lists of ids
    POST /v1/chat/completions    messages, rendered in the model's chat format (chat_format)
    POST /v1/embeddings          input: a string, a list of strings, token ids, lists of ids
    GET  /v1/stats               counters: requests, batched steps, prompt tokens read / cached

Both completion endpoints stream with server-sent events (`data: {json}` chunks, then
`data: [DONE]`) when the request says "stream": true.

The HTTP layer is the standard library's ThreadingHTTPServer: a thread per connection that
parses the request, checks it and puts it in a queue. The model runs in ONE engine thread
(`Engine`): it admits queued requests (each prompt is read into its own state, starting from
the longest cached prefix: `tinyrwkv.state_cache`), then decodes every running request together,
one `model.forward_batch` step for all, and hands each its new text through a queue of its own.
A request leaves the batch when it ends (a stop string, max_tokens, end-of-text) or its client
goes away. Nothing of the model is touched by two threads at once.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .generate import CHAT_SAMPLING, Continuation
from .sampling import SamplingParams

MAX_BODY = 16 * 1024 * 1024           # bytes of a request body at most
TEXT_INDEX_SIZE = 4096                # texts whose exact token ids are remembered (cache hits),
TEXT_INDEX_BYTES = 32 * 1024 * 1024   # and their size at most (4 bytes a character or an id)
PREFILL_CHUNK = 256                   # prompt tokens per forward call (bounds memory)


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error with an HTTP status."""

    def __init__(self, message, param=None, code=None, status=400,
                 kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.status, self.kind = status, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# ---- what a request may say ----

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "n", "user"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "logit_bias", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                        "logit_bias", "tools", "tool_choice", "functions", "function_call",
                        "response_format", "parallel_tool_calls", "store", "metadata"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def _unsupported(body, name, ok):
    """Refuse a field that is set to something other than its no-op value `ok(value)`."""
    if name in body and body[name] is not None and not ok(body[name]):
        raise RequestError(f"'{name}' is not supported by this server (tinyrwkv serve); leave it "
                           "out", param=name, code="unsupported_parameter")


def _number(body, name, default, low=None, high=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)) or \
            (isinstance(value, float) and not np.isfinite(value)):
        raise RequestError(f"'{name}' must be {kind}, got {value!r}", param=name,
                           code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        where = (f"between {low} and {high}" if high is not None else f">= {low}")
        raise RequestError(f"'{name}' must be {where}, got {value}", param=name,
                           code="invalid_value")
    return value


def _check_fields(body, allowed, endpoint):
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unrecognized request argument supplied: {', '.join(unknown)} "
                           f"({endpoint} takes {', '.join(sorted(allowed))})", param=unknown[0],
                           code="unknown_parameter")


class Job:
    """One sequence to generate (a prompt of a request): what the engine needs to run it and
    the queue through which its text goes back to the HTTP thread."""

    def __init__(self, ids, text, sampling, stop, max_tokens, seed, out, index=0):
        self.ids, self.text = ids, text          # text: the prompt as text (None: ids given)
        self.sampling, self.stop, self.max_tokens = sampling, stop, max_tokens
        self.rng = np.random.default_rng(seed)
        self.out, self.index = out, index
        self.cancelled = False
        self.state = self.logits = None
        self.generated, self.pieces = [], []
        self.cached = 0                           # prompt tokens that came from the cache
        self.t_submit = time.perf_counter()


class Engine:
    """The one thread that runs the model: admits queued jobs, decodes the running ones as one
    batch, streams their text out. `stats()`: counters for /v1/stats and the tests."""

    def __init__(self, model, max_batch=16, cache=None, model_key=None):
        self.model, self.tokenizer = model, model.tokenizer
        self.max_batch, self.cache = max_batch, cache
        self.model_key = model_key or model_key_of(model)
        self.queue = queue.Queue()
        self.text_index = OrderedDict()           # text -> the exact ids whose state is cached
        self.text_index_bytes = 0
        self.lock = threading.Lock()
        self.counters = dict(requests=0, sequences=0, steps=0, batched_steps=0, max_batch_seen=0,
                             prompt_tokens=0, prompt_tokens_read=0, prompt_tokens_cached=0,
                             completion_tokens=0, errors=0, dropped=0, running=0)
        self.running = True
        self.thread = threading.Thread(target=self.loop, name="tinyrwkv-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.running = False
        self.queue.put(None)
        self.thread.join(timeout=10)

    def stats(self):
        with self.lock:
            out = dict(self.counters)
        out["cache"] = self.cache.stats() if self.cache is not None else None
        return out

    def count(self, **add):
        with self.lock:
            for k, v in add.items():
                self.counters[k] += v

    # ---- prompts: tokens, cache ----

    def encode(self, text):
        """Token ids of a prompt text. When the text starts with a text whose state is cached
        (a previous prompt or prompt + reply), its exact ids are reused and only the rest is
        encoded: a reply's tokens are the ones the model chose, which encoding the text again
        need not give, and the cache is keyed by ids."""
        best = ""
        if self.cache is not None:
            with self.lock:
                for known in self.text_index:
                    if len(known) > len(best) and text.startswith(known):
                        best = known
                ids = list(self.text_index[best]) if best else []
                if best:
                    self.text_index.move_to_end(best)
        else:
            ids = []
        rest = text[len(best):]
        return ids + (self.tokenizer.encode(rest) if rest else [])

    def remember(self, text, ids, state, logits):
        """Keep the state after `ids` (the tokens of `text`) in the cache."""
        if self.cache is None:
            return
        self.cache.store(self.model_key, list(ids), state, logits)
        size = 4 * (len(text) + len(ids)) if text is not None else 0
        if text is not None and size <= TEXT_INDEX_BYTES:
            with self.lock:
                old = self.text_index.pop(text, None)
                if old is not None:
                    self.text_index_bytes -= 4 * (len(text) + len(old))
                self.text_index[text] = tuple(ids)
                self.text_index_bytes += size
                while len(self.text_index) > TEXT_INDEX_SIZE or \
                        self.text_index_bytes > TEXT_INDEX_BYTES:
                    known, known_ids = self.text_index.popitem(last=False)
                    self.text_index_bytes -= 4 * (len(known) + len(known_ids))

    def prefill(self, job):
        """Read the job's prompt into a state, from the longest cached prefix on."""
        ids, n, state, logits = job.ids, 0, None, None
        if self.cache is not None:
            n, state, logits = self.cache.lookup(self.model_key, ids)
            if n == len(ids) and logits is None:         # the state but not its logits
                n, state, logits = self.cache.lookup(self.model_key, ids[:-1])
            if not n:
                state, logits = None, None
        for start in range(n, len(ids), PREFILL_CHUNK):
            logits, state = self.model.forward(ids[start:start + PREFILL_CHUNK], state)
        job.state, job.logits, job.cached = state, np.asarray(logits), n
        self.count(prompt_tokens=len(ids), prompt_tokens_read=len(ids) - n,
                   prompt_tokens_cached=n)
        if n < len(ids):
            self.remember(job.text, ids, state, job.logits)

    # ---- the loop ----

    def loop(self):
        active, batch = [], None
        while self.running:
            try:
                waiting = [] if active else [self.queue.get()]   # idle: block until work comes
                while len(active) + len(waiting) < self.max_batch:
                    try:
                        waiting.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                if any(item is None for item in waiting):
                    break
                admitted = []
                for item in waiting:
                    if callable(item):                          # an embeddings request, say
                        item()
                    elif not item.cancelled:
                        try:
                            self.prefill(item)
                        except Exception as e:                  # noqa: BLE001: the job's error
                            self.fail(item, e)
                            continue
                        item.sequence = Continuation(self.tokenizer, item.sampling, item.rng,
                                                     item.stop)
                        admitted.append(item)
                if admitted:
                    kept = [batch[r] for r in range(len(active))] if active else []
                    active = active + admitted
                    batch = self.model.batch_state(kept + [job.state for job in admitted])
                if active:
                    active, batch = self.step(active, batch)
            except Exception as e:                               # noqa: BLE001
                for job in active:
                    self.fail(job, e)
                active, batch = [], None

    def fail(self, job, error):
        self.count(errors=1)
        job.out.put(("error", job.index, f"{type(error).__name__}: {error}"))

    def finish(self, job, reason, state=None):
        text = job.sequence.finish()
        if text:
            job.out.put(("text", job.index, text))
        if state is not None and job.generated and self.cache is not None:
            whole = None
            if job.text is not None:
                try:   # a reply that is not valid UTF-8 cannot come back as the same bytes
                    whole = job.text + self.tokenizer.decode_bytes(job.generated).decode("utf-8")
                except UnicodeDecodeError:
                    pass
            self.remember(whole, list(job.ids) + job.generated, state.copy(), job.logits)
        usage = dict(prompt_tokens=len(job.ids), completion_tokens=len(job.generated),
                     cached_tokens=job.cached)
        self.count(completion_tokens=len(job.generated))
        job.out.put(("done", job.index, reason, usage))

    def step(self, active, batch):
        """Choose each running job's next token, end those that are done, then one
        forward_batch for the rest. Returns the jobs still running and their BatchState."""
        tokens, leave = [], {}
        for row, job in enumerate(active):
            if job.cancelled:
                leave[row] = None
            elif len(job.generated) >= job.max_tokens:
                leave[row] = "length"
            else:
                token = job.sequence.choose(job.logits)
                if token is None:                                # end of text
                    leave[row] = "stop"
                else:
                    tokens.append(token)
        if leave:
            for row, reason in leave.items():
                if reason is not None:
                    self.finish(active[row], reason, batch[row])
                else:
                    self.count(dropped=1)          # its client has gone
            keep = [row for row in range(len(active)) if row not in leave]
            active = [active[row] for row in keep]
            batch = batch.take(keep) if keep else None
        if not active:
            self.counters["running"] = 0
            return [], None
        logits, batch = self.model.forward_batch(tokens, batch)
        self.count(steps=1, batched_steps=int(len(active) > 1))
        with self.lock:
            self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(active))
            self.counters["running"] = len(active)
        stopped = []
        for row, (job, token) in enumerate(zip(active, tokens)):
            job.logits = logits[row]
            job.generated.append(token)
            text, found = job.sequence.add(token)
            if text:
                job.out.put(("text", job.index, text))
            if found:
                stopped.append(row)
        if stopped:
            for row in stopped:
                self.finish(active[row], "stop", batch[row])
            keep = [row for row in range(len(active)) if row not in stopped]
            active = [active[row] for row in keep]
            batch = batch.take(keep) if keep else None
        if not active:
            self.counters["running"] = 0
        return active, batch

    def submit(self, jobs):
        self.count(requests=1, sequences=len(jobs))
        for job in jobs:
            self.queue.put(job)

    def run(self, function):
        """Run function() in the engine thread (between decode steps); return its result."""
        box = queue.Queue()

        def call():
            try:
                box.put((True, function()))
            except Exception as e:                               # noqa: BLE001
                box.put((False, e))
        self.queue.put(call)
        ok, value = box.get()
        if not ok:
            raise value
        return value


def model_key_of(model):
    """What tells this model's cached states from another's: the file's name, size and time,
    the compute dtype and the weight storage."""
    path = getattr(model, "path", None)
    parts = [str(getattr(model, "name", "") or ""), str(model.dtype),
             str(getattr(model, "storage", ""))]
    if path is not None:
        try:
            st = path.stat()
            parts += [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns)]
        except OSError:
            parts.append(str(path))
    c = model.config
    parts.append(f"L{c.n_layer}C{c.n_embd}V{c.vocab_size}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return f"{path.stem if path is not None else 'model'}/{digest}"


class Server:
    """The served model, its engine and its limits; `serve_forever()` answers HTTP."""

    def __init__(self, model, host="127.0.0.1", port=8000, max_batch=16, max_prompt_tokens=8192,
                 max_tokens_limit=4096, cache=None, model_id=None, quiet=False):
        from .chat_format import style_of
        self.model = model
        path = getattr(model, "path", None)
        self.model_id = model_id or (path.stem if path is not None else "tinyrwkv")
        self.style = style_of(model)
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.quiet = quiet
        self.created = int(time.time())
        self.engine = Engine(model, max_batch, cache).start()
        handler = type("Handler", (Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.warning = None if self.style else (
            f"{self.model_id} is not a chat model (it was not trained on conversations): its "
            "messages are written in the World chat format, but expect it to continue the text "
            "rather than answer")

    def serve_forever(self):
        self.httpd.serve_forever(poll_interval=0.2)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.stop()

    def log(self, line):
        if not self.quiet:
            print(f"tinyrwkv serve: {line}", file=sys.stderr, flush=True)

    # ---- requests ----

    def check_model(self, body):
        name = body.get("model")
        if name is None:
            raise RequestError("'model' is required: this server serves "
                               f"'{self.model_id}' (GET /v1/models)", param="model",
                               code="missing_required_parameter")
        if name != self.model_id:
            raise RequestError(f"the model '{name}' does not exist: this server serves "
                               f"'{self.model_id}' (GET /v1/models)", param="model",
                               code="model_not_found", status=404)

    def prompt_ids(self, prompt, param):
        """A prompt (text or token ids) as (ids, text or None), checked against the limits."""
        if isinstance(prompt, str):
            ids, text = self.engine.encode(prompt), prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is out of range: this model's ids are 0 to "
                                   f"{self.model.config.vocab_size - 1}", param=param,
                                   code="invalid_value")
        else:
            raise RequestError(f"'{param}' must be a string, a list of strings, a list of token "
                               "ids or a list of lists of token ids", param=param,
                               code="invalid_type")
        if not ids:
            raise RequestError(f"'{param}' is empty: give at least one token", param=param,
                               code="invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(ids)} tokens, more than this server's "
                               f"limit of {self.max_prompt_tokens} (--max-prompt-tokens): shorten "
                               "it", param=param, code="context_length_exceeded")
        return ids, text

    def sampling_of(self, body, chat):
        _unsupported(body, "n", lambda v: v == 1)
        _unsupported(body, "best_of", lambda v: v == 1)
        _unsupported(body, "logprobs", lambda v: v is False)
        _unsupported(body, "top_logprobs", lambda v: v == 0)
        _unsupported(body, "echo", lambda v: v is False)
        _unsupported(body, "suffix", lambda v: v == "")
        _unsupported(body, "logit_bias", lambda v: v == {})
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            _unsupported(body, name, lambda v: v in ([], "none", False))
        _unsupported(body, "response_format",
                     lambda v: isinstance(v, dict) and v.get("type") == "text")
        defaults = CHAT_SAMPLING if chat else {}
        base = SamplingParams(**defaults)
        sampling = SamplingParams(
            temperature=_number(body, "temperature", base.temperature, 0, 2),
            top_p=_number(body, "top_p", base.top_p, 0, 1),
            top_k=_number(body, "top_k", 0, 0, integer=True),
            presence_penalty=_number(body, "presence_penalty", base.presence_penalty, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", base.frequency_penalty, -2, 2),
            penalty_decay=base.penalty_decay, penalty_exempt=base.penalty_exempt)
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        default = min(512 if chat else 16, self.max_tokens_limit)
        max_tokens = _number(body, name, default, 0, integer=True)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"'{name}' is {max_tokens}, more than this server's limit of "
                               f"{self.max_tokens_limit} (--max-tokens-limit)", param=name,
                               code="invalid_value")
        seed = _number(body, "seed", None, integer=True)
        if seed is not None and seed < 0:
            seed = seed % 2 ** 64
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 4
                and all(isinstance(s, str) and s for s in stop)):
            raise RequestError("'stop' must be a non-empty string or a list of at most 4 of them",
                               param="stop", code="invalid_value")
        return sampling, max_tokens, seed, stop

    def stream_options(self, body):
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream",
                               code="invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options",
                               code="invalid_type")
        return stream, bool(options.get("include_usage"))

    def completions(self, body, chat):
        _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                      "/v1/chat/completions" if chat else "/v1/completions")
        self.check_model(body)
        stream, include_usage = self.stream_options(body)
        sampling, max_tokens, seed, stop = self.sampling_of(body, chat)
        if chat:
            prompts = [self.chat_prompt(body.get("messages"))]
            from .chat_format import stop_strings
            stop = stop_strings(self.style or "world") + stop
        else:
            prompt = body.get("prompt")
            if prompt is None:
                raise RequestError("'prompt' is required", param="prompt",
                                   code="missing_required_parameter")
            several = isinstance(prompt, list) and prompt and \
                all(isinstance(p, (str, list)) for p in prompt)
            prompts = prompt if several else [prompt]
            if len(prompts) > self.engine.max_batch:
                raise RequestError(f"{len(prompts)} prompts in one request, more than "
                                   f"--max-batch ({self.engine.max_batch})", param="prompt",
                                   code="invalid_value")
        out = queue.Queue()
        jobs = []
        for i, prompt in enumerate(prompts):
            ids, text = self.prompt_ids(prompt, "messages" if chat else "prompt")
            jobs.append(Job(ids, text, sampling, stop, max_tokens, seed, out, index=i))
        return jobs, out, stream, include_usage

    def chat_prompt(self, messages):
        from .chat_format import render
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects",
                               param="messages", code="invalid_value")
        cleaned = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), list):   # content parts
                parts = m["content"]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                    raise RequestError(f"message {i}: only text content is supported",
                                       param="messages", code="invalid_value")
                m = dict(m, content="".join(str(p.get("text", "")) for p in parts))
            if isinstance(m, dict) and m.get("role") == "developer":
                m = dict(m, role="system")
            cleaned.append(m)
        try:
            return render(cleaned, self.style or "world")
        except ValueError as e:
            raise RequestError(str(e), param="messages", code="invalid_value") from None

    def embeddings(self, body):
        _check_fields(body, EMBEDDING_FIELDS, "/v1/embeddings")
        self.check_model(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise RequestError(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}",
                               param="encoding_format", code="invalid_value")
        _unsupported(body, "dimensions", lambda v: v == self.model.config.n_embd)
        data = body.get("input")
        if data is None:
            raise RequestError("'input' is required", param="input",
                               code="missing_required_parameter")
        several = isinstance(data, list) and data and all(isinstance(p, (str, list)) for p in data)
        inputs = data if several else [data]
        if len(inputs) > 2048:
            raise RequestError("at most 2048 inputs in one request", param="input",
                               code="invalid_value")
        ids = [self.prompt_ids(x, "input")[0] for x in inputs]
        vectors = self.engine.run(lambda: [self.model.embed(x) for x in ids])
        n = sum(len(x) for x in ids)

        def encode(vector):                 # base64: little-endian float32, as OpenAI sends
            vector = np.asarray(vector, dtype="<f4")
            if encoding == "base64":
                return base64.b64encode(vector.tobytes()).decode("ascii")
            return [float(v) for v in vector]
        return {"object": "list", "model": self.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": encode(e)}
                         for i, e in enumerate(vectors)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    def models(self):
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "tinyrwkv",
            "chat_format": self.style}]}


def _usage(usages):
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    cached = sum(u["cached_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_tokens_read": prompt - cached}


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection (a thread of its own). `app`: the Server, set on a subclass."""
    app: Server = None
    protocol_version = "HTTP/1.1"
    server_version = "tinyrwkv"

    def log_message(self, format, *args):
        self.app.log(f"{self.address_string()} {format % args}")

    # ---- replies ----

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error):
        self.send_json(error.status, error.body())

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError("the request has no Content-Length: send a JSON body",
                               code="invalid_body", status=411)
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError("Content-Length is not a number", code="invalid_body") from None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise RequestError(f"the body is {length} bytes; at most {MAX_BODY} are read",
                               code="invalid_body", status=413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:      # not UTF-8, not JSON, nested too deep
            raise RequestError(f"the body is not valid JSON ({e}): send a JSON object",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", code="invalid_json")
        return body

    def guarded(self, work):
        try:
            work()
        except RequestError as e:
            self.app.log(f"{e.status} {self.path}: {e.message}")
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception as e:                                     # noqa: BLE001: keep serving
            self.app.log(f"500 {self.path}: {type(e).__name__}: {e}")
            try:
                self.send_error_json(RequestError(f"internal error: {type(e).__name__}: {e}",
                                                  status=500, kind="server_error"))
            except OSError:
                self.close_connection = True

    def do_GET(self):
        def work():
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self.send_json(200, self.app.models())
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                if name != self.app.model_id:
                    raise RequestError(f"the model '{name}' does not exist", param="model",
                                       code="model_not_found", status=404)
                self.send_json(200, self.app.models()["data"][0])
            elif path == "/v1/stats":
                self.send_json(200, self.app.engine.stats())
            elif path in ("", "/health"):
                self.send_json(200, {"status": "ok", "model": self.app.model_id})
            else:
                raise RequestError(f"no such endpoint: GET {path}", code="not_found", status=404)
        self.guarded(work)

    def do_POST(self):
        def work():
            path = self.path.split("?")[0].rstrip("/")
            routes = {"/v1/completions": False, "/v1/chat/completions": True}
            if path not in routes and path != "/v1/embeddings":
                self.read_body_quietly()
                raise RequestError(f"no such endpoint: POST {path}", code="not_found", status=404)
            body = self.read_body()
            if path == "/v1/embeddings":
                self.send_json(200, self.app.embeddings(body))
            else:
                self.complete(body, routes[path])
        self.guarded(work)

    def read_body_quietly(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    # ---- completions ----

    def complete(self, body, chat):
        app = self.app
        jobs, out, stream, include_usage = app.completions(body, chat)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        if chat and app.warning:
            app.log(f"warning: {app.warning}")
        app.engine.submit(jobs)
        try:
            if stream:
                self.stream_reply(jobs, out, chat, ident, obj + (".chunk" if chat else ""),
                                  created, include_usage)
            else:
                self.whole_reply(jobs, out, chat, ident, obj, created)
        finally:
            for job in jobs:
                job.cancelled = True        # gone or done: the engine drops it at its next step

    def events(self, jobs, out):
        """(kind, index, ...) events until every job is done."""
        left = len(jobs)
        while left:
            event = out.get()
            if event[0] == "error":
                raise RequestError(f"generation failed: {event[2]}", status=500,
                                   kind="server_error")
            if event[0] == "done":
                left -= 1
            yield event

    def whole_reply(self, jobs, out, chat, ident, obj, created):
        texts, reasons, usages = [[] for _ in jobs], [None] * len(jobs), [None] * len(jobs)
        for event in self.events(jobs, out):
            if event[0] == "text":
                texts[event[1]].append(event[2])
            else:
                reasons[event[1]], usages[event[1]] = event[2], event[3]
        choices = []
        for i, (pieces, reason) in enumerate(zip(texts, reasons)):
            text = "".join(pieces)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant",
                                                        "content": text.strip()},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None,
                                "finish_reason": reason})
        reply = {"id": ident, "object": obj, "created": created, "model": self.app.model_id,
                 "choices": choices, "usage": _usage(usages), "system_fingerprint": None}
        if chat and self.app.warning:
            reply["warning"] = self.app.warning
        self.send_json(200, reply)

    def stream_reply(self, jobs, out, chat, ident, obj, created, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": ident, "object": obj, "created": created, "model": self.app.model_id,
                "system_fingerprint": None}

        def send(payload):
            try:
                self.wfile.write(b"data: " + payload + b"\n\n")
                self.wfile.flush()
            except OSError:
                raise ClientGone() from None

        def chunk(i, text=None, reason=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None,
                          "finish_reason": reason}
            c = dict(base, choices=[choice])
            if include_usage:
                c["usage"] = None
            if first and chat and self.app.warning:
                c["warning"] = self.app.warning
            send(json.dumps(c).encode())

        if chat:
            for job in jobs:
                chunk(job.index, first=True)
        started = [False] * len(jobs)           # chat: leading spaces of the reply are dropped
        usages = []
        try:
            for event in self.events(jobs, out):
                if event[0] == "text":
                    text = event[2]
                    if chat and not started[event[1]]:
                        text = text.lstrip()
                        started[event[1]] = bool(text)
                    if text:
                        chunk(event[1], text)
                else:
                    usages.append(event[3])
                    chunk(event[1], reason=event[2])
        except RequestError as e:               # headers are sent: the error goes as an event
            send(json.dumps(e.body()).encode())
            send(b"[DONE]")
            return
        if include_usage:
            send(json.dumps(dict(base, choices=[], usage=_usage(usages))).encode())
        send(b"[DONE]")


# ---- the command ----

def add_parser(sub, formatter_class):
    """`tinyrwkv serve`: added to the CLI's subparsers `sub`."""
    from .checks import NON_NEGATIVE, POSITIVE, option
    from .cli_support import add_model_options
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, embeddings)",
        formatter_class=formatter_class,
        description="Serve a model over HTTP with the OpenAI API: GET /v1/models, POST "
                    "/v1/completions, /v1/chat/completions (streamed with server-sent events or "
                    "not), /v1/embeddings; GET /v1/stats for counters. Requests that arrive "
                    "together are decoded as one batch; the state after each prompt and reply is "
                    "cached, so a chat that continues only reads its new tokens.",
        epilog="Then point any OpenAI client at http://HOST:PORT/v1 (curl "
               "http://127.0.0.1:8000/v1/models lists the model's id). No authentication: "
               "serve on localhost or a network you trust.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; the server has no "
                        "authentication, so only on a network you trust)")
    p.add_argument("--port", type=option(int, NON_NEGATIVE), default=8000,
                   help="port to listen on (0: any free port, printed at start)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's id in the API (default: the file name without suffix)")
    p.add_argument("--max-batch", type=option(int, POSITIVE), default=16,
                   help="sequences decoded together at most; more wait in the queue")
    p.add_argument("--max-prompt-tokens", type=option(int, POSITIVE), default=8192,
                   help="longer prompts are refused (400): they would hold up every other "
                        "request while they are read")
    p.add_argument("--max-tokens-limit", type=option(int, POSITIVE), default=4096,
                   help="the largest max_tokens a request may ask for")
    p.add_argument("--cache-mb", type=option(float, NON_NEGATIVE), default=256,
                   help="memory for cached states, in MiB (0: no cache)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep cached states in this folder too, so they outlive the server")
    p.add_argument("--quiet", "-q", action="store_true", help="log no requests")
    p.set_defaults(func=run)
    return p


def make_cache(cache_mb, cache_dir=None):
    """The state cache (tinyrwkv.state_cache), or None when cache_mb is 0."""
    if not cache_mb:
        return None
    from .state_cache import StateCache
    return StateCache(int(cache_mb * 1024 * 1024), folder=cache_dir)


def run(args):
    from .cli_support import fail, load_model
    if args.cache_dir and not args.cache_mb:
        fail("--cache-dir keeps the state cache on disk, but --cache-mb 0 turns the cache off: "
             "give --cache-mb a budget (e.g. 256)")
    model = load_model(args)
    try:
        cache = make_cache(args.cache_mb, args.cache_dir)
    except (OSError, ValueError) as e:
        fail(f"--cache-dir {args.cache_dir}: {e}")
    try:
        server = Server(model, args.host, args.port, args.max_batch, args.max_prompt_tokens,
                        args.max_tokens_limit, cache, args.model_name, quiet=args.quiet)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e} (is another server "
             "on that port? choose another with --port)")
    if server.warning:
        print(f"tinyrwkv serve: warning: {server.warning}", file=sys.stderr)
    cache_line = "no state cache"
    if cache is not None:
        cache_line = f"state cache {args.cache_mb:g} MiB" + (f" in {args.cache_dir}"
                                                             if args.cache_dir else "")
    print(f"tinyrwkv serve: '{server.model_id}' on http://{args.host}:{server.port}/v1 "
          f"(batch up to {args.max_batch}, {cache_line}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("tinyrwkv serve: stopped", file=sys.stderr)
    finally:
        server.httpd.server_close()
    return 0


def main(argv=None):
    from .cli_support import HelpFormatter
    parser = argparse.ArgumentParser(prog="tinyrwkv")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, HelpFormatter)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
