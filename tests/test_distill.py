"""The CamGeo distillation (distill.py): its config, the teacher's reading (teacher_geometry), the teacher gate, L_traj,
the batched L_geo (eager and compiled), the curriculum and L_total, and the distillation of a training batch."""
import math

import pytest
import torch

import alignment
import data
import distill
import geometry
import teacher

H = W = 16


def rotation_about(axis, angle):
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    q = torch.cat([axis * math.sin(angle / 2), torch.tensor([math.cos(angle / 2)], dtype=torch.float64)])
    return geometry.quat_to_mat(q)


def pose(R, t):
    return geometry.to_homogeneous(torch.cat([R, torch.as_tensor(t, dtype=R.dtype)[:, None]], dim=-1))


def smooth_trajectory(num_frames, batch=1, seed=0, dtype=torch.float64):
    """w2c (B, F, 4, 4) of a camera turning and moving a little each frame, with random per-frame jitter."""
    g = torch.Generator().manual_seed(seed)
    q = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=dtype) + 0.05 * torch.randn(batch, num_frames, 4, generator=g,
                                                                             dtype=dtype)
    t = 0.3 * torch.randn(batch, num_frames, 3, generator=g, dtype=dtype)
    return geometry.to_homogeneous(torch.cat([geometry.quat_to_mat(q), t[..., None]], dim=-1))


def intrinsics(batch, num_frames, focal=14.0, dtype=torch.float64):
    K = torch.tensor([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1]], dtype=dtype)
    return K.expand(batch, num_frames, 3, 3).clone()


def keyframes(batch, num_frames, index):
    mask = torch.zeros(batch, num_frames, dtype=torch.float64)
    mask[:, index] = 1
    return mask


# -----------------------------------------------------------------------------
# the teacher's reading of a video

# A very small random teacher (fast on CPU): these tests check plumbing, not what a teacher knows.
TINY = teacher.VGGTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_register_tokens=2,
                          patch_embed="conv", dino_depth=0, dino_num_heads=0, camera_trunk_depth=1,
                          camera_num_heads=2, dpt_features=16, dpt_out_channels=[8, 16, 32, 32],
                          dpt_intermediate_layer_idx=[0, 1, 1, 1])


def test_teacher_geometry_returns_input_sized_depth_and_intrinsics():
    model = teacher.freeze(teacher.VGGT(TINY))
    video = torch.rand(2, 3, 3, 24, 30)  # not the teacher's size: resized in and out
    out = distill.teacher_geometry(model, video, cameras="head")
    assert out["extrinsics"].shape == (2, 3, 4, 4)
    assert out["depth"].shape == (2, 3, 24, 30) and out["depth_conf"].shape == (2, 3, 24, 30)
    K = out["intrinsics"]
    assert K.shape == (2, 3, 3, 3)
    assert torch.allclose(K[..., 0, 2], torch.tensor(15.0)) and torch.allclose(K[..., 1, 2], torch.tensor(12.0))


def test_teacher_geometry_intrinsics_are_in_input_pixels():
    model = teacher.freeze(teacher.VGGT(TINY))
    with torch.no_grad():  # keep the predicted fields of view away from ReLU's zero
        model.camera_head.pose_branch.fc2.bias[7:] += 1.0
    video = torch.rand(1, 2, 3, 24, 30)
    out = distill.teacher_geometry(model, video, cameras="head")
    fov_h, fov_w = out["pose_enc"][..., 7], out["pose_enc"][..., 8]
    assert torch.allclose(out["intrinsics"][..., 0, 0], 15.0 / torch.tan(fov_w / 2))
    assert torch.allclose(out["intrinsics"][..., 1, 1], 12.0 / torch.tan(fov_h / 2))


def test_head_cameras_keep_a_zero_field_of_view_at_a_finite_focal_length():
    model = teacher.freeze(teacher.VGGT(TINY))
    with torch.no_grad():  # both fields of view at ReLU's zero floor
        model.camera_head.pose_branch.fc2.bias[7:] -= 1e3
    out = distill.teacher_geometry(model, torch.rand(1, 2, 3, 16, 16), cameras="head")
    low = math.radians(distill.FOV_RANGE_DEG[0])
    assert torch.isfinite(out["intrinsics"]).all()
    assert torch.allclose(out["intrinsics"][..., 0, 0], torch.full((1, 2), 8 / math.tan(low / 2)))


def test_aligned_cameras_are_the_alignment_of_the_video_through_the_teacher_depth():
    model = teacher.freeze(teacher.VGGT(TINY))
    video = torch.rand(1, 3, 3, 16, 16)
    K = torch.tensor([[[14.0, 0, 8], [0, 14.0, 8], [0, 0, 1]]])
    out = distill.teacher_geometry(model, video, cameras="aligned", intrinsics=K)
    head = distill.teacher_geometry(model, video, cameras="head")
    expected = alignment.align_cameras(video, out["depth"], K, init_w2c=head["extrinsics"])
    assert torch.allclose(out["extrinsics"], expected) and torch.equal(out["intrinsics"], K[:, None].expand(1, 3, 3, 3))
    assert torch.equal(out["extrinsics"][:, 0], torch.eye(4)[None])


def test_aligned_cameras_pass_the_gradient_to_the_video():
    # seeded: the solver starts from the camera head's poses (teacher_geometry), and an untrained head's move
    # 1 to 2 between frames at a depth near 1 on 16x16 frames; on about half the seeds that start leaves no pixel in
    # view, so the solver has nothing to move the pose with and returns the head's pose, which has no gradient
    # path from the video. This draw starts in view and checks the path exists.
    torch.manual_seed(0)
    model = teacher.freeze(teacher.VGGT(TINY))
    video = torch.rand(1, 3, 3, 16, 16, requires_grad=True)
    K = torch.tensor([[[14.0, 0, 8], [0, 14.0, 8], [0, 0, 1]]])
    out = distill.teacher_geometry(model, video, cameras="aligned", intrinsics=K)
    (gradient,) = torch.autograd.grad(out["extrinsics"][:, 1:, :3, 3].sum(), video)
    assert gradient.abs().sum() > 0 and torch.isfinite(gradient).all()


def test_default_cameras_are_the_head_for_vggt_1b_and_aligned_for_a_teacher_trained_here():
    assert distill.default_cameras(teacher.VGGT_1B) == "head"
    assert distill.default_cameras(teacher.SMALL_TEACHER) == "aligned"


def test_teacher_geometry_rejects_an_unknown_camera_source_and_bad_intrinsics():
    model = teacher.freeze(teacher.VGGT(TINY))
    with pytest.raises(ValueError, match="cameras must be one of"):
        distill.teacher_geometry(model, torch.rand(1, 2, 3, 16, 16), cameras="oracle")
    with pytest.raises(ValueError, match="intrinsics must be"):
        distill.teacher_geometry(model, torch.rand(1, 2, 3, 16, 16), intrinsics=torch.eye(3))


# -----------------------------------------------------------------------------
# teacher gate


def test_teacher_weight_is_one_when_clean_and_zero_from_t_max_on():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    assert torch.allclose(distill.teacher_weight(t, t_max=0.5), torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_teacher_weight_never_increases_with_noise():
    weights = distill.teacher_weight(torch.linspace(0, 1, 101))
    assert torch.all(weights[1:] <= weights[:-1])


def test_select_teacher_clips_takes_only_open_clips_and_at_most_the_fraction():
    weights = torch.tensor([0.0, 0.3, 0.0, 0.9, 0.1, 0.2, 0.0, 0.5])
    chosen = distill.select_teacher_clips(weights, fraction=0.25)
    assert chosen.tolist() == [1, 3]
    assert distill.select_teacher_clips(torch.zeros(8), fraction=1.0).numel() == 0


def test_teacher_weight_rejects_bad_t_max():
    with pytest.raises(ValueError, match="t_max"):
        distill.teacher_weight(torch.rand(3), t_max=0.0)


def test_flat_gate_gives_full_weight_below_t_max_and_none_above():
    t = torch.tensor([0.0, 0.3, 0.69, 0.7, 0.9])
    assert torch.equal(distill.teacher_weight(t, t_max=0.7, shape="flat"), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_teacher_frames_clamp_the_values_but_pass_the_gradient_where_pixels_saturate():
    x = torch.tensor([-0.2, 0.5, 1.3], requires_grad=True)
    frames = distill.teacher_frames(x, gradient_sigma=0.0)
    assert torch.equal(frames.detach(), torch.tensor([0.0, 0.5, 1.0]))
    frames.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_low_passed_teacher_gradient_keeps_the_frames_and_the_layout_but_drops_patch_size_patterns():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 32, 32, requires_grad=True)  # (B, F, C, H, W)
    frames = distill.teacher_frames(x, gradient_sigma=1.5)
    assert torch.equal(frames.detach(), x.detach())  # the teacher reads the frames unchanged
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.sin(2 * math.pi * cols / 32)  # one period across the frame: the layout
    patches = ((rows // 2 + cols // 2) % 2) * 2 - 1  # a checkerboard of 2-pixel squares: 4-pixel period
    for pattern, kept in ((smooth, (0.9, 1.0)), (patches, (0.0, 0.05))):
        x.grad = None
        (frames * pattern).sum().backward()
        inner = pattern[8:24, 8:24]  # away from the replicated borders
        gain = (x.grad[..., 8:24, 8:24] * inner).sum((-2, -1)) / (inner * inner).sum()  # per frame and channel
        assert ((gain >= kept[0]) & (gain <= kept[1])).all(), (pattern is smooth, gain.flatten()[:3])


def test_teacher_frames_low_pass_off_passes_the_gradient_whole_and_rejects_negative_sigma():
    x = torch.rand(1, 2, 3, 8, 8, requires_grad=True)
    pattern = torch.randn(8, 8)
    (distill.teacher_frames(x, gradient_sigma=0.0) * pattern).sum().backward()
    assert torch.equal(x.grad, pattern.expand_as(x))
    with pytest.raises(ValueError, match="sigma"):
        distill.teacher_frames(x, gradient_sigma=-1.0)


# -----------------------------------------------------------------------------
# L_traj

ONE = torch.ones(1, dtype=torch.float64)


def trajectory_loss(pred, K_pred, target, K_target, mask, pred_scale=None, target_scale=None, **options):
    batch = target.shape[0]
    scale = torch.ones(batch, dtype=torch.float64)
    return distill.trajectory_loss(pred, K_pred, target, K_target, mask, (H, W),
                                  scale if pred_scale is None else pred_scale,
                                  scale if target_scale is None else target_scale, **options)


def test_trajectory_loss_is_zero_for_the_same_cameras_in_another_world_frame_and_scale():
    gt = smooth_trajectory(6, batch=2)
    world = pose(rotation_about([1.0, 2.0, 3.0], 0.7), [0.5, -1.0, 2.0])
    # same cameras, teacher's world = another frame, teacher's unit 3x smaller: w2c' = S w2c G
    teacher = gt @ world
    teacher = torch.cat([teacher[..., :3, :3], 3.0 * teacher[..., :3, 3:]], dim=-1)
    K = intrinsics(2, 6)
    loss = trajectory_loss(teacher, K, gt, K[:, 0], keyframes(2, 6, [0, 2, 5]), pred_scale=3 * ONE.expand(2))
    assert loss.shape == (2,)
    assert torch.allclose(loss, torch.zeros(2, dtype=torch.float64), atol=1e-9)


def test_trajectory_loss_measures_translations_in_units_of_the_scene_scale():
    gt = smooth_trajectory(4)
    moved = gt.clone()
    moved[0, 2, :3, 3] += torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64)  # keyframe 2's centre moves 0.4
    K = intrinsics(1, 4)
    near = trajectory_loss(moved, K, gt, K[:, 0], keyframes(1, 4, [0, 2]))
    far = trajectory_loss(moved, K, gt, K[:, 0], keyframes(1, 4, [0, 2]), 4 * ONE, 4 * ONE)
    assert torch.allclose(near, 4 * far)  # the same displacement is 4x smaller against a scene 4x farther away


def test_trajectory_loss_stays_small_and_bounded_on_a_pan_with_hand_shake():
    """A pan moves the camera centre by millimetres: jitter in another direction must not become unit-length."""
    yaw = [rotation_about([0.0, 1.0, 0.0], 0.05 * f) for f in range(5)]
    gt = torch.stack([pose(R, [0.0, 0.0, 0.0]) for R in yaw])[None]
    shaken = torch.stack([pose(R, 1e-3 * torch.randn(3, dtype=torch.float64, generator=torch.Generator()
                                                         .manual_seed(f))) for f, R in enumerate(yaw)])[None]
    K = intrinsics(1, 5)
    scene = 3.0 * ONE  # metres to the scene
    loss = trajectory_loss(shaken, K, gt, K[:, 0], keyframes(1, 5, [0, 2, 4]), scene, scene)
    assert torch.isfinite(loss).all() and loss.item() < 0.01
    assert trajectory_loss(gt, K, gt, K[:, 0], keyframes(1, 5, [0, 2, 4]), scene, scene).item() == 0


def test_trajectory_loss_ignores_frames_without_a_pose():
    gt = smooth_trajectory(6)
    K = intrinsics(1, 6)
    teacher = gt.clone()
    teacher[:, 3] = smooth_trajectory(6, seed=5)[:, 3]  # frame 3 is not a keyframe
    loss = trajectory_loss(teacher, K, gt, K[:, 0], keyframes(1, 6, [0, 2, 5]))
    assert torch.allclose(loss, torch.zeros(1, dtype=torch.float64), atol=1e-9)


def test_trajectory_loss_of_a_rotated_keyframe_is_the_quaternion_l1():
    eye = torch.eye(4, dtype=torch.float64)
    gt = torch.stack([eye, pose(torch.eye(3, dtype=torch.float64), [1.0, 0, 0])])[None]  # (1, 2, 4, 4)
    angle = 0.3
    teacher = gt.clone()
    teacher[0, 1, :3, :3] = rotation_about([0.0, 0.0, 1.0], angle)
    # w2c translation after the rotation: same camera centre (-R^T t), so only the rotation and t differ
    teacher[0, 1, :3, 3] = -(teacher[0, 1, :3, :3] @ torch.tensor([-1.0, 0, 0], dtype=torch.float64))
    K = intrinsics(1, 2)
    loss = trajectory_loss(teacher, K, gt, K[:, 0], keyframes(1, 2, [0, 1]))
    quat_l1 = math.sin(angle / 2) + 1 - math.cos(angle / 2)
    t_l1 = (teacher[0, 1, :3, 3] - gt[0, 1, :3, 3]).abs().sum()  # scene scale 1
    assert torch.allclose(loss, (quat_l1 + t_l1)[None], atol=1e-9)


def test_trajectory_loss_treats_q_and_minus_q_as_the_same_rotation_near_180_degrees():
    eps = 0.01
    gt, teacher = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4).clone(), None
    gt[0, 1, :3, :3] = rotation_about([1.0, 0.0, 0.0], math.pi - eps)
    teacher = gt.clone()
    teacher[0, 1, :3, :3] = rotation_about([1.0, 0.0, 0.0], math.pi + eps)  # standardises to the other sign
    K = intrinsics(1, 2)
    loss = trajectory_loss(teacher, K, gt, K[:, 0], keyframes(1, 2, [0, 1]))
    # rotations 2 eps apart: the aligned quaternions differ only in w, by 2 sin(eps / 2)
    assert torch.allclose(loss, torch.tensor([2 * math.sin(eps / 2)], dtype=torch.float64), atol=1e-9)


def test_field_of_view_term_is_the_fov_l1_and_only_on_request():
    gt = smooth_trajectory(3)
    K_true, K_teacher = intrinsics(1, 3, focal=14.0), intrinsics(1, 3, focal=10.0)
    with_fov = trajectory_loss(gt, K_teacher, gt, K_true[:, 0], keyframes(1, 3, [0, 2]), use_intrinsics=True)
    fov_error = 2 * (2 * math.atan(W / 2 / 10.0) - 2 * math.atan(W / 2 / 14.0))  # fov_h and fov_w
    assert torch.allclose(with_fov, torch.tensor([fov_error], dtype=torch.float64), atol=1e-9)
    assert trajectory_loss(gt, K_teacher, gt, K_true[:, 0], keyframes(1, 3, [0, 2])).item() == 0


def test_trajectory_loss_sends_gradients_to_the_teacher_cameras():
    gt = smooth_trajectory(4)
    teacher = smooth_trajectory(4, seed=1).requires_grad_()
    K = intrinsics(1, 4).requires_grad_()
    trajectory_loss(teacher, K, gt, K[:, 0].detach(), keyframes(1, 4, [0, 3])).sum().backward()
    assert teacher.grad.abs().sum() > 0 and torch.isfinite(teacher.grad).all()


def test_trajectory_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="keyframe_mask"):
        trajectory_loss(smooth_trajectory(4), intrinsics(1, 4), smooth_trajectory(5), intrinsics(1, 5)[:, 0],
                        keyframes(1, 5, [0, 4]))


# -----------------------------------------------------------------------------
# L_geo


def clip_batch(batch=2, num_frames=5, seed=0):
    """True depth, cameras and frames of rendered clips (float64): geometrically consistent by construction."""
    clips = [data.render_clip(seed + b, num_frames=num_frames, height=H, width=W) for b in range(batch)]
    depth = torch.stack([c["depth"] for c in clips]).double()
    w2c = torch.stack([c["w2c"] for c in clips]).double()
    K = torch.stack([c["K"] for c in clips]).double()[:, None].expand(batch, num_frames, 3, 3)
    frames = torch.stack([c["video"] for c in clips]).double()
    return depth, w2c, K, frames


def reference_depth_term(depth, w2c, K, spans, gamma, scale_mode):
    """The depth term pair by pair with geometry.depth_consistency_residual (shared K, no edge weights)."""
    B, num_frames = depth.shape[:2]
    usable = [k for k in spans if k < num_frames]
    total = torch.zeros(B, dtype=depth.dtype)
    for k in usable:
        per_span = torch.zeros(B, dtype=depth.dtype)
        for f in range(num_frames - k):
            T = w2c[:, f + k] @ geometry.invert_pose(w2c[:, f])
            residual, valid = geometry.depth_consistency_residual(depth[:, f], depth[:, f + k], K[:, f], T,
                                                                  scale_invariant=scale_mode)
            per_span += residual.flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1)
        total += k / sum(usable) * math.exp(gamma * k) * per_span / (num_frames - k)
    return total


@pytest.mark.parametrize("scale_mode", ["lstsq", "median"])
def test_fused_depth_term_equals_pairwise_depth_consistency_residual(scale_mode):
    depth, w2c, K, frames = clip_batch()
    depth = depth * (1 + 0.1 * torch.rand(depth.shape, generator=torch.Generator().manual_seed(0)))
    _, depth_term, _ = distill.geometry_loss(depth, w2c, K, frames, spans=(1, 2, 4), gamma=0.2, eta=0.0,
                                            scale_mode=scale_mode)
    expected = reference_depth_term(depth, w2c, K, (1, 2, 4), 0.2, scale_mode)
    assert torch.allclose(depth_term, expected, rtol=1e-9, atol=1e-12)


def test_depth_term_is_small_for_true_geometry_and_large_for_mismatched_frames():
    depth, w2c, K, frames = clip_batch()
    _, consistent, _ = distill.geometry_loss(depth, w2c, K, frames)
    _, shuffled, _ = distill.geometry_loss(depth.flip(1), w2c, K, frames)
    assert torch.all(consistent < 0.5 * shuffled)


def test_depth_term_does_not_change_when_depth_and_translations_share_a_new_scale():
    depth, w2c, K, frames = clip_batch()
    scaled = torch.cat([w2c[..., :3, :3], 2.5 * w2c[..., :3, 3:]], dim=-1)
    _, original, _ = distill.geometry_loss(depth, w2c, K, frames)
    _, rescaled, _ = distill.geometry_loss(2.5 * depth, scaled, K, frames)
    assert torch.allclose(original, rescaled, rtol=1e-9)


def test_edge_weights_lower_the_depth_term_and_pass_no_gradient_to_the_frames():
    depth, w2c, K, frames = clip_batch()
    depth = depth * (1 + 0.1 * torch.rand(depth.shape, generator=torch.Generator().manual_seed(0)))
    depth, frames = depth.requires_grad_(), frames.clone().requires_grad_()
    _, flat, _ = distill.geometry_loss(depth, w2c, K, frames, eta=0.0)
    loss, edge_aware, _ = distill.geometry_loss(depth, w2c, K, frames, eta=5.0)
    assert torch.all(edge_aware < flat)
    loss.sum().backward()
    assert frames.grad is None or torch.count_nonzero(frames.grad) == 0


def test_each_clip_loss_depends_only_on_its_own_clip():
    depth, w2c, K, frames = clip_batch()
    loss, _, _ = distill.geometry_loss(depth, w2c, K, frames)
    depth2 = depth.clone()
    depth2[1] = depth2[1].flip(0)
    loss2, _, _ = distill.geometry_loss(depth2, w2c, K, frames)
    assert loss2[0] == loss[0] and loss2[1] != loss[1]


def constant_velocity_trajectory(num_frames, step):
    """w2c_f = step^f: the same relative motion between every pair of consecutive frames."""
    poses = [torch.eye(4, dtype=torch.float64)]
    for _ in range(num_frames - 1):
        poses.append(step @ poses[-1])
    return torch.stack(poses)[None]


def test_smoothness_is_zero_for_constant_velocity_and_positive_when_the_camera_accelerates():
    depth, _, K, frames = clip_batch(batch=1, num_frames=6)
    step = pose(rotation_about([0.0, 1.0, 0.0], 0.05), [0.1, 0.0, -0.05])
    steady = constant_velocity_trajectory(6, step)
    _, _, smooth = distill.geometry_loss(depth, steady, K, frames)
    assert smooth.abs().max() < 1e-9  # the literal reading |Delta(C_{f+k}, C_f)| would be > 0 here
    jerky = steady.clone()
    jerky[0, 3] = pose(rotation_about([1.0, 0.0, 0.0], 0.1), [0.3, 0.0, 0.0]) @ jerky[0, 3]
    _, _, smooth = distill.geometry_loss(depth, jerky, K, frames)
    assert smooth.item() > 1e-3


def test_smoothness_weight_zero_leaves_only_the_depth_term():
    depth, w2c, K, frames = clip_batch()
    loss, depth_term, smooth = distill.geometry_loss(depth, w2c, K, frames, smoothness_weight=0.0)
    assert torch.equal(loss, depth_term) and torch.all(smooth > 0)


def test_geometry_pairs_sum_to_the_two_terms_of_geometry_loss():
    depth, w2c, K, frames = clip_batch()
    depth_pairs, smooth_pairs = distill.geometry_pairs(depth, w2c, K, frames)
    loss, depth_term, smooth = distill.geometry_loss(depth, w2c, K, frames, smoothness_weight=0.5)
    num_pairs = len(distill.span_pairs(depth.shape[1], distill.DEFAULTS.spans)[0])
    assert depth_pairs.shape == smooth_pairs.shape == (depth.shape[0], num_pairs)
    assert torch.allclose(depth_pairs.sum(-1), depth_term) and torch.allclose(smooth_pairs.sum(-1), smooth)
    assert torch.allclose(loss, depth_term + 0.5 * smooth)


def test_span_weights_favour_longer_spans_and_drop_spans_longer_than_the_clip():
    first, second, following, depth_weight, smooth_weight = distill.span_pairs(5, (1, 2, 4, 8), gamma=0.1)
    spans = second - first
    assert set(spans.tolist()) == {1, 2, 4}
    per_span = [depth_weight[spans == k].sum().item() for k in (1, 2, 4)]
    assert per_span[0] < per_span[1] < per_span[2]
    assert math.isclose(per_span[2] / per_span[0], 4 * math.exp(0.1 * 3))
    # the pair following (f, f + k) starts where it ends
    has_next = following >= 0
    assert torch.equal(first[following[has_next]], second[has_next])
    assert torch.all(smooth_weight[~has_next] == 0)


def test_span_pairs_rejects_a_span_set_with_no_usable_span():
    with pytest.raises(ValueError, match="no usable span"):
        distill.span_pairs(4, (4, 8))


def test_geometry_loss_sends_gradients_to_depth_and_cameras():
    depth, w2c, K, frames = clip_batch()
    depth, w2c, K = depth.requires_grad_(), w2c[..., :3, :].clone().requires_grad_(), K.clone().requires_grad_()
    distill.geometry_loss(depth, w2c, K, frames)[0].sum().backward()
    for grad in (depth.grad, w2c.grad, K.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_geometry_loss_gradients_stay_finite_when_points_leave_the_view_or_go_behind_the_camera():
    depth, w2c, K, frames = clip_batch(batch=1, num_frames=3)
    w2c = w2c.clone()
    w2c[0, 1] = pose(rotation_about([0.0, 1.0, 0.0], math.pi), [0.0, 0.0, 0.0]) @ w2c[0, 1]  # faces backwards
    w2c[0, 2, :3, 3] += 1e4  # moved far away: every point lands far outside the image
    depth, w2c = depth.requires_grad_(), w2c.requires_grad_()
    loss, _, _ = distill.geometry_loss(depth, w2c, K, frames)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(depth.grad).all() and torch.isfinite(w2c.grad).all()


def test_compiled_geometry_loss_matches_eager_values_and_gradients():
    # Fails (does not skip) where torch.compile cannot run: --compile is the default of train.py.
    depth, w2c, K, frames = (x.float() for x in clip_batch(batch=1, num_frames=3))
    depth = depth * (1 + 0.1 * torch.rand(depth.shape, generator=torch.Generator().manual_seed(0)))
    results = []
    for fn in (distill.geometry_loss, torch.compile(distill.geometry_loss, fullgraph=True)):
        d, c = depth.clone().requires_grad_(), w2c[..., :3, :].clone().requires_grad_()
        loss, depth_term, smooth = fn(d, c, K, frames, spans=(1, 2))
        loss.sum().backward()
        results.append((loss.detach(), depth_term.detach(), smooth.detach(), d.grad, c.grad))
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# curriculum


def test_alpha_is_exactly_zero_during_warmup():
    for step in range(0, 10):
        assert distill.curriculum_weights(step, 100)[0] == 0.0


def test_alpha_and_beta_rise_from_near_zero_to_near_one():
    alphas, betas = zip(*(distill.curriculum_weights(s, 1000) for s in range(1000)))
    assert all(b >= a for a, b in zip(alphas, alphas[1:])) and all(b >= a for a, b in zip(betas, betas[1:]))
    assert alphas[-1] > 0.999 and betas[-1] > 0.999 and betas[150] < 1e-3


def test_sigmoid_schedules_are_one_half_at_their_midpoints():
    alpha, _ = distill.curriculum_weights(200, 1000, alpha_mid=0.2)
    _, beta = distill.curriculum_weights(500, 1000, beta_mid=0.5)
    assert math.isclose(alpha, 0.5) and math.isclose(beta, 0.5)


def test_trajectory_leads_and_depth_follows():
    alpha, beta = distill.curriculum_weights(300, 1000)
    assert alpha > 0.9 and beta < 0.1  # phase 2: mostly L_traj


def test_linear_schedule_shares_midpoint_and_slope_and_is_clipped():
    width, beta_mid = distill.DEFAULTS.schedule_width, distill.DEFAULTS.beta_mid
    total = 100_000
    mid = int(beta_mid * total)
    sig = [distill.curriculum_weights(s, total)[1] for s in (mid - 10, mid, mid + 10)]
    lin = [distill.curriculum_weights(s, total, schedule="linear")[1] for s in (mid - 10, mid, mid + 10)]
    assert math.isclose(lin[1], 0.5) and math.isclose(lin[2] - lin[0], sig[2] - sig[0], rel_tol=1e-3)
    assert distill.curriculum_weights(total - 1, total, schedule="linear") == (1.0, 1.0)
    assert distill.curriculum_weights(int(0.11 * total), total, schedule="linear")[1] == 0.0
    # the linear ramp spans 4 widths around the midpoint: 0 and 1 exactly two widths either side
    assert distill.curriculum_weights(round((beta_mid - 2 * width) * total), total, "linear")[1] == 0
    assert distill.curriculum_weights(round((beta_mid + 2 * width) * total), total, "linear")[1] == 1


def test_without_warmup_alpha_is_one_from_the_first_step():
    assert distill.curriculum_weights(0, 100, warmup=False)[0] == 1.0


def test_total_loss_gates_geometry_by_beta_by_default_and_not_in_the_printed_form():
    unit = dict(traj_weight=1.0, geo_weight=1.0)
    gated = distill.total_loss(1.0, 2.0, 4.0, alpha=0.5, beta=0.25, **unit)
    printed = distill.total_loss(1.0, 2.0, 4.0, alpha=0.5, beta=0.25, geo_gate="printed", **unit)
    assert gated == 1.0 + 0.5 * (0.75 * 2.0 + 0.25 * 4.0)
    assert printed == 1.0 + 0.5 * (0.75 * 2.0 + 4.0)
    weighted = distill.total_loss(1.0, 2.0, 4.0, alpha=0.5, beta=0.25, traj_weight=3.0, geo_weight=0.5)
    assert weighted == 1.0 + 0.5 * (0.75 * 3.0 * 2.0 + 0.25 * 0.5 * 4.0)


def test_curriculum_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        distill.curriculum_weights(0, 10, schedule="cosine")


# -----------------------------------------------------------------------------
# the config and the teacher on a training batch


@pytest.mark.parametrize("field, value", [("teacher_every", 0), ("teacher_t_max", 0.0), ("teacher_fraction", 1.5),
                                          ("teacher_gradient_sigma", -1.0), ("teacher_cameras", "oracle"),
                                          ("distill_target", "labels")])
def test_config_rejects_a_choice_the_distillation_cannot_run(field, value):
    with pytest.raises(ValueError, match=field):
        distill.DistillConfig(**{field: value})


@pytest.fixture(scope="module")
def small_teacher():
    """The small teacher's architecture with random weights (what is tested is plumbing, not what it knows)."""
    torch.manual_seed(0)
    return teacher.freeze(teacher.VGGT(teacher.SMALL_TEACHER))


BATCH_FRAMES, BATCH_SIZE = 4, 16  # the smoke preset's clips


def distillation_of(video_pred, small_teacher, camera_drop=None, t=None, **choices):
    """distill.distillation_losses for a batch of 4 synthetic clips whose predicted video is video_pred(true video),
    keyframes the first and last frame, every clip open to the teacher unless choices say otherwise."""
    clips = [data.render_clip(seed, BATCH_FRAMES, BATCH_SIZE, BATCH_SIZE) for seed in range(4)]
    batch = {key: torch.stack([clip[key] for clip in clips]) for key in ("video", "depth", "w2c", "K")}
    out = {"t": torch.zeros(4) if t is None else t, "x0_pred": video_pred(batch["video"]), "loss": torch.zeros(()),
           "camera_drop": torch.zeros(4, dtype=torch.bool) if camera_drop is None else camera_drop}
    mask = keyframes(4, BATCH_FRAMES, [0, BATCH_FRAMES - 1])
    config = distill.DistillConfig(**{"teacher_fraction": 1.0, **choices})
    return distill.distillation_losses(small_teacher, distill.geometry_pairs, out, batch, mask, config)


def another_clips_frames(leaf):
    """video_pred: each clip's prediction is another clip's frames (so both losses are above zero), as a leaf
    whose gradient the test reads."""
    def predicted(video):
        leaf["x"] = video.roll(1, dims=0).clone().requires_grad_(True)
        return leaf["x"]
    return predicted


def test_teacher_consistent_target_is_zero_when_the_prediction_is_the_real_clip(small_teacher):
    terms = distillation_of(lambda video: video, small_teacher)
    assert terms["teacher_clips"] == 4 and terms["loss_traj"] == 0 and terms["loss_geo"] == 0
    shifted = distillation_of(lambda video: video.roll(1, dims=0), small_teacher)  # another clip's frames
    assert shifted["loss_traj"] > 0


def test_teacher_target_counts_only_how_much_less_consistent_the_prediction_is(small_teacher):
    # geometry_pairs of the predicted video (read with a gradient) and of the real clip (without), pair by pair
    readings = {True: (torch.tensor([[0.5, 0.25]]), torch.tensor([[0.25, 0.0]])),
                False: (torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.5]]))}
    fake_pairs = lambda *args, **kwargs: tuple(x.expand(4, 2) for x in readings[torch.is_grad_enabled()])
    clips = [data.render_clip(seed, BATCH_FRAMES, BATCH_SIZE, BATCH_SIZE) for seed in range(4)]
    batch = {key: torch.stack([clip[key] for clip in clips]) for key in ("video", "depth", "w2c", "K")}
    out = {"t": torch.zeros(4), "x0_pred": batch["video"], "loss": torch.zeros(()),
           "camera_drop": torch.zeros(4, dtype=torch.bool)}
    mask = keyframes(4, BATCH_FRAMES, [0, BATCH_FRAMES - 1])
    for smoothness, excess in ((1.0, 0.0), (0.5, 0.125), (0.0, 0.25)):
        # L_geo(x0_hat) = 0.75 + 0.25 w, L_geo(x0) = 0.5 + 0.5 w: x0_hat's depth is worse, its camera smoother,
        # and the excess is taken of the clip's whole sum: max(0, 0.25 - 0.25 w) for every clip
        config = distill.DistillConfig(teacher_fraction=1.0, smoothness_weight=smoothness)
        terms = distill.distillation_losses(small_teacher, fake_pairs, out, batch, mask, config)
        assert terms["loss_geo"].item() == pytest.approx(excess)
        assert terms["loss_geo_depth"].item() == pytest.approx(0.75)  # the predicted video's own terms
        assert terms["loss_geo_smooth"].item() == pytest.approx(0.25)


def test_true_target_is_the_plain_geometry_loss_and_the_true_poses(small_teacher):
    terms = distillation_of(lambda video: video, small_teacher, distill_target="truth")
    assert terms["loss_geo"] > 0 and terms["loss_traj"] > 0  # a random teacher reads the real clip wrongly
    assert torch.allclose(terms["loss_geo"], terms["loss_geo_depth"] + terms["loss_geo_smooth"])


def test_low_passed_teacher_gradient_changes_the_gradient_not_the_losses(small_teacher):
    readings = {}
    for sigma in (0.0, 1.5):
        leaf = {}
        terms = distillation_of(another_clips_frames(leaf), small_teacher, teacher_gradient_sigma=sigma)
        (terms["loss_traj"] + terms["loss_geo"]).backward()
        readings[sigma] = (terms["loss_traj"].item(), terms["loss_geo"].item(), leaf["x"].grad)
    assert readings[0.0][:2] == readings[1.5][:2] and readings[0.0][0] > 0
    whole, low_passed = readings[0.0][2], readings[1.5][2]
    assert torch.allclose(low_passed, geometry.gaussian_blur(whole.flatten(0, 1), 1.5).view_as(whole), atol=1e-7)
    roughness = lambda g: (g[..., 1:] - g[..., :-1]).abs().sum() / g.abs().sum()  # neighbour differences
    assert roughness(low_passed) < 0.5 * roughness(whole)


def test_the_teacher_reads_every_predicted_frame_including_frame_0(small_teacher):
    leaf = {}
    terms = distillation_of(another_clips_frames(leaf), small_teacher)
    (terms["loss_traj"] + terms["loss_geo"]).backward()
    assert (leaf["x"].grad.flatten(2).abs().sum(-1) > 0).all()  # (B, F): every frame of every clip is pulled


def test_clips_whose_camera_was_dropped_get_no_distillation(small_teacher):
    drop = torch.tensor([True, True, True, True])
    terms = distillation_of(lambda video: video.roll(1, dims=0), small_teacher, camera_drop=drop)
    assert terms["teacher_clips"] == 0 and terms["loss_traj"] == 0 and terms["loss_geo"] == 0
    one_kept = distillation_of(lambda video: video.roll(1, dims=0), small_teacher,
                               camera_drop=torch.tensor([True, False, True, True]))
    assert one_kept["teacher_clips"] == 1


def test_teacher_gate_and_fraction_limit_the_clips_the_teacher_sees(small_teacher):
    t = torch.tensor([0.1, 0.2, 0.3, 0.9])
    assert distillation_of(lambda video: video, small_teacher, t=t)["teacher_clips"] == 3  # t_max 0.5
    assert distillation_of(lambda video: video, small_teacher, t=t, teacher_t_max=0.25)["teacher_clips"] == 2
    assert distillation_of(lambda video: video, small_teacher, t=t, teacher_fraction=0.25)["teacher_clips"] == 1


def test_each_loss_is_weighted_by_the_gate_and_divided_by_the_batch(small_teacher):
    shifted = lambda video: video.roll(1, dims=0)
    whole = distillation_of(shifted, small_teacher, distill_target="truth")  # t = 0: every clip at weight 1
    t = torch.tensor([0.25, 0.25, 0.25, 0.25])  # linear gate at t_max 0.5: weight 1/2 each
    half = distillation_of(shifted, small_teacher, t=t, distill_target="truth")
    for name in ("loss_traj", "loss_geo"):
        assert torch.allclose(half[name], 0.5 * whole[name])
