"""The README and the documentation site: the catalog table is the registry's, links stay inside the repository,
and the MkDocs site builds with --strict (a broken link or an unrenderable docstring fails)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup.catalog_table import BEGIN, END, block_of, methods_markdown, replace_block
from selfsup.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["README.md", "docs/index.md"])
def test_catalog_table_is_the_registry(name):
    block = block_of((ROOT / name).read_text())
    assert block == methods_markdown(), f"{name}'s method table is stale: run `make readme`"
    for method in REGISTRY:  # every registered method has its row (a property of the generator, checked on the file)
        assert f"| `{method}` |" in block


def test_catalog_table_follows_the_registry(monkeypatch):
    from selfsup.methods.base import MethodEntry

    monkeypatch.setitem(REGISTRY, "zz_new", MethodEntry("zz_new", None, object, "pretext task", "§2.1", "a | b"))
    table = methods_markdown()
    assert "| `zz_new` | pretext task | a \\| b | §2.1 |" in table
    assert block_of((ROOT / "README.md").read_text()) != table  # a new method makes the README stale


def test_replace_block_round_trip_and_missing_markers():
    text = f"head\n{BEGIN}\nold\n{END}\ntail\n"
    new = replace_block(text, "| a |\n")
    assert new == f"head\n{BEGIN}\n| a |\n{END}\ntail\n" and block_of(new) == "| a |\n"
    with pytest.raises(ValueError, match="methods:begin"):
        replace_block("no markers", "x")


def test_readme_links_stay_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "the README points outside the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_readme_says_how_to_get_the_cpu_torch():
    text = (ROOT / "README.md").read_text()
    assert "whl/cpu" in text and "CUDA" in text


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_docs_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # no -q: with it, mkdocs 1.6 does not count warnings and --strict passes a broken link
    r = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "losses" / "index.html").read_text().count("nt_xent") > 0
