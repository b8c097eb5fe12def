"""Image + camera poses -> video, with a trained CamGeo student (camgeo.py). Never loads the teacher.

    python sample.py examples/reference.png examples/dolly_in.json            # -> samples/
    python sample.py img.png cameras.txt --keyframes 0.5                       # a RealEstate10K camera file
    python sample.py img.png poses.json --ckpt out/sparse/ckpt.safetensors --prompt "a room" --cfg 2 --seed 1

Writes into --out (default samples/): frame_00.png ... (the frames at the model's resolution), video.gif and
strip.png (all frames side by side), both enlarged --upscale times with nearest-neighbour pixels.

poses.json:
    {"num_frames": 8,                      # must equal the checkpoint's clip length
     "convention": "w2c",                  # or "c2w": what rotation/translation below describe
     "keyframes": [                        # frame 0 is required; each frame at most once
        {"frame": 0,
         "rotation": [[1,0,0],[0,1,0],[0,0,1]],    # 3x3 rotation matrix, or an XYZW quaternion [x, y, z, w]
         "translation": [0, 0, 0],
         "intrinsics": {"fx": 0.8, "fy": 0.8, "cx": 0.5, "cy": 0.5}},  # normalised by width / height,
                                                                         # or {"fov_deg": 60} (horizontal)
        {"frame": 7, "rotation": [0, 0, 0, 1], "translation": [0, 0, -1]}],
     "prompt": "a room with ..."}          # optional; --prompt overrides
Cameras are OpenCV (x right, y down, z forward). A keyframe without "intrinsics" reuses the previous
keyframe's; with none at all, DEFAULT_FOV_DEG. Only relative motion matters: poses are taken relative to frame
0 and translations are rescaled (conditioning.camera_conditioning). A RealEstate10K camera file (.txt) is
accepted too: num_frames frames evenly spaced over the file become keyframes (all of them, or --keyframes RATIO
of them).

Bad input (unreadable or malformed files, bad poses, a missing checkpoint) ends with a one-line error and
exit code 2. The files in examples/ are written by tools/examples.py.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import camgeo
import conditioning
import data
import geometry
import re10k

DEFAULT_CKPT = os.path.join("assets", "student.safetensors")
GIF_FRAME_MS = 150
DEFAULT_FOV_DEG = 60.0  # the middle of the synthetic world's field-of-view range
ROTATION_TOLERANCE = 1e-3  # |R^T R - I| and |det R - 1| allowed from rounding in a hand-written file
EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """A problem with what the user gave us; reported as one line, exit code 2."""


def note(message):
    print(f"note: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------
# poses


def finite_numbers(value, shape, what):
    """A nested list of finite numbers with the given shape -> float64 array, else InputError."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of numbers of shape {list(shape)}, got {json.dumps(value)[:80]}")
    if array.shape != tuple(shape):
        raise InputError(f"{what} must have shape {list(shape)}, got {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} contains NaN or infinity")
    return array


def rotation_from(value, what):
    """3x3 rotation matrix or XYZW quaternion -> (3, 3), checked to be a proper rotation."""
    if isinstance(value, list) and len(value) == 4 and not any(isinstance(v, list) for v in value):
        q = finite_numbers(value, (4,), what)
        if np.linalg.norm(q) < 1e-6:
            raise InputError(f"{what} is a zero quaternion")
        return geometry.quat_to_mat(torch.tensor(q)).numpy()
    R = finite_numbers(value, (3, 3), what + " (a 3x3 matrix or an XYZW quaternion)")
    orthogonality_error = np.abs(R.T @ R - np.eye(3)).max()
    determinant = np.linalg.det(R)
    if orthogonality_error > ROTATION_TOLERANCE or abs(determinant - 1) > ROTATION_TOLERANCE:
        raise InputError(f"{what} is not a rotation matrix (|R^T R - I| = {orthogonality_error:.2g}, "
                         f"det = {determinant:.4g}; tolerance {ROTATION_TOLERANCE})")
    U, _, Vt = np.linalg.svd(R)  # snap to the nearest exact rotation (removes the rounding)
    return U @ Vt


def intrinsics_from(value, what):
    """{"fx","fy","cx","cy"} normalised, or {"fov_deg"} -> normalised [fx, fy, cx, cy]."""
    if not isinstance(value, dict):
        raise InputError(f"{what} must be an object with fx, fy, cx, cy or with fov_deg")
    if "fov_deg" in value:
        fov = finite_numbers(value["fov_deg"], (), what + ".fov_deg").item()
        if not 0 < fov < 180:
            raise InputError(f"{what}.fov_deg must be in (0, 180), got {fov}")
        focal = 0.5 / math.tan(math.radians(fov) / 2)  # normalised by width; square pixels, square frames
        return np.array([focal, focal, 0.5, 0.5])
    missing = [key for key in ("fx", "fy", "cx", "cy") if key not in value]
    if missing:
        raise InputError(f"{what} is missing {', '.join(missing)} (or give fov_deg)")
    vector = np.array([finite_numbers(value[key], (), f"{what}.{key}").item() for key in ("fx", "fy", "cx", "cy")])
    if vector[0] <= 0 or vector[1] <= 0:
        raise InputError(f"{what}: fx and fy must be positive, got {vector[0]}, {vector[1]}")
    return vector


def parse_poses_json(text):
    """poses.json text -> dict(num_frames, w2c (F, 4, 4), K_normalised (F, 4), keyframe_mask (F,), prompt)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"poses file is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})")
    if not isinstance(spec, dict):
        raise InputError("poses file must hold a JSON object with num_frames, convention and keyframes")
    missing = [key for key in ("num_frames", "convention", "keyframes") if key not in spec]
    if missing:
        raise InputError(f"poses file is missing the key(s) {', '.join(missing)}")
    num_frames = spec["num_frames"]
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 2:
        raise InputError(f"num_frames must be an integer >= 2, got {json.dumps(num_frames)}")
    if spec["convention"] not in ("w2c", "c2w"):
        raise InputError(f"convention must be \"w2c\" or \"c2w\", got {json.dumps(spec['convention'])}")
    keyframes = spec["keyframes"]
    if not isinstance(keyframes, list) or not keyframes:
        raise InputError("keyframes must be a non-empty list")
    prompt = spec.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError("prompt must be a string")

    poses, intrinsics = {}, {}
    for n, keyframe in enumerate(keyframes):
        what = f"keyframes[{n}]"
        if not isinstance(keyframe, dict):
            raise InputError(f"{what} must be an object")
        missing = [key for key in ("frame", "rotation", "translation") if key not in keyframe]
        if missing:
            raise InputError(f"{what} is missing the key(s) {', '.join(missing)}")
        frame = keyframe["frame"]
        if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < num_frames:
            raise InputError(f"{what}.frame must be an integer in [0, {num_frames - 1}], got {json.dumps(frame)}")
        if frame in poses:
            raise InputError(f"frame {frame} is given more than once")
        pose = np.eye(4)
        pose[:3, :3] = rotation_from(keyframe["rotation"], f"{what}.rotation")
        pose[:3, 3] = finite_numbers(keyframe["translation"], (3,), f"{what}.translation")
        poses[frame] = pose if spec["convention"] == "w2c" else np.linalg.inv(pose)
        if "intrinsics" in keyframe:
            intrinsics[frame] = intrinsics_from(keyframe["intrinsics"], f"{what}.intrinsics")
    if 0 not in poses:
        raise InputError("no pose for frame 0: poses are relative to the first frame, so it must be given")
    return assemble(num_frames, poses, intrinsics, prompt)


def assemble(num_frames, poses, intrinsics, prompt):
    """Per-frame arrays from {frame: w2c} and {frame: normalised intrinsics}; frames without a pose hold the
    identity (masked out or interpolated later) and the intrinsics of the nearest earlier keyframe."""
    w2c = np.tile(np.eye(4), (num_frames, 1, 1))
    K = np.zeros((num_frames, 4))
    mask = np.zeros(num_frames)
    focal = 0.5 / math.tan(math.radians(DEFAULT_FOV_DEG) / 2)
    current = np.array([focal, focal, 0.5, 0.5])
    for frame in range(num_frames):
        if frame in poses:
            w2c[frame], mask[frame] = poses[frame], 1
        current = intrinsics.get(frame, current)
        K[frame] = current
    return {"num_frames": num_frames, "w2c": w2c, "K_normalised": K, "keyframe_mask": mask, "prompt": prompt}


def parse_re10k(path, num_frames, keyframe_ratio):
    """RealEstate10K camera file -> the same dict: num_frames frames evenly spaced over the file."""
    try:
        cameras = re10k.read_re10k_cameras(path)
    except FileNotFoundError:
        raise InputError(f"poses file not found: {path}")
    except (OSError, ValueError) as error:  # the reader's ValueError already names the file and line
        raise InputError(f"not a readable RealEstate10K camera file: {error}")
    total = cameras["w2c"].shape[0]
    if total < num_frames:
        raise InputError(f"{path} has {total} cameras but the checkpoint generates {num_frames} frames")
    chosen = np.linspace(0, total - 1, num_frames).round().astype(int)
    if total != num_frames:
        note(f"{path}: using {num_frames} of its {total} cameras, evenly spaced")
    w2c = cameras["w2c"].double().numpy()[chosen]
    K = cameras["K_normalised"].double().numpy()[chosen]
    if not (np.all(np.isfinite(w2c)) and np.all(np.isfinite(K))):
        raise InputError(f"{path} contains NaN or infinity")
    given = range(num_frames)
    if keyframe_ratio is not None:
        given = conditioning.keyframe_indices(num_frames, keyframe_ratio).tolist()
    poses = {f: w2c[f] for f in given}
    for f in given:
        rotation_from(w2c[f, :3, :3].tolist(), f"{path} camera {chosen[f]} rotation")
    return assemble(num_frames, poses, {f: K[f] for f in range(num_frames)}, "")


def load_poses(path, num_frames, keyframe_ratio):
    if path.lower().endswith(".txt"):
        return parse_re10k(path, num_frames, keyframe_ratio)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"poses file not found: {path}")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read poses file {path}: {getattr(error, 'strerror', None) or error}")
    poses = parse_poses_json(text)
    if keyframe_ratio is not None:
        note("--keyframes applies to RealEstate10K .txt files only; ignored")
    return poses


# -----------------------------------------------------------------------------
# image


def load_image(path, size):
    """Any image PIL reads -> (3, size, size) float tensor in [0, 1]; other modes and sizes are converted
    (centre crop to square, then area resize) with a note."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGB":
                note(f"{path}: converted from {image.mode} to RGB")
                image = image.convert("RGB")
            if image.size != (size, size):
                width, height = image.size
                side = min(width, height)
                left, top = (width - side) // 2, (height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BOX)
                note(f"{path}: resized from {width}x{height} to {size}x{size}"
                     + (" (centre crop)" if width != height else ""))
            array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"image not found: {path}")
    except (OSError, Image.DecompressionBombError) as error:
        raise InputError(f"cannot read image {path}: {error}")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# -----------------------------------------------------------------------------
# the model


def load_student(path, device):
    from safetensors import SafetensorError
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path} (train one: python train.py --sparse 0.5)")
    try:
        return camgeo.load_checkpoint(path, weights="ema", device=device)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise InputError(f"cannot load checkpoint {path}: {error}")


def conditioning_for(poses, method, size):
    """Model camera input (1, F, conditioning.CAMERA_CHANNELS, H, W) from parsed poses, the way the checkpoint's
    method was trained."""
    w2c = torch.tensor(poses["w2c"], dtype=torch.float32)[None]
    mask = torch.tensor(poses["keyframe_mask"], dtype=torch.float32)[None]
    K = torch.tensor(poses["K_normalised"], dtype=torch.float32)[None] * size  # normalised -> pixels
    if method == "full" and not bool(mask.all()):
        note("the checkpoint was trained with every pose given; missing poses are filled by SLERP")
    elif method in ("linear", "slerp") and not bool(mask.all()):
        note(f"the checkpoint is the {method} baseline: poses missing from the file are filled by {method} "
             f"interpolation of the given ones")
    return conditioning.keyframe_camera(w2c, K, mask, method, size, size)[0]


# -----------------------------------------------------------------------------
# outputs


def save_video(video, out_dir, upscale):
    """video (F, 3, H, W) in [0, 1] -> frame_XX.png, video.gif, strip.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    frames = [Image.fromarray(frame) for frame in data.frames_to_uint8(video)]
    for i, frame in enumerate(frames):
        frame.save(os.path.join(out_dir, f"frame_{i:02d}.png"))
    big = [f.resize((f.width * upscale, f.height * upscale), Image.NEAREST) for f in frames]
    # Pillow merges identical consecutive frames into one shown for their summed duration: same playback
    big[0].save(os.path.join(out_dir, "video.gif"), save_all=True, append_images=big[1:], duration=GIF_FRAME_MS,
                loop=0)
    strip = Image.new("RGB", (sum(f.width for f in big), big[0].height))
    for i, frame in enumerate(big):
        strip.paste(frame, (i * frame.width, 0))
    strip.save(os.path.join(out_dir, "strip.png"))


# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image")
    parser.add_argument("poses", help="poses.json or a RealEstate10K camera .txt")
    parser.add_argument("--ckpt", default=DEFAULT_CKPT)
    parser.add_argument("--prompt", help="overrides the prompt in poses.json")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    # 1, not 2: the shipped student's samples are closer to the true clips without guidance (check.py measures it)
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale on text + camera (1: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keyframes", type=float, metavar="RATIO", help="for .txt files: give only this fraction")
    parser.add_argument("--upscale", type=int, default=4, help="enlargement of video.gif and strip.png")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.upscale < 1:
        parser.error("--steps and --upscale must be >= 1")
    if args.keyframes is not None and not 0 < args.keyframes <= 1:
        parser.error("--keyframes must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    model, info = load_student(args.ckpt, args.device)
    config = info["config"]
    poses = load_poses(args.poses, config.num_frames, args.keyframes)
    if poses["num_frames"] != config.num_frames:
        raise InputError(f"num_frames is {poses['num_frames']} but the checkpoint generates {config.num_frames}")
    reference = load_image(args.image, config.image_size)
    prompt = args.prompt if args.prompt is not None else poses["prompt"]
    camera = conditioning_for(poses, info["method"], config.image_size)
    with torch.no_grad():
        video = camgeo.sample(model, reference[None].to(args.device), [prompt], camera.to(args.device),
                              num_steps=args.steps, cfg_scale=args.cfg, seed=args.seed)[0].cpu()
    save_video(video, args.out, args.upscale)
    given = [int(i) for i in np.flatnonzero(poses["keyframe_mask"])]
    options = info["options"]
    if info["method"] == "sparse" and not options.get("random_keyframes") and "sparse" in options:
        trained = conditioning.keyframe_indices(config.num_frames, options["sparse"]).tolist()
        if given != trained:
            note(f"the checkpoint was trained with poses at frames {trained}; poses at {given} are outside "
                 f"what it has seen (train with --random-keyframes for arbitrary keyframes)")
    print(f"{config.num_frames} frames (poses at {given}, method {info['method']}) -> {args.out}/video.gif, "
          f"{args.out}/strip.png, {args.out}/frame_*.png")


def cli(argv=None):
    """main() with every input problem turned into one line on stderr and exit code 2 (never a traceback)."""
    try:
        main(argv)
    except InputError as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(cli())
