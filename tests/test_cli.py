"""The ``quantrt`` CLI on bad input: one ``error:`` line naming the file, exit status 2,
no traceback, nothing written.  Each bad-input case runs the real CLI in a subprocess so
that the exit status, stderr and imports are the ones a user sees; since one that loads
torch costs seconds, the cases are declared up front (``@error``), then built and run
together on all cores by one fixture, and each test checks its finished run.  Loads that
get far (success, engine errors) run in-process, where torch is already imported."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.tiny_models import make_tiny_model

CLI = [sys.executable, "-m", "quantrt.cli"]
REPORT_KEYS = {"source", "format", "file_bytes", "config", "parameters", "quantization",
               "tensor_types", "device", "compute_dtype", "loaded_weight_bytes", "layers"}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Offline so that no case can wait on the network; cwd is the case's own directory so
    # that a stray write to the working directory shows up in its snapshot.
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*"))}


@dataclass
class Run:
    """One CLI invocation: what a case built, and what came of it."""

    args: list
    where: str | Path = ""             # what the error line must name
    needles: tuple[str, ...] = ()      # problem-specific substrings
    env: dict[str, str] = field(default_factory=dict)
    root: Path | None = None
    before: dict | None = None
    after: dict | None = None
    proc: subprocess.CompletedProcess | None = None


def check_user_error(run: Run) -> str:
    """The contract for bad input; returns the error line."""
    proc = run.proc
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][7:].strip(), output
    line = lines[0]
    assert str(run.where) in line, f"{run.where} not named in: {line}"
    for needle in run.needles:
        assert needle in line, f"{needle!r} not in: {line}"
    assert proc.stdout == "", output
    assert run.after == run.before, "the CLI wrote into the directory"
    return line


# -- inputs ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def copy_model(tiny: Path, root: Path) -> Path:
    """A private copy of the tiny model, free to corrupt."""
    return Path(shutil.copytree(tiny, root / "model"))


def edit_config(model: Path, **changes) -> Path:
    """Apply ``changes`` to config.json; a None value deletes the key."""
    path = model / "config.json"
    cfg = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


def write_gguf(path: Path) -> Path:
    """A small but self-consistent llama GGUF (one layer's worth of metadata, two tensors)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64),
                       (w.add_embedding_length, 32), (w.add_feed_forward_length, 64),
                       (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, [f"t{i}" for i in range(16)])]:
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((16, 32), dtype=np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return path


def tensor_info_offset_pos(data: bytes, name: str, n_dims: int = 2) -> int:
    """Byte position of a tensor's data-offset field in its GGUF tensor info."""
    encoded = name.encode()
    start = data.index(len(encoded).to_bytes(8, "little") + encoded) + 8 + len(encoded)
    return start + 4 + 8 * n_dims + 4  # n_dims, dims, ggml type


# -- the cases -----------------------------------------------------------------------------
# A builder gets its own empty directory, the tiny model and the demo GGUF; returns the Run.
Builder = Callable[[Path, Path, Path], Run]
ERRORS: dict[str, Builder] = {}


def error(name: str) -> Callable[[Builder], Builder]:
    return lambda fn: ERRORS.setdefault(name, fn)


# sources
error("missing-path")(lambda root, tiny, demo: Run(
    ["inspect", root / "no-such-model"], root / "no-such-model", ("no such file",)))
error("run-missing-path")(lambda root, tiny, demo: Run(
    ["run", root / "nope.gguf", "-p", "hi"], root / "nope.gguf", ("no such file",)))


@error("dir-without-model")
def _(root, tiny, demo):
    (root / "notes").mkdir()
    return Run(["inspect", root / "notes"], root / "notes", ("no config.json and no .gguf",))


@error("random-text-file")
def _(root, tiny, demo):
    (root / "notes.txt").write_text("hello, I am not a model\n" * 10)
    return Run(["inspect", root / "notes.txt"], root / "notes.txt", ("not a model file",))


# safetensors
def _weights(corrupt: Callable[[bytes], bytes], needle: str) -> Builder:
    def build(root, tiny, demo):
        weights = copy_model(tiny, root) / "model.safetensors"
        weights.write_bytes(corrupt(weights.read_bytes()))
        return Run(["inspect", weights.parent], weights, (needle,))
    return build


def _header(header: bytes) -> Callable[[bytes], bytes]:
    return lambda data: len(header).to_bytes(8, "little") + header + b"\0" * 64


error("safetensors-truncated")(_weights(lambda d: d[: len(d) // 2], "truncated"))
error("safetensors-absurd-header-length")(_weights(
    lambda d: (2**62).to_bytes(8, "little") + d[8:], "header length"))
error("safetensors-header-not-json")(_weights(_header(b"\xff\xfe{not json}"), "not valid JSON"))
error("safetensors-header-a-list")(_weights(_header(b'["a", "list"]'), "not an object"))
error("safetensors-header-bad-dtype")(_weights(_header(
    b'{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}'), "unknown dtype 'F99'"))


def _edit_tensors(model: Path, edit: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights


@error("checkpoint-missing-tensor")
def _(root, tiny, demo):
    model = copy_model(tiny, root)
    _edit_tensors(model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    # up_proj is loaded into a fused gate_up_proj: the message must use the checkpoint's name.
    return Run(["inspect", model], model, ("lacks", "model.layers.1.mlp.up_proj.weight"))


@error("checkpoint-wrong-shape")
def _(root, tiny, demo):
    import torch

    model = copy_model(tiny, root)
    weights = _edit_tensors(model, lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}))
    return Run(["inspect", model], weights, ("model.layers.0.mlp.up_proj.weight", "shape"))


# GGUF
def _corrupt_gguf(corrupt: Callable[[bytearray], bytes], *needles: str) -> Builder:
    def build(root, tiny, demo):
        path = write_gguf(root / "m.gguf")
        path.write_bytes(bytes(corrupt(bytearray(path.read_bytes()))))
        return Run(["inspect", path], path, needles)
    return build


def _offset_past_end(data: bytearray) -> bytes:
    pos = tensor_info_offset_pos(bytes(data), "output.weight")
    data[pos:pos + 8] = (1 << 30).to_bytes(8, "little")  # aligned, far beyond the file
    return data


error("gguf-bad-magic")(_corrupt_gguf(lambda d: b"GGUX" + d[4:], "bad magic"))
error("gguf-absurd-tensor-count")(_corrupt_gguf(
    lambda d: d[:8] + (2**40).to_bytes(8, "little") + d[16:], "absurd tensor_count"))
error("gguf-offset-past-end")(_corrupt_gguf(_offset_past_end, "truncated", "'output.weight'"))
error("gguf-truncated")(_corrupt_gguf(lambda d: d[:-100], "truncated", "'output.weight'"))
# A sound file without the layers' tensors: they are named as the GGUF names them.
error("gguf-missing-tensors")(_corrupt_gguf(lambda d: d, "lacks", "blk.0.attn_q.weight"))


@error("demo-gguf-truncated")
def _(root, tiny, demo):
    path = root / demo.name
    with open(demo, "rb") as src:
        path.write_bytes(src.read(1 << 20))
    return Run(["inspect", path], path, ("tokenizer.ggml.merges", "more than the remaining"))


@error("gguf-quantization-contradiction")
def _(root, tiny, demo):
    path = write_gguf(root / "m.gguf")
    return Run(["inspect", path, "--quantization", "awq"], path, ("contradicts", "gguf"))


# config.json
def _config(changes: dict, *needles: str) -> Builder:
    def build(root, tiny, demo):
        model = copy_model(tiny, root)
        return Run(["inspect", model], edit_config(model, **changes), needles)
    return build


error("config-unknown-arch")(_config({"architectures": ["FooForCausalLM"]},
                                     "unsupported architecture FooForCausalLM"))
error("config-unknown-quant")(_config({"quantization_config": {"quant_method": "foo"}},
                                      "unknown quantization method 'foo'"))
error("config-unsupported-quant")(_config({"quantization_config": {"quant_method": "aqlm"}},
                                          "'aqlm'", "not supported"))
error("config-quant-without-method")(_config({"quantization_config": {"bits": 4}},
                                             "no 'quant_method'"))
error("config-missing-key")(_config({"num_hidden_layers": None},
                                    "missing the key 'num_hidden_layers'"))
error("config-bad-int")(_config({"hidden_size": "seventy-two"}, "'hidden_size' must be an integer"))
error("config-zero-heads")(_config({"num_attention_heads": 0}, "num_heads must be a positive"))
error("config-bad-rope")(_config({"rope_parameters": {"rope_type": "weird", "rope_theta": 1e4}},
                                 "'weird'"))


def _raw_config(raw: bytes, needle: str) -> Builder:
    def build(root, tiny, demo):
        model = copy_model(tiny, root)
        (model / "config.json").write_bytes(raw)
        return Run(["inspect", model], model / "config.json", (needle,))
    return build


error("config-malformed-json")(_raw_config(b'{"architectures": ["LlamaForCausalLM"],',
                                           "not valid JSON"))
error("config-not-an-object")(_raw_config(b'["LlamaForCausalLM"]', "JSON object"))
error("config-not-utf8")(_raw_config(b"\xff\xfe{}", "UTF-8"))


@error("quant-side-file-malformed")
def _(root, tiny, demo):
    model = copy_model(tiny, root)
    side = model / "quantize_config.json"
    side.write_text('{"bits": 4, "group_size": 128')
    return Run(["inspect", model], side, ("not valid JSON",))


# options
def _options(command: str, *flags: str, needles: tuple[str, ...]) -> Builder:
    def build(root, tiny, demo):
        model = copy_model(tiny, root)
        extra = ["-p", "hi"] if command == "run" else []
        return Run([command, model, *extra, *flags], model, needles)
    return build


error("flag-quantization-contradicts")(_options(
    "inspect", "--quantization", "awq", needles=("--quantization awq contradicts", "unquantized")))
error("flag-quantization-unknown")(_options(
    "inspect", "-q", "foo", needles=("unknown quantization method 'foo'",)))
error("flag-device-unknown")(_options("inspect", "--device", "foo",
                                      needles=("unsupported device 'foo'",)))
error("flag-device-absent")(_options("inspect", "--device", "cuda:99", needles=("'cuda:99'",)))
error("run-temperature-nan")(_options("run", "--temperature", "nan",
                                      needles=("--temperature must be a finite number",)))
error("run-temperature-inf")(_options("run", "-t", "inf",
                                      needles=("--temperature must be a finite number",)))
error("run-top-p-nan")(_options("run", "--top-p", "nan", needles=("--top-p must be in (0, 1]",)))
error("run-system-without-chat")(_options("run", "--system", "be brief",
                                          needles=("--system only applies with --chat",)))


@pytest.fixture(scope="module")
def runs(tiny_model, demo_gguf, tmp_path_factory) -> dict[str, Run]:
    """Build every case, then run them all, a few at a time."""
    built = {}
    for name, build in ERRORS.items():
        root = tmp_path_factory.mktemp(name)
        built[name] = run = build(root, tiny_model, Path(demo_gguf))
        run.root, run.before = root, snapshot(root)

    def go(run: Run) -> None:
        run.proc = cli(*run.args, cwd=run.root, env=run.env)
        run.after = snapshot(run.root)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        list(pool.map(go, built.values()))
    return built


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_gets_one_clean_error_line(runs, name):
    check_user_error(runs[name])


def test_huge_seed_is_a_usage_error(tiny_model, tmp_path):
    # click's own range check: exit 2 with its usage message, no traceback.
    proc = cli("run", tiny_model, "-p", "hi", "--seed", str(2**64), cwd=tmp_path)
    assert proc.returncode == 2 and "--seed" in proc.stderr and "Traceback" not in proc.stderr


# -- in-process: loads that succeed (or fail late) -----------------------------------------
def _in_process(tiny: Path, root: Path, command: str, *args: str) -> Run:
    from click.testing import CliRunner

    from quantrt.cli import main

    model = copy_model(tiny, root)
    run = Run([command, model, *args], model, root=root, before=snapshot(root))
    result = CliRunner().invoke(main, list(map(str, run.args)))
    # CliRunner turns an escaped exception into exit code 1; show it in the failure.
    escaped = repr(result.exception) if result.exit_code not in (0, 2) else ""
    run.proc = subprocess.CompletedProcess(run.args, result.exit_code, result.stdout,
                                           result.stderr + escaped)
    run.after = snapshot(root)
    return run


def _succeeded(run: Run) -> subprocess.CompletedProcess:
    assert run.proc.returncode == 0 and run.after == run.before, run.proc.stdout + run.proc.stderr
    return run.proc


def test_inspect_succeeds(tiny_model, tmp_path):
    proc = _succeeded(_in_process(tiny_model, tmp_path, "inspect", "--device", "cpu"))
    assert "LlamaForCausalLM" in proc.stdout and "quantization  none" in proc.stdout
    assert proc.stderr == ""


def test_inspect_json_parses_with_the_report_keys(tiny_model, tmp_path):
    proc = _succeeded(_in_process(tiny_model, tmp_path, "inspect", "--device", "cpu", "--json"))
    report = json.loads(proc.stdout)
    assert set(report) == REPORT_KEYS
    assert report["format"] == "hf_dir" and report["quantization"]["method"] == "none"
    assert report["config"]["architecture"] == "LlamaForCausalLM"
    assert report["config"]["layers"] == 2 and report["device"] == "cpu"
    assert report["parameters"] > 0 and report["layers"]


def test_run_succeeds(tiny_model, tmp_path):
    proc = _succeeded(_in_process(tiny_model, tmp_path, "run", "-p", "hello", "-n", "4", "-t", "0",
                                  "--seed", "1", "--device", "cpu", "--stats"))
    assert proc.stdout.endswith("\n") and len(proc.stdout) > 1
    assert "4 tokens generated" in proc.stderr and "finish: length" in proc.stderr


def test_prompt_longer_than_the_context_names_the_model(tiny_model, tmp_path):
    # Raised by the engine after loading, without a file: the CLI adds the model's name.
    run = _in_process(tiny_model, tmp_path, "run", "--device", "cpu", "-p", "x" * 600)
    run.needles = ("context limit",)
    check_user_error(run)


def test_error_paths_do_not_import_torch(tiny_model, tmp_path):
    """Header and config checks answer before torch's multi-second import."""
    bad_gguf = write_gguf(tmp_path / "m.gguf")
    bad_gguf.write_bytes(b"GGUX" + bad_gguf.read_bytes()[4:])
    truncated = copy_model(tiny_model, tmp_path)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = ("import sys\nfrom quantrt.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    for target in (bad_gguf, truncated, tmp_path / "missing"):
        proc = subprocess.run([sys.executable, "-c", code, "inspect", str(target)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
