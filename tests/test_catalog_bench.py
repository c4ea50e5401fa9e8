"""benchmarks/catalog.py: which runs it retrains or resumes, and the table it merges rows into."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("catalog", Path(__file__).parents[1] / "benchmarks" / "catalog.py")
catalog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(catalog)

_EVALUATED = {"method": "dcl", "recipe": "default", "knn_top1": 84.79, "linear_top1": 87.47, "mlp_top1": 89.81,
              "rankme": 88.58, "epochs_done": 12, "segments": [{}], "train_seconds": 500.0, "eval_seconds": 60.0,
              "device": "cpu"}


@pytest.fixture
def fake_train(monkeypatch):
    """Record the `selfsup train` commands instead of running them; each 'run' writes an evaluated summary."""
    calls = []

    def fake_run(cmd, check, **kw):
        calls.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("out=")).split("=", 1)[1])
        s = dict(_EVALUATED, segments=[{}, {}] if "resume=auto" in cmd else [{}])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(s))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    monkeypatch.setenv("SELFSUP_COMMIT", "abc1234")  # commit() would ask git
    return calls


def test_an_evaluated_run_is_reused(tmp_path, fake_train):
    (tmp_path / "summary.json").write_text(json.dumps(_EVALUATED))
    assert catalog.run("dcl", "default", tmp_path, [])["knn_top1"] == 84.79
    assert fake_train == []


def test_a_run_stopped_in_its_evaluation_resumes(tmp_path, fake_train):
    """A summary without the evaluation (training finished, evaluation killed) is not a result: the run resumes
    from its checkpoints, and its minutes are the sum of its segments, not the last command's wall time."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({k: v for k, v in _EVALUATED.items()
                                                       if k not in ("knn_top1", "eval_seconds")}))
    s = catalog.run("dcl", "default", tmp_path, ["train.num_threads=1"])
    assert len(fake_train) == 1 and "resume=auto" in fake_train[0]
    assert s["wall_minutes"] == round((500 + 60) / 60, 1)  # stored rounded to 0.1 min


def test_a_fresh_run_trains_without_resume(tmp_path, fake_train):
    catalog.run("dcl", "default", tmp_path / "new", [], log=tmp_path / "new" / "train.log")
    assert len(fake_train) == 1 and "resume=auto" not in fake_train[0]


def test_rows_merge_into_the_table_and_mark_the_floors(tmp_path):
    table = tmp_path / "t.md"
    catalog.write_table([catalog.row(dict(_EVALUATED, wall_minutes=9.5, cpu="X"))], table)
    catalog.write_table([catalog.row(dict(_EVALUATED, method="vicreg", knn_top1=86.84, wall_minutes=70.6, cpu="X"))],
                        table)
    catalog.write_table([catalog.row(dict(_EVALUATED, knn_top1=86.3, wall_minutes=30.0, cpu="X"))], table)  # newer
    lines = [ln for ln in table.read_text().splitlines() if ln.startswith("| ") and "method" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == ["dcl", "vicreg"]
    assert "86.30 |" in lines[0] and "✗" not in lines[0].split("|")[3]   # the newer dcl row replaced the old one
    lines = [catalog.row(dict(_EVALUATED, knn_top1=86.1, linear_top1=84.4, wall_minutes=1, cpu="X"))]
    assert lines[0][2] == "86.10 ✗" and lines[0][3] == "84.40 ✗"
    assert lines[0][catalog.COLUMNS.index("fine-tune")] == "–"  # a run evaluated without eval.finetune
    tuned = catalog.row(dict(_EVALUATED, finetune_top1=85.3, wall_minutes=1, cpu="X"))
    assert tuned[catalog.COLUMNS.index("fine-tune")] == "85.30"  # no floor mark: the floors are the probes'


def test_gap_closed_against_the_supervised_row_of_the_same_recipe(tmp_path):
    """(SSL - pixel floor) / (supervised - pixel floor), kNN floor 86.2 and linear 84.5; rows of a recipe without a
    supervised run get "–", and tables written before the gap columns existed are read and rewritten."""
    table = tmp_path / "t.md"
    table.write_text("<!-- catalog-table:begin -->\n| " + " | ".join(catalog.COLUMNS) + " |\n|" + "---|" * 11
                     + "\n| dcl | default | 84.79 ✗ | 87.47 | 89.81 | 88.58 | 9.5 | 12 | d | c | X |\n"
                     "<!-- catalog-table:end -->\n")
    catalog.write_table([catalog.row(dict(_EVALUATED, method="supervised", knn_top1=91.2, linear_top1=92.0,
                                          wall_minutes=9, cpu="X")),
                         catalog.row(dict(_EVALUATED, recipe="long", knn_top1=88.0, wall_minutes=60, cpu="X"))], table)
    rows = {(r[0], r[1]): r for r in ([c.strip() for c in ln.strip().strip("|").split("|")]
                                       for ln in table.read_text().splitlines()[3:-1])}
    # the old row (written before the fine-tune and gap columns) is rewritten with "–" for its missing fine-tune
    assert rows[("dcl", "default")][:len(catalog.COLUMNS)] == [
        "dcl", "default", "84.79 ✗", "87.47", "89.81", "–", "88.58", "9.5", "12", "d", "c", "X"]
    assert rows[("dcl", "default")][-2:] == [f"{100 * (84.79 - 86.2) / (91.2 - 86.2):.0f}%",   # -28%: below the floor
                                             f"{100 * (87.47 - 84.5) / (92.0 - 84.5):.0f}%"]   # 40%
    assert rows[("supervised", "default")][-2:] == ["ceiling", "ceiling"]
    assert rows[("dcl", "long")][-2:] == ["–", "–"]
    assert catalog.gap_closed(86.2, 86.2, 91.2) == 0 and catalog.gap_closed(91.2, 86.2, 91.2) == 1
    assert catalog.gap_closed(90.0, 86.2, 85.0) is None  # a ceiling below the floor measures nothing


# ----------------------------------------------------------------------------------------------- reference.json

RESULTS = Path(__file__).parents[1] / "docs" / "results" / "fashion_mnist.md"


def test_the_shipped_reference_equals_the_results_table():
    """selfsup/recipes/reference.json (in the wheel) and docs/results/fashion_mnist.md (not in it) cannot drift:
    after a catalog run, `python benchmarks/catalog.py` rewrites both (or regenerate the JSON with
    catalog.write_reference)."""
    shipped = json.loads(catalog.REFERENCE.read_text())["fashion_mnist"]
    assert shipped == catalog.reference_entries(RESULTS.read_text())
    # an independent reading of the Markdown: every row's numbers, cell by cell
    lines = RESULTS.read_text().split("<!-- catalog-table:begin -->")[1].split("<!-- catalog-table:end -->")[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines.strip().splitlines()[2:]]
    assert len(rows) == len(shipped) > 0
    for method, recipe, knn, lin, mlp, fine, rankme, minutes, epochs, date, sha, machine, *gaps in rows:
        assert len(gaps) == len(catalog.DERIVED)
        entry = shipped[f"{method}:{recipe}"]
        for cell, key in ((knn, "knn_top1"), (lin, "linear_top1"), (mlp, "mlp_top1"), (fine, "finetune_top1"),
                          (rankme, "rankme"), (minutes, "minutes"), (epochs, "epochs")):
            want = None if cell == "–" else float(cell.split()[0])
            assert entry[key] == want, (method, key)
        assert (entry["date"], entry["commit"], entry["machine"]) == (date, sha, machine)


def test_cells_parse_to_numbers_and_the_reference_follows_the_table(tmp_path):
    assert catalog._number("83.21 ✗") == 83.21 and catalog._number("–") is None and catalog._number("8") == 8.0
    table, reference = tmp_path / "t.md", tmp_path / "reference.json"
    reference.write_text(json.dumps({"cifar10": {"x:default": {"knn_top1": 1.0}}}))  # other datasets are kept
    catalog.write_table([catalog.row(dict(_EVALUATED, wall_minutes=9.5, cpu="X", date="d", commit="c"))], table,
                        reference)
    refs = json.loads(reference.read_text())
    assert refs["cifar10"] == {"x:default": {"knn_top1": 1.0}}
    assert refs["fashion_mnist"] == {"dcl:default": {
        "knn_top1": 84.79, "linear_top1": 87.47, "mlp_top1": 89.81, "finetune_top1": None, "rankme": 88.58,
        "minutes": 9.5,
        "epochs": 12.0, "date": "d", "commit": "c", "machine": "X", "batch_size": 256}}


def test_the_epochs_column_rounds_a_budget_that_ends_inside_an_epoch():
    assert catalog.epochs_cell({"epochs_done": 1.6010672358591249, "epochs": 2}) == "1.6"
    assert catalog.epochs_cell({"epochs_done": 12.0}) == "12"
    assert catalog.epochs_cell({"epochs": 8}) == "8"  # a summary written before epochs_done
    assert catalog.epochs_cell({}) == "?"
