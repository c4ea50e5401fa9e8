"""What `pip install selfsup` / `pip install .` really installs: build the sdist and the wheels from a copy of the
source, check every non-Python file of the package ships, install the wheel into a fresh venv and run the CLI there.

The editable install of the dev venv reads recipes straight from src/, so only a real build shows a packaging gap
(a wheel without recipes once made `selfsup train simclr` exit 2 with "Available: " and an empty list).
Offline: `python -m build --no-isolation` with the `build` and `setuptools` of the dev extras, and the fresh venv
borrows torch & co. from the dev venv through a .pth file instead of downloading them. About 15 s on 2 cores.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # per subprocess: a hang fails the test instead of blocking CI


def _run(cmd, *, cwd, env=None, check=True):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_env(**extra) -> dict:
    """No PYTHONPATH/venv leaking in from the caller (e.g. a `PYTHONPATH=src pytest` run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _copy_source(dest: Path) -> None:
    """The files a clean clone would have (tracked + untracked-but-not-ignored), so the checkout never gets build/,
    *.egg-info or dist/. Without git (e.g. tests run from an unpacked sdist): a copytree minus caches and outputs."""
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, timeout=60)
        names = [n for n in r.stdout.decode().split("\0") if n] if r.returncode == 0 else []
    except OSError:
        names = []
    if names:
        for name in names:
            src = ROOT / name
            if src.is_file():                     # tracked but deleted in the working tree: skip
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
        return
    top_level = {".git", ".venv", "venv", "build", "dist", "runs", "data", ".pytest_cache", ".ruff_cache"}

    def ignore(folder, entries):
        at_root = Path(folder).resolve() == ROOT
        return {e for e in entries if (at_root and e in top_level) or e == "__pycache__"
                or e.endswith((".pyc", ".egg-info"))}

    shutil.copytree(ROOT, dest, ignore=ignore)


def _package_data(src_root: Path) -> set[str]:
    """Non-Python files under src/selfsup, as 'selfsup/...' paths (dotfiles such as .gitkeep are not package data)."""
    pkg = src_root / "src" / "selfsup"
    return {
        p.relative_to(pkg.parent).as_posix()
        for p in pkg.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc", ".pyo") and "__pycache__" not in p.parts
        and not any(part.startswith(".") for part in p.relative_to(pkg).parts)
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of the source, a wheel built from it, and an sdist plus the wheel built from that sdist."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src-copy"
    _copy_source(src)
    assert (src / "pyproject.toml").is_file() and (src / "src" / "selfsup" / "__init__.py").is_file()
    env = _clean_env()
    build = [sys.executable, "-m", "build", "--no-isolation"]
    # Wheel from the pristine tree first (= `pip install .` on a clean clone), then sdist -> wheel from the unpacked
    # sdist (build's default, = `pip install selfsup-X.tar.gz`, and proof the sdist holds all the wheel needs).
    _run([*build, "--wheel", "--outdir", tmp / "dist-tree", src], cwd=tmp, env=env)
    _run([*build, "--outdir", tmp / "dist", src], cwd=tmp, env=env)
    (tree_wheel,) = (tmp / "dist-tree").glob("*.whl")
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    (sdist_wheel,) = (tmp / "dist").glob("*.whl")
    return {"tmp": tmp, "src": src, "tree_wheel": tree_wheel, "sdist": sdist, "sdist_wheel": sdist_wheel}


def test_wheels_and_sdist_ship_every_package_data_file(built):
    expected = _package_data(built["src"])
    assert any(p.startswith("selfsup/recipes/") for p in expected), "no recipes in the source tree?"
    for key in ("tree_wheel", "sdist_wheel"):
        names = set(zipfile.ZipFile(built[key]).namelist())
        missing = sorted(expected - names)
        assert not missing, f"{built[key].name} ({key}) lacks package data: {missing}"
        assert not [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n], f"bytecode in {key}"
    with tarfile.open(built["sdist"]) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]                   # selfsup-<version>
    in_sdist = {n[len(top) + len("/src/"):] for n in names if n.startswith(f"{top}/src/")}
    missing = sorted(expected - in_sdist)
    assert not missing, f"{built['sdist'].name} lacks package data: {missing}"


@pytest.fixture(scope="module")
def fresh_venv(built):
    """A new venv with only the wheel (built from the sdist) installed; torch & co. come from the dev venv's
    site-packages through a .pth file (its own .pth files, the editable hook among them, are not processed)."""
    venv = built["tmp"] / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=built["tmp"])
    py = venv / "bin" / "python"
    env = _clean_env()
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=built["tmp"], env=env).stdout.strip()
    borrowed = [p for p in dict.fromkeys(sys.path)
                if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()
                and not Path(p).resolve().is_relative_to(ROOT / "src")]
    assert borrowed, f"no site-packages on the dev interpreter's sys.path: {sys.path}"
    (Path(purelib) / "_selfsup_test_dev_site.pth").write_text("\n".join(borrowed) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", built["sdist_wheel"]],
         cwd=built["tmp"], env=env)
    elsewhere = built["tmp"] / "elsewhere"         # cwd outside the repo and the source copy
    elsewhere.mkdir()
    return {"venv": venv, "py": py, "script": venv / "bin" / "selfsup", "cwd": elsewhere,
            "env": _clean_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")}


def _recipe_listing(stdout: str) -> dict[str, list[str]]:
    """`selfsup recipes` -> {method: [recipe, ...]} (method lines start in column 0, recipe lines with '  recipe=')."""
    listing: dict[str, list[str]] = {}
    method = None
    for line in stdout.splitlines():
        if line and not line[0].isspace():
            method = line.split()[0]
            listing[method] = []
        elif line.strip().startswith(("recipe=", "preset=datasets/")) and method is not None:
            listing[method].append(line.strip().split()[0].split("=")[1].removeprefix("datasets/"))
    return listing


def _leaves(tree: dict, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def test_installed_wheel_runs_from_a_fresh_venv(built, fresh_venv):
    fv = fresh_venv
    # The package imported is the installed one, not the checkout (nor the dev venv's editable hook).
    where = _run([fv["py"], "-c", "import selfsup; print(selfsup.__file__)"], cwd=fv["cwd"], env=fv["env"]).stdout
    where = Path(where.strip()).resolve()
    assert where.is_relative_to(fv["venv"].resolve()), f"selfsup imported from {where}, not from the fresh venv"
    assert fv["script"].is_file(), "the wheel installed no `selfsup` console script"
    assert str(fv["venv"]) in fv["script"].read_text()[:1000], "console script does not run the fresh venv's python"

    # `selfsup recipes` lists every recipe file of the source tree, per method.
    r = _run([fv["script"], "recipes"], cwd=fv["cwd"], env=fv["env"])
    listing = _recipe_listing(r.stdout)
    recipes_dir = built["src"] / "src" / "selfsup" / "recipes"
    expected = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in recipes_dir.iterdir() if d.is_dir()}
    assert {"simclr", "byol"} <= set(expected)
    for method, names in expected.items():
        assert listing.get(method) == names, f"`selfsup recipes` shows {method}: {listing.get(method)}, " \
                                             f"source tree has {names}\n{r.stdout}"

    # `selfsup train simclr --show-config` resolves the shipped default recipe: every value it sets shows up.
    r = _run([fv["script"], "train", "simclr", "--show-config"], cwd=fv["cwd"], env=fv["env"], check=False)
    assert r.returncode == 0, f"selfsup train simclr --show-config exited {r.returncode}\n{r.stderr[-3000:]}"
    cfg = yaml.safe_load(r.stdout)
    assert cfg["method"] == "simclr" and cfg["recipe"] == "default"
    recipe = yaml.safe_load((recipes_dir / "simclr" / "default.yaml").read_text())
    preset = yaml.safe_load((recipes_dir / f"{recipe.pop('extends')}.yaml").read_text())  # the dataset preset under it
    preset.pop("description")
    for path, value in [*_leaves(preset), *_leaves(recipe)]:  # the recipe's own values come last and win
        node = cfg
        for k in path:
            assert isinstance(node, dict) and k in node, f"--show-config has no {'.'.join(path)}"
            node = node[k]
        if any(path == q for q, _ in _leaves(recipe)) and (path, value) not in _leaves(recipe):
            continue  # a preset value the recipe overrides
        assert node == value, f"--show-config {'.'.join(path)} = {node!r}, recipes/simclr/default.yaml: {value!r}"
