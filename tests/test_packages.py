"""Every test directory is a package, so test files in different folders may share a basename
(pytest imports them by their dotted path, not by their file name alone)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_directory_is_a_package():
    folders = {p.parent for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(TESTS.parent)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"test folders without __init__.py: {missing}"


def test_modules_of_one_basename_in_two_folders_both_import():
    import importlib

    names = [p for p in TESTS.rglob("conftest.py")]
    assert len(names) > 1
    modules = {importlib.import_module(".".join(p.relative_to(TESTS.parent).with_suffix("").parts)) for p in names}
    assert len(modules) == len(names)
