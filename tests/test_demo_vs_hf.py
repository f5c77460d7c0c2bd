"""The real demo GGUF against HF transformers loading the same file (which dequantizes it).

Tolerances: the reference kernels compute in fp32 from exactly the same dequantized
weights, so last-position logits agree to 2e-3 absolute (logits span about +-30); the fast
CPU kernel (cpu-ggml) rounds each activation to int8 on its 32-value block's grid, as
llama.cpp does (up to 2^-8 of the block's largest value, against bf16's 2^-9 of the value
itself on the older tinygemm path): measured max |diff| 0.58-0.77 over these prompts
(tinygemm: < 0.5), asserted < 1.0; the greedy-agreement test below bounds what that does
to the tokens.
"""
import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def hf(demo_gguf):
    transformers = pytest.importorskip("transformers")
    d, name = str(demo_gguf.parent), demo_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def ours_ref(demo_gguf):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.loader import load

    lm = load(demo_gguf, device="cpu", kernels="reference")
    return LLMEngine(lm, EngineConfig(kv_cache_memory=64 << 20))


@pytest.fixture(scope="module")
def ours_fast(demo_gguf):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.loader import load

    lm = load(demo_gguf, device="cpu")
    return LLMEngine(lm, EngineConfig(kv_cache_memory=64 << 20))


def _hf_logits(hf, prompt):
    tok, model = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1].float()


def _hf_greedy(hf, prompt, n):
    """Plain argmax decoding with HF's KV cache (generate() would stop at or suppress EOS)."""
    tok, model = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenization_identical(hf, ours_ref, prompt):
    assert ours_ref.tokenizer.encode(prompt) == hf[0](prompt).input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_logits_reference_kernels(hf, ours_ref, prompt):
    ids = ours_ref.tokenizer.encode(prompt)
    ours = ours_ref.runner.logits_for(ids, ours_ref.blocks)[-1]
    ref = _hf_logits(hf, prompt)
    assert (ours - ref).abs().max().item() < 2e-3
    assert ours.argmax() == ref.argmax()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_logits_fast_kernels(hf, ours_fast, prompt):
    ids = ours_fast.tokenizer.encode(prompt)
    ours = ours_fast.runner.logits_for(ids, ours_fast.blocks)[-1]
    ref = _hf_logits(hf, prompt)
    assert (ours - ref).abs().max().item() < 1.0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_identical(hf, ours_ref, prompt):
    from quantrt.engine.sequence import SamplingParams

    ids = ours_ref.tokenizer.encode(prompt)
    seq = ours_ref.generate([ids], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert seq.output_ids == _hf_greedy(hf, prompt, 32)
    assert ours_ref.blocks.num_free == ours_ref.blocks.num_blocks


def test_fast_kernels_track_hf_greedy(hf, ours_fast):
    """Activation rounding in the fast kernel can flip a near-tie, after which free-running
    greedy paths part for good, so agreement is measured teacher-forced: at every step the
    fast path predicts the next token of HF's own greedy continuation through real decode
    steps (M=1).  Measured 154/160 (cpu-ggml; tinygemm: 157/160); asserted: the first token
    everywhere and >= 90%."""
    from quantrt.engine.sequence import SamplingParams

    agree = total = 0
    for prompt in PROMPTS:
        hf_ids = _hf_greedy(hf, prompt, 32)
        seq = ours_fast.add_request(ours_fast.tokenizer.encode(prompt),
                                    SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        i = 0
        while not seq.finished:
            ours_fast.step()
            if i == 0:
                assert seq.output_ids[0] == hf_ids[0], prompt
            agree += seq.output_ids[i] == hf_ids[i]
            total += 1
            seq.output_ids[i] = hf_ids[i]  # force HF's token: the next step computes its K/V
            i += 1
    print(f"teacher-forced agreement {agree}/{total}")
    assert total == 32 * len(PROMPTS)
    assert agree >= 0.9 * total, f"{agree}/{total}"
