"""The fault suite: demo-sized training (a tiny BERT, 32 examples, 16 optimiser steps) under each fault, at random
points, and the README's bad-input table. Not part of the test run (minutes); tests/test_faults.py runs a few of its
cases.

    python scripts/fault_suite.py [--kills 3] [--seed 0] [--workdir DIR]

Faults: SIGKILL at a random step (N times), SIGTERM and SIGINT at a random step, SIGKILL in the middle of writing a
checkpoint, a second run started into a held run directory, a disk that fills mid-run (a ballast file fills a small
tmpfs at a random step, when this machine lets us mount one), the newest checkpoint corrupt or holding NaN. A fault
is *survived* when the run, resumed with resume=auto, ends with the adapter of the uninterrupted run (to 1e-6); its
*record is intact* when its metrics.jsonl equals the uninterrupted run's and no temporary file is left. A bad input
is a *clear error* when the command exits 2 with exactly one `error:` line, no traceback, and writes nothing (a
finished run's files unchanged).

One line per case, then one JSON line: faults, survived, records_intact, bad_inputs, clear_errors (and tmpfs: whether
the disk-full case could run)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# Every command in a process of its own: the cases run in threads, and a fault is a process's death.
from cli_helpers import ENV, make_tiny_bert, write_sentiment_data  # noqa: E402 (the tests' tiny model)
from cli_helpers import run_cli_process as run_cli  # noqa: E402
from kasa.cli.parser import ArgumentParser  # noqa: E402

STEPS = 16  # 2 epochs of 8 steps
DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import kasa.training.checkpoint as checkpoint
    from kasa.training.loop import TrainingRecipe

    at, fault = int(os.environ["AT"]), os.environ["FAULT"]
    if fault == "kill_in_save":  # the adapter file of the AT-th checkpoint is written, the rest is not
        save_adapter, calls = checkpoint.save_adapter, [0]
        def killing_save_adapter(*args, **kwargs):
            result = save_adapter(*args, **kwargs)
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        checkpoint.save_adapter = killing_save_adapter
    else:
        after_step = TrainingRecipe.after_step
        def after_step_with_fault(self):
            after_step(self)
            if self.state.step != at:
                return
            if fault == "pause":
                Path(os.environ["PAUSED"]).touch()
                while not Path(os.environ["GO_ON"]).exists():
                    time.sleep(0.1)
            elif fault == "fill":  # another writer takes the disk's last byte: the next save meets a full disk
                with open(os.environ["BALLAST"], "wb", buffering=0) as ballast:
                    try:
                        while True:
                            ballast.write(bytes(65536))
                    except OSError:
                        pass
            else:
                os.kill(os.getpid(), getattr(signal, fault))
        TrainingRecipe.after_step = after_step_with_fault
    from kasa.cli.train import main
    sys.argv = ["kasa-train", *sys.argv[1:]]
    main()
    """
)


def train_args(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"task.data_dir={data}", f"hydra.run.dir={run_dir}", "trainer.epochs=2",
            "trainer.batch_size=4", "trainer.lr=5e-3", "trainer.max_length=16", "trainer.log_every=1",
            "trainer.save_every=3", "trainer.keep_checkpoints=3", "logging.progress=false",
            "method.svd_cache_dir=null", *extra]


def driven(args: list[str], fault: str, at: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "FAULT": fault, "AT": str(at), **env})


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "last" / "adapter_model.safetensors"))


def same_adapter(run_dir: Path, reference: Path) -> bool:
    try:
        got, expected = adapter(run_dir), adapter(reference)
    except Exception:  # noqa: BLE001 (no adapter: not survived)
        return False
    return got.keys() == expected.keys() and all(float((got[k] - expected[k]).abs().max()) <= 1e-6 for k in got)


def record_intact(run_dir: Path, reference: Path) -> bool:
    leftovers = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir() for p in folder.iterdir()
                 if p.name.endswith((".tmp", ".old"))]
    return (not leftovers and (run_dir / "summary.json").is_file()
            and (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes())


class Suite:
    def __init__(self, work: Path, seed: int, jobs: int) -> None:
        self.work, self.rng, self.jobs = work, random.Random(seed), jobs
        self.model = make_tiny_bert(work / "model")
        self.data = write_sentiment_data(work / "data")
        self.reference = work / "reference"
        result = run_cli("kasa.cli.train", *train_args(self.model, self.data, self.reference))
        if result.returncode != 0:
            sys.exit(f"the uninterrupted reference run failed:\n{result.stderr[-3000:]}")
        self.faults = self.survived = self.intact = self.bad_inputs = self.clear = 0
        self.counting = threading.Lock()  # cases run in threads
        self.tmpfs: bool | None = None

    def args(self, run_dir: Path, *extra: str) -> list[str]:
        return train_args(self.model, self.data, run_dir, *extra)

    def report_fault(self, name: str, run_dir: Path, detail: str = "") -> None:
        survived, intact = same_adapter(run_dir, self.reference), record_intact(run_dir, self.reference)
        with self.counting:
            self.faults += 1
            self.survived += survived
            self.intact += intact
        print(f"fault {name}: survived={survived} record_intact={intact}{f' ({detail})' if detail else ''}",
              flush=True)

    def resume(self, run_dir: Path) -> subprocess.CompletedProcess:
        return run_cli("kasa.cli.train", *self.args(run_dir), "resume=auto")

    # -- faults -------------------------------------------------------------------------------------------------

    def signal_case(self, fault: str, expected_status: int, run_dir: Path | None = None) -> Path:
        at = self.rng.randint(1, STEPS - 1)
        run_dir = run_dir or self.work / f"{fault.lower()}-{at}-{time.monotonic_ns()}"
        stopped = driven(self.args(run_dir), fault, at)
        _, stderr = stopped.communicate(timeout=900)
        detail = f"at step {at}, exit {stopped.returncode}"
        if stopped.returncode != expected_status:
            detail += f" (expected {expected_status}): {stderr.strip().splitlines()[-1:]}"
        resumed = self.resume(run_dir)
        if resumed.returncode != 0:
            detail += f"; resume failed: {resumed.stderr.strip().splitlines()[-1:]}"
        self.report_fault(fault, run_dir, detail)
        return run_dir

    def kill_in_save(self) -> None:
        at = self.rng.randint(1, 6)  # the save_adapter calls of a run: step checkpoints, best/, last/
        run_dir = self.work / f"kill-in-save-{at}"
        killed = driven(self.args(run_dir), "kill_in_save", at)
        killed.communicate(timeout=900)
        resumed = self.resume(run_dir)
        self.report_fault("SIGKILL during a save", run_dir,
                          f"save {at}, exit {killed.returncode}, resume exit {resumed.returncode}")

    def concurrent(self) -> None:
        run_dir = self.work / "concurrent"
        first = driven(self.args(run_dir), "pause", self.rng.randint(1, STEPS - 1), PAUSED=str(self.work / "paused"),
                       GO_ON=str(self.work / "go"))
        while not (self.work / "paused").exists() and first.poll() is None:
            time.sleep(0.2)
        second = run_cli("kasa.cli.train", *self.args(run_dir), "resume=auto")
        (self.work / "go").touch()
        first.communicate(timeout=900)
        refused = second.returncode == 2 and "in use by another kasa run" in second.stderr
        self.report_fault("two runs on one folder", run_dir,
                          f"second run refused={refused}, first run exit {first.returncode}")

    def disk_full(self) -> None:
        mount = self.work / "small-disk"
        mount.mkdir()
        # room for the checkpoints the start checks for; a ballast file then fills it at a random step
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                 capture_output=True, text=True)
        self.tmpfs = mounted.returncode == 0
        if not self.tmpfs:
            print(f"fault disk full: skipped, cannot mount a tmpfs here ({mounted.stderr.strip()})", flush=True)
            return
        try:
            run_dir, ballast, at = mount / "run", mount / "ballast", self.rng.randint(2, STEPS - 2)
            filled = driven(self.args(run_dir), "fill", at, BALLAST=str(ballast))
            _, stderr = filled.communicate(timeout=900)
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            one_line = (filled.returncode == 2 and len(errors) == 1 and "no space left" in errors[0]
                        and "Traceback" not in stderr)
            ballast.unlink()
            resumed = self.resume(run_dir)
            self.report_fault(f"disk full at step {at}", run_dir, f"one line={one_line}: {errors[:1]}; resume exit "
                              f"{resumed.returncode}")
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)

    def broken_newest_checkpoint(self, how: str) -> None:
        """A run killed mid-way whose newest checkpoint is then damaged: resume=auto skips it for the one before."""
        run_dir = self.work / f"broken-{how}"
        at = self.rng.randint(7, STEPS - 1)  # at least two step checkpoints exist
        driven(self.args(run_dir), "SIGKILL", at).communicate(timeout=900)
        found = sorted((run_dir / "checkpoints").glob("step-*"))
        if not found:
            self.report_fault(f"{how} newest checkpoint", run_dir, f"killed at step {at} before any checkpoint")
            return
        newest = found[-1] / "adapter_model.safetensors"
        if how == "corrupt":
            newest.write_bytes(newest.read_bytes()[:200])
        else:
            import torch
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(newest))
            name = sorted(tensors)[0]
            tensors[name] = torch.full_like(tensors[name], float("nan"))
            save_file(tensors, str(newest))
        resumed = self.resume(run_dir)
        self.report_fault(f"{how} newest checkpoint", run_dir,
                          f"killed at step {at}; resume exit {resumed.returncode}, skipped it: "
                          f"{'skipping step-' in resumed.stderr}")

    # -- bad input ----------------------------------------------------------------------------------------------

    def bad_input(self, name: str, module: str, args: list[str], watch: Path | None = None,
                  must_not_exist: Path | None = None) -> None:
        before = snapshot(watch) if watch else None
        result = run_cli(module, *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        clear = (result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
                 and (watch is None or snapshot(watch) == before)
                 and (must_not_exist is None or not must_not_exist.exists()))
        with self.counting:
            self.bad_inputs += 1
            self.clear += clear
        print(f"bad input {name}: clear={clear} exit {result.returncode}: {errors[0][:160] if errors else ''}",
              flush=True)

    def bad_inputs_table(self) -> None:
        fresh = self.work / "bad-run"
        binary = self.work / "binary-data"
        binary.mkdir()
        (binary / "train.tsv").write_bytes(bytes(range(128, 256)) * 8)
        shutil.copy(self.data / "dev.tsv", binary / "dev.tsv")
        afile = self.work / "a-file"
        afile.write_text("x")
        finished = self.work / "finished"
        shutil.copytree(self.reference, finished)
        nan_run = self.work / "nan-checkpoint"
        shutil.copytree(self.reference, nan_run)
        poison(nan_run / "checkpoints" / "best" / "adapter_model.safetensors")
        truncated = self.work / "truncated-checkpoint"
        shutil.copytree(self.reference, truncated)
        weights = truncated / "checkpoints" / "best" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        train = "kasa.cli.train"
        cases = [
            ("unknown recipe", train, self.args(fresh, "recipe=glue/nope")),
            ("unknown key", train, self.args(fresh, "trainer.no_such_key=1")),
            ("wrong type", train, self.args(fresh, "trainer.epochs=abc")),
            ("epochs 0", train, self.args(fresh, "trainer.epochs=0")),
            ("grad_accum 0", train, self.args(fresh, "trainer.grad_accum=0")),
            ("negative lr", train, self.args(fresh, "trainer.lr=-1")),
            ("negative beta", train, self.args(fresh, "method.beta=-1")),
            ("rank too large", train, self.args(fresh, "method.rank=64")),
            ("missing data dir", train, self.args(fresh, f"task.data_dir={self.work / 'nowhere'}")),
            ("binary data file", train, self.args(fresh, f"task.data_dir={binary}")),
            ("output dir is a file", train, self.args(afile)),
            ("output dir in /proc", train, self.args(Path("/proc/kasa-run"))),
            ("Hub id without network", train, [*self.args(fresh), "model.path=null", "model.name=some-org/model"]),
        ]
        calls = [(name, module, args, None, fresh / "summary.json") for name, module, args in cases] + [
            ("finished run again", train, self.args(finished), finished, None),
            ("finished run, resume with lr changed", train, self.args(finished, "resume=auto", "trainer.lr=0.5"),
             finished, None),
            ("truncated checkpoint (kasa-eval)", "kasa.cli.evaluate", [f"checkpoint={truncated}"], None, None),
            ("NaN checkpoint (kasa-eval)", "kasa.cli.evaluate", [f"checkpoint={nan_run}"], None, None),
        ]
        with ThreadPoolExecutor(self.jobs) as pool:
            for done in [pool.submit(self.bad_input, *call) for call in calls]:
                done.result()


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run but the lock file, which each attempt rewrites with its own pid."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".kasa.lock"}


def poison(weights: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(weights))


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL cases at random steps (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random fault points")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kasa-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    suite = Suite(work, args.seed, args.jobs)
    cases = [*[lambda: suite.signal_case("SIGKILL", -9)] * args.kills, lambda: suite.signal_case("SIGTERM", 75),
             lambda: suite.signal_case("SIGINT", 75), suite.kill_in_save, suite.concurrent, suite.disk_full,
             lambda: suite.broken_newest_checkpoint("corrupt"), lambda: suite.broken_newest_checkpoint("non-finite"),
             suite.bad_inputs_table]
    with ThreadPoolExecutor(args.jobs) as pool:  # each case drives its own processes in its own folder
        for done in [pool.submit(case) for case in cases]:
            done.result()
    print(json.dumps({"faults": suite.faults, "survived": suite.survived, "records_intact": suite.intact,
                      "bad_inputs": suite.bad_inputs, "clear_errors": suite.clear, "tmpfs": suite.tmpfs,
                      "seconds": round(time.perf_counter() - start)}))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
