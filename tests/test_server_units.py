"""Server parts without a server: the engine hook for prompt log-probabilities, request
checks, token pieces, stream merging and the disconnect watcher."""
import asyncio

import pytest

pytest.importorskip("fastapi")

from quantrt import LLM, SamplingParams
from quantrt.engine.async_engine import AsyncLLMEngine, EngineDeadError
from quantrt.errors import ConfigError
from quantrt.server.errors import APIError
from quantrt.server.generation import Completion, merged, unless_disconnected
from quantrt.server.launch import parse_size
from quantrt.server.logprobs import prompt_logprobs, token_pieces
from quantrt.server.protocol import ChatCompletionRequest, CompletionRequest
from tests import test_server as base
from tests.tiny_models import make_tiny_model, small_engine

tokenizer = base.tokenizer          # the demo's GGUF tokenizer (no weights loaded)


def _engine(loaded):
    return AsyncLLMEngine(small_engine(loaded))


def test_prompt_logprobs_agree_with_the_engines_sampled_logprobs(loaded):
    """Scoring prompt + generated tokens gives each generated token the log-probability,
    rank and alternatives the sampler reported when it produced it."""
    prompt = [3, 17, 42, 5, 99, 7]
    out = LLM(loaded, kv_cache_memory=4 << 20, block_size=4).generate(
        [prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    gen = out[0].outputs[0]

    async def main():
        engine = _engine(loaded)
        scored = await engine.run_exclusive(
            lambda eng: prompt_logprobs(eng, prompt + gen.token_ids, 3))
        blocks = engine.engine.blocks
        assert blocks.num_free == blocks.num_blocks          # scratch blocks released
        await engine.shutdown()
        return scored

    scored = asyncio.run(main())
    assert scored[0] is None and len(scored) == len(prompt) + 5
    for want, got in zip(gen.logprobs, scored[len(prompt):]):
        assert got.token_id == want.token_id and got.rank == want.rank == 1
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_run_exclusive_interleaves_with_streams_and_reports_errors(loaded):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    offline = LLM(loaded, kv_cache_memory=4 << 20, block_size=4).generate(["a b c"], params)

    async def main():
        engine = _engine(loaded)

        async def stream():
            ids = []
            async for out in engine.generate("a b c", params, delta=True):
                ids += out.outputs[0].token_ids
                await asyncio.sleep(0)
            return ids

        task = asyncio.create_task(stream())
        seen = [await engine.run_exclusive(lambda eng: len(eng.requests)) for _ in range(3)]
        with pytest.raises(ZeroDivisionError):
            await engine.run_exclusive(lambda eng: 1 / 0)
        ids = await task                     # the engine went on after the job's error
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.run_exclusive(lambda eng: 0)
        return seen, ids

    seen, ids = asyncio.run(main())
    assert ids == offline[0].outputs[0].token_ids
    assert all(n in (0, 1) for n in seen)


def test_token_pieces_rebuild_the_text(tokenizer):
    text = "Grüße, 世界! 🙂 spaces  and\ttabs"
    ids = tokenizer.encode(text)
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert any(p == "" for p in pieces)          # 世 and 🙂 span several byte tokens
    # With context (a stream's earlier tokens), a continuation's pieces are what it adds,
    # wherever it is cut, inside a character too.
    for k in range(1, len(ids)):
        cont = token_pieces(tokenizer, ids[k:], ids[:k])
        assert "".join(cont) == text[len("".join(pieces[:k])):], k
    eos = tokenizer.token_to_id("<|im_end|>")
    assert token_pieces(tokenizer, [eos], ids) == ["<|im_end|>"]     # specials are shown


def test_parse_size():
    assert parse_size("1024") == 1024
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5 GiB") == 3 << 29
    assert parse_size("2G") == 2 * 10**9
    for bad in ("", "lots", "5 parsecs", "-1GiB", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_request_checks():
    with pytest.raises(APIError, match="best_of"):
        CompletionRequest(model="m", prompt="x", n=1, best_of=3).check_supported()
    CompletionRequest(model="m", prompt="x", n=2, best_of=2).check_supported()
    with pytest.raises(APIError, match="stream_options"):
        CompletionRequest(model="m", prompt="x", stream_options={"include_usage": True}
                          ).check_supported()
    with pytest.raises(APIError, match="top_logprobs"):
        ChatCompletionRequest(model="m", messages=base.CHAT, top_logprobs=2).check_supported()
    req = ChatCompletionRequest(model="m", max_tokens=5, max_completion_tokens=7, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi, "},
                                     {"type": "text", "text": "there"}]}])
    assert req.requested_max_tokens == 7
    assert [m.as_template_message() for m in req.messages] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, there"}]
    with pytest.raises(APIError, match="tool calls"):
        ChatCompletionRequest(model="m", messages=[{"role": "assistant", "tool_calls": [{}]}]
                              ).messages[0].as_template_message()
    with pytest.raises(ConfigError, match="top_k"):
        CompletionRequest(model="m", prompt="x", top_k=-5).sampling_params(4, None)


def test_merged_stops_the_other_streams_on_an_error():
    closed = []

    async def good():
        try:
            for i in range(100):
                yield i
                await asyncio.sleep(0.01)
        finally:
            closed.append("good")

    async def bad():
        yield "x"
        await asyncio.sleep(0.03)
        raise ValueError("boom")

    async def main():
        got = []
        with pytest.raises(ValueError):
            async for item in merged([good(), bad()]):
                got.append(item)
        return got

    got = asyncio.run(main())
    assert (1, "x") in got and len(got) < 20 and closed == ["good"]


class _FakeRequest:
    def __init__(self, messages):
        self.messages = messages

    async def receive(self):
        kind, delay = self.messages.pop(0)
        await asyncio.sleep(delay)
        return {"type": kind}


def test_unless_disconnected():
    cancelled = []

    async def work(seconds):
        try:
            await asyncio.sleep(seconds)
            return "done"
        except asyncio.CancelledError:
            cancelled.append(seconds)
            raise

    async def main():
        quick = await unless_disconnected(_FakeRequest([("http.disconnect", 5)]), work(0.01))
        with pytest.raises(APIError) as info:
            await unless_disconnected(_FakeRequest([("http.request", 0), ("http.disconnect", 0.01)]),
                                      work(5))
        return quick, info.value.status

    assert asyncio.run(main()) == ("done", 499)
    assert cancelled == [5]


def test_completion_gathers_deltas():
    c = Completion()
    c.add("Hel", [1, 2], None, None)
    c.add("lo", [3], None, "stop")
    assert (c.text, c.token_ids, c.finish_reason) == ("Hello", [1, 2, 3], "stop")


def test_serve_command_refuses_bad_settings_in_one_line(tmp_path):
    from click.testing import CliRunner

    from quantrt.cli import main

    tiny = str(make_tiny_model(tmp_path, "llama"))
    cases = [(["--kv-cache-memory", "lots"], "is not a size"),
             (["--kv-cache-memory", "1GiB", "--gpu-memory-utilization", "0.5"], "not both"),
             (["--device", "cpu", "--gpu-memory-utilization", "0.5"], "CUDA device"),
             (["--max-num-seqs", "0"], "0")]
    for args, message in cases:
        result = CliRunner().invoke(main, ["serve", tiny, "--port", "0", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
