"""Specification of re10k.py: the RealEstate10K-format reader, writer and dataset."""
import numpy as np
import pytest
import torch

import data
import re10k


def test_re10k_reader_round_trips_the_writers_poses_and_intrinsics(tmp_path):
    clip = data.render_clip(4, 3, 16, 24)
    re10k.write_re10k_clip(clip, tmp_path, "clip")
    cameras = re10k.read_re10k_cameras(tmp_path / "clip.txt")
    assert torch.allclose(cameras["w2c"], clip["w2c"], atol=1e-6)
    fx, fy, cx, cy = cameras["intrinsics_normalised"][0].tolist()
    K = clip["K"]
    assert np.allclose([fx * 24, fy * 16, cx * 24, cy * 16], [K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
    assert cameras["timestamps"].dtype == torch.int64 and (cameras["timestamps"].diff() > 0).all()


HAND_WRITTEN_CAMERAS = """https://www.youtube.com/watch?v=example
1000 0.5 0.8 0.5 0.5 0 0 1 0 0 1.5 0 1 0 -2 0 0 1 0.25
34366 0.5 0.8 0.5 0.5 0 0 0 0 1 0 0 1 0 1 -1 0 0 3
"""


def test_re10k_reader_parses_a_hand_written_file(tmp_path):
    path = tmp_path / "cams.txt"
    path.write_text(HAND_WRITTEN_CAMERAS)
    cameras = re10k.read_re10k_cameras(path)
    assert cameras["url"] == "https://www.youtube.com/watch?v=example"
    assert cameras["timestamps"].tolist() == [1000, 34366]
    assert torch.equal(cameras["intrinsics_normalised"], torch.tensor([[0.5, 0.8, 0.5, 0.5]] * 2))
    first = torch.tensor([[1.0, 0, 0, 1.5], [0, 1, 0, -2], [0, 0, 1, 0.25], [0, 0, 0, 1]])
    second = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 1], [-1, 0, 0, 3], [0, 0, 0, 1]])
    assert torch.equal(cameras["w2c"], torch.stack([first, second]))


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("url\n1000 0.5 0.8 0.5 0.5 0 0 1 0 0 1.5 0 1 0 -2 0 0 1\n", "line 2: expected 19 numbers, got 18"),
    ("url\n1000 0.5 0.8 0.5 0.5 0 0 1 0 0 1.5 0 1 0 -2 0 0 1 0.25\n"
     "2000 0.5 0.8 0.5 half 0 0 1 0 0 1.5 0 1 0 -2 0 0 1 0.25\n", "line 3: not a number"),
    ("url\n1000 0.5 0.8 0.5 0.5 0 0 2 0 0 1.5 0 1 0 -2 0 0 1 0.25\n", "line 2: .* not a rotation"),
    ("url\n", "no camera lines"),
    ("url\n1000 0.5 0.8 0.5 0.5 0 0 1 0 0 nan 0 1 0 -2 0 0 1 0.25\n", "line 2: non-finite"),
])
def test_re10k_reader_rejects_malformed_files_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        re10k.read_re10k_cameras(path)
    assert "bad.txt" in str(error.value)  # names the file


def test_re10k_clips_reads_back_a_written_clip(tmp_path):
    clip = data.render_clip(6, 3, 16, 16)
    re10k.write_re10k_clip(clip, tmp_path, "room")
    item = re10k.RE10KClips(tmp_path, num_frames=3, height=16, width=16)[0]
    assert (item["video"] - clip["video"]).abs().max() <= 0.5 / 255 + 1e-6  # PNG keeps 8 bits
    assert torch.allclose(item["w2c"], clip["w2c"], atol=1e-6)
    assert torch.allclose(item["K"], clip["K"])
    assert item["prompt"] == clip["prompt"]
    assert "depth" not in item  # real data has no depth


def test_re10k_clips_scales_K_with_the_requested_size(tmp_path):
    clip = data.render_clip(6, 2, 32, 32)
    re10k.write_re10k_clip(clip, tmp_path, "room")
    item = re10k.RE10KClips(tmp_path, num_frames=2, height=16, width=8)[0]
    assert item["video"].shape == (2, 3, 16, 8)
    assert torch.allclose(item["K"], torch.diag(torch.tensor([0.25, 0.5, 1.0])) @ clip["K"])


def test_re10k_clips_refuses_a_clip_shorter_than_num_frames(tmp_path):
    re10k.write_re10k_clip(data.render_clip(6, 2, 8, 8), tmp_path, "short")
    with pytest.raises(ValueError, match="has 2 frames"):
        re10k.RE10KClips(tmp_path, num_frames=4, height=8, width=8)[0]
