"""GPTQ and AWQ (our implementations): each beats round-to-nearest on the error it
minimises, and calibrated conversions write checkpoints that load back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantrt.convert import ConvertRequest, convert
from quantrt.convert.awq_algo import awq_layer, fake_quant, search_scale
from quantrt.convert.gptq_algo import gptq_quantize
from quantrt.convert.intq import rtn
from quantrt.errors import ConfigError
from quantrt.loader import load
from tests.fixture_util import prompt_logits
from tests.tiny_models import make_tiny_model, save_bpe_tokenizer


def _inputs(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few large channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("act_order,sym", [(False, True), (True, False)])
def test_gptq_beats_rtn_on_the_layer_output(act_order, sym):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    x = _inputs(512, 128)
    h = 2 * x.t() @ x / x.shape[0]
    iw = gptq_quantize(w, h, 4, 32, sym, act_order=act_order)
    err_gptq = (x @ (iw.dequantize() - w).t()).pow(2).mean()
    err_rtn = (x @ (rtn(w, 4, 32, sym).dequantize() - w).t()).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn
    assert iw.q.min() >= 0 and iw.q.max() <= 15
    if act_order:
        # g_idx: every group holds exactly group_size original columns
        assert torch.bincount(iw.g_idx.long()).tolist() == [32] * 4
        assert not torch.equal(iw.g_idx.long(), torch.arange(128) // 32)
    else:
        assert iw.g_idx is None


def test_gptq_handles_a_partial_last_group_and_dead_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 80, generator=g)
    x = _inputs(256, 80)
    x[:, 5] = 0  # a dead input channel: zero weight, no NaN
    iw = gptq_quantize(w, 2 * x.t() @ x / 256, 3, 32, False)
    assert iw.scales.shape == (3, 16) and torch.isfinite(iw.dequantize()).all()


def test_awq_scale_search_never_loses_to_rtn():
    g = torch.Generator().manual_seed(3)
    x = _inputs(256, 128)
    w = torch.randn(64, 128, generator=g)
    s = search_scale(x, [w], 4, 32, torch.float16)
    awq = fake_quant(w * s, 4, 32, torch.float16) / s
    plain = fake_quant(w, 4, 32, torch.float16)
    assert (x @ (awq - w).t()).pow(2).mean() < (x @ (plain - w).t()).pow(2).mean()


def test_awq_layer_folds_scales_exactly():
    """Scaling norm and v/up rows down and the next linears' columns up leaves the float
    layer's function unchanged (up to clipping, which this test turns off)."""
    import transformers

    from quantrt.convert import awq_algo

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=1, vocab_size=10)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.add_(torch.rand(64))
    x = torch.randn(2, 8, 64)
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    pe = rot(x, torch.arange(8)[None])
    before = layer(x, position_embeddings=pe)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    mods = dict(layer.named_modules())
    inputs = {n: torch.randn(64, mods[n].in_features).abs() for n in names}
    orig_clip = awq_algo.search_clip
    awq_algo.search_clip = lambda x, w, *a, **k: w
    try:
        awq_layer(layer, inputs, 4, 32, torch.float16)
    finally:
        awq_algo.search_clip = orig_clip
    assert torch.allclose(layer(x, position_embeddings=pe), before, atol=1e-4)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("cal") / "src", hidden_size=64,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    save_bpe_tokenizer(path)
    return path


@pytest.mark.parametrize("method,kw", [
    ("gptq", dict(act_order=True, sym=False, bits=4)),
    ("awq", {}),
])
def test_calibrated_conversion_loads(src, tmp_path, method, kw):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    convert(str(src), out, ConvertRequest(method, group_size=32, calib=str(calib),
                                          calib_samples=4, calib_seqlen=32, **kw),
            progress=False)
    ids = list(range(5, 40))
    ref = prompt_logits(load(str(src), device="cpu", progress=False), ids)
    got = prompt_logits(load(str(out), device="cpu", progress=False), ids)
    assert (got - ref).abs().max() / ref.abs().max() < 0.3


def test_calibration_text_errors(src, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        ConvertRequest("gptq", calib=str(empty))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="fewer than one sample"):
        convert(str(src), tmp_path / "o", ConvertRequest("gptq", calib=str(short)),
                progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("k,g", [(80, 32), (23, 8), (17, 17)])
def test_awq_clip_searches_each_group_at_its_own_width(k, g):
    """A partial last group (K = 576, g = 128 on SmolLM2) is clipped as a group of K % g
    columns, and the full groups independently of it -- not the whole row as one group."""
    from quantrt.convert.awq_algo import search_clip

    gen = torch.Generator().manual_seed(4)
    x = _inputs(64, 4 * k)[:, :k] + 0.1
    w = torch.randn(8, k, generator=gen)
    got = search_clip(x, w, 4, g, torch.float16)
    full = k - k % g
    if full:
        assert torch.equal(got[:, :full], search_clip(x[:, :full], w[:, :full], 4, g,
                                                      torch.float16))
    if k % g:
        assert torch.equal(got[:, full:], search_clip(x[:, full:], w[:, full:], 4, k % g,
                                                      torch.float16))


@pytest.mark.parametrize("g", [17, 23, 32])
def test_awq_clip_reaches_below_half_the_range(g):
    """One outlier weight per group on a column whose input is ~0: clipping it to the
    other weights' range is best, and the grid goes deep enough (0.2 of |w|max) to get
    close -- AutoAWQ's floor of 0.55 stops at about half the range."""
    from quantrt.convert.awq_algo import CLIP_MIN, search_clip

    gen = torch.Generator().manual_seed(g)
    x = torch.randn(256, g, generator=gen)
    x[:, 0] *= 1e-3
    w = torch.rand(16, g, generator=gen) * 2 - 1  # |w| < 1, and one outlier of 4
    w[:, 0] = 4.0
    got = search_clip(x, w, 4, g, torch.float16)
    shrink = got.abs().amax(dim=1) / 4.0
    assert CLIP_MIN <= 0.3 and (shrink < 0.5).all() and (shrink >= CLIP_MIN - 1e-6).all()
    err = lambda v: (x @ (fake_quant(v, 4, g, torch.float16) - w).t()).pow(2).mean()
    assert err(got) < 0.25 * err(w)  # the 0.5 floor: 0.31-0.34


@pytest.mark.parametrize("g", [17, 23, 32])
def test_awq_clip_refines_each_end_of_the_range_alone(g):
    """An outlier of +4 on a column whose input is ~0 and a -2 that matters: the best
    range clips the top alone.  One shrink of both ends (the joint search) must also cut
    the -2 or keep the +4; refining each end alone keeps the -2 and drops the +4, and
    beats the best joint shrink on every row's output error."""
    from quantrt.convert.awq_algo import CLIP_GRID, CLIP_MIN, search_clip

    gen = torch.Generator().manual_seed(100 + g)
    x = torch.randn(300, g, generator=gen)
    x[:, 0] *= 1e-3
    x[:, 1] *= 5
    w = (torch.rand(16, g, generator=gen) * 2 - 1) * 0.5  # |w| < 0.5 but two columns
    w[:, 0], w[:, 1] = 4.0, -2.0
    got = search_clip(x, w, 4, g, torch.float16)
    # one ratio for both ends keeping the bottom at <= -1.9 keeps the top at >= 1.9
    assert (got[:, 1] <= -1.9).all() and (got[:, 0] < 1.5).all()

    def err(v):  # output error per row of the quantized v
        return (x @ (fake_quant(v, 4, g, torch.float16) - w).t()).pow(2).mean(dim=0)
    joint = torch.stack([err(w.clamp(-m, m)) for m in
                         [4.0 * (1 - (1 - CLIP_MIN) * i / CLIP_GRID)
                          for i in range(CLIP_GRID + 1)]]).amin(dim=0)
    ratio = err(got) / joint
    assert (ratio < 0.85).all() and ratio.mean() < 0.6


def test_gptq_partial_forward_collects_the_full_forward_hessians():
    """Stopping the layer's forward once q/k/v have run, and one X^T X for the three
    linears that share the input, give the Hessians of the full forward."""
    import transformers

    from quantrt.convert.calibrated import _Collector, _forward

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=1, vocab_size=10)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, 0).eval()
    x = torch.randn(5, 17, 32)  # 5 sequences: two batches of 4 and 1
    pe = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)(
        x, torch.arange(17)[None])
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    with torch.no_grad():
        full = _Collector(layer, names, "gptq", 0)
        assert _forward(layer, x, pe) is not None
        stopped = _Collector(layer, names, "gptq", 0, stop=True)
        ref = full.result()
        assert _forward(layer, x, pe) is None
        xx = layer.input_layernorm(x).reshape(-1, 32)  # what q/k/v read
    got = stopped.result()
    for n in names:
        assert torch.allclose(got[n], ref[n]) and torch.allclose(got[n], 2 * xx.t() @ xx / 85)


def test_overlapping_calibration_windows_warn(src, capsys):
    from quantrt.convert.calibrated import calib_ids
    from quantrt.convert.source import open_source

    ids = calib_ids(ConvertRequest("gptq", calib_samples=512, calib_seqlen=64), open_source(src))
    assert ids.shape[1] == 64
    assert "samples overlap" in capsys.readouterr().err


def test_awq_switches_clip_only_and_clip_qk():
    """--no-awq-scales leaves the norms (and every fold target) untouched and only clips;
    --awq-clip-qk clips q/k as well, which are left as they are by default."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=1, vocab_size=10)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

    def run(**kw):
        torch.manual_seed(5)
        layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(cfg, 0).eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        mods = dict(layer.named_modules())
        inputs = {n: _inputs(128, 4 * mods[n].in_features, seed=6)[:, :mods[n].in_features]
                  for n in names}
        awq_layer(layer, inputs, 4, 32, torch.float16, **kw)
        after = layer.state_dict()
        return {k: not torch.equal(before[k], after[k]) for k in before}

    default, clip_only, clip_qk = run(), run(scales=False), run(scales=False, clip_qk=True)
    assert default["input_layernorm.weight"] and default["post_attention_layernorm.weight"]
    assert not any(clip_only[k] for k in clip_only if "norm" in k)
    assert not clip_only["self_attn.q_proj.weight"] and not clip_only["self_attn.k_proj.weight"]
    assert clip_only["self_attn.v_proj.weight"] and clip_only["mlp.down_proj.weight"]
    assert clip_qk["self_attn.q_proj.weight"] and clip_qk["self_attn.k_proj.weight"]


@pytest.mark.parametrize("method,kw", [("awq", {}), ("gptq", dict(algo="awq", bits=3, sym=False)),
                                       ("ct-w4a16", dict(algo="awq", sym=False))])
def test_awq_defaults_are_clip_only_with_qk_clipped(method, kw):
    """The recipe that measured best on the demo model (BENCHMARKS.md, "Convert: quality")
    is what an AWQ run gets unless it asks for the published one."""
    req = ConvertRequest(method, **kw)
    assert req.algo == "awq" and req.awq_scales is False and req.awq_clip_qk is True
    req = ConvertRequest(method, awq_scales=True, awq_clip_qk=False, **kw)
    assert req.awq_scales is True and req.awq_clip_qk is False


@pytest.mark.parametrize("method,algo", [("gptq", None), ("gptq", "rtn"), ("awq", "rtn"),
                                         ("ct-w4a16", None), ("fp8", None)])
def test_awq_switches_left_unset_do_not_bother_other_algorithms(method, algo):
    req = ConvertRequest(method, algo=algo)
    assert req.algo != "awq"


@pytest.mark.parametrize("kw,flags", [
    (dict(awq_scales=True), "--awq-scales only applies"),
    (dict(awq_scales=False), "--no-awq-scales only applies"),
    (dict(awq_clip_qk=False), "--no-awq-clip-qk only applies"),
    (dict(awq_clip_qk=True), "--awq-clip-qk only applies"),
    (dict(awq_scales=True, awq_clip_qk=False), "--awq-scales and --no-awq-clip-qk only apply"),
])
@pytest.mark.parametrize("method,algo", [("gptq", None), ("awq", "rtn"), ("ct-w8a16", "gptq")])
def test_awq_switches_given_to_another_algorithm_are_refused(method, algo, kw, flags):
    with pytest.raises(ConfigError, match=flags + " to the AWQ algorithm") as e:
        ConvertRequest(method, algo=algo, **kw)
    assert "--algo awq" in str(e.value) and "\n" not in str(e.value)


def test_published_awq_recipe_still_runs_and_differs(src, tmp_path):
    """Default (clip only, q/k clipped): the norms are the source's and q/k are clipped.
    Published (--awq-scales --no-awq-clip-qk): scales are folded into the norms, and q/k
    are only rounded.  Both load and stay close to the source model."""
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    base = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}
    ids = list(range(5, 40))
    ref = prompt_logits(load(str(src), device="cpu", progress=False), ids)
    got, logits = {}, {}
    for name, kw in [("default", {}), ("published", dict(awq_scales=True, awq_clip_qk=False))]:
        out = tmp_path / name
        convert(str(src), out, ConvertRequest("awq", group_size=32, calib=str(calib),
                                              calib_samples=4, calib_seqlen=32, **kw),
                progress=False)
        got[name] = load_file(str(out / "model.safetensors"))
        logits[name] = prompt_logits(load(str(out), device="cpu", progress=False), ids)
        assert (logits[name] - ref).abs().max() / ref.abs().max() < 0.3
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(got["default"][norm].float(), base[norm].half().float())
    assert not torch.equal(got["published"][norm].float(), base[norm].half().float())
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"):
        key = f"model.layers.0.{proj}.qweight"
        assert not torch.equal(got["default"][key], got["published"][key]), key
    assert not torch.equal(logits["default"], logits["published"])
