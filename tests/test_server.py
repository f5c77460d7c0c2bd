"""The OpenAI-compatible server, through the official ``openai`` client against a real
``quantrt serve`` process on loopback with the demo model.

The ``server`` fixture is session-scoped and imported by test_server_load.py, so the model
is loaded once for both files."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
MODEL = "demo"
CONTEXT = 512


@dataclass
class Server:
    url: str                # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: str

    def client(self, **kw):
        kw = {"api_key": KEY, "max_retries": 0, "timeout": 120, **kw}
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0,
                                  timeout=300)

    def http(self, method, path, body=None, headers=None):
        """(status, parsed JSON or text) of a raw request."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def metrics(self) -> dict[str, float]:
        """Unlabelled-by-reason samples of /metrics: {name: value} (labels dropped except
        finished_reason, kept as name{reason})."""
        status, text = self.http("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(\w+)\{([^}]*)\} (\S+)$', line)
            if m:
                reason = re.search(r'finished_reason="(\w+)"', m.group(2))
                out[m.group(1) + (f"{{{reason.group(1)}}}" if reason else "")] = float(m.group(3))
        return out

    def wait_idle(self, timeout=30.0) -> dict[str, float]:
        """Metrics once no request runs or waits (aborts land between engine steps)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["quantrt_num_requests_running"] == 0
                    and m["quantrt_num_requests_waiting"] == 0
                    and m["quantrt_kv_cache_blocks_used"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


def start_server(demo_gguf, tmp_dir, *args, timeout=240.0) -> Server:
    log = os.path.join(tmp_dir, "server.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "quantrt.cli", "serve", str(demo_gguf), "--port", "0",
             "--served-model-name", MODEL, "--uvicorn-log-level", "warning", *args],
            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            text = f.read()
        m = re.search(r"serving '.*' at (http://[\d.]+:\d+)/v1", text)
        if m:
            return Server(m.group(1), proc, log)
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start in time")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


_shared: dict[str, Server] = {}


@pytest.fixture(scope="session")
def server(demo_gguf, tmp_path_factory):
    # Each module that imports this fixture gets its own session fixture from pytest, so
    # the process itself is shared through _shared: one model load for all server tests.
    srv = _shared.get("main")
    if srv is None or srv.proc.poll() is not None:
        srv = _shared["main"] = start_server(
            demo_gguf, tmp_path_factory.mktemp("server"), "--api-key", KEY,
            "--max-model-len", str(CONTEXT), "--kv-cache-memory", "256MiB")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def tokenizer(demo_gguf):
    from formats.gguf_file import read_gguf
    from quantrt.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf(demo_gguf).metadata, str(demo_gguf))


PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == CONTEXT
    assert server.http("GET", "/health")[0] == 200          # no key needed for probes


def test_completion_usage_matches_the_tokenizer(server, tokenizer):
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                             temperature=0, logprobs=0)
    [choice] = out.choices
    assert out.object == "text_completion" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 6 == len(choice.logprobs.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert "".join(choice.logprobs.tokens) == choice.text
    # The same prompt as token ids gives the same greedy text.
    ids = server.client().completions.create(model=MODEL, prompt=tokenizer.encode(PROMPT),
                                             max_tokens=6, temperature=0)
    assert ids.choices[0].text == choice.text


def test_completion_n2_logprobs(server):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7,
          "logprobs": 3}
    out = server.client().completions.create(n=2, **kw)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(v <= 0 for v in lp.token_logprobs)
        for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert 3 <= len(top) <= 4 and top[tok] == value      # the sampled token is listed
            assert max(top.values()) >= value
        assert lp.text_offset[0] == 0
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    # Seeds: completion i uses seed + i, so the request repeats and completion 0 equals the
    # single completion of the same request.
    again = server.client().completions.create(n=2, **kw)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    single = server.client().completions.create(n=1, **kw)
    assert single.choices[0].text == out.choices[0].text


def test_completion_stop_and_several_prompts(server, tokenizer):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert "." in text, text                       # the demo answers " Paris.\n\n..."
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    stop=["."])
    assert cut.choices[0].text == text[:text.index(".")]
    assert cut.choices[0].finish_reason == "stop"
    prompts = [PROMPT, "One, two, three,"]
    many = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text[:len(many.choices[0].text)]
    assert many.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert many.usage.completion_tokens == 16


def test_echo_with_logprobs(server, tokenizer):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                      logprobs=2)
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                     logprobs=2, echo=True)
    n_prompt = len(tokenizer.encode(PROMPT))
    c, p = echo.choices[0], plain.choices[0]
    assert c.text == PROMPT + p.text
    lp = c.logprobs
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:n_prompt])
    assert lp.tokens[n_prompt:] == p.logprobs.tokens
    assert lp.text_offset[n_prompt] == len(PROMPT)
    # The prompt's log-probabilities come from a separate forward pass: scoring the prompt
    # plus the first generated token must give that token the engine's log-probability.
    first = p.logprobs.tokens[0]
    scored = client.completions.create(model=MODEL, prompt=PROMPT + first, max_tokens=1,
                                       temperature=0, logprobs=0, echo=True)
    assert scored.choices[0].logprobs.tokens[n_prompt] == first
    assert scored.choices[0].logprobs.token_logprobs[n_prompt] == pytest.approx(
        p.logprobs.token_logprobs[0], abs=2e-2)


def test_completion_stream_equals_non_stream(server):
    kw = {"model": MODEL, "prompt": [PROMPT, "1, 2, 3,"], "max_tokens": 6, "temperature": 0,
          "logprobs": 1, "echo": True}
    whole = server.client().completions.create(**kw)
    texts, tokens, usage = {}, {}, None
    for ch in server.client().completions.create(stream=True, stream_options={
            "include_usage": True}, **kw):
        if not ch.choices:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + (c.logprobs.tokens if c.logprobs else [])
    assert usage == whole.usage
    for c in whole.choices:
        assert texts[c.index] == c.text and tokens[c.index] == c.logprobs.tokens


def test_chat_usage_and_logprobs(server, tokenizer):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    out = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                  temperature=0, logprobs=True, top_logprobs=2)
    assert out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages, tokenize=True))
    [choice] = out.choices
    assert choice.message.role == "assistant"
    content = choice.logprobs.content
    assert out.usage.completion_tokens == len(content) >= 1
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert bytes(entry.bytes).decode() == entry.token
    if choice.finish_reason == "length":
        assert "".join(e.token for e in content) == choice.message.content
    else:                                    # ended on the end-of-turn token, not in the text
        assert "".join(e.token for e in content[:-1]) == choice.message.content


def test_chat_stream_equals_non_stream(server, tokenizer):
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len(tokenizer.apply_chat_template(CHAT, tokenize=True))
    # Without include_usage no usage chunk is sent.
    plain = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                                temperature=0, stream=True))
    assert all(ch.choices and ch.usage is None for ch in plain)


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3.0}, None),
    ({"max_tokens": CONTEXT}, "max_tokens"),                     # prompt + completion > context
    ({"prompt": "hello " * CONTEXT}, None),                      # the prompt alone is too long
    ({"prompt": [5, 10**9]}, None),                              # token id outside the vocab
    ({"extra_body": {"logit_bias": {"5": 1}}}, "logit_bias"),
])
def test_bad_parameters_are_400(server, kw, param):
    kw = {"model": MODEL, "prompt": PROMPT, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(**kw)
    err = info.value
    assert err.status_code == 400 and err.body["type"] == "invalid_request_error"
    assert err.body["message"]
    if param is not None:
        assert err.body["param"] == param


def test_chat_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi " * CONTEXT}])
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"


def test_auth_and_malformed_json(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, body = server.http("GET", "/v1/models")                 # no key at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = server.http("POST", "/v1/completions", b'{"model": "demo", "prompt": ',
                               headers=auth)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = server.http("POST", "/v1/completions", {"model": MODEL}, headers=auth)
    assert status == 400 and body["error"]["param"] == "prompt"       # field missing
    status, _ = server.http("POST", "/v1/completions", b"{", headers={"Authorization": "Bearer x"})
    assert status == 401                                              # key checked first


def test_metrics(server):
    before = server.wait_idle()
    server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                            temperature=0)
    after = server.wait_idle()
    assert after["quantrt_generation_tokens_total"] - before["quantrt_generation_tokens_total"] == 3
    assert after["quantrt_prompt_tokens_total"] > before["quantrt_prompt_tokens_total"]
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert after["quantrt_" + name] == before.get("quantrt_" + name, 0) + 1
    assert after["quantrt_request_success_total{length}"] == \
        before.get("quantrt_request_success_total{length}", 0) + 1
    assert after["quantrt_kv_cache_blocks_total"] > 0
    assert after["quantrt_kv_cache_usage_perc"] == 0
