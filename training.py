"""What train.py shares with the programs that reproduce or read its runs (bench.py, the study): its command line,
the loss of one training step, and the checkpoint it writes.

    args = training.parse_args(["--method", "camgeo", "--sparse", "0.5"])   # train.py's options, defaults filled in
    args.distill                                                          # the distillation's distill.DistillConfig
    training.checkpoint_options(args)                                     # what a checkpoint of that run records

The distillation's options are fields of distill.DistillConfig (DISTILL_OPTIONS names the ones a user sets; the
others are design choices that stay at their defaults). A checkpoint is one safetensors file: the student's
weights "model.*" and EMA weights "ema.*", with the model config, method, step and options as JSON metadata
(camgeo.load_checkpoint reads it); the teacher is never saved with it.
"""
import argparse
import dataclasses
import json
import os
import tempfile

import torch
from safetensors.torch import save_file

import camgeo
import conditioning
import distill
import teacher

METHODS = ("camgeo", "sparse", "full", "linear", "slerp")
# Training defaults per preset: steps, batch size, peak learning rate, EMA decay, pool size. The cpu values are
# sized for a run of minutes on 2 cores; the EMA horizon (1 / (1 - decay) steps) is a fraction of the run.
TRAIN_DEFAULTS = {
    "smoke": dict(steps=20, batch_size=4, lr=1e-3, ema_decay=0.9, num_clips=8),
    "cpu": dict(steps=1500, batch_size=8, lr=5e-4, ema_decay=0.995, num_clips=2048),
    "gpu": dict(steps=100_000, batch_size=32, lr=1e-4, ema_decay=0.9999, num_clips=0),
}
GRAD_CLIP = 1.0  # the gradient norm is clipped to this before each update
CKPT_NAME, TRAIN_STATE_NAME, LOG_NAME = "ckpt.safetensors", "train_state.pt", "log.jsonl"
# The DistillConfig fields train.py exposes, with their help: (choices or None, help). The option is the field's
# name with dashes; its default is the field's; a field that defaults to True is turned off by --no-<name>.
DISTILL_OPTIONS = {
    "teacher": (None, "teacher checkpoint (teacher.load_vggt)"),
    "teacher_cameras": (distill.CAMERA_SOURCES, "the teacher's cameras: its camera head, or aligned through its "
                                                "depth (default: aligned for a small teacher, head for VGGT-1B)"),
    "teacher_every": (None, "run the teacher on every N-th step, its losses weighted N times there (1: every step)"),
    "traj_weight": (None, "weight of L_traj (the paper's: 1)"),
    "geo_weight": (None, "weight of L_geo (the paper's: 1)"),
    "smoothness_weight": (None, "weight of L_geo's trajectory-smoothness term (0: the w/o smoothness ablation)"),
    "warmup": (None, "alpha = 1 from the first step (the w/o warm-up ablation)"),
    "schedule": (("sigmoid", "linear"), "shape of the curriculum's ramps (linear: the paper's ablation)"),
    "distill_target": (("teacher", "truth"), "compare the teacher's reading of the predicted video with its reading "
                                             "of the real clip (zero at the data), or with the true keyframe poses "
                                             "(the paper's form)"),
    "geo_gate": (("beta", "printed"), "L_geo weighted by alpha*beta (the phases as described) or by alpha (the "
                                      "printed equation)"),
    "teacher_gradient_sigma": (None, "low-pass the teacher's gradient to the predicted video by a Gaussian of this "
                                     "width in pixels (0: unfiltered)"),
    "teacher_gate": (("linear", "flat"), "weight of a clip by its noise level, below the gate's t_max"),
}


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    """train.py's options -> argparse namespace, preset defaults filled in, out defaulting to out/<method>, and
    args.distill the distill.DistillConfig they ask for (the distillation's options are not kept beside it)."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train the CamGeo student (camgeo.py) on the "
                                     "synthetic world, or on a RealEstate10K-format folder.")
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
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    group = parser.add_argument_group("CamGeo distillation (--method camgeo; the fields of distill.DistillConfig)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="torch.compile the fused L_geo (falls back to eager with a note if it cannot)")
    for name, (choices, help_text) in DISTILL_OPTIONS.items():
        default = getattr(distill.DEFAULTS, name)
        flag = name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(f"--no-{flag}", dest=name, action="store_false", help=help_text)
        else:
            group.add_argument(f"--{flag}", type=str if default is None else type(default), choices=choices,
                               default=default, help=help_text)
    args = parser.parse_args(argv)
    for name, value in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 < args.sparse <= 1.0:
        parser.error(f"--sparse must be in (0, 1], got {args.sparse}")
    try:
        args.distill = distill.DistillConfig(**{name: vars(args).pop(name) for name in DISTILL_OPTIONS})
    except ValueError as error:
        parser.error(str(error))
    if args.method == "camgeo" and args.distill.distill_target == "truth" and args.data:
        parser.error("--distill-target truth measures translations in units of the true scene depth, which a "
                     "RealEstate10K folder does not have; use --distill-target teacher")
    args.out = args.out or os.path.join("out", args.method)
    return args


# -----------------------------------------------------------------------------
# one training step


def collate(items):
    """Stack clips; depth comes along where the data has it (the synthetic world does, RealEstate10K not)."""
    batch = {key: torch.stack([item[key] for item in items]) for key in ("video", "w2c", "K")}
    if all("depth" in item for item in items):
        batch["depth"] = torch.stack([item["depth"] for item in items])
    return batch | {"prompt": [item["prompt"] for item in items]}


def load_teacher(path, device):
    if not os.path.isfile(path):
        raise ValueError(f"teacher checkpoint {path} not found: pass --teacher PATH, or train the small teacher with "
                         f"`python train_teacher.py --half --out {distill.DEFAULTS.teacher}`")
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
    multiple of the distillation weights this step: teacher_every on the steps the teacher runs, else 0).
    config is the student's camgeo.CamGeoConfig; the distillation's choices are args.distill."""
    batch = {key: (value.to(device) if torch.is_tensor(value) else value) for key, value in batch.items()}
    camera, keyframe_mask, _ = conditioning.camera_inputs(batch["w2c"], batch["K"], args.method, args.sparse,
                                                    args.random_keyframes, generator, config.image_size,
                                                    config.image_size)
    depth_target = None
    if "depth" in batch:  # the depth head learns the reference's depth where the data has it
        given = camera[:, :, conditioning.MASK_CHANNELS].amax(dim=(2, 3, 4))  # (B, F) the poses the student was given
        depth_target = conditioning.reference_inverse_depth(batch["depth"][:, 0], batch["w2c"], given)
    out = camgeo.training_losses(model, batch["video"], batch["prompt"], camera, generator, depth_target)
    terms = {"loss_diff": out["loss"], "loss_depth": out["loss_depth"]}
    if args.method != "camgeo":
        return out["loss"], terms
    choices = args.distill
    alpha, beta = distill.curriculum_weights(step, args.steps, choices.schedule, choices.warmup,
                                             choices.warmup_fraction, choices.alpha_mid, choices.beta_mid,
                                             choices.schedule_width)
    # phase 1 (warm-up) never runs the teacher; after it, every teacher_every steps at that multiple of the weights
    factor = choices.teacher_every if alpha > 0 and step % choices.teacher_every == 0 else 0
    terms.update(alpha=alpha, beta=beta, teacher_factor=factor)
    if factor:
        terms.update(distill.distillation_losses(teacher_model, geometry_pairs, out, batch, keyframe_mask, choices))
    else:
        terms.update({name: out["loss"].new_zeros(()) for name in
                      ("loss_traj", "loss_geo", "loss_geo_depth", "loss_geo_smooth")}, teacher_clips=0)
    loss = distill.total_loss(out["loss"], terms["loss_traj"], terms["loss_geo"], alpha, beta, choices.geo_gate,
                              factor * choices.traj_weight, factor * choices.geo_weight)
    return loss, terms


# -----------------------------------------------------------------------------
# checkpoints


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


def checkpoint_options(args):
    """The options a checkpoint records with its weights, defaults filled in: what the weights depend on beyond
    the method and the preset's model; for camgeo every field of its DistillConfig. A study reuses a checkpoint
    only if they equal what its command resolves to now."""
    options = {"sparse": args.sparse, "random_keyframes": args.random_keyframes, "preset": args.preset,
               "seed": args.seed, "data": args.data, "steps": args.steps}
    if args.method == "camgeo":
        options.update(dataclasses.asdict(args.distill))
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
