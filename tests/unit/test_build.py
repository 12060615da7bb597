"""Builds are skipped only when nothing that goes into them changed."""

from __future__ import annotations

import os

import pytest

from concordance_provider.build import (
    BuildError,
    build_component,
    inputs_digest,
    interface_dir,
)


def test_digest_is_the_same_from_a_relative_or_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "comp").mkdir()
    (tmp_path / "comp" / "app.py").write_text("x = 1\n")
    absolute = inputs_digest(tmp_path / "comp", "aggregate", interface_dir())
    monkeypatch.chdir(tmp_path)
    assert inputs_digest(type(tmp_path)("comp"), "aggregate", interface_dir()) == absolute


def test_digest_changes_with_the_source_and_the_world(tmp_path):
    (tmp_path / "app.py").write_text("x = 1\n")
    first = inputs_digest(tmp_path, "aggregate", interface_dir())
    assert inputs_digest(tmp_path, "process-manager", interface_dir()) != first
    (tmp_path / "app.py").write_text("x = 2\n")
    assert inputs_digest(tmp_path, "aggregate", interface_dir()) != first


def test_unknown_world_and_missing_module_are_refused(tmp_path):
    with pytest.raises(BuildError, match="unknown world 'projector'"):
        build_component(tmp_path, "projector", tmp_path / "out.wasm")
    with pytest.raises(BuildError, match="app.py does not exist"):
        build_component(tmp_path, "aggregate", tmp_path / "out.wasm")
    assert not os.path.exists(tmp_path / "out.wasm")
