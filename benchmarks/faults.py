"""Fault injection: ``kill -9`` a training run at a random moment, resume it, and check that nothing was lost.

For each method (its tiny recipe from ``tests/faults/tiny_methods.py``: 256 synthetic 28x28 images, batch 32, 1-2
epochs, a checkpoint after every step):

1. train it straight to the end once and keep ``checkpoints/last.pt``;
2. for each trial, start the same run in a new run directory and SIGKILL it at a moment drawn from ``--seed``:
   even trials a random fraction of a step after a random step is logged to ``metrics.jsonl`` (so in the next
   step or in the checkpoint write before it), odd trials during a checkpoint write
   (after a random step is logged, the ``checkpoints/`` folder is polled until a temporary file of the atomic writer,
   ``.last.pt.XXXXXXXX.tmp``, appears, then the run is killed at once);
3. check that the ``checkpoints/last.pt`` the kill left loads with ``selfsup.runs.load_checkpoint``;
4. continue the run with ``resume=auto out=SAME train.max_steps=0`` and compare the final checkpoint's ``method``,
   ``optimizer`` and ``probe`` states with the straight run's: bit-identical (``torch.equal`` on every tensor) is
   *survived*, anything else is *lost* (with the first differing key).

A trial counts as *killed during a checkpoint write* when a temporary checkpoint file is still on disk after the
process died, as *killed at a step* when it was killed otherwise, and as *missed* when the run finished before the
kill (its final state is still compared, but counts neither as survived nor, if equal, as lost). Prints a Markdown
table and writes it to ``--out``; exits 1 when any state was lost (or a run failed).

    OMP_NUM_THREADS=1 python benchmarks/faults.py [--methods simclr byol ...] [--kills 3] [--seed 0]
        [--chain 1] [--out /tmp/faults_kill.md] [--workdir DIR]

``--chain N`` kills each trial's run N times (the run, then its first resume, ...) before resuming it to the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests" / "faults"))
from tiny_methods import TINY, tiny_overrides, write_tiny_data  # noqa: E402

from selfsup.methods import REGISTRY  # noqa: E402
from selfsup.runs import CHECKPOINT, load_checkpoint  # noqa: E402
from selfsup.runtime import cpu_model  # noqa: E402

# a checkpoint after every step and a metrics record after every step: the moments a kill aims at
RUN = ["train.checkpoint_every=1", "train.log_every=1", "train.num_threads=1"]
PARTS = ("method", "optimizer", "probe")
TEMP = re.compile(r"^\.last\.pt\.[a-z0-9_]{8}\.tmp$")  # selfsup.runtime's temporary names for checkpoints/last.pt
COLUMNS = ["method", "trials", "killed at a step", "killed during a checkpoint write", "missed", "survived", "lost",
           "last checkpoint loads", "seconds"]
TIMEOUT = 900.0  # seconds for one training process


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(method: str, data: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "selfsup", "train", method, *tiny_overrides(method, data), *RUN, f"out={out}"]


def resume_cmd(method: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "selfsup", "train", method, "resume=auto", f"out={out}", "train.max_steps=0",
            "train.num_threads=1"]


def run_to_end(cmd: list[str]) -> None:
    """Run a training command to its end; a failure raises RuntimeError with the end of its stderr."""
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {r.returncode}: {shlex.join(cmd[2:])}: {tail}")


def first_difference(a, b, path: str = "") -> str | None:
    """The first key (dotted path) where ``a`` and ``b`` differ, recursively through dicts, lists and tuples;
    tensors must have the same dtype and shape and be ``torch.equal``; other values ``==`` and of the same type. None
    when they are identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path} (tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__})"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})"
        return None if torch.equal(a, b) else path
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            missing = [k for k in a if k not in b] + [k for k in b if k not in a]
            return f"{path} (keys differ: {missing[:3] or 'order'})"
        for k in a:
            d = first_difference(a[k], b[k], f"{path}.{k}" if path else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}.{i}")
            if d is not None:
                return d
        return None
    return None if type(a) is type(b) and a == b else f"{path} ({a!r} vs {b!r})"


def compare(straight: dict, resumed: dict) -> str | None:
    """The first difference between two checkpoints' method, optimizer and probe states, or None."""
    for part in PARTS:
        d = first_difference(straight.get(part), resumed.get(part), part)
        if d is not None:
            return d
    return None


def temp_files(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if TEMP.match(n))
    except FileNotFoundError:
        return []


class MetricsTail:
    """The last step logged to a run's ``metrics.jsonl``, re-read only when the file grew."""

    def __init__(self, path: Path):
        self.path, self.size, self.step = path, -1, 0

    def poll(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.step
        if size != self.size:
            self.size = size
            for line in reversed(self.path.read_text().splitlines()):
                try:  # the last line may be half-written
                    self.step = max(self.step, int(json.loads(line)["step"]))
                    break
                except (ValueError, KeyError, TypeError):
                    continue
        return self.step


def kill_run(proc: subprocess.Popen, out: Path, mode: str, step: int, delay: float = 0.0) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after step ``step`` is logged (``mode="step"``), or at the first temporary
    checkpoint file that appears after it is logged (``mode="write"``). Returns False when the run ended before the
    kill."""
    metrics, folder = MetricsTail(out / "metrics.jsonl"), (out / CHECKPOINT).parent
    deadline = time.monotonic() + TIMEOUT
    while metrics.poll() < step:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{out}: step {step} not logged in {TIMEOUT:.0f} s")
        time.sleep(0.002)
    if mode == "step" and delay > 0:
        time.sleep(delay)
    if mode == "write":
        # the checkpoint of the logged step is written right after its record, and a small one takes milliseconds:
        # poll without sleeping, only now
        while not temp_files(folder):
            if proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{out}: no checkpoint write seen in {TIMEOUT:.0f} s")
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # exited just now
        pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


@dataclass
class Kill:
    mode: str                    # "step" or "write": what the kill aimed at
    step: int                    # the step whose record (and, for "write", checkpoint) the kill waited for
    delay: float = 0.0           # "step": seconds from the record to the kill
    outcome: str = ""            # "at a step", "during a write", "missed"
    loads: bool | None = None    # whether checkpoints/last.pt loads after the kill (None: no checkpoint yet)
    load_error: str = ""
    resumed_from: int = 0        # the step of the checkpoint the kill left (0: none, the resume starts over)

    def describe(self) -> str:
        when = f"{self.delay:.3f} s after step {self.step}" if self.mode == "step" else \
            f"at the checkpoint write after step {self.step}"
        loads = "loads" if self.loads else "absent" if self.loads is None else "DOES NOT LOAD: " + self.load_error
        return f"kill {when} -> {self.outcome}, last.pt {loads} (step {self.resumed_from})"


@dataclass
class Trial:
    kills: list[Kill]                # the first kills the run, each next one the resume of the previous kill
    difference: str | None = None    # first differing key after the last resume (None: bit-identical)
    stale: list[str] = field(default_factory=list)  # temporary files left after the last resume

    @property
    def lost(self) -> bool:
        return self.difference is not None

    @property
    def survived(self) -> bool:
        return any(k.outcome != "missed" for k in self.kills) and not self.lost


def plan(rng: random.Random, trials: int, total_steps: int, step_seconds: float, chain: int = 1) -> list[Trial]:
    """``trials`` trials of ``chain`` kills each, alternately at a step and during a checkpoint write. A kill waits
    for a random step in [1, total_steps - 1] to be logged (a chain's steps at least 2 apart, increasing, so a
    resume's kill waits for a step its killed predecessor never logged); a kill at a step then waits a random
    fraction of a step (``step_seconds``: the straight run's mean), so it lands anywhere in the next step or in the
    checkpoint write before it."""
    out, j = [], 0
    for _ in range(trials):
        kills, low = [], 1
        for i in range(chain):
            step = rng.randint(low, max(total_steps - 1 - 2 * (chain - 1 - i), low))
            frac = rng.random()
            kills.append(Kill("step", step, round(frac * step_seconds, 4)) if j % 2 == 0 else Kill("write", step))
            low, j = step + 2, j + 1
        out.append(Trial(kills))
    return out


def kill_once(cmd: list[str], out: Path, k: Kill) -> bool:
    """Start ``cmd`` (training into ``out``), kill it as ``k`` says, fill in ``k``'s outcome and the state of the
    checkpoint left on disk. Returns False when the run ended before the kill (``k.outcome = "missed"``)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        killed = kill_run(proc, out, k.mode, k.step, k.delay)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        proc.wait()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"the run to kill failed (exit {proc.returncode}): {shlex.join(cmd[2:])}: "
                           + " | ".join(stderr.strip().splitlines()[-3:]))
    ckpt = out / CHECKPOINT
    k.outcome = "missed" if not killed else "during a write" if temp_files(ckpt.parent) else "at a step"
    if ckpt.exists():
        try:
            k.resumed_from = int(load_checkpoint(ckpt)["step"])
            k.loads = True
        except Exception as e:  # noqa: BLE001  (any failure to load is the finding)
            k.loads, k.load_error = False, f"{type(e).__name__}: {e}"
    return killed


def trial(method: str, data: dict[str, Path], out: Path, t: Trial, reference: dict) -> Trial:
    """Run ``t`` for ``method`` in ``out``: start the run, kill it, resume, kill the resume (a chain), ..., resume to
    the end; compare the final state with ``reference`` (the straight run's final checkpoint)."""
    for i, k in enumerate(t.kills):
        if not kill_once(train_cmd(method, data, out) if i == 0 else resume_cmd(method, out), out, k):
            for later in t.kills[i + 1:]:
                later.outcome = "missed"
            break
    else:
        try:
            run_to_end(resume_cmd(method, out))
        except RuntimeError as e:
            t.difference = f"resume failed: {e}"
            return t
    t.stale = temp_files((out / CHECKPOINT).parent)
    t.difference = compare(reference, torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True))
    return t


@dataclass
class MethodResult:
    method: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def kills(self) -> list[Kill]:
        return [k for t in self.trials for k in t.kills]

    def row(self) -> list[str]:
        if self.error:
            return [self.method, str(len(self.trials)), "", "", "", "", "", "", f"{self.seconds:.0f}"]
        ks = self.kills
        with_ckpt = [k for k in ks if k.loads is not None]
        return [self.method, str(len(self.trials)), str(sum(k.outcome == "at a step" for k in ks)),
                str(sum(k.outcome == "during a write" for k in ks)), str(sum(k.outcome == "missed" for k in ks)),
                str(sum(t.survived for t in self.trials)), str(sum(t.lost for t in self.trials)),
                f"{sum(bool(k.loads) for k in with_ckpt)}/{len(with_ckpt)}", f"{self.seconds:.0f}"]

    @property
    def failed(self) -> bool:
        return bool(self.error) or any(t.lost for t in self.trials) or any(k.loads is False for k in self.kills)


def run_method(method: str, data: dict[str, Path], workdir: Path, kills: int, rng: random.Random,
               log=print, chain: int = 1) -> MethodResult:
    """The straight run of ``method`` and ``kills`` kill-and-resume trials (of ``chain`` kills each), in
    ``workdir/method``."""
    res, t0 = MethodResult(method), time.time()
    base = workdir / method
    if method not in TINY:
        res.error = "no tiny recipe in tests/faults/tiny_methods.py (TINY)"
        log(f"  {method}: ERROR {res.error}")
        return res
    try:
        run_to_end(train_cmd(method, data, base / "straight"))
        reference = torch.load(base / "straight" / CHECKPOINT, map_location="cpu", weights_only=True)
        steps = int(reference["step"])
        step_seconds = sum(s["step_seconds"] for s in reference["segments"]) / steps
        for i, t in enumerate(plan(rng, kills, steps, step_seconds, chain)):
            res.trials.append(trial(method, data, base / f"trial{i}", t, reference))
            log(f"  {method} trial {i}: " + "; ".join(k.describe() for k in t.kills) + ": "
                + ("identical" if t.difference is None else "DIFFERS at " + t.difference)
                + (f"; temporary files left: {t.stale}" if t.stale else ""))
    except (RuntimeError, subprocess.TimeoutExpired, TimeoutError) as e:
        res.error = str(e)
        log(f"  {method}: ERROR {e}")
    res.seconds = time.time() - t0
    return res


def markdown(results: list[MethodResult], command: str) -> str:
    lines = ["# Kill -9 and resume (benchmarks/faults.py)", "",
             f"- command: `{command}`", f"- CPU: {cpu_model()}, torch {torch.__version__}, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
             "- each trial: SIGKILL at a random moment, `resume=auto` to the end, final `method`/`optimizer`/`probe` "
             "states compared with an uninterrupted run's (bit-identical = survived); the kill columns count kills",
             "- killed during a checkpoint write: a temporary `.last.pt.XXXXXXXX.tmp` was on disk after the kill; "
             "missed: the run ended before the kill; last checkpoint loads: kills after which `checkpoints/last.pt` "
             "loaded / kills that left one", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    total = MethodResult("**all**", [t for r in results for t in r.trials], sum(r.seconds for r in results))
    lines.append("| " + " | ".join(total.row()) + " |")
    notes = [f"- {r.method}: error: {r.error}" for r in results if r.error]
    for r in results:
        for i, t in enumerate(r.trials):
            if t.lost:
                notes.append(f"- {r.method} trial {i} ({'; '.join(k.describe() for k in t.kills)}): lost, first "
                             f"difference `{t.difference}`")
            for k in t.kills:
                if k.loads is False:
                    notes.append(f"- {r.method} trial {i}: checkpoints/last.pt does not load: {k.load_error}")
            if t.stale:
                notes.append(f"- {r.method} trial {i}: temporary files left after the resume: {t.stale}")
    write_aimed = [k for r in results for k in r.kills if k.mode == "write"]
    landed = sum(k.outcome == "during a write" for k in write_aimed)
    notes.append(f"- kills aimed at a checkpoint write: {len(write_aimed)}, landed during one: {landed}")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=sorted(REGISTRY), choices=sorted(REGISTRY), metavar="METHOD",
                   help="default: every registered method")
    p.add_argument("--kills", type=int, default=3, help="trials per method (default 3)")
    p.add_argument("--chain", type=int, default=1,
                   help="kills per trial: the run, then its resume, ... (default 1: only the run is killed)")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--out", default="/tmp/faults_kill.md", help="the Markdown table (default /tmp/faults_kill.md)")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed per method)")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/faults.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"{command}\nCPU: {cpu_model()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="selfsup-faults-") as tmp:
        data = write_tiny_data(Path(tmp) / "data")
        for method in args.methods:
            rng = random.Random(f"{args.seed}:{method}")  # the same moments whichever methods run
            if args.workdir:
                results.append(run_method(method, data, Path(args.workdir), args.kills, rng, _log, args.chain))
            else:
                with tempfile.TemporaryDirectory(prefix=f"{method}-", dir=tmp) as work:
                    results.append(run_method(method, data, Path(work), args.kills, rng, _log, args.chain))
            print("| " + " | ".join(results[-1].row()) + " |", flush=True)
    table = markdown(results, command)
    print(table, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    return 1 if any(r.failed for r in results) else 0


def _log(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    sys.exit(main())
