"""The maintainer's tools (tools/), each run as a maintainer runs it: python tools/x.py from the repository root."""
import os
import subprocess
import sys

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name, *argv):
    result = subprocess.run([sys.executable, os.path.join("tools", name), *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_examples_tool_rewrites_the_shipped_examples_exactly_and_they_parse(tmp_path):
    run_tool("examples.py", "--out", tmp_path)
    for name in ("reference.png", "dolly_in.json", "pan_left.json", "orbit.json"):
        with open(tmp_path / name, "rb") as new, open(os.path.join(ROOT, "examples", name), "rb") as shipped:
            assert new.read() == shipped.read(), name
    for name in ("dolly_in", "pan_left", "orbit"):
        poses = sample.parse_poses_json((tmp_path / f"{name}.json").read_text())
        assert poses["keyframe_mask"].tolist() == [1, 0, 1, 0, 0, 1, 0, 1] and poses["num_frames"] == 8
