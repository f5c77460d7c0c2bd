"""Golden fixture checkpoints (tests/fixtures/, made by scripts/fixtures/ with the reference
libraries): finding them and reading what each holds."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_dirs(prefix: str) -> list[Path]:
    """Fixture directories whose MANIFEST.json name starts with ``prefix``.  The fixtures are
    committed, so an empty result is an error, not a skip."""
    names = json.loads((FIXTURES / "MANIFEST.json").read_text())["fixtures"]
    dirs = sorted(FIXTURES / n for n in names if n.startswith(prefix))
    if not dirs:
        raise FileNotFoundError(f"no fixtures named {prefix}* in {FIXTURES}/MANIFEST.json")
    return dirs


@dataclass
class Fixture:
    name: str
    tensors: dict[str, torch.Tensor]      # the checkpoint's tensors, every shard merged
    reference: dict[str, torch.Tensor]    # input_ids, logits, dequant.<module>
    quant_config: dict                    # config.json's quantization_config

    def dequant_refs(self) -> dict[str, torch.Tensor]:
        """{module name: the reference library's dequantized weight}."""
        return {k[len("dequant."):]: v for k, v in self.reference.items() if k.startswith("dequant.")}

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The module's tensors, keyed by the part of their name after ``module.``."""
        return {k[len(module) + 1:]: v for k, v in self.tensors.items() if k.startswith(module + ".")}


def load_fixture(d: Path) -> Fixture:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name != "reference.safetensors":
            tensors.update(load_file(f))
    qc = json.loads((d / "config.json").read_text()).get("quantization_config", {})
    return Fixture(d.name, tensors, load_file(d / "reference.safetensors"), qc)


def prompt_logits(lm, ids: list[int]) -> torch.Tensor:
    """Full-prompt logits [T, vocab] on the CPU (quantrt.eval's single prefill, no engine,
    so these tests isolate the weights)."""
    from quantrt.eval import prompt_logits as logits_on_device

    return logits_on_device(lm, ids).cpu()


# -- broken copies of fixtures (bad-checkpoint tests) ------------------------------------
def copy_fixture(tmp_path: Path, name: str) -> Path:
    import shutil

    dst = Path(tmp_path) / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_tensors(d: Path, fn) -> None:
    """Apply ``fn`` to the copy's tensors dict and write it back."""
    from safetensors.torch import load_file, save_file

    path = Path(d) / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def edit_config(d: Path, fn) -> None:
    """Apply ``fn`` to the copy's quantization settings (config.json and any
    quantize_config.json side file alike)."""
    path = Path(d) / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))
    side = Path(d) / "quantize_config.json"
    if side.exists():
        qc = json.loads(side.read_text())
        fn(qc)
        side.write_text(json.dumps(qc))


def cli_error(d: Path) -> str:
    """``quantrt inspect`` on a broken checkpoint: exit 2 with a one-line error, no traceback."""
    from click.testing import CliRunner

    from quantrt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(d), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


def assert_bad_checkpoint(tmp_path: Path, name: str, tensors_fn, config_fn, needles) -> str:
    """Break a copy of fixture ``name`` and check the error names what ``needles`` list."""
    d = copy_fixture(tmp_path, name)
    if tensors_fn:
        edit_tensors(d, tensors_fn)
    if config_fn:
        edit_config(d, config_fn)
    out = cli_error(d)
    for needle in needles:
        assert needle in out, out
    return out
