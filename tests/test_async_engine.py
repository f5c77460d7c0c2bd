"""The asyncio engine: concurrent streams equal the offline results; abort, early exit,
shutdown and engine failure end streams cleanly."""
import asyncio
import contextlib

import pytest

from quantrt import LLM, SamplingParams
from quantrt.engine.async_engine import AsyncLLMEngine, EngineDeadError
from quantrt.errors import ConfigError
from tests.tiny_models import small_engine

LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


def _async(loaded, **kw):
    return AsyncLLMEngine(small_engine(loaded, **kw))


def _idle(engine):
    eng = engine.engine
    return not eng.requests and eng.blocks.num_free == eng.blocks.num_blocks


PROMPTS = ["one", "a second prompt", "3 3 3", "the fourth and longest prompt of all", "five!"]
PARAMS = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 11, 3, 8)] + [
    SamplingParams(max_tokens=6, temperature=1.0, seed=4, n=2, logprobs=3, ignore_eos=True)]


@pytest.mark.parametrize("delta", [False, True])
def test_concurrent_streams_equal_offline_results(loaded, delta):
    offline = LLM(loaded, kv_cache_memory=4 << 20, block_size=4).generate(PROMPTS, PARAMS)
    events = []

    async def consume(engine, prompt, params, rid):
        texts, ids, lps, last = {}, {}, {}, None
        async for out in engine.generate(prompt, params, request_id=rid, delta=delta):
            events.append(rid)
            for c in out.outputs:
                if delta:
                    texts[c.index] = texts.get(c.index, "") + c.text
                    ids[c.index] = ids.get(c.index, []) + c.token_ids
                    lps[c.index] = lps.get(c.index, []) + (c.logprobs or [])
                else:
                    texts[c.index], ids[c.index], lps[c.index] = c.text, c.token_ids, c.logprobs or []
            last = out
        return last, texts, ids, lps

    async def main():
        async with _async(loaded) as engine:
            results = await asyncio.gather(*(consume(engine, p, sp, f"r{i}")
                                              for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))))
            assert _idle(engine)
        return results

    results = asyncio.run(main())
    for (last, texts, ids, lps), want in zip(results, offline):
        assert last.finished and last.prompt == want.prompt
        for c in want.outputs:
            assert ids[c.index] == c.token_ids and texts[c.index] == c.text
            assert [lp.token_id for lp in lps[c.index]] == ([lp.token_id for lp in c.logprobs]
                                                          if c.logprobs else [])
            assert last.outputs[c.index].finish_reason == c.finish_reason
    # Streams run side by side: before the shortest request ends, every other one has
    # produced output (one request at a time would fail this).
    shortest_done = max(i for i, rid in enumerate(events) if rid == "r2")
    assert {"r0", "r1", "r3", "r4"} <= set(events[:shortest_done])


def test_abort_ends_the_stream_and_frees_blocks(loaded):
    async def main():
        engine = _async(loaded)
        outs = []
        async for out in engine.generate("abort me", LONG, request_id="x"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("x")
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert 3 <= len(outs[-1].outputs[0].token_ids) < 200
        assert _idle(engine)
        await engine.shutdown()

    asyncio.run(main())


def test_leaving_the_loop_early_aborts(loaded):
    async def main():
        engine = _async(loaded)
        async with contextlib.aclosing(engine.generate("leave early", LONG)) as stream:
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 2:
                    break
        for _ in range(100):                 # the abort is applied between two steps
            if _idle(engine):
                break
            await asyncio.sleep(0.01)
        assert _idle(engine) and engine.num_unfinished == 0
        await engine.shutdown()

    asyncio.run(main())


def test_shutdown_aborts_running_streams(loaded):
    async def main():
        engine = _async(loaded)
        started = asyncio.Event()

        async def consume():
            async for out in engine.generate("shut down", LONG):
                started.set()
                last = out
            return last

        task = asyncio.create_task(consume())
        await started.wait()
        await engine.shutdown()
        last = await task
        assert last.finished and last.outputs[0].finish_reason == "abort"
        assert _idle(engine)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in engine.generate("again", LONG):
                pass

    asyncio.run(main())


def test_bad_requests_raise_at_once(loaded):
    async def main():
        engine = _async(loaded, max_num_seqs=8)
        with pytest.raises(ConfigError, match="empty"):
            async for _ in engine.generate("", LONG):
                pass
        with pytest.raises(ConfigError, match="n=9"):
            async for _ in engine.generate("x", SamplingParams(n=9)):
                pass
        first = engine.generate("x", LONG, request_id="same")
        await first.__anext__()
        with pytest.raises(ConfigError, match="already running"):
            async for _ in engine.generate("y", LONG, request_id="same"):
                pass
        await first.aclose()
        await engine.shutdown()
        assert _idle(engine)

    asyncio.run(main())


def test_a_failing_step_reaches_every_stream(loaded, monkeypatch):
    async def main():
        engine = _async(loaded)

        def broken():
            raise RuntimeError("device lost")

        monkeypatch.setattr(engine.engine, "step", broken)
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in engine.generate("x", LONG):
                pass
        with pytest.raises(EngineDeadError, match="stopped after an error"):
            async for _ in engine.generate("x", LONG):
                pass
        await engine.shutdown()

    asyncio.run(main())
