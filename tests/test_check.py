"""check.py: one checkpoint's samples scored on every pixel and on the pixels the reference also sees, next to the
ceiling, a still camera and the rotation-only warp, and paired with another checkpoint's (smoke_study: conftest.py)."""
import os

import pytest
import torch

import camgeo
import conditioning
import check
import geometry
import sample
from evaluation import held_out_clips


@pytest.fixture(scope="module")
def ckpt(smoke_study):
    return os.path.join(smoke_study, "ckpt", "sparse_0.5_0", "ckpt.safetensors")


def table_rows(lines, first_cell):
    """The rows of the Markdown table whose header starts with `first_cell`: {row name: [cells]}."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("| ").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_check_reports_own_and_wrong_cameras_next_to_repeating_the_reference(ckpt, tmp_path, capsys):
    check.main([ckpt, "--clips", "3", "--sample-steps", "2", "--out", str(tmp_path)])
    assert os.path.isfile(tmp_path / "check_frames.png") and os.path.isfile(tmp_path / "check.md")
    rows = table_rows(capsys.readouterr().out.splitlines(), "video | PSNR")
    assert list(rows) == ["repeat the reference frame",
                          "reference resampled along its cameras' rays (the warp it is given)",
                          "samples, own cameras", "samples, another clip's cameras"]
    info = camgeo.load_checkpoint(ckpt)[1]
    truth = torch.stack([c.video for c in held_out_clips(3, info["config"].num_frames, info["config"].image_size)])
    repeat = geometry.psnr(truth[:, :1].expand_as(truth)[:, 1:], truth[:, 1:]).item()
    assert float(rows["repeat the reference frame"][0]) == pytest.approx(repeat, abs=0.006)  # independently


def test_covisible_table_puts_the_ceiling_on_top_and_the_still_camera_where_the_masks_say(ckpt, capsys):
    text = check.check_camera_following(ckpt, 3, sample_steps=2)
    rows = table_rows(text.splitlines(), "video | co-visible")
    assert list(rows) == ["reference reprojected through the true depth (ceiling)",
                          "reference repeated (a still camera)",
                          "reference resampled along every pose's rays (rotation-only warp)", "samples, own cameras"]
    info = camgeo.load_checkpoint(ckpt)[1]
    num_frames = info["config"].num_frames
    assert all(len(cells) == num_frames + 1 for cells in rows.values())  # mean, frames 1..F-1, full frame
    given = conditioning.keyframe_indices(num_frames, 0.5).tolist()  # the smoke study's Sparse run: 1/2
    assert all((f"| frame {f} (key) |" in text) == (f in given) for f in range(1, num_frames))
    ceiling, still = (rows[name] for name in list(rows)[:2])
    assert all(float(c) > float(s) for c, s in zip(ceiling[:-1], still[:-1]))
    # the still camera by hand: per clip and frame, the MSE over the co-visible pixels only
    clips = held_out_clips(3, num_frames, info["config"].image_size)
    per_frame = torch.tensor([[10 * torch.log10(1 / ((clip.video[0] - clip.video[f]) ** 2)
                                                .sum(0)[clip.covisible[f]].div(3).mean()).item()
                               for f in range(1, num_frames)] for clip in clips])
    assert float(still[0]) == pytest.approx(per_frame.mean().item(), abs=0.006)
    assert [float(x) for x in still[1:-1]] == pytest.approx(per_frame.mean(0).tolist(), abs=0.006)


def test_check_against_a_baseline_pairs_the_same_clips_and_noise(ckpt, tmp_path, capsys):
    check.main([ckpt, "--against", ckpt, "--clips", "3", "--sample-steps", "2", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if " − " in line)
    assert lines[header].split(" | ")[-3:] == ["PSNR", "SSIM", "PSNR_covisible |"]
    # a checkpoint against itself: the same noise on the same clips, so every clip's difference is exactly zero
    assert [cell.strip(" |") for cell in lines[header + 2].split(" | ")[3:]] == ["+0.000 [+0.000, +0.000]"] * 3
    # checked minus baseline: the ground truth itself in place of the checked samples scores above it on every clip
    config = camgeo.load_checkpoint(ckpt)[1]["config"]
    clips = held_out_clips(3, config.num_frames, config.image_size)
    truth = torch.stack([clip.video for clip in clips])
    lines = check.check_against(truth, "truth", ckpt, clips, {"frames 1..3": [1, 2, 3], "frame 2": [2]}, 2, 1.0,
                                "cpu")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["frame 2", "frames 1..3"]  # one row per group of frames
    for line in lines[2:]:
        assert all(float(cell.split("[")[1].split(",")[0]) > 0 for cell in line.strip(" |").split(" | ")[3:])


def test_check_with_estimate_scores_the_camera_path_of_the_samples(ckpt, tmp_path, capsys):
    check.main([ckpt, "--clips", "2", "--sample-steps", "2", "--estimate", "--out", str(tmp_path)])
    rows = table_rows(capsys.readouterr().out.splitlines(), "video | RotErr")
    still = float(rows["repeat the reference frame"][0].split(" ")[0])
    assert still > 0 and "samples, own cameras" in rows  # a still camera misses the requested motion
    assert "reference reprojected through the true depth (ceiling)" in rows


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        check.main([str(tmp_path / "nothing.safetensors")])
    assert "no checkpoint at" in capsys.readouterr().err


def test_check_samples_as_sample_py_does_by_default(ckpt):
    ours, theirs = check.parse_args([ckpt]), sample.parse_args(["image.png", "poses.json"])
    assert (ours.cfg, ours.sample_steps) == (theirs.cfg, theirs.steps)
