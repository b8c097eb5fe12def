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
    python train.py --teacher-every 3                 # the teacher on every 3rd step, weighted x3 (default: each)
    python train.py --preset smoke --steps 20         # seconds, for tests
    python train.py --preset gpu --device cuda        # the larger model on one GPU
    torchrun --standalone --nproc_per_node=2 train.py --preset smoke   # DistributedDataParallel (gloo on CPU,
                                                      # nccl on GPU); --batch-size is per process
    python train.py --resume                          # continue the run in --out from its last checkpoint
    python train.py --data path/to/re10k_folder       # RealEstate10K-format clips instead of the synthetic world
    python tools/export.py out/camgeo/ckpt.safetensors assets/student.safetensors    # EMA weights alone, float16

Outputs in --out (default out/<method>), written by rank 0, each file atomically (temporary file + os.replace):
ckpt.safetensors (the student only: weights "model.*" and EMA weights "ema.*"; config, method, step and options
as JSON in the safetensors metadata; the teacher is never saved), train_state.pt (step, AdamW state and the
random-number states of every rank: what --resume needs to continue exactly as an uninterrupted run would;
loadable with torch.load(weights_only=True)) and log.jsonl (one line per step: the loss and each of its terms,
alpha and beta of the curriculum, the teacher's weight multiple that step, lr, grad norm). sample.py reads
ckpt.safetensors and never the teacher. The options, one step's loss and the checkpoint format are training.py's
(shared with bench.py and the study); the distillation's options are the fields of distill.DistillConfig.

Camera conditioning per method (keyframes: conditioning.camera_inputs):
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
--out stay those of the last checkpoint.
"""
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import camgeo
import data
import re10k
import training

WARMUP_STEPS_FRACTION = 0.03  # linear warm-up of the learning rate (Adam's moments settle first), then cosine decay
MIN_LR_FRACTION = 0.1  # cosine decays to this fraction of the peak, not to zero: the last steps still learn


# -----------------------------------------------------------------------------
# data


def make_dataset(args, config):
    size = config.image_size
    if args.data:
        return re10k.RE10KClips(args.data, config.num_frames, size, size)
    return data.SyntheticClips("train", config.num_frames, size, size)


def prerender_pool(dataset, num_clips, num_workers):
    """Render the first num_clips clips once (in parallel workers) and keep them in memory as one batch dict."""
    num_clips = min(num_clips, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(num_clips))
    loader = torch.utils.data.DataLoader(subset, batch_size=16, num_workers=num_workers, collate_fn=training.collate)
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
                                           num_workers=num_workers, collate_fn=training.collate)


# -----------------------------------------------------------------------------
# EMA, learning rate, random-number states, resume


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
    ckpt_name, state_name = training.CKPT_NAME, training.TRAIN_STATE_NAME
    ckpt_path, state_path = os.path.join(args.out, ckpt_name), os.path.join(args.out, state_name)
    if not (os.path.isfile(ckpt_path) and os.path.isfile(state_path)):
        raise ValueError(f"--resume: no {ckpt_name} and {state_name} in {args.out} to resume from")
    with safe_open(ckpt_path, framework="pt") as f:
        metadata = f.metadata()
        weights = {key: f.get_tensor(key) for key in f.keys()}
    if metadata["method"] != args.method or json.loads(metadata["options"])["preset"] != args.preset:
        raise ValueError(f"--resume: {ckpt_path} is a {metadata['method']} run of the "
                         f"{json.loads(metadata['options'])['preset']} preset, not {args.method} / {args.preset}")
    state = torch.load(state_path, weights_only=True)
    if state["step"] != int(metadata["step"]):
        raise ValueError(f"--resume: {ckpt_name} is at step {metadata['step']} but {state_name} at step "
                         f"{state['step']} (the run was stopped while saving); cannot continue exactly")
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    ema.load_state_dict({k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")})
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == world_size:
        set_rng_states(state["rng"][rank], generator)
    else:  # a different number of processes: continue, but not on the same random numbers
        generator.manual_seed(args.seed + 1000 * state["step"] + rank)
        print(f"note: --resume with {world_size} processes instead of {len(state['rng'])}: new random numbers")
    log_path = os.path.join(args.out, training.LOG_NAME)
    if rank == 0 and os.path.isfile(log_path):
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= state["step"]]
        training.atomic_write(log_path, lambda tmp: open(tmp, "w").writelines(kept))
    return state["step"]


# -----------------------------------------------------------------------------
# a loss that is not finite


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the checkpoint files are left as they were at the last save."""


def stop_on_non_finite(what, step, terms, args):
    values = ", ".join(f"{k}={float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in terms.items())
    raise NonFiniteLoss(f"{what} at step {step + 1} ({values}); stopped before the update. The files in {args.out} "
                        f"are those of the last checkpoint; continue with --resume")


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
        teacher_model = training.load_teacher(args.distill.teacher, device)
        geometry_pairs = training.make_geometry_pairs(args.compile)
    model = raw_model
    if world_size > 1:
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"{args.preset} preset: {raw_model.num_params() / 1e6:.2f}M parameters, method {args.method}, "
              f"keyframe ratio {args.sparse}, {args.steps} steps of batch {args.batch_size}"
              f"{f' x {world_size} processes' if world_size > 1 else ''}"
              f"{f', teacher {args.distill.teacher}' if teacher_model is not None else ''}")

    stream = batches(args, config, generator)
    start_step = 0
    if args.resume:
        start_step = resume(args, raw_model, ema, optimizer, generator, rank, world_size)
        if master:
            print(f"resuming {args.out} at step {start_step}")
    log = open(os.path.join(args.out, training.LOG_NAME), "a" if args.resume else "w") if master else None
    start = time.time()
    model.train()
    progress = tqdm(range(start_step, args.steps), desc=f"train {args.method}", disable=not master,
                    initial=start_step, total=args.steps)
    for step in progress:
        lr = learning_rate(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, terms = training.step_losses(args, model, teacher_model, geometry_pairs, next(stream), step, generator,
                                           config, device)
        finite = torch.isfinite(loss.detach()).float()
        if world_size > 1:  # every rank stops together, or the others would wait for it forever
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            stop_on_non_finite(f"loss is {loss.item()}", step, terms, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), training.GRAD_CLIP)
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
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            states = gathered_rng_states(generator, world_size)
            if master:
                training.save_checkpoint(args.out, raw_model, ema, optimizer, config, args, step + 1, states)
    if master:
        log.close()
        print(f"done in {time.time() - start:.0f} s -> {os.path.join(args.out, training.CKPT_NAME)}")
    return raw_model, ema


def main(argv=None):
    args = training.parse_args(argv)
    try:
        train(args)
    except (ValueError, NonFiniteLoss) as error:
        raise SystemExit(f"train.py: {error}")


if __name__ == "__main__":
    main()
