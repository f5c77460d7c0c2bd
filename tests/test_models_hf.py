"""Our Llama-family model against transformers on the same random-init safetensors weights
(fp32): full-prompt logits to 1e-4 absolute, and greedy continuations through the paged
engine identical to argmax decoding in HF."""
import pytest
import torch

from tests.tiny_models import ARCHS, make_tiny_model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    import transformers

    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _engine(path):
    from quantrt.engine.llm_engine import EngineConfig, LLMEngine
    from quantrt.loader import load

    return LLMEngine(load(path, device="cpu"), EngineConfig(kv_cache_memory=8 << 20, block_size=4))


@pytest.mark.parametrize("length", [1, 17, 23])
def test_prompt_logits_match(tiny, length):
    path, hf = tiny
    eng = _engine(path)
    ids = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    ours = eng.runner.logits_for(ids, eng.blocks)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_decode_matches(tiny):
    from quantrt.engine.sequence import SamplingParams

    path, hf = tiny
    eng = _engine(path)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(20):
            nxt = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            want.append(nxt)
            ids.append(nxt)
    assert seq.output_ids == want
    assert eng.blocks.num_free == eng.blocks.num_blocks


class _Opaque:
    """Any object that is not a tensor: pickling it makes the file run code on load."""


def test_legacy_bin_checkpoint_loads_safely(tmp_path):
    """A directory with only pytorch_model.bin loads through weights_only=True and gives the
    same logits as the safetensors copy; a pickle holding an arbitrary object is refused."""
    from safetensors.torch import load_file

    from quantrt.errors import FormatError
    from quantrt.loader import load

    path = make_tiny_model(tmp_path / "st", "llama")
    legacy = tmp_path / "bin"
    legacy.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    state = load_file(str(path / "model.safetensors"))
    torch.save(state, legacy / "pytorch_model.bin")
    a, b = _engine(path), _engine(legacy)
    ids = [5, 17, 200, 3]
    assert torch.equal(a.runner.logits_for(ids, a.blocks), b.runner.logits_for(ids, b.blocks))
    torch.save({**state, "extra": _Opaque()}, legacy / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickled"):
        load(legacy, device="cpu", progress=False)
