"""The training script (train.py): smoke runs per method, checkpoints, keyframes, per-method camera inputs."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import camgeo
import data
import geometry
import train

SMOKE = camgeo.PRESETS["smoke"]


def smoke_run(tmp_path, method, steps=3, extra=()):
    out = str(tmp_path / method)
    args = train.parse_args(["--preset", "smoke", "--method", method, "--steps", str(steps), "--out", out,
                             "--num-workers", "0", "--num-clips", "4", *extra])
    train.train(args)
    return out


def batch(num_frames=8, size=16, seeds=(0, 1)):
    return train.collate([data.render_clip(seed, num_frames, size, size) for seed in seeds])


@pytest.mark.parametrize("method", train.METHODS)
def test_smoke_run_writes_loadable_checkpoint_and_log(tmp_path, method):
    out = smoke_run(tmp_path, method)
    model, info = camgeo.load_checkpoint(os.path.join(out, train.CKPT_NAME))
    assert info["method"] == method and info["step"] == 3 and info["config"] == SMOKE
    assert isinstance(model, camgeo.CamGeo)
    optimizer_state = torch.load(os.path.join(out, train.OPTIMIZER_NAME), weights_only=True)
    assert len(optimizer_state["state"]) == len(list(model.parameters()))
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
    assert sorted(os.listdir(out)) == sorted([train.CKPT_NAME, train.OPTIMIZER_NAME, train.LOG_NAME])


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
    _, keyframe_mask, w2c_used = train.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16, width=16)
    keyframes = keyframe_mask[0].bool()
    assert torch.allclose(w2c_used[:, keyframes], clips["w2c"][:, keyframes], atol=1e-5)
    assert not torch.allclose(w2c_used[:, ~keyframes], clips["w2c"][:, ~keyframes], atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolated_conditioning_equals_sparse_conditioning_at_keyframes_and_is_all_given(method):
    clips = batch()
    sparse, mask, _ = train.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 3, height=16, width=16)
    filled, _, _ = train.camera_inputs(clips["w2c"], clips["K"], method, 1 / 3, height=16, width=16)
    keyframes = mask[0].bool()
    assert torch.allclose(filled[:, keyframes], sparse[:, keyframes], atol=1e-4)
    assert torch.all(filled[:, :, 6] == 1)  # interpolated poses are given as if known


def test_sparse_conditioning_is_zero_away_from_keyframes():
    clips = batch()
    camera, mask, _ = train.camera_inputs(clips["w2c"], clips["K"], "sparse", 1 / 2, height=16, width=16)
    assert torch.count_nonzero(camera[:, ~mask[0].bool()]) == 0
    assert torch.all(camera[:, mask[0].bool(), 6] == 1)


def test_full_conditioning_uses_every_ground_truth_pose():
    clips = batch()
    camera, mask, w2c_used = train.camera_inputs(clips["w2c"], clips["K"], "full", 1 / 4, height=16, width=16)
    assert torch.all(mask == 1) and torch.equal(w2c_used, clips["w2c"])
    c2w = geometry.normalize_translation(geometry.relative_to_first(geometry.invert_pose(clips["w2c"])))
    K = camgeo.intrinsics_vector(clips["K"])[:, None].expand(-1, 8, -1)
    assert torch.allclose(camera[:, :, :6], geometry.plucker_embedding(K, c2w, 16, 16), atol=1e-4)


def test_parse_args_defaults_output_folder_to_method():
    assert train.parse_args(["--method", "slerp"]).out == os.path.join("out", "slerp")


def test_parse_args_rejects_ratio_outside_zero_one():
    with pytest.raises(SystemExit):
        train.parse_args(["--sparse", "1.5"])


def test_smoke_run_trains_on_a_realestate10k_folder(tmp_path):
    for seed in range(3):
        data.write_re10k_clip(data.render_clip(seed, SMOKE.num_frames, 24, 24), str(tmp_path / "re10k"), f"c{seed}")
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
