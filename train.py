"""Train the CamGeo student (camgeo.py) on the synthetic world, or on a RealEstate10K-format folder.

    python train.py --sparse 0.5                      # the default: CamGeo (keyframes at half the frames, the small
                                                      # teacher of assets/ distilled), `cpu` preset -> out/camgeo/
    python train.py --teacher path/to/model.pt        # another teacher: any checkpoint teacher.load_vggt reads
    python train.py --method sparse --sparse 0.5      # baselines of the paper: keyframes only, no teacher,
    python train.py --method full                     #   poses at every frame,
    python train.py --method linear --sparse 0.25     #   or keyframes with the missing poses interpolated
    python train.py --method slerp --sparse 0.25      #   (linear / SLERP) before conditioning
    python train.py --smoothness-weight 0             # CamGeo ablations: w/o smoothness,
    python train.py --no-warmup                       #   w/o warm-up,
    python train.py --schedule linear                 #   linear instead of sigmoid schedules
    python train.py --distill-target truth            # the paper's printed target: the true keyframe poses
    python train.py --traj-weight 1 --geo-weight 1    # the paper's loss weights (the defaults are 0.05)
    python train.py --teacher-gradient-sigma 0        # the teacher's gradient to the student unfiltered
    python train.py --teacher-cameras head            # the teacher's camera head instead of its aligned cameras
    python train.py --teacher-every 3                 # the teacher on every 3rd step, weighted x3 (default: every step)
    python train.py --traj-frames all                 # L_traj at every frame, not only the keyframes
    python train.py --preset smoke --steps 20         # seconds, for tests
    python train.py --preset gpu --device cuda        # the larger model on one GPU
    torchrun --standalone --nproc_per_node=2 train.py --preset smoke   # DistributedDataParallel (gloo on CPU,
                                                      # nccl on GPU); --batch-size is per process
    python train.py --resume                          # continue the run in --out from its last checkpoint
    python train.py --data path/to/re10k_folder       # RealEstate10K-format clips instead of the synthetic world
    python train.py --export out/camgeo/ckpt.safetensors assets/student.safetensors   # EMA weights, float16

Outputs in --out (default out/<method>), written by rank 0, each file atomically (temporary file + os.replace):
ckpt.safetensors (the student only: weights "model.*" and EMA weights "ema.*"; config, method, step and options
as JSON in the safetensors metadata; the teacher is never saved), train_state.pt (step, AdamW state and the
random-number states of every rank: what --resume needs to continue exactly as an uninterrupted run would;
loadable with torch.load(weights_only=True)) and log.jsonl (one line per step: the loss and each of its terms,
alpha and beta of the curriculum, the teacher's weight multiple that step, lr, grad norm; with
--log-term-gradients N, every N steps the gradient norm of each term). sample.py reads ckpt.safetensors and
never the teacher.

Camera conditioning per method (keyframes: camgeo.camera_inputs):
  camgeo / sparse  poses at the keyframes only, keyframe mask 1 there and 0 elsewhere (the model sees what is
          missing); camgeo adds the teacher's losses on the predicted video (the CamGeo distillation, distill.py)
  full    every pose, mask all ones
  linear / slerp  keyframe poses interpolated to every frame (geometry.interpolate_trajectory), then given as if
          known, mask all ones: that is what those baselines do, so the model cannot tell interpolated from real.

Data: the synthetic clips are rendered once per run into an in-memory pool (--num-clips, rendered by
--num-workers DataLoader workers) and batches are drawn from it, so the loop is never bound by the ray-caster
(about 0.3 s a clip on one core, slower than a training step). --num-clips 0 streams fresh clips instead
(for long GPU runs, with enough workers; a resumed streaming run draws new clips, not the same ones).

A loss that is NaN or infinite stops the run with a message naming the step and each loss term; the files in
--out stay those of the last checkpoint. (Tests inject one with the hidden option --debug-nan-at-step N.)
"""
import argparse
import json
import math
import os
import random
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import camgeo
import data
import distill
import re10k
import teacher

METHODS = ("camgeo", "sparse", "full", "linear", "slerp")
# Training defaults per preset: steps, batch size, peak learning rate, EMA decay, pool size. The cpu values are
# sized to finish in < 20 minutes on 2 cores; the EMA horizon (1 / (1 - decay) steps) is a fraction of the run.
TRAIN_DEFAULTS = {
    "smoke": dict(steps=20, batch_size=4, lr=1e-3, ema_decay=0.9, num_clips=8),
    "cpu": dict(steps=1500, batch_size=8, lr=5e-4, ema_decay=0.995, num_clips=2048),
    "gpu": dict(steps=100_000, batch_size=32, lr=1e-4, ema_decay=0.9999, num_clips=0),
}
WARMUP_STEPS_FRACTION = 0.03  # linear warm-up, then cosine decay
MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak
GRAD_CLIP = 1.0
CKPT_NAME, TRAIN_STATE_NAME, LOG_NAME = "ckpt.safetensors", "train_state.pt", "log.jsonl"
DEFAULT_TEACHER = os.path.join("assets", "teacher_small.safetensors")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="camgeo")
    parser.add_argument("--sparse", type=float, default=0.5, metavar="RATIO",
                        help="fraction of frames given poses (ignored by --method full)")
    parser.add_argument("--random-keyframes", action="store_true",
                        help="frame 0 plus random other frames per sample, instead of evenly spaced keyframes")
    parser.add_argument("--preset", choices=list(camgeo.PRESETS), default="cpu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--num-clips", type=int, help="size of the prerendered clip pool; 0 streams clips")
    parser.add_argument("--data", metavar="PATH", help="RealEstate10K-format folder (re10k.RE10KClips)")
    parser.add_argument("--out", help="output folder, default out/<method>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that render clips")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "DEST"),
                        help="write CKPT's EMA weights alone, in float16, to DEST and exit "
                             "(how assets/student.safetensors is made)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    distillation = parser.add_argument_group("CamGeo distillation (--method camgeo; see camgeo.py for each choice)")
    distillation.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher checkpoint (teacher.load_vggt)")
    distillation.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                         help="torch.compile the fused L_geo (falls back to eager with a note if it cannot)")
    distillation.add_argument("--teacher-cameras", choices=teacher.CAMERA_SOURCES,
                         help="the teacher's cameras: its camera head, or aligned through its depth (default: "
                              "aligned for a teacher trained here, head for the released VGGT)")
    distillation.add_argument("--distill-target", choices=("teacher", "truth"), default=distill.DISTILL_TARGET,
                         help="compare the teacher's reading of the predicted video with its reading of the real "
                              "clip (zero at the data), or with the true keyframe poses (the paper's form)")
    distillation.add_argument("--geo-excess", choices=("pair", "clip"), default=distill.GEO_EXCESS,
                         help="with the teacher target, L_geo counts x0_hat's excess over the real clip per pair "
                              "and term, or over the clip's whole sum")
    distillation.add_argument("--traj-frames", choices=("keyframes", "all"), default=distill.TRAJ_FRAMES,
                         help="frames L_traj compares: the keyframes (the paper's), or every frame (needs "
                              "--distill-target teacher)")
    distillation.add_argument("--traj-weight", type=float, default=distill.TRAJ_WEIGHT, help="weight of L_traj")
    distillation.add_argument("--geo-weight", type=float, default=distill.GEO_WEIGHT, help="weight of L_geo")
    distillation.add_argument("--traj-intrinsics", action="store_true",
                         help="include the field-of-view term |K_hat - K| in L_traj")
    distillation.add_argument("--teacher-gate", choices=("linear", "flat"), default=distill.TEACHER_GATE,
                         help="weight of a clip by its noise level below --teacher-t-max")
    distillation.add_argument("--teacher-t-max", type=float, default=distill.TEACHER_T_MAX,
                         help="the teacher gate: clips noisier than this are not distilled")
    distillation.add_argument("--teacher-gradient-sigma", type=float, default=distill.TEACHER_GRADIENT_SIGMA,
                         help="low-pass the teacher's gradient to the predicted video by a Gaussian of this width "
                              "in pixels (0: unfiltered)")
    distillation.add_argument("--teacher-frame0", choices=("reference", "predicted"), default=distill.TEACHER_FRAME0,
                         help="the teacher's first frame: the reference image the student is given, or the "
                              "student's own prediction of it")
    distillation.add_argument("--teacher-every", type=int, default=distill.TEACHER_EVERY, metavar="N",
                         help="run the teacher on every N-th step, its losses weighted N times there (1: every step)")
    distillation.add_argument("--teacher-fraction", type=float, default=distill.TEACHER_BATCH_FRACTION,
                         help="at most this fraction of each batch goes through the teacher")
    distillation.add_argument("--schedule", choices=("sigmoid", "linear"), default="sigmoid")
    distillation.add_argument("--no-warmup", dest="warmup", action="store_false",
                         help="alpha = 1 from the first step (ablation)")
    distillation.add_argument("--warmup-fraction", type=float, default=distill.CURRICULUM_WARMUP)
    distillation.add_argument("--alpha-mid", type=float, default=distill.CURRICULUM_ALPHA_MID)
    distillation.add_argument("--beta-mid", type=float, default=distill.CURRICULUM_BETA_MID)
    distillation.add_argument("--schedule-width", type=float, default=distill.CURRICULUM_WIDTH)
    distillation.add_argument("--geo-gate", choices=("beta", "printed"), default="beta",
                         help="L_geo weighted by alpha*beta (phases as described) or by alpha (printed equation)")
    distillation.add_argument("--spans", type=int, nargs="+", default=list(distill.GEO_SPANS))
    distillation.add_argument("--gamma", type=float, default=distill.GEO_GAMMA)
    distillation.add_argument("--eta", type=float, default=distill.GEO_ETA)
    distillation.add_argument("--smoothness-weight", type=float, default=distill.GEO_SMOOTHNESS_WEIGHT,
                         help="0: the w/o smoothness ablation")
    parser.add_argument("--log-term-gradients", type=int, default=0, metavar="N",
                        help="camgeo: every N steps also log the gradient norm of each loss term (3 extra backward "
                             "passes; 0: never)")
    # hidden, for tests: a NaN loss at step N; stop right after step N as if killed (a checkpoint is written)
    parser.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug-stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 < args.sparse <= 1.0:
        parser.error(f"--sparse must be in (0, 1], got {args.sparse}")
    if not 0.0 < args.teacher_t_max <= 1.0 or not 0.0 < args.teacher_fraction <= 1.0:
        parser.error("--teacher-t-max and --teacher-fraction must be in (0, 1]")
    if args.teacher_every < 1:
        parser.error(f"--teacher-every must be >= 1, got {args.teacher_every}")
    if args.teacher_gradient_sigma < 0:
        parser.error(f"--teacher-gradient-sigma must be >= 0, got {args.teacher_gradient_sigma}")
    if args.traj_frames == "all" and args.distill_target != "teacher":
        parser.error("--traj-frames all needs --distill-target teacher: the true poses between keyframes are what a "
                     "sparse student is not given")
    if args.method == "camgeo" and args.distill_target == "truth" and args.data:
        parser.error("--distill-target truth measures translations in units of the true scene depth, which a "
                     "RealEstate10K folder does not have; use --distill-target teacher")
    args.out = args.out or os.path.join("out", args.method)
    return args


# -----------------------------------------------------------------------------
# data


def collate(items):
    """Stack clips; depth comes along where the data has it (the synthetic world does, RealEstate10K not)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ("video", "w2c", "K")}
    if all("depth" in item for item in items):
        batch["depth"] = torch.stack([item["depth"] for item in items])
    return batch | {"prompt": [item["prompt"] for item in items]}


def make_dataset(args, config):
    size = config.image_size
    if args.data:
        return re10k.RE10KClips(args.data, config.num_frames, size, size)
    return data.SyntheticClips("train", config.num_frames, size, size)


def prerender_pool(dataset, num_clips, num_workers):
    """Render the first num_clips clips once (in parallel workers) and keep them in memory as one batch dict."""
    num_clips = min(num_clips, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(num_clips))
    loader = torch.utils.data.DataLoader(subset, batch_size=16, num_workers=num_workers, collate_fn=collate)
    chunks = list(tqdm(loader, desc=f"rendering {num_clips} clips", unit="batch"))
    return {key: (sum((c[key] for c in chunks), []) if key == "prompt" else torch.cat([c[key] for c in chunks]))
            for key in chunks[0]}


def batches(args, config, generator):
    """Endless iterator of batch dicts; the pool (if any) is rendered before this returns."""
    dataset = make_dataset(args, config)
    if args.num_clips > 0:
        return pool_batches(prerender_pool(dataset, args.num_clips, args.num_workers), args.batch_size, generator)
    return stream_batches(dataset, args.batch_size, args.num_workers, generator)


def pool_batches(pool, batch_size, generator):
    num_clips = pool["video"].shape[0]
    while True:
        index = torch.randint(num_clips, (batch_size,), generator=generator)
        yield {key: ([value[i] for i in index.tolist()] if key == "prompt" else value[index])
               for key, value in pool.items()}


def stream_batches(dataset, batch_size, num_workers, generator):
    """Fresh clips in random order, rendered by the workers while the model trains."""
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9, generator=generator)
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                           num_workers=num_workers, collate_fn=collate)


# -----------------------------------------------------------------------------
# EMA, learning rate, checkpoints


@torch.no_grad()
def update_ema(ema_model, model, decay):
    ema_params = dict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


def requires_grad(model, flag):
    for p in model.parameters():
        p.requires_grad = flag


def learning_rate(step, total_steps, peak_lr):
    warmup = max(1, int(WARMUP_STEPS_FRACTION * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def atomic_write(path, write):
    """write(tmp_path) then rename over path: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def export_ema(checkpoint, destination, dtype=torch.float16):
    """The shipped checkpoint: EMA weights only (what sample.py loads), float16 to halve the size (sampling loads
    them into float32 parameters), same metadata."""
    from safetensors import safe_open
    with safe_open(checkpoint, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key).to(dtype) for key in f.keys() if key.startswith("ema.")}
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    atomic_write(destination, lambda tmp: save_file(tensors, tmp, metadata=metadata))


DISTILLATION_OPTIONS = ("teacher", "teacher_cameras", "distill_target", "geo_excess", "traj_frames", "traj_weight", "geo_weight",
                        "traj_intrinsics", "teacher_gate", "teacher_t_max", "teacher_gradient_sigma", "teacher_frame0",
                        "teacher_fraction", "teacher_every", "schedule", "warmup", "warmup_fraction", "alpha_mid",
                        "beta_mid", "schedule_width", "geo_gate", "spans", "gamma", "eta", "smoothness_weight")


def checkpoint_options(args):
    """The options a checkpoint records with its weights, defaults filled in: what the weights depend on beyond
    the method and the preset's model (evaluate.py reuses a checkpoint only if they equal a command's)."""
    options = {"sparse": args.sparse, "random_keyframes": args.random_keyframes, "preset": args.preset,
               "seed": args.seed, "data": args.data, "steps": args.steps}
    if args.method == "camgeo":
        options.update({name: getattr(args, name) for name in DISTILLATION_OPTIONS})
    return options


def save_checkpoint(out_dir, model, ema, optimizer, config, args, step, rng_states):
    """ckpt.safetensors (student and EMA weights) and train_state.pt (step, optimizer, every rank's RNG states)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    metadata = {"config": camgeo.config_to_json(config), "method": args.method, "step": str(step),
                "options": json.dumps(checkpoint_options(args))}
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_states}
    atomic_write(os.path.join(out_dir, TRAIN_STATE_NAME), lambda tmp: torch.save(state, tmp))
    atomic_write(os.path.join(out_dir, CKPT_NAME), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def rng_states(generator):
    """Every random-number state the loop reads, as tensors and plain numbers (torch.load weights_only can read
    them): torch's global generator (classifier-free-guidance dropout), `generator` (batches, keyframes, noise,
    flow times), numpy and python's `random` (unused by the loop today, restored so that stays harmless)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": numpy_state[2],
                       "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]},
             "python": {"version": python_state[0], "state": list(python_state[1]), "gauss": python_state[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states(generator, world_size):
    """Every rank's RNG states, in rank order (all ranks must call this together)."""
    if world_size == 1:
        return [rng_states(generator)]
    states = [None] * world_size
    dist.all_gather_object(states, rng_states(generator))
    return states


def resume(args, model, ema, optimizer, generator, rank, world_size):
    """Load the student, EMA, optimizer and RNG states of the run in args.out -> the step to continue from.
    The log keeps the lines up to that step (a killed run may have logged steps after its last checkpoint)."""
    ckpt_path, state_path = os.path.join(args.out, CKPT_NAME), os.path.join(args.out, TRAIN_STATE_NAME)
    if not (os.path.isfile(ckpt_path) and os.path.isfile(state_path)):
        raise ValueError(f"--resume: no {CKPT_NAME} and {TRAIN_STATE_NAME} in {args.out} to resume from")
    with safe_open(ckpt_path, framework="pt") as f:
        metadata = f.metadata()
        weights = {key: f.get_tensor(key) for key in f.keys()}
    if metadata["method"] != args.method or json.loads(metadata["options"])["preset"] != args.preset:
        raise ValueError(f"--resume: {ckpt_path} is a {metadata['method']} run of the "
                         f"{json.loads(metadata['options'])['preset']} preset, not {args.method} / {args.preset}")
    state = torch.load(state_path, weights_only=True)
    if state["step"] != int(metadata["step"]):
        raise ValueError(f"--resume: {CKPT_NAME} is at step {metadata['step']} but {TRAIN_STATE_NAME} at step "
                         f"{state['step']} (the run was stopped while saving); cannot continue exactly")
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    ema.load_state_dict({k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")})
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == world_size:
        set_rng_states(state["rng"][rank], generator)
    else:  # a different number of processes: continue, but not on the same random numbers
        generator.manual_seed(args.seed + 1000 * state["step"] + rank)
        print(f"note: --resume with {world_size} processes instead of {len(state['rng'])}: new random numbers")
    log_path = os.path.join(args.out, LOG_NAME)
    if rank == 0 and os.path.isfile(log_path):
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state["step"]]
        atomic_write(log_path, lambda tmp: open(tmp, "w").writelines(kept))
    return state["step"]


# -----------------------------------------------------------------------------
# CamGeo distillation: the teacher reads the predicted video (losses and schedule: camgeo.py)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the checkpoint files are left as they were at the last save."""


def stop_on_non_finite(what, step, terms, args):
    values = ", ".join(f"{k}={float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in terms.items())
    raise NonFiniteLoss(f"{what} at step {step + 1} ({values}); stopped before the update. The files in {args.out} "
                        f"are those of the last checkpoint; continue with --resume")


def load_teacher(path, device):
    if not os.path.isfile(path):
        raise ValueError(f"teacher checkpoint {path} not found: pass --teacher PATH, or train the small teacher with "
                         f"`python train_teacher.py --half --out {DEFAULT_TEACHER}`")
    return teacher.freeze(teacher.load_vggt(path)).to(device)


def make_geometry_pairs(use_compile):
    """distill.geometry_pairs, compiled with torch.compile when asked. Compilation happens at the first call; if it
    fails there (no C compiler, an unsupported device), that call and all later ones run eagerly, with a note."""
    if not use_compile:
        return distill.geometry_pairs
    current = {"fn": torch.compile(distill.geometry_pairs)}

    def geometry_pairs(*args, **kwargs):
        try:
            return current["fn"](*args, **kwargs)
        except Exception as error:
            if current["fn"] is distill.geometry_pairs:
                raise
            print(f"note: torch.compile of geometry_pairs failed ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120] if str(error) else ''}); running it eagerly")
            current["fn"] = distill.geometry_pairs
            return current["fn"](*args, **kwargs)

    return geometry_pairs


def step_losses(args, model, teacher_model, geometry_pairs, batch, step, generator, config, device):
    """One step's loss -> (loss to minimise, dict of the terms: loss_diff and, for camgeo, alpha, beta, loss_traj,
    loss_geo (= loss_geo_depth + smoothness weight * loss_geo_smooth), teacher_clips and teacher_factor, the
    multiple of the distillation weights this step: --teacher-every on the steps the teacher runs, else 0)."""
    batch = {key: (value.to(device) if torch.is_tensor(value) else value) for key, value in batch.items()}
    camera, keyframe_mask, _ = camgeo.camera_inputs(batch["w2c"], batch["K"], args.method, args.sparse,
                                                    args.random_keyframes, generator, config.image_size,
                                                    config.image_size)
    out = camgeo.training_losses(model, batch["video"], batch["prompt"], camera, generator)
    terms = {"loss_diff": out["loss"]}
    if args.method != "camgeo":
        return out["loss"], terms
    alpha, beta = distill.curriculum_weights(step, args.steps, args.schedule, args.warmup, args.warmup_fraction,
                                            args.alpha_mid, args.beta_mid, args.schedule_width)
    # phase 1 (warm-up) never runs the teacher; after it, every --teacher-every steps at that multiple of the weights
    factor = args.teacher_every if alpha > 0 and step % args.teacher_every == 0 else 0
    terms.update(alpha=alpha, beta=beta, teacher_factor=factor)
    if factor:
        terms.update(distill.distillation_losses(teacher_model, geometry_pairs, out, batch, keyframe_mask, args))
    else:
        terms.update({name: out["loss"].new_zeros(()) for name in
                      ("loss_traj", "loss_geo", "loss_geo_depth", "loss_geo_smooth")}, teacher_clips=0)
    loss = distill.total_loss(out["loss"], terms["loss_traj"], terms["loss_geo"], alpha, beta, args.geo_gate,
                             factor * args.traj_weight, factor * args.geo_weight)
    return loss, terms


def term_gradient_norms(model, terms, args):
    """The gradient norm each weighted term of L_total sends to the student's parameters, before clipping:
    {grad_diff, grad_traj, grad_geo}. Three extra backward passes through the step's graph (kept for the real
    one), so only every --log-term-gradients steps; it shows which term steers the updates."""
    alpha, beta, factor = terms["alpha"], terms["beta"], terms["teacher_factor"]
    geo_factor = beta if args.geo_gate == "beta" else 1.0
    weighted = {"grad_diff": terms["loss_diff"],
                "grad_traj": alpha * (1 - beta) * factor * args.traj_weight * terms["loss_traj"],
                "grad_geo": alpha * geo_factor * factor * args.geo_weight * terms["loss_geo"]}
    parameters = [p for p in model.parameters() if p.requires_grad]
    norms = {}
    for name, value in weighted.items():
        if not torch.is_tensor(value) or not value.requires_grad:
            norms[name] = 0.0
            continue
        gradients = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        norms[name] = torch.sqrt(sum((g.pow(2).sum() for g in gradients if g is not None),
                                     torch.zeros(()))).item()
    return norms


# -----------------------------------------------------------------------------
# the loop


def setup_distributed(args):
    """nanoGPT-style: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process.
    -> (rank, world_size); under torchrun on CUDA each process takes the GPU of its local rank."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), dist.get_world_size()


def train(args):
    rank, world_size = setup_distributed(args)
    try:
        return train_process(args, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_process(args, rank, world_size):
    master = rank == 0  # logs and saves
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    generator = torch.Generator().manual_seed(args.seed + rank)  # each rank its own batches and noise
    config = camgeo.PRESETS[args.preset]
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)

    raw_model = camgeo.CamGeo(config).to(device)
    ema = camgeo.CamGeo(config).to(device)
    ema.load_state_dict(raw_model.state_dict())
    requires_grad(ema, False)
    ema.eval()
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=0.0)
    teacher_model, geometry_pairs = None, None
    if args.method == "camgeo":
        teacher_model = load_teacher(args.teacher, device)
        # --log-term-gradients backpropagates each term through the step's graph before the real backward; a
        # compiled backward frees its buffers on first use, so the logged runs use the eager L_geo
        use_compile = args.compile and not args.log_term_gradients
        if args.compile and args.log_term_gradients and master:
            print("note: --log-term-gradients runs L_geo eagerly (a compiled backward cannot be repeated)")
        geometry_pairs = make_geometry_pairs(use_compile)
    model = raw_model
    if world_size > 1:
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"{args.preset} preset: {raw_model.num_params() / 1e6:.2f}M parameters, method {args.method}, "
              f"keyframe ratio {args.sparse}, {args.steps} steps of batch {args.batch_size}"
              f"{f' x {world_size} processes' if world_size > 1 else ''}"
              f"{f', teacher {args.teacher}' if teacher_model is not None else ''}")

    stream = batches(args, config, generator)
    start_step = 0
    if args.resume:
        start_step = resume(args, raw_model, ema, optimizer, generator, rank, world_size)
        if master:
            print(f"resuming {args.out} at step {start_step}")
    log = open(os.path.join(args.out, LOG_NAME), "a" if args.resume else "w") if master else None
    start = time.time()
    model.train()
    progress = tqdm(range(start_step, args.steps), desc=f"train {args.method}", disable=not master,
                    initial=start_step, total=args.steps)
    for step in progress:
        lr = learning_rate(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, terms = step_losses(args, model, teacher_model, geometry_pairs, next(stream), step, generator, config,
                                  device)
        if args.debug_nan_at_step == step + 1:
            loss = loss * float("nan")
        finite = torch.isfinite(loss.detach()).float()
        if world_size > 1:  # every rank stops together, or the others would wait for it forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            stop_on_non_finite(f"loss is {loss.item()}", step, terms, args)
        if args.log_term_gradients and (step + 1) % args.log_term_gradients == 0 and args.method == "camgeo":
            terms.update(term_gradient_norms(raw_model, terms, args))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP)
        if not torch.isfinite(grad_norm):  # the same on every rank: DDP has averaged the gradients
            stop_on_non_finite(f"gradient norm is {grad_norm.item()}", step, terms, args)
        optimizer.step()
        update_ema(ema, raw_model, args.ema_decay)

        if master:
            record = {"step": step + 1, "loss": loss.item(),
                      **{k: (v.item() if torch.is_tensor(v) else v) for k, v in terms.items()},
                      "lr": lr, "grad_norm": grad_norm.item(), "time": round(time.time() - start, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.1e}")
        stopping = args.debug_stop_at_step == step + 1
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stopping:
            states = gathered_rng_states(generator, world_size)
            if master:
                save_checkpoint(args.out, raw_model, ema, optimizer, config, args, step + 1, states)
        if stopping:
            break
    if master:
        log.close()
        print(f"done in {time.time() - start:.0f} s -> {os.path.join(args.out, CKPT_NAME)}")
    return raw_model, ema


if __name__ == "__main__":
    arguments = parse_args()
    try:
        if arguments.export:
            export_ema(*arguments.export)
        else:
            train(arguments)
    except (ValueError, NonFiniteLoss) as error:
        raise SystemExit(f"train.py: {error}")
