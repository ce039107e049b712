"""The outer sweep for multi-process jobs (scripts/sweep_launch.py): its checks, one launch per combination (here
`python -m kasa.cli.train` stands in for `accelerate launch`), resuming what a stopped sweep left, and the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import ENV, make_deterministic_bert, write_sentiment_data

REPO = Path(__file__).resolve().parents[1]


SWEEP_SCRIPT = REPO / "scripts" / "sweep_launch.py"


def _sweep_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_launch", SWEEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_grid_splits_only_top_level_commas():
    sweep = _sweep_module()
    fixed, jobs = sweep.build_grid(["recipe=glue/roberta_base_cola", "method.beta=1e-4,1e-3",
                                    "model.target_modules=[query,value]", "seed=0,1", "+x='a,b'"])
    assert fixed == ["recipe=glue/roberta_base_cola", "model.target_modules=[query,value]", "+x='a,b'"]
    assert jobs == [["method.beta=1e-4", "seed=0"], ["method.beta=1e-4", "seed=1"],
                    ["method.beta=1e-3", "seed=0"], ["method.beta=1e-3", "seed=1"]]
    assert sweep.build_grid(["seed=0"]) == (["seed=0"], [[]])
    for bad in (["hydra.run.dir=x"], ["--multirun"], ["seed"]):
        with pytest.raises(ValueError):
            sweep.build_grid(bad)


def test_the_grid_takes_the_recipes_own_sweep_as_multirun_does():
    """A recipe's hydra.sweeper.params (the ablation's 5 methods x 5 seeds, the sweeps/ recipes' grids) were ignored:
    one KaSA job where `kasa-train --multirun` runs 25 (walk AW). Its axes come first; a key given on the command
    line replaces the recipe's values in their place."""
    sweep = _sweep_module()
    axes = sweep.recipe_axes_of(["recipe=ablation/roberta_base_cola", "seed=0,1"])
    assert axes == {"method": "lora,svd_lora,kasa_sv,kasa_l2,kasa", "seed": "0,1,2,3,4"}
    fixed, jobs = sweep.build_grid(["recipe=ablation/roberta_base_cola", "seed=0,1"], axes)
    assert fixed == ["recipe=ablation/roberta_base_cola"] and len(jobs) == 10
    assert jobs[:3] == [["method=lora", "seed=0"], ["method=lora", "seed=1"], ["method=svd_lora", "seed=0"]]
    assert sweep.build_grid(["recipe=r", "seed=3"], axes) == (["seed=3", "recipe=r"], [
        [f"method={m}"] for m in ("lora", "svd_lora", "kasa_sv", "kasa_l2", "kasa")])
    assert sweep.recipe_axes_of(["recipe=glue/roberta_base_cola"]) == {}
    assert sweep.recipe_axes_of(["recipe=no/such/recipe"]) == {}  # check_jobs says why, in one line


def test_sweep_launch_runs_each_job_and_summarizes(tmp_path, capfd, monkeypatch):
    """The script runs in this process (its checks and loop), each job in a process of its own."""
    sweep = _sweep_module()
    for name, value in ENV.items():  # what the jobs inherit
        monkeypatch.setenv(name, value)
    model = make_deterministic_bert(tmp_path / "model")
    data = write_sentiment_data(tmp_path / "data")
    sweep_dir = tmp_path / "sweep"
    launcher = f"{sys.executable} -m kasa.cli.train"  # stands in for `accelerate launch ... -m kasa.cli.train`
    args = ["--launcher", launcher, "--sweep-dir", str(sweep_dir),
            f"model.path={model}", f"task.data_dir={data}", "trainer.epochs=1", "trainer.batch_size=16",
            "trainer.max_length=16", "logging.progress=false", "method.svd_cache_dir=null", "method.rank=2",
            "method.beta=1e-4,1e-3"]
    assert sweep.main(["--dry-run", *args]) == 0
    dry = capfd.readouterr().out.splitlines()
    assert [line.split()[-2:] for line in dry] == [["resume=auto", f"hydra.run.dir={sweep_dir / '0'}"],
                                                   ["resume=auto", f"hydra.run.dir={sweep_dir / '1'}"]]
    assert not sweep_dir.exists()

    assert sweep.main(args) == 0, capfd.readouterr().err[-4000:]
    jobs = json.loads((sweep_dir / "sweep_jobs.json").read_text())
    assert [(j["job"], j["returncode"]) for j in jobs] == [(0, 0), (1, 0)]
    for index, beta in enumerate(("1e-4", "1e-3")):
        summary = json.loads((sweep_dir / str(index) / "summary.json").read_text())
        assert summary["beta"] == float(beta) and f"method.beta={beta}" in summary["overrides"]
    for name in ("sweep_summary.md", "sweep_summary.csv", "heatmap.png"):
        assert (sweep_dir / name).is_file(), name
    rows = (sweep_dir / "sweep_summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # a header and one setting per beta

    # Run again with job 1 as if stopped after its last checkpoint: job 0 is skipped, job 1 continues.
    (sweep_dir / "1" / "summary.json").unlink()
    capfd.readouterr()
    assert sweep.main(args) == 0
    again = capfd.readouterr()
    assert again.out.count("already finished, skipped") == 1 and "resumed from" in again.out + again.err
    assert (sweep_dir / "1" / "summary.json").is_file()

    assert sweep.main([*args[:-1], "method.beta=1e-4,-1"]) == 2  # checked before any launch
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "error: job 1 (method.beta=-1): method.beta must be >= 0 and finite, got -1.0: use 0 to switch the term off; no job has run")

    # Another grid in the same folder: a job whose folder holds a finished run with other settings is refused before
    # any job runs, in kasa-train's words (kasa.training.preflight.check_finished_run), one line per such job, and
    # nothing is written; a job whose folder holds its own run (beta 1e-3 in folder 1) is not refused.
    files = {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file() and f.name != ".kasa.lock"}
    refusal = ("error: job {} (method.beta={}): {} already holds a finished run, with other settings (method.beta: {} "
               "-> {}): pass overwrite=true to replace it, or choose another hydra.run.dir (hydra.sweep.dir for a "
               "--multirun sweep, --sweep-dir for scripts/sweep_launch.py); no job has run")
    assert sweep.main([*args[:-1], "method.beta=1e-2,1e-3"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [refusal.format(0, "1e-2", sweep_dir / "0", 0.0001, 0.01)]
    assert sweep.main([*args[:-1], "method.beta=1e-3,1e-4"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [refusal.format(0, "1e-3", sweep_dir / "0", 0.0001, 0.001),
                                                           refusal.format(1, "1e-4", sweep_dir / "1", 0.001, 0.0001)]
    assert files == {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file() and f.name != ".kasa.lock"}


def test_sweep_launch_refuses_a_runs_folder_as_its_sweep_dir(tmp_path, capfd):
    """The jobs would go into <run>/0 and the summary would report the run's own numbers: refused, nothing written."""
    sweep = _sweep_module()
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"task": "cola", "method": "kasa", "metric": "matthews", "best": 0.5}))
    assert sweep.main(["--launcher", "false", "--sweep-dir", str(run), "seed=0,1"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        f"error: --sweep-dir={run} is a run's folder (summary.json), not a sweep's: choose a folder of the sweep's own "
        "with another --sweep-dir"]
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]


def test_sweep_launch_refuses_a_launcher_that_is_not_there(tmp_path, capfd):
    """A misspelt launcher is one error line before anything is made (it used to be found at the first job, after
    the sweep's folder and sweep_jobs.json were written)."""
    sweep = _sweep_module()
    sweep_dir = tmp_path / "sweep"
    assert sweep.main(["--launcher", "acelerate launch -m kasa.cli.train", "--sweep-dir", str(sweep_dir),
                       "seed=0,1"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --launcher 'acelerate launch -m kasa.cli.train': no program 'acelerate' on PATH: check its spelling, "
        "or install it (e.g. 'accelerate launch -m kasa.cli.train', or 'python -m kasa.cli.train' for one process)"]
    assert not sweep_dir.exists()


FAKE_JOB = """
import os, pathlib, signal, sys, time
run_dir = pathlib.Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("hydra.run.dir=")))
run_dir.mkdir(parents=True, exist_ok=True)

def stop(signum, frame):  # as kasa-train does: save, then exit 75
    with (run_dir / "signals").open("a") as f:
        f.write(f"{signal.Signals(signum).name} {os.environ.get('KASA_FORWARDED_SIGNALS')}\\n")
    sys.exit(int(os.environ.get("FAKE_JOB_EXIT", "75")))  # accelerate's launcher exits 143

signal.signal(signal.SIGTERM, stop)
(run_dir / "started").write_text(str(os.getpid()))
time.sleep(60)
"""


def _sweep_of_stand_in_jobs(tmp_path: Path, env: dict, **popen: Any) -> tuple[subprocess.Popen, Path]:
    """scripts/sweep_launch.py running two jobs of FAKE_JOB (seed=0,1), and its folder, once the first job started."""
    model = make_deterministic_bert(tmp_path / "model")
    data = write_sentiment_data(tmp_path / "data")
    (tmp_path / "job.py").write_text(FAKE_JOB)
    sweep_dir = tmp_path / "sweep"
    args = ["--launcher", f"{sys.executable} {tmp_path / 'job.py'}", "--sweep-dir", str(sweep_dir),
            f"model.path={model}", f"task.data_dir={data}", "method.svd_cache_dir=null", "seed=0,1"]
    sweep = subprocess.Popen([sys.executable, str(SWEEP_SCRIPT), *args], env=env, **popen)
    deadline = time.monotonic() + 120
    while not (sweep_dir / "0" / "started").exists():
        assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()
        time.sleep(0.1)
    return sweep, sweep_dir


@pytest.mark.parametrize("job_exit", [75, 143])
def test_a_stop_signal_reaches_the_job_and_stops_the_sweep_with_its_continue_command(tmp_path, job_exit):
    """SIGTERM to the script killed it silently and left its job running, orphaned; running the sweep again then
    failed that job ("in use by another kasa run"). Here a stand-in job records the signals it gets. A job under
    accelerate launch, whose launcher exits 143, was said to have failed."""
    sweep, sweep_dir = _sweep_of_stand_in_jobs(tmp_path, {**ENV, "FAKE_JOB_EXIT": str(job_exit)},
                                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 75, err
    assert (sweep_dir / "0" / "signals").read_text() == "SIGTERM 1\n"  # once, and told that the script handles repeats
    assert not (sweep_dir / "1").exists()  # the sweep stopped after the job
    assert "SIGTERM: the job under way saves a resumable checkpoint and stops, then the sweep stops" in err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM; continue the sweep with: python ")
    assert f"--sweep-dir {sweep_dir}" in err and "seed=0,1" in err
    jobs = json.loads((sweep_dir / "sweep_jobs.json").read_text())
    assert [(j["job"], j["returncode"]) for j in jobs] == [(0, job_exit)]
    assert f"job 0 stopped (exit status {job_exit})" in err and "job 0 failed" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_killed_sweep_stops_its_job(tmp_path):
    """SIGKILL to the script (an out-of-memory kill) left its job training on, orphaned, in a folder that the sweep
    run again then found in use; the job now gets SIGTERM, with which kasa-train saves and stops."""
    sweep, sweep_dir = _sweep_of_stand_in_jobs(tmp_path, ENV, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    sweep.kill()
    sweep.wait()
    deadline = time.monotonic() + 30
    while not (sweep_dir / "0" / "signals").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job = int((sweep_dir / "0" / "started").read_text())
    try:
        assert (sweep_dir / "0" / "signals").read_text() == "SIGTERM 1\n"
    finally:
        try:
            os.kill(job, signal.SIGKILL)  # an orphan left by the code before this fix
        except ProcessLookupError:
            pass
