"""What the student is told about the cameras (conditioning.py): keyframes, each method's camera inputs, the
poses' normalisation and the plane sweep."""

import pytest
import torch

import conditioning
import data
import geometry

F, S = 4, 16  # the smoke preset's clip


def random_w2c(batch, num_frames, seed=0):
    """Random rigid w2c poses (rotations from random quaternions, translations of about a metre)."""
    g = torch.Generator().manual_seed(seed)
    R = geometry.quat_to_mat(torch.randn(batch, num_frames, 4, generator=g))
    t = torch.randn(batch, num_frames, 3, generator=g)
    return geometry.to_homogeneous(torch.cat([R, t[..., None]], dim=-1))


def intrinsics(batch, num_frames, size=S):
    return torch.tensor([0.8 * size, 0.8 * size, size / 2, size / 2]).expand(batch, num_frames, 4)


def test_plane_sweep_grid_is_where_the_point_at_that_inverse_distance_projects():
    """Independent of reference_grids' algebra: put the point o + d / rho of each ray in frame 0's camera frame and
    project it with geometry.project_points."""
    c2w = torch.eye(4).repeat(1, F, 1, 1)  # a camera sliding right and forward while turning a little
    c2w[0, :, :3, :3] = torch.stack([torch.tensor(data.yaw_rotation(0.2 * f / F), dtype=torch.float32)
                                     for f in range(F)])
    c2w[0, :, :3, 3] = torch.linspace(0, 1, F)[:, None] * torch.tensor([0.3, 0.0, 0.2])
    w2c = geometry.invert_pose(c2w)
    K = intrinsics(1, F)
    camera = conditioning.camera_conditioning(w2c, K, torch.ones(1, F), S, S)
    c2w = conditioning.keyframe_relative_c2w(w2c, torch.ones(1, F))
    directions = geometry.plucker_embedding(K, c2w, S, S)[:, :, 3:]  # (1, F, 3, H, W), unit, frame-0 coordinates
    K_matrix = torch.tensor([[K[0, 0, 0], 0, K[0, 0, 2]], [0, K[0, 0, 1], K[0, 0, 3]], [0, 0, 1]])[None]
    grids = camera[:, :, conditioning.GRID_CHANNELS].unflatten(2, (conditioning.NUM_PLANES, 2))  # (1, F, D, 2, H, W)
    frame, checked = F - 1, 0
    for k, rho in enumerate(conditioning.PLANE_INVERSE_DEPTHS[1:], start=1):
        points = c2w[0, frame, :3, 3] + directions[0, frame].permute(1, 2, 0) / rho  # (H, W, 3)
        uv, z = geometry.project_points(points[None], K_matrix)
        expected = torch.stack([uv[0, ..., 0] / S * 2 - 1, uv[0, ..., 1] / S * 2 - 1], dim=0)
        usable = (z[0] > 1e-2) & (expected.abs() < 1.9).all(0)  # in front and not clamped
        torch.testing.assert_close(grids[0, frame, k][:, usable], expected[:, usable], atol=1e-4, rtol=1e-4)
        checked += int(usable.sum())
    assert checked > S * S  # not vacuous


def test_missing_pose_differs_from_identity_pose_in_conditioning():
    eye = torch.eye(4).expand(1, F, 4, 4)
    given = conditioning.camera_conditioning(eye, intrinsics(1, F), torch.ones(1, F), S, S)
    mask = torch.ones(1, F)
    mask[0, 1] = 0
    missing = conditioning.camera_conditioning(eye, intrinsics(1, F), mask, S, S)
    assert torch.count_nonzero(missing[0, 1, :6]) == 0  # no pose: Plücker channels zero
    assert torch.count_nonzero(missing[0, 1, conditioning.MASK_CHANNELS]) == 0  # and the mask channel too
    assert torch.all(given[0, 1, -1] == 1)  # identity pose: the mask channel (last) says "given"


def test_frame_without_pose_copies_along_the_pose_interpolated_between_its_keyframes():
    """The sweep at a frame without a pose is the one its SLERP-interpolated pose would give, whatever garbage the
    caller left in that pose; the Plücker channels, which tell the model poses, stay zero there."""
    w2c = random_w2c(1, F, seed=6)
    mask = torch.ones(1, F)
    mask[0, 1] = 0
    garbage = w2c.clone()
    garbage[0, 1] = 0
    missing = conditioning.camera_conditioning(garbage, intrinsics(1, F), mask, S, S)
    filled = conditioning.camera_conditioning(conditioning.fill_missing_poses(w2c, mask, "slerp"), intrinsics(1, F),
                                        torch.ones(1, F), S, S)
    sweep = slice(conditioning.GRID_CHANNELS.start, conditioning.PLANE_DEPTH_CHANNELS.stop)
    torch.testing.assert_close(missing[0, 1, sweep], filled[0, 1, sweep])
    assert not torch.allclose(missing[0, 1, sweep], filled[0, 2, sweep])  # not vacuous: frames differ


def test_camera_conditioning_ignores_world_frame_and_scale():
    w2c = random_w2c(1, F, seed=3)
    mask = torch.ones(1, F)
    base = conditioning.camera_conditioning(w2c, intrinsics(1, F), mask, S, S)
    # move the whole world rigidly and scale it: c2w' = G c2w with translations scaled by 3
    G = random_w2c(1, 1, seed=4)[:, 0]
    c2w = G[:, None] @ geometry.invert_pose(w2c)
    c2w = torch.cat([torch.cat([c2w[..., :3, :3], 3 * c2w[..., :3, 3:]], -1), c2w[..., 3:, :]], -2)
    moved = conditioning.camera_conditioning(geometry.invert_pose(c2w), intrinsics(1, F), mask, S, S)
    assert torch.allclose(base, moved, atol=1e-4)


def test_camera_conditioning_scale_comes_from_given_poses_only():
    w2c = random_w2c(1, F, seed=5)
    mask = torch.ones(1, F)
    mask[0, 1] = 0
    camera = conditioning.camera_conditioning(w2c, intrinsics(1, F), mask, S, S)
    other = w2c.clone()
    other[0, 1, :3, 3] *= 100  # a far-away pose that is not given must not change the scale
    assert torch.allclose(camera, conditioning.camera_conditioning(other, intrinsics(1, F), mask, S, S))


def test_reference_grid_is_the_identity_for_the_reference_pose():
    eye = torch.eye(4).expand(1, F, 4, 4)
    camera = conditioning.camera_conditioning(eye, intrinsics(1, F), torch.ones(1, F), S, S)
    reference = torch.rand(1, 3, S, S)
    resampled = torch.nn.functional.grid_sample(reference, camera[:, 1, 6:8].permute(0, 2, 3, 1),
                                                align_corners=False)
    torch.testing.assert_close(resampled, reference, atol=1e-5, rtol=0)


def test_reference_grid_matches_projecting_far_points_into_the_reference():
    """Independent derivation: put each pixel's point a million units away, move it into frame 0 with the full
    pose (translation included: it must not matter at infinity) and project it with K."""
    w2c = random_w2c(1, F, seed=11).double()
    K = intrinsics(1, F).double()
    camera = conditioning.camera_conditioning(w2c, K, torch.ones(1, F), S, S)
    K3 = torch.tensor([[K[0, 0, 0], 0, K[0, 0, 2]], [0, K[0, 0, 1], K[0, 0, 3]], [0, 0, 1]], dtype=torch.float64)
    c2w = geometry.relative_to_first(geometry.invert_pose(w2c))[0]  # (F, 4, 4), frame 0 = I
    far = geometry.unproject_depth(torch.full((F, S, S), 1e6, dtype=torch.float64), K3.expand(F, 3, 3))
    uv, z = geometry.project_points(geometry.transform_points(c2w, far), K3.expand(F, 3, 3))
    expected = uv / S * 2 - 1  # grid_sample coordinates, align_corners=False
    grid = camera[0, :, 6:8].permute(0, 2, 3, 1)  # (F, S, S, 2)
    lands = (z > 0) & (expected.abs() < 2).all(-1)
    torch.testing.assert_close(grid[lands], expected[lands], atol=1e-4, rtol=0)
    assert lands.float().mean() > 0.25  # not vacuous: a good part of each frame sees the reference
    assert torch.all(grid[~lands].abs().amax(-1) == 2)  # behind the camera or far off: clamped outside the image


def test_camera_conditioning_rejects_missing_frame_zero():
    mask = torch.ones(1, F)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="frame 0"):
        conditioning.camera_conditioning(random_w2c(1, F), intrinsics(1, F), mask, S, S)


def test_reference_inverse_depth_is_in_the_unit_of_the_given_translations():
    """Depth 2 m with the largest given camera move 0.5 m: inverse depth 0.25 in the poses' unit, whatever frame
    beyond the keyframes moved further."""
    c2w = torch.eye(4).repeat(1, 3, 1, 1)
    c2w[0, 1, :3, 3] = torch.tensor([0.3, 0.0, 0.4])  # 0.5 m from frame 0
    c2w[0, 2, :3, 3] = torch.tensor([3.0, 0.0, 0.0])  # not given
    depth = torch.full((1, 4, 4), 2.0)
    rho = conditioning.reference_inverse_depth(depth, geometry.invert_pose(c2w), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(rho, torch.full((1, 4, 4), 0.25))


def two_clips(num_frames=8, size=16):
    """Two synthetic clips stacked as a training batch: w2c (2, F, 4, 4), K (2, 3, 3)."""
    clips = [data.render_clip(seed, num_frames, size, size) for seed in (0, 1)]
    return {key: torch.stack([clip[key] for clip in clips]) for key in ("w2c", "K")}


@pytest.mark.parametrize("num_frames", [4, 5, 8, 13, 16, 25])
@pytest.mark.parametrize("ratio", [1 / 2, 1 / 3, 1 / 4])
def test_keyframe_indices_include_first_and_last_sorted_unique_with_stated_count(num_frames, ratio):
    index = conditioning.keyframe_indices(num_frames, ratio)
    assert index[0] == 0 and index[-1] == num_frames - 1
    assert torch.equal(index, torch.unique(index))  # sorted and unique
    assert len(index) == max(2, round(ratio * num_frames))


def test_keyframe_indices_are_evenly_spaced():
    assert conditioning.keyframe_indices(9, 1 / 3).tolist() == [0, 4, 8]
    gaps = torch.diff(conditioning.keyframe_indices(16, 1 / 4))
    assert gaps.max() - gaps.min() <= 1


def test_keyframe_indices_reject_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        conditioning.keyframe_indices(8, 0.0)


def test_random_keyframes_have_frame_zero_and_the_stated_count():
    mask = conditioning.random_keyframe_mask(64, 8, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(mask[:, 0] == 1) and torch.all(mask.sum(1) == 4)
    assert len({tuple(row.tolist()) for row in mask}) > 1  # differ per sample


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolated_poses_equal_ground_truth_at_keyframes(method):
    clips = two_clips()
    _, keyframe_mask, w2c_used = conditioning.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16,
                                                            width=16)
    keyframes = keyframe_mask[0].bool()
    assert torch.allclose(w2c_used[:, keyframes], clips["w2c"][:, keyframes], atol=1e-5)
    assert not torch.allclose(w2c_used[:, ~keyframes], clips["w2c"][:, ~keyframes], atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolated_conditioning_equals_sparse_conditioning_at_keyframes_and_is_all_given(method):
    clips = two_clips()
    sparse, mask, _ = conditioning.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 3, height=16, width=16)
    filled, _, _ = conditioning.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16, width=16)
    keyframes = mask[0].bool()
    assert torch.allclose(filled[:, keyframes], sparse[:, keyframes], atol=1e-4)
    assert torch.all(filled[:, :, -1] == 1)  # the mask channel (last): interpolated poses are given as if known


def test_sparse_conditioning_tells_no_pose_away_from_keyframes():
    clips = two_clips()
    camera, mask, _ = conditioning.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 2, height=16, width=16)
    missing = camera[:, ~mask[0].bool()]
    assert torch.count_nonzero(missing[:, :, :6]) == 0 and torch.count_nonzero(missing[:, :, -1]) == 0
    assert torch.all(camera[:, mask[0].bool(), -1] == 1)


def test_full_conditioning_uses_every_ground_truth_pose():
    clips = two_clips()
    camera, mask, w2c_used = conditioning.camera_inputs(clips["w2c"], clips["K"], "full", 1 / 4, height=16, width=16)
    assert torch.all(mask == 1) and torch.equal(w2c_used, clips["w2c"])
    c2w = geometry.normalize_translation(geometry.relative_to_first(geometry.invert_pose(clips["w2c"])))
    K = conditioning.intrinsics_vector(clips["K"])[:, None].expand(-1, 8, -1)
    assert torch.allclose(camera[:, :, :6], geometry.plucker_embedding(K, c2w, 16, 16), atol=1e-4)
