"""Engine behaviour on a tiny random model: batching, preemption, prefix caching, n > 1,
logprobs, abort, stop conditions, seeds, KV memory use."""
import pytest
import torch

from quantrt.engine.block_manager import KVUsage
from quantrt.engine.sequence import FinishReason, SamplingParams
from quantrt.errors import ConfigError
from tests.tiny_models import make_tiny_model, small_engine


_MODE = {}


@pytest.fixture(autouse=True, params=[False, True], ids=["plain", "overlap"])
def overlap_steps(request):
    """Every test runs twice: reading each step's tokens at once, and overlapping steps
    (the next decode launched before this one's tokens are read), which must change no
    output, finish reason, text or block accounting."""
    _MODE["overlap_steps"] = request.param
    yield request.param
    _MODE.clear()


def _engine(loaded, **kw):
    kw.setdefault("overlap_steps", _MODE.get("overlap_steps", False))
    return small_engine(loaded, **kw)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_batched_equals_alone(loaded):
    prompts = _prompts(16)
    alone = [_engine(loaded).generate([p], GREEDY)[0].output_ids for p in prompts]
    eng = _engine(loaded, max_num_batched_tokens=40)  # forces chunked prefill mixed with decode
    batched = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert batched == alone
    assert eng.blocks.num_free == eng.blocks.num_blocks


def _per_token(loaded):
    cfg = loaded.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def _assert_all_free(eng):
    assert eng.blocks.num_free == eng.blocks.num_blocks and not any(eng.blocks.refcount)
    assert not eng.requests and not eng.streams and not eng.runner.sampler.generators


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_changes_nothing(loaded, prefix_caching):
    prompts = _prompts(8, seed=1)
    roomy = [s.output_ids for s in _engine(loaded).generate(prompts, GREEDY)]
    # 40 tokens of cache for 8 sequences that each grow past 20: preemption must happen.
    eng = _engine(loaded, kv_cache_memory=_per_token(loaded) * 40,
                  enable_prefix_caching=prefix_caching)
    tight = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert eng.scheduler.num_preemptions > 0
    assert tight == roomy
    _assert_all_free(eng)


def test_prefix_cache_hits_change_nothing(loaded):
    g = torch.Generator().manual_seed(6)
    heads = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 14, 21)]
    prompts = [heads[i % 3] + torch.randint(0, 256, (1 + i % 5,), generator=g).tolist()
               for i in range(11)]
    plain = [s.output_ids for s in _engine(loaded, enable_prefix_caching=False).generate(prompts, GREEDY)]
    eng = _engine(loaded, max_num_batched_tokens=23, max_num_seqs=3)  # staggered admissions
    first = eng.generate(prompts, GREEDY)
    hits_first = eng.blocks.prefix_hits
    second = eng.generate(prompts, GREEDY)
    assert [s.output_ids for s in first] == plain == [s.output_ids for s in second]
    assert hits_first > 0                                  # later requests reused earlier ones
    assert all(s.num_prefix_hits == 4 * ((len(p) - 1) // 4) for s, p in zip(second, prompts))
    _assert_all_free(eng)


def test_cached_blocks_are_evicted_when_space_is_needed(loaded):
    eng = _engine(loaded, kv_cache_memory=_per_token(loaded) * 48)     # 12 blocks
    prompts = _prompts(12, seed=7)
    out = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert out == [s.output_ids for s in _engine(loaded).generate(prompts, GREEDY)]
    assert eng.blocks.num_evictions > 0
    _assert_all_free(eng)


@pytest.mark.parametrize("prompt_len", [7, 8, 13])
def test_n_completions_share_the_prompt(loaded, prompt_len):
    prompt = list(range(40, 40 + prompt_len))
    single = _engine(loaded).generate([prompt], GREEDY)[0].output_ids
    eng = _engine(loaded)
    first = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0,
                                                   ignore_eos=True, n=3))
    eng.step()                                             # prefill, then the fork
    shared = first.block_table[:prompt_len // 4]
    assert all(eng.blocks.refcount[b] == 3 for b in shared)
    assert all(s.block_table[:len(shared)] == shared for s in first.group)
    eng.step()                                             # each completion computes its token
    in_use = eng.blocks.num_blocks - eng.blocks.num_free
    assert in_use == 3 * -(-(prompt_len + 1) // 4) - 2 * len(shared)
    while eng.has_unfinished():
        eng.step()
    assert [s.output_ids for s in first.group] == [single] * 3
    assert [s.index for s in first.group] == [0, 1, 2]
    _assert_all_free(eng)


def test_n_completions_use_seed_plus_index(loaded):
    p = _prompts(1, seed=8)[0]
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=77, ignore_eos=True, n=3)
    group = _engine(loaded).generate([p], sp)[0].group
    singles = [_engine(loaded).generate([p], SamplingParams(max_tokens=10, temperature=1.0,
                                                            seed=77 + i, ignore_eos=True))[0]
               for i in range(3)]
    assert [s.output_ids for s in group] == [s.output_ids for s in singles]
    assert len({tuple(s.output_ids) for s in group}) == 3


def test_logprobs_equal_log_softmax_of_the_model_logits(loaded):
    eng = _engine(loaded)
    p = _prompts(1, seed=9)[0]
    sp = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=3, ignore_eos=True,
                        logprobs=5, repetition_penalty=1.3)
    seq = eng.generate([p], sp)[0]
    ref = eng.runner.logits_for(p + seq.output_ids[:-1], eng.blocks).log_softmax(-1)[len(p) - 1:]
    assert len(seq.logprobs) == len(seq.output_ids) == ref.shape[0]
    for i, (tok, lp) in enumerate(zip(seq.output_ids, seq.logprobs)):
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(5).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(5).values.tolist(), abs=1e-4)
    assert seq.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in seq.logprobs))
    _assert_all_free(eng)


def test_abort_frees_blocks(loaded):
    eng = _engine(loaded)
    prompts = _prompts(3, seed=10)
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    a = eng.add_request(prompts[0], long, request_id="a")
    b = eng.add_request(prompts[1], SamplingParams(max_tokens=30, temperature=0, n=2,
                                                   ignore_eos=True), request_id="b")
    c = eng.add_request(prompts[2], long, request_id="c")
    with pytest.raises(ConfigError, match="already running"):
        eng.add_request(prompts[2], long, request_id="c")
    eng.step()
    eng.step()
    assert eng.abort("b") and not eng.abort("b") and not eng.abort("nope")
    assert all(s.finish_reason is FinishReason.ABORT and not s.block_table for s in b.group)
    assert eng.abort(c)                                    # by sequence, while running
    while eng.has_unfinished():
        eng.step()
    assert a.finish_reason is FinishReason.LENGTH and len(a.output_ids) == 30
    _assert_all_free(eng)


def test_abort_before_the_fork_aborts_every_completion(loaded):
    eng = _engine(loaded)
    first = eng.add_request(_prompts(1, seed=11)[0], SamplingParams(n=4, max_tokens=5))
    assert eng.abort(first.request_id)
    assert [s.finish_reason for s in first.group] == [FinishReason.ABORT] * 4
    assert not eng.has_unfinished()
    _assert_all_free(eng)


def test_kv_memory_waste_stays_small(tmp_path_factory):
    """256 requests of 120..250 prompt tokens and 8..40 new ones through 16-token blocks:
    the share of allocated cache slots holding no K/V, summed over every step."""
    from quantrt.loader import load

    lm = load(make_tiny_model(tmp_path_factory.mktemp("long"), "llama",
                              max_position_embeddings=512), device="cpu", progress=False)
    eng = _engine(lm, block_size=16, max_num_seqs=48, kv_cache_memory=_per_token(lm) * 16 * 600)
    g = torch.Generator().manual_seed(12)
    for i in range(256):
        n = int(torch.randint(120, 251, (1,), generator=g))
        eng.add_request(torch.randint(0, 256, (n,), generator=g).tolist(),
                        SamplingParams(max_tokens=8 + i % 33, temperature=0, ignore_eos=True))
    total = KVUsage()
    peak = None
    while eng.has_unfinished():
        eng.step()
        now = eng.kv_usage()
        total += now
        if peak is None or now.allocated > peak.allocated:
            peak = now
    print(f"KV waste over the run {total.waste:.2%}, at the fullest step {peak.waste:.2%} "
          f"({peak.allocated} slots)")
    assert total.waste < 0.04 and peak.waste < 0.04
    _assert_all_free(eng)


def test_max_model_len_is_capped_by_the_cache(loaded):
    eng = _engine(loaded, kv_cache_memory=_per_token(loaded) * 20)    # 5 blocks, 20 tokens
    assert eng.max_model_len == 21
    seq = eng.generate([list(range(20))], GREEDY)[0]
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.output_ids) == 1
    with pytest.raises(ConfigError, match="does not fit in the KV cache"):
        eng.add_request(list(range(21)), GREEDY)
    _assert_all_free(eng)


def test_seed_reproducible_and_distinct(loaded):
    p = _prompts(1, seed=2)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    a = _engine(loaded).generate([p], sp)[0].output_ids
    b = _engine(loaded).generate([p, p], [sp, sp])
    assert a == b[0].output_ids == b[1].output_ids
    c = _engine(loaded).generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=99,
                                                     ignore_eos=True))[0].output_ids
    assert c != a


def test_stop_string_truncates_and_stops(loaded):
    eng = _engine(loaded)
    p = _prompts(1, seed=3)[0]
    full = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = full.output_text
    assert len(text) > 4
    stop = text[2:4]
    seq = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                           stop=(stop,)))[0]
    assert seq.finish_reason is FinishReason.STOP
    assert seq.output_text == text[:text.find(stop)]


def test_stop_token_and_max_tokens(loaded):
    eng = _engine(loaded)
    p = _prompts(1, seed=4)[0]
    full = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert full.finish_reason is FinishReason.LENGTH and len(full.output_ids) == 10
    stop_id = full.output_ids[3]
    seq = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                           stop_token_ids=(stop_id,)))[0]
    assert seq.finish_reason is FinishReason.STOP
    assert seq.output_ids == full.output_ids[:full.output_ids.index(stop_id) + 1]


def test_stream_never_shows_a_stop_string(loaded):
    eng = _engine(loaded)
    p = _prompts(1, seed=13)[0]
    text = eng.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].output_text
    stop = text[9:12]
    pieces = list(eng.stream(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                               stop=[stop, "never-seen"])))
    assert "".join(pieces) == text[:text.find(stop)]
    assert not any(stop in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_stream_concatenates_to_text(loaded):
    eng = _engine(loaded)
    p = _prompts(1, seed=5)[0]
    pieces = list(eng.stream(p, SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)))
    again = eng.generate([p], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))[0]
    assert "".join(pieces) == again.output_text


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
    {"min_p": 2}, {"repetition_penalty": 0}, {"presence_penalty": 3}, {"stop": ("",)},
    {"temperature": float("nan")}, {"top_p": float("nan")}, {"seed": -1}, {"seed": 2**64},
])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_bad_prompts(loaded):
    eng = _engine(loaded)
    with pytest.raises(ConfigError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        eng.add_request([loaded.config.vocab_size], GREEDY)
    with pytest.raises(ConfigError, match="context limit"):
        eng.add_request([1] * loaded.config.max_position_embeddings, GREEDY)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        _engine(loaded, max_num_seqs=3).add_request([1], SamplingParams(n=4))
    with pytest.raises(ConfigError, match="list of integers"):
        eng.add_request([1, 2.0], GREEDY)
    _assert_all_free(eng)


@pytest.mark.parametrize("kwargs", [{"block_size": 0}, {"max_num_seqs": 2.5},
                                    {"enable_prefix_caching": 1}, {"kv_cache_memory": -1}])
def test_bad_engine_config(kwargs):
    from quantrt.engine.llm_engine import EngineConfig

    with pytest.raises(ConfigError):
        EngineConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown engine option"):
        EngineConfig.from_options(blocksize=3)
