"""evaluate.py: the camera estimator finds known poses, and the study runs end to end on a tiny config."""
import csv
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import camgeo
import data
import distill
import estimator
import evaluate
import geometry
import report
import train
from test_report import write_per_clip


def rotation_degrees(c2w_a, c2w_b):
    relative = c2w_a[..., :3, :3].transpose(-1, -2) @ c2w_b[..., :3, :3]
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos.double()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The estimator makes many small tensor calls: on a shared 2-core machine a second thread mostly waits
    # (measured 7x slower). Restore the setting for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip():
    return evaluate.held_out_clips(1, 4, 32)[0]


def test_estimator_recovers_a_perturbed_pose_of_a_ground_truth_frame(clip):
    frame = 2
    truth = clip.c2w[frame:frame + 1]
    # a few degrees and centimetres off in every axis
    delta = torch.tensor([[0.03, -0.025, 0.02, 0.05, -0.03, 0.04]])
    start = estimator.apply_increment(truth, delta)
    assert rotation_degrees(start, truth).item() > 2.0
    estimate, _ = estimator.refine_poses(clip.scene, clip.K, clip.video[frame:frame + 1], start)
    assert rotation_degrees(estimate, truth).item() < 0.05
    assert (estimate[0, :3, 3] - truth[0, :3, 3]).norm().item() < 0.002


def test_estimator_ignores_a_colour_cast(clip):
    frame = 1
    truth = clip.c2w[frame:frame + 1]
    cast = (clip.video[frame:frame + 1] * torch.tensor([0.85, 1.0, 1.1]).view(1, 3, 1, 1) + 0.03).clamp(0, 1)
    start = estimator.apply_increment(truth, torch.tensor([[0.02, 0.0, -0.01, 0.03, 0.0, 0.0]]))
    estimate, _ = estimator.refine_poses(clip.scene, clip.K, cast, start)
    assert rotation_degrees(estimate, truth).item() < 0.1


def test_estimated_path_of_a_ground_truth_clip_is_far_closer_than_a_still_camera(clip):
    path = estimator.estimate_paths(clip.scene, clip.K, clip.video[None], clip.c2w[0])[0]
    assert torch.equal(path[0], clip.c2w[0])  # frame 0 is the given reference pose
    error = geometry.camera_metrics(clip.c2w, path)
    still = geometry.camera_metrics(clip.c2w, clip.c2w[:1].expand_as(clip.c2w))
    assert error["RotErr"] < 0.01  # radians, summed over frames
    assert error["RotErr"] < still["RotErr"] / 20
    assert error["TransErr"] < still["TransErr"] / 20


@pytest.mark.parametrize("method", ["sparse", "full", "linear", "slerp"])
def test_camera_given_to_each_method_matches_training(clip, method):
    w2c = geometry.invert_pose(clip.c2w)[None]
    expected, _, _ = camgeo.camera_inputs(w2c, clip.K[None], method, 0.5, height=32, width=32)
    assert torch.allclose(evaluate.camera_for(clip, method, 0.5, 32), expected, atol=1e-6)


def test_test_clips_come_from_the_held_out_split():
    clips = evaluate.held_out_clips(2, 4, 16)
    low, high = data.SPLIT_SEEDS["test"]
    assert all(low <= c.seed < high for c in clips)
    assert torch.equal(clips[1].video, data.render_clip(clips[1].seed, 4, 16, 16)["video"])


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    evaluate.main(["--preset", "smoke", "--methods", "sparse", "--out", out])
    return out


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
    assert len(rows) == 4 * evaluate.STUDY_PRESETS["smoke"].clips
    still = [r for r in rows if r["run"] == "reference_repeated"]
    # a still video's estimated path does not move, so its error is the requested path's own rotation
    assert all(float(r["RotErr"]) > 0 for r in still)


def test_image_metrics_score_the_generated_frames_not_the_given_reference():
    clip = evaluate.held_out_clips(1, 4, 16)[0]
    wrong_first = clip.video.clone()
    wrong_first[0] = 1 - wrong_first[0]
    rot_err, trans_err, cam_mc, psnr, ssim = evaluate.video_metrics(clip, wrong_first, clip.c2w)
    assert (rot_err, trans_err, cam_mc) == (0, 0, 0) and psnr == 100 and ssim == pytest.approx(1)
    # a video that repeats the reference gets no exact frame for free
    still = clip.video[:1].expand_as(clip.video)
    assert evaluate.video_metrics(clip, still, clip.c2w)[3] < 40


def test_validation_puts_the_estimator_below_a_still_camera():
    config = estimator.EstimatorConfig(blur_levels=(2.0, 0.0), iterations_per_level=4)
    report = evaluate.validate(1, 4, 16, config)
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    rot_err = lambda name: float(rows[name].split(" | ")[1].split(" ")[0])
    assert rot_err("estimator, ground-truth video") < rot_err("naive: camera held at frame 0") / 10
    assert "naive: SLERP of keyframes at 1/4" in rows


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
    command = evaluate.train_command(run, evaluate.STUDY_PRESETS["smoke"], str(tmp_path), "cpu", 1)
    args = train.parse_args(command[2:])
    ckpt = str(tmp_path / "ckpt.safetensors")

    def write(method="camgeo", step=args.steps, options=train.checkpoint_options(args)):
        save_file({"ema.x": torch.zeros(1)}, ckpt,
                  metadata={"method": method, "step": str(step), "options": json.dumps(options)})

    write()
    assert evaluate.trained_by(ckpt, command)
    monkeypatch.setattr(distill, "TEACHER_GRADIENT_SIGMA", distill.TEACHER_GRADIENT_SIGMA + 1)  # a new default
    assert not evaluate.trained_by(ckpt, command)
    monkeypatch.undo()
    write(step=args.steps - 1)  # a run cut short
    assert not evaluate.trained_by(ckpt, command)
    write(method="sparse")
    assert not evaluate.trained_by(ckpt, command)
    with open(ckpt, "wb") as f:  # truncated
        f.write(b"\x10\x00")
    assert not evaluate.trained_by(ckpt, command)


@pytest.mark.parametrize("name", sorted(evaluate.ABLATIONS))
def test_every_study_run_is_a_valid_train_py_command(name, tmp_path):
    preset = evaluate.STUDY_PRESETS["cpu"]
    run = evaluate.Run(name, "camgeo", 0.5, 0, tuple(evaluate.ABLATIONS[name].flags), name)
    command = evaluate.train_command(run, preset, str(tmp_path), "cpu", 1)
    args = train.parse_args(command[2:])  # argparse exits on a flag train.py does not have
    assert args.method == "camgeo" and args.out == str(tmp_path)
    # its baseline is a row the study can train (CamGeo or another ablation), so the pair can be read
    assert evaluate.ABLATIONS[name].baseline in ["CamGeo"] + [a.label for a in evaluate.ABLATIONS.values()]
    label = evaluate.ABLATIONS[name].label  # it names how the flags differ from the defaults, and they do
    weights = ([0.25] if "weights 0.25" in label else [0.1] if "weights 0.1" in label
               else [1.0] if "the paper's weights" in label else [distill.TRAJ_WEIGHT])
    assert [args.traj_weight, args.geo_weight] == weights * 2
    assert args.teacher_every == (3 if "every third step" in label else distill.TEACHER_EVERY)
    assert args.teacher_gradient_sigma == (1.5 if "low-pass 1.5 px" in label else 0 if "w/o gradient low-pass" in label
                                           else distill.TEACHER_GRADIENT_SIGMA)


def test_study_trains_the_named_ablations_only_at_the_first_ratio():
    runs = evaluate.plan_runs(["sparse", "camgeo"], (0.5, 0.25), (0, 1), ["camgeo_unfiltered"])
    assert [r.name for r in runs] == ["sparse_0.5_0", "camgeo_0.5_0", "sparse_0.25_0", "camgeo_0.25_0",
                                      "camgeo_unfiltered_0.5_0", "sparse_0.5_1", "camgeo_0.5_1", "sparse_0.25_1",
                                      "camgeo_0.25_1", "camgeo_unfiltered_0.5_1"]
    assert runs[4].flags == ("--teacher-gradient-sigma", "0", "--traj-weight", "0.25", "--geo-weight", "0.25")


def test_named_ablations_train_without_the_methods_they_are_read_against(tmp_path):
    evaluate.main(["--preset", "smoke", "--methods", "", "--ablations", "camgeo_trajall", "--out", str(tmp_path)])
    with open(tmp_path / "per_clip.csv") as f:
        runs = {row["run"] for row in csv.DictReader(f)}
    assert runs == {"camgeo_trajall_0.5_0", evaluate.GT_RUN, evaluate.DEGRADED_RUN, evaluate.STILL_RUN}


def test_unknown_ablation_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation"):
        evaluate.main(["--preset", "smoke", "--methods", "camgeo", "--ablations", "camgeo_nosmooth,camgeo_blue",
                       "--out", str(tmp_path)])


def test_unknown_method_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.main(["--preset", "smoke", "--methods", "sparse,teleport", "--out", str(tmp_path)])


def test_check_reports_own_and_wrong_cameras_next_to_repeating_the_reference(smoke_study, tmp_path, capsys):
    ckpt = next(os.path.join(root, "ckpt.safetensors") for root, _, files in os.walk(smoke_study)
                if "ckpt.safetensors" in files)
    evaluate.main(["--check", ckpt, "--clips", "3", "--sample-steps", "2", "--out", str(tmp_path)])
    assert os.path.isfile(tmp_path / "check_frames.png")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| repeat the reference frame", "| reference resampled along the given rays (a new model's guess)",
        "| samples, own cameras", "| samples, another clip's cameras"]
    model, info = camgeo.load_checkpoint(ckpt)
    size, frames = info["config"].image_size, info["config"].num_frames
    truth = torch.stack([c.video for c in evaluate.held_out_clips(3, frames, size)])
    repeat = geometry.psnr(truth[:, :1].expand_as(truth)[:, 1:], truth[:, 1:]).item()
    assert float(rows[1].split(" | ")[1]) == pytest.approx(repeat, abs=0.006)  # the first column, independently


def test_check_against_a_baseline_pairs_the_same_clips_and_noise(smoke_study, tmp_path, capsys):
    ckpt = os.path.join(smoke_study, "ckpt", "sparse_0.5_0", "ckpt.safetensors")
    evaluate.main(["--check", ckpt, "--against", ckpt, "--clips", "3", "--sample-steps", "2", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if " − " in line)
    assert lines[header].split(" | ")[-2:] == ["PSNR", "SSIM |"]
    # a checkpoint against itself: the same noise on the same clips, so every clip's difference is exactly zero
    assert [cell.strip(" |") for cell in lines[header + 2].split(" | ")[3:]] == ["+0.000 [+0.000, +0.000]"] * 2
    # checked minus baseline: the ground truth itself in place of the checked samples scores above it on every clip
    config = camgeo.load_checkpoint(ckpt)[1]["config"]
    clips = evaluate.held_out_clips(3, config.num_frames, config.image_size)
    truth = torch.stack([clip.video for clip in clips])
    lines = evaluate.check_against(truth, "truth", ckpt, clips, {"frames 1..3": [1, 2, 3], "frame 2": [2]}, 2, 1.0,
                                   "cpu")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["frame 2", "frames 1..3"]  # one row per group of frames
    assert all(float(line.split(" | ")[3].split("[")[1].split(",")[0]) > 0 for line in lines[2:])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--against", ckpt])


def test_study_differences_read_each_ablation_against_its_baseline_on_the_same_clips(tmp_path):
    ablations = evaluate.ABLATIONS
    label, every_step, quarter, every_third = (ablations[name].label for name in (
        "camgeo_every1_nowarmup", "camgeo_every1", "camgeo_w025", "camgeo_every3"))
    # each is read against the ablation that differs from it by one choice, down to the defaults
    assert ablations["camgeo_nowarmup"].baseline == "CamGeo"
    assert ablations["camgeo_every1_nowarmup"].baseline == every_step
    assert ablations["camgeo_every1"].baseline == quarter
    assert ablations["camgeo_w025"].baseline == every_third
    assert ablations["camgeo_every3"].baseline == "CamGeo"
    rows = [("Sparse", "1/2", 0, c, 1.0) for c in range(10)] + [("CamGeo", "1/2", 0, c, 0.2 * c) for c in range(10)]
    rows += [(every_third, "1/2", 0, c, 0.22 * c) for c in range(10)]
    rows += [(quarter, "1/2", 0, c, 0.25 * c) for c in range(10)]
    rows += [(every_step, "1/2", 0, c, 0.3 * c) for c in range(10)]
    rows += [(label, "1/2", 0, c, 0.3 * c + 0.05) for c in range(10)]  # 0.05 worse than its baseline on every clip
    write_per_clip(tmp_path / "part.csv", rows)
    lines = evaluate.study_differences(report.read_per_clip([tmp_path / "part.csv"]))
    header = next(i for i, line in enumerate(lines) if line.startswith(f"| {label} − {every_step} |"))
    assert lines[header + 2].split(" | ")[3].startswith("+0.050 [+0.050, +0.050]")
    # CamGeo, the every-third-step form, the weight-0.25 form and its every-step form − Sparse; then each ablation
    # present − its baseline (every third step − CamGeo, weights 0.25 − every third, every step − weights 0.25,
    # w/o warm-up − every step)
    assert sum(line.startswith("| ") and "−" in line for line in lines) == 8


def test_combine_writes_one_table_from_several_parts(tmp_path):
    for seed in (0, 1):
        write_per_clip(tmp_path / f"p{seed}.csv", [(m, "1/2", seed, c, 0.5) for m in ("Sparse", "CamGeo")
                                                   for c in range(3)])
    evaluate.main(["--combine", str(tmp_path / "p0.csv"), str(tmp_path / "p1.csv"), "--out", str(tmp_path / "all")])
    table = open(tmp_path / "all" / "table.md").read()
    assert "| CamGeo | 1/2 |" in table and "CamGeo − Sparse" in table


def test_rescore_reproduces_a_cached_run_without_noise_and_moves_it_with_noise(smoke_study, capsys):
    cache = os.path.join(smoke_study, "runs", "sparse_0.5_0.pt")
    evaluate.main(["--rescore", cache, "--preset", "smoke", "--noise", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| sparse_0.5_0, noise 0 − sparse_0.5_0, as cached |")
    assert all(cell.startswith("+0.000 [+0.000, +0.000]") for cell in lines[2].split(" | ")[3:])
    evaluate.main(["--rescore", cache, "--preset", "smoke", "--noise", "0.05"])
    psnr = capsys.readouterr().out.splitlines()[2].split(" | ")[6]
    assert psnr.startswith("-")  # the noise itself lowers PSNR
    with pytest.raises(ValueError, match="another estimator configuration"):
        evaluate.main(["--rescore", cache, "--preset", "cpu"])


def test_rescore_of_two_runs_pairs_their_draw_averaged_scores(smoke_study, tmp_path, capsys):
    cache = os.path.join(smoke_study, "runs", "sparse_0.5_0.pt")
    again = tmp_path / "again.pt"
    stored = torch.load(cache, weights_only=True)
    torch.save({**stored, "videos": stored["videos"] * 0.5}, again)  # darker videos of the same clips
    evaluate.main(["--rescore", cache, str(again), "--preset", "smoke", "--noise", "0.01", "--draws", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert "mean of 2 draws" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith(f"| {again} − {cache} |"))
    assert lines[header + 2].split(" | ")[6].startswith("-")  # darker: lower PSNR
    with pytest.raises(ValueError, match="one or two runs"):
        evaluate.main(["--rescore", cache, cache, cache, "--preset", "smoke"])


def test_combine_rejects_a_file_that_is_not_per_clip_results(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a per-clip results file"):
        evaluate.main(["--combine", str(tmp_path / "other.csv"), "--out", str(tmp_path)])


def test_check_with_estimate_scores_the_camera_path_of_the_samples(smoke_study, tmp_path, capsys):
    ckpt = os.path.join(smoke_study, "ckpt", "sparse_0.5_0", "ckpt.safetensors")
    evaluate.main(["--check", ckpt, "--clips", "2", "--sample-steps", "2", "--estimate", "--out", str(tmp_path)])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "RotErr" not in line and "---" not in line}
    still = float(rows["repeat the reference frame"].split(" | ")[1].split(" ")[0])
    # the camera table is printed last, so its row of that name is kept: a still camera misses the requested motion
    assert still > 0 and "samples, own cameras" in rows


def test_study_trains_several_runs_at_once_with_jobs(tmp_path):
    evaluate.main(["--preset", "smoke", "--methods", "sparse,full", "--jobs", "2", "--out", str(tmp_path)])
    with open(tmp_path / "per_clip.csv") as f:
        runs = {row["run"] for row in csv.DictReader(f)}
    assert {"sparse_0.5_0", "full_1_0"} <= runs
    for name in ("sparse_0.5_0", "full_1_0"):
        assert os.path.isfile(tmp_path / "ckpt" / name / "ckpt.safetensors")
