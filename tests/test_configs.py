"""Every config group file and every recipe composes with Hydra and validates against the schema (kasa.config.RunConfig);
the GLUE recipes carry the hyperparameters of the paper's Tables 6 and 7 (appendix E.1); composing without a recipe
gives the schema's defaults; a typo fails at composition and a metric the task cannot compute at validation.

How the configs are found: the installed package `kasa.conf` (configs/, with `configs/recipe` a link to recipes/ so
that the `recipe` group is found in an editable install too) is used when it is this checkout's configs/ folder and
holds the recipes; otherwise (a non-editable install of another version, a checkout without the link) the test
copies configs/ and recipes/ (as recipe/) into a temporary folder and composes from there. Either way the files
checked are this repository's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kasa.adapters.config import METHODS, AdapterConfig
from kasa.cli.common import default_to_demo
from kasa.training.preflight import unused_override_warnings
from kasa.config import (
    TASK_KIND_NAMES,
    LoggingConfig,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainerConfig,
    register_schema,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = REPO / "recipes"

RECIPE_NAMES = sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
TASKS = sorted(p.relative_to(CONFIGS / "task").with_suffix("").as_posix() for p in (CONFIGS / "task").rglob("*.yaml"))

# ---------------------------------------------------------------------------------------------------------------
# The paper's tables, transcribed column by column (appendix E.1). Table 6 RoBERTa-base columns: MNLI SST-2 MRPC
# CoLA QNLI QQP RTE STS-B; RoBERTa-large has no MNLI / QQP column; Table 7 (DeBERTaV3-base): SST-2 MRPC CoLA QNLI
# RTE STS-B. Common to all: AdamW, warmup ratio 0.06, linear schedule, rank 8 on query and value, alpha 16,
# dropout 0.0.
FIELDS = ("batch_size", "epochs", "lr", "weight_decay", "beta", "gamma", "max_length")
TABLES: dict[str, tuple[list[str], dict[str, list[Any]]]] = {
    "roberta_base": (
        ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"],
        {
            "batch_size": [32, 128, 32, 32, 32, 128, 32, 32],
            "epochs": [100, 100, 100, 100, 10, 100, 100, 40],
            "lr": [5e-4, 5e-4, 4e-4, 4e-4, 4e-4, 5e-4, 4e-4, 3e-4],
            "weight_decay": [0.0] * 8,
            "beta": [2.4e-3, 1e-4, 1e-1, 1e-4, 1e-2, 1e-4, 2.4e-1, 1e-4],
            "gamma": [2.4e-4, 1e-3, 1e-3, 1e-3, 1e-5, 1e-3, 2.4e-4, 1e-5],
            "max_length": [512] * 8,
        },
    ),
    "roberta_large": (
        ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"],
        {
            "batch_size": [64, 32, 32, 8, 32, 32],
            "epochs": [10, 10, 100, 20, 100, 20],
            "lr": [4e-4, 3e-4, 3e-4, 4e-4, 4e-4, 3e-4],
            "weight_decay": [0.1, 0.1, 0.0, 0.0, 0.0, 0.0],
            "beta": [1e-4, 1e-2, 2.4e-1, 1e-2, 1e-4, 1e-3],
            "gamma": [1e-4, 1e-2, 2.4e-4, 1e-3, 1e-3, 1e-2],
            "max_length": [512, 512, 512, 512, 512, 128],
        },
    ),
    "deberta_v3_base": (
        ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"],
        {
            "batch_size": [128, 32, 32, 16, 32, 32],
            "epochs": [10, 10, 100, 20, 100, 20],
            "lr": [5e-4, 4e-4, 4e-4, 4e-4, 5e-4, 4e-4],
            "weight_decay": [0.0] * 6,
            "beta": [1e-4, 1.0, 2.4e-1, 1e-1, 1e-4, 1e-1],
            "gamma": [1e-3, 1.0, 2.4e-4, 1e-1, 1e-3, 1e-1],
            "max_length": [512, 512, 64, 512, 512, 512],
        },
    ),
}
PAPER = {
    f"glue/{model}_{task}": (model, task, {f: values[f][i] for f in FIELDS})
    for model, (tasks, values) in TABLES.items()
    for i, task in enumerate(tasks)
}

GLUE_TASKS = {  # name: (text_fields, num_labels, metric, eval_split)
    "cola": (["sentence"], 2, "matthews", "validation"),
    "sst2": (["sentence"], 2, "accuracy", "validation"),
    "mrpc": (["sentence1", "sentence2"], 2, "accuracy", "validation"),
    "qnli": (["question", "sentence"], 2, "accuracy", "validation"),
    "rte": (["sentence1", "sentence2"], 2, "accuracy", "validation"),
    "stsb": (["sentence1", "sentence2"], 1, "pearson", "validation"),
    "mnli": (["premise", "hypothesis"], 3, "accuracy", "validation_matched"),
    "qqp": (["question1", "question2"], 2, "accuracy", "validation"),
    "wnli": (["sentence1", "sentence2"], 2, "accuracy", "validation"),
}
METRICS = {"accuracy", "f1", "matthews", "pearson", "spearman", "BLEU", "average", "judge_score"}


# ---------------------------------------------------------------------------------------------------------------
# Composition helpers


def _package_is_this_checkout() -> bool:
    spec = importlib.util.find_spec("kasa.conf")
    if spec is None or spec.origin is None:
        return False
    folder = Path(spec.origin).resolve().parent
    return folder == CONFIGS.resolve() and (folder / "recipe" / "demo.yaml").is_file()


@pytest.fixture(scope="module")
def hydra_initialised(tmp_path_factory) -> Iterator[None]:
    """Hydra initialised once for the module on this checkout's configs (see module docstring): a composition then
    costs about half of what initialising Hydra for each one did, over some 300 compositions."""
    register_schema()  # what kasa-train does before composing
    if _package_is_this_checkout():
        context = initialize_config_module(config_module="kasa.conf", version_base="1.3")
    else:
        root = tmp_path_factory.mktemp("conf")
        shutil.copytree(CONFIGS, root / "conf", ignore=shutil.ignore_patterns("recipe", "__pycache__"))
        shutil.copytree(RECIPES, root / "conf" / "recipe", ignore=shutil.ignore_patterns("__pycache__"))
        context = initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3")
    with context:
        yield


@pytest.fixture(scope="module", autouse=True)
def resolvers() -> Iterator[None]:
    """The lead's resolvers (kasa.cli.common.register_resolvers) when present, else stand-ins removed afterwards."""
    try:
        from kasa.cli.common import register_resolvers
    except ImportError:
        register_resolvers = None
    if register_resolvers is not None:
        register_resolvers()
    added = []
    for name in ("package_model", "kasa_resource"):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, lambda arg, _name=name: f"/stand-in/{_name}/{arg}")
            added.append(name)
    yield
    for name in added:
        OmegaConf.clear_resolver(name)


# package_model imports the model's pip package; without it the path cannot resolve, so point it anywhere.
_PACKAGE_MODEL = re.compile(r"\$\{package_model:(\w+)\}")


def _missing_model_package(path: Any) -> bool:
    match = _PACKAGE_MODEL.search(str(path))
    return match is not None and importlib.util.find_spec(match.group(1)) is None


def _compose(overrides: list[str], tmp_path: Path) -> dict[str, Any]:
    """Compose the root config with `overrides` (Hydra initialised by `hydra_initialised`) and return it resolved,
    without the hydra node."""
    overrides = [*overrides, f"output_dir={tmp_path}"]
    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.choices.recipe}
    try:
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        if _missing_model_package(OmegaConf.to_container(job.model, resolve=False).get("path")):
            job.model.path = "/stand-in/model-package"
        return OmegaConf.to_container(job, resolve=True)
    finally:
        HydraConfig.instance().cfg = None


def _validate(data: dict[str, Any]) -> RunConfig:
    run = validate(data)  # builds the dataclasses: AdapterConfig.__post_init__ checks the values
    assert isinstance(run, RunConfig) and isinstance(run.method, AdapterConfig)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_every_paper_cell_has_a_recipe():
    glue = {name for name in RECIPE_NAMES if name.startswith("glue/")}
    assert glue == set(PAPER), f"missing: {set(PAPER) - glue}; unexpected: {glue - set(PAPER)}"
    assert len(PAPER) == 20


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_header(name):
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    # Hydra reads `# @package` only from the leading comment lines that start with `# @`: it must come first.
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# kasa-train")
    if name != "demo":
        assert lines[1] == f"# kasa-train recipe={name}"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_composes_and_validates(hydra_initialised, name, tmp_path):
    data = _compose([f"recipe={name}"], tmp_path)
    run = _validate(data)
    assert data["recipe"] == name
    assert run.output_dir == str(tmp_path)
    assert run.method.target_modules == run.model.target_modules and run.method.target_modules
    assert run.method.trainable_modules == run.model.head_modules
    assert run.method.fused_modules == run.model.fused_modules
    assert run.task.metric in METRICS
    assert run.method.svd_cache_dir and run.method.svd_cache_dir.endswith("/svd")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_matches_the_paper(hydra_initialised, name, tmp_path):
    model, task, expected = PAPER[name]
    run = _validate(_compose([f"recipe={name}"], tmp_path))
    assert run.model.name == OmegaConf.load(CONFIGS / "model" / f"{model}.yaml").name
    assert run.task.name == task and run.task.hub_id == "nyu-mll/glue" and run.task.hub_config == task
    got = {
        "batch_size": run.trainer.batch_size, "epochs": run.trainer.epochs, "lr": run.trainer.lr,
        "weight_decay": run.trainer.weight_decay, "beta": run.method.beta, "gamma": run.method.gamma,
        "max_length": run.trainer.max_length,
    }
    for key in FIELDS:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), f"{name}: {key}"
    assert (run.method.method, run.method.rank, run.method.alpha, run.method.dropout) == ("kasa", 8, 16.0, 0.0)
    assert run.method.orth_form == "authors"
    assert (run.trainer.warmup_ratio, run.trainer.scheduler, run.trainer.warmup_steps) == (0.06, "linear", 0)
    assert run.trainer.max_grad_norm is None and run.trainer.precision == "no"


def test_spot_checks(hydra_initialised, tmp_path):
    run = _validate(_compose(["recipe=glue/roberta_base_cola"], tmp_path))
    assert run.model.name == "FacebookAI/roberta-base" and run.task.metric == "matthews"
    assert (run.trainer.lr, run.trainer.batch_size, run.trainer.epochs) == (4e-4, 32, 100)
    assert (run.method.beta, run.method.gamma) == (1e-4, 1e-3)
    run = _validate(_compose(["recipe=glue/deberta_v3_base_cola"], tmp_path))
    assert run.trainer.max_length == 64
    assert run.method.target_modules == ["query_proj", "value_proj"]
    assert run.method.trainable_modules == ["classifier", "pooler"]
    run = _validate(_compose(["recipe=glue/roberta_large_stsb"], tmp_path))
    assert run.trainer.max_length == 128 and run.task.num_labels == 1 and run.task.metric == "pearson"
    run = _validate(_compose(["recipe=glue/roberta_base_mnli"], tmp_path))
    assert run.task.num_labels == 3 and run.task.eval_split == "validation_matched"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_composes_under_a_recipe(hydra_initialised, method, tmp_path):
    """`recipe=... method=lora` swaps the method and keeps the recipe's values (beta/gamma keys exist everywhere)."""
    run = _validate(_compose(["recipe=glue/roberta_base_mrpc", f"method={method}"], tmp_path))
    assert run.method.method == method
    assert (run.method.beta, run.method.gamma, run.method.rank) == (1e-1, 1e-3, 8)
    assert run.method.target_modules == ["query", "value"]


@pytest.mark.parametrize("overrides, warnings", [
    # the recipe's beta and gamma under method=lora are no override: no warning
    (["method=lora"], []),
    (["method=lora", "method.beta=0.5", "method.svd_cache_dir=null"],
     ["warning: method.beta=0.5 changes nothing with method=lora: it applies to kasa_l2, kasa"]),
    (["method=kasa_sv", "++method.gamma=0.2", "method.init=principal"],
     ["warning: method.gamma=0.2 changes nothing with method=kasa_sv: it applies to kasa"]),
    (["method=full", "method.rank=4"],
     ["warning: method.rank=4 changes nothing with method=full: it applies to every method but full, bitfit"]),
    (["method=kasa", "method.calibration_samples=16"],
     ["warning: method.calibration_samples=16 changes nothing with method.truncation_basis=weight: it applies to "
      "truncation_basis=activation"]),
    (["method=kasa", "method.truncation_basis=activation", "method.calibration_samples=16", "method.beta=0.5"], []),
    # not "applies to truncation_basis=activation", which lora refuses (walk AI)
    (["method=lora", "method.calibration_samples=16"],
     ["warning: method.calibration_samples=16 changes nothing with method=lora: it applies to truncation_basis="
      "activation of the methods that truncate (svd_lora, kasa_sv, kasa_l2, kasa)"]),
])
def test_an_override_the_method_does_not_use_is_named(hydra_initialised, tmp_path, overrides, warnings):
    """A sweep of beta under method=lora trained one run several times, without a word."""
    run = _validate(_compose(["recipe=glue/roberta_base_mrpc", *overrides], tmp_path))
    assert unused_override_warnings(run, ["recipe=glue/roberta_base_mrpc", *overrides]) == warnings


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_model_and_task_composes(hydra_initialised, model, task, tmp_path):
    run = _validate(_compose([f"model={model}", f"task={task}"], tmp_path))
    assert run.model.dtype in ("float32", "bfloat16")
    assert run.method.target_modules == run.model.target_modules
    name = task.split("/")[-1]
    assert run.task.name == name
    if task.startswith("glue/"):
        fields, num_labels, metric, eval_split = GLUE_TASKS[name]
        assert (run.task.text_fields, run.task.num_labels, run.task.metric, run.task.eval_split) == (
            fields, num_labels, metric, eval_split
        )
        assert (run.task.hub_id, run.task.hub_config, run.task.data_dir) == ("nyu-mll/glue", name, None)


def test_svd_cache_dir_follows_the_environment(hydra_initialised, tmp_path, monkeypatch):
    monkeypatch.setenv("KASA_CACHE_DIR", str(tmp_path / "cache"))
    run = _validate(_compose(["recipe=glue/roberta_base_rte"], tmp_path))
    assert run.method.svd_cache_dir == f"{tmp_path / 'cache'}/svd"
    monkeypatch.delenv("KASA_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = _validate(_compose(["recipe=glue/roberta_base_rte"], tmp_path))
    assert run.method.svd_cache_dir == f"{tmp_path / 'home'}/.cache/kasa/svd"


SCHEMAS = {"model": ModelConfig, "task": TaskConfig, "method": AdapterConfig, "trainer": TrainerConfig,
           "logging": LoggingConfig}


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_group_files_use_only_schema_keys(group):
    fields = {f.name for f in dataclasses.fields(SCHEMAS[group])}
    files = sorted((CONFIGS / group).rglob("*.yaml"))
    assert files
    for path in files:
        keys = set(OmegaConf.load(path) or {})
        assert keys <= fields, f"{path.relative_to(REPO)}: unknown keys {keys - fields}"


def test_every_task_kind_has_its_implementation():
    from kasa.tasks import TASK_KINDS

    assert tuple(TASK_KINDS) == TASK_KIND_NAMES


def test_method_files_cover_methods():
    assert {p.stem for p in (CONFIGS / "method").glob("*.yaml")} == set(METHODS)
    for method in METHODS:
        cfg = OmegaConf.load(CONFIGS / "method" / f"{method}.yaml")
        assert cfg.method == method
        assert (CONFIGS / "method" / f"{method}.yaml").read_text().startswith("# ")


def test_no_argument_trains_the_demo_recipe(hydra_initialised, tmp_path):
    for args, recipe in (([], "demo"), (["method=lora", "seed=1"], "demo"), (["--multirun", "seed=0,1"], "demo"),
                         (["task=glue/cola"], None), (["recipe=glue/roberta_base_rte"], None),
                         (["~recipe", "trainer.epochs=1"], None)):  # recorded recipe=demo, unused (walk AW)
        assert (default_to_demo(args)[-1:] == ["recipe=demo"]) == (recipe == "demo"), args
    run = _validate(_compose(["recipe=demo", "method=lora"], tmp_path))
    demo = OmegaConf.load(RECIPES / "demo.yaml")
    assert (run.trainer.lr, run.trainer.epochs, run.trainer.max_length) == (
        demo.trainer.lr, demo.trainer.epochs, demo.trainer.max_length)
    assert run.method.method == "lora" and run.recipe == "demo"


def test_composing_without_a_recipe_gives_the_schema_defaults(hydra_initialised, tmp_path):
    """`kasa-train task=glue/cola model=roberta_base` trains with the trainer's own defaults, never a recipe's."""
    run = _validate(_compose(["task=glue/cola", "model=roberta_base"], tmp_path))
    assert run.recipe is None
    assert run.trainer == TrainerConfig()
    defaults = AdapterConfig(target_modules=["query", "value"], trainable_modules=["classifier"])
    assert dataclasses.replace(run.method, svd_cache_dir=None) == defaults


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "lrr"),
    ("method.target_modules=[query]", "target_modules"),  # one spelling: model.target_modules
    ("model.no_such_key=1", "no_such_key"),
])
def test_a_typo_fails_at_composition(hydra_initialised, tmp_path, override, message):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["recipe=glue/roberta_base_rte", override], tmp_path)
    assert message in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize("overrides, message", [
    (["task=glue/stsb", "task.metric=accuracy"], "pearson, spearman"),
    (["task=glue/cola", "task.metric=BLEU"], "accuracy, matthews, f1"),
    (["recipe=e2e/gpt2_medium", "task.metric=accuracy"], "BLEU"),
    (["recipe=e2e/gpt2_medium", "trainer.eval_batch_size=8"], "task.generation.batch_size"),
    # said when the task was built, ~20 s into the start
    (["recipe=e2e/gpt2_medium", "trainer.packing=true", "trainer.group_by_length=true"],
     "^trainer.packing and trainer.group_by_length are two ways to avoid padding: set one$"),
    (["task=glue/cola", "task.kind=summarization"],
     "^unknown task.kind 'summarization'; choose one of: glue, e2e, instruction, commonsense$"),
])
def test_a_setting_the_task_cannot_use_fails_at_start(hydra_initialised, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(_compose(overrides, tmp_path))


@pytest.mark.parametrize("derived, base", [
    ("ablation/roberta_base_cola", "glue/roberta_base_cola"),
    ("sweeps/roberta_base_mrpc_rank", "glue/roberta_base_mrpc"),
    ("sweeps/roberta_base_rte_truncation", "glue/roberta_base_rte"),
])
def test_ablation_and_sweep_recipes_build_on_the_glue_recipe(hydra_initialised, tmp_path, derived, base):
    got, expected = (_compose([f"recipe={name}"], tmp_path) for name in (derived, base))
    assert {**got, "recipe": None} == {**expected, "recipe": None}


def test_instruction_recipes_share_table_9(hydra_initialised, tmp_path):
    runs = {name: _validate(_compose([f"recipe={name}"], tmp_path))
            for name in ("instruction/gemma_7b_coding", "instruction/llama2_13b_alpaca")}
    for run in runs.values():
        assert (run.method.rank, run.method.dropout, run.method.orth_form, run.trainer.lr, run.trainer.scheduler) == (
            8, 0.05, "authors", 2e-4, "cosine")
    assert runs["instruction/gemma_7b_coding"].trainer.batch_size == 8
    assert runs["instruction/llama2_13b_alpaca"].trainer.batch_size == 16
    assert runs["instruction/llama2_13b_alpaca"].model.target_modules == ["q_proj", "v_proj"]


def test_help_cfg_job_and_a_refused_value_do_not_import_torch(tmp_path):
    """`kasa-train --help` and `--cfg job` compose configs only, and a value the run cannot use is refused from the
    config alone: a fresh interpreter must not load torch, transformers or datasets for them (~5 s; a subprocess:
    what is imported is a property of the process)."""
    code = ("import sys; from kasa.cli.train import main; sys.argv = ['kasa-train', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    for args in (["--help"], ["--cfg", "job", "recipe=glue/roberta_base_rte"],
                 ["trainer.epochs=0", f"hydra.run.dir={tmp_path / 'run'}"]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "HEAVY []" in result.stderr, result.stderr[-2000:]
    assert "error: trainer.epochs=0 is not allowed: it must be an integer >= 1" in result.stderr


def test_default_run_folders_of_runs_started_in_the_same_second_differ(hydra_initialised):
    """Two `kasa-train` started together (one per GPU from a shell loop) must not share the time-stamped folder: the
    second would be refused by the first's lock. One config resolves its stamp once (run and sweep folders agree)."""
    folders = []
    for _ in range(2):
        cfg = compose(config_name="config", overrides=["task=demo"], return_hydra_config=True)
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
        assert run_dir == OmegaConf.select(cfg, "hydra.run.dir")  # cached, as ${now:} is
        assert re.fullmatch(r"runs/\w+/kasa/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", run_dir), run_dir
        assert OmegaConf.select(cfg, "hydra.sweep.dir").endswith(run_dir.rsplit("/", 1)[1])
        folders.append(run_dir)
    assert folders[0] != folders[1]


@pytest.mark.parametrize("args, line", [
    (["trainer.epochs=1", "--multirun", "seed=0,1"], "error: --multirun comes after the key=value overrides, where "
     "Hydra does not read it: put it, with its value if it takes one, before them (kasa-train --multirun "
     "trainer.epochs=1 seed=0,1)"),
    (["trainer.epochs=1", "--cfg", "job"], "error: --cfg comes after the key=value overrides, where Hydra does not "
     "read it: put it, with its value if it takes one, before them"),
])
def test_a_flag_after_the_overrides_is_one_line_saying_where_it_goes(args, line):
    """argparse's usage block named the overrides, and the recipe=demo that kasa adds, as unrecognized."""
    from cli_helpers import run_cli

    result = run_cli("kasa.cli.train", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr[-2000:]


@pytest.mark.parametrize("args, expected", [
    (["--info"], "Installed Hydra Plugins"),  # the recipe=demo kasa adds was taken for --info's value
    (["--info", "defaults"], "| recipe/demo "),
    (["--hydra-help"], "Hydra (1.3"),  # Hydra's own help config has no recipe group
    (["--cfg", "job"], "name: sentence-transformers/all-MiniLM-L6-v2"),
])
def test_hydra_flags_given_alone_print_what_they_ask_for(args, expected):
    from cli_helpers import run_cli

    result = run_cli("kasa.cli.train", *args)
    assert result.returncode == 0 and expected in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("args", [["--cfg"], ["--cfg", "trainer.epochs=1"], ["-c"]])
def test_cfg_without_its_value_is_one_line(args):
    from cli_helpers import run_cli

    result = run_cli("kasa.cli.train", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {args[0]} needs the part of the config to print, job, hydra or all, before the overrides: e.g. "
        "kasa-train --cfg job recipe=glue/roberta_base_cola"], result.stderr[-2000:]


@pytest.mark.parametrize("args", [["--cfg", "jobb", "recipe=demo"], ["-c", "alll"]])
def test_cfg_with_an_unknown_part_is_one_line(args):
    """argparse printed its 7-line usage block for --cfg jobb (walk AW)."""
    from cli_helpers import run_cli

    result = run_cli("kasa.cli.train", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --cfg {args[1]}: the part of the config to print is job, hydra or all, e.g. kasa-train --cfg job "
        "recipe=glue/roberta_base_cola"], result.stderr[-2000:]


def test_a_key_of_a_free_mapping_without_its_plus_says_to_add_one():
    """method.peft_options holds the user's own keys (AdaLoRA's init_r): Hydra adds them with a +; the bare
    `unknown key` gave no way on."""
    from cli_helpers import run_cli

    result = run_cli("kasa.cli.train", "recipe=glue/roberta_base_rte", "method=adalora",
                     "method.peft_options.init_r=16")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown key method.peft_options.init_r: method.peft_options holds keys of your own, which an override "
        "adds with a + (+method.peft_options.init_r=...)"], result.stderr[-2000:]


def test_version_is_kasa_s(capsys, monkeypatch):
    """`kasa-train --version` printed Hydra's version (Hydra 1.3.8), the flag being Hydra's (walk AW)."""
    from kasa import __version__
    from kasa.cli.train import main

    monkeypatch.setattr("sys.argv", ["kasa-train", "--version"])
    main()
    assert capsys.readouterr().out == f"kasa {__version__}\n"
