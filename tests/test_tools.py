"""The maintainer's tools (tools/), each run as a maintainer runs it: python tools/x.py from the repository root."""
import os
import subprocess
import sys

import torch
from safetensors import safe_open

import camgeo
import sample
import teacher
import train
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name, *argv):
    result = subprocess.run([sys.executable, os.path.join("tools", name), *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_export_keeps_only_ema_weights_in_half_precision_and_loads(tmp_path):
    args = training.parse_args(["--preset", "smoke", "--method", "sparse", "--steps", "2", "--out",
                                str(tmp_path / "run"), "--num-workers", "0", "--num-clips", "4"])
    train.train(args)
    checkpoint, destination = os.path.join(args.out, training.CKPT_NAME), tmp_path / "assets" / "student.safetensors"
    run_tool("export.py", checkpoint, destination)
    with safe_open(destination, "pt") as f:
        assert all(k.startswith("ema.") and f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    exported, info = camgeo.load_checkpoint(str(destination))
    original, _ = camgeo.load_checkpoint(checkpoint)
    assert info["step"] == 2
    for a, b in zip(exported.parameters(), original.parameters()):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-2, rtol=1e-3)


def test_examples_tool_rewrites_the_shipped_examples_exactly_and_they_parse(tmp_path):
    run_tool("examples.py", "--out", tmp_path)
    for name in ("reference.png", "dolly_in.json", "pan_left.json", "orbit.json"):
        with open(tmp_path / name, "rb") as new, open(os.path.join(ROOT, "examples", name), "rb") as shipped:
            assert new.read() == shipped.read(), name
    for name in ("dolly_in", "pan_left", "orbit"):
        poses = sample.parse_poses_json((tmp_path / f"{name}.json").read_text())
        assert poses["keyframe_mask"].tolist() == [1, 0, 1, 0, 0, 1, 0, 1] and poses["num_frames"] == 8


def pull_rows(tmp_path, *argv):
    """tools/teacher_pull.py through a small teacher with random weights (plumbing, not knowledge) on 2 clips of
    4 frames -> the rows of its table, split into cells."""
    path = tmp_path / "teacher.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        teacher.save_teacher(teacher.VGGT(teacher.SMALL_TEACHER), str(path))
    table = run_tool("teacher_pull.py", path, "--clips", 2, "--frames", 4, *argv)
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_teacher_pull_gives_frame_0_nothing_when_the_teacher_reads_the_reference_there(tmp_path):
    rows = pull_rows(tmp_path)
    assert {(row[1], row[2]) for row in rows} == {(frame0, term) for frame0 in ("predicted", "reference")
                                                  for term in ("L_traj", "L_geo depth", "L_geo smoothness")}
    for frame0, term, *pulls in (row[1:] for row in rows):
        assert len(pulls) == 4 and all(float(p) >= 0 for p in pulls)
        assert (float(pulls[0]) == 0) == (frame0 == "reference")  # the reference is an input, never pulled


def test_teacher_pull_is_measured_at_the_low_pass_asked_for(tmp_path):
    pulls = {sigma: {(row[1], row[2]): [float(p) for p in row[3:]] for row in pull_rows(tmp_path, "--gradient-sigma",
                                                                                        sigma)}
             for sigma in (0, 3)}
    # a Gaussian low-pass removes energy from the gradient, so every frame's pull is smaller with it
    assert all(low < whole for low, whole in zip(pulls[3][("predicted", "L_traj")], pulls[0][("predicted", "L_traj")]))


def test_march_bounds_scores_the_true_scale_above_the_warp_and_above_a_wrong_scale():
    """tools/march_bounds.py: marching the reference through the true depth beats the rotation-only warp, and a
    scale 20% off in either direction scores below the true one (the tool's claim that the unit decides)."""
    rows = {}
    for line in run_tool("march_bounds.py", "--clips", 3, "--draws", 1, "--scale-clips", 60).splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = float(cells[1])
    true_scale = rows["marched through the true depth"]
    assert true_scale > rows["rotation-only warp"] + 3
    assert true_scale > rows["its scale x 0.8"] and true_scale > rows["its scale x 1.25"]
    assert len(rows) == 9  # warp, true depth and its four variants, the kind's median, drawn, deciles


def test_march_bounds_estimate_adds_each_copy_s_camera_and_leaves_the_copies_alone():
    """tools/march_bounds.py --estimate: every row also carries the camera path the study's estimator reads from its
    video (CI's quick estimator settings; on one or two clips the errors themselves say little), and the co-visible
    columns are the same numbers as without it."""
    argv = ("march_bounds.py", "--clips", 1, "--draws", 1, "--scale-clips", 60)
    estimated, plain = run_tool(*argv, "--estimate", "--preset", "smoke").splitlines(), run_tool(*argv).splitlines()
    assert estimated[0].rstrip().endswith("| RotErr | TransErr |") and "RotErr" not in plain[0]
    assert len(estimated) == len(plain) == 2 + 9
    for with_camera, without in zip(estimated[2:], plain[2:]):
        cells = [cell.strip() for cell in with_camera.strip("|").split("|")]
        assert len(cells) == 1 + 1 + 7 + 2  # name, co-visible, frames 1..7, RotErr, TransErr
        assert with_camera.startswith(without.rstrip().rstrip("|"))
        assert all(0 <= float(error) < 100 for error in cells[-2:])
