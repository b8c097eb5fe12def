"""Rewrite examples/: the first frame of a held-out synthetic clip as the reference image, and three hand-made
camera paths as poses.json files (dolly_in, pan_left, orbit) with poses at the keyframes train.py gives at
--sparse 0.5, the paths eased as the synthetic world's are.

    python tools/examples.py                  # -> examples/reference.png, dolly_in.json, pan_left.json, orbit.json
    python tools/examples.py --out /tmp/examples
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules, one up

import conditioning  # noqa: E402
import data  # noqa: E402
import geometry  # noqa: E402

TURN_DEG = 35.0  # the pan's and the orbit's turn: well inside what the training paths do, clearly visible
DOLLY_M = 1.0  # the dolly's move forward, in metres
ORBIT_RADIUS_M = 1.5  # the orbit circles a point this far in front of the first camera


def c2w(rotation, centre):
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rotation, centre
    return pose


def write_path(folder, name, c2w_at, num_frames, keyframe_ratio, fov_deg, prompt):
    """name.json: the poses c2w_at(eased time) at the keyframes, one keyframe a line (easy to edit); the orbit's
    rotations as XYZW quaternions, to show the other format sample.py reads."""
    keyframes = []
    for frame in conditioning.keyframe_indices(num_frames, keyframe_ratio).tolist():
        w2c = np.linalg.inv(c2w_at(data.ease(frame / (num_frames - 1))))
        entry = {"frame": frame, "rotation": np.round(w2c[:3, :3], 6).tolist(),
                 "translation": np.round(w2c[:3, 3], 6).tolist()}
        if name == "orbit":
            entry["rotation"] = np.round(geometry.mat_to_quat(torch.tensor(w2c[:3, :3])).numpy(), 6).tolist()
        if frame == 0:
            entry["intrinsics"] = {"fov_deg": round(fov_deg, 3)}
        keyframes.append(entry)
    lines = ",\n  ".join(json.dumps(entry) for entry in keyframes)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        f.write(f'{{"num_frames": {num_frames}, "convention": "w2c", "prompt": {json.dumps(prompt)},\n'
                f' "keyframes": [\n  {lines}]}}\n')


def make_examples(folder, num_frames=8, size=64, keyframe_ratio=0.5, seed=None):
    seed = data.SPLIT_SEEDS["test"][0] + 5 if seed is None else seed  # a room corner and objects in view
    clip = data.render_clip(seed, num_frames, size, size)
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(data.frames_to_uint8(clip["video"][:1])[0]).save(os.path.join(folder, "reference.png"))
    fov_deg = math.degrees(2 * math.atan((size / 2) / float(clip["K"][0, 0])))
    turn = math.radians(TURN_DEG)
    paths = {  # camera-to-world pose at eased time s; a negative yaw looks left
        "dolly_in": lambda s: c2w(np.eye(3), [0, 0, DOLLY_M * s]),
        "pan_left": lambda s: c2w(data.yaw_rotation(-turn * s), [0, 0, 0]),
        "orbit": lambda s: c2w(data.yaw_rotation(turn * s), [-ORBIT_RADIUS_M * math.sin(turn * s), 0,
                                                             ORBIT_RADIUS_M - ORBIT_RADIUS_M * math.cos(turn * s)]),
    }
    for name, c2w_at in paths.items():
        write_path(folder, name, c2w_at, num_frames, keyframe_ratio, fov_deg, clip["prompt"])
    print(f"wrote {folder}/reference.png (test clip seed {seed}) and {', '.join(n + '.json' for n in paths)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples", help="the folder to write")
    make_examples(parser.parse_args().out)
