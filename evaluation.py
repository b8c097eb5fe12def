"""What the evaluation programs share: held-out clips, the cameras each method is given, sampling with fixed
noise, the scores of a video, and the study's runs.

Three programs use it (none imports another): evaluate.py runs the study (trains, samples, estimates, scores),
check.py checks one checkpoint, results.py reads results back; tools/validate_estimator.py measures the camera
estimator. Held-out clips come from data.SPLIT_SEEDS["test"] (never drawn in training) with the synthetic world's
exact cameras and depth, so a generated video is scored three ways:
- its camera path, estimated by analysis by synthesis against the known scene (estimator.py, no teacher involved),
  against the requested one (RotErr, TransErr, CamMC);
- PSNR and SSIM against the true frames 1..F-1 (frame 0 is the given reference);
- PSNR on the co-visible pixels: those of each frame that the reference also sees (geometry.covisible_mask,
  through the true depth, occlusion-checked), where the reference alone says what the frame shows; content
  coming into view does not count. It needs no camera estimator, so it resolves small differences with few clips.
"""
import concurrent.futures
import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch

import camgeo
import conditioning
import data
import estimator
import geometry
import report

# ----------------------------------------------------------------------------------------------
# Held-out clips and the cameras each method is given


@dataclass
class HeldOutClip:
    seed: int
    video: torch.Tensor  # (F, 3, H, W) ground truth, kept for scoring
    depth: torch.Tensor  # (F, H, W) true depth, z along the optical axis
    c2w: torch.Tensor  # (F, 4, 4) the requested path (the ground-truth one): keyframes of it are given
    K: torch.Tensor  # (3, 3) pixels
    prompt: str
    scene: object  # data.Scene, for the estimator
    covisible: torch.Tensor  # (F, H, W) bool, the pixels of each frame that frame 0 sees (covisibility)


def held_out_clips(num_clips, num_frames, size, first=0):
    """The first num_clips clips of the test split (seeds no training run ever draws)."""
    start = data.SPLIT_SEEDS["test"][0] + first
    clips = []
    for seed in range(start, start + num_clips):
        world = data.sample_world(seed)
        c2w = torch.tensor(world.path.c2w(data.frame_times(num_frames)), dtype=torch.float32)
        K = world.intrinsics(size, size)
        video, depth = data.render(world.scene, c2w, K, size, size)
        mask, _ = covisibility(video, depth, c2w, K)
        clips.append(HeldOutClip(seed, video, depth, c2w, K, world.scene.prompt(), world.scene, mask))
    return clips


def covisibility(video, depth, c2w, K):
    """(F, 3, H, W) video, (F, H, W) true depth, (F, 4, 4) c2w, (3, 3) K -> (mask (F, H, W) bool: the pixels of
    each frame that frame 0 sees, the reprojection of frame 0 through the true depth (F, 3, H, W): the ceiling of
    any video on those pixels)."""
    to_reference = geometry.invert_pose(c2w[:1]) @ c2w  # (F, 4, 4), frame f's camera -> frame 0's
    Ks = K.expand(len(video), 3, 3)
    mask = geometry.covisible_mask(depth, depth[:1].expand_as(depth), Ks, to_reference)
    ceiling = geometry.reproject_reference(video[:1].expand_as(video), depth, Ks, to_reference)
    return mask, ceiling


def covisible_psnr(clips, videos):
    """(C, F, 3, H, W) videos of the clips -> (C, F) PSNR on each frame's co-visible pixels (NaN: none)."""
    truth = torch.stack([clip.video for clip in clips])
    return geometry.masked_psnr(videos.double(), truth.double(), torch.stack([clip.covisible for clip in clips]))


def mean_over_frames(per_frame, frames):
    """(C, F) per-frame scores -> (C,) numpy, their mean over `frames`, frames without a score (NaN) left out
    (NaN for a clip with none)."""
    values = per_frame[:, frames].double().numpy()
    counts = (~np.isnan(values)).sum(1)
    return np.where(counts > 0, np.nansum(values, 1) / np.maximum(counts, 1), np.nan)


def ratio_label(ratio):
    return "all" if ratio >= 1 else f"1/{round(1 / ratio)}"


def summarise(values):
    """list of floats -> 'mean ± std (median)'."""
    array = np.array(values, dtype=np.float64)
    return f"{array.mean():.3f} ± {array.std():.3f} ({np.median(array):.3f})"


def camera_for(clip, method, ratio, size):
    """What a checkpoint of `method` is conditioned on for this clip: (1, F, conditioning.CAMERA_CHANNELS, size, size),
    as in training (conditioning.camera_inputs: keyframes and mask for the sparse-style methods, interpolated poses for
    linear / SLERP, every pose for full)."""
    camera, _, _ = conditioning.camera_inputs(geometry.invert_pose(clip.c2w)[None], clip.K[None], method, ratio,
                                        height=size, width=size)
    return camera


def checkpoint_cameras(info, clips):
    """What a loaded checkpoint (camgeo.load_checkpoint's info) is conditioned on for every clip, batched:
    -> (cameras (C, F, conditioning.CAMERA_CHANNELS, size, size), its keyframe ratio)."""
    ratio = info["options"].get("sparse", 0.5)
    return torch.cat([camera_for(clip, info["method"], ratio, info["config"].image_size) for clip in clips]), ratio


SAMPLE_SEED = 1000  # clip i is sampled with seed SAMPLE_SEED + i by every method: same noise, fairer comparison


def sample_clips(model, clips, cameras, sample_steps, cfg_scale, device):
    """All clips sampled in one batch from their reference frames and prompts with seed SAMPLE_SEED, so that any
    two calls with the same clips draw the same noise. -> (C, F, 3, H, W) on the CPU."""
    reference = torch.stack([clip.video[0] for clip in clips])
    with torch.no_grad():
        return camgeo.sample(model, reference.to(device), [clip.prompt for clip in clips], cameras.to(device),
                             sample_steps, cfg_scale, seed=SAMPLE_SEED).cpu()


# ----------------------------------------------------------------------------------------------
# Scoring a video: its estimated camera path, its frames


def estimate_one(clip, video, config):
    """The camera path (F, 4, 4) c2w of one generated video, estimated against the clip's scene."""
    torch.set_num_threads(1)  # many small tensor calls: a second thread only waits (and workers run in parallel)
    return estimator.estimate_paths(clip.scene, clip.K, video[None], clip.c2w[0], config)[0]


def video_metrics(clip, video, path):
    """One generated video's scores in report.METRICS order: its estimated path against the requested one
    (RotErr, TransErr, CamMC), then PSNR, SSIM and co-visible PSNR (the mean over frames of covisible_psnr) of
    frames 1..F-1 (frame 0 is the given reference, not a generated frame; scored, it would hand a video that merely
    repeats it an exact frame)."""
    camera = geometry.camera_metrics(clip.c2w, path)
    covisible = mean_over_frames(covisible_psnr([clip], video[None]), list(range(1, len(video))))[0]
    return [camera["RotErr"], camera["TransErr"], camera["CamMC"],
            geometry.psnr(video[1:], clip.video[1:]).item(), geometry.ssim(video[1:], clip.video[1:]).item(),
            float(covisible)]


def all_metrics(clips, videos, paths):
    """video_metrics of every clip -> (C, len(report.METRICS))."""
    return torch.tensor([video_metrics(c, v, p) for c, v, p in zip(clips, videos, paths)], dtype=torch.float64)


def score(clips, videos, config, workers=1):
    """Estimate each video's path and score it, clips in parallel over `workers` processes (the estimator runs
    on the CPU: data.render is a CPU ray-caster). -> (paths (C, F, 4, 4), metrics (C, len(report.METRICS)))."""
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # no forked OpenMP state
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            paths = list(pool.map(estimate_one, clips, videos, [config] * len(clips)))
    else:
        threads = torch.get_num_threads()
        paths = [estimate_one(clip, video, config) for clip, video in zip(clips, videos)]
        torch.set_num_threads(threads)
    return torch.stack(paths), all_metrics(clips, videos, paths)


# ----------------------------------------------------------------------------------------------
# The study's runs: methods, CamGeo's ablations, presets

METHOD_NAMES = {"full": "Full", "sparse": "Sparse", "linear": "Linear", "slerp": "SLERP", "camgeo": "CamGeo"}
CAMGEO = METHOD_NAMES["camgeo"]

# CamGeo's ablations (trained at the study's first ratio), each one change from train.py's defaults and read against
# CamGeo clip by clip (study_differences): the paper's three, then the paper's printed forms where distill.py's
# defaults depart from them, one departure each. name -> (train.py flags, table label).
ABLATIONS = {
    "camgeo_nosmooth": (["--smoothness-weight", "0"], "CamGeo w/o smoothness"),
    "camgeo_nowarmup": (["--no-warmup"], "CamGeo w/o warm-up"),
    "camgeo_linsched": (["--schedule", "linear"], "CamGeo linear schedule"),
    "camgeo_truth": (["--distill-target", "truth"], "CamGeo, the printed target (true keyframe poses)"),
    "camgeo_printedgate": (["--geo-gate", "printed"], "CamGeo, the printed gate (L_geo weighted by alpha)"),
    "camgeo_unitweights": (["--traj-weight", "1", "--geo-weight", "1"], "CamGeo, the paper's unit weights"),
    "camgeo_unfiltered": (["--teacher-gradient-sigma", "0"], "CamGeo, the teacher's gradient unfiltered"),
}
# the table's rows; the reference rows come last
TABLE_ORDER = [*METHOD_NAMES.values(), *(label for _, label in ABLATIONS.values())]


@dataclass
class StudyPreset:
    train_preset: str  # camgeo.PRESETS key: resolution, clip length, model size
    train_steps: int  # None: train.py's default for the preset
    clips: int
    ratios: tuple
    seeds: tuple
    ablations: bool
    sample_steps: int
    cfg_scale: float
    estimator_config: estimator.EstimatorConfig
    train_flags: tuple = ()  # extra train.py flags
    plot_clips: int = 3


STUDY_PRESETS = {
    # seconds: a few training steps, two clips, a quick estimator; for CI only, the numbers mean nothing
    "smoke": StudyPreset("smoke", 4, 2, (0.5,), (0,), False, 2, 2.0,
                         estimator.EstimatorConfig(blur_levels=(2.0, 0.0), iterations_per_level=3),
                         ("--num-clips", "8", "--num-workers", "0"), plot_clips=2),
    # hours on 2 CPU cores: 16 trainings of train.py's cpu preset (20-40 min each at one thread, two at a time with
    # --jobs 2; 9 with --no-ablations), then 16 x 16 videos to sample (~3 s each) and, with the reference rows,
    # 19 x 16 to estimate (~25 s each). The trainings are train.py's own defaults, so CamGeo at 1/2, seed 0 is
    # the README's headline command.
    "cpu": StudyPreset("cpu", None, 16, (0.5, 0.25), (0,), True, 25, 2.0, estimator.EstimatorConfig()),
    # one GPU for training and sampling (the estimator stays on the CPU)
    "gpu": StudyPreset("gpu", None, 32, (0.5, 1 / 3, 0.25), (0, 1), True, 50, 2.0, estimator.EstimatorConfig()),
}


def study_differences(records):
    """The paired differences a study reports: CamGeo - Sparse at every ratio, then each CamGeo ablation present
    minus CamGeo (same seed, same clips), so an ablation is read against the spread of its own pairs rather than
    the overlap of two means with wide clip-to-clip spreads. Markdown lines."""
    present = {r["method"] for r in records}
    lines = []
    for label, baseline in [(CAMGEO, "Sparse"), *((label, CAMGEO) for _, label in ABLATIONS.values())]:
        if label in present and baseline in present:
            lines += [""] * bool(lines) + report.paired_differences(records, label, baseline)
    return lines
