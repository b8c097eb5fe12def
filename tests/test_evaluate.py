"""evaluate.py: the study runs end to end on a tiny config, reuses what it trained, and trains what its ablation
registry names (smoke_study: conftest.py)."""
import csv
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import camgeo
import distill
import evaluate
import evaluation
import geometry
import report
import training


def test_smoke_study_writes_the_table_with_one_row_per_method_and_the_estimator_floor(smoke_study):
    with open(os.path.join(smoke_study, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["keyframes"]) for r in rows] == [
        ("Sparse", "1/2"), ("Ground-truth video (estimator floor)", "all"),
        ("Degraded ground-truth video (estimator floor)", "all"),
        ("Reference frame repeated (a camera that does not move)", "all")]
    for row in rows:
        for name in report.METRICS:
            assert float(row[name]) == float(row[name])  # a number, not NaN
    assert float(rows[0]["sample_s_per_video"]) > 0
    assert float(rows[1]["RotErr"]) < float(rows[0]["RotErr"])  # an untrained model is no better than the truth
    table = open(os.path.join(smoke_study, "table.md")).read()
    assert "| Sparse | 1/2 |" in table and "estimator floor" in table


def test_smoke_study_writes_one_line_per_video(smoke_study):
    with open(os.path.join(smoke_study, "per_clip.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["run"] for r in rows}) == ["ground_truth", "ground_truth_degraded", "reference_repeated",
                                                "sparse_0.5_0"]
    assert len(rows) == 4 * evaluation.STUDY_PRESETS["smoke"].clips
    still = [r for r in rows if r["run"] == "reference_repeated"]
    # a still video's estimated path does not move, so its error is the requested path's own rotation
    assert all(float(r["RotErr"]) > 0 for r in still)
    # the co-visible column: the truth is exact there, the still camera scores what the masks say
    assert all(float(r["PSNR_covisible"]) == 100 for r in rows if r["run"] == "ground_truth")
    config = camgeo.PRESETS["smoke"]
    for row, clip in zip(still, evaluation.held_out_clips(len(still), config.num_frames, config.image_size)):
        repeated = clip.video[:1].expand_as(clip.video)
        expected = geometry.masked_psnr(repeated[1:], clip.video[1:], clip.covisible[1:]).mean().item()
        assert float(row["PSNR_covisible"]) == pytest.approx(expected, abs=1e-4)


def test_smoke_study_draws_trajectories_and_frames(smoke_study):
    for name in ("trajectories.png", "frames.png"):
        with Image.open(os.path.join(smoke_study, name)) as image:
            assert image.width > 100 and image.height > 100
            assert len(image.convert("L").getcolors(1 << 16)) > 3  # more than a blank canvas


def test_smoke_study_reuses_its_checkpoint(smoke_study, capsys):
    ckpt = os.path.join(smoke_study, "ckpt", "sparse_0.5_0", "ckpt.safetensors")
    before = os.path.getmtime(ckpt)
    evaluate.main(["--preset", "smoke", "--methods", "sparse", "--out", smoke_study])
    assert os.path.getmtime(ckpt) == before
    assert "reusing" in capsys.readouterr().out


def test_a_checkpoint_is_reused_only_if_it_holds_what_its_command_trains_now(tmp_path, monkeypatch):
    run = evaluate.Run("camgeo_0.5_0", "camgeo", 0.5, 0, (), "CamGeo")
    command = evaluate.train_command(run, evaluation.STUDY_PRESETS["smoke"], str(tmp_path), "cpu", 1)
    args = training.parse_args(command[2:])
    ckpt = str(tmp_path / "ckpt.safetensors")

    def write(method="camgeo", step=args.steps, options=training.checkpoint_options(args)):
        save_file({"ema.x": torch.zeros(1)}, ckpt,
                  metadata={"method": method, "step": str(step), "options": json.dumps(options)})

    write()
    assert evaluate.trained_by(ckpt, command)
    new_default = dataclasses.replace(distill.DEFAULTS, teacher_gradient_sigma=4.0)
    monkeypatch.setattr(distill, "DEFAULTS", new_default)  # a changed default of train.py
    assert not evaluate.trained_by(ckpt, command)
    monkeypatch.undo()
    write(step=args.steps - 1)  # a run cut short
    assert not evaluate.trained_by(ckpt, command)
    write(method="sparse")
    assert not evaluate.trained_by(ckpt, command)
    with open(ckpt, "wb") as f:  # truncated
        f.write(b"\x10\x00")
    assert not evaluate.trained_by(ckpt, command)


def test_named_ablations_train_without_the_methods_they_are_read_against(tmp_path):
    evaluate.main(["--preset", "smoke", "--methods", "", "--ablations", "camgeo_nowarmup", "--out", str(tmp_path)])
    with open(tmp_path / "per_clip.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["run"] for row in rows} == {"camgeo_nowarmup_0.5_0", evaluate.GT_RUN, evaluate.DEGRADED_RUN,
                                            evaluate.STILL_RUN}
    options = json.load(open(tmp_path / "ckpt" / "camgeo_nowarmup_0.5_0" / "evaluate_command.json"))
    assert "--no-warmup" in options


def test_unknown_ablation_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation"):
        evaluate.main(["--preset", "smoke", "--methods", "camgeo", "--ablations", "camgeo_nosmooth,camgeo_blue",
                       "--out", str(tmp_path)])


def test_unknown_method_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.main(["--preset", "smoke", "--methods", "sparse,teleport", "--out", str(tmp_path)])


def test_study_trains_several_runs_at_once_with_jobs(tmp_path):
    evaluate.main(["--preset", "smoke", "--methods", "sparse,full", "--jobs", "2", "--out", str(tmp_path)])
    with open(tmp_path / "per_clip.csv") as f:
        runs = {row["run"] for row in csv.DictReader(f)}
    assert {"sparse_0.5_0", "full_1_0"} <= runs
    for name in ("sparse_0.5_0", "full_1_0"):
        assert os.path.isfile(tmp_path / "ckpt" / name / "ckpt.safetensors")


def test_study_trains_the_named_ablations_only_at_the_first_ratio():
    runs = evaluate.plan_runs(["sparse", "camgeo"], (0.5, 0.25), (0, 1), ["camgeo_unfiltered"])
    assert [r.name for r in runs] == ["sparse_0.5_0", "camgeo_0.5_0", "sparse_0.25_0", "camgeo_0.25_0",
                                      "camgeo_unfiltered_0.5_0", "sparse_0.5_1", "camgeo_0.5_1", "sparse_0.25_1",
                                      "camgeo_0.25_1", "camgeo_unfiltered_0.5_1"]
    assert runs[4].flags == ("--teacher-gradient-sigma", "0") and runs[4].method == "camgeo"


# What each ablation changes in the options its checkpoint records, against the CamGeo run of the same study: the
# paper's three ablations and the paper's printed forms, each one choice (the unit weights: both weights).
ABLATION_CHANGES = {
    "camgeo_nosmooth": {"smoothness_weight": 0.0},
    "camgeo_nowarmup": {"warmup": False},
    "camgeo_linsched": {"schedule": "linear"},
    "camgeo_truth": {"distill_target": "truth"},
    "camgeo_printedgate": {"geo_gate": "printed"},
    "camgeo_unitweights": {"traj_weight": 1.0, "geo_weight": 1.0},
    "camgeo_unfiltered": {"teacher_gradient_sigma": 0.0},
}


@pytest.mark.parametrize("name", sorted(ABLATION_CHANGES))
def test_each_ablation_trains_camgeo_with_exactly_its_one_change(name, tmp_path):
    preset = evaluation.STUDY_PRESETS["cpu"]
    camgeo_run, = evaluate.plan_runs(["camgeo"], (0.5,), (0,), [])
    ablation_run = evaluate.plan_runs([], (0.5,), (0,), [name])[0]
    resolve = lambda run: training.checkpoint_options(
        training.parse_args(evaluate.train_command(run, preset, str(tmp_path), "cpu", 1)[2:]))
    camgeo_options, ablation_options = resolve(camgeo_run), resolve(ablation_run)
    changed = {key: value for key, value in ablation_options.items() if camgeo_options[key] != value}
    assert changed == ABLATION_CHANGES[name]  # a no-op flag (already the default) or a second change fails


def test_every_ablation_of_the_registry_has_its_change_checked_above():
    assert set(evaluation.ABLATIONS) == set(ABLATION_CHANGES)
