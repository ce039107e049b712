"""Bad input, one test each (the table in the README): one clear line naming the problem and the fix, a non-zero
exit, and nothing overwritten."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line_error, make_tiny_bert, run_cli, run_cli_process, train_args, write_tsv
from kasa.run_dir import LOCK_FILE, SWEEP_RECORDS
from kasa.tasks.models import VOCABULARY_FILES


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["recipe=glue/no_such_recipe"], ["unknown recipe 'glue/no_such_recipe'", "glue/roberta_base_cola", "demo"]),
        (["task=no_such_task"], ["unknown task 'no_such_task'", "glue/cola"]),
        (["method=no_such_method"], ["unknown method 'no_such_method'", "kasa, kasa_l2"]),
        (["method.method=nope"], ["unknown method 'nope'"]),
        (["trainer.no_such_key=1"], ["unknown key trainer.no_such_key", "valid keys under trainer: epochs"]),
        (["sed=1"], ["unknown key sed (did you mean seed?); valid keys: model, task"]),
        (["trainer.lrr=1"], ["unknown key trainer.lrr (did you mean trainer.lr?); valid keys under trainer: epochs"]),
        # the method's keys as composition knows them: the module keys, which follow the model, are not listed
        (["method.no_such_key=1"], ["unknown key method.no_such_key", "valid keys under method: method, rank",
                                    "dropout, beta"]),
        (["method.target_modules=[query]"], ["method.target_modules follows the model",
                                             "set model.target_modules=... instead"]),
        (["method.beta=[1"], ["cannot parse the overrides"]),
        (["seed=0,1"], ["Ambiguous value for argument 'seed=0,1'", "run with --multirun", "'key=[a,b]'"]),
        (["+trainer.epochs=3"], ["An item is already at 'trainer.epochs'", "drop the + to set this one"]),
        (["method.svd_method=qr"], ["unknown svd_method 'qr'; choose one of: gram, svd"]),  # refused after the load
        (["method.svd_device=gpu0"], ["method.svd_device=gpu0 is not a device"]),  # a traceback, or unused if cached
        (["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
        (["trainer.grad_accum=0"], ["trainer.grad_accum=0"]),
        (["trainer.batch_size=0"], ["trainer.batch_size=0"]),
        (["trainer.lr=-1"], ["trainer.lr=-1"]),
        (["trainer.epochs=abc"], ["wrong value for trainer.epochs", "could not be converted",
                                  "it takes a whole number, e.g. trainer.epochs=3"]),
        (["logging.trackers=wandb"], ["wrong value for logging.trackers",
                                      "it takes a list, e.g. 'logging.trackers=[wandb]' (quoted for the shell)"]),
        (["trainer.packing=maybe"], ["wrong value for trainer.packing", "it takes true or false"]),
        (["method.beta=-1"], ["beta must be >= 0"]),
        (["method.gamma=nan"], ["method.gamma must be >= 0 and finite, got nan"]),  # the loss was nan at step 1
        (["~trainer.lr"], ["~trainer.lr: kasa's settings cannot be removed, only set: write trainer.lr=<value>"]),
        # a removed group leaves its mandatory name unset: named with the group's options (walk AW)
        (["~model"], ["model.name has no value: choose a model with model=<option> (one of: ", "minilm_l6",
                      "or set it with model.name=<value>"]),
        (["~task"], ["task.name has no value: choose a task with task=<option> (one of: ", "glue/cola"]),
        # OmegaConf's missing marker on a setting with a default: the run took the default and recorded "???" (walk AZ)
        (["trainer.lr=???"], ["trainer.lr has no value: set it with trainer.lr=<value>"]),
        (["method.method=???"], ["method.method has no value: choose a method with method=<option> (one of: "]),
        # an interpolation that fails names what it read, not the keys beside the value (walk AZ)
        (["method.rank=${task.nope}"], ["invalid config at method.rank: Interpolation key 'task.nope' not found"]),
        (["method.alpha=0"], ["alpha must be > 0"]),  # trained nothing
        (["seed=-1"], ["seed=-1 is not allowed"]),
        (["recipe=null"], ["a config group (recipe, model, task, method) takes the name of one of its options, not "
                           "null"]),  # Hydra's "must be a string or a list. Got NoneType" (walk AW)
        (["task.num_labels=0"], ["task.num_labels=0 is not allowed"]),  # blamed task.metric (walk AW)
        # decoding settings failed at the first evaluation, after training
        (["task.generation.do_sample=true", "task.generation.temperature=0"], ["task.generation.temperature=0.0"]),
        (["task.generation.top_p=2"], ["task.generation.top_p=2.0", "(0, 1]"]),
        (["trainer.packing=true"], ["trainer.packing packs the examples of the generation tasks",
                                    "trainer.group_by_length=true"]),  # a GLUE task ignored it
        (["method.rank=64"], ["must be < min(n, m)"]),
        (["model.target_modules=[nope]"], ["no module matches", "linear layers in this model"]),
        # a longer row failed with a tensor-size traceback after the model had loaded (walk CB)
        (["trainer.max_length=65"], ["trainer.max_length=65 is more than the 64 positions that",
                                     "(bert.embeddings.position_embeddings): set trainer.max_length=64 or less"]),
        # a model of another kind under the default model group's BERT head (walk CA): it named no fix
        (["model.head_modules=[score]"], ["no module matches 'score' of trainable_modules ['score']",
                                          "its top-level modules: ['bert', 'dropout', 'classifier']",
                                          "model.head_modules=[]"]),
        (["model.dtype=float8"], ["unknown model.dtype 'float8'", "float32, bfloat16, float16"]),
        (["model.attn_implementation=flash"], ["unknown model.attn_implementation 'flash'", "sdpa"]),
        pytest.param(["model.attn_implementation=flash_attention_2"], ["needs a CUDA GPU and the flash-attn package"],
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU may have flash-attn")),
    ],
)
def test_bad_config(tiny_model, sentiment_dir, tmp_path, overrides, fragments):
    run_dir = tmp_path / "run"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir), *overrides)
    assert_one_line_error(result, *fragments)
    assert "Warning" not in result.stderr, result.stderr
    if "$" in overrides[0]:
        assert "valid keys" not in result.stderr, result.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()


def test_an_added_unknown_method_key_lists_only_the_keys_that_can_be_set(tiny_model, sentiment_dir, tmp_path):
    """+method.foo=1 listed target_modules, fused_modules and trainable_modules among the valid keys, which are then
    refused as following the model (walk AW)."""
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, tmp_path / "run"), "+method.foo=1")
    assert_one_line_error(result, "unknown key method.foo", "valid keys under method: method, rank")
    assert "target_modules" not in result.stderr and "trainable_modules" not in result.stderr, result.stderr


@pytest.mark.parametrize("sweep, removed, fragment", [
    ([], "~task", "task.name has no value: choose a task with task=<option>"),
    (["--multirun"], "~task", "task.name has no value: choose a task with task=<option>"),
    # the sweep's check set each job's default folder over the user's output_dir=???: the job failed after the sweep
    # began, leaving its folder and a resume command that failed again (walk AZ)
    (["--multirun"], "output_dir=???", "sweep job #0 (): output_dir has no value: set it with output_dir=<value>; no "
                                       "job has run"),
])
def test_a_setting_with_no_value_stops_the_start_in_one_line(tiny_model, sentiment_dir, tmp_path, monkeypatch, sweep,
                                                             removed, fragment):
    """The default run and sweep folders' names read ${task.name}: Hydra's callbacks met the unset name first and
    printed their own warning, with the key they were resolving, before kasa's line."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in train_args(tiny_model, sentiment_dir, tmp_path / "run") if not a.startswith("hydra.run.dir=")]
    result = run_cli("kasa.cli.train", *sweep, *args, removed)
    assert_one_line_error(result, fragment)
    assert "Warning" not in result.stderr and list(tmp_path.iterdir()) == [], result.stderr


@pytest.mark.parametrize("override", ["trainer.lr=-1", "model.dtype=float8", "model.attn_implementation=flash"])
def test_a_refused_value_leaves_no_run_directory(tiny_model, sentiment_dir, tmp_path, override):
    """Checked before kasa locks or writes the folder; Hydra has created it, empty, by then, and it goes, with the
    parents Hydra created for it."""
    run_dir = tmp_path / "runs" / "demo" / "run"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir), override)
    assert_one_line_error(result, override.split("=")[0])
    assert list(tmp_path.iterdir()) == []


def test_a_start_refused_after_the_lock_leaves_no_run_directory(tiny_model, tmp_path):
    """Refused once the folder is locked (its data): the lock file and the folder go too; a folder with anything
    else in it stays as it was."""
    run_dir = tmp_path / "runs" / "run"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "nowhere", run_dir))
    assert_one_line_error(result, "nowhere", "task.data_dir")
    assert list(tmp_path.iterdir()) == []  # the parent Hydra created too
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "nowhere", run_dir))
    assert_one_line_error(result, "nowhere", "task.data_dir")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, "notes.txt"]


def test_an_override_the_method_does_not_use_is_a_warning_before_the_start(tiny_model, tmp_path):
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "nowhere", tmp_path / "run"),
                     "method=lora", "method.beta=0.5")
    assert "warning: method.beta=0.5 changes nothing with method=lora: it applies to kasa_l2, kasa\n" in result.stderr
    assert_one_line_error(result, "task.data_dir")  # refused after the warning: the override is not an error


@pytest.mark.parametrize("record", SWEEP_RECORDS)
def test_a_sweeps_folder_is_not_a_run_directory(tiny_model, sentiment_dir, tmp_path, record):
    """`resume=auto hydra.run.dir=<sweep dir>` trained a run beside the sweep's runs; refused, the folder untouched."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0").mkdir(parents=True)
    (sweep_dir / record).write_text("")
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, sweep_dir), "resume=auto")
    assert_one_line_error(result, f"hydra.run.dir={sweep_dir} is a sweep's folder ({record})",
                          f"hydra.sweep.dir={sweep_dir} resume=auto")
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(["0", record])


def test_missing_data_dir(tiny_model, tmp_path):
    result = run_cli("kasa.cli.train", *train_args(tiny_model, tmp_path / "nowhere", tmp_path / "run"))
    assert result.returncode == 2
    assert_one_line_error(result, "nowhere", "task.data_dir")


@pytest.mark.parametrize(
    "train_rows, header, fragment",
    [
        ([], ["sentence", "label"], "empty"),
        ([["the movie was good", 1]], ["text", "target"], "task.text_fields"),
    ],
)
def test_empty_or_wrong_columns(tiny_model, tmp_path, train_rows, header, fragment):
    data = tmp_path / "data"
    write_tsv(data / "train.tsv", header, train_rows)
    write_tsv(data / "dev.tsv", ["sentence", "label"], [["the movie was good", 1]])
    result = run_cli("kasa.cli.train", *train_args(tiny_model, data, tmp_path / "run"))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_hub_model_without_network(sentiment_dir, tmp_path):
    args = [a for a in train_args(Path("unused"), sentiment_dir, tmp_path / "run") if not a.startswith("model.path")]
    result = run_cli("kasa.cli.train", *args, "model.path=null", "model.name=some-org/some-model")
    assert result.returncode == 2
    assert_one_line_error(result, "some-org/some-model", "model.path=")


@pytest.mark.parametrize("layout", ["empty", "package"])
def test_a_model_folder_without_config_json(tiny_model, sentiment_dir, tmp_path, layout):
    """An existing folder that holds no model (model.path=/tmp, or a pip model package's own folder instead of its
    model/ subfolder) failed in the tokenizer with "Couldn't instantiate the backend tokenizer from one of:", cut off
    at the colon, naming neither the folder nor the fix."""
    folder = tmp_path / "models"
    folder.mkdir()
    if layout == "package":
        shutil.copytree(tiny_model, folder / "model")
    args = [a for a in train_args(tiny_model, sentiment_dir, tmp_path / "run") if not a.startswith("model.path")]
    result = run_cli("kasa.cli.train", *args, f"model.path={folder}")
    hint = [f"e.g. model.path={folder / 'model'}"] if layout == "package" else []
    assert_one_line_error(result, f"model.path='{folder}' holds no config.json",
                          "pass the folder holding config.json and the weights", *hint)
    assert not (tmp_path / "run").exists()


def test_a_gguf_file_in_a_subfolder_is_named(tmp_path):
    from kasa.config import ModelConfig
    from kasa.tasks.models import ModelLoadError, load_tokenizer

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.gguf").write_bytes(b"")  # refused before anything reads it
    with pytest.raises(ModelLoadError, match=rf"its GGUF files are \[\], e.g. model.path={tmp_path / 'model'}$"):
        load_tokenizer(ModelConfig(name="tiny", path=str(tmp_path), gguf_file="m.gguf"))


def test_a_model_folder_without_tokenizer_files(tiny_model, sentiment_dir, tmp_path):
    """What a model's save_pretrained writes alone: transformers built a BERT tokenizer of 5 words from config.json
    (every word [UNK]) and the run trained to chance without a word; other models failed with a cut-off message."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name in VOCABULARY_FILES:
        (folder / name).unlink(missing_ok=True)
    args = [a for a in train_args(tiny_model, sentiment_dir, tmp_path / "run") if not a.startswith("model.path")]
    result = run_cli("kasa.cli.train", *args, f"model.path={folder}")
    assert_one_line_error(result, f"model.path='{folder}' holds no tokenizer files (one of tokenizer.json, vocab.txt",
                          "save the tokenizer into it too")
    assert not (tmp_path / "run").exists()


def test_a_gguf_file_or_a_folder_of_them_as_model_path_is_told_model_gguf_file(tmp_path):
    from kasa.config import ModelConfig
    from kasa.tasks.models import ModelLoadError, load_tokenizer

    (tmp_path / "m.gguf").write_bytes(b"")  # refused before anything reads it
    with pytest.raises(ModelLoadError, match=rf"^model.path='{tmp_path / 'm.gguf'}' is a GGUF file: pass its folder and "
                                             rf"its name, model.path='{tmp_path}' model.gguf_file='m.gguf'$"):
        load_tokenizer(ModelConfig(name="tiny", path=str(tmp_path / "m.gguf")))
    with pytest.raises(ModelLoadError, match=rf"^model.path='{tmp_path}' holds GGUF files and no config.json: name one "
                                             r"as model.gguf_file \(e.g. model.gguf_file='m.gguf'; the folder has"):
        load_tokenizer(ModelConfig(name="tiny", path=str(tmp_path)))


def test_an_encoder_is_refused_for_a_causal_lm_task():
    """transformers maps BERT and RoBERTa to a ...ForCausalLM too, which attends to the tokens it predicts."""
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    from kasa.tasks.models import ModelLoadError, check_decoder

    for config in (BertConfig(), RobertaConfig()):
        with pytest.raises(ModelLoadError, match=rf"^m is an encoder \({config.model_type}\), whose attention sees the "
                                                 "tokens it is to predict: a generation task needs a decoder-only"):
            check_decoder(config, "m")
    check_decoder(BertConfig(is_decoder=True), "m")
    check_decoder(LlamaConfig(), "m")


@pytest.fixture(scope="module")
def finished_run(tiny_model, sentiment_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_dir, "trainer.epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_truncated_checkpoint(finished_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(finished_run, run_copy)
    weights = run_copy / "checkpoints" / "best" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = run_cli("kasa.cli.evaluate", f"checkpoint={run_copy}")
    assert result.returncode == 2
    assert_one_line_error(result, "truncated")


def test_checkpoint_from_another_base_model(finished_run, tmp_path):
    other = make_tiny_bert(tmp_path / "wider-bert", hidden_size=48)
    result = run_cli("kasa.cli.evaluate", f"checkpoint={finished_run}", f"model.path={other}")
    assert result.returncode == 2
    assert_one_line_error(result, "saved for base model")


@pytest.mark.parametrize("override, fragments", [
    ("task.text_fields=sentence", ["wrong value for task.text_fields",
                                   "it takes a list, e.g. 'task.text_fields=[sentence]'"]),
    # an unknown key said as composition says it, kasa-eval's own keys (split, ...) among the valid ones
    ("task.no_such_key=1", ["unknown key task.no_such_key; valid keys under task: name"]),
    # only the keys it takes: not the training-only ones nor the method (walk AW), which it would refuse
    ("splt=test", ["unknown key splt (did you mean split?); valid keys: checkpoint, which, split, merge, batch_size, "
                   "model, task, trainer, logging, seed"]),
    ("trainer.lrr=1", ["unknown key trainer.lrr; valid keys under trainer: eval_batch_size, max_length, precision, "
                       "allow_cpu"]),
    # a config group, which only composition can swap (it was a traceback, exit 1)
    ("model=roberta_base", ["model=roberta_base would replace the saved run's whole model settings",
                            "override single settings instead", "or train a run with model=roberta_base"]),
])
def test_kasa_eval_override_of_the_saved_config(finished_run, override, fragments):
    result = run_cli("kasa.cli.evaluate", f"checkpoint={finished_run}", override)
    assert_one_line_error(result, *fragments)
    assert not any(key in result.stderr for key in ("method", "output_dir", "resume", "recipe", "lr,")), result.stderr


@pytest.mark.parametrize("override", ["method.rank=2", "method=lora", "model.target_modules=[query,key]",
                                      "method.truncation_basis=weight", "model.head_modules=[classifier]",
                                      "model.fused_modules={}", "model.fused_modules.c_attn=[q]"])
@pytest.mark.parametrize("module", ["kasa.cli.evaluate", "kasa.cli.export"])
def test_the_adapter_settings_come_from_the_checkpoint(finished_run, tmp_path, module, override):
    """The adapter is rebuilt from adapter_config.json: an override of the method or its targets changed nothing,
    yet kasa-eval filed the result as another evaluation (method=lora failed on an unrelated check)."""
    result = run_cli(module, f"checkpoint={finished_run}", f"output={tmp_path / 'out'}", override) if \
        module.endswith("export") else run_cli(module, f"checkpoint={finished_run}", override)
    assert_one_line_error(result, f"{override}: the adapter is rebuilt as it was trained, from the checkpoint's "
                          "adapter_config.json", "leave it out")
    assert not (tmp_path / "out").exists()


def test_an_empty_section_replaced_whole_is_one_line(finished_run):
    """A saved run's empty section (a BERT run's model.fused_modules: {}) replaced whole raised StopIteration while
    the message looked for one of its keys to show (walk AR)."""
    from kasa.run_dir import load_run_config

    with pytest.raises(ValueError, match=r"would replace the saved run's whole model.fused_modules settings.*"
                                         r"override single settings instead, or train"):
        load_run_config(finished_run, ["model.fused_modules={}"])


@pytest.mark.parametrize("override", ["trainer.lr=1", "output_dir=elsewhere", "trainer.packing=true"])
def test_kasa_export_refuses_what_only_training_reads(finished_run, tmp_path, override):
    """kasa-eval refused them; kasa-export accepted them, recorded them in kasa_export.json and changed nothing."""
    result = run_cli("kasa.cli.export", f"checkpoint={finished_run}", f"output={tmp_path / 'out'}", override)
    key = override.split("=")[0]
    assert_one_line_error(result, f"{override}: only training reads {key}, so it would change nothing kasa-export "
                          "writes", "leave it out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["seed=3", "trainer.eval_batch_size=2", "task.max_eval_samples=4"])
def test_kasa_export_refuses_what_no_export_reads(finished_run, tmp_path, override):
    """Evaluation settings and the seed: accepted, recorded in kasa_export.json, and changing nothing."""
    result = run_cli("kasa.cli.export", f"checkpoint={finished_run}", f"output={tmp_path / 'out'}", override)
    assert_one_line_error(result, f"{override}: of the run's settings only model.* change anything kasa-export writes",
                          "leave it out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda text: "{" + text, "Expecting property name enclosed in double quotes"),
    (lambda text: text.replace('"method": {', '"method": {"bogus": 1, ', 1), "unknown key method.bogus"),
    (lambda text: text.replace('"epochs": 1', '"epochs": 0', 1), "trainer.epochs=0 is not allowed"),
])
@pytest.mark.parametrize("module", ["kasa.cli.evaluate", "kasa.cli.export"])
def test_a_hand_edited_run_config_is_named_as_the_file(finished_run, tmp_path, edit, fragment, module):
    """A saved config.json edited by hand or damaged was reported as if an argument were wrong (a bare JSON error,
    "unknown key method.bogus"), never naming the file."""
    run_copy = tmp_path / "run"
    shutil.copytree(finished_run, run_copy)
    config = run_copy / "config.json"
    config.write_text(edit(config.read_text()))
    output = [f"output={tmp_path / 'export'}"] if module == "kasa.cli.export" else []
    assert_one_line_error(run_cli(module, f"checkpoint={run_copy}", *output),
                          f"{config}, the run's saved settings, is edited or damaged: {fragment}")


@pytest.mark.parametrize("allow, fragments", [
    (False, ["differ from its own", "method.method: 'kasa' -> 'lora'", "resume_allow_changes=true"]),
    (True, ["does not match this run"]),  # changes allowed: the checkpoint itself does not fit
])
def test_resume_with_another_method(finished_run, tiny_model, sentiment_dir, tmp_path, allow, fragments):
    run_copy = tmp_path / "run"
    shutil.copytree(finished_run, run_copy)
    (run_copy / "summary.json").unlink()  # unfinished
    before = (run_copy / "checkpoints" / "last" / "adapter_model.safetensors").read_bytes()
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, run_copy, "trainer.epochs=1"),
                     "resume=auto", "method=lora", f"resume_allow_changes={str(allow).lower()}")
    assert_one_line_error(result, *fragments, after_the_model_loaded=allow)  # the checkpoint is read into it
    assert (run_copy / "checkpoints" / "last" / "adapter_model.safetensors").read_bytes() == before


def test_finished_run_resumed_with_other_settings(finished_run, tiny_model, sentiment_dir):
    result = run_cli("kasa.cli.train", *train_args(tiny_model, sentiment_dir, finished_run, "trainer.epochs=1"),
                     "resume=auto", "trainer.lr=0.5")
    assert_one_line_error(result, "already holds a finished run, with other settings (trainer.lr: 0.005 -> 0.5)")



@pytest.mark.parametrize("module, example", [("kasa.cli.evaluate", "kasa-eval checkpoint=runs/<run dir>"),
                                             ("kasa.cli.export", "kasa-export checkpoint=")])
def test_a_command_without_arguments_shows_its_usage_and_one_error_line(module, example):
    result = run_cli(module)
    assert_one_line_error(result, "missing checkpoint=...: e.g. " + example)
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "checkpoint=" in result.stderr.split(
        "error:")[0]  # the usage first


def test_missing_checkpoint(tmp_path):
    result = run_cli("kasa.cli.evaluate", f"checkpoint={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert_one_line_error(result, "no checkpoint at")


def test_a_run_without_an_evaluated_checkpoint_names_its_newest_step_checkpoint(finished_run, tmp_path):
    """A run stopped before its first evaluation (or whose evaluation failed) has step checkpoints only."""
    run_copy = tmp_path / "run"
    shutil.copytree(finished_run, run_copy)
    for name in ("best", "last"):
        shutil.rmtree(run_copy / "checkpoints" / name)
    steps = sorted((run_copy / "checkpoints").glob("step-*"))
    assert steps
    result = run_cli("kasa.cli.evaluate", f"checkpoint={run_copy}")
    assert_one_line_error(result, f"{run_copy} has no best/ or last/ checkpoint", f"e.g. the newest, {steps[-1]}")


@pytest.mark.parametrize("module", ["kasa.cli.evaluate", "kasa.cli.export"])
def test_which_with_a_checkpoint_directory(finished_run, tmp_path, module):
    """which= picks a checkpoint inside a run directory; given with a checkpoint directory it was silently ignored
    (which=last exported best/)."""
    output = [f"output={tmp_path / 'export'}"] if module == "kasa.cli.export" else []
    result = run_cli(module, f"checkpoint={finished_run / 'checkpoints' / 'best'}", "which=last", *output)
    assert_one_line_error(result, "which=last picks a checkpoint inside a run directory",
                          "drop which=, or pass its run directory")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("args, message", [
    (["kasa.cli.compare"], "the following arguments are required: dirs (usage: kasa-compare --help)"),
    (["kasa.cli.plot", "--kind"], "argument --kind: expected one argument (usage: kasa-plot --help)"),
    (["kasa.cli.sweep", "/tmp", "--bogus"], "unrecognized arguments: --bogus (usage: python -m kasa.cli.sweep --help)"),
])
def test_a_flag_command_says_a_usage_error_in_one_line(args, message):
    """argparse's usage block is left out: the one error line names the problem and where the usage is."""
    result = run_cli(*args)
    assert_one_line_error(result, message)
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_script_says_a_usage_error_in_one_line():
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    result = subprocess.run([sys.executable, str(script), "--out"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: argument --out: expected one argument (usage: make_demo_data.py --help)"]


def test_fp16_on_the_cpu_is_said_to_do_nothing(tiny_model, sentiment_dir, tmp_path):
    """Accelerate runs trainer.precision=fp16 in float32 on the CPU without a word; kasa-train says so. (In a process
    of its own: Accelerate's state, which another precision would have to change, is one per process.)"""
    result = run_cli_process("kasa.cli.train", *train_args(tiny_model, sentiment_dir, tmp_path / "run"), "trainer.max_steps=1",
                     "trainer.precision=fp16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("warning: trainer.precision=fp16 has no effect on the CPU (Accelerate runs it in float32); "
            "trainer.precision=bf16 runs mixed precision there") in (result.stdout + result.stderr).splitlines()


def test_accelerates_own_accumulation_setting_is_said_to_be_ignored(tiny_model, sentiment_dir, tmp_path):
    """Accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS over the value kasa passes and divides each loss by
    it: with 4 there and trainer.grad_accum=1, every update was a quarter of the gradient's, without a word."""
    from cli_helpers import ENV

    result = run_cli_process("kasa.cli.train", *train_args(tiny_model, sentiment_dir, tmp_path / "run"),
                             "trainer.max_steps=1", env={**ENV, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("warning: ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 is ignored: a step accumulates trainer.grad_accum=1 "
            "micro-batches") in (result.stdout + result.stderr).splitlines()


@pytest.mark.parametrize("architecture, method, trained, refused", [
    ("LlamaForCausalLM", "kasa", [], "score"),  # walk AL: SmolLM2 on SST-2 trained under a random, frozen head
    ("LlamaForCausalLM", "kasa", ["score"], None),
    ("LlamaForCausalLM", "full", [], None),  # every weight trains
    ("LlamaForSequenceClassification", "kasa", [], None),  # the checkpoint's own head: frozen on purpose
    ("LlamaForSequenceClassification/3", "kasa", [], "score"),  # walk AN: a head of 3 labels is replaced by 2
    ("BertModel", "lora", ["pooler"], "classifier"),
    ("BertModel", "lora", ["classifier", "pooler"], None),
])
def test_a_new_classification_head_must_train(architecture, method, trained, refused):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from kasa.config import RunConfig
    from kasa.training.preflight import check_new_head_trains

    architecture, _, labels = architecture.partition("/")
    if architecture.startswith("Bert"):
        config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, architectures=[architecture])
        model_class = BertForSequenceClassification
    else:
        config = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, architectures=[architecture])
        model_class = LlamaForSequenceClassification
    with torch.device("meta"):
        model = model_class(config)
    checkpoint = config.__class__(**{**config.to_dict(), "num_labels": int(labels or 2)})  # as saved
    cfg = RunConfig()
    cfg.task.kind, cfg.task.num_labels, cfg.method.method, cfg.method.trainable_modules = "glue", 2, method, trained
    if refused is None:
        check_new_head_trains(cfg, model, checkpoint)
    else:
        with pytest.raises(ValueError, match=rf"^the task's classification head \({refused}\) is new, made at "
                                             rf"random .* train it with model.head_modules=\[{refused}\]$"):
            check_new_head_trains(cfg, model, checkpoint)
