"""evaluation.py: held-out clips, the cameras each method is given, a video's scores (the co-visible PSNR among
them), and the paired differences a study reports."""
import math

import pytest
import torch

import conditioning
import data
import evaluation
import geometry
import report
from test_report import write_per_clip


@pytest.fixture(scope="module")
def clips():
    return evaluation.held_out_clips(3, 8, 32)


def test_test_clips_come_from_the_held_out_split():
    clips = evaluation.held_out_clips(2, 4, 16)
    low, high = data.SPLIT_SEEDS["test"]
    assert all(low <= c.seed < high for c in clips)
    rendered = data.render_clip(clips[1].seed, 4, 16, 16)
    assert torch.equal(clips[1].video, rendered["video"]) and torch.equal(clips[1].depth, rendered["depth"])


@pytest.mark.parametrize("method", ["sparse", "full", "linear", "slerp"])
def test_camera_given_to_each_method_matches_training(clips, method):
    clip = clips[0]
    w2c = geometry.invert_pose(clip.c2w)[None]
    expected, _, _ = conditioning.camera_inputs(w2c, clip.K[None], method, 0.5, height=32, width=32)
    assert torch.allclose(evaluation.camera_for(clip, method, 0.5, 32), expected, atol=1e-6)


def test_the_reprojection_of_held_out_clips_scores_near_its_ceiling_and_a_still_camera_below(clips):
    ceiling = torch.stack([evaluation.covisibility(c.video, c.depth, c.c2w, c.K)[1] for c in clips])
    still = torch.stack([c.video[:1].expand_as(c.video) for c in clips])
    frames = list(range(1, 8))
    ceiling_psnr = evaluation.mean_over_frames(evaluation.covisible_psnr(clips, ceiling), frames)
    still_psnr = evaluation.mean_over_frames(evaluation.covisible_psnr(clips, still), frames)
    assert (ceiling_psnr > 28).all() and (still_psnr < ceiling_psnr - 5).all()


def test_image_metrics_score_the_generated_frames_not_the_given_reference(clips):
    clip = clips[0]
    wrong_first = clip.video.clone()
    wrong_first[0] = 1 - wrong_first[0]
    rot_err, trans_err, cam_mc, psnr, ssim, covisible = evaluation.video_metrics(clip, wrong_first, clip.c2w)
    assert (rot_err, trans_err, cam_mc) == (0, 0, 0) and psnr == covisible == 100 and ssim == pytest.approx(1)
    # a video that repeats the reference gets no exact frame for free
    still = clip.video[:1].expand_as(clip.video)
    assert evaluation.video_metrics(clip, still, clip.c2w)[3] < 40


def test_mean_over_frames_leaves_out_frames_without_covisible_pixels():
    per_frame = torch.tensor([[float("nan"), 20.0, 30.0, float("nan")], [float("nan")] * 4], dtype=torch.float64)
    means = evaluation.mean_over_frames(per_frame, [1, 2, 3])
    assert means[0] == 25.0 and math.isnan(means[1])


def test_study_differences_read_camgeo_against_sparse_and_each_ablation_against_camgeo(tmp_path):
    label = evaluation.ABLATIONS["camgeo_nowarmup"][1]
    rows = [("Sparse", "1/2", 0, c, 1.0) for c in range(10)] + [("CamGeo", "1/2", 0, c, 0.2 * c) for c in range(10)]
    rows += [(label, "1/2", 0, c, 0.2 * c + 0.05) for c in range(10)]  # 0.05 worse than CamGeo on every clip
    write_per_clip(tmp_path / "part.csv", rows)
    lines = evaluation.study_differences(report.read_per_clip([tmp_path / "part.csv"]))
    headers = [line for line in lines if line.startswith("| ") and "−" in line]
    assert [h.split(" | ")[0] for h in headers] == ["| CamGeo − Sparse", f"| {label} − CamGeo"]
    row = lines[lines.index(headers[1]) + 2]
    assert row.split(" | ")[3].startswith("+0.050 [+0.050, +0.050]")
