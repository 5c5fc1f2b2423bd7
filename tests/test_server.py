"""The OpenAI-compatible server (`flashmem serve`): the real server in a subprocess on 127.0.0.1,
talked to with the official openai client and httpx. Greedy answers are compared with
Model.generate in this process; also concurrency, usage, stop strings, bad requests, a client
that goes away mid-stream, a full queue and SIGTERM with requests in flight."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MAX_CONTEXT = 512
MAX_TOKENS = 12
TEXT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colors."}]
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}  # runs for seconds unless cancelled


class Server:
    """`python -m flashmem.cli serve MODEL --port 0 ...` in a subprocess, its output in files."""

    def __init__(self, gguf: str, folder, *args: str):
        self.stdout = open(folder / "stdout.txt", "w+")
        self.stderr = open(folder / "stderr.txt", "w+")
        cmd = [sys.executable, "-m", "flashmem.cli", "serve", gguf, "--port", "0", "--max-context", str(MAX_CONTEXT),
               *args]
        self.proc = subprocess.Popen(cmd, stdout=self.stdout, stderr=self.stderr)
        self.url = self._wait_listening(timeout=120)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.stdout.seek(0)
            for line in self.stdout:
                if line.startswith("flashmem serving ") and " on http://" in line:
                    return line.rsplit(" on ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.proc.kill()
        pytest.fail(f"the server did not start (exit status {self.proc.poll()}):\n{self.log()}")

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def health(self) -> dict:
        return self.http.get("/health").json()

    def wait_pending(self, n: int, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while (h := self.health())["pending"] != n:
            assert time.monotonic() < deadline, f"pending stayed {h['pending']}, expected {n}"
            time.sleep(0.05)
        return h

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.stdout.close()
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    s = Server(smollm2_gguf, tmp_path_factory.mktemp("server"), "--max-batch", "4")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    import flashmem

    return flashmem.load(smollm2_gguf, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def expected(model):
    """Model.generate's greedy result, computed once per (prompt, max_tokens, stop)."""
    @lru_cache(maxsize=None)
    def run(prompt: str, max_tokens: int = MAX_TOKENS, stop: tuple = ()):
        return model.generate(json.loads(prompt), max_new_tokens=max_tokens, stop=list(stop))

    return lambda prompt, max_tokens=MAX_TOKENS, stop=(): run(json.dumps(prompt), max_tokens, tuple(stop))


def check_usage(usage, exp):
    assert usage.prompt_tokens == exp.prompt_tokens
    assert usage.completion_tokens == len(exp.token_ids)
    assert usage.total_tokens == exp.prompt_tokens + len(exp.token_ids)


def stream_text(chunks, chat: bool):
    """(text, finish_reason, usage) of a stream of openai chunks."""
    text, finish, usage = "", None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            text += (choice.delta.content or "") if chat else choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [server.model]
    assert server.model == "SmolLM2-135M-Instruct.Q4_1"
    assert server.client().models.retrieve(server.model).id == server.model
    h = server.health()
    assert (h["status"], h["pending"], h["max_batch"], h["max_context"]) == ("ok", 0, 4, MAX_CONTEXT)


def test_completion_matches_generate(server, model, expected):
    client, exp = server.client(), expected(TEXT)
    r = client.completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.model == server.model
    assert (r.choices[0].text, r.choices[0].finish_reason) == (exp.text, exp.finish_reason)
    check_usage(r.usage, exp)

    ids = model.tokenizer.encode(TEXT)  # a prompt of token ids: the same tokens, the same answer
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == expected(ids).text

    chunks = client.completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    text, finish, usage = stream_text(chunks, chat=False)
    assert (text, finish) == (exp.text, exp.finish_reason)
    check_usage(usage, exp)


def test_chat_matches_generate(server, expected):
    client, exp = server.client(), expected(CHAT)
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (exp.text, exp.finish_reason)
    check_usage(r.usage, exp)

    chunks = list(client.chat.completions.create(
        model=server.model, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    text, finish, usage = stream_text(chunks, chat=True)
    assert (text, finish) == (exp.text, exp.finish_reason)
    check_usage(usage, exp)
    # without include_usage: no usage chunk
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=4, temperature=0,
                                                 stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_stop_strings(server, expected):
    client, full = server.client(), expected(TEXT)
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    exp = expected(TEXT, stop=[stop])
    assert exp.finish_reason == "stop" and stop not in exp.text and len(exp.text) < len(full.text)
    r = client.completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (exp.text, "stop")
    check_usage(r.usage, exp)
    chunks = client.completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0,
                                       stop=["never in the answer", stop], stream=True)
    assert stream_text(chunks, chat=False)[:2] == (exp.text, "stop")


def test_concurrent_clients(server, expected):
    """8 clients at once on 4 KV-cache slots: each gets what generate() gives it alone."""
    jobs = [(TEXT, False), (CHAT, True), ("Once upon a time", False),
            ([{"role": "user", "content": "What is 2 + 2?"}], True)] * 2
    want = [expected(p).text for p, _ in jobs]
    got, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def run(i, prompt, chat, stream):
        try:
            client = server.client()
            start.wait()
            kw = dict(model=server.model, max_tokens=MAX_TOKENS, temperature=0, stream=stream)
            if chat:
                r = client.chat.completions.create(messages=prompt, **kw)
                got[i] = stream_text(r, True)[0] if stream else r.choices[0].message.content
            else:
                r = client.completions.create(prompt=prompt, **kw)
                got[i] = stream_text(r, False)[0] if stream else r.choices[0].text
        except Exception as e:  # reported below, with the others' results
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, p, chat, i % 2 == 1)) for i, (p, chat) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert got == want
    server.wait_pending(0)


BAD_REQUESTS = [  # (endpoint, body, the field named in the error, words of the message)
    ("completions", b'{"prompt": "x", "max_tokens": ', None, "not valid JSON"),
    ("completions", b"[1, 2]", None, "JSON object"),
    ("completions", b"", None, "empty"),
    ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", ">= 1"),
    ("completions", {"prompt": "x", "max_tokens": "12"}, "max_tokens", "integer"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ("completions", {"prompt": "x", "temperature": 3}, "temperature", "[0, 2]"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ("completions", {"prompt": "x", "n": 2}, "n", "n must be 1"),
    ("completions", {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "repetition_penalty"),
    ("completions", {"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ("completions", {"prompt": "x", "stop": 3}, "stop", "stop must be"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ("completions", {"prompt": "x", "seed": -1}, "seed", ">= 0"),
    ("completions", {"prompt": "x", "bogus": 1}, "bogus", "unrecognized"),
    ("completions", {"prompt": 5}, "prompt", "string or a list of token ids"),
    ("completions", {"max_tokens": 4}, "prompt", "missing"),
    ("completions", {"prompt": ["one", "two"]}, "prompt", "one prompt"),
    ("completions", {"prompt": ""}, None, "empty"),
    ("completions", {"prompt": [1, 2, 10 ** 9]}, None, "out of range"),
    ("completions", {"prompt": "word " * (MAX_CONTEXT + 100)}, None, "max_context"),
    ("chat/completions", {"messages": "hi"}, "messages", "non-empty list"),
    ("chat/completions", {"messages": []}, "messages", "non-empty list"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "one of"),
    ("chat/completions", {"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "string"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "only text parts"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * (MAX_CONTEXT + 100)}]}, None,
     "max_context"),
]


@pytest.mark.parametrize("endpoint,body,param,words", BAD_REQUESTS,
                         ids=[f"{e}:{p or w}" for e, _, p, w in BAD_REQUESTS])
def test_bad_request(server, endpoint, body, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post(f"/v1/{endpoint}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]


def test_errors_through_the_client_and_server_keeps_serving(server, expected):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=server.model, prompt=TEXT, max_tokens=4, temperature="hot")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt=TEXT, max_tokens=4)
    for path, method, status in [("/v1/nowhere", "GET", 404), ("/v1/completions", "GET", 405)]:
        r = server.http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == expected(TEXT).text
    assert server.health()["pending"] == 0


def test_seeded_sampling_matches_generate(server, model):
    """Sampling options reach the sampler: a seeded request samples what generate() samples."""
    kw = dict(temperature=0.8, top_p=0.9, seed=7)
    extensions = dict(top_k=40, min_p=0.05, repetition_penalty=1.2)
    exp = model.generate(TEXT, max_new_tokens=MAX_TOKENS, **kw, **extensions)
    r = server.client().completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS,
                                           extra_body=extensions, **kw)
    assert r.choices[0].text == exp.text


def test_disconnect_frees_slot(server, expected):
    before = server.health()["finished"]
    body = {"model": server.model, "prompt": "Once upon a time", "stream": True, **LONG}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:
                break  # leaving the block closes the connection mid-stream
    after = server.wait_pending(0, timeout=10)["finished"]
    assert after["cancelled"] == before["cancelled"] + 1  # cancelled, not run to its 400 tokens
    assert after["length"] == before["length"]

    # a client that gives up on a whole (not streamed) answer
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1.0))
    after = server.wait_pending(0, timeout=10)["finished"]
    assert after["cancelled"] == before["cancelled"] + 2 and after["length"] == before["length"]
    r = server.client().completions.create(model=server.model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == expected(TEXT).text


def test_queue_full_then_sigterm(smollm2_gguf, tmp_path):
    """One slot, a queue of 2: a third request gets 503; SIGTERM with two requests in flight
    ends them and the process exits 0 within seconds."""
    s = Server(smollm2_gguf, tmp_path, "--max-batch", "1", "--max-queue", "2")
    try:
        body = {"model": s.model, "prompt": "Once upon a time", **LONG}
        with s.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")  # the first request is running
            waiting = {}
            t = threading.Thread(target=lambda: waiting.update(r=s.http.post("/v1/completions", json=body)))
            t.start()
            s.wait_pending(2)
            with pytest.raises(openai.InternalServerError) as e:
                s.client().completions.create(model=s.model, prompt=TEXT, max_tokens=4)
            assert e.value.status_code == 503 and e.value.code == "queue_full"

            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream ends with an error event, not [DONE]
            t.join(timeout=15)
            assert s.proc.wait(timeout=15) == 0, s.log()
            assert time.monotonic() - t0 < 10
        assert "data: [DONE]" not in rest and any("shutting down" in line for line in rest), rest[-3:]
        assert waiting["r"].status_code == 503 and "shutting down" in waiting["r"].json()["error"]["message"]
    finally:
        s.stop()


def test_missing_extra_names_the_install_command():
    code = ("import sys; sys.modules['starlette'] = None; from flashmem.cli import main; "
            "sys.exit(main(['serve', '--port', '0']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'pip install "flashmem[server]"' in r.stderr, r.stderr
