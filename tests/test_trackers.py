"""logging.trackers: one tiny in-process training run logs its config and KaSA's terms to TensorBoard, W&B (offline
mode) and MLflow (a local SQLite store), all inside the test's folder, and its resume continues the same tracker runs;
no credential from the environment ends up in any file written."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from cli_helpers import ENV, assert_one_line_error, run_cli, tiny_run_config, train_args
from kasa.training.trackers import check_trackers, hyperparameters, start_trackers

SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
           "OPENAI_API_KEY": "sk-tracker-test-secret", "MLFLOW_TRACKING_TOKEN": "mlflow-secret-token"}


def test_unknown_or_missing_tracker_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        check_trackers(["comet"])
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_hyperparameters_are_flat_scalars() -> None:
    flat = hyperparameters({"method": {"beta": 1e-4, "target_modules": ["q", "v"], "truncation_rank": None}})
    assert flat == {"method.beta": 1e-4, "method.target_modules": '["q", "v"]', "method.truncation_rank": "null"}


def test_a_tracker_that_cannot_start_is_one_line_naming_it(tmp_path) -> None:
    refused = type("MlflowException", (Exception,), {"__module__": "mlflow.exceptions"})

    class Accelerator:  # what accelerate's init_trackers raises when MLflow refuses its store
        trackers: list = []

        def init_trackers(self, *args, **kwargs):
            raise refused("The filesystem tracking backend is in maintenance mode\nsee the docs")

    with pytest.raises(ValueError, match=r"^cannot start the mlflow tracker of logging.trackers \(The filesystem "
                       r"tracking backend is in maintenance mode\): .*leave it out of logging.trackers$"):
        start_trackers(Accelerator(), ["tensorboard", "mlflow"], {"task": {"name": "demo"}}, tmp_path)
    # continuing the run's MLflow run: a run its server no longer has
    record = re.escape(str(tmp_path / "trackers.json"))
    with pytest.raises(ValueError, match=rf"\(The filesystem tracking backend is in maintenance mode\): fix its "
                       rf"settings \(its environment variables\), or remove {record} to start new tracker runs, or "
                       r"leave it out of logging.trackers$"):
        start_trackers(Accelerator(), ["mlflow"], {"task": {"name": "demo"}}, tmp_path, {"mlflow": "0123abcd"})


def test_a_start_refused_by_one_tracker_leaves_nothing_of_the_others(tmp_path, tiny_model, sentiment_dir) -> None:
    """TensorBoard starts first and writes its log; MLflow then refuses its store: the refused start leaves no
    folder behind, so that the same command, once the store is fixed, starts a run with one TensorBoard log."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    args = train_args(tiny_model, sentiment_dir, run_dir, "trainer.epochs=1", "logging.trackers=[tensorboard,mlflow]")
    refusing = {**ENV, "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}"}  # MLflow 3 refuses a file store
    refusing.pop("MLFLOW_ALLOW_FILE_STORE", None)
    assert_one_line_error(run_cli("kasa.cli.train", *args, env=refusing), "cannot start the mlflow tracker")
    assert not run_dir.exists()

    started = run_cli("kasa.cli.train", *args, env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert started.returncode == 0, started.stderr[-3000:]
    assert len(list((run_dir / "tensorboard").glob("*/events.out.tfevents.*"))) == 1  # one log (and its hparams')


def test_wandb_is_quiet_unless_its_own_variables_say_otherwise(tmp_path, monkeypatch) -> None:
    """W&B printed a 30-line history and summary amid kasa's console at the end of every run."""
    class Accelerator:
        trackers: list = []
        is_main_process = True

        def init_trackers(self, project, init_kwargs):
            self.init_kwargs = init_kwargs

    for name in ("WANDB_QUIET", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    accelerator = Accelerator()
    start_trackers(accelerator, ["wandb"], {"task": {"name": "demo"}}, tmp_path)
    assert accelerator.init_kwargs["wandb"]["settings"] == {"quiet": True}
    monkeypatch.setenv("WANDB_QUIET", "false")
    start_trackers(accelerator, ["wandb"], {"task": {"name": "demo"}}, tmp_path)
    assert "settings" not in accelerator.init_kwargs["wandb"]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """mlflow, with a local store in the test's folder (MLflow 3 refuses new file stores: a SQLite database), named
    by the variable users set and for this process too: `mlflow.set_tracking_uri`, which outranks the variable, may
    still hold an earlier test's store."""
    mlflow = pytest.importorskip("mlflow")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return mlflow


@pytest.mark.parametrize("record", ["multirun.yaml", "sweep_jobs.json", None])
def test_a_sweeps_jobs_are_grouped_in_the_trackers(tmp_path, record) -> None:
    class Accelerator:  # records what accelerate's init_trackers gets
        is_main_process, trackers = True, []

        def init_trackers(self, project, init_kwargs):
            self.init_kwargs = init_kwargs

    sweep = tmp_path / "sweeps" / "cola" / "2026-12-05_17-30-00"
    (sweep / "3").mkdir(parents=True)
    if record:
        (sweep / record).write_text("")
    accelerator = Accelerator()
    config = {"task": {"name": "cola"}, "method": {"method": "kasa"}}
    assert start_trackers(accelerator, ["wandb", "mlflow"], config, sweep / "3") == {}
    wandb, mlflow = accelerator.init_kwargs["wandb"], accelerator.init_kwargs["mlflow"]
    assert wandb["name"] == mlflow["run_name"] == "cola/kasa/3"
    if record:
        assert wandb["group"] == "cola/2026-12-05_17-30-00" and mlflow["tags"] == {"kasa.sweep": str(sweep)}
    else:
        assert "group" not in wandb and "tags" not in mlflow


def _tensorboard_hparams(run: Path) -> list[Path]:
    """The event files holding hyperparameters (SummaryWriter.add_hparams writes each into a folder of its own)."""
    return sorted(path for path in (run / "tensorboard").rglob("events.out.tfevents.*")
                  if b"_hparams_/session_start_info" in path.read_bytes())


@pytest.mark.slow  # the W&B service and MLflow's database take a while to start
def test_a_run_logs_to_every_tracker_its_resume_continues_them_and_no_key_is_written(tmp_path, monkeypatch,
                                                                                    mlflow_store) -> None:
    pytest.importorskip("wandb")
    mlflow = mlflow_store
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kasa.training.loop import train

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.chdir(tmp_path)  # anything a tracker writes into the working directory lands here too

    cfg = tiny_run_config(tmp_path)
    cfg.logging.trackers, cfg.trainer.epochs = ["tensorboard", "wandb", "mlflow"], 2
    train(cfg, dataclasses.asdict(cfg))

    events = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "task_loss", "l2", "l3", "aux_loss", "eval/accuracy"} <= set(events.Tags()["scalars"])

    offline_runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    logged = b"".join(path.read_bytes() for path in offline_runs[0].rglob("*.wandb"))
    assert b"method.beta" in logged and b"l3" in logged

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    assert runs[0].data.params["method.method"] == "kasa"
    assert {"l2", "l3", "loss", "eval/accuracy"} <= set(runs[0].data.metrics)

    # Killed after epoch 1's checkpoint: resume=auto continues the same W&B and MLflow runs (W&B offline writes a
    # second folder under the same run id; syncing joins them) and logs only what they do not have yet.
    recorded = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert recorded == {"wandb": offline_runs[0].name.rsplit("-", 1)[1], "mlflow": runs[0].info.run_id,
                        "tensorboard": "tensorboard/kasa"}
    hparams_logs = _tensorboard_hparams(tmp_path / "run")
    assert len(hparams_logs) == 1
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    shutil.rmtree(checkpoints[-1])
    (tmp_path / "run" / "summary.json").unlink()
    resumed = dataclasses.replace(cfg, resume="auto")
    train(resumed, dataclasses.asdict(resumed))
    assert (tmp_path / "run" / "summary.json").is_file()
    offline_runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and {path.name.rsplit("-", 1)[1] for path in offline_runs} == {recorded["wandb"]}
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [run.info.run_id for run in runs] == [recorded["mlflow"]]
    assert runs[0].data.params["resume"] == "null"  # the hyperparameters of the run's start
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == recorded
    assert _tensorboard_hparams(tmp_path / "run") == hparams_logs  # the run's start's, not a second trial
    train_steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if r["type"] == "train"]
    assert train_steps == list(range(1, len(train_steps) + 1))
    history = mlflow.MlflowClient().get_metric_history(recorded["mlflow"], "loss")
    assert sorted(point.step for point in history) == train_steps  # each step once
    assert len(mlflow.MlflowClient().get_metric_history(recorded["mlflow"], "eval/accuracy")) == 2

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 10
    for path in written:
        content = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in content, f"{name} was written into {path}"


def test_a_run_saved_with_the_old_tensorboard_flag_still_loads(tmp_path) -> None:
    from kasa.run_dir import load_run_config

    config = dataclasses.asdict(tiny_run_config(tmp_path))
    config["logging"] = {"tensorboard": True, "progress": False}  # a config.json written before logging.trackers
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert load_run_config(tmp_path / "run").logging.trackers == ["tensorboard"]


@pytest.mark.slow  # MLflow's database takes a while to start
def test_a_failed_run_closes_its_tracker_runs_so_the_next_job_can_start(tmp_path, monkeypatch, mlflow_store) -> None:
    """The jobs of a --multirun run in one process: a job that fails (here a diverging learning rate) must not leave
    its MLflow run active, which MLflow would refuse to start the next job's beside."""
    mlflow = mlflow_store
    from kasa.training.loop import train

    monkeypatch.chdir(tmp_path)
    failing = tiny_run_config(tmp_path)
    failing.logging.trackers, failing.trainer.lr, failing.output_dir = ["mlflow"], 1e12, str(tmp_path / "0")
    with pytest.raises(FloatingPointError):
        train(failing, dataclasses.asdict(failing))
    assert mlflow.active_run() is None
    working = dataclasses.replace(failing, trainer=dataclasses.replace(failing.trainer, lr=5e-3),
                                  output_dir=str(tmp_path / "1"))
    train(working, dataclasses.asdict(working))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted((run.info.run_name.rsplit("/", 1)[1], run.info.status) for run in runs) == [
        ("0", "FAILED"), ("1", "FINISHED")]


def test_a_tracker_error_names_the_tracker_whose_code_raised_it() -> None:
    """MLflow raises plain Exceptions too: the tracker is found from the innermost frame in its package."""
    from kasa.training.trackers import _failing_tracker

    code = compile("raise Exception('Run with UUID 0123 is already active')",
                   "/site-packages/mlflow/tracking/fluent.py", "exec")
    with pytest.raises(Exception) as raised:
        exec(code)
    assert _failing_tracker(raised.value, ["tensorboard", "mlflow"]) == "mlflow"
    assert _failing_tracker(ValueError("x"), ["tensorboard", "mlflow"]) == "a"
    assert _failing_tracker(ValueError("x"), ["wandb"]) == "wandb"


def test_an_mlflow_server_out_of_reach_fails_the_start_without_minutes_of_retries(tmp_path, monkeypatch) -> None:
    """MLflow retried an unreachable server 7 times, its pauses doubling, for about 5 minutes before the start's one
    line (walk AP): the start asks it with two retries and a 20 s timeout, unless the user set MLflow's own
    variables, and the run's logging keeps MLflow's defaults."""
    import os

    from kasa.training.trackers import MLFLOW_START_LIMITS

    seen = []

    class Recording:
        trackers: list = []
        is_main_process = True

        def init_trackers(self, *args, **kwargs):
            seen.append({key: os.environ.get(key) for key in MLFLOW_START_LIMITS})

    for key in MLFLOW_START_LIMITS:
        monkeypatch.delenv(key, raising=False)
    start_trackers(Recording(), ["mlflow"], {}, tmp_path)
    assert seen.pop() == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    assert not set(MLFLOW_START_LIMITS) & set(os.environ)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own
    start_trackers(Recording(), ["mlflow"], {}, tmp_path)
    assert seen.pop()["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    start_trackers(Recording(), ["tensorboard"], {}, tmp_path)
    assert seen.pop() == dict.fromkeys(MLFLOW_START_LIMITS) | {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}


def test_an_mlflow_server_out_of_reach_fails_the_start_with_one_line_and_no_retry_lines(tmp_path, tiny_model,
                                                                                         sentiment_dir) -> None:
    """urllib3 printed a `Retrying (Retry(total=1, ...))` line for each retry of the start before kasa's error line
    (walk AR)."""
    pytest.importorskip("mlflow")
    env = {**ENV, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/"}
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, tmp_path / "run", "trainer.epochs=1",
                                                   "logging.trackers=[mlflow]"), env=env)
    assert_one_line_error(result, "cannot start the mlflow tracker")
    assert "Retrying" not in result.stdout + result.stderr, result.stdout
    assert logging.getLogger("urllib3.connectionpool").level == logging.NOTSET  # the run's own logging keeps them


def test_a_tracker_error_does_not_print_the_password_of_a_tracking_uri(tmp_path, tiny_model, sentiment_dir) -> None:
    """MLflow's error names the URI it could not reach, user:password included (walk AB: into SLURM logs)."""
    pytest.importorskip("mlflow")
    env = {**ENV, "MLFLOW_TRACKING_URI": "http://alice:s3cretpw@127.0.0.1:9/"}
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, tmp_path / "run", "trainer.epochs=1",
                                                   "logging.trackers=[mlflow]"), env=env)
    assert_one_line_error(result, "cannot start the mlflow tracker")
    assert "s3cretpw" not in result.stderr + result.stdout and "***@127.0.0.1" in result.stderr


def test_a_fresh_start_over_an_earlier_run_removes_its_tracker_logs(tmp_path, tiny_model, sentiment_dir) -> None:
    """overwrite=true kept the earlier run's TensorBoard log beside the new one (one TensorBoard run showing both
    sessions' steps) and its W&B run folder (walk AB)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    args = train_args(tiny_model, sentiment_dir, run_dir, "trainer.epochs=1", "logging.trackers=[tensorboard,wandb]")
    for extra in ((), ("overwrite=true",)):
        result = run_cli("kasa.cli.train", *args, *extra, env={**ENV, "WANDB_MODE": "offline"})
        assert result.returncode == 0, result.stderr[-3000:]
    logs = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len({path.name.split(".")[4] for path in logs}) == 1  # one process's logs: the second start's
    assert len(list((run_dir / "tensorboard").rglob("hparams.yml"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert (run_dir / "wandb" / "latest-run").resolve() == next((run_dir / "wandb").glob("offline-run-*")).resolve()
