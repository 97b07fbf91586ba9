# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/quality.py` at toy size on the CPU: the study's machinery, not its science (no quality thresholds)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from diffusers_sla import enable_sla

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")


def _load():
    return importlib.import_module("benchmarks.quality")


@pytest.fixture(scope="module")
def quality():
    return _load()


@pytest.fixture(scope="module")
def one_thread():
    # the toy model's ops are tiny: on a shared CI machine extra threads only add contention (5x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_run(quality, tmp_path_factory, one_thread):
    """One toy teacher, every variant tuned for 3 steps with 2 seeds, rendered."""
    root = tmp_path_factory.mktemp("quality")
    out, cache, figures = root / "run", root / "cache", root / "figures"
    preset = quality.PRESETS["toy"]
    preset["tune_steps"] = {**preset["tune_steps"], "toy": 3}
    preset["eval_every"] = {**preset["eval_every"], "toy": 2}
    common = ["--preset", "toy", "--length", "toy", "--out", str(out), "--cache", str(cache), "--sample-steps", "1",
              "--probe-videos", "2"]
    quality.main(["teacher", *common, "--steps", "24"])
    quality.main(["tune", *common])
    # a recipe change kept beside the main rows: proj_l from the teacher's least-squares fit, distillation
    quality.main(["tune", *common, "--variants", "sla_25", "--seeds", "0", "--tag", "lsfit", "--proj-l-init", "lsfit",
                  "--objective", "distill"])
    readme = root / "README.md"
    readme.write_text(f"# x\n\n{quality.README_START}\nold\n{quality.README_END}\n\nafter\n")
    quality.main(["render", "--out", str(out), "--figures", str(figures), "--readme", str(readme)])
    return {"out": out, "cache": cache, "figures": figures, "readme": readme, "common": common,
            "log": json.loads((out / quality.LOG_NAME).read_text())}


def test_every_variant_runs_for_every_seed(quality, toy_run):
    rows = toy_run["log"]["rows"]
    variants = quality.variants_for(quality.PRESETS["toy"])
    assert set(variants) == {"full", "sla_25", "sla_50", "sparse_25", "sparse_50", "linear_only", "sla_12",
                             "sparse_12", "mass_25", "ratio_25", "mass_12", "ratio_12"}
    assert sorted(rows) == sorted([f"toy/{v}/seed{s}" for v in variants for s in (0, 1)] + ["toy/sla_25+lsfit/seed0"])
    for key, row in rows.items():
        assert row["steps_done"] == 3, key
        assert all(math.isfinite(loss) for _, loss in row["curve"]), key
        assert [step for step, _ in row["curve"]] == [0, 2, 3], key
    samples = torch.load(toy_run["out"] / quality.SAMPLES_NAME)
    assert samples["toy/sla_25/seed1"].dtype == torch.uint8
    assert samples["toy/sla_25/seed1"].shape == samples["toy/teacher"].shape == (2, 4, 16, 16)


def test_dense_steps_samples(quality, toy_run):
    """SLA rows are sampled a second time with their first steps dense (sla_dense_steps on the study's sampler):
    other videos than the all-SLA samples, scored in the report as rows of their own."""
    rows = toy_run["log"]["rows"]
    samples = torch.load(toy_run["out"] / quality.SAMPLES_NAME)
    for seed in (0, 1):
        for variant in ("sla_25", "sparse_25", "mass_25", "ratio_12"):
            key = f"toy/{variant}/seed{seed}"
            assert rows[key]["dense_sample_steps"] == 1, key
            assert samples[f"{key}@dense"].shape == samples[key].shape, key
        assert not torch.equal(samples[f"toy/sla_25/seed{seed}@dense"], samples[f"toy/sla_25/seed{seed}"])
        assert "dense_sample_steps" not in rows[f"toy/full/seed{seed}"]
    table = (toy_run["figures"] / "quality_table.md").read_text()
    assert "| sla_25@dense1 (SLA topk 25 %, tuned, sampled with the first 1 steps dense) | – |" in table
    metrics = json.loads((toy_run["figures"] / "quality_metrics.json").read_text())["toy"]
    assert len(metrics["rows"]["sla_25@dense1"]["psnr"]) == 2


def test_teacher_loss_decreases_and_probe_is_filled(quality, toy_run):
    teacher = toy_run["log"]["teachers"]["toy"]
    curve = [loss for _, loss in teacher["curve"]]
    assert curve[-1] < 0.8 * curve[0]
    assert teacher["train_loss_last"] < teacher["train_loss_first"]
    for topk, layers in teacher["probe"].items():
        assert len(layers) == 2, topk
        for layer in layers:
            assert 0.0 < layer["mass_outside"] < 1.0
            assert 0.0 < layer["resid_rel"]
            assert -1e-6 <= layer["lsfit_r2"] <= 1.0 + 1e-6
            assert layer["lsfit_r2_heldout"] is not None and layer["lsfit_r2_heldout"] <= 1.0 + 1e-6
            assert layer["lsfit_ridge"] in quality.RIDGES and layer["lsfit_weight_rms"] > 0
            assert set(layer["branches"]) == {"softmax/rest", "elu/rest", "relu/rest", "softmax/all"}
            assert layer["branches"]["softmax/rest"]["r2_heldout"] == layer["lsfit_r2_heldout"]
    # a larger topk leaves less attention mass outside the kept blocks
    assert teacher["probe"]["0.5000"][0]["mass_outside"] < teacher["probe"]["0.2500"][0]["mass_outside"]


def test_proj_l_gradients_sla_rows_only(toy_run):
    rows = toy_run["log"]["rows"]
    for seed in (0, 1):
        for name in ("sla_25", "sla_50", "linear_only"):
            windows = rows[f"toy/{name}/seed{seed}"]["proj_l_grad_norm"]
            assert windows and all(len(w) == 2 and all(g is not None and g > 0 for g in w) for _, w in windows), name
        for name in ("sparse_25", "sparse_50"):
            windows = rows[f"toy/{name}/seed{seed}"]["proj_l_grad_norm"]
            assert windows and all(g is None for _, w in windows for g in w), name
        assert all(w == [] for _, w in rows[f"toy/full/seed{seed}"]["proj_l_grad_norm"])
        sla = rows[f"toy/sla_25/seed{seed}"]
        assert len(sla["linear_over_sparse"]) == 2 and all(r > 0 for r in sla["linear_over_sparse"])
        assert len(sla["proj_l_weight_rms"]) == 2 and all(r > 0 for r in sla["proj_l_weight_rms"])
        assert math.isfinite(sla["val_loss_without_linear"])
        # before tuning, SLA (proj_l = 0) and sparse-only compute the same function
        assert sla["curve"][0][1] == pytest.approx(rows[f"toy/sparse_25/seed{seed}"]["curve"][0][1], rel=1e-5)


def test_fusion_rows(toy_run):
    """mass_K / ratio_K rows run the package's fusions (same steps and seeds); "mass" starts from another function
    than SLA at zero proj_l (it mixes in the linear branch), "ratio" records its tuned gate per layer."""
    rows = toy_run["log"]["rows"]
    for seed in (0, 1):
        for topk in (25, 12):
            mass, ratio = rows[f"toy/mass_{topk}/seed{seed}"], rows[f"toy/ratio_{topk}/seed{seed}"]
            assert mass["how"].startswith("SLA fusion=mass") and ratio["how"].startswith("SLA fusion=ratio")
            assert mass["curve"][0][1] != pytest.approx(rows[f"toy/sla_{topk}/seed{seed}"]["curve"][0][1], rel=1e-6)
            gate = ratio["ratio_gate"]
            assert len(gate) == 2 and all(0.0 < g["sigmoid_bias"] < 1.0 and g["weight_norm"] > 0 for g in gate)
            untuned = toy_run["log"]["teachers"]["toy"]["untuned"]
            assert math.isfinite(untuned[f"mass_{topk}_untuned"]["val_loss"])
            assert untuned[f"mass_{topk}_untuned"]["val_loss"] == pytest.approx(mass["curve"][0][1], rel=1e-5)
            windows = mass["proj_l_grad_norm"]
            assert windows and all(g is not None and g > 0 for _, w in windows for g in w)


def test_tagged_recipe_rows(toy_run):
    log = toy_run["log"]
    row = log["rows"]["toy/sla_25+lsfit/seed0"]
    assert row["recipe"]["proj_l_init"] == "lsfit" and row["recipe"]["objective"] == "distill"
    assert log["rows"]["toy/sla_25/seed0"]["recipe"]["objective"] == "fm"
    # started from the teacher's least-squares proj_l: the same model as the untuned lsfit row
    untuned = log["teachers"]["toy"]["untuned"]
    assert row["curve"][0][1] == pytest.approx(untuned["sla_25_lsfit_untuned"]["val_loss"], rel=1e-5)
    assert untuned["sla_25_lsfit_untuned"]["val_loss"] != untuned["sla_25_untuned"]["val_loss"]


def test_report_renders(quality, toy_run):
    figures = toy_run["figures"]
    table = (figures / "quality_table.md").read_text()
    for name in ("teacher", "sla_25_untuned", "sla_25_lsfit_untuned", "full", "sla_25", "sparse_50", "linear_only",
                 "sla_25+lsfit"):
        assert f"| {name} (" in table, name
    assert "± " in table and "Teacher probe per layer" in table and "| sla_25+lsfit | " in table
    assert "| relu/rest | " in table
    assert "Rows tagged +lsfit: objective distill, proj_l_init lsfit." in table
    for name in ("quality_loss.png", "quality_samples_toy.png"):
        assert (figures / name).read_bytes()[:4] == b"\x89PNG", name
    metrics = json.loads((figures / "quality_metrics.json").read_text())["toy"]
    assert metrics["classifier_acc_real"] > 0.9  # the classifier itself works on the generator's frames
    assert len(metrics["rows"]["sla_25"]["psnr"]) == 2
    readme = toy_run["readme"].read_text()
    assert "old" not in readme and "| full (dense, tuned) |" in readme and readme.endswith("after\n")
    assert "(figures/quality_loss.png)" in readme and "(figures/quality_samples_toy.png)" in readme


def test_rerun_skips_done_rows_and_budget_stops(quality, toy_run, tmp_path, capsys):
    before = (toy_run["out"] / quality.LOG_NAME).read_text()
    quality.main(["tune", *toy_run["common"]])
    assert (toy_run["out"] / quality.LOG_NAME).read_text().count('"seed"') == before.count('"seed"')
    # a fresh run folder with a budget smaller than one row: one row is done, then the stage stops and says so
    out = tmp_path / "budget"
    common = [*toy_run["common"]]
    common[common.index("--out") + 1] = str(out)
    quality.main(["teacher", *common, "--steps", "2"])
    quality.main(["tune", *common, "--time-budget-s", "0.01", "--variants", "full", "sparse_25"])
    log = json.loads((out / quality.LOG_NAME).read_text())
    assert list(log["rows"]) == ["toy/full/seed0"]
    assert "stopping" in capsys.readouterr().out


def test_data_has_motion_and_classes(quality):
    gen = torch.Generator().manual_seed(0)
    videos, labels = quality.make_videos(12, 8, 16, 16, gen)
    assert videos.shape == (12, 1, 8, 16, 16) and videos.min() >= -1 and videos.max() <= 1
    assert (videos[:, :, 0] != videos[:, :, -1]).any(dim=(1, 2, 3)).all()  # every shape moves
    assert len(set(labels.tolist())) > 1


def test_probe_returns_dense_attention(quality):
    """The teacher probe must not change what the teacher computes (it runs the model as dense)."""
    preset = quality.PRESETS["toy"]
    torch.manual_seed(0)
    model = quality.build_model(preset).eval()
    val = quality.ValSet(2, preset["lengths"]["toy"], preset["model"]["text_dim"], torch.device("cpu"))
    scheduler = quality.make_scheduler()
    with torch.no_grad():
        ref = quality.flow_matching_loss(model, scheduler, val.x0, val.noise, val.index, val.cond)
        enable_sla(model, topk=1.0, blkq=32, blkk=32, min_kv_blocks=2)
        with quality.patched_forward(model, quality._probe_forward, _probe_topks=[0.25], _probe_stats={},
                                     _probe_split=0, _probe_branches=[("softmax", "rest")]):
            probed = quality.flow_matching_loss(model, scheduler, val.x0, val.noise, val.index, val.cond)
        sla = quality.flow_matching_loss(model, scheduler, val.x0, val.noise, val.index, val.cond)
    assert probed.item() == pytest.approx(ref.item(), rel=1e-5)
    assert sla.item() == pytest.approx(ref.item(), rel=1e-4)  # topk 1.0 keeps every block: SLA is dense too
