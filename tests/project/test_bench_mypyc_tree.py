"""bench/mypyc_tree.py's changes still fit the code they change (its README figures say what a
compiled build gains; the script must keep building one). Compiling takes minutes and a C
compiler, so only the patching is checked here, on copies of the four files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.mypyc_tree import MODULES, PATCHES, ROOT, patch


def test_each_change_finds_its_line_once_and_applies(tmp_path: Path) -> None:
    for name in PATCHES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    patch(tmp_path)
    for name, changes in PATCHES.items():
        text = (tmp_path / name).read_text(encoding="utf-8")
        for _, new in changes:
            assert new in text, (name, new)
        compile(text, name, "exec")  # still Python


def test_a_change_whose_line_is_gone_stops_the_build(tmp_path: Path) -> None:
    for name in PATCHES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# the code moved on\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="update PATCHES"):
        patch(tmp_path)


def test_the_modules_it_compiles_exist() -> None:
    assert all((ROOT / module).is_file() for module in MODULES)
    assert set(PATCHES) <= set(MODULES)
