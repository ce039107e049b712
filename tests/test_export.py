"""kasa-export: a merged model that plain transformers loads (in a process where kasa cannot be imported) with the
adapter model's outputs, and KaSA adapters in PEFT's format that PEFT loads to the same outputs.

Tolerances: the merged model differs from the adapter model only by the float32 rounding of W + dW against
W x + dW x, so logits and last hidden states agree to 1e-5. PEFT repeats the SVD truncation with its own float32
full SVD where kasa used a float64 Gram eigensolver, so its outputs agree to float32 rounding of the two
decompositions: 2e-5 here, checked to be far below what skipping the truncation would change."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import kasa
from cli_helpers import ENV, make_tiny_bert, run_cli, train_args, write_sentiment_data
from conftest import build_gpt2, build_roberta, outputs, randomize_adapters, randomize_trainable
from kasa.adapters.peft_format import (
    AUTHORS_ORTH_FORM_NOTE,
    check_peft_exportable,
    check_peft_expressible,
    peft_regularizer,
    peft_state,
    save_peft_adapter,
)

SENTENCES = ["the movie was very good", "the food was not bad", "the service was very poor", "the place was sad"]
MERGED_TOL = 1e-5
PEFT_TOL = 2e-5


def _peft_or_skip():
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'kasa[peft]')")
    try:
        from peft.tuners.lora.config import KasaConfig  # noqa: F401
    except ImportError:
        pytest.skip(f"peft {peft.__version__} has no KaSA variant (needs peft >= 0.21)")
    return peft


# ----------------------------------------------------------------------------------------------------------------
# End to end: a tiny run trained by kasa-train, exported by kasa-export.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    model = make_tiny_bert(root / "tiny-bert")
    data = write_sentiment_data(root / "data")
    run_dir = root / "run"
    # A large learning rate so that the adapter moves the outputs far more than the tolerances.
    result = run_cli("kasa.cli.train", *train_args(model, data, run_dir, "method.rank=4", "trainer.epochs=1",
                                                   "trainer.lr=3e-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return model, run_dir


def _inputs(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(tokenizer_dir)(SENTENCES, return_tensors="pt", padding=True))


def _adapter_model(model_dir: Path, checkpoint: Path, truncated: bool = True) -> nn.Module:
    """kasa's own model: the base classifier with the checkpoint's adapter (what kasa-eval evaluates)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    kasa.load_adapter(model, checkpoint)
    if not truncated:  # the same adapter on the original, untruncated weights
        for _, layer in kasa.adapted_layers(model):
            layer.restore_base()
    return model.eval()


def _logits_and_hidden(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


# Runs in `python -I -S` (no site-packages processing: the editable install's import hook for kasa is never
# installed, and neither the working directory nor PYTHONPATH is on sys.path), with the plain site-packages folders
# appended by hand so that torch and transformers import.
ISOLATED = textwrap.dedent("""
    import json, sys
    sys.path.extend({site_dirs!r})
    try:
        import kasa
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("kasa is importable here: " + str(kasa.__file__))
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained({folder!r})
    inputs = tokenizer({sentences!r}, return_tensors="pt", padding=True)
    model = AutoModelForSequenceClassification.from_pretrained({folder!r}).eval()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert not any(name == "kasa" or name.startswith("kasa.") for name in sys.modules), "kasa was imported"
    print(json.dumps({{"kasa_importable": False, "class": type(model).__name__,
                      "logits": out.logits.tolist(), "hidden": out.hidden_states[-1].tolist()}}))
""")


def test_merged_export_loads_without_kasa(trained_run, tmp_path):
    model_dir, run_dir = trained_run
    output = tmp_path / "merged"
    result = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt"))
    info = json.loads((output / "kasa_export.json").read_text())
    assert info["format"] == "merged" and info["method"] == "kasa"
    assert info["checkpoint"] == str((run_dir / "checkpoints" / "best").absolute())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    code = ISOLATED.format(site_dirs=site_dirs, folder=str(output), sentences=SENTENCES)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    isolated = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
    assert isolated.returncode == 0, isolated.stderr[-3000:]
    report = json.loads(isolated.stdout.strip().splitlines()[-1])
    assert report["kasa_importable"] is False and report["class"] == "BertForSequenceClassification"

    logits, hidden = _logits_and_hidden(_adapter_model(model_dir, run_dir / "checkpoints" / "best"),
                                        _inputs(model_dir))
    torch.testing.assert_close(torch.tensor(report["logits"]), logits, atol=MERGED_TOL, rtol=0)
    torch.testing.assert_close(torch.tensor(report["hidden"]), hidden, atol=MERGED_TOL, rtol=0)
    # The adapter matters: the base model alone is far outside the tolerance.
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    assert (_logits_and_hidden(base, _inputs(model_dir))[1] - hidden).abs().max() > 100 * MERGED_TOL


def _main(capsys, *args: str) -> tuple[int, str]:
    """kasa-export in this process (no interpreter start-up): (exit status, last stderr line)."""
    from kasa.cli.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, (err[-1] if err else "")


def test_export_refuses_a_non_empty_output_and_overwrites_when_asked(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={output}")
    assert code == 2
    assert last.startswith("error:") and "not empty" in last and "overwrite=true" in last
    assert (output / "keep.txt").read_text() == "precious" and sorted(os.listdir(output)) == ["keep.txt"]

    code, _ = _main(capsys, f"checkpoint={run_dir}", f"output={output}", "overwrite=true", "which=last")
    assert code == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert json.loads((output / "kasa_export.json").read_text())["checkpoint"].endswith("checkpoints/last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_what_a_killed_export_left_is_removed_by_the_next(trained_run, tmp_path, capsys):
    """kill -9 during a merged export left a hidden .out.<pid>.tmp (a 7B model's size) that nothing removed (walk
    AA); a running export's copy is left alone."""
    _, run_dir = trained_run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = f".out.{os.getppid()}.tmp"  # the copy of a process that is still running
    for leftover in (f".out.{int(dead.stdout)}.tmp", running):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"partial")
    code, _ = _main(capsys, f"checkpoint={run_dir}", f"output={tmp_path / 'out'}", "which=last")
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [running, "out"]


def test_a_typo_of_its_own_key_is_named_with_the_key_meant(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={tmp_path / 'out'}", "fromat=peft")
    # kasa-export reads model.* of the run's settings and nothing else: the other sections are not offered
    assert code == 2 and last == ("error: unknown key fromat (did you mean format?); valid keys: checkpoint, output, "
                                  "format, which, overwrite, model")
    assert not (tmp_path / "out").exists()
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={tmp_path / 'out'}", "trainer.lrr=1")
    assert code == 2 and last == ("error: unknown key trainer.lrr: nothing under trainer can be set here; valid keys: "
                                  "checkpoint, output, format, which, overwrite, model")


@pytest.mark.parametrize("where, refusal", [
    ("checkpoints/best", "would replace the checkpoint it exports: choose another folder"),
    ("checkpoints", "would replace the checkpoint it exports: choose another folder"),
    ("checkpoints/best/merged", "is inside RUN/checkpoints/best, which a training run saves over: choose a folder "
                                "outside it"),
    ("checkpoints/merged", "is inside RUN/checkpoints, which a training run saves over: choose a folder outside it"),
])
def test_an_output_among_the_checkpoints_is_refused(trained_run, capsys, where, refusal):
    _, run_dir = trained_run
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={run_dir / where}")
    assert code == 2 and last == f"error: output={run_dir / where} {refusal.replace('RUN', str(run_dir))}"
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


def test_the_run_spelled_another_way_is_still_the_run(trained_run, tmp_path, capsys):
    """With `..` or a symbolic link in one of the two paths, overwrite=true replaced the run being exported (its
    checkpoints, config and logs) with the export."""
    _, run_dir = trained_run
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    (tmp_path / "sub").mkdir()
    for checkpoint, output in ((tmp_path / "sub" / ".." / "link", run_dir), (link, run_dir / ".." / run_dir.name),
                               (run_dir, link / "checkpoints" / "merged")):
        code, last = _main(capsys, f"checkpoint={checkpoint}", f"output={output}", "overwrite=true")
        assert code == 2 and last.startswith(f"error: output={run_dir}") and "choose a" in last, last
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


def test_an_output_that_cannot_be_made_is_refused_before_the_model_loads(trained_run, tmp_path, capsys, monkeypatch):
    import kasa.tasks

    _, run_dir = trained_run
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(kasa.tasks, "build_task", lambda cfg: pytest.fail("the model was loaded"))
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={tmp_path / 'afile' / 'out'}")
    assert code == 2 and last == (f"error: output={tmp_path / 'afile' / 'out'} cannot be made: {tmp_path / 'afile'} "
                                  "is a file, not a folder; choose another")
    assert (tmp_path / "afile").read_text() == "mine"


def test_an_export_for_another_base_than_the_trained_one_says_so_and_records_it(trained_run, tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (kasa[quant])")
    _, run_dir = trained_run
    code, last = _main(capsys, f"checkpoint={run_dir}", f"output={tmp_path / 'out'}", "model.quantization=nf4")
    assert code == 0 and last == (
        "warning: the run trained over a float base, exported here for the nf4 model: its outputs differ from the "
        "trained model's by the quantization's rounding (recorded in kasa_export.json)")
    record = json.loads((tmp_path / "out" / "kasa_export.json").read_text())
    assert record["overrides"] == ["model.quantization=nf4"] and record["trained_quantization"] is None



def test_a_refused_export_for_another_base_is_its_error_line_alone(trained_run, tmp_path):
    """The warning about exporting for another base than the trained one came before the checks, so a refused
    export printed it, naming a kasa_export.json that was never written, and then its error (walk CA)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (kasa[quant])")
    _, run_dir = trained_run
    result = run_cli("kasa.cli.export", f"checkpoint={run_dir}", f"output={tmp_path / 'out'}", "format=peft",
                     "model.quantization=nf4")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("command", ["kasa.cli.evaluate", "kasa.cli.export"])
def test_an_export_folder_given_as_the_checkpoint_says_what_it_is(tmp_path, command):
    """A PEFT export holds kasa's adapter file names: it was taken for a checkpoint outside a run."""
    export = tmp_path / "peft-export"
    export.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (export / name).write_text("")
    (export / "kasa_export.json").write_text(json.dumps({"checkpoint": "/runs/x/checkpoints/best"}))
    result = run_cli(command, f"checkpoint={export}", *([f"output={tmp_path / 'out'}"] if "export" in command else []))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {export} is a kasa-export folder, not a checkpoint: pass the checkpoint it was made from "
        "(/runs/x/checkpoints/best), or load the export with the line in kasa_export.json")


def test_peft_export_loads_in_peft(trained_run, tmp_path):
    _peft_or_skip()
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model_dir, run_dir = trained_run
    output = tmp_path / "peft"
    result = run_cli("kasa.cli.export", f"checkpoint={run_dir}", "format=peft", f"output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(output / "adapter_model.safetensors"), "pt") as weights:
        modules = sum(key.endswith("lora_diag") for key in weights.keys())
    assert modules == 4  # query and value of 2 layers
    # PEFT sums the loss over the modules where kasa averages it: beta / M and gamma / M give the same loss
    assert config["kasa_config"] == pytest.approx({"beta": 1e-4 / modules, "gamma": 1e-3 / modules}, rel=1e-15)
    record = json.loads((output / "kasa_export.json").read_text())["peft_regularizer"]
    assert record == {"kasa_config": config["kasa_config"], "beta": 1e-4, "gamma": 1e-3, "modules": 4,
                      "orth_form": "paper", "note": None}
    assert "note:" not in result.stdout
    assert config["modules_to_save"] == ["classifier", "pooler"]  # BERT's head: the pooler trains too
    assert config["base_model_name_or_path"] == str(model_dir)

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, output).eval()
    inputs = _inputs(model_dir)
    got = _logits_and_hidden(peft_model, inputs)
    checkpoint = run_dir / "checkpoints" / "best"
    want = _logits_and_hidden(_adapter_model(model_dir, checkpoint), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=PEFT_TOL, rtol=0)
    # PEFT's own truncation is what makes them agree: the same adapter on the untruncated base is far off.
    untruncated = _logits_and_hidden(_adapter_model(model_dir, checkpoint, truncated=False), inputs)
    assert (untruncated[1] - want[1]).abs().max() > 10 * PEFT_TOL


def test_peft_export_of_a_lora_run_is_one_clear_line(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    # The same run relabelled as LoRA: refused from the checkpoint's own config, before any model loads.
    fake = tmp_path / "lora-run"
    (fake / "checkpoints" / "best").mkdir(parents=True)
    (fake / "config.json").write_text((run_dir / "config.json").read_text())
    best = run_dir / "checkpoints" / "best"
    meta = json.loads((best / "adapter_config.json").read_text())
    meta["config"]["method"] = "lora"
    (fake / "checkpoints" / "best" / "adapter_config.json").write_text(json.dumps(meta))
    (fake / "checkpoints" / "best" / "adapter_model.safetensors").write_bytes(
        (best / "adapter_model.safetensors").read_bytes())
    code, last = _main(capsys, f"checkpoint={fake}", "format=peft", f"output={tmp_path / 'out'}")
    assert code == 2
    assert last.startswith("error:") and "method=lora" in last and "format=merged" in last
    assert not (tmp_path / "out").exists()


def test_peft_export_of_an_authors_form_run_says_so_in_one_line(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    # The same run as if trained with orth_form=authors (the adapter's own config is what the export reads)
    run = tmp_path / "authors-run"
    best = run / "checkpoints" / "best"
    best.mkdir(parents=True)
    (run / "config.json").write_text((run_dir / "config.json").read_text())
    source = run_dir / "checkpoints" / "best"
    meta = json.loads((source / "adapter_config.json").read_text())
    meta["config"]["orth_form"] = "authors"
    (best / "adapter_config.json").write_text(json.dumps(meta))
    (best / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    from kasa.cli.export import main

    main([f"checkpoint={run}", "format=peft", f"output={tmp_path / 'out'}"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {AUTHORS_ORTH_FORM_NOTE}"]
    record = json.loads((tmp_path / "out" / "kasa_export.json").read_text())["peft_regularizer"]
    assert record["orth_form"] == "authors" and record["note"] == AUTHORS_ORTH_FORM_NOTE


@pytest.mark.parametrize("args, expected", [
    (["format=onnx"], "unknown format"),
    (["output="], "missing output"),
    (["output=", "outptu=x"], "missing output=... (outptu= is not a key: did you mean output?)"),  # named no typo
    (["checkpoint=/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    (["overwrite=maybe"], "overwrite='maybe' is not a boolean: pass overwrite=true or overwrite=false"),
])
def test_bad_arguments_are_one_clear_line(tmp_path, capsys, args, expected):
    settings = {"checkpoint": str(tmp_path), "output": str(tmp_path / "out")}
    settings.update(dict(a.split("=", 1) for a in args))
    code, last = _main(capsys, *(f"{k}={v}" for k, v in settings.items()))
    assert code == 2
    assert last.startswith("error:") and expected in last, last
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The PEFT format in process: every tensor mapped, heads included, and the refusals.


def test_peft_roundtrip_in_process_with_a_classification_head(tmp_path):
    _peft_or_skip()
    from peft import PeftModel

    config = kasa.AdapterConfig(method="kasa", rank=4, alpha=8, target_modules=["query", "value", "intermediate.dense"],
                                trainable_modules=["classifier"], svd_method="svd", svd_cache_dir=None)
    model = kasa.apply_adapters(build_roberta(seed=3), config)
    randomize_adapters(model, seed=7, scale=0.3)
    randomize_trainable(model, seed=8, scale=0.05)  # moves the (RobertaClassificationHead) classifier too
    model.eval()
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=None)
    state = peft_state(model)
    layers = dict(kasa.adapted_layers(model))
    # The classifier's own `dense` sits inside a trainable module and is not adapted.
    assert not any(name.startswith("classifier") for name in layers)
    assert len([k for k in state if k.endswith("lora_diag")]) == len(layers)
    assert {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.bias"} <= set(state)
    name, layer = next(iter(layers.items()))
    block = layer.adapters["weight"]
    assert torch.equal(state[f"base_model.model.{name}.lora_A.weight"], block.delta_v)
    assert torch.equal(state[f"base_model.model.{name}.lora_B.weight"], block.delta_u)
    assert torch.equal(state[f"base_model.model.{name}.lora_diag"], block.delta_sigma)

    peft_model = PeftModel.from_pretrained(build_roberta(seed=3), tmp_path / "adapter").eval()
    inputs = {"input_ids": torch.randint(3, 100, (3, 11), generator=torch.Generator().manual_seed(1))}
    torch.testing.assert_close(outputs(peft_model, inputs), outputs(model, inputs), atol=PEFT_TOL, rtol=0)


@pytest.mark.parametrize("method", ["kasa", "kasa_l2"])
def test_peft_kasa_loss_equals_kasas_aux_loss(tmp_path, method):
    # PEFT sums beta * L2 + gamma * L3 over the modules, kasa averages it: the export writes beta / M and gamma / M,
    # so PEFT's loss for the same weights is kasa's (with the paper's orthogonality form, the one PEFT has)
    _peft_or_skip()
    from peft import PeftModel

    config = kasa.AdapterConfig(method=method, rank=4, alpha=8, beta=0.3, gamma=0.7, orth_form="paper",
                                target_modules=["query", "value", "intermediate.dense"],
                                trainable_modules=["classifier"], svd_method="svd", svd_cache_dir=None)
    model = kasa.apply_adapters(build_roberta(seed=3), config).eval()
    randomize_adapters(model, seed=11, scale=0.3)  # far from orthonormal: both terms matter
    modules = len(list(kasa.adapted_layers(model)))
    assert modules == 6  # 2 layers x (query, value, intermediate.dense): a wrong M would change the loss 6-fold
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=None)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["kasa_config"]
    gamma = 0.7 if method == "kasa" else 0.0  # kasa_l2 has no L3 term
    assert written == pytest.approx({"beta": 0.3 / 6, "gamma": gamma / 6}, rel=1e-15)
    assert peft_regularizer(model) == {"kasa_config": written, "beta": 0.3, "gamma": gamma, "modules": 6,
                                       "orth_form": "paper", "note": None}

    peft_model = PeftModel.from_pretrained(build_roberta(seed=3), tmp_path / "adapter")
    peft_loss = peft_model.base_model._get_kasa_loss()
    kasa_loss = kasa.aux_loss(model).total
    assert kasa_loss.item() > 0.05  # a loss of some size, so that the comparison means something
    torch.testing.assert_close(peft_loss.float(), kasa_loss.float(), rtol=1e-6, atol=0)


def test_peft_export_records_the_authors_orthogonality_form():
    config = kasa.AdapterConfig(method="kasa", rank=2, orth_form="authors", target_modules=["query", "value"],
                                svd_cache_dir=None)
    record = peft_regularizer(kasa.apply_adapters(build_roberta(), config))
    assert record["orth_form"] == "authors" and record["note"] == AUTHORS_ORTH_FORM_NOTE
    assert "\n" not in AUTHORS_ORTH_FORM_NOTE
    assert record["kasa_config"] == {"beta": 1e-4 / 4, "gamma": 1e-3 / 4}  # 2 layers x (query, value)
    # without an L3 term there is nothing PEFT computes differently
    l2_only = kasa.AdapterConfig(method="kasa_l2", rank=2, orth_form="authors", target_modules=["query"],
                                 svd_cache_dir=None)
    assert peft_regularizer(kasa.apply_adapters(build_roberta(), l2_only))["note"] is None


def _fused_linear_model() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            return self.qkv(x)

    return Block()


@pytest.mark.parametrize("make, config, expected", [
    (lambda: build_roberta(), dict(method="lora"), "method=lora"),
    (lambda: build_roberta(), dict(method="pissa"), "method=pissa"),
    (lambda: build_roberta(), dict(init="principal"), "init=principal"),
    (lambda: build_roberta(), dict(truncation_rank=6), "truncation_rank"),
    (lambda: build_gpt2(), dict(target_modules=["c_attn"]), "nn.Linear layers only"),
    (_fused_linear_model, dict(target_modules=["qkv.q", "qkv.v"], fused_modules={"qkv": ["q", "k", "v"]}),
     "fused projection"),
    (lambda: build_roberta(), dict(target_modules=["query"], trainable_modules=["attention"]), "contains the adapted"),
])
def test_peft_format_refusals(make, config, expected):
    settings = dict(method="kasa", rank=2, target_modules=["query", "value"], svd_cache_dir=None) | config
    model = kasa.apply_adapters(make(), kasa.AdapterConfig(**settings))
    with pytest.raises(ValueError, match=expected) as err:
        check_peft_exportable(model)
    assert "\n" not in str(err.value)


def test_a_quantized_lora_run_is_told_format_merged_at_once():
    """The method first: a quantized LoRA run was told to add model.quantization=null, then that LoRA cannot go."""
    with pytest.raises(ValueError, match="format=peft exports KaSA adapters only .* method=lora: use format=merged"):
        check_peft_expressible(kasa.AdapterConfig(method="lora"), "nf4")
