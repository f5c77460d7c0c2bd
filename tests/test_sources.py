"""Resolving what the user typed (path, directory, config.json, hub id, 'demo') into files."""
from __future__ import annotations

from pathlib import Path

import pytest

from quantrt.errors import SourceError
from quantrt.sources import ModelSource, resolve_source
from tests.test_cli import Run, check_user_error, cli, snapshot, write_gguf


def _hf_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_gguf_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    assert resolve_source(str(path)) == ModelSource("gguf", path, str(path))


def test_gguf_file_recognised_by_magic_not_suffix(tmp_path):
    path = write_gguf(tmp_path / "model.bin")
    assert resolve_source(path).kind == "gguf"


def test_hf_directory_and_its_config_json(tmp_path):
    model = _hf_dir(tmp_path / "model")
    assert resolve_source(model) == ModelSource("hf_dir", model, str(model))
    assert resolve_source(model / "config.json").path == model


def test_directory_holding_one_gguf(tmp_path):
    path = write_gguf(tmp_path / "only.gguf")
    assert resolve_source(tmp_path) == ModelSource("gguf", path, str(tmp_path))


def test_config_json_wins_over_a_stray_gguf(tmp_path):
    model = _hf_dir(tmp_path / "model")
    write_gguf(model / "extra.gguf")
    assert resolve_source(model).kind == "hf_dir"


def test_directory_with_several_ggufs_names_them(tmp_path):
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(SourceError) as err:
        resolve_source(tmp_path)
    assert err.value.where == str(tmp_path)
    assert "a.gguf, b.gguf" in err.value.message and "pass one of them" in err.value.one_line()


@pytest.mark.parametrize("make, needle", [
    (lambda p: p, "no such file or directory"),
    (lambda p: p.mkdir() or p, "no config.json and no .gguf"),
    (lambda p: (p.write_text("plain text"), p)[1], "not a model file"),
])
def test_unusable_paths(tmp_path, make, needle):
    path = make(tmp_path / "thing")
    with pytest.raises(SourceError) as err:
        resolve_source(path)
    assert err.value.where == str(path) and needle in err.value.message


def test_a_weights_file_hints_at_its_directory(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(SourceError, match="pass the directory that holds it"):
        resolve_source(weights)


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("quantrt.sources._download_from_hub",
                        lambda repo: pytest.fail(f"{repo} was looked up on the hub"))
    with pytest.raises(SourceError) as err:
        resolve_source("models/typo")
    assert err.value.where == "models/typo" and "no such file" in err.value.message


def test_demo_resolves_to_the_cached_gguf(demo_gguf):
    src = resolve_source("demo")
    assert src.kind == "gguf" and src.path == Path(demo_gguf) and src.name == "demo"


def test_source_kind_is_checked():
    with pytest.raises(ValueError):
        ModelSource("pickle", Path("x"), "x")


# -- the hub, offline ----------------------------------------------------------------------
HUB_ID = "quantrt-test-org/no-such-model"


def test_hub_id_offline_is_a_source_error_naming_the_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # constants are read when huggingface_hub is first imported; patch them as well as
    # the environment so that the fresh, empty cache is the one looked in.
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SourceError) as err:
        resolve_source(HUB_ID)
    assert err.value.where == HUB_ID
    line = err.value.one_line()
    assert HUB_ID in line and "not in the local Hugging Face cache" in line
    assert "\n" not in line and "HF_HUB_OFFLINE" in line
    assert snapshot(tmp_path) == before


def test_hub_id_offline_via_the_cli(tmp_path):
    (tmp_path / "hf").mkdir()
    run = Run(["inspect", HUB_ID], HUB_ID, ("Hugging Face Hub", "not in the local"),
              env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, root=tmp_path)
    run.before = snapshot(tmp_path)
    run.proc = cli(*run.args, cwd=tmp_path, env=run.env)
    run.after = snapshot(tmp_path)
    check_user_error(run)
