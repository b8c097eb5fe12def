"""The training script (train.py): smoke runs per method, checkpoints, keyframes, per-method camera inputs;
CamGeo distillation options, DistributedDataParallel under torchrun, exact resume, the NaN guard."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import camgeo
import data
import distill
import geometry
import re10k
import teacher
import train

SMOKE = camgeo.PRESETS["smoke"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A small teacher with random weights (the runs below test plumbing, not what the teacher knows)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    teacher.save_teacher(teacher.VGGT(teacher.SMALL_TEACHER), path)
    return path


def smoke_args(tmp_path, method, steps=3, extra=(), name=None, teacher_file=None):
    out = str(tmp_path / (name or method))
    distill = ["--teacher", teacher_file, "--no-compile"] if method == "camgeo" else []
    return train.parse_args(["--preset", "smoke", "--method", method, "--steps", str(steps), "--out", out,
                             "--num-workers", "0", "--num-clips", "4", *distill, *extra])


def smoke_run(tmp_path, method, steps=3, extra=(), name=None, teacher_file=None):
    args = smoke_args(tmp_path, method, steps, extra, name, teacher_file)
    train.train(args)
    return args.out


def batch(num_frames=8, size=16, seeds=(0, 1)):
    return train.collate([data.render_clip(seed, num_frames, size, size) for seed in seeds])


@pytest.mark.parametrize("method", train.METHODS)
def test_smoke_run_writes_loadable_checkpoint_and_log(tmp_path, method, teacher_path):
    out = smoke_run(tmp_path, method, teacher_file=teacher_path)
    model, info = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME))
    assert info["method"] == method and info["step"] == 3 and info["config"] == SMOKE
    assert isinstance(model, camgeo.CamGeo)
    train_state = torch.load(os.path.join(out, train.TRAIN_STATE_NAME), weights_only=True)
    assert train_state["step"] == 3 and len(train_state["optimizer"]["state"]) == len(list(model.parameters()))
    records = [json.loads(line) for line in open(os.path.join(out, train.LOG_NAME))]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["lr"] > 0 for r in records)


def test_checkpoint_holds_model_and_ema_weights_under_prefixes(tmp_path):
    out = smoke_run(tmp_path, "sparse", steps=2)
    with safe_open(os.path.join(out, train.CKPT_NAME), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    names = set(camgeo.CamGeo(SMOKE).state_dict())
    assert keys == {"model." + k for k in names} | {"ema." + k for k in names}
    assert json.loads(metadata["config"]) == json.loads(camgeo.config_to_json(SMOKE))
    assert json.loads(metadata["options"])["sparse"] == 0.5


def test_ema_weights_differ_from_model_weights_after_training(tmp_path):
    out = smoke_run(tmp_path, "sparse", steps=3)
    ema, _ = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME), weights="ema")
    model, _ = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME), weights="model")
    differs = [not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters())]
    assert any(differs)


def test_checkpoint_writing_leaves_no_temporary_files(tmp_path):
    out = smoke_run(tmp_path, "full", steps=2)
    assert sorted(os.listdir(out)) == sorted([train.CKPT_NAME, train.TRAIN_STATE_NAME, train.LOG_NAME])


def test_update_ema_moves_ema_towards_model():
    model, ema = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = (ema.weight - model.weight).abs().sum().item()
    train.update_ema(ema, model, decay=0.5)
    assert (ema.weight - model.weight).abs().sum().item() == pytest.approx(0.5 * before, rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [train.learning_rate(step, 1000, 1e-3) for step in range(1000)]
    peak = lrs.index(max(lrs))
    assert lrs[0] < max(lrs) and 0 < peak < 100
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(train.MIN_LR_FRACTION * 1e-3, rel=0.01)


@pytest.mark.parametrize("num_frames", [4, 5, 8, 13, 16, 25])
@pytest.mark.parametrize("ratio", [1 / 2, 1 / 3, 1 / 4])
def test_keyframe_indices_include_first_and_last_sorted_unique_with_stated_count(num_frames, ratio):
    index = camgeo.keyframe_indices(num_frames, ratio)
    assert index[0] == 0 and index[-1] == num_frames - 1
    assert torch.equal(index, torch.unique(index))  # sorted and unique
    assert len(index) == max(2, round(ratio * num_frames))


def test_keyframe_indices_are_evenly_spaced():
    assert camgeo.keyframe_indices(9, 1 / 3).tolist() == [0, 4, 8]
    gaps = torch.diff(camgeo.keyframe_indices(16, 1 / 4))
    assert gaps.max() - gaps.min() <= 1


def test_keyframe_indices_reject_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        camgeo.keyframe_indices(8, 0.0)


def test_random_keyframes_have_frame_zero_and_the_stated_count():
    mask = camgeo.random_keyframe_mask(64, 8, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(mask[:, 0] == 1) and torch.all(mask.sum(1) == 4)
    assert len({tuple(row.tolist()) for row in mask}) > 1  # differ per sample


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolated_poses_equal_ground_truth_at_keyframes(method):
    clips = batch()
    _, keyframe_mask, w2c_used = camgeo.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16, width=16)
    keyframes = keyframe_mask[0].bool()
    assert torch.allclose(w2c_used[:, keyframes], clips["w2c"][:, keyframes], atol=1e-5)
    assert not torch.allclose(w2c_used[:, ~keyframes], clips["w2c"][:, ~keyframes], atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolated_conditioning_equals_sparse_conditioning_at_keyframes_and_is_all_given(method):
    clips = batch()
    sparse, mask, _ = camgeo.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 3, height=16, width=16)
    filled, _, _ = camgeo.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16, width=16)
    keyframes = mask[0].bool()
    assert torch.allclose(filled[:, keyframes], sparse[:, keyframes], atol=1e-4)
    assert torch.all(filled[:, :, -1] == 1)  # the mask channel (last): interpolated poses are given as if known


def test_sparse_conditioning_is_zero_away_from_keyframes():
    clips = batch()
    camera, mask, _ = camgeo.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 2, height=16, width=16)
    assert torch.count_nonzero(camera[:, ~mask[0].bool()]) == 0
    assert torch.all(camera[:, mask[0].bool(), -1] == 1)


def test_full_conditioning_uses_every_ground_truth_pose():
    clips = batch()
    camera, mask, w2c_used = camgeo.camera_inputs(clips["w2c"], clips["K"], "full", 1 / 4, height=16, width=16)
    assert torch.all(mask == 1) and torch.equal(w2c_used, clips["w2c"])
    c2w = geometry.normalize_translation(geometry.relative_to_first(geometry.invert_pose(clips["w2c"])))
    K = camgeo.intrinsics_vector(clips["K"])[:, None].expand(-1, 8, -1)
    assert torch.allclose(camera[:, :, :6], geometry.plucker_embedding(K, c2w, 16, 16), atol=1e-4)


def test_camgeo_is_the_default_method():
    args = train.parse_args(["--sparse", "0.5"])
    assert args.method == "camgeo" and args.out == os.path.join("out", "camgeo")
    assert args.teacher == train.DEFAULT_TEACHER and args.compile


def test_parse_args_defaults_output_folder_to_method():
    assert train.parse_args(["--method", "slerp"]).out == os.path.join("out", "slerp")


def test_parse_args_rejects_ratio_outside_zero_one():
    with pytest.raises(SystemExit):
        train.parse_args(["--sparse", "1.5"])


def test_smoke_run_trains_on_a_realestate10k_folder(tmp_path):
    for seed in range(3):
        re10k.write_re10k_clip(data.render_clip(seed, SMOKE.num_frames, 24, 24), str(tmp_path / "re10k"), f"c{seed}")
    out = smoke_run(tmp_path, "sparse", steps=2, extra=("--data", str(tmp_path / "re10k")))
    _, info = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME))
    assert info["step"] == 2 and json.loads(open(os.path.join(out, train.LOG_NAME)).readline())["loss"] > 0


def test_export_keeps_only_ema_weights_in_half_precision_and_loads(tmp_path):
    out = smoke_run(tmp_path, "sparse", steps=2)
    destination = str(tmp_path / "assets" / "student.safetensors")
    train.export_ema(os.path.join(out, train.CKPT_NAME), destination)
    with safe_open(destination, "pt") as f:
        assert all(k.startswith("ema.") and f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    exported, info = camgeo.load_checkpoint(destination)
    original, _ = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME))
    assert info["step"] == 2
    for a, b in zip(exported.parameters(), original.parameters()):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-2, rtol=1e-3)


# -----------------------------------------------------------------------------
# CamGeo distillation in the loop


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, train.LOG_NAME))]


def test_camgeo_run_logs_every_loss_term_and_the_curriculum(tmp_path, teacher_path):
    # against the true poses, so that both terms are non-zero even for a teacher with random weights; the teacher
    # on every step, so that the cadence skips none of the three
    out = smoke_run(tmp_path, "camgeo", steps=3, teacher_file=teacher_path,
                    extra=("--no-warmup", "--distill-target", "truth", "--teacher-every", "1"))
    records = read_log(out)
    for r in records:
        assert {"loss", "loss_diff", "loss_traj", "loss_geo", "loss_geo_depth", "loss_geo_smooth", "alpha", "beta",
                "teacher_clips"} <= r.keys()
        assert r["loss"] == pytest.approx(gated_total(r), rel=1e-5)
    assert any(r["teacher_clips"] > 0 and r["loss_traj"] > 0 and r["loss_geo"] > 0 for r in records)


def test_camgeo_checkpoint_holds_the_student_only(tmp_path, teacher_path):
    out = smoke_run(tmp_path, "camgeo", steps=2, extra=("--no-warmup",), teacher_file=teacher_path)
    with safe_open(os.path.join(out, train.CKPT_NAME), "pt") as f:
        keys = set(f.keys())
        options = json.loads(f.metadata()["options"])
    names = set(camgeo.CamGeo(SMOKE).state_dict())
    assert keys == {"model." + k for k in names} | {"ema." + k for k in names}
    assert options["teacher"] == teacher_path and options["warmup"] is False


def one_step_terms(tmp_path, teacher_path, step, extra=()):
    """Losses of one CamGeo step at `step` of a 10-step schedule, with options `extra` (L_traj and L_geo against
    the true poses, non-zero even for the random teacher)."""
    extra = ("--distill-target", "truth", *extra)
    args = smoke_args(tmp_path, "camgeo", steps=10, extra=extra, teacher_file=teacher_path)
    torch.manual_seed(0)
    model = camgeo.CamGeo(SMOKE)
    clips = batch(num_frames=SMOKE.num_frames, seeds=(0, 1, 2, 3))
    generator = torch.Generator().manual_seed(0)
    loss, terms = train.step_losses(args, model, train.load_teacher(teacher_path, "cpu"), distill.geometry_pairs,
                                    clips, step, generator, SMOKE, torch.device("cpu"))
    return loss, terms, args


def test_warmup_step_runs_no_teacher_and_is_the_diffusion_loss(tmp_path, teacher_path):
    loss, terms, _ = one_step_terms(tmp_path, teacher_path, step=0)
    assert terms["alpha"] == 0 and terms["teacher_clips"] == 0 and torch.equal(loss, terms["loss_diff"])


def gated_total(terms, traj_weight=distill.TRAJ_WEIGHT, geo_weight=distill.GEO_WEIGHT):
    """L_total with L_geo gated by beta, from the logged terms (the default weights unless given)."""
    return terms["loss_diff"] + terms["alpha"] * terms["teacher_factor"] * (
        (1 - terms["beta"]) * traj_weight * terms["loss_traj"] + terms["beta"] * geo_weight * terms["loss_geo"])


@pytest.mark.parametrize("extra, check", [
    (("--no-warmup",), lambda loss, terms: terms["alpha"] == 1.0 and torch.allclose(loss, gated_total(terms))),
    (("--schedule", "linear"), lambda loss, terms: (terms["alpha"], terms["beta"]) == distill.curriculum_weights(
        6, 10, "linear") and torch.allclose(loss, gated_total(terms))),
    (("--smoothness-weight", "0"), lambda loss, terms: terms["loss_geo"] == terms["loss_geo_depth"]),
    (("--geo-gate", "printed"), lambda loss, terms: not torch.allclose(loss, gated_total(terms))
     and torch.allclose(loss, terms["loss_diff"] + terms["alpha"] * terms["teacher_factor"] * (
         (1 - terms["beta"]) * distill.TRAJ_WEIGHT * terms["loss_traj"] + distill.GEO_WEIGHT * terms["loss_geo"]))),
    (("--traj-weight", "3", "--geo-weight", "0.5"), lambda loss, terms: torch.allclose(loss, gated_total(terms, 3, 0.5))
     and not torch.allclose(loss, gated_total(terms))),
])
def test_each_curriculum_option_reaches_the_loss(tmp_path, teacher_path, extra, check):
    loss, terms, args = one_step_terms(tmp_path, teacher_path, step=6, extra=("--teacher-fraction", "1", *extra))
    assert terms["teacher_clips"] > 0 and terms["loss_geo"] > 0 and terms["loss_traj"] > 0
    assert check(loss, terms)


def test_teacher_every_n_steps_weighs_n_times_and_is_off_between(tmp_path, teacher_path):
    every = ("--no-warmup", "--teacher-fraction", "1", "--teacher-every")
    loss_1, terms_1, _ = one_step_terms(tmp_path, teacher_path, step=6, extra=(*every, "1"))
    loss_2, terms_2, _ = one_step_terms(tmp_path, teacher_path, step=6, extra=(*every, "2"))
    # the same step, batch and noise: the teacher's terms are the same, counted twice as much
    assert terms_1["teacher_factor"] == 1 and terms_2["teacher_factor"] == 2
    for name in ("loss_diff", "loss_traj", "loss_geo"):
        assert torch.allclose(terms_1[name], terms_2[name])
    distilled_1, distilled_2 = loss_1 - terms_1["loss_diff"], loss_2 - terms_2["loss_diff"]
    assert distilled_1 > 0 and torch.allclose(distilled_2, 2 * distilled_1)
    # between two teacher steps: no teacher, the diffusion loss alone
    loss_off, terms_off, _ = one_step_terms(tmp_path, teacher_path, step=7, extra=(*every, "2"))
    assert terms_off["teacher_clips"] == 0 and terms_off["teacher_factor"] == 0
    assert torch.equal(loss_off, terms_off["loss_diff"])


def test_teacher_every_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--teacher-every", "0", "--out", str(tmp_path)])


def distillation_of(video_pred, tmp_path, teacher_path, extra=(), camera_drop=None, t=None):
    """train.distillation_losses for a batch of 4 clips whose predicted video is video_pred(true video)."""
    args = smoke_args(tmp_path, "camgeo", steps=10, extra=("--teacher-fraction", "1", *extra),
                      teacher_file=teacher_path)
    clips = batch(num_frames=SMOKE.num_frames, seeds=(0, 1, 2, 3))
    out = {"t": torch.zeros(4) if t is None else t, "x0_pred": video_pred(clips["video"]), "loss": torch.zeros(()),
           "camera_drop": torch.zeros(4, dtype=torch.bool) if camera_drop is None else camera_drop}
    mask = torch.zeros(4, SMOKE.num_frames)
    mask[:, [0, SMOKE.num_frames - 1]] = 1
    return distill.distillation_losses(train.load_teacher(teacher_path, "cpu"), distill.geometry_pairs, out, clips, mask,
                                     args)


def test_teacher_consistent_target_is_zero_when_the_prediction_is_the_real_clip(tmp_path, teacher_path):
    terms = distillation_of(lambda video: video, tmp_path, teacher_path)
    assert terms["teacher_clips"] == 4 and terms["loss_traj"] == 0 and terms["loss_geo"] == 0
    shifted = distillation_of(lambda video: video.roll(1, dims=0), tmp_path, teacher_path)  # another clip's frames
    assert shifted["loss_traj"] > 0


def test_trajectory_on_every_frame_compares_the_frames_between_keyframes(tmp_path, teacher_path, monkeypatch):
    compared = {}
    trajectory_loss = distill.trajectory_loss

    def recording(*args):
        compared["mask"] = args[4]  # keyframe_mask: the frames L_traj averages over
        return trajectory_loss(*args)

    monkeypatch.setattr(distill, "trajectory_loss", recording)
    every = ("--traj-frames", "all")
    assert distillation_of(lambda video: video, tmp_path, teacher_path, extra=every)["loss_traj"] == 0
    assert compared["mask"].all()
    assert distillation_of(lambda video: video.roll(1, dims=0), tmp_path, teacher_path, extra=every)["loss_traj"] > 0
    distillation_of(lambda video: video, tmp_path, teacher_path)
    assert compared["mask"].sum(-1).tolist() == [2, 2, 2, 2]  # the first and last frames, as given
    with pytest.raises(SystemExit):  # the true poses between keyframes are what a sparse student is not given
        train.parse_args([*every, "--distill-target", "truth", "--out", str(tmp_path)])


def test_low_passed_teacher_gradient_changes_the_gradient_not_the_losses(tmp_path, teacher_path):
    readings = {}
    for sigma in ("0", "1.5"):
        leaf = {}

        def predicted(video):
            leaf["x"] = video.roll(1, dims=0).clone().requires_grad_(True)  # another clip's frames: losses > 0
            return leaf["x"]

        terms = distillation_of(predicted, tmp_path, teacher_path, extra=("--teacher-gradient-sigma", sigma))
        (terms["loss_traj"] + terms["loss_geo"]).backward()
        readings[sigma] = (terms["loss_traj"].item(), terms["loss_geo"].item(), leaf["x"].grad)
    assert readings["0"][:2] == readings["1.5"][:2] and readings["0"][0] > 0
    whole, low_passed = readings["0"][2], readings["1.5"][2]
    assert torch.allclose(low_passed, geometry.gaussian_blur(whole.flatten(0, 1), 1.5).view_as(whole), atol=1e-7)
    roughness = lambda g: (g[..., 1:] - g[..., :-1]).abs().sum() / g.abs().sum()  # neighbour differences
    assert roughness(low_passed) < 0.5 * roughness(whole)


def test_teacher_reads_the_given_reference_as_frame_0_unless_told_to_read_the_prediction(tmp_path, teacher_path):
    gradients = {}
    for frame0 in ("reference", "predicted"):
        leaf = {}

        def predicted(video):
            leaf["x"] = video.roll(1, dims=0).clone().requires_grad_(True)  # another clip's frames: losses > 0
            return leaf["x"]

        terms = distillation_of(predicted, tmp_path, teacher_path, extra=("--teacher-frame0", frame0))
        (terms["loss_traj"] + terms["loss_geo"]).backward()
        assert terms["loss_traj"] > 0
        gradients[frame0] = leaf["x"].grad
    assert gradients["reference"][:, 0].abs().sum() == 0 and gradients["reference"][:, 1:].abs().sum() > 0
    assert gradients["predicted"][:, 0].abs().sum() > 0
    with pytest.raises(ValueError, match="does not match"):
        distill.teacher_frames(torch.zeros(1, 4, 3, 8, 8), 0.0, reference=torch.zeros(1, 3, 4, 4))


def test_clips_whose_camera_was_dropped_get_no_distillation(tmp_path, teacher_path):
    drop = torch.tensor([True, True, True, True])
    terms = distillation_of(lambda video: video.roll(1, dims=0), tmp_path, teacher_path, camera_drop=drop)
    assert terms["teacher_clips"] == 0 and terms["loss_traj"] == 0 and terms["loss_geo"] == 0
    one_kept = distillation_of(lambda video: video.roll(1, dims=0), tmp_path, teacher_path,
                               camera_drop=torch.tensor([True, False, True, True]))
    assert one_kept["teacher_clips"] == 1


def test_teacher_gate_and_fraction_limit_the_clips_the_teacher_sees(tmp_path, teacher_path):
    _, terms, _ = one_step_terms(tmp_path, teacher_path, step=6, extra=("--teacher-fraction", "0.25"))
    assert terms["teacher_clips"] <= 1
    _, terms, _ = one_step_terms(tmp_path, teacher_path, step=6, extra=("--teacher-t-max", "1e-6"))
    assert terms["teacher_clips"] == 0 and terms["loss_traj"] == 0


def test_distillation_gradient_reaches_the_student_through_the_frozen_teacher(tmp_path, teacher_path):
    args = smoke_args(tmp_path, "camgeo", steps=10, extra=("--teacher-fraction", "1"), teacher_file=teacher_path)
    teacher_model = train.load_teacher(teacher_path, "cpu")
    torch.manual_seed(0)
    model = camgeo.CamGeo(SMOKE)
    for p in [*model.final_layer.parameters(), *model.pixel_head.net[-1].parameters()]:
        p.data.normal_(0, 0.02)  # zero-initialised layers would block the gradient to everything before them
    clips = batch(num_frames=SMOKE.num_frames, seeds=(0, 1, 2, 3))
    _, terms = train.step_losses(args, model, teacher_model, distill.geometry_pairs, clips, 6,
                                 torch.Generator().manual_seed(0), SMOKE, torch.device("cpu"))
    (terms["loss_traj"] + terms["loss_geo"]).backward()
    assert terms["loss_traj"] > 0 and model.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher_model.parameters())


def test_compile_falls_back_to_eager_with_a_note_when_compilation_fails(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C compiler")
        return compiled
    monkeypatch.setattr(torch, "compile", broken_compile)
    geometry_pairs = train.make_geometry_pairs(True)
    depth = torch.rand(1, 3, 8, 8) + 1
    w2c = torch.eye(4)[:3].expand(1, 3, 3, 4)
    K = torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]).expand(1, 3, 3, 3)
    frames = torch.rand(1, 3, 3, 8, 8)
    result = geometry_pairs(depth, w2c, K, frames)
    assert torch.equal(result[0], distill.geometry_pairs(depth, w2c, K, frames)[0])
    assert "running it eagerly" in capsys.readouterr().out


def test_missing_teacher_is_a_clear_error(tmp_path):
    args = smoke_args(tmp_path, "camgeo", teacher_file=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="teacher checkpoint .* not found"):
        train.train(args)


def test_sampling_never_imports_the_teacher():
    code = "import sys, sample; print('teacher' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# runs that survive: resume, NaN guard, DDP


def checkpoint_tensors(out):
    with safe_open(os.path.join(out, train.CKPT_NAME), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_killed_and_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, teacher_path):
    extra = ("--no-warmup", "--teacher-fraction", "0.5", "--ckpt-every", "100")
    whole = smoke_run(tmp_path, "camgeo", steps=6, extra=extra, name="whole", teacher_file=teacher_path)
    pieces = smoke_run(tmp_path, "camgeo", steps=6, extra=(*extra, "--debug-stop-at-step", "3"), name="pieces",
                       teacher_file=teacher_path)
    assert len(read_log(pieces)) == 3
    smoke_run(tmp_path, "camgeo", steps=6, extra=(*extra, "--resume"), name="pieces", teacher_file=teacher_path)
    a, b = checkpoint_tensors(whole), checkpoint_tensors(pieces)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(os.path.join(whole, train.TRAIN_STATE_NAME), weights_only=True)
    state_b = torch.load(os.path.join(pieces, train.TRAIN_STATE_NAME), weights_only=True)
    for key, moments in state_a["optimizer"]["state"].items():
        assert all(torch.equal(moments[name], state_b["optimizer"]["state"][key][name]) for name in moments)
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in read_log(whole)]
    assert drop_time == [{k: v for k, v in r.items() if k != "time"} for r in read_log(pieces)]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--resume: no"):
        train.train(smoke_args(tmp_path, "sparse", extra=("--resume",)))


def test_nan_loss_stops_the_run_and_leaves_the_last_checkpoint_intact(tmp_path):
    reference = smoke_run(tmp_path, "sparse", steps=6, extra=("--debug-stop-at-step", "4"), name="reference")
    args = smoke_args(tmp_path, "sparse", steps=6, extra=("--ckpt-every", "2", "--debug-nan-at-step", "5"))
    with pytest.raises(train.NonFiniteLoss, match="step 5"):
        train.train(args)
    assert sorted(os.listdir(args.out)) == sorted([train.CKPT_NAME, train.TRAIN_STATE_NAME, train.LOG_NAME])
    _, info = camgeo.load_checkpoint(os.path.join(args.out, train.CKPT_NAME))
    assert info["step"] == 4
    a, b = checkpoint_tensors(reference), checkpoint_tensors(args.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_ends_the_command_with_a_one_line_message(tmp_path):
    command = [sys.executable, "train.py", "--preset", "smoke", "--method", "sparse", "--steps", "3",
               "--num-workers", "0", "--num-clips", "4", "--out", str(tmp_path / "run"), "--debug-nan-at-step", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: loss is nan at step 2")


def test_torchrun_with_two_processes_trains_with_ddp_and_rank_zero_saves(tmp_path, teacher_path):
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--preset", "smoke", "--steps", "2", "--num-workers", "0", "--num-clips", "4", "--out", out,
               "--teacher", teacher_path, "--no-compile", "--no-warmup", "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("done in") == 1
    assert [r["step"] for r in read_log(out)] == [1, 2]
    _, info = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME))
    assert info["method"] == "camgeo" and info["step"] == 2
    assert len(torch.load(os.path.join(out, train.TRAIN_STATE_NAME), weights_only=True)["rng"]) == 2


def test_term_gradient_norms_are_logged_and_add_up_to_the_step_gradient(tmp_path, teacher_path):
    out = smoke_run(tmp_path, "camgeo", steps=2, extra=("--no-warmup", "--distill-target", "truth",
                                                        "--teacher-fraction", "1", "--log-term-gradients", "1"),
                    teacher_file=teacher_path)
    for record in read_log(out):
        parts = [record["grad_diff"], record["grad_traj"], record["grad_geo"]]
        assert all(p >= 0 for p in parts) and record["grad_diff"] > 0
        # the norm of a sum is at most the sum of the norms (before clipping, which only scales down)
        assert record["grad_norm"] <= sum(parts) * (1 + 1e-4)
