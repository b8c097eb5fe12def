"""sample.py end to end (subprocess, as a user runs it): outputs, and a one-line error with exit code 2 for
every malformed input."""
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import camgeo
import conditioning
import data
import re10k
import sample
import train
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = camgeo.PRESETS["smoke"]
F, S = SMOKE.num_frames, SMOKE.image_size
QUARTER_TURN_Y = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A smoke checkpoint, a reference image and a valid poses file."""
    folder = tmp_path_factory.mktemp("sample")
    args = training.parse_args(["--preset", "smoke", "--method", "sparse", "--steps", "2", "--out", str(folder / "run"),
                             "--num-workers", "0", "--num-clips", "4"])
    train.train(args)
    clip = data.render_clip(7, F, S, S)
    frame = (clip["video"][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(frame).save(folder / "ref.png")
    (folder / "poses.json").write_text(json.dumps(valid_spec()))
    return folder


def valid_spec():
    return {"num_frames": F, "convention": "w2c", "prompt": "a red room",
            "keyframes": [{"frame": 0, "rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "translation": [0, 0, 0],
                           "intrinsics": {"fx": 0.8, "fy": 0.8, "cx": 0.5, "cy": 0.5}},
                          {"frame": F - 1, "rotation": [0, 0.2588190, 0, 0.9659258], "translation": [0, 0, -1]}]}


def run_sample(workdir, image, poses, *extra, ckpt=None, in_process=False):
    """Run sample.py as a user does (a subprocess), or in this process through the same sample.cli, which is
    much faster (no interpreter and torch start-up) for the long list of malformed inputs."""
    ckpt = ckpt or str(workdir / "run" / training.CKPT_NAME)
    argv = [str(image), str(poses), "--ckpt", ckpt, "--steps", "2", "--out", str(workdir / "samples"), *extra]
    if in_process:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            returncode = sample.cli(argv)
        return subprocess.CompletedProcess(argv, returncode, "", stderr.getvalue())
    command = [sys.executable, os.path.join(ROOT, "sample.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def write_poses(workdir, name, spec=None, text=None):
    path = workdir / name
    path.write_text(text if text is not None else json.dumps(spec))
    return path


def test_sample_writes_gif_frame_pngs_and_strip(workdir):
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json")
    assert result.returncode == 0, result.stderr
    out = workdir / "samples"
    frames = sorted(p for p in os.listdir(out) if p.startswith("frame_"))
    assert len(frames) == F
    assert Image.open(out / frames[0]).size == (S, S)
    gif = Image.open(out / "video.gif")  # F frames of playback (Pillow merges identical neighbours, summing time)
    durations = []
    for index in range(gif.n_frames):
        gif.seek(index)
        durations.append(gif.info["duration"])
    assert sum(durations) == F * sample.GIF_FRAME_MS
    assert Image.open(out / "strip.png").size == (F * S * 4, S * 4)  # default --upscale 4


def test_sample_accepts_a_realestate10k_camera_file(workdir):
    re10k.write_re10k_clip(data.render_clip(3, F + 2, S, S), str(workdir / "re10k"), "clip")
    result = run_sample(workdir, workdir / "ref.png", workdir / "re10k" / "clip.txt", "--keyframes", "0.5",
                        in_process=True)
    assert result.returncode == 0, result.stderr
    assert "evenly spaced" in result.stderr  # F + 2 cameras in the file, F used


MALFORMED_POSES = {
    "truncated": (None, '{"num_frames": 4, "convention": "w2c", "keyframes": [{"frame": 0,', ["JSON"]),
    "not_json": (None, "hello, I am not JSON", ["JSON"]),
    "empty_file": (None, "", ["JSON"]),
    "top_level_list": (None, "[1, 2, 3]", ["object"]),
    "missing_keyframes": ({"num_frames": F, "convention": "w2c"}, None, ["missing", "keyframes"]),
    "missing_translation": ("del keyframes[1].translation", None, ["keyframes[1]", "translation"]),
    "bad_convention": ("convention=xyz", None, ["convention"]),
    "frame_out_of_range": ("keyframes[1].frame=99", None, ["frame", "99"]),
    "negative_frame": ("keyframes[1].frame=-1", None, ["frame"]),
    "duplicate_frames": ("keyframes[1].frame=0", None, ["frame 0", "more than once"]),
    "no_frame_zero": ("keyframes[0].frame=1", None, ["frame 0"]),
    "not_a_rotation": ("keyframes[0].rotation=scaled", None, ["not a rotation"]),
    "reflection": ("keyframes[0].rotation=reflection", None, ["not a rotation", "det"]),
    "nan_translation": ("keyframes[1].translation=nan", None, ["NaN"]),
    "infinite_rotation": ("keyframes[0].rotation=inf", None, ["infinity"]),
    "short_translation": ("keyframes[1].translation=short", None, ["translation", "shape"]),
    "rotation_3x2": ("keyframes[0].rotation=3x2", None, ["rotation", "shape"]),
    "zero_quaternion": ("keyframes[1].rotation=zeroquat", None, ["zero quaternion"]),
    "intrinsics_missing_cy": ("del keyframes[0].intrinsics.cy", None, ["intrinsics", "cy"]),
    "wrong_num_frames": ("num_frames=+1", None, ["num_frames"]),
}


def malformed_spec(edit):
    spec = valid_spec()
    if isinstance(edit, dict):
        return edit
    keyframes = spec["keyframes"]
    values = {"scaled": [[2, 0, 0], [0, 1, 0], [0, 0, 1]], "reflection": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]],
              "nan": [0, float("nan"), 1], "inf": [[float("inf"), 0, 0], [0, 1, 0], [0, 0, 1]],
              "short": [0, 0], "3x2": [[1, 0], [0, 1], [0, 0]], "zeroquat": [0, 0, 0, 0]}
    if edit == "del keyframes[1].translation":
        del keyframes[1]["translation"]
    elif edit == "del keyframes[0].intrinsics.cy":
        del keyframes[0]["intrinsics"]["cy"]
    elif edit == "convention=xyz":
        spec["convention"] = "xyz"
    elif edit == "num_frames=+1":
        spec["num_frames"] = F + 1
        keyframes[1]["frame"] = F
    else:
        target, value = edit.split("=")
        index, key = int(target[10]), target.split(".")[1]
        keyframes[index][key] = values.get(value, int(value) if value.lstrip("-").isdigit() else value)
    return spec


# these also run as a real subprocess, to see that no traceback escapes; the rest go through sample.cli in-process
SUBPROCESS_CASES = ("truncated", "missing_keyframes", "duplicate_frames", "not_a_rotation", "nan_translation")


@pytest.mark.parametrize("case", list(MALFORMED_POSES))
def test_malformed_poses_give_one_line_error_and_exit_code_2(workdir, case):
    edit, text, words = MALFORMED_POSES[case]
    path = write_poses(workdir, f"{case}.json", spec=None if text is not None else malformed_spec(edit), text=text)
    result = run_sample(workdir, workdir / "ref.png", path, in_process=case not in SUBPROCESS_CASES)
    assert_one_line_error(result, *words)


def test_missing_poses_file_gives_one_line_error(workdir):
    result = run_sample(workdir, workdir / "ref.png", workdir / "nope.json", in_process=True)
    assert_one_line_error(result, "not found")


def test_malformed_realestate10k_file_gives_one_line_error(workdir):
    path = workdir / "bad.txt"
    path.write_text("https://example.com\n0 0.8 0.8 0.5 0.5 0 0 1 0 0\n")
    assert_one_line_error(run_sample(workdir, workdir / "ref.png", path, in_process=True), "RealEstate10K")


def test_missing_image_gives_one_line_error(workdir):
    assert_one_line_error(run_sample(workdir, workdir / "missing.png", workdir / "poses.json"), "image not found")


def test_unreadable_image_gives_one_line_error(workdir):
    (workdir / "fake.png").write_text("this is not a png")
    result = run_sample(workdir, workdir / "fake.png", workdir / "poses.json", in_process=True)
    assert_one_line_error(result, "cannot read image")


def test_missing_checkpoint_gives_one_line_error(workdir):
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json", ckpt=str(workdir / "none.safetensors"))
    assert_one_line_error(result, "checkpoint not found")


def test_checkpoint_with_missing_and_unexpected_keys_names_them(workdir):
    model = camgeo.CamGeo(SMOKE)
    tensors = {"ema." + k: v.contiguous() for k, v in model.state_dict().items() if k != "final_layer.linear.bias"}
    tensors["ema.extra.weight"] = torch.zeros(2)
    path = str(workdir / "broken.safetensors")
    save_file(tensors, path, metadata={"config": camgeo.config_to_json(SMOKE), "method": "sparse", "step": "0"})
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json", ckpt=path)
    assert_one_line_error(result, "final_layer.linear.bias", "extra.weight")


def test_checkpoint_with_wrong_shapes_names_them(workdir):
    """E.g. a checkpoint saved before the camera input grew from 7 to 9 channels."""
    model = camgeo.CamGeo(SMOKE)
    tensors = {"ema." + k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["ema.camera_embedder.proj.weight"] = tensors["ema.camera_embedder.proj.weight"][:, :7].contiguous()
    path = str(workdir / "old.safetensors")
    save_file(tensors, path, metadata={"config": camgeo.config_to_json(SMOKE), "method": "sparse", "step": "0"})
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json", ckpt=path, in_process=True)
    assert_one_line_error(result, "camera_embedder.proj.weight", "shapes do not match")


def test_checkpoint_config_from_an_older_version_names_its_fields(workdir):
    """Fields the config lacks or this version does not know are named (not a TypeError from the dataclass)."""
    model = camgeo.CamGeo(SMOKE)
    tensors = {"ema." + k: v.contiguous() for k, v in model.state_dict().items()}
    config = dataclasses.asdict(SMOKE)
    del config["mlp_ratio"]
    config["old_field"] = 1
    path = str(workdir / "older.safetensors")
    save_file(tensors, path, metadata={"config": json.dumps(config), "method": "sparse", "step": "0"})
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json", ckpt=path, in_process=True)
    assert_one_line_error(result, "mlp_ratio", "old_field")


def test_file_that_is_not_a_checkpoint_gives_one_line_error(workdir):
    (workdir / "junk.safetensors").write_bytes(b"\x00" * 64)
    result = run_sample(workdir, workdir / "ref.png", workdir / "poses.json", ckpt=str(workdir / "junk.safetensors"),
                        in_process=True)
    assert_one_line_error(result, "cannot load checkpoint")


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_greyscale_images_of_another_size_are_converted_with_a_note(workdir, mode):
    image = Image.new(mode, (3 * S, 2 * S), color=128 if mode == "L" else (200, 10, 10, 128))
    image.save(workdir / f"img_{mode}.png")
    result = run_sample(workdir, workdir / f"img_{mode}.png", workdir / "poses.json", in_process=mode == "L")
    assert result.returncode == 0, result.stderr
    assert f"converted from {mode} to RGB" in result.stderr and "resized" in result.stderr


def test_sampling_never_imports_the_teacher():
    code = "import sys, sample; print('teacher' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_shipped_student_loads_and_samples_every_example_pose_file(tmp_path):
    """The README's first sample command on a fresh clone: the shipped checkpoint must load with this camgeo.py
    (a change to the model or its output parameterisation must come with a retrained asset) and sample each
    example pose file."""
    ckpt = os.path.join(ROOT, sample.DEFAULT_CKPT)
    _, info = camgeo.load_checkpoint(ckpt)
    assert info["config"] == camgeo.PRESETS["cpu"]
    for name in ("dolly_in", "pan_left", "orbit"):
        out = tmp_path / name
        sample.main([os.path.join(ROOT, "examples", "reference.png"), os.path.join(ROOT, "examples", f"{name}.json"),
                     "--ckpt", ckpt, "--steps", "2", "--out", str(out)])
        assert Image.open(out / "strip.png").size[1] > 0 and (out / "video.gif").exists()


def test_interpolating_checkpoint_fills_missing_poses_with_a_note(capsys):
    """A SLERP checkpoint given poses at frames 0, 2, 5, 7 of a pure pan: every frame gets a pose, frame 1's
    view direction is halfway (in yaw) between frames 0 and 2, and the user is told."""
    with open(os.path.join(ROOT, "examples", "pan_left.json")) as f:
        poses = sample.parse_poses_json(f.read())
    camera = sample.conditioning_for(poses, "slerp", 32)
    assert bool((camera[0, :, conditioning.MASK_CHANNELS] == 1).all())
    ray = camera[0, :, 3:6, 16, 16]  # (F, 3) one pixel's ray in frame 0's coordinates, half a pixel off-centre
    yaw = torch.atan2(ray[:, 0], ray[:, 2])
    yaw = yaw - yaw[0]  # a turn about the y axis adds its angle to every ray's azimuth
    assert abs(yaw[2].item()) > 0.1  # the pan turns
    assert yaw[1].item() == pytest.approx(yaw[2].item() / 2, abs=0.01)
    assert "filled by slerp interpolation" in capsys.readouterr().err
