"""The resolved config as commented YAML: `selfsup train METHOD --show-config`.

Each key's comment is the trailing ``# comment`` of its field in the dataclass that defines it (``config.py`` for the
run's sections, the method's params dataclass for ``METHOD.*``), read from the source with :mod:`tokenize`, so the
comments cannot drift from the code. A comment continued on the following comment-only lines (indented past the
field, as ``data.verify``'s) is joined; a field without a comment gets none. The printed text stays valid YAML:
``yaml.safe_load(commented_yaml(cfg)) == cfg.to_dict()``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize

import yaml

COMMENT_COLUMN_MAX = 60  # comments line up after the longest "key: value" up to this column, then follow it


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field name: comment}`` for the fields of dataclass ``cls`` that carry a ``# comment`` in its source."""
    try:
        source = inspect.getsource(inspect.getmodule(cls))
    except (OSError, TypeError):  # no source (a frozen app, a class made at run time): no comments, no error
        return {}
    node = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__),
                None)
    if node is None:
        return {}
    comments = _comments_by_line(source)
    lines = source.splitlines()
    out = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = _field_comment(stmt, comments, lines)
            if text:
                out[stmt.target.id] = text
    return out


def _comments_by_line(source: str) -> dict[int, tuple[int, str]]:
    """``{line number: (column, text without '#')}`` of every comment token."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string[1:].strip())
    return out


def _field_comment(stmt: ast.AnnAssign, comments: dict, lines: list[str]) -> str:
    """The comment trailing a field's last line, plus the comment-only lines right below it that are indented past
    the field (a continuation); a comment line at the field's own indentation belongs to the next field."""
    line = stmt.end_lineno or stmt.lineno
    if line not in comments:
        return ""
    parts = [comments[line][1]]
    nxt = line + 1
    while nxt in comments and lines[nxt - 1].strip().startswith("#") and comments[nxt][0] > stmt.col_offset:
        parts.append(comments[nxt][1])
        nxt += 1
    return " ".join(p for p in parts if p)


def config_comments(cfg) -> dict[str, str]:
    """``{dotted.key: comment}`` for every key of ``cfg`` (a :class:`selfsup.config.Config`) that has one."""
    out = _dataclass_comments(cfg, "")
    if cfg.params is not None:
        out.update(_dataclass_comments(cfg.params, f"{cfg.method}."))
    return out


def _dataclass_comments(obj, prefix: str) -> dict[str, str]:
    out = {}
    own = field_comments(type(obj))
    for f in dataclasses.fields(obj):
        if f.name == "params":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_dataclass_comments(value, f"{prefix}{f.name}."))
        if f.name in own:
            out[prefix + f.name] = own[f.name]
    return out


def commented_yaml(cfg) -> str:
    """``cfg.to_dict()`` as block YAML, each key followed by its comment, comments aligned."""
    rows = _rows(cfg.to_dict(), config_comments(cfg), "", 0)
    width = min(COMMENT_COLUMN_MAX, max((len(text) for text, comment in rows if comment), default=0))
    out = []
    for text, comment in rows:
        out.append(f"{text.ljust(width)}  # {comment}" if comment else text)
    return "\n".join(out) + "\n"


def _rows(tree: dict, comments: dict[str, str], prefix: str, depth: int) -> list[tuple[str, str]]:
    """``(line, comment)`` pairs: a section key then its indented keys; leaves as ``key: value`` in flow style."""
    rows = []
    indent = "  " * depth
    for key, value in tree.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and value:
            rows.append((f"{indent}{_scalar(key)}:", comments.get(dotted, "")))
            rows += _rows(value, comments, dotted + ".", depth + 1)
            continue
        line = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=1 << 30,
                              allow_unicode=True).strip()[1:-1]  # "{key: value}" -> "key: value"
        if "\n" in line:  # a value YAML cannot write on one line: leave it uncommented
            rows.append((indent + line.replace("\n", "\n" + indent), ""))
        else:
            rows.append((indent + line, comments.get(dotted, "")))
    return rows


def _scalar(key) -> str:
    return yaml.safe_dump(key, default_flow_style=True).removesuffix("\n...\n").strip()
