"""training.py: train.py's command line and its DistillConfig, the loss of one step (the curriculum, the teacher's
cadence and L_total as the options set them), the compiled L_geo's fallback, and what a checkpoint records."""
import dataclasses
import json
import math
import os

import pytest
import torch

import camgeo
import data
import distill
import teacher
import training

SMOKE = camgeo.PRESETS["smoke"]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A small teacher with random weights (the steps below test plumbing, not what the teacher knows)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    teacher.save_teacher(teacher.VGGT(teacher.SMALL_TEACHER), path)
    return path


# -----------------------------------------------------------------------------
# the command line


# a value other than the default for each option (each is a DistillConfig field)
OTHER_VALUES = {"teacher": "elsewhere.safetensors", "teacher_cameras": "head", "teacher_every": 3,
                "traj_weight": 1.0, "geo_weight": 0.25, "smoothness_weight": 0.0, "warmup": False,
                "schedule": "linear", "distill_target": "truth", "geo_gate": "printed",
                "teacher_gradient_sigma": 1.5, "teacher_gate": "flat"}


@pytest.mark.parametrize("name", sorted(training.DISTILL_OPTIONS))
def test_each_distillation_option_sets_its_config_field_and_only_that(name):
    value = OTHER_VALUES[name]
    flag = f"--no-{name.replace('_', '-')}" if value is False else f"--{name.replace('_', '-')}"
    argv = [flag] if value is False else [flag, str(value)]
    config = training.parse_args(argv).distill
    assert config == dataclasses.replace(distill.DistillConfig(), **{name: value})


def test_the_distillation_choices_live_in_the_config_only():
    args = training.parse_args(["--traj-weight", "2"])
    assert args.distill.traj_weight == 2.0
    assert not any(hasattr(args, name) for name in training.DISTILL_OPTIONS)  # one place to read them from


def test_explicit_options_override_the_presets_defaults_and_the_rest_come_from_it():
    args = training.parse_args(["--preset", "smoke", "--steps", "7"])
    assert args.steps == 7
    assert (args.batch_size, args.lr) == (training.TRAIN_DEFAULTS["smoke"]["batch_size"],
                                          training.TRAIN_DEFAULTS["smoke"]["lr"])


def test_runs_of_different_methods_write_to_different_folders_unless_out_is_given(tmp_path):
    outs = {training.parse_args(["--method", method]).out for method in training.METHODS}
    assert len(outs) == len(training.METHODS)
    assert training.parse_args(["--method", "slerp", "--out", str(tmp_path)]).out == str(tmp_path)


@pytest.mark.parametrize("argv", [["--sparse", "1.5"], ["--sparse", "0"], ["--teacher-every", "0"],
                                  ["--teacher-gradient-sigma", "-1"],
                                  ["--distill-target", "truth", "--data", "folder"]])
def test_parse_args_rejects_what_cannot_be_trained(argv):
    with pytest.raises(SystemExit):
        training.parse_args(argv)


def test_a_camgeo_checkpoint_records_every_choice_of_its_distillation_and_a_baseline_none():
    camgeo_options = training.checkpoint_options(training.parse_args(["--teacher-every", "2", "--sparse", "0.25"]))
    assert camgeo_options["sparse"] == 0.25 and camgeo_options["teacher_every"] == 2
    assert {field.name for field in dataclasses.fields(distill.DistillConfig)} <= camgeo_options.keys()
    assert json.loads(json.dumps(camgeo_options))["spans"] == list(distill.DEFAULTS.spans)  # JSON as in the file
    sparse_options = training.checkpoint_options(training.parse_args(["--method", "sparse"]))
    assert not any(field.name in sparse_options for field in dataclasses.fields(distill.DistillConfig))


# -----------------------------------------------------------------------------
# one step


def one_step(teacher_path, step, extra=(), steps=10, monkeypatch=None):
    """Losses of one CamGeo step at `step` of a `steps`-step schedule, every clip open to the teacher, options
    `extra` (L_traj and L_geo against the true poses: non-zero even for the random teacher). With monkeypatch,
    also what the step passed to distill.total_loss."""
    args = training.parse_args(["--preset", "smoke", "--steps", str(steps), "--teacher", teacher_path,
                                "--no-compile", "--distill-target", "truth", *extra])
    args.distill = dataclasses.replace(args.distill, teacher_fraction=1.0)
    calls = []
    if monkeypatch is not None:
        total_loss = distill.total_loss
        monkeypatch.setattr(distill, "total_loss", lambda *a: calls.append(a) or total_loss(*a))
    torch.manual_seed(0)
    model = camgeo.CamGeo(SMOKE)
    clips = training.collate([data.render_clip(seed, SMOKE.num_frames, 16, 16) for seed in range(4)])
    loss, terms = training.step_losses(args, model, training.load_teacher(teacher_path, "cpu"), distill.geometry_pairs,
                                       clips, step, torch.Generator().manual_seed(0), SMOKE, torch.device("cpu"))
    return loss, terms, (calls[0] if calls else None)


def test_a_warmup_step_runs_no_teacher_and_is_the_diffusion_loss(teacher_path):
    loss, terms, _ = one_step(teacher_path, step=0)
    assert terms["alpha"] == 0 and terms["teacher_clips"] == 0 and torch.equal(loss, terms["loss_diff"])


SIGMOID_BETA_AT_6_OF_10 = 1 / (1 + math.exp(-(0.6 - 0.5) / 0.03))  # beta_mid 0.5, width 0.03


# (options, step of 10) -> what L_total is given: alpha, beta, the gate of L_geo, the two weights as used that step
@pytest.mark.parametrize("extra, step, alpha, beta, gate, weights", [
    ((), 6, pytest.approx(1 / (1 + math.exp(-(0.6 - 0.2) / 0.03))), pytest.approx(SIGMOID_BETA_AT_6_OF_10), "beta",
     (0.05, 0.05)),
    (("--no-warmup",), 0, 1.0, pytest.approx(1 / (1 + math.exp(0.5 / 0.03))), "beta", (0.05, 0.05)),
    (("--schedule", "linear"), 6, 1.0, 1.0, "beta", (0.05, 0.05)),  # clamp(0.5 + 0.1 / 0.12, 0, 1)
    (("--geo-gate", "printed"), 6, pytest.approx(1.0, abs=1e-5), pytest.approx(SIGMOID_BETA_AT_6_OF_10), "printed",
     (0.05, 0.05)),
    (("--traj-weight", "3", "--geo-weight", "0.5"), 6, pytest.approx(1.0, abs=1e-5),
     pytest.approx(SIGMOID_BETA_AT_6_OF_10), "beta", (3.0, 0.5)),
    (("--teacher-every", "2"), 6, pytest.approx(1.0, abs=1e-5), pytest.approx(SIGMOID_BETA_AT_6_OF_10), "beta",
     (0.1, 0.1)),  # the teacher's step of every second: twice the weights
])
def test_each_option_reaches_l_total(teacher_path, monkeypatch, extra, step, alpha, beta, gate, weights):
    loss, terms, given = one_step(teacher_path, step, extra, monkeypatch=monkeypatch)
    loss_diff, loss_traj, loss_geo, given_alpha, given_beta, given_gate, traj_weight, geo_weight = given
    assert terms["teacher_clips"] > 0 and loss_traj > 0 and loss_geo > 0
    assert (given_alpha, given_beta, given_gate) == (alpha, beta, gate)
    assert (traj_weight, geo_weight) == pytest.approx(weights)
    assert loss_diff is terms["loss_diff"] and loss_traj is terms["loss_traj"] and loss_geo is terms["loss_geo"]
    assert torch.equal(loss, distill.total_loss(*given))  # the step minimises L_total of its terms


def test_smoothness_weight_zero_leaves_l_geo_its_depth_term(teacher_path):
    _, terms, _ = one_step(teacher_path, 6, ("--smoothness-weight", "0"))
    assert terms["loss_geo_smooth"] > 0 and terms["loss_geo"] == terms["loss_geo_depth"]


def test_teacher_every_n_steps_weighs_n_times_and_is_off_between(teacher_path):
    every = ("--no-warmup", "--teacher-every")
    loss_1, terms_1, _ = one_step(teacher_path, step=6, extra=(*every, "1"))
    loss_2, terms_2, _ = one_step(teacher_path, step=6, extra=(*every, "2"))
    # the same step, batch and noise: the teacher's terms are the same, counted twice as much
    assert terms_1["teacher_factor"] == 1 and terms_2["teacher_factor"] == 2
    for name in ("loss_diff", "loss_traj", "loss_geo"):
        assert torch.allclose(terms_1[name], terms_2[name])
    distilled_1, distilled_2 = loss_1 - terms_1["loss_diff"], loss_2 - terms_2["loss_diff"]
    assert distilled_1 > 0 and torch.allclose(distilled_2, 2 * distilled_1)
    # between two teacher steps: no teacher, the diffusion loss alone
    loss_off, terms_off, _ = one_step(teacher_path, step=7, extra=(*every, "2"))
    assert terms_off["teacher_clips"] == 0 and terms_off["teacher_factor"] == 0
    assert torch.equal(loss_off, terms_off["loss_diff"])


def test_distillation_gradient_reaches_the_student_through_the_frozen_teacher(teacher_path):
    args = training.parse_args(["--preset", "smoke", "--steps", "10", "--teacher", teacher_path, "--no-compile"])
    args.distill = dataclasses.replace(args.distill, teacher_fraction=1.0)
    teacher_model = training.load_teacher(teacher_path, "cpu")
    torch.manual_seed(0)
    model = camgeo.CamGeo(SMOKE)
    for p in [*model.final_layer.parameters(), *model.copy_head.net[-1].parameters()]:
        p.data.normal_(0, 0.02)  # zero-initialised layers would block the gradient to everything before them
    clips = training.collate([data.render_clip(seed, SMOKE.num_frames, 16, 16) for seed in range(4)])
    _, terms = training.step_losses(args, model, teacher_model, distill.geometry_pairs, clips, 6,
                                    torch.Generator().manual_seed(0), SMOKE, torch.device("cpu"))
    (terms["loss_traj"] + terms["loss_geo"]).backward()
    assert terms["loss_traj"] > 0 and model.final_layer.linear.weight.grad.abs().sum() > 0
    # both output paths: the copy head (pixels the reference does not show) and the depth the copy is marched by
    assert model.copy_head.net[0].weight.grad.abs().sum() > 0 and model.depth_head.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_model.parameters())


def test_compile_falls_back_to_eager_with_a_note_when_compilation_fails(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C compiler")
        return compiled
    monkeypatch.setattr(torch, "compile", broken_compile)
    geometry_pairs = training.make_geometry_pairs(True)
    depth = torch.rand(1, 3, 8, 8) + 1
    w2c = torch.eye(4)[:3].expand(1, 3, 3, 4)
    K = torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]).expand(1, 3, 3, 3)
    frames = torch.rand(1, 3, 3, 8, 8)
    result = geometry_pairs(depth, w2c, K, frames)
    assert torch.equal(result[0], distill.geometry_pairs(depth, w2c, K, frames)[0])
    assert "running it eagerly" in capsys.readouterr().out


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="teacher checkpoint .* not found"):
        training.load_teacher(str(tmp_path / "absent.safetensors"), "cpu")


def test_checkpoint_writing_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "file.txt")
    training.atomic_write(path, lambda tmp: open(tmp, "w").write("first"))

    def interrupted(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.atomic_write(path, interrupted)
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["file.txt"]
