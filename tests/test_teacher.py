"""teacher.py: the plain-torch VGGT computes what the official code computes, and loads its checkpoints.

The reference vectors in tests/fixtures/vggt were produced by running the official implementation
(facebookresearch/vggt): two small models with weights under the official key names, their inputs,
every output and the gradient of every output with respect to the images. Matching them to float32
rounding means the released VGGT-1B weights run here, and CamGeo's losses reach the student through
the same gradient the official model gives.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import teacher
import train_teacher
from teacher import VGGT, VGGTConfig, freeze, load_vggt, save_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "fixtures", "vggt")
CASES = ("tiny_conv", "tiny_dino")
OUTPUTS = ("last_tokens", "pose_enc", "pose_enc_list", "depth", "depth_conf", "world_points", "world_points_conf")
GRADIENT_OUTPUTS = ("pose_enc_list", "depth", "depth_conf", "world_points", "world_points_conf")
TOLERANCE = 1e-5  # float32 rounding; a larger difference is a different computation
GRADIENT_TOLERANCE = 1e-5  # relative to the largest entry of the official gradient

# A very small random model for the behaviour tests (fast on CPU).
TINY = VGGTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_register_tokens=2,
                  patch_embed="conv", dino_depth=0, dino_num_heads=0, camera_trunk_depth=1, camera_num_heads=2,
                  dpt_features=16, dpt_out_channels=[8, 16, 32, 32], dpt_intermediate_layer_idx=[0, 1, 1, 1])


def reference_path(name):
    path = os.path.join(REFERENCE, name)
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing: the VGGT reference vectors are needed to test teacher.py")
    return path


def case_config(case):
    with open(reference_path(f"{case}.json")) as f:
        settings = json.load(f)
    for key in ("frames", "height", "width"):
        settings.pop(key)
    return VGGTConfig(**settings)


_RUNS = {}


def run_case(case):
    """(our outputs, the official outputs) for a reference case, computed once per session."""
    if case not in _RUNS:
        model = load_vggt(reference_path(f"{case}.weights.safetensors"), case_config(case)).eval()
        reference = load_file(reference_path(f"{case}.io.safetensors"))
        with torch.no_grad():
            ours = model(reference["images"])
            ours["pose_enc_list"] = torch.stack(ours["pose_enc_list"])
            ours["last_tokens"] = model.aggregator(reference["images"])[0][-1]
        _RUNS[case] = (ours, reference)
    return _RUNS[case]


def reference_state(case="tiny_conv"):
    return load_file(reference_path(f"{case}.weights.safetensors"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("output", OUTPUTS)
def test_output_matches_official_vggt(case, output):
    ours, reference = run_case(case)
    assert ours[output].shape == reference[output].shape
    difference = (ours[output] - reference[output]).abs().max().item()
    assert difference <= TOLERANCE, f"{case} {output}: max abs difference {difference:.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("output", GRADIENT_OUTPUTS)
def test_input_gradient_matches_official_vggt(case, output):
    """d sum(cotangent * output) / d images, eval mode, as the official code computes it."""
    model = freeze(load_vggt(reference_path(f"{case}.weights.safetensors"), case_config(case)))
    images = load_file(reference_path(f"{case}.io.safetensors"))["images"].clone().requires_grad_(True)
    official = load_file(reference_path(f"{case}.grad.safetensors"))
    out = model(images)
    value = torch.stack(out[output]) if output == "pose_enc_list" else out[output]
    cotangent = official[f"cotangent.{output}"]
    assert value.shape == cotangent.shape
    (gradient,) = torch.autograd.grad((value * cotangent).sum(), images)
    expected = official[f"grad_images.{output}"]
    relative = ((gradient - expected).abs().max() / expected.abs().max()).item()
    assert relative <= GRADIENT_TOLERANCE, f"{case} {output}: gradient differs by {relative:.3g} of its largest entry"


def test_vggt_1b_preset_has_the_released_state_dict_layout():
    with open(reference_path("vggt1b_state_dict.json")) as f:
        released = {k: tuple(v) for k, v in json.load(f).items() if not k.startswith("track_head.")}
    with torch.device("meta"):
        model = VGGT(teacher.VGGT_1B)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(released)
    assert ours == released


def test_checkpoint_with_track_head_loads_and_skips_it(tmp_path, capsys):
    state = reference_state()
    state["track_head.tracker.dummy.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "with_track.safetensors")
    save_file(state, path)
    model = load_vggt(path, case_config("tiny_conv"))
    assert "track_head" in capsys.readouterr().out
    assert torch.equal(model.state_dict()["aggregator.camera_token"], state["aggregator.camera_token"])


def test_missing_key_is_named(tmp_path):
    state = reference_state()
    del state["camera_head.embed_pose.weight"]
    path = str(tmp_path / "missing.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"missing.*camera_head\.embed_pose\.weight"):
        load_vggt(path, case_config("tiny_conv"))


def test_unexpected_key_is_named(tmp_path):
    state = reference_state()
    state["depth_head.extra_layer.weight"] = torch.zeros(2)
    path = str(tmp_path / "unexpected.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"unexpected.*depth_head\.extra_layer\.weight"):
        load_vggt(path, case_config("tiny_conv"))


def test_shape_mismatch_is_named(tmp_path):
    state = reference_state()
    state["aggregator.register_token"] = torch.zeros(1, 2, 5, 64)
    path = str(tmp_path / "mismatch.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"shape.*aggregator\.register_token"):
        load_vggt(path, case_config("tiny_conv"))


def test_wrong_config_for_checkpoint_is_a_value_error():
    with pytest.raises(ValueError, match="missing|unexpected|shape"):
        load_vggt(reference_path("tiny_conv.weights.safetensors"), case_config("tiny_dino"))


def test_truncated_safetensors_file_is_a_value_error_naming_it(tmp_path):
    with open(reference_path("tiny_conv.weights.safetensors"), "rb") as f:
        content = f.read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_vggt(str(path), case_config("tiny_conv"))


def test_truncated_pt_file_is_a_value_error_naming_it(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(reference_state(), full)
    path = tmp_path / "truncated.pt"
    path.write_bytes(full.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_vggt(str(path), case_config("tiny_conv"))


@pytest.mark.parametrize("name", ["random.safetensors", "notes.pt"])
def test_non_checkpoint_file_is_a_value_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096) if name.endswith("safetensors") else b"just some text\n")
    with pytest.raises(ValueError, match=name):
        load_vggt(str(path), case_config("tiny_conv"))


def test_pt_checkpoint_with_model_key_loads_like_safetensors(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": reference_state(), "step": 3}, path)
    model = load_vggt(str(path), case_config("tiny_conv")).eval()
    _, reference = run_case("tiny_conv")
    with torch.no_grad():
        depth = model(reference["images"])["depth"]
    assert (depth - reference["depth"]).abs().max().item() <= TOLERANCE


def test_saved_teacher_reloads_with_its_config_from_metadata(tmp_path):
    torch.manual_seed(0)
    model = VGGT(TINY).eval()
    path = str(tmp_path / "tiny.safetensors")
    save_teacher(model, path)
    loaded = load_vggt(path).eval()  # no config given: it comes from the file
    assert loaded.config == TINY
    images = torch.rand(1, 3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images)["pose_enc"], loaded(images)["pose_enc"])


def test_half_precision_file_loads_as_float32(tmp_path):
    model = VGGT(TINY)
    path = str(tmp_path / "half.safetensors")
    save_teacher(model, path, dtype=torch.float16)
    loaded = load_vggt(path)
    weight = "aggregator.frame_blocks.0.attn.qkv.weight"
    assert loaded.state_dict()[weight].dtype == torch.float32
    assert torch.equal(loaded.state_dict()[weight], model.state_dict()[weight].half().float())


def test_invalid_config_is_a_value_error():
    with pytest.raises(ValueError, match="patch_embed"):
        VGGTConfig(patch_embed="vit")
    with pytest.raises(ValueError, match="dpt_intermediate_layer_idx"):
        VGGTConfig(depth=4)  # the VGGT-1B taps [4, 11, 17, 23] do not exist in 4 layers


def test_outputs_have_the_official_shapes():
    model = VGGT(TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3, 16, 20))
    assert out["pose_enc"].shape == (2, 3, 9)
    assert len(out["pose_enc_list"]) == TINY.camera_iterations
    assert out["depth"].shape == (2, 3, 16, 20, 1) and out["depth_conf"].shape == (2, 3, 16, 20)
    assert out["world_points"].shape == (2, 3, 16, 20, 3) and out["world_points_conf"].shape == (2, 3, 16, 20)


def test_without_point_maps_the_other_outputs_are_unchanged():
    model = VGGT(TINY).eval()
    images = torch.rand(2, 3, 3, 16, 20)
    with torch.no_grad():
        full, lean = model(images), model(images, point_maps=False)
    assert "world_points" not in lean and "world_points_conf" not in lean
    for key in ("pose_enc", "depth", "depth_conf"):
        assert torch.equal(full[key], lean[key])


def test_unbatched_frames_give_the_batched_result():
    model = VGGT(TINY).eval()
    frames = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(frames)["depth"], model(frames[None])["depth"])


def test_size_not_a_patch_multiple_is_a_value_error():
    with pytest.raises(ValueError, match="patch size"):
        VGGT(TINY)(torch.rand(1, 2, 3, 16, 18))


def test_first_frame_defines_the_world_so_frame_order_matters():
    torch.manual_seed(0)
    model = VGGT(TINY).eval()
    with torch.no_grad():  # make the first-frame tokens clearly distinct from the others
        model.aggregator.camera_token[:, 0] += 1.0
        frames = torch.rand(1, 3, 3, 16, 16)
        pose = model(frames)["pose_enc"]
        swapped = model(frames[:, [1, 0, 2]])["pose_enc"]
    assert not torch.allclose(pose[:, 0], swapped[:, 1], atol=1e-4)


def test_frozen_teacher_passes_gradient_to_images_only():
    model = freeze(VGGT(TINY))
    images = torch.rand(1, 2, 3, 16, 16, requires_grad=True)
    out = model(images)
    (out["depth"].mean() + out["pose_enc"].square().sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = VGGT(TINY).train()
    checkpointed = VGGT(VGGTConfig(**{**TINY.__dict__, "gradient_checkpointing": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.rand(1, 2, 3, 16, 16)
    for model in (plain, checkpointed):
        model(images)["depth"].mean().backward()
    weight = "aggregator.frame_blocks.0.attn.qkv.weight"
    grads = [dict(m.named_parameters())[weight].grad for m in (plain, checkpointed)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_targets_put_frame_zero_at_identity_with_unit_scene_scale():
    w2c = torch.eye(4).repeat(1, 3, 1, 1)
    w2c[0, 1:, 2, 3] = torch.tensor([-1.0, -2.0])  # camera moves forward 1 and 2 along z
    depth = torch.full((1, 3, 8, 8), 4.0)
    K = torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]])
    pose_enc, depth_n, points, scale = train_teacher.vggt_targets(w2c, K, depth)
    assert torch.allclose(pose_enc[0, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]), atol=1e-6)
    assert torch.allclose(points.norm(dim=-1).mean(), torch.tensor(1.0))
    # Translations and depth are divided by the same scale.
    assert torch.allclose(pose_enc[0, 2, 2] / depth_n[0, 0, 0, 0], torch.tensor(-2.0 / 4.0))
