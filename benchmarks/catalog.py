"""The catalog benchmark: train methods with their Fashion-MNIST recipes, evaluate them the same way, and write one
Markdown table (kNN, linear, MLP probe, RankMe, minutes, date, commit, CPU or GPU model) into the docs.

Each run is a plain ``selfsup train METHOD recipe=RECIPE`` (training + the standard evaluation); minutes are measured
around the whole command. A run directory whose ``summary.json`` holds the evaluation is reused, not retrained (one
with checkpoints but no evaluation resumes with ``resume=auto``), so a long
list can be resumed and rows can be produced one at a time (``--runs``). Not a test: each run takes 10-60 minutes on
a 2-core CPU. Time nothing else on the same cores.

``--jobs N`` trains N runs at once (each run's output goes to its ``train.log``): for a GPU, where one small run
leaves the card mostly idle. Their minutes are then the cost of sharing the card with N-1 others, and the machine
column names the GPU (``torch.cuda.get_device_name``) instead of the CPU when the runs used CUDA.

    python benchmarks/catalog.py --runs simclr:default moco_v2:default vicreg:default [--out runs/catalog]
        [--table docs/results/fashion_mnist.md] [--threads 0] [--jobs 1] [-- extra overrides for every run]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from selfsup.runtime import cpu_model  # noqa: E402

FLOORS = {"knn_top1": 86.2, "linear_top1": 84.5}  # pixel floors on Fashion-MNIST (DESIGN.md §4)
COLUMNS = ["method", "recipe", "kNN", "linear", "MLP", "fine-tune", "RankMe", "minutes", "epochs", "date", "commit",
           "machine"]
# the fine-tune column (a run's eval.finetune top-1, "–" without one) came after the first rows: a table written
# before it is read with "–" there
LEGACY_COLUMNS = [c for c in COLUMNS if c != "fine-tune"]
# the table's numbers as the package ships them (the wheel has no docs/): selfsup.evaluate.baselines reads them to
# show a run of a shipped recipe what its reference run measured
REFERENCE = HERE.parent / "src" / "selfsup" / "recipes" / "reference.json"
# computed when the table is written, not stored: the share of the way from the pixel floor to the supervised
# ceiling (`selfsup train supervised` with the row's recipe name: same backbone, data, views and compute) that the
# row's kNN / linear accuracy covers, (row - floor) / (supervised - floor); "–" without a supervised row of that recipe
DERIVED = ["kNN gap closed", "linear gap closed"]
CEILING = "supervised"
NUMERIC = {"kNN": "knn_top1", "linear": "linear_top1", "MLP": "mlp_top1", "fine-tune": "finetune_top1",
           "RankMe": "rankme", "minutes": "minutes", "epochs": "epochs"}


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); $SELFSUP_COMMIT names it for an exported copy."""
    if os.environ.get("SELFSUP_COMMIT"):
        return os.environ["SELFSUP_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(summary: dict) -> str:
    """The CPU model, or the GPU's name for a run that trained on CUDA."""
    if str(summary.get("device", "cpu")).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_model()


def run(method: str, recipe: str, out: Path, extra: list[str], log: Path | None = None) -> dict:
    """Train (unless ``out`` holds a finished run) and return the summary with ``wall_minutes``.

    ``log``: a file for the run's output (parallel runs), else this process's stdout."""
    done = out / "summary.json"
    if not (done.exists() and "eval_seconds" in json.loads(done.read_text())):  # trained and evaluated
        extra = [*extra, "resume=auto"] if (out / "checkpoints").exists() else extra  # a stopped run goes on
        cmd = [sys.executable, "-m", "selfsup", "train", method, f"recipe={recipe}", f"out={out}", *extra]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        if log is None:
            subprocess.run(cmd, check=True)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
        wall = (time.time() - t0) / 60
        s = json.loads(done.read_text())
        if len(s.get("segments", [])) > 1:  # resumed: this command's wall time misses the earlier segments
            wall = (s["train_seconds"] + s.get("eval_seconds", 0)) / 60
        s.update(wall_minutes=round(wall, 1), date=datetime.date.today().isoformat(), commit=commit(),
                 cpu=machine(s))
        done.write_text(json.dumps(s, indent=1))
    return json.loads(done.read_text())


def cell(s: dict, key: str) -> str:
    v = s.get(key)
    if v is None:
        return "–"
    mark = "" if key not in FLOORS or v >= FLOORS[key] else " ✗"  # below the pixel floor
    return f"{v:.2f}{mark}" if isinstance(v, float) else f"{v}{mark}"


def epochs_cell(s: dict) -> str:
    """Epochs trained, to 2 decimals (a budgeted run may end inside an epoch: 1.6, not 1.6010672)."""
    v = s.get("epochs_done", s.get("epochs"))
    return "?" if v is None else f"{round(float(v), 2):g}"


def row(s: dict) -> list[str]:
    minutes = s.get("wall_minutes") or round(s.get("total_seconds", 0) / 60, 1)
    return [s["method"], s.get("recipe", "?"), cell(s, "knn_top1"), cell(s, "linear_top1"), cell(s, "mlp_top1"),
            cell(s, "finetune_top1"), cell(s, "rankme"), f"{minutes:g}", epochs_cell(s), s.get("date", "?"),
            s.get("commit", "?"), s.get("cpu", "?")]


def write_table(rows: list[list[str]], path: Path, reference: Path | None = None) -> None:
    """Merge ``rows`` into the Markdown table at ``path`` (a row per method:recipe; the newest run wins); with
    ``reference``, rewrite that reference.json from the merged table too (``tests/test_catalog_bench.py`` checks
    that the shipped one equals docs/results/fashion_mnist.md)."""
    begin, end = "<!-- catalog-table:begin -->", "<!-- catalog-table:end -->"
    text = path.read_text() if path.exists() else f"# Fashion-MNIST results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    old, tail = rest.split(end, 1)
    table = {key: [cells[c] for c in COLUMNS] for key, cells in _rows(old).items()}
    for r in rows:
        table[(r[0], r[1])] = r
    header = [*COLUMNS, *DERIVED]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([*r, *gap_cells(r, table)]) + " |" for _, r in sorted(table.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    if reference is not None:
        write_reference(path, reference)


def _number(text: str) -> float | None:
    """A table cell as a number: "83.21 ✗" -> 83.21 (the floor mark dropped), "–" -> None."""
    text = text.replace("✗", "").strip()
    return None if text in ("", "–", "-", "?") else float(text)


def parse_table(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """The rows between the catalog markers of a results page: ``{(method, recipe): {column: cell}}``."""
    begin, end = "<!-- catalog-table:begin -->", "<!-- catalog-table:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no catalog table (between {begin} and {end}) in the results page")
    return _rows(text.split(begin, 1)[1].split(end, 1)[0])


def _rows(body: str) -> dict[tuple[str, str], dict[str, str]]:
    """The stored columns of each row of a table body (header and separator first); the derived gap columns, and
    their absence in tables written before them, are ignored; a row written before the fine-tune column reads "–"
    there."""
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for columns in (COLUMNS, LEGACY_COLUMNS):
            if len(cells) in (len(columns), len(columns) + len(DERIVED)):
                rows[(cells[0], cells[1])] = {"fine-tune": "–", **dict(zip(columns, cells[:len(columns)], strict=True))}
                break
    return rows


def gap_closed(value: float | None, floor: float, ceiling: float | None) -> float | None:
    """(value - floor) / (ceiling - floor): 0 at the pixel floor, 1 at the supervised ceiling (negative below the
    floor); None when a number is missing or the ceiling does not clear the floor."""
    if value is None or ceiling is None or ceiling <= floor:
        return None
    return (value - floor) / (ceiling - floor)


def gap_cells(r: list[str], table: dict[tuple[str, str], list[str]]) -> list[str]:
    """The derived cells of row ``r``: its gap closed for kNN and linear against the supervised row of its recipe."""
    ceiling = table.get((CEILING, r[1]))
    if r[0] == CEILING:
        return ["ceiling", "ceiling"]
    out = []
    for col, key in (("kNN", "knn_top1"), ("linear", "linear_top1")):
        i = COLUMNS.index(col)
        g = gap_closed(_number(r[i]), FLOORS[key], None if ceiling is None else _number(ceiling[i]))
        out.append("–" if g is None else f"{100 * g:.0f}%")
    return out


def reference_entries(text: str) -> dict[str, dict]:
    """``{"method:recipe": entry}`` from a results page: the numeric columns as numbers (None for "–"), date,
    commit and machine as text, and ``batch_size`` from the recipe (catalog runs never override the batch)."""
    from selfsup.config import load_recipe

    out = {}
    for (method, recipe), cells in sorted(parse_table(text).items()):
        entry = {key: _number(cells[col]) for col, key in NUMERIC.items()}
        entry.update(date=cells["date"], commit=cells["commit"], machine=cells["machine"])
        entry["batch_size"] = load_recipe(method, recipe).get("batch_size")
        out[f"{method}:{recipe}"] = entry
    return out


def write_reference(table: Path, reference: Path, dataset: str = "fashion_mnist") -> None:
    """Replace ``dataset``'s entries of ``reference`` (the package's reference.json) by the rows of ``table``."""
    refs = json.loads(reference.read_text()) if reference.exists() else {}
    refs[dataset] = reference_entries(table.read_text())
    reference.parent.mkdir(parents=True, exist_ok=True)
    reference.write_text(json.dumps(refs, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", required=True, help="method:recipe, e.g. moco_v2:default")
    p.add_argument("--out", default="runs/catalog")
    p.add_argument("--table", default=str(HERE.parent / "docs/results/fashion_mnist.md"))
    p.add_argument("--reference", default=str(REFERENCE), help="the package's reference.json, rewritten from the "
                   "table ('' to leave it alone)")
    p.add_argument("--threads", type=int, default=0, help="train.num_threads for every run (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (output in each run's train.log)")
    p.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    a = p.parse_args()
    extra = list(a.extra) + ([f"train.num_threads={a.threads}"] if a.threads else [])
    specs = []
    for spec in a.runs:
        method, _, recipe = spec.partition(":")
        specs.append((method, recipe or "default", Path(a.out) / f"{method}-{recipe or 'default'}"))
    rows, failed = [], []

    def finish(s: dict) -> None:
        rows.append(row(s))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
        # after every run: a stopped benchmark keeps its finished rows
        write_table(rows, Path(a.table), Path(a.reference) if a.reference else None)

    if a.jobs <= 1:
        for method, recipe, out in specs:
            finish(run(method, recipe, out, extra))
    else:
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
            futures = {pool.submit(run, m, r, o, extra, o / "train.log"): f"{m}:{r}" for m, r, o in specs}
            for fut in concurrent.futures.as_completed(futures):
                try:
                    finish(fut.result())
                except subprocess.CalledProcessError as e:  # one failed run keeps the others' rows
                    failed.append(futures[fut])
                    print(f"FAILED {futures[fut]} (exit {e.returncode}); see its train.log", flush=True)
    print(f"wrote {a.table}" + (f"; failed: {' '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
