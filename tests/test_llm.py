"""The offline API: LLM.generate / LLM.chat on a tiny model, and once on the demo GGUF."""
import pytest

from quantrt import LLM, SamplingParams
from quantrt.errors import ConfigError

GREEDY = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def llm(loaded):
    return LLM(loaded, kv_cache_memory=4 << 20, block_size=4)


def _idle(llm):
    eng = llm.engine
    return not eng.requests and eng.blocks.num_free == eng.blocks.num_blocks


def test_prompts_as_text_or_token_ids(llm):
    ids = llm.tokenizer.encode("a tiny prompt")
    by_text = llm.generate("a tiny prompt", GREEDY)
    by_ids, by_list = llm.generate(ids, GREEDY), llm.generate([ids], GREEDY)
    assert len(by_text) == len(by_ids) == len(by_list) == 1
    assert by_text[0].prompt == "a tiny prompt" and by_ids[0].prompt is None
    assert by_text[0].prompt_token_ids == ids
    outs = [r.outputs[0] for r in (by_text[0], by_ids[0], by_list[0])]
    assert len({(tuple(o.token_ids), o.text) for o in outs}) == 1
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 7
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    assert _idle(llm)


def test_results_keep_prompt_order_with_per_prompt_params(llm):
    prompts = ["first one", "second, longer prompt text", "3"]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (3, 9, 5)]
    outs = llm.generate(prompts, params)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 5]
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert len({o.request_id for o in outs}) == 3


def test_n_completions_with_logprobs(llm):
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=5, n=3, logprobs=2, ignore_eos=True)
    out = llm.generate("sample me", sp, use_tqdm=True)[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 6
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
        assert all(len(lp.top) == 2 for lp in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    assert _idle(llm)


@pytest.mark.parametrize("prompts,params,match", [
    (["ok", ""], None, "empty"),
    (["ok", 3], None, "string or a list of token ids"),
    ({"prompt": "x"}, None, "prompts must be"),
    (["a", "b"], [GREEDY], "2 prompts"),
    (["a"], "greedy", "SamplingParams"),
    ([[1, 2, 10**6]], None, "outside the vocabulary"),
])
def test_bad_input_is_refused_before_anything_runs(llm, prompts, params, match):
    with pytest.raises(ConfigError, match=match):
        llm.generate(prompts, params)
    assert _idle(llm)


def test_engine_options_are_checked_before_loading(loaded):
    with pytest.raises(ConfigError, match="unknown engine option 'blok_size'"):
        LLM("/no/such/model", blok_size=8)
    with pytest.raises(ConfigError, match="already loaded"):
        LLM(loaded, device="cpu")


def test_chat_applies_the_template(llm, monkeypatch):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError, match="no chat template"):
        llm.chat(conv, GREEDY)
    monkeypatch.setattr(llm.tokenizer, "chat_template", TEMPLATE)
    one = llm.chat(conv, GREEDY)
    ids = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    assert one[0].prompt_token_ids == ids
    assert one[0].outputs[0].token_ids == llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    two = llm.chat([conv, conv[1:]], GREEDY)
    assert len(two) == 2 and two[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    with pytest.raises(ConfigError, match="list of dicts"):
        llm.chat(["hi"], GREEDY)


def test_demo_model_chats(demo_gguf):
    # Reference kernels: this model loads in ~2 s that way (the int4 repack takes longer).
    llm = LLM(demo_gguf, device="cpu", kernels="reference", progress=False,
              kv_cache_memory=32 << 20)
    reply = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                     SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert "4" in reply.text and reply.token_ids
    assert _idle(llm)
