"""The catalog as a Markdown table, generated from the method registry so the README and the docs cannot go stale.

``python -m selfsup.catalog_table`` prints the table; ``python -m selfsup.catalog_table --write README.md
docs/index.md`` replaces the text between ``<!-- methods:begin -->`` and ``<!-- methods:end -->`` in each file
(``make readme`` runs it). ``tests/test_docs.py`` fails when a file's table differs from the registry's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"

# The cookbook's order of the families (§2.1-§2.5 as the catalog issues group them), then anything new.
FAMILY_ORDER = ["deep metric learning", "self-distillation", "canonical correlation", "masked image modeling",
                "pretext task"]


def methods_markdown() -> str:
    """One row per registered method: name, family, what it does, cookbook sections, its recipes."""
    from selfsup.config import recipe_names
    from selfsup.methods import REGISTRY

    def order(entry):
        rank = FAMILY_ORDER.index(entry.family) if entry.family in FAMILY_ORDER else len(FAMILY_ORDER)
        return rank, entry.family, entry.name

    rows = ["| method | family | what it learns from | cookbook | recipes |", "|---|---|---|---|---|"]
    for e in sorted(REGISTRY.values(), key=order):
        recipes = ", ".join(f"`{r}`" for r in recipe_names(e.name))
        summary = e.summary.replace("|", "\\|")
        rows.append(f"| `{e.name}` | {e.family} | {summary} | {e.cookbook} | {recipes} |")
    return "\n".join(rows) + "\n"


def replace_block(text: str, block: str, path: str = "file") -> str:
    """``text`` with the lines between the BEGIN and END markers replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to fill; add both markers where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def block_of(text: str) -> str:
    """The text between the markers (what ``replace_block`` wrote), or '' when a marker is missing."""
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].removeprefix("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfsup.catalog_table", description=__doc__.splitlines()[0])
    p.add_argument("--write", nargs="*", default=[], metavar="FILE", help="fill the marked block of each file")
    args = p.parse_args(argv)
    table = methods_markdown()
    if not args.write:
        sys.stdout.write(table)
    for name in args.write:
        path = Path(name)
        new = replace_block(path.read_text(), table, name)
        if new != path.read_text():
            path.write_text(new)
            print(f"updated {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
