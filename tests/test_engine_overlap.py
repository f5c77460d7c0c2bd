"""Overlapped steps (``overlap_steps``): the next decode is launched before the previous
step's tokens are read; its input ids come from the device's copy of them.  On the CPU the
same bookkeeping runs (placeholders, late reads, void tokens after a stop), so it is
checked here against the plain engine: same tokens, texts, finish reasons, no leaked block."""
import pytest
import torch

from quantrt.engine.sequence import FinishReason, SamplingParams
from quantrt.errors import ConfigError
from tests.tiny_models import small_engine


def _engine(loaded, overlap, **kw):
    return small_engine(loaded, overlap_steps=overlap, **kw)


def _count_launches(eng):
    launches = {"prev": 0, "deferred": 0, "all": 0}
    launch = eng.runner.launch

    def counted(batch, blocks, prev=None, defer=False):
        launches["all"] += 1
        launches["prev"] += prev is not None
        launches["deferred"] += defer
        return launch(batch, blocks, prev=prev, defer=defer)

    eng.runner.launch = counted
    return launches


def _assert_all_free(eng):
    assert eng.blocks.num_free == eng.blocks.num_blocks and not any(eng.blocks.refcount)
    assert not eng.requests and not eng.streams and eng._pending is None


def test_single_stream_overlaps_every_decode(loaded):
    eng = _engine(loaded, True)
    launches = _count_launches(eng)
    seq = eng.add_request(list(range(5, 14)), SamplingParams(max_tokens=12, temperature=0,
                                                             ignore_eos=True))
    calls = 0
    while eng.has_unfinished():
        eng.step()
        calls += 1
        assert all(t >= 0 for t in seq.output_ids[:len(seq.output_ids) - seq.pending])
    # prefill + 11 decodes, each of those launched before the previous tokens were read
    assert launches == {"prev": 11, "deferred": 12, "all": 12}
    assert calls == 13                                 # the last call only reads
    plain = _engine(loaded, False).generate([list(range(5, 14))], seq.params)[0]
    assert seq.output_ids == plain.output_ids and seq.output_text == plain.output_text
    assert seq.finish_reason is FinishReason.LENGTH
    _assert_all_free(eng)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_mixed_stops_admission_and_preemption_match_plain(loaded, prefix_caching):
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (14,), generator=g)]
    probe = _engine(loaded, False).generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    params = []
    for i, seq in enumerate(probe):
        kw = dict(max_tokens=6 + i % 11, temperature=0, ignore_eos=True)
        if i % 3 == 0:   # stop on a token it generates midway: later tokens become void
            kw["stop_token_ids"] = (seq.output_ids[2 + i % 4],)
        if i % 5 == 1:
            kw.update(temperature=0.9, seed=i)
        params.append(SamplingParams(**kw))
    # few seats and a small cache: requests wait, get admitted late, and are preempted
    opts = dict(max_num_seqs=5, max_num_batched_tokens=24, enable_prefix_caching=prefix_caching,
                kv_cache_memory=2 * loaded.config.num_layers * loaded.config.num_kv_heads
                * loaded.config.head_dim * 4 * 4 * 14)
    plain = _engine(loaded, False, **opts)
    want = plain.generate(prompts, params)
    eng = _engine(loaded, True, **opts)
    launches = _count_launches(eng)
    got = eng.generate(prompts, params)
    assert [s.output_ids for s in got] == [s.output_ids for s in want]
    assert [s.output_text for s in got] == [s.output_text for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    assert any(s.finish_reason is FinishReason.STOP for s in got)
    assert launches["prev"] > 0
    assert plain.scheduler.num_preemptions > 0
    _assert_all_free(eng)


def test_abort_while_a_token_is_unread(loaded):
    eng = _engine(loaded, True)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    a = eng.add_request(list(range(3, 20)), sp, request_id="a")
    b = eng.add_request(list(range(30, 41)), sp, request_id="b")
    for _ in range(4):
        eng.step()
    assert eng._pending is not None and b.pending == 1
    assert eng.abort("b")
    assert b.pending == 0 and -1 not in b.output_ids and b.finish_reason is FinishReason.ABORT
    while eng.has_unfinished():
        eng.step()
    assert len(a.output_ids) == 20 and -1 not in a.output_ids
    _assert_all_free(eng)


def test_logprobs_and_penalties_read_at_once(loaded):
    eng = _engine(loaded, True)
    launches = _count_launches(eng)
    seqs = eng.generate([list(range(7, 15))] * 2,
                        [SamplingParams(max_tokens=5, temperature=0, logprobs=2),
                         SamplingParams(max_tokens=5, temperature=0, repetition_penalty=1.2)])
    assert launches["deferred"] == launches["prev"] == 0
    assert len(seqs[0].logprobs) == len(seqs[0].output_ids) == 5
    _assert_all_free(eng)


def test_bad_overlap_option():
    from quantrt.engine.llm_engine import EngineConfig

    with pytest.raises(ConfigError, match="overlap_steps must be True or False"):
        EngineConfig(overlap_steps="yes")
