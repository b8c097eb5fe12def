"""The RealEstate10K format: its camera files, the frame folders we pair with them, and a dataset of such clips.

Real clips come as a camera file per clip (frames are extracted from the videos by the user); the synthetic world
(data.py) writes its clips in the same layout, so the reader, the training script (train.py --data) and sample.py
are tested on folders the project makes. Public API: read_re10k_cameras, write_re10k_clip, RE10KClips.
"""
import os

import numpy as np
import torch
from PIL import Image

import data

# The dataset ships camera files only (frames come from YouTube), one per clip: a URL line, then per frame
#     timestamp fx fy cx cy 0 0 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3
# with fx, cx divided by the image width, fy, cy by the height, and [R | t] the 3x4 w2c row-major.
# The frame layout on disk is ours to choose; we use
#     folder/name.txt            the camera file
#     folder/name/00000.png ...  frame i of the camera file (i counts lines, not timestamps);
#                                .jpg is read too, for frames extracted from the videos
#     folder/name/prompt.txt     optional text prompt

RE10K_NUMBERS_PER_LINE = 19
ROTATION_TOLERANCE = 1e-3  # |R R^T - I| allowed in a file: they are printed to ~6-9 digits
FRAME_EXTENSIONS = (".png", ".jpg")
SYNTHETIC_FPS = 30  # timestamps (microseconds) written for clips that carry none


def read_re10k_cameras(path):
    """Parse a RealEstate10K camera file.

    Returns dict(url str, timestamps (F,) int64, intrinsics_normalised (F, 4) float32 [fx, fy, cx, cy]
    divided by width / height, w2c (F, 4, 4) float32). K_normalised is the same tensor under the
    name sample.py uses. Malformed files raise ValueError naming the file and line.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: empty camera file (expected a URL line, then one line per frame)")
    timestamps, intrinsics, w2c = [], [], []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != RE10K_NUMBERS_PER_LINE:
            raise ValueError(f"{path}, line {line_number}: expected {RE10K_NUMBERS_PER_LINE} numbers, "
                             f"got {len(fields)}")
        try:
            timestamp, values = int(fields[0]), [float(x) for x in fields[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: not a number in {line.strip()!r}") from None
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{path}, line {line_number}: non-finite number in {line.strip()!r}")
        pose = np.eye(4)
        pose[:3, :] = np.array(values[6:]).reshape(3, 4)
        rotation = pose[:3, :3]
        if np.abs(rotation @ rotation.T - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(rotation) < 0:
            raise ValueError(f"{path}, line {line_number}: r11..r33 is not a rotation matrix")
        timestamps.append(timestamp)
        intrinsics.append(values[:4])
        w2c.append(pose)
    if not timestamps:
        raise ValueError(f"{path}: no camera lines after the URL line")
    intrinsics = torch.tensor(intrinsics, dtype=torch.float32)
    return dict(url=lines[0].strip(), timestamps=torch.tensor(timestamps, dtype=torch.int64),
                intrinsics_normalised=intrinsics, K_normalised=intrinsics,
                w2c=torch.tensor(np.stack(w2c), dtype=torch.float32))


def write_re10k_clip(clip, folder, name, url=None):
    """Write a clip dict (data.render_clip's) as folder/name.txt + folder/name/00000.png ... (+ prompt.txt).

    Intrinsics are normalised by the frame size; timestamps are clip["timestamps"] if present, else
    frame i at i / SYNTHETIC_FPS seconds, in microseconds as in RealEstate10K.
    """
    video, w2c, K = clip["video"], clip["w2c"], clip["K"]
    num_frames, _, height, width = video.shape
    timestamps = clip.get("timestamps", [round(i * 1e6 / SYNTHETIC_FPS) for i in range(num_frames)])
    intrinsics = [float(K[0, 0]) / width, float(K[1, 1]) / height, float(K[0, 2]) / width, float(K[1, 2]) / height]
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    lines = [url or f"camgeo-synthetic://{name}"]
    for i in range(num_frames):
        pose = [float(x) for x in w2c[i, :3, :].reshape(-1)]
        # %.9g round-trips float32 exactly.
        lines.append(" ".join([str(int(timestamps[i]))] + [f"{x:.9g}" for x in intrinsics + [0.0, 0.0] + pose]))
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    frames = data.frames_to_uint8(video)  # (F, H, W, 3)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, name, f"{i:05d}.png"))
    if clip.get("prompt"):
        with open(os.path.join(folder, name, "prompt.txt"), "w") as f:
            f.write(clip["prompt"] + "\n")


class RE10KClips(torch.utils.data.Dataset):
    """RealEstate10K-format clips in a folder (layout above), as data.render_clip-style dicts.

    Item = the first num_frames frames (every frame_stride-th) of one clip, resized to height x
    width, K scaled to that size from the normalised intrinsics of the first frame. There is no
    depth: the "depth" key is absent. prompt is name/prompt.txt if present, else "".
    """

    def __init__(self, folder, num_frames=8, height=32, width=32, frame_stride=1):
        if not os.path.isdir(folder):
            raise ValueError(f"RE10K folder {folder!r} does not exist")
        self.folder, self.num_frames, self.frame_stride = folder, num_frames, frame_stride
        self.height, self.width = height, width
        self.names = sorted(f[:-4] for f in os.listdir(folder)
                            if f.endswith(".txt") and os.path.isdir(os.path.join(folder, f[:-4])))
        if not self.names:
            raise ValueError(f"RE10K folder {folder!r} has no name.txt camera file with a name/ frame folder")

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        cameras = read_re10k_cameras(os.path.join(self.folder, f"{name}.txt"))
        frame_ids = list(range(0, self.num_frames * self.frame_stride, self.frame_stride))
        if frame_ids[-1] >= len(cameras["w2c"]):
            raise ValueError(f"clip {name!r} has {len(cameras['w2c'])} frames, need {frame_ids[-1] + 1}")
        frames = []
        for i in frame_ids:
            candidates = [os.path.join(self.folder, name, f"{i:05d}{ext}") for ext in FRAME_EXTENSIONS]
            frame_path = next((p for p in candidates if os.path.exists(p)), None)
            if frame_path is None:
                raise ValueError(f"missing frame {candidates[0]} (or {', '.join(FRAME_EXTENSIONS[1:])})")
            image = Image.open(frame_path).convert("RGB").resize((self.width, self.height), Image.BILINEAR)
            frames.append(torch.from_numpy(np.asarray(image).copy()))
        video = torch.stack(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
        fx, fy, cx, cy = cameras["intrinsics_normalised"][0].tolist()
        w, h = self.width, self.height
        K = torch.tensor([[fx * w, 0, cx * w], [0, fy * h, cy * h], [0, 0, 1]], dtype=torch.float32)
        prompt_path = os.path.join(self.folder, name, "prompt.txt")
        prompt = open(prompt_path).read().strip() if os.path.exists(prompt_path) else ""
        return dict(video=video, w2c=cameras["w2c"][frame_ids], K=K, prompt=prompt)
