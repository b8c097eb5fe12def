"""Specification of data.py: the synthetic world's clips, its camera paths and the splits."""
import itertools
import math

import numpy as np
import pytest
import torch

import data
import geometry

# ----------------------------------------------------------------------------------------------
# Clips: shapes, ranges, determinism


def test_render_clip_returns_the_contract_keys_shapes_and_dtypes():
    clip = data.render_clip(0, num_frames=5, height=16, width=24)
    assert clip["video"].shape == (5, 3, 16, 24) and clip["video"].dtype == torch.float32
    assert clip["depth"].shape == (5, 16, 24) and clip["depth"].dtype == torch.float32
    assert clip["w2c"].shape == (5, 4, 4) and clip["w2c"].dtype == torch.float32
    assert clip["K"].shape == (3, 3) and clip["K"].dtype == torch.float32
    assert isinstance(clip["prompt"], str) and clip["prompt"]


def test_same_seed_gives_bitwise_identical_clip():
    a, b = data.render_clip(7, 4, 16, 16), data.render_clip(7, 4, 16, 16)
    for key in ("video", "depth", "w2c", "K"):
        assert torch.equal(a[key], b[key]), key
    assert a["prompt"] == b["prompt"]


def test_different_seeds_give_different_videos():
    videos = [data.render_clip(seed, 2, 16, 16)["video"] for seed in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert (videos[i] - videos[j]).abs().mean() > 0.01, (i, j)


def test_different_seeds_give_different_prompts():
    prompts = [data.sample_world(seed).scene.prompt() for seed in range(20)]
    assert len(set(prompts)) == len(prompts)


def test_prompt_names_the_objects_in_the_scene():
    for seed in range(10):
        scene = data.sample_world(seed).scene
        prompt = scene.prompt()
        for kind in ("box", "ball", "cylinder"):
            count = sum(obj.kind == kind for obj in scene.objects)
            assert prompt.count(f" {kind}") == count, (seed, kind, prompt)
        assert f"{scene.walls.colour_name} walls" in prompt


def test_depth_is_positive_and_finite():
    for seed in range(4):
        depth = data.render_clip(seed, 4, 16, 16)["depth"]
        assert torch.isfinite(depth).all() and (depth > 0).all()


def test_video_lies_in_unit_range_and_is_not_blank():
    for seed in range(4):
        video = data.render_clip(seed, 4, 16, 16)["video"]
        assert video.min() >= 0 and video.max() <= 1
        assert video.std() > 0.05  # textures and shading, not a flat colour


def test_K_has_principal_point_at_image_centre_and_square_pixels():
    K = data.render_clip(3, 2, 24, 40)["K"]
    assert K[0, 2] == 20 and K[1, 2] == 12
    assert K[0, 0] == K[1, 1]
    assert K[0, 1] == 0 and K[1, 0] == 0 and torch.equal(K[2], torch.tensor([0.0, 0.0, 1.0]))


def test_horizontal_field_of_view_is_between_50_and_70_degrees():
    for seed in range(20):
        K = data.render_clip(seed, 1, 8, 8)["K"]
        fov_x = math.degrees(2 * math.atan(4 / K[0, 0].item()))
        assert 50 <= fov_x <= 70


def test_resolution_changes_only_the_pixel_grid():
    small, large = data.render_clip(5, 3, 16, 16), data.render_clip(5, 3, 32, 48)
    assert torch.equal(small["w2c"], large["w2c"])
    assert small["prompt"] == large["prompt"]
    # Same horizontal field of view at both sizes.
    assert torch.allclose(small["K"][0, 0] / 16, large["K"][0, 0] / 48)


def test_num_frames_changes_only_the_sampling_density_of_the_path():
    three, five = data.render_clip(11, 3, 16, 16), data.render_clip(11, 5, 16, 16)
    # Frames at times 0, 1/2, 1 are frames 0, 2, 4 of the five-frame clip.
    assert torch.equal(three["w2c"], five["w2c"][::2])
    assert torch.allclose(three["video"], five["video"][::2], atol=1e-5)
    assert torch.allclose(three["depth"], five["depth"][::2], rtol=1e-5)


def test_supersampling_keeps_depth_at_pixel_centres_and_only_smooths_rgb():
    plain, smooth = data.render_clip(2, 2, 16, 16), data.render_clip(2, 2, 16, 16, supersample=3)
    assert torch.allclose(plain["depth"], smooth["depth"], rtol=1e-5)
    difference = (plain["video"] - smooth["video"]).abs()
    assert difference.max() > 0  # it did something
    assert difference.mean() < 0.05  # but the picture is the same


def test_bad_sizes_and_supersample_factors_raise_value_error():
    with pytest.raises(ValueError, match="positive"):
        data.render_clip(0, num_frames=0)
    with pytest.raises(ValueError, match="supersample"):
        data.render_clip(0, 2, 8, 8, supersample=2)


# ----------------------------------------------------------------------------------------------
# Geometry: the renders are exact. Project frame 0's depth into frame k with the true poses and
# compare with what frame k actually shows, on the pixels of frame 0 that land inside frame k.
# Depth: pixels of frame 0 hidden in frame k (occlusion) or straddling a depth edge (bilinear
# sampling mixes near and far) disagree, but they are a minority, so the median relative depth
# error must be tiny; z is compared, so depth stored as ray length would fail (it is off by
# several per cent away from the image centre). Colour: on the pixels whose depth agrees (visible
# in both frames) the median colour difference must be tiny; the median ignores the few pixels
# near texture edges that bilinear sampling blurs.

RELATIVE_DEPTH_TOLERANCE = 0.01  # "depth agrees": visible in both frames
MEDIAN_DEPTH_ERROR = 0.002  # relative; exact renders give ~1e-4, ray length instead of z ~1e-2
MEDIAN_COLOUR_ERROR = 0.02  # exact renders give ~1e-3; 8-bit quantisation alone would be 2e-3
MIN_OVERLAP_PIXELS = 200  # frames that have turned away from frame 0's view are not compared
GEOMETRY_SEEDS = (0, 1, 2, 3)


def warp_first_frame(clip, T_first_to_k, k):
    """Frame 0 seen from frame k -> (in_view, relative depth error, visible, colour error), each (1, H, W)."""
    depth, video, K = clip["depth"], clip["video"], clip["K"]
    height, width = depth.shape[-2:]
    uv, z = geometry.project_depth(depth[:1], K[None], T_first_to_k[None])  # (1, H, W, 2), (1, H, W)
    in_view = geometry.in_view(uv, height, width) & (z > 0)
    sampled_depth = geometry.sample_at(depth[k][None, None], uv)[:, 0]  # (1, H, W)
    sampled_colour = geometry.sample_at(video[k][None], uv)  # (1, 3, H, W)
    depth_error = (sampled_depth - z).abs() / z.clamp(min=1e-6)
    visible = in_view & (depth_error < RELATIVE_DEPTH_TOLERANCE)
    colour_error = (sampled_colour - video[:1]).abs().amax(1)  # (1, H, W)
    return in_view, depth_error, visible, colour_error


def relative_pose(w2c, k):
    return w2c[k] @ torch.linalg.inv(w2c[0])  # frame 0 camera -> frame k camera


@pytest.mark.parametrize("seed", GEOMETRY_SEEDS)
def test_projected_depth_of_first_frame_matches_depth_of_later_frames(seed):
    clip = data.render_clip(seed, 6, 64, 64)
    compared = 0
    for k in range(1, 6):
        in_view, depth_error, visible, _ = warp_first_frame(clip, relative_pose(clip["w2c"], k), k)
        if in_view.sum() < MIN_OVERLAP_PIXELS:
            continue
        compared += 1
        assert depth_error[in_view].median() < MEDIAN_DEPTH_ERROR, (seed, k)
        assert visible.sum() > 0.5 * in_view.sum(), (seed, k)  # occlusions are a minority
    assert compared >= 2  # the check was not vacuous


@pytest.mark.parametrize("seed", GEOMETRY_SEEDS)
def test_projected_colour_of_first_frame_matches_colour_of_later_frames(seed):
    clip = data.render_clip(seed, 6, 64, 64)
    for k in range(1, 6):
        _, _, visible, colour_error = warp_first_frame(clip, relative_pose(clip["w2c"], k), k)
        if visible.sum() >= MIN_OVERLAP_PIXELS:
            assert colour_error[visible].median() < MEDIAN_COLOUR_ERROR, (seed, k)


def passes_geometric_check(clip, T_first_to_k, k):
    in_view, depth_error, visible, colour_error = warp_first_frame(clip, T_first_to_k, k)
    return bool(depth_error[in_view].median() < MEDIAN_DEPTH_ERROR and visible.sum() > 0.5 * in_view.sum()
                and colour_error[visible].median() < MEDIAN_COLOUR_ERROR)


@pytest.mark.parametrize("seed", GEOMETRY_SEEDS)
def test_geometric_check_rejects_a_pose_off_by_three_degrees(seed):
    clip = data.render_clip(seed, 6, 64, 64)
    true = relative_pose(clip["w2c"], 1)
    angle = math.radians(3.0)
    turn = torch.tensor([[math.cos(angle), 0, math.sin(angle), 0], [0, 1, 0, 0],
                         [-math.sin(angle), 0, math.cos(angle), 0], [0, 0, 0, 1]])
    assert passes_geometric_check(clip, true, 1)
    assert not passes_geometric_check(clip, turn @ true, 1)


def test_depth_is_z_along_the_optical_axis_not_ray_length():
    # A camera looking at a flat wall head-on sees the same z everywhere on it, while the ray
    # length grows towards the corners. Build that view directly: room only, no objects.
    world = data.sample_world(0)
    scene = data.Scene(size=world.scene.size, walls=world.scene.walls, floor=world.scene.floor,
                       ceiling=world.scene.ceiling, objects=[])
    c2w = np.eye(4)[None]  # at the room centre, looking along +z at the wall z = D/2
    K = torch.tensor([[8.0, 0, 8], [0, 8.0, 8], [0, 0, 1]])  # 90 degree field of view, 16x16
    _, depth = data.render(scene, c2w, K, 16, 16)
    wall_distance = scene.size[2] / 2
    # The central pixels see the wall (the ceiling and floor take the top and bottom rows).
    centre = depth[0, 6:10, 6:10]
    assert torch.allclose(centre, torch.full_like(centre, wall_distance), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Camera paths


def camera_centres(seed, num_frames):
    world = data.sample_world(seed)
    c2w = world.path.c2w(data.frame_times(num_frames))
    return world.scene, c2w[:, :3, 3]


def test_camera_stays_inside_the_room_over_many_seeds():
    margin = 0.2  # metres: a camera is not a point
    for seed in range(200):
        scene, centres = camera_centres(seed, 4)
        assert np.all(np.abs(centres) < scene.size / 2 - margin), seed


def test_camera_never_enters_an_object_over_many_seeds():
    margin = 0.15  # each object is inflated by this much
    for seed in range(200):
        scene, centres = camera_centres(seed, 4)
        for obj in scene.objects:
            offset = centres - obj.centre
            if obj.kind == "box":
                c, s = math.cos(obj.yaw), math.sin(obj.yaw)
                # Into the box frame: the box's x axis is (cos, 0, -sin), its z axis (sin, 0, cos).
                local_x = offset[:, 0] * c - offset[:, 2] * s
                local_z = offset[:, 0] * s + offset[:, 2] * c
                local = np.stack([local_x, offset[:, 1], local_z], 1)
                inside = np.all(np.abs(local) < obj.half_size + margin, axis=1)
            elif obj.kind == "ball":
                inside = np.linalg.norm(offset, axis=1) < obj.half_size[0] + margin
            else:
                inside = (np.hypot(offset[:, 0], offset[:, 2]) < obj.half_size[0] + margin) & (
                    np.abs(offset[:, 1]) < obj.half_size[1] + margin)
            assert not inside.any(), (seed, obj.kind)


def test_camera_looks_roughly_horizontally_and_stays_upright():
    for seed in range(50):
        c2w = data.sample_world(seed).path.c2w(data.frame_times(8))
        forward, down = c2w[:, :3, 2], c2w[:, :3, 1]
        assert np.all(np.abs(forward[:, 1]) < math.sin(math.radians(20))), seed  # world y is vertical
        assert np.all(down[:, 1] > math.cos(math.radians(25))), seed  # camera y points down the world's y


def test_camera_paths_are_smooth():
    # No jumps: between consecutive frames of a 33-frame clip the camera moves < 15 cm and turns < 5 degrees.
    for seed in range(50):
        c2w = data.sample_world(seed).path.c2w(data.frame_times(33))
        steps = np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=1)
        relative = np.einsum("fji,fjk->fik", c2w[:-1, :3, :3], c2w[1:, :3, :3])
        angles = np.degrees(np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)))
        assert steps.max() < 0.15 and angles.max() < 5, seed


def test_slerp_between_keyframes_misses_the_true_path():
    # Hand-shake makes the true path leave the interpolated one between keyframes: the paper's case.
    misses = []
    for seed in range(10):
        c2w = torch.tensor(data.sample_world(seed).path.c2w(data.frame_times(9)))
        keyframes = torch.tensor([0, 4, 8])
        filled = geometry.interpolate_trajectory(c2w[keyframes], keyframes, 9, mode="slerp")
        misses.append((filled[:, :3, 3] - c2w[:, :3, 3]).norm(dim=-1).max().item())
    assert np.median(misses) > 0.005  # metres: half a centimetre or more off in between


# ----------------------------------------------------------------------------------------------
# Dataset splits


def test_no_clip_of_one_split_is_a_clip_of_another():
    splits = [data.SyntheticClips(name, num_frames=2, height=8, width=8) for name in ("train", "val", "test")]
    seeds = [range(split.first_seed, split.first_seed + len(split)) for split in splits]  # item i: first_seed + i
    for a, b in itertools.combinations(seeds, 2):
        assert max(a.start, b.start) >= min(a.stop, b.stop)  # no seed in two splits
    last_and_first = [(split[len(split) - 1]["video"], split[0]["video"]) for split in splits]
    for (_, first_a), (last_b, first_b) in itertools.permutations(last_and_first, 2):
        assert not torch.equal(first_a, first_b) and not torch.equal(first_a, last_b)


def test_synthetic_clips_item_is_the_render_clip_of_its_split_seed():
    dataset = data.SyntheticClips("val", num_frames=2, height=8, width=8, length=3)
    assert len(dataset) == 3
    item, expected = dataset[2], data.render_clip(data.SPLIT_SEEDS["val"][0] + 2, 2, 8, 8)
    assert torch.equal(item["video"], expected["video"]) and item["prompt"] == expected["prompt"]


def test_synthetic_clips_batches_with_the_default_collate():
    loader = torch.utils.data.DataLoader(data.SyntheticClips("train", 2, 8, 8, length=4), batch_size=2)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 2, 3, 8, 8) and len(batch["prompt"]) == 2


def test_synthetic_clips_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        data.SyntheticClips("training")
