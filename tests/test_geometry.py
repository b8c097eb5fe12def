"""Specification of geometry.py: quaternions, pose encoding, poses, Plücker rays, trajectory
interpolation, depth warping, camera and image metrics. scipy's Rotation / Slerp are the oracle
for rotations; everything else is checked against hand-worked numbers or exact properties."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation, Slerp

import geometry as g

DTYPES = [torch.float32, torch.float64]
# Rotation-level tolerance per dtype (float32 round-off on entries of size ~1).
ATOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def scipy_quat(R):
    """scipy's XYZW quaternion of rotation matrices (numpy), standardised to w >= 0."""
    q = Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_quat()
    return np.where(q[..., 3:4] < 0, -q, q)


def random_rotations(n, seed, dtype=torch.float64):
    return torch.tensor(Rotation.random(n, random_state=seed).as_matrix(), dtype=dtype)


def random_axes(n, seed):
    axes = np.random.default_rng(seed).normal(size=(n, 3))
    return axes / np.linalg.norm(axes, axis=-1, keepdims=True)


def random_c2w(n, seed, dtype=torch.float64):
    c2w = torch.eye(4, dtype=dtype).repeat(n, 1, 1)
    c2w[:, :3, :3] = random_rotations(n, seed, dtype)
    c2w[:, :3, 3] = torch.tensor(np.random.default_rng(seed).normal(size=(n, 3)), dtype=dtype)
    return c2w


def close_up_to_sign(q, q_ref, atol):
    return min(np.abs(q - q_ref).max(), np.abs(q + q_ref).max()) < atol


# ---------------------------------------------------------------------------------------------
# Quaternions

@pytest.mark.parametrize("dtype", DTYPES)
def test_mat_to_quat_matches_scipy_on_random_rotations(dtype):
    R = random_rotations(500, seed=0, dtype=dtype)
    q = g.mat_to_quat(R)
    assert q.dtype == dtype and q.shape == (500, 4)
    np.testing.assert_allclose(q.double().numpy(), scipy_quat(R.double().numpy()), atol=5 * ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mat_to_quat_matches_scipy_at_179_99_degrees(dtype):
    rotvec = random_axes(50, seed=1) * math.radians(179.99)
    R = torch.tensor(Rotation.from_rotvec(rotvec).as_matrix(), dtype=dtype)
    q = g.mat_to_quat(R)
    # w = cos(89.995 deg) ~ 8.7e-5 > 0, so the sign is determined and must match exactly.
    np.testing.assert_allclose(q.double().numpy(), scipy_quat(R.double().numpy()), atol=5 * ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mat_to_quat_matches_scipy_up_to_sign_at_exactly_180_degrees(dtype):
    axes = random_axes(50, seed=2)
    R = torch.tensor(2 * axes[:, :, None] * axes[:, None, :] - np.eye(3), dtype=dtype)  # R = 2 n n^T - I
    q = g.mat_to_quat(R).double().numpy()
    q_ref = np.concatenate([axes, np.zeros((50, 1))], axis=-1)  # (n, 0): w = 0 so q ~ -q both qualify
    for i in range(50):
        assert close_up_to_sign(q[i], q_ref[i], 5 * ATOL[dtype])
    assert (q[:, 3] >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mat_to_quat_matches_scipy_near_identity(dtype):
    angles = np.array([0.0, 1e-8, 1e-6, 1e-4, 1e-2])[:, None]
    R = torch.tensor(Rotation.from_rotvec(random_axes(5, seed=3) * angles).as_matrix(), dtype=dtype)
    np.testing.assert_allclose(g.mat_to_quat(R).double().numpy(), scipy_quat(R.double().numpy()),
                               atol=5 * ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_quat_to_mat_matches_scipy_and_normalises_its_input(dtype):
    q = Rotation.random(200, random_state=4).as_quat()
    scale = np.random.default_rng(4).uniform(0.2, 5.0, size=(200, 1))  # not unit length on purpose
    R = g.quat_to_mat(torch.tensor(q * scale, dtype=dtype))
    assert R.dtype == dtype
    np.testing.assert_allclose(R.double().numpy(), Rotation.from_quat(q).as_matrix(), atol=5 * ATOL[dtype])


def test_mat_to_quat_always_returns_unit_quaternions_with_nonnegative_w():
    R = torch.cat([random_rotations(300, seed=5), torch.tensor(
        Rotation.from_rotvec(random_axes(30, seed=6) * math.pi).as_matrix())])
    q = g.mat_to_quat(R)
    assert (q[:, 3] >= 0).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(330, dtype=torch.float64))


def test_standardize_quat_flips_negative_w_only():
    q = torch.tensor([[0.1, 0.2, 0.3, -0.9], [0.1, 0.2, 0.3, 0.9]])
    torch.testing.assert_close(g.standardize_quat(q), torch.tensor([[-0.1, -0.2, -0.3, 0.9], [0.1, 0.2, 0.3, 0.9]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quat_to_mat_inverts_mat_to_quat(dtype):
    R = torch.cat([random_rotations(100, seed=7, dtype=dtype), torch.tensor(
        Rotation.from_rotvec(random_axes(10, seed=8) * math.pi).as_matrix(), dtype=dtype)])
    torch.testing.assert_close(g.quat_to_mat(g.mat_to_quat(R)), R, atol=5 * ATOL[dtype], rtol=0)


def test_mat_to_quat_accepts_any_leading_dims():
    R = random_rotations(24, seed=9).reshape(2, 3, 4, 3, 3)
    q = g.mat_to_quat(R)
    assert q.shape == (2, 3, 4, 4)
    torch.testing.assert_close(q.reshape(24, 4), g.mat_to_quat(R.reshape(24, 3, 3)))


def test_mat_to_quat_passes_gradcheck_in_each_branch():
    # One rotation per Shepperd branch (largest of w, x, y, z), none close to a branch switch:
    # gradcheck's finite differences must not cross from one branch into another.
    rotvecs = [[0.3, -0.2, 0.1], [2.9, 0.3, 0.2], [0.2, 2.9, -0.3], [0.3, -0.2, 2.9]]
    R = torch.tensor(Rotation.from_rotvec(rotvecs).as_matrix(), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(g.mat_to_quat, (R,))


def test_mat_to_quat_gradient_is_finite_at_exactly_180_degrees():
    R = torch.tensor(Rotation.from_rotvec([[math.pi, 0, 0], [0, 0, math.pi]]).as_matrix()).requires_grad_()
    q = g.mat_to_quat(R)
    q.pow(2).mul(torch.arange(8.0, dtype=torch.float64).reshape(2, 4)).sum().backward()
    assert torch.isfinite(R.grad).all()


def test_quat_to_mat_passes_gradcheck():
    q = torch.tensor(np.random.default_rng(10).normal(size=(5, 4)), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(g.quat_to_mat, (q,))


# ---------------------------------------------------------------------------------------------
# VGGT pose encoding

def make_cameras(B, S, H, W, seed, dtype=torch.float64):
    """w2c extrinsics (B, S, 3, 4) and centred-principal-point intrinsics (B, S, 3, 3)."""
    rng = np.random.default_rng(seed)
    extrinsics = g.invert_pose(random_c2w(B * S, seed, dtype))[:, :3].reshape(B, S, 3, 4)
    intrinsics = torch.zeros(B, S, 3, 3, dtype=dtype)
    intrinsics[..., 0, 0] = torch.tensor(rng.uniform(0.5, 2.0, (B, S)) * W, dtype=dtype)
    intrinsics[..., 1, 1] = torch.tensor(rng.uniform(0.5, 2.0, (B, S)) * H, dtype=dtype)
    intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = W / 2, H / 2, 1
    return extrinsics, intrinsics


@pytest.mark.parametrize("dtype", DTYPES)
def test_pose_encoding_round_trips_to_extrinsics_and_intrinsics(dtype):
    extrinsics, intrinsics = make_cameras(2, 5, 24, 40, seed=11, dtype=dtype)
    encoding = g.extri_intri_to_pose_encoding(extrinsics, intrinsics, (24, 40))
    assert encoding.shape == (2, 5, 9) and encoding.dtype == dtype
    extrinsics_back, intrinsics_back = g.pose_encoding_to_extri_intri(encoding, (24, 40))
    tol = dict(atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)
    torch.testing.assert_close(extrinsics_back, extrinsics, **tol)
    torch.testing.assert_close(intrinsics_back, intrinsics, **tol)


def test_pose_encoding_round_trips_from_encoding():
    rng = np.random.default_rng(12)
    encoding = torch.tensor(np.concatenate([
        rng.normal(size=(3, 4, 3)), scipy_quat(Rotation.random(12, random_state=12).as_matrix()).reshape(3, 4, 4),
        rng.uniform(0.3, 2.5, size=(3, 4, 2))], axis=-1))
    encoding_back = g.extri_intri_to_pose_encoding(*g.pose_encoding_to_extri_intri(encoding, (30, 20)), (30, 20))
    torch.testing.assert_close(encoding_back, encoding)


def test_pose_encoding_layout_is_translation_quaternion_fov_h_fov_w():
    # H = 32, W = 64, fy = 16, fx = 64: fov_h = 2 atan(16 / 16) = pi/2, fov_w = 2 atan(32 / 64).
    R = Rotation.from_rotvec([0.1, 0.2, 0.3]).as_matrix()
    extrinsics = torch.tensor(np.concatenate([R, [[1.0], [2.0], [3.0]]], axis=1))[None, None]
    intrinsics = torch.tensor([[64.0, 0, 32], [0, 16, 16], [0, 0, 1]], dtype=torch.float64)[None, None]
    encoding = g.extri_intri_to_pose_encoding(extrinsics, intrinsics, (32, 64))[0, 0]
    torch.testing.assert_close(encoding[:3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(encoding[3:7].numpy(), scipy_quat(R), atol=1e-12)
    assert encoding[7].item() == pytest.approx(math.pi / 2)
    assert encoding[8].item() == pytest.approx(2 * math.atan(0.5))


def test_pose_encoding_decode_puts_principal_point_at_image_centre():
    encoding = torch.tensor([[[0, 0, 0, 0, 0, 0, 1, 1.0, 1.2]]], dtype=torch.float64)
    _, intrinsics = g.pose_encoding_to_extri_intri(encoding, (30, 50))
    assert intrinsics[0, 0, 0, 2].item() == 25 and intrinsics[0, 0, 1, 2].item() == 15
    assert intrinsics[0, 0, 1, 1].item() == pytest.approx(15 / math.tan(0.5))
    assert intrinsics[0, 0, 0, 0].item() == pytest.approx(25 / math.tan(0.6))


def test_pose_encoding_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pose_encoding"):
        g.pose_encoding_to_extri_intri(torch.zeros(1, 2, 8), (16, 16))
    with pytest.raises(ValueError, match="intrinsics"):
        g.extri_intri_to_pose_encoding(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4), (16, 16))


# ---------------------------------------------------------------------------------------------
# Rigid poses

def test_to_homogeneous_appends_bottom_row():
    P = torch.arange(12.0).reshape(3, 4)
    T = g.to_homogeneous(P[None])
    assert T.shape == (1, 4, 4)
    torch.testing.assert_close(T[0, :3], P)
    torch.testing.assert_close(T[0, 3], torch.tensor([0.0, 0, 0, 1]))


def test_invert_pose_gives_identity_when_composed():
    T = random_c2w(10, seed=13)
    eye = torch.eye(4, dtype=torch.float64).expand(10, 4, 4)
    torch.testing.assert_close(T @ g.invert_pose(T), eye)
    torch.testing.assert_close(g.invert_pose(T) @ T, eye)


def test_so3_exp_matches_scipy_rotvec_including_zero_and_near_pi():
    rotvecs = np.concatenate([np.random.default_rng(30).normal(size=(8, 3)), [[0.0, 0.0, 0.0]],
                              [[1e-9, -2e-9, 0.0]], [[0.0, math.pi - 1e-6, 0.0]]])
    R = g.so3_exp(torch.tensor(rotvecs))
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(rotvecs).as_matrix(), atol=1e-12)


def test_so3_exp_passes_gradcheck_away_from_and_at_zero():
    for omega in (torch.tensor([0.3, -0.2, 0.5]), torch.zeros(3)):
        torch.autograd.gradcheck(g.so3_exp, (omega.double().requires_grad_(),))


def test_relative_to_first_makes_frame_zero_identity():
    rel = g.relative_to_first(random_c2w(6, seed=14).reshape(2, 3, 4, 4))
    torch.testing.assert_close(rel[:, 0], torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


def test_relative_to_first_is_invariant_to_a_world_transform():
    c2w = random_c2w(6, seed=15)
    world = random_c2w(1, seed=16)[0]
    torch.testing.assert_close(g.relative_to_first(world @ c2w), g.relative_to_first(c2w))


def test_normalize_translation_scales_largest_translation_to_one():
    c2w = random_c2w(7, seed=17)
    out = g.normalize_translation(c2w)
    norms = c2w[:, :3, 3].norm(dim=-1)
    torch.testing.assert_close(out[:, :3, 3], c2w[:, :3, 3] / norms.max())
    torch.testing.assert_close(out[:, :3, :3], c2w[:, :3, :3])
    assert out[:, :3, 3].norm(dim=-1).max().item() == pytest.approx(1.0)


def test_normalize_translation_leaves_a_static_trajectory_finite():
    c2w = random_c2w(3, seed=18)
    c2w[:, :3, 3] = 0
    out = g.normalize_translation(c2w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, c2w)


# ---------------------------------------------------------------------------------------------
# Plücker embedding

def test_plucker_embedding_hand_computed_pixel():
    # 4x4 image, fx = fy = 2, cx = cy = 2; camera at o = (1, 0, 0) with identity rotation.
    # Pixel (row 0, col 3) has centre (u, v) = (3.5, 0.5): K^-1 [u, v, 1] = (0.75, -0.75, 1),
    # |.| = sqrt(0.5625 + 0.5625 + 1) = sqrt(2.125), so d = (0.75, -0.75, 1) / sqrt(2.125), and
    # o x d = (0*dz - 0*dy, 0*dx - 1*dz, 1*dy - 0*dx) = (0, -1, -0.75) / sqrt(2.125).
    K = torch.tensor([[[2.0, 2.0, 2.0, 2.0]]])
    c2w = torch.eye(4)[None, None].clone()
    c2w[..., 0, 3] = 1.0
    embedding = g.plucker_embedding(K, c2w, 4, 4)
    assert embedding.shape == (1, 1, 6, 4, 4)
    n = math.sqrt(2.125)
    expected = torch.tensor([0.0, -1.0 / n, -0.75 / n, 0.75 / n, -0.75 / n, 1.0 / n])
    torch.testing.assert_close(embedding[0, 0, :, 0, 3], expected)


def test_plucker_directions_are_unit_and_rotated_to_world_by_c2w():
    K = torch.tensor([[6.0, 5.0, 4.0, 3.5]], dtype=torch.float64)
    c2w = random_c2w(1, seed=19)
    embedding = g.plucker_embedding(K, c2w, 7, 8)[0]  # (6, 7, 8)
    moment, direction = embedding[:3], embedding[3:]
    torch.testing.assert_close(direction.norm(dim=0), torch.ones(7, 8, dtype=torch.float64))
    torch.testing.assert_close((moment * direction).sum(0), torch.zeros(7, 8, dtype=torch.float64))
    # Direction back in the camera frame is parallel to K^-1 [u, v, 1] at a pixel, e.g. (row 2, col 5).
    d_cam = c2w[0, :3, :3].T @ direction[:, 2, 5]
    ray = torch.tensor([(5.5 - 4.0) / 6.0, (2.5 - 3.5) / 5.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(d_cam, ray / ray.norm())


# ---------------------------------------------------------------------------------------------
# Trajectory interpolation

def keyframe_poses(seed, dtype=torch.float64):
    return random_c2w(3, seed, dtype)  # keyframes at frames 1, 4, 8 of 11


KEY_IDX = torch.tensor([1, 4, 8])


def test_slerp_matches_scipy_slerp_between_keyframes():
    keys = keyframe_poses(seed=20)
    out = g.interpolate_trajectory(keys, KEY_IDX, 11, mode="slerp")
    frames = np.arange(1, 9)
    scipy_R = Slerp(KEY_IDX.numpy(), Rotation.from_matrix(keys[:, :3, :3].numpy()))(frames).as_matrix()
    np.testing.assert_allclose(out[1:9, :3, :3].numpy(), scipy_R, atol=1e-10)


def test_slerp_takes_the_shortest_path_when_standardised_quaternions_point_apart():
    # +170 and -170 degrees about z: with w >= 0 their quaternions have a negative dot product.
    # The short way between them is the 20-degree arc through 180, not the 340-degree one through 0.
    keys = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    keys[:, :3, :3] = torch.tensor(Rotation.from_euler("z", [[170], [-170]], degrees=True).as_matrix())
    out = g.interpolate_trajectory(keys, torch.tensor([0, 4]), 5, mode="slerp")
    expected = Rotation.from_euler("z", [[175], [180], [-175]], degrees=True).as_matrix()
    np.testing.assert_allclose(out[1:4, :3, :3].numpy(), expected, atol=1e-12)


def test_slerp_is_finite_for_nearly_identical_keyframes():
    keys = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    keys[1, :3, :3] = torch.tensor(Rotation.from_rotvec([1e-9, 0, 0]).as_matrix())
    out = g.interpolate_trajectory(keys, torch.tensor([0, 3]), 4, mode="slerp")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :3, :3], torch.eye(3, dtype=torch.float64).expand(4, 3, 3))


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_is_exact_at_keyframes(mode):
    keys = keyframe_poses(seed=21, dtype=torch.float32)
    out = g.interpolate_trajectory(keys, KEY_IDX, 11, mode=mode)
    assert out.shape == (11, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out[KEY_IDX], keys)


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_holds_nearest_keyframe_outside_the_keyframe_range(mode):
    keys = keyframe_poses(seed=22)
    out = g.interpolate_trajectory(keys, KEY_IDX, 11, mode=mode)
    assert torch.equal(out[0], keys[0])
    assert torch.equal(out[9], keys[2]) and torch.equal(out[10], keys[2])


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_moves_camera_centre_linearly(mode):
    keys = keyframe_poses(seed=23)
    out = g.interpolate_trajectory(keys, KEY_IDX, 11, mode=mode)
    # Frame 6 is halfway between keyframes at 4 and 8.
    torch.testing.assert_close(out[6, :3, 3], (keys[1, :3, 3] + keys[2, :3, 3]) / 2)
    torch.testing.assert_close(out[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(11, 4))


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolated_rotations_are_orthonormal_with_det_one(mode):
    out = g.interpolate_trajectory(keyframe_poses(seed=24), KEY_IDX, 11, mode=mode)
    R = out[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(11, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(11, dtype=torch.float64))


def test_linear_and_slerp_agree_for_rotations_about_one_axis_at_the_midpoint():
    # Lerp + polar projection of two rotations about the same axis lands on the bisecting rotation.
    keys = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    keys[:, :3, :3] = torch.tensor(Rotation.from_euler("y", [[0], [80]], degrees=True).as_matrix())
    linear = g.interpolate_trajectory(keys, torch.tensor([0, 2]), 3, mode="linear")
    slerp = g.interpolate_trajectory(keys, torch.tensor([0, 2]), 3, mode="slerp")
    torch.testing.assert_close(linear[1], slerp[1])


def test_interpolation_with_one_keyframe_holds_it_everywhere():
    keys = random_c2w(1, seed=25)
    out = g.interpolate_trajectory(keys, torch.tensor([2]), 5, mode="slerp")
    assert torch.equal(out, keys.expand(5, 4, 4))


def test_interpolation_handles_leading_batch_dims():
    keys = random_c2w(6, seed=26).reshape(2, 3, 4, 4)
    out = g.interpolate_trajectory(keys, KEY_IDX, 11, mode="slerp")
    assert out.shape == (2, 11, 4, 4)
    torch.testing.assert_close(out[1], g.interpolate_trajectory(keys[1], KEY_IDX, 11, mode="slerp"))


def test_interpolation_rejects_non_increasing_keyframe_indices():
    with pytest.raises(ValueError, match="strictly increasing"):
        g.interpolate_trajectory(keyframe_poses(seed=27), torch.tensor([1, 4, 4]), 11)
    with pytest.raises(ValueError, match="strictly increasing"):
        g.interpolate_trajectory(keyframe_poses(seed=27), torch.tensor([4, 1, 8]), 11)


def test_interpolation_rejects_out_of_range_keyframe_indices():
    with pytest.raises(ValueError, match=r"in \[0, 11\)"):
        g.interpolate_trajectory(keyframe_poses(seed=28), torch.tensor([1, 4, 11]), 11)
    with pytest.raises(ValueError, match=r"in \[0, 11\)"):
        g.interpolate_trajectory(keyframe_poses(seed=28), torch.tensor([-1, 4, 8]), 11)


def test_interpolation_rejects_mismatched_counts_and_unknown_mode():
    with pytest.raises(ValueError, match="3 poses but keyframe_idx has 2"):
        g.interpolate_trajectory(keyframe_poses(seed=29), torch.tensor([1, 4]), 11)
    with pytest.raises(ValueError, match="mode"):
        g.interpolate_trajectory(keyframe_poses(seed=29), KEY_IDX, 11, mode="cubic")


# ---------------------------------------------------------------------------------------------
# Depth projection, sampling, alignment, consistency

H, W = 12, 16
K_TEST = torch.tensor([[[14.0, 0.0, 8.0], [0.0, 13.0, 6.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def small_motion(seed, scale=1.0):
    """A (1, 4, 4) rigid A->B transform: a few degrees of rotation, a few cm of translation."""
    rng = np.random.default_rng(seed)
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, :3, :3] = torch.tensor(Rotation.from_rotvec(rng.normal(size=3) * 0.03 * scale).as_matrix())
    T[0, :3, 3] = torch.tensor(rng.normal(size=3) * 0.05 * scale)
    return T


def random_depth(seed, shape=(1, H, W), low=2.0, high=4.0):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def plane_depth(normal, offset, K, H, W):
    """Depth along z of the plane n . X = c seen by a camera with intrinsics K: c / (n . K^-1 [u, v, 1])."""
    rays = g.unproject_depth(torch.ones(1, H, W, dtype=torch.float64), K)  # z = 1 rays
    return offset / (rays @ normal)


def test_project_depth_with_identity_returns_pixel_centres_and_same_depth():
    depth = random_depth(seed=30)
    uv, z = g.project_depth(depth, K_TEST, torch.eye(4, dtype=torch.float64)[None])
    assert uv.shape == (1, H, W, 2) and z.shape == (1, H, W)
    torch.testing.assert_close(uv[0], g.pixel_centers(H, W, dtype=torch.float64))
    torch.testing.assert_close(z, depth)


def test_project_then_back_with_inverse_transform_returns_original_pixels():
    depth, T = random_depth(seed=31), small_motion(seed=31)
    uv_b, z_b = g.project_depth(depth, K_TEST, T)
    points_a = g.transform_points(g.invert_pose(T), g.unproject_pixels(uv_b, z_b, K_TEST))
    uv_a, z_a = g.project_points(points_a, K_TEST)
    torch.testing.assert_close(uv_a[0], g.pixel_centers(H, W, dtype=torch.float64))
    torch.testing.assert_close(z_a, depth)


def test_project_depth_shifts_pixels_by_focal_times_baseline_over_depth():
    # Camera B = A moved by +0.2 along x: a point in A's frame is at x - 0.2 in B's frame, so
    # u_B = u_A - fx * 0.2 / z = u_A - 14 * 0.2 / 2 = u_A - 1.4 at constant depth 2.
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = -0.2
    uv, z = g.project_depth(torch.full((1, H, W), 2.0, dtype=torch.float64), K_TEST, T)
    centres = g.pixel_centers(H, W, dtype=torch.float64)
    torch.testing.assert_close(uv[0, ..., 0], centres[..., 0] - 1.4)
    torch.testing.assert_close(uv[0, ..., 1], centres[..., 1])
    torch.testing.assert_close(z, torch.full((1, H, W), 2.0, dtype=torch.float64))


def test_unproject_depth_keeps_depth_as_z_and_hits_the_ray():
    depth = random_depth(seed=32)
    points = g.unproject_depth(depth, K_TEST)
    assert points.shape == (1, H, W, 3)
    torch.testing.assert_close(points[..., 2], depth)
    # Pixel (row 3, col 10): centre (10.5, 3.5); x = (10.5 - 8) / 14 * z, y = (3.5 - 6) / 13 * z.
    z = depth[0, 3, 10]
    torch.testing.assert_close(points[0, 3, 10, :2], torch.stack([2.5 / 14 * z, -2.5 / 13 * z]))


def test_project_depth_handles_batch_and_frame_dims():
    depth = random_depth(seed=50, shape=(2, 3, H, W))
    K = K_TEST[None].expand(2, 3, 3, 3)
    T = torch.stack([small_motion(seed=s)[0] for s in range(6)]).reshape(2, 3, 4, 4)
    uv, z = g.project_depth(depth, K, T)
    assert uv.shape == (2, 3, H, W, 2) and z.shape == (2, 3, H, W)
    uv_single, z_single = g.project_depth(depth[1, 2][None], K_TEST, T[1, 2][None])
    torch.testing.assert_close(uv[1, 2], uv_single[0])
    torch.testing.assert_close(z[1, 2], z_single[0])


def test_project_depth_passes_gradcheck():
    # Small motion at depth 2-4: every point stays well in front of camera B (z > 1), away from
    # the z <= eps guard, so the map is smooth in depth, K and T.
    depth = random_depth(seed=33, shape=(1, 3, 4)).requires_grad_()
    K = K_TEST.clone().requires_grad_()
    T = small_motion(seed=33).requires_grad_()
    assert torch.autograd.gradcheck(g.project_depth, (depth, K, T))


def test_sample_at_pixel_centres_returns_the_image():
    image = torch.rand(2, 3, H, W, dtype=torch.float64)
    uv = g.pixel_centers(H, W, dtype=torch.float64).expand(2, H, W, 2)
    torch.testing.assert_close(g.sample_at(image, uv), image)


def test_sample_at_is_bilinear_between_pixel_centres():
    image = torch.rand(1, 1, H, W, dtype=torch.float64)
    # (u, v) = (3.75, 5.5): a quarter of the way from column 3 to column 4 along row 5.
    value = g.sample_at(image, torch.tensor([[[[3.75, 5.5]]]], dtype=torch.float64))[0, 0, 0, 0]
    torch.testing.assert_close(value, 0.75 * image[0, 0, 5, 3] + 0.25 * image[0, 0, 5, 4])


def test_geometry_functions_reject_wrong_camera_shapes():
    with pytest.raises(ValueError, match="K must have shape"):
        g.project_depth(random_depth(seed=49), torch.eye(4, dtype=torch.float64)[None], small_motion(seed=49))
    with pytest.raises(ValueError, match="K must have shape"):
        g.plucker_embedding(torch.ones(1, 2, 3, 3), torch.eye(4).expand(1, 2, 4, 4), 8, 8)
    with pytest.raises(ValueError, match="sample_at expects"):
        g.sample_at(torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8, 3))


def test_in_view_marks_points_inside_the_image_rectangle():
    uv = torch.tensor([[0.0, 0.0], [16.0, 12.0], [8.0, 6.0], [-0.1, 5.0], [5.0, 12.1], [16.1, 1.0]])
    assert g.in_view(uv, H, W).tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("mode", ["median", "lstsq"])
def test_align_depth_scale_recovers_a_known_scale_ignoring_invalid_pixels(mode):
    target = random_depth(seed=34, shape=(2, H, W))
    pred = target / torch.tensor([3.0, 0.5], dtype=torch.float64)[:, None, None]
    valid = torch.rand(2, H, W, generator=torch.Generator().manual_seed(34)) > 0.3
    pred = torch.where(valid, pred, torch.full_like(pred, 1e3))  # garbage where invalid
    scale = g.align_depth_scale(pred, target, valid, mode)
    torch.testing.assert_close(scale, torch.tensor([3.0, 0.5], dtype=torch.float64))


def test_align_depth_scale_lstsq_is_the_least_squares_minimiser():
    pred, target = random_depth(seed=35), random_depth(seed=36)
    valid = torch.ones(1, H, W, dtype=torch.bool)
    s = g.align_depth_scale(pred, target, valid, "lstsq").item()
    loss = lambda scale: ((scale * pred - target) ** 2).sum().item()
    assert loss(s) < loss(s * 1.001) and loss(s) < loss(s * 0.999)


def test_depth_consistency_residual_is_near_zero_for_a_consistent_scene():
    # A tilted plane seen from two cameras: B's depth map is rendered from the same plane, so the
    # warped depth matches it up to bilinear interpolation of a smooth depth map.
    normal_a, offset_a = torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64), 3.0
    T = small_motion(seed=37)
    R, t = T[0, :3, :3], T[0, :3, 3]
    normal_b = R @ normal_a  # n_B . X_B = c + n_B . t for X_B = R X_A + t
    depth_a = plane_depth(normal_a, offset_a, K_TEST, H, W)
    depth_b = plane_depth(normal_b, offset_a + normal_b @ t, K_TEST, H, W)
    residual, valid = g.depth_consistency_residual(depth_a, depth_b, K_TEST, T)
    assert valid.float().mean() > 0.7
    assert residual[valid].max() < 1e-3


def test_depth_consistency_residual_measures_a_wrong_depth_in_depth_units():
    # Same tilted plane as above, but B's depth is 10% too far: the metric residual is ~10% of
    # the depth (about 0.3 for a plane ~3 away).
    normal_a, offset_a = torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64), 3.0
    T = small_motion(seed=37)
    normal_b = T[0, :3, :3] @ normal_a
    depth_a = plane_depth(normal_a, offset_a, K_TEST, H, W)
    depth_b = plane_depth(normal_b, offset_a + normal_b @ T[0, :3, 3], K_TEST, H, W)
    residual, valid = g.depth_consistency_residual(depth_a, 1.1 * depth_b, K_TEST, T)
    relative = residual[valid] / (1.1 * depth_b[valid].mean())
    assert relative.mean().item() == pytest.approx(0.1 / 1.1, rel=0.05)


@pytest.mark.parametrize("mode", ["median", "lstsq"])
def test_scale_invariant_residual_is_unchanged_by_a_global_scale(mode):
    # Scaling both depths and the translation by c is the monocular ambiguity: same residual.
    depth_a, depth_b, T = random_depth(seed=38), random_depth(seed=39), small_motion(seed=38)
    T_scaled = T.clone()
    T_scaled[:, :3, 3] *= 7.0
    residual, valid = g.depth_consistency_residual(depth_a, depth_b, K_TEST, T, mode)
    residual_scaled, valid_scaled = g.depth_consistency_residual(7 * depth_a, 7 * depth_b, K_TEST, T_scaled, mode)
    assert torch.equal(valid, valid_scaled)
    torch.testing.assert_close(residual_scaled, residual)


@pytest.mark.parametrize("mode", ["median", "lstsq"])
def test_scale_invariant_residual_ignores_a_scale_error_in_depth_b_only(mode):
    depth_a, depth_b, T = random_depth(seed=40), random_depth(seed=41), small_motion(seed=40)
    residual, _ = g.depth_consistency_residual(depth_a, depth_b, K_TEST, T, mode)
    residual_scaled, _ = g.depth_consistency_residual(depth_a, 0.3 * depth_b, K_TEST, T, mode)
    torch.testing.assert_close(residual_scaled, residual)


def test_metric_residual_sees_a_scale_error_in_depth_b():
    depth_a, depth_b, T = random_depth(seed=40), random_depth(seed=41), small_motion(seed=40)
    plain, _ = g.depth_consistency_residual(depth_a, depth_b, K_TEST, T)
    plain_scaled, _ = g.depth_consistency_residual(depth_a, 0.3 * depth_b, K_TEST, T)
    assert (plain_scaled - plain).abs().max() > 0.1


def test_depth_consistency_marks_pixels_leaving_the_view_invalid():
    # Move B far to the right (+1 along x at depth 2, fx = 14 -> a 7 pixel shift left): the
    # leftmost A pixels land at u < 0 in B.
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = -1.0
    depth = torch.full((1, H, W), 2.0, dtype=torch.float64)
    residual, valid = g.depth_consistency_residual(depth, depth, K_TEST, T)
    assert not valid[0, :, :6].any() and valid[0, :, 8:].all()
    assert (residual[~valid] == 0).all()


def test_depth_consistency_marks_points_behind_camera_b_invalid():
    # B is turned around (180 degrees about y): everything A sees is behind B.
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, :3, :3] = torch.tensor(Rotation.from_euler("y", 180, degrees=True).as_matrix())
    residual, valid = g.depth_consistency_residual(random_depth(seed=42), random_depth(seed=43), K_TEST, T)
    assert not valid.any()
    assert torch.isfinite(residual).all()


@pytest.mark.parametrize("mode", [None, "median", "lstsq"])
def test_depth_consistency_gradients_stay_finite_when_no_pixel_is_valid(mode):
    # Everything behind B: the masked median is a median of nothing (NaN) and projections divide
    # by ~0; none of that may leak NaN / inf into the gradients of a loss built on the residual.
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, :3, :3] = torch.tensor(Rotation.from_euler("y", 180, degrees=True).as_matrix())
    inputs = [random_depth(seed=42), random_depth(seed=43), K_TEST.clone(), T]
    inputs = [x.requires_grad_() for x in inputs]
    residual, valid = g.depth_consistency_residual(*inputs, scale_invariant=mode)
    residual.sum().backward()
    assert not valid.any()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_depth_consistency_accepts_extra_leading_dims():
    depth_a, depth_b = random_depth(seed=44, shape=(2, 3, H, W)), random_depth(seed=45, shape=(2, 3, H, W))
    T = small_motion(seed=44)[None].expand(2, 3, 4, 4)
    residual, valid = g.depth_consistency_residual(depth_a, depth_b, K_TEST[None], T, "median")
    assert residual.shape == valid.shape == (2, 3, H, W)
    single, _ = g.depth_consistency_residual(depth_a[1, 2:], depth_b[1, 2:], K_TEST, T[1, 2:], "median")
    torch.testing.assert_close(residual[1, 2:], single)


@pytest.mark.parametrize("mode", [None, "median", "lstsq"])
def test_depth_consistency_residual_passes_gradcheck(mode):
    depth_a, depth_b = random_depth(seed=46, shape=(1, 4, 5)), random_depth(seed=49, shape=(1, 4, 5))
    # Off-centre principal point: a zoom-out motion keeps it fixed, and it must not sit on a pixel centre.
    K = torch.tensor([[[5.0, 0.0, 2.2], [0.0, 5.0, 1.8], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    # B steps back 0.4 (plus a little rotation), so A's whole image shrinks into B's view.
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, :3, :3] = torch.tensor(Rotation.from_rotvec(np.random.default_rng(46).normal(size=3) * 0.02).as_matrix())
    T[0, :3, 3] = torch.tensor([0.02, -0.01, 0.4])
    # The function is only piecewise smooth: bilinear sampling kinks at pixel centres, the validity
    # mask switches at the view margin, |.| kinks at zero, the median switches element when two
    # values cross. Check that these inputs keep away from all of them (gradcheck steps by 1e-6).
    # (In "median" mode the pixel that is the median of both z and D_B' has residual exactly 0: the
    # depth_b seed is chosen so that no pixel is both.)
    uv, _ = g.project_depth(depth_a, K, T)
    fractional = uv - uv.floor()
    assert ((fractional - 0.5).abs() > 1e-2).all()
    assert ((uv[..., 0] > 0.51) & (uv[..., 0] < 4.49) & (uv[..., 1] > 0.51) & (uv[..., 1] < 3.49)).all()
    residual, valid = g.depth_consistency_residual(depth_a, depth_b, K, T, mode)
    assert valid.all() and (residual > 1e-3).all()
    inputs = tuple(x.clone().requires_grad_() for x in (depth_a, depth_b, K, T))
    assert torch.autograd.gradcheck(lambda *x: g.depth_consistency_residual(*x, scale_invariant=mode)[0], inputs)


def test_depth_consistency_rejects_unknown_scale_mode():
    depth = random_depth(seed=48)
    with pytest.raises(ValueError, match="scale_invariant"):
        g.depth_consistency_residual(depth, depth, K_TEST, small_motion(seed=48), "mean")


# ---------------------------------------------------------------------------------------------
# Camera metrics

def trajectory(seed, frames=6):
    """A smooth c2w trajectory: small rotations, translations drifting forward."""
    rng = np.random.default_rng(seed)
    c2w = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    rotvecs = np.cumsum(rng.normal(size=(frames, 3)) * 0.1, axis=0)
    c2w[:, :3, :3] = torch.tensor(Rotation.from_rotvec(rotvecs).as_matrix())
    c2w[:, :3, 3] = torch.tensor(np.cumsum(rng.normal(size=(frames, 3)) * 0.3 + [0, 0, 0.5], axis=0))
    return c2w


def test_camera_metrics_are_zero_for_identical_trajectories():
    c2w = trajectory(seed=50).float()
    metrics = g.camera_metrics(c2w, c2w)
    assert set(metrics) == {"RotErr", "TransErr", "CamMC"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert all(abs(v) < 1e-6 for v in metrics.values())


def test_camera_metrics_are_invariant_to_a_global_rigid_transform_of_both():
    gt, gen = trajectory(seed=51), trajectory(seed=52)
    world = random_c2w(1, seed=53)[0]
    before, after = g.camera_metrics(gt, gen), g.camera_metrics(world @ gt, world @ gen)
    assert before["RotErr"] > 0.1 and before["TransErr"] > 0.1
    for name in before:
        assert after[name] == pytest.approx(before[name], rel=1e-9)


def test_translation_metrics_are_invariant_to_scaling_the_generated_translations():
    gt, gen = trajectory(seed=54), trajectory(seed=55)
    gen_scaled = gen.clone()
    gen_scaled[:, :3, 3] *= 3.7
    before, after = g.camera_metrics(gt, gen), g.camera_metrics(gt, gen_scaled)
    assert after["TransErr"] == pytest.approx(before["TransErr"], rel=1e-9)
    assert after["CamMC"] == pytest.approx(before["CamMC"], rel=1e-9)


def test_rot_err_of_a_known_rotation_offset_equals_the_angle():
    # gen = gt with each frame's camera turned by an extra 0.2 rad about its own x axis, except
    # frame 0, where both are the reference: relative rotations differ by 0.2 rad on frames 1-4.
    gt = trajectory(seed=56, frames=5)
    offset = torch.eye(4, dtype=torch.float64)
    offset[:3, :3] = torch.tensor(Rotation.from_rotvec([0.2, 0, 0]).as_matrix())
    gen = torch.cat([gt[:1], gt[1:] @ offset])
    metrics = g.camera_metrics(gt, gen)
    assert metrics["RotErr"] == pytest.approx(4 * 0.2, rel=1e-9)


def test_trans_err_counts_normalised_translation_differences():
    # Straight paths along +x: gt 0, 1, 2; gen 0, 2, 2 (normalised by 2 and 2): per-frame
    # differences |0.5 - 1| = 0.5 at frame 1 only. Rotations are identity, so CamMC = TransErr.
    gt = torch.eye(4).repeat(3, 1, 1)
    gen = gt.clone()
    gt[:, 0, 3] = torch.tensor([0.0, 1.0, 2.0])
    gen[:, 0, 3] = torch.tensor([0.0, 2.0, 2.0])
    metrics = g.camera_metrics(gt, gen)
    assert metrics["TransErr"] == pytest.approx(0.5) and metrics["CamMC"] == pytest.approx(0.5)
    assert metrics["RotErr"] == 0.0


def test_camera_metrics_reject_trajectories_of_different_length():
    with pytest.raises(ValueError, match="differ in length"):
        g.camera_metrics(trajectory(seed=57, frames=5), trajectory(seed=57, frames=6))
    with pytest.raises(ValueError, match="c2w_gen"):
        g.camera_metrics(trajectory(seed=57, frames=5), torch.eye(4))


# ---------------------------------------------------------------------------------------------
# Image metrics

def video(seed, shape=(4, 3, 16, 16)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_is_large_for_identical_videos():
    v = video(seed=60)
    assert g.psnr(v, v).item() >= 100.0


def test_psnr_of_a_constant_offset_is_hand_computed():
    # MSE = 0.1^2 = 0.01 -> 10 log10(1 / 0.01) = 20 dB.
    a = torch.full((2, 3, 8, 8), 0.3, dtype=torch.float64)
    assert g.psnr(a, a + 0.1).item() == pytest.approx(20.0)


def test_psnr_averages_per_frame_values():
    a = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    b = a.clone()
    b[0] += 0.1  # 20 dB
    b[1] += 0.01  # 40 dB
    assert g.psnr(a, b).item() == pytest.approx(30.0)


def test_ssim_is_one_for_identical_videos():
    v = video(seed=61, shape=(2, 4, 3, 16, 16))
    assert g.ssim(v, v).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_drops_with_noise():
    v = video(seed=62).double()
    noise = torch.randn(v.shape, generator=torch.Generator().manual_seed(63), dtype=torch.float64)
    noisy, noisier = (v + 0.1 * noise).clamp(0, 1), (v + 0.3 * noise).clamp(0, 1)
    assert 1.0 > g.ssim(v, noisy).item() > g.ssim(v, noisier).item()


def test_ssim_of_constant_frames_reduces_to_the_luminance_term():
    # No variance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = torch.full((1, 3, 16, 16), 0.2, dtype=torch.float64)
    b = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01 ** 2
    assert g.ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1))


def test_ssim_works_on_frames_smaller_than_the_window():
    v = video(seed=65, shape=(2, 3, 6, 8))
    assert g.ssim(v, v).item() == pytest.approx(1.0, abs=1e-5)
    assert g.ssim(v, 1 - v).item() < 0.5


def test_image_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        g.psnr(video(seed=66), video(seed=66, shape=(4, 3, 16, 8)))
    with pytest.raises(ValueError, match="same shape"):
        g.ssim(video(seed=66), video(seed=66, shape=(3, 3, 16, 16)))


def test_sample_at_survives_nan_and_far_away_coordinates_in_backward():
    """grid_sample's backward indexes out of bounds on NaN / huge coordinates; sample_at bounds them first."""
    image = torch.rand(1, 1, 8, 8, requires_grad=True)
    uv = torch.tensor([[[[float("nan"), 3.0], [1e30, -1e30], [3.5, 3.5]]]], requires_grad=True)  # (1, 1, 3, 2)
    out = g.sample_at(image, uv)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(image.grad).all() and torch.isfinite(uv.grad).all()
    assert out[0, 0, 0, 2] == image[0, 0, 3, 3]  # an ordinary coordinate is untouched: the centre of pixel (3, 3)


def test_scaled_relative_c2w_puts_frame_zero_at_identity_and_divides_the_centres():
    c2w = random_c2w(6, seed=31).reshape(2, 3, 4, 4)
    scale = torch.tensor([2.0, 0.5], dtype=torch.float64)
    out = g.scaled_relative_c2w(g.invert_pose(c2w), scale)
    relative = g.relative_to_first(c2w)
    torch.testing.assert_close(out[:, 0], torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    torch.testing.assert_close(out[..., :3, :3], relative[..., :3, :3])
    torch.testing.assert_close(out[..., :3, 3], relative[..., :3, 3] / scale[:, None, None])


# ---------------------------------------------------------------------------------------------
# Co-visibility with the reference frame, masked PSNR

def sideways(baseline):
    """(1, 4, 4) frame -> reference transform of a frame whose camera sits `baseline` to the right of the
    reference's: a point at depth d seen at column u in the frame is at u + fx * baseline / d in the reference."""
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, 0, 3] = baseline
    return T


def column_ramp(step=0.1):
    """(1, 3, H, W) image whose column j is j * step in every channel and row."""
    return (torch.arange(W, dtype=torch.float64) * step).expand(1, 3, H, W).clone()


def test_identity_pose_sees_every_pixel_and_its_reprojection_is_the_reference():
    depth = random_depth(seed=70)
    reference = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(70), dtype=torch.float64)
    identity = torch.eye(4, dtype=torch.float64)[None]
    assert g.covisible_mask(depth, depth, K_TEST, identity).all()
    torch.testing.assert_close(g.reproject_reference(reference, depth, K_TEST, identity), reference)


def test_a_still_camera_scores_on_covisible_pixels_what_a_hand_computation_says():
    # A wall at depth 2 and a camera moved fx * b / d = 1 pixel: frame column j shows reference column j + 1, and
    # the frame's last column shows what the reference does not (out of its view), here 0.9.
    depth = torch.full((1, H, W), 2.0, dtype=torch.float64)
    T = sideways(2.0 / K_TEST[0, 0, 0].item())
    reference = column_ramp()
    frame = torch.cat([reference[..., 1:], torch.full((1, 3, H, 1), 0.9, dtype=torch.float64)], dim=-1)
    mask = g.covisible_mask(depth, depth, K_TEST, T)
    assert mask[..., :-1].all() and not mask[..., -1].any()
    torch.testing.assert_close(g.reproject_reference(reference, depth, K_TEST, T)[..., :-1], frame[..., :-1])
    # the still camera repeats the reference: off by one ramp step (0.1) on every co-visible pixel -> 20 dB, while
    # the full frame also counts the last column (0.9 - 1.5 = -0.6 there)
    assert g.masked_psnr(reference, frame, mask).item() == pytest.approx(20.0)
    full_mse = ((W - 1) * 0.01 + 0.36) / W
    assert g.psnr(reference, frame).item() == pytest.approx(10 * math.log10(1 / full_mse))


def test_covisible_mask_drops_pixels_an_occluder_hides_from_the_reference():
    # The frame sees a wall at depth 4; the reference sees the same wall except where a near box (depth 1) stands in
    # front of columns 5-8. A 1-pixel shift: frame columns 4-7 land on the box, and column W - 1 leaves the view.
    depth_frame = torch.full((1, H, W), 4.0, dtype=torch.float64)
    depth_reference = depth_frame.clone()
    depth_reference[:, 3:9, 5:9] = 1.0
    mask = g.covisible_mask(depth_frame, depth_reference, K_TEST, sideways(4.0 / K_TEST[0, 0, 0].item()))
    expected = torch.ones(1, H, W, dtype=torch.bool)
    expected[:, 3:9, 4:8] = False
    expected[..., -1] = False
    assert torch.equal(mask, expected)


def test_covisible_mask_drops_what_a_turned_camera_sees_outside_the_reference():
    # The reference faces a wall at depth 3; the frame turns 25 degrees to the right about its y axis. Its right
    # part looks past the reference's right edge; the rest sees the wall where the reference sees it.
    R = torch.tensor(Rotation.from_euler("y", 25, degrees=True).as_matrix())  # frame -> reference rotation
    T = torch.eye(4, dtype=torch.float64)[None].clone()
    T[0, :3, :3] = R
    depth_reference = torch.full((1, H, W), 3.0, dtype=torch.float64)
    depth_frame = plane_depth(R[2], 3.0, K_TEST, H, W)  # the wall z_ref = 3 in the frame's coordinates
    mask = g.covisible_mask(depth_frame, depth_reference, K_TEST, T)
    # where each frame pixel's ray meets the reference image, by the rotation alone (no depth involved)
    rays = g.unproject_depth(torch.ones(1, H, W, dtype=torch.float64), K_TEST) @ R.T
    u = K_TEST[0, 0, 0] * rays[..., 0] / rays[..., 2] + K_TEST[0, 0, 2]
    v = K_TEST[0, 1, 1] * rays[..., 1] / rays[..., 2] + K_TEST[0, 1, 2]
    assert torch.equal(mask, (u <= W) & (v >= 0) & (v <= H))
    assert mask[..., :W // 2].all() and not mask[..., -2:].any()


def test_masked_psnr_ignores_unmasked_pixels_and_is_nan_for_an_empty_mask():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    b = a.clone()
    b[..., :2] = 0.1  # masked: 20 dB
    b[..., 2:] = 0.7  # not masked
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True
    out = g.masked_psnr(a, b, mask)
    assert out[0].item() == pytest.approx(20.0) and math.isnan(out[1].item())


def test_reprojected_reference_of_a_real_clip_scores_near_its_ceiling_and_a_still_camera_below():
    import data  # the synthetic world's true depth and cameras
    clip = data.render_clip(data.SPLIT_SEEDS["test"][0], 8, 32, 32)
    video, depth, w2c = clip["video"], clip["depth"], clip["w2c"]
    to_reference = w2c[0] @ torch.linalg.inv(w2c)  # (F, 4, 4) frame f -> frame 0
    K = clip["K"].expand(8, 3, 3)
    mask = g.covisible_mask(depth, depth[:1].expand_as(depth), K, to_reference)
    ceiling = g.reproject_reference(video[:1].expand_as(video), depth, K, to_reference)
    assert mask[1:].float().mean() > 0.3  # the camera moves, but most of the reference stays in view
    ceiling_psnr = g.masked_psnr(ceiling[1:], video[1:], mask[1:]).mean().item()
    still_psnr = g.masked_psnr(video[:1].expand_as(video)[1:], video[1:], mask[1:]).mean().item()
    assert ceiling_psnr > 28 and still_psnr < ceiling_psnr - 5
