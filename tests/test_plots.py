"""kasa.analysis.plots from small saved files written by the tests: the data each figure plotted (returned and
written as JSON next to the PNG), not its pixels."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kasa
from kasa.cli.plot import main as plot_main
from kasa.adapters.methods import METHOD_TABLE
from kasa.analysis import plots


def check_files(data: dict, folder: Path, stem: str) -> dict:
    """The PNG exists, is a PNG, and the JSON beside it holds the returned data."""
    png = folder / f"{stem}.png"
    assert data["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((folder / f"{stem}.json").read_text())
    assert saved["png"] == png.name
    assert {k: v for k, v in saved.items() if k != "png"} == json.loads(
        json.dumps({k: v for k, v in data.items() if k != "png"}))
    return saved


# ---------------------------------------------------------------------------------------------------------------
# Figure 4


def test_singular_values_per_layer_and_position(make_roberta, tmp_path):
    model = kasa.apply_adapters(make_roberta(), kasa.AdapterConfig(method="kasa", rank=3, alpha=6,
                                                                   target_modules=["query", "value"], svd_cache_dir=None))
    expected = {}
    with torch.no_grad():
        for name, block in kasa.kasa_blocks(model):
            layer = int(name.split(".layer.")[1].split(".")[0])
            kind = name.rsplit(".", 1)[1]
            values = torch.tensor([10 * layer + i + (0.5 if kind == "value" else 0.0) for i in range(3)])
            block.delta_sigma.copy_(values)
            expected[(kind, layer)] = values.tolist()
    run = tmp_path / "run"
    kasa.save_adapter(model, run / "checkpoints" / "best")
    data = plots.singular_values(run)
    check_files(data, run, "singular_values_best")
    assert set(data["matrices"]) == {"query", "value"}
    assert data["scaling"] == pytest.approx(2.0)
    for kind, entry in data["matrices"].items():
        assert entry["layers"] == [0, 1] and entry["positions"] == [0, 1, 2]
        for column, layer in enumerate(entry["layers"]):
            assert [row[column] for row in entry["values"]] == pytest.approx(expected[(kind, layer)])
        assert entry["modules"] == [f"roberta.encoder.layer.{i}.attention.self.{kind}" for i in (0, 1)]
    # a checkpoint directory works too, and --out puts the files elsewhere
    other = plots.singular_values(run / "checkpoints" / "best", out_dir=tmp_path / "elsewhere")
    assert other["matrices"] == data["matrices"] and (tmp_path / "elsewhere" / "singular_values_best.png").is_file()


def test_singular_values_of_fused_parts_and_last_fallback(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "last"
    checkpoint.mkdir(parents=True)
    tensors = {f"transformer.h.{layer}.attn.c_attn.adapters.{part}.delta_sigma": torch.full((2,), layer + offset)
               for layer in range(3) for part, offset in (("q", 0.0), ("v", 0.25))}
    tensors["transformer.h.0.attn.c_attn.adapters.q.delta_u"] = torch.zeros(4, 2)
    save_file(tensors, str(checkpoint / "adapter_model.safetensors"))
    data = plots.singular_values(tmp_path / "run")  # no best/: falls back to last
    assert data["checkpoint"] == str(checkpoint) and set(data["matrices"]) == {"q", "v"}
    assert data["matrices"]["v"]["values"] == [[0.25, 1.25, 2.25], [0.25, 1.25, 2.25]]
    assert (tmp_path / "run" / "singular_values_last.png").is_file()


def test_singular_values_need_kasa(tmp_path, caplog):
    checkpoint = tmp_path / "checkpoints" / "best"
    checkpoint.mkdir(parents=True)
    save_file({"bert.encoder.layer.0.attention.self.query.adapters.weight.lora_a": torch.zeros(2, 4)},
              str(checkpoint / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="delta_sigma"):
        plots.singular_values(tmp_path)
    with pytest.raises(FileNotFoundError):
        plots.singular_values(tmp_path / "nowhere")
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated: safetensors' own error, a traceback (walk CB)
    with pytest.raises(ValueError, match=f"cannot read {weights} .*: the checkpoint is missing or truncated"):
        plots.singular_values(tmp_path)
    assert plots.plot_run(tmp_path) == {}  # of a whole run: the other plots, and a warning for this one
    assert [r.levelname for r in caplog.records if "no singular-value plot: cannot read" in r.message] == ["WARNING"]


# ---------------------------------------------------------------------------------------------------------------
# Figure 11

PREFIX = "roberta.encoder.layer"


def write_training_logs(run: Path, steps=(5, 10, 15, 20)) -> dict:
    """regularization.jsonl for 3 layers x {query, value}, metrics.jsonl with train and eval records."""
    run.mkdir(parents=True, exist_ok=True)
    values = {}
    with (run / "regularization.jsonl").open("w") as handle:
        for step in steps:
            modules = {}
            for layer in range(3):
                for k, kind in enumerate(("query", "value")):
                    triple = [step + layer + k / 10, 2.0 - step / 100 - k, 1.0 + step / 50 + layer]
                    modules[f"{PREFIX}.{layer}.attention.self.{kind}"] = triple
                    values[(layer, kind, step)] = triple
            handle.write(json.dumps({"step": step, "modules": modules}) + "\n")
    with (run / "metrics.jsonl").open("w") as handle:
        for step in steps:
            handle.write(json.dumps({"type": "train", "step": step, "epoch": 0, "loss": 1.0 / step,
                                     "task_loss": 0.9 / step, "l2": 0.0, "l3": 0.0, "lr": 1e-3}) + "\n")
        handle.write(json.dumps({"type": "eval", "epoch": 0, "step": steps[-1], "split": "validation",
                                 "accuracy": 0.5}) + "\n")
    return values


def test_regularization_terms_of_the_last_layer_and_the_loss(tmp_path):
    run = tmp_path / "run"
    values = write_training_logs(run)
    data = plots.regularization(run)
    check_files(data, run, "regularization_layer2")
    assert data["layer"] == 2 and data["layers"] == [0, 1, 2]
    assert set(data["modules"]) == {"query", "value"}
    for kind, series in data["modules"].items():
        assert series["module"] == f"{PREFIX}.2.attention.self.{kind}"
        assert series["step"] == [5, 10, 15, 20]
        for i, term in enumerate(("l2", "l3_u", "l3_v")):
            assert series[term] == [values[(2, kind, step)][i] for step in series["step"]]
    assert data["loss"]["step"] == [5, 10, 15, 20]  # train records only
    assert data["loss"]["loss"] == pytest.approx([1 / 5, 1 / 10, 1 / 15, 1 / 20])


@pytest.mark.parametrize("orth_form, u_label", [("paper", "||dU^T dU - I||_F"), ("authors", "||dU dU^T - I_n||_F")])
def test_regularization_axes_name_the_norm_the_run_used(tmp_path, monkeypatch, orth_form, u_label):
    """A run with method.orth_form=authors (the GLUE recipes) logs the large Grams' norms: its axes said r x r."""
    from matplotlib.axes import Axes

    run = tmp_path / "run"
    write_training_logs(run)
    (run / "config.json").write_text(json.dumps({"method": {"method": "kasa", "orth_form": orth_form}}))
    labels = []
    original = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel",
                        lambda ax, text, *a, **k: labels.append(text) or original(ax, text, *a, **k))
    assert plots.regularization(run)["orth_form"] == orth_form
    assert u_label in labels and labels.count(u_label) == 2  # query and value


def test_a_run_of_one_logged_step_draws_points(tmp_path, monkeypatch):
    """A line through one point draws nothing: the figure of a run that logged once was seven empty panels."""
    run = tmp_path / "run"
    write_training_logs(run, steps=(5,))
    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, *args: figures.append(fig) or save(fig, *args))
    plots.regularization(run)
    lines = [line for ax in figures[0].axes for line in ax.get_lines()]
    assert len(lines) == 7 and all(line.get_marker() == "o" for line in lines)


def test_regularization_of_a_chosen_layer(tmp_path):
    run = tmp_path / "run"
    values = write_training_logs(run)
    data = plots.regularization(run, layer=0, out_dir=tmp_path / "plots")
    assert data["layer"] == 0 and (tmp_path / "plots" / "regularization_layer0.png").is_file()
    assert data["modules"]["value"]["l3_v"] == [values[(0, "value", s)][2] for s in (5, 10, 15, 20)]
    with pytest.raises(ValueError, match="layer 7"):
        plots.regularization(run, layer=7)
    with pytest.raises(FileNotFoundError, match="regularization.jsonl"):
        plots.regularization(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: figures 2, 3 and 9


def write_run(directory: Path, *, task: str, method: str, seed: int, best: float, rank: int = 8,
              truncation_rank: int | None = None, metric: str | None = None) -> None:
    directory.mkdir(parents=True)
    metric = metric or {"cola": "matthews"}.get(task, "accuracy")
    (directory / "summary.json").write_text(json.dumps({
        "task": task, "method": method, "metric": metric, "best": best, "seed": seed, "rank": rank, "beta": 1e-4,
        "gamma": 1e-3, "trainable_params": 1000, "overrides": [f"seed={seed}"],
    }))
    (directory / "config.json").write_text(json.dumps({"method": {"method": method, "rank": rank,
                                                                  "truncation_rank": truncation_rank}}))


def best_of(*key) -> float:
    rng = np.random.default_rng(zlib.crc32(repr(key).encode()))
    return float(rng.random())


@pytest.fixture
def ablation_sweep(tmp_path):
    scores: dict[tuple[str, str], list[float]] = {}
    job = 0
    for task in ("mrpc", "cola"):
        for method in ("kasa", "pissa", "kasa_l2", "lora", "svd_lora", "kasa_sv"):  # shuffled; pissa not a rung
            if task == "cola" and method == "kasa_sv":
                continue
            for seed in range(3):
                best = best_of(task, method, seed)
                scores.setdefault((task, method), []).append(best)
                write_run(tmp_path / str(job), task=task, method=method, seed=seed, best=best)
                job += 1
    return tmp_path, scores


def test_ablation_bars_in_ladder_order(ablation_sweep):
    sweep, scores = ablation_sweep
    data = plots.ablation([sweep], scale=100)
    check_files(data, sweep, "ablation")
    assert list(data["tasks"]) == ["mrpc", "cola"]  # the paper's column order
    assert data["tasks"]["mrpc"]["methods"] == ["lora", "svd_lora", "kasa_sv", "kasa_l2", "kasa"]
    assert data["tasks"]["cola"]["methods"] == ["lora", "svd_lora", "kasa_l2", "kasa"]  # a missing rung is skipped
    assert data["tasks"]["cola"]["metric"] == "matthews"
    for task, entry in data["tasks"].items():
        for method, median, n in zip(entry["methods"], entry["median"], entry["n"]):
            assert median == pytest.approx(100 * np.median(scores[(task, method)]))
            assert n == 3


def test_a_task_scored_in_two_metrics_gets_a_panel_per_metric(tmp_path, caplog):
    """A run with task.metric=matthews beside accuracy runs of the same task: its score was pooled into their bar."""
    for seed, best in enumerate((0.70, 0.68)):
        write_run(tmp_path / f"acc{seed}", task="sst2", method="lora", seed=seed, best=best)
    write_run(tmp_path / "mcc", task="sst2", method="lora", seed=0, best=0.15, metric="matthews")
    with caplog.at_level("WARNING"):
        data = plots.ablation([tmp_path])
    assert not caplog.text
    assert list(data["tasks"]) == ["sst2 (accuracy)", "sst2 (matthews)"]
    accuracy, matthews = data["tasks"].values()
    assert (accuracy["task"], accuracy["metric"], accuracy["median"], accuracy["n"]) == ("sst2", "accuracy",
                                                                                        [pytest.approx(0.69)], [2])
    assert (matthews["metric"], matthews["median"], matthews["n"]) == ("matthews", [0.15], [1])


def test_runs_of_different_models_get_panels_of_their_own(tmp_path, capsys):
    """kasa-plot pooled a tiny-bert run into MiniLM's bar and put its r 4 on MiniLM's rank line (walk AB), where
    kasa-compare gives each model its rows."""
    runs = [("org/MiniLM", "kasa_l2", 8, 0.64), ("org/MiniLM", "kasa_l2", 8, 0.53), ("org/MiniLM", "lora", 8, 0.60),
            ("tiny-bert", "kasa_l2", 4, 0.39)]
    for job, (model, method, rank, best) in enumerate(runs):
        write_run(tmp_path / str(job), task="sst2", method=method, seed=job, best=best, rank=rank)
        config = json.loads((tmp_path / str(job) / "config.json").read_text())
        (tmp_path / str(job) / "config.json").write_text(json.dumps(config | {"model": {"name": model}}))
    done = plots.plot_sweep([tmp_path])
    assert set(done) == {"ablation"}  # no model ran at two ranks
    bars = done["ablation"]["tasks"]
    assert list(bars) == ["sst2 [MiniLM]", "sst2 [tiny-bert]"]
    assert bars["sst2 [MiniLM]"]["median"] == [0.60, pytest.approx(0.585)] and bars["sst2 [tiny-bert]"]["n"] == [1]
    assert bars["sst2 [tiny-bert]"]["title"] == "SST-2 (Acc.) [tiny-bert]"


def test_pooled_runs_of_one_seed_name_what_differs(tmp_path, caplog):
    for job, lr in enumerate((1e-3, 1e-2)):
        write_run(tmp_path / str(job), task="rte", method="kasa", seed=0, best=0.5, rank=4)
        config = json.loads((tmp_path / str(job) / "config.json").read_text())
        config["trainer"] = {"lr": lr}
        (tmp_path / str(job) / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        plots.rank([tmp_path], out_dir=tmp_path / "plots")
    assert "rte, KaSA at rank r 4: the median pools 2 runs of which some share a seed, and which differ in " \
           "trainer.lr: plot the runs of one setting alone" in caplog.text


def test_metric_against_rank(tmp_path):
    scores: dict[tuple[str, int], list[float]] = {}
    job = 0
    for method in ("kasa", "lora"):
        for rank in (16, 1, 4):
            for seed in range(3):
                best = best_of(method, rank, seed)
                scores.setdefault((method, rank), []).append(best)
                write_run(tmp_path / str(job), task="rte", method=method, seed=seed, best=best, rank=rank)
                job += 1
    for method in ("full", "bitfit"):  # no rank: their summaries said 8 (walk AO), and the figure drew them at r = 8
        write_run(tmp_path / method, task="rte", method=method, seed=0, best=0.5, rank=8)
    done = plots.plot_sweep([tmp_path])
    assert set(done) == {"rank"}  # neither an ablation nor a truncation sweep (k = r follows the rank)
    data = done["rank"]
    check_files(data, tmp_path, "rank")
    series = data["tasks"]["rte"]["series"]
    assert list(series) == ["lora", "kasa"]
    for method in ("lora", "kasa"):
        assert series[method]["rank"] == [1, 4, 16]
        assert series[method]["median"] == pytest.approx([np.median(scores[(method, r)]) for r in (1, 4, 16)])
    table = (tmp_path / "rank_table.md").read_text()
    assert "| Dataset | Method | 1 | 4 | 16 |" in table and "| RTE (Acc.) | KaSA |" in table


def test_more_lines_than_colours_still_look_apart(tmp_path, monkeypatch):
    """Eleven series in one panel (every ranked method and KaSA in the activation basis): matplotlib has ten colours,
    and the eleventh line had taken the first one's look (walk AO)."""
    from matplotlib.axes import Axes

    ranked = [name for name, method in METHOD_TABLE.items() if method.ranked]
    for method in ranked:
        for rank in (4, 8):
            write_run(tmp_path / f"{method}-{rank}", task="rte", method=method, seed=0, best=0.5, rank=rank)
    for rank in (4, 8):
        write_run(tmp_path / f"activation-{rank}", task="rte", method="kasa", seed=0, best=0.5, rank=rank)
        config = json.loads((tmp_path / f"activation-{rank}" / "config.json").read_text())
        config["method"]["truncation_basis"] = "activation"
        (tmp_path / f"activation-{rank}" / "config.json").write_text(json.dumps(config))
    lines = []
    plot = Axes.plot

    def recorded_plot(self, *args, **kwargs):
        drawn = plot(self, *args, **kwargs)
        lines.extend(drawn)
        return drawn

    monkeypatch.setattr(Axes, "plot", recorded_plot)
    data = plots.rank([tmp_path])
    looks = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(data["tasks"]["rte"]["series"]) == len(ranked) + 1 == len(lines) == len(looks) > 10


def test_a_metric_that_is_not_a_fraction_is_plotted_as_it_is(tmp_path):
    """kasa-plot --metric-scale 100 drew an LLM judge's 1-10 score x 100, as kasa-compare printed it (walk AP)."""
    for rank in (4, 8):
        write_run(tmp_path / f"alpaca-{rank}", task="alpaca", method="kasa", seed=0, best=7.0, rank=rank,
                  metric="judge_score")
        write_run(tmp_path / f"rte-{rank}", task="rte", method="kasa", seed=0, best=0.7, rank=rank)
    panels = plots.rank([tmp_path], scale=100)["tasks"]
    assert [(p["metric"], p["scale"], p["series"]["kasa"]["median"]) for p in panels.values()] == [
        ("accuracy", 100, pytest.approx([70.0, 70.0])), ("judge_score", 1.0, [7.0, 7.0])]
    assert "| 7.00 | 7.00 |" in (tmp_path / "rank_table.md").read_text()


def test_metric_against_truncation_rank(tmp_path):
    scores: dict[int, list[float]] = {}
    job = 0
    for k in (1, 4, None, 16):  # None: k defaults to the rank, 8
        for seed in range(2):
            best = best_of("k", k, seed)
            scores.setdefault(k or 8, []).append(best)
            write_run(tmp_path / str(job), task="cola", method="kasa", seed=seed, best=best, truncation_rank=k)
            job += 1
    write_run(tmp_path / "lora", task="cola", method="lora", seed=0, best=0.1)  # lora truncates nothing: left out
    done = plots.plot_sweep([tmp_path], scale=100)
    assert set(done) == {"truncation"}
    series = done["truncation"]["tasks"]["cola"]["series"]
    assert list(series) == ["kasa"]
    assert series["kasa"]["truncation_rank"] == [1, 4, 8, 16]
    assert series["kasa"]["median"] == pytest.approx([100 * np.median(scores[k]) for k in (1, 4, 8, 16)])
    assert series["kasa"]["n"] == [2, 2, 2, 2]
    check_files(done["truncation"], tmp_path, "truncation")


def test_sweep_plots_need_an_output_folder_for_several_sweeps(ablation_sweep, tmp_path):
    sweep, _ = ablation_sweep
    with pytest.raises(ValueError, match=r"pass --out DIR \(kasa-plot, kasa-compare --plots\) or out_dir="):
        plots.ablation([sweep, sweep])  # the message named only the Python argument, which kasa-plot users lack
    with pytest.raises(ValueError, match="ablation methods"):
        plots.ablation([], out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# kasa-plot


def test_kasa_plot_on_a_run_and_on_a_sweep(ablation_sweep, tmp_path, capsys):
    sweep, _ = ablation_sweep
    run = tmp_path / "run"
    write_training_logs(run)
    (run / "summary.json").write_text("{}")
    assert plot_main([str(run)]) == 0  # no checkpoint: only figure 11
    assert "regularization:" in capsys.readouterr().out and (run / "regularization_layer2.png").is_file()
    assert plot_main([str(run), "--kind", "regularization", "--layer", "1"]) == 0
    assert (run / "regularization_layer1.json").is_file()
    assert plot_main([str(sweep), "--metric-scale", "100"]) == 0
    assert json.loads((sweep / "ablation.json").read_text())["scale"] == 100
    assert plot_main([str(sweep), "--kind", "rank", "--out", str(tmp_path / "ranks")]) == 0
    assert (tmp_path / "ranks" / "rank.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(tmp_path / "run"), "--kind", "singular-values"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint at")
    # a layer the run did not log: one line, and nothing drawn (it used to be skipped without a word)
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(run), "--layer", "7", "--out", str(tmp_path / "layer7")])
    assert exit_info.value.code == 2 and "layer 7 was not logged" in capsys.readouterr().err
    assert not (tmp_path / "layer7").exists()


def test_kasa_plot_of_a_beta_gamma_sweep_names_its_heatmap(tmp_path, capsys):
    """A beta x gamma sweep has none of kasa-plot's figures: its figure is the heatmap that its summary draws, which
    the error names (it used to say only `nothing to plot`)."""
    from kasa.analysis.sweep import summarize_sweep

    for job, (beta, gamma) in enumerate((b, g) for b in (1e-4, 1e-3) for g in (1e-4, 1e-3)):
        write_run(tmp_path / str(job), task="cola", method="kasa", seed=0, best=best_of(beta, gamma))
        summary = json.loads((tmp_path / str(job) / "summary.json").read_text())
        (tmp_path / str(job) / "summary.json").write_text(json.dumps(summary | {"beta": beta, "gamma": gamma}))
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    summarize_sweep(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: nothing to plot: no KaSA checkpoint or regularization.jsonl (a run), or no ablation / rank / "
        "truncation sweep among the runs (sweeps); a beta x gamma sweep's figure is the heatmap its summary drew: "
        f"{tmp_path / 'heatmap.png'}"]
    (tmp_path / "heatmap.png").unlink()
    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"; a beta x gamma sweep's figure is the heatmap.png its summary draws when beta or gamma varies "
        f"(python -m kasa.cli.sweep {tmp_path} writes the summary again)")
    assert sorted(tmp_path.rglob("*")) == [f for f in before if f.name != "heatmap.png"]


def test_kasa_plot_of_runs_of_several_methods_names_the_ablation_bars(tmp_path, capsys):
    """Runs of kasa and lora alone draw nothing by default (a pair is as likely a rank sweep): the error says that
    --kind ablation draws them side by side."""
    for method in ("kasa", "lora"):
        write_run(tmp_path / method, task="cola", method=method, seed=0, best=0.5)
    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: nothing to plot: no KaSA checkpoint or regularization.jsonl (a run), or no ablation / rank / "
        "truncation sweep among the runs (sweeps); --kind ablation draws the runs' methods side by side (kasa, lora)"]
    assert plot_main([str(tmp_path), "--kind", "ablation"]) == 0


def test_kasa_plot_names_a_skipped_run_once(ablation_sweep, caplog):
    """Each plot read the sweep's runs again, and each read warned of the same crashed job (walk AB)."""
    sweep, _ = ablation_sweep
    (sweep / "99" / ".hydra").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        assert plot_main([str(sweep), "--kind", "ablation", "--kind", "rank"]) == 0
    assert [r.getMessage() for r in caplog.records if "99" in r.getMessage()] == [
        f"skipping {sweep / '99'}: no summary.json (still training, stopped, or failed)"]
