"""Engine behaviour on a tiny random model: batching, preemption, stop conditions, seeds."""
import pytest
import torch

from quantrt.engine.block_manager import BlockManager
from quantrt.engine.sequence import FinishReason, SamplingParams, Sequence
from quantrt.errors import ConfigError
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from quantrt.loader import load

    return load(tiny_dir, device="cpu", progress=False)


def _engine(loaded, **kw):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine

    kw.setdefault("kv_cache_memory", 4 << 20)
    kw.setdefault("block_size", 4)
    return LLMEngine(loaded, EngineConfig(**kw))


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_block_manager_counts():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = Sequence(list(range(9)), GREEDY)
    assert bm.blocks_needed(seq, 9) == 3
    bm.grow(seq, 9)
    assert bm.num_free == 2 and len(seq.block_table) == 3
    assert bm.slots(seq, 7, 2) == [seq.block_table[1] * 4 + 3, seq.block_table[2] * 4]
    seq.num_cached = 9
    assert not bm.can_grow(Sequence([0] * 13, GREEDY), 13)
    bm.release(seq)
    assert bm.num_free == 5 and seq.block_table == []


def test_batched_equals_alone(loaded):
    prompts = _prompts(16)
    alone = [_engine(loaded).generate([p], GREEDY)[0].output_ids for p in prompts]
    eng = _engine(loaded, max_num_batched_tokens=40)  # forces chunked prefill mixed with decode
    batched = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert batched == alone
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_preemption_changes_nothing(loaded):
    prompts = _prompts(8, seed=1)
    roomy = [s.output_ids for s in _engine(loaded).generate(prompts, GREEDY)]
    # 40 tokens of cache for 8 sequences that each grow past 20: preemption must happen.
    cfg = loaded.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    eng = _engine(loaded, kv_cache_memory=per_token * 40)
    tight = [s.output_ids for s in eng.generate(prompts, GREEDY)]
    assert eng.scheduler.num_preemptions > 0
    assert tight == roomy
    assert eng.blocks.num_free == eng.blocks.num_blocks


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
