"""quantrt.tokenizer against transformers' own GGUF / HF tokenizers, which are the reference."""
from __future__ import annotations

import os
import time

import pytest

from quantrt.errors import ConfigError, FormatError
from quantrt.tokenizer import Tokenizer


PROMPTS = [
    "Hello, world! How are you today?",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\tindented\r\nend",
    "Numbers: 12345 and 3.14159, 1,000,000 and 2024-01-01.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "Emoji 😀🎉👍🏽 and CJK 日本語のテキスト 中文 한국어",
    "<|im_start|>user\nliteral special tokens<|im_end|>",
    "Accents: café naïve Ångström — “quotes” ‘single’ …",
    "I'm sure they've said it's what we'd do, isn't it?",
    "",
    "x" * 50 + " " + "ab" * 40,
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3? 😀"}],
    [{"role": "user", "content": "Hi there\nsecond line"}],
]


def _gguf_metadata(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.") or name == "general.architecture"}


@pytest.fixture(scope="module")
def smol(demo_gguf):
    """(ours, reference, metadata) for the demo GGUF (conftest's ``demo_gguf``: fetched
    into the cache on first use, so these run in a clean CI too)."""
    from transformers import AutoTokenizer

    path = str(demo_gguf)
    metadata = _gguf_metadata(path)
    ours = Tokenizer.from_gguf_metadata(metadata, path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, ref, metadata


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_matches_transformers_gguf(smol, text):
    ours, ref, _ = smol
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", PROMPTS)
def test_decode_round_trips(smol, text):
    ours, ref, _ = smol
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_special_ids_and_eos_set(smol):
    ours, ref, _ = smol
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)
    im_end = ref.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ours.eos_token_ids
    # No BOS: this model's file says add_bos_token = False.
    assert ours.encode("hi")[:1] != [ours.bos_token_id]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smol, conversation, add_generation_prompt):
    ours, ref, _ = smol
    expected = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = ref.apply_chat_template(conversation, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                    tokenize=True) == expected_ids


@pytest.mark.parametrize("text", [p for p in PROMPTS if p] + ["ǅ€😀日本語🎉 done"])
def test_stream_equals_full_decode(smol, text):
    ours, _, _ = smol
    ids = ours.encode(text) + [ours.eos_token_id]
    stream = ours.stream()
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == ours.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_holds_back_split_characters(smol):
    ours, _, _ = smol
    ids = ours.encode("😀")
    assert len(ids) > 1, "the emoji should be split over byte-level tokens"
    stream = ours.stream()
    assert [stream.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.add(ids[-1]) == "😀"
    assert stream.flush() == ""


def test_gguf_load_is_fast(smol, demo_gguf):
    _, _, metadata = smol
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(metadata, str(demo_gguf))
    assert time.perf_counter() - start < 3.0


def test_hf_dir_agrees_with_saved_transformers_tokenizer(smol, tmp_path):
    ours, ref, _ = smol
    ref.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_pretrained_dir(str(tmp_path))
    for text in PROMPTS:
        ids = from_dir.encode(text)
        assert ids == ours.encode(text)
        assert from_dir.decode(ids) == ours.decode(ids)
    assert from_dir.eos_token_id == ours.eos_token_id
    assert ours.token_to_id("<|im_end|>") in from_dir.eos_token_ids
    assert from_dir.apply_chat_template(CONVERSATIONS[0]) == ours.apply_chat_template(CONVERSATIONS[0])


def test_hf_dir_missing_files(tmp_path):
    with pytest.raises(FormatError, match=str(tmp_path)):
        Tokenizer.from_pretrained_dir(str(tmp_path))
    with pytest.raises(FormatError):
        Tokenizer.from_pretrained_dir(str(tmp_path / "nope"))


def test_unsupported_gguf_model_is_config_error():
    metadata = {"general.architecture": "llama", "tokenizer.ggml.model": "weird",
                "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1]}
    with pytest.raises(ConfigError, match="weird"):
        Tokenizer.from_gguf_metadata(metadata, "model.gguf")


def test_missing_tokenizer_model_is_format_error():
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.tokens": ["a"]}, "model.gguf")


# --------------------------------------------------------------- SentencePiece-style ('llama') GGUF
_SP_PIECES = ["▁", "▁t", "he", "▁the", "▁H", "el", "lo", "ello", "▁Hello", "▁w", "or", "ld", "▁world",
              "in", "▁in", "ing", "▁1", "23", "▁a", "▁is", "is", "er", "▁of", "▁▁", "▁▁▁▁"]
_SP_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                "{{ raise_exception('no tools') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _write_sentencepiece_gguf(path):
    import gguf
    import numpy as np

    letters = list("abcdefghijklmnopqrstuvwxyzHTW0123456789,.!?")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SP_PIECES + letters
    types = [2, 3, 3] + [6] * 256 + [1] * (len(_SP_PIECES) + len(letters))
    scores = [0.0] * 259 + [-float(i) for i in range(len(_SP_PIECES))] + [-100.0 - i for i in range(len(letters))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(_SP_TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    _write_sentencepiece_gguf(path)
    ours = Tokenizer.from_gguf_metadata(_gguf_metadata(str(path)), str(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    texts = ["Hello world", " Hello  world", "the thing is in 123", "héllo 😀 <unk> <s> x",
             "\n\nHello\tworld  ", "", "Hello</s>", "日本"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ids[0] == ours.bos_token_id  # no add_bos_token key: SentencePiece defaults to BOS
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        stream = ours.stream()
        assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == ours.decode(ids)
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}]
    assert ours.apply_chat_template(conversation) == ref.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ConfigError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_chat_template_is_config_error(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    _write_sentencepiece_gguf(path)
    metadata = _gguf_metadata(str(path))
    del metadata["tokenizer.chat_template"]
    ours = Tokenizer.from_gguf_metadata(metadata, str(path))
    assert ours.chat_template is None
    with pytest.raises(ConfigError):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
