"""estimator.py: the camera estimator finds known poses, and its validation (tools/validate_estimator.py) puts its
error far below a still camera's."""
import pytest
import torch

import estimator
import geometry
from evaluation import held_out_clips
from tools import validate_estimator


def rotation_degrees(c2w_a, c2w_b):
    relative = c2w_a[..., :3, :3].transpose(-1, -2) @ c2w_b[..., :3, :3]
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos.double()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The estimator makes many small tensor calls: on a shared 2-core machine a second thread mostly waits.
    # Restore the setting for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip():
    return held_out_clips(1, 4, 32)[0]


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


def test_validation_puts_the_estimator_below_a_still_camera(tmp_path):
    validate_estimator.main(["--clips", "1", "--frames", "4", "--size", "16", "--preset", "smoke",
                             "--out", str(tmp_path)])
    text = (tmp_path / "validation.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    rot_err = lambda name: float(rows[name].split(" | ")[1].split(" ")[0])
    assert rot_err("estimator, ground-truth video") < rot_err("naive: camera held at frame 0") / 10
    assert "naive: SLERP of keyframes at 1/4" in rows


def test_a_naive_interpolated_path_is_exact_at_its_keyframes(clip):
    path = validate_estimator.interpolated_path(clip.c2w, 0.5, "slerp")  # keyframes 0 and 3 of 4 frames
    torch.testing.assert_close(path[[0, 3]], clip.c2w[[0, 3]], atol=1e-5, rtol=0)
    assert not torch.allclose(path[1], clip.c2w[1], atol=1e-4)  # in between: a guess, not the truth
