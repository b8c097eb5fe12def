"""Train the CamGeo student (camgeo.py) on the synthetic world, or on a RealEstate10K-format folder.

    python train.py --sparse 0.5                      # the default: `cpu` preset, keyframes at half the frames,
                                                      # < 20 minutes on 2 CPU cores -> out/sparse/ckpt.safetensors
    python train.py --method full                     # baselines of the paper: poses at every frame,
    python train.py --method linear --sparse 0.25     #   or keyframes with the missing poses interpolated
    python train.py --method slerp --sparse 0.25      #   (linear / SLERP) before conditioning
    python train.py --preset smoke --steps 20         # seconds, for tests
    python train.py --preset gpu --device cuda        # the larger model on one GPU
    python train.py --data path/to/re10k_folder       # RealEstate10K-format clips instead of the synthetic world
    python train.py --export out/sparse/ckpt.safetensors assets/student.safetensors   # EMA weights, float16

Outputs in --out (default out/<method>): ckpt.safetensors (weights "model.*" and EMA weights "ema.*"; config,
method, step and options as JSON in the safetensors metadata), optimizer.pt (AdamW state, loadable with
torch.load(weights_only=True)) and log.jsonl (one line per step: loss, lr). sample.py reads ckpt.safetensors.

Camera conditioning per method (keyframes: camera_inputs below):
  sparse  poses at the keyframes only, keyframe mask 1 there and 0 elsewhere (the model sees what is missing)
  full    every pose, mask all ones
  linear / slerp  keyframe poses interpolated to every frame (geometry.interpolate_trajectory), then given as if
          known, mask all ones: that is what those baselines do, so the model cannot tell interpolated from real.

Data: the synthetic clips are rendered once per run into an in-memory pool (--num-clips, rendered by
--num-workers DataLoader workers) and batches are drawn from it, so the loop is never bound by the ray-caster
(about 0.3 s a clip on one core, slower than a training step). --num-clips 0 streams fresh clips instead
(for long GPU runs, with enough workers).
"""
import argparse
import json
import math
import os
import tempfile
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import camgeo
import data

METHODS = ("sparse", "full", "linear", "slerp")
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
CKPT_NAME, OPTIMIZER_NAME, LOG_NAME = "ckpt.safetensors", "optimizer.pt", "log.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="sparse")
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
    parser.add_argument("--data", metavar="PATH", help="RealEstate10K-format folder (data.RE10KClips)")
    parser.add_argument("--out", help="output folder, default out/<method>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that render clips")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "DEST"),
                        help="write CKPT's EMA weights alone, in float16, to DEST and exit "
                             "(how assets/student.safetensors is made)")
    args = parser.parse_args(argv)
    for name, value in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 < args.sparse <= 1.0:
        parser.error(f"--sparse must be in (0, 1], got {args.sparse}")
    args.out = args.out or os.path.join("out", args.method)
    return args


# -----------------------------------------------------------------------------
# camera conditioning per method


def camera_inputs(w2c, K, method, ratio, random_keyframes=False, generator=None, height=32, width=32):
    """Ground-truth cameras of a batch -> what the denoiser is conditioned on for `method`.

    w2c (B, F, 4, 4), K (B, 3, 3) pixels. Returns (camera (B, F, 7, H, W) for the model, keyframe_mask (B, F)
    marking the frames whose true pose was given, w2c_conditioned (B, F, 4, 4) the poses actually used)."""
    B, num_frames = w2c.shape[:2]
    if method == "full":
        keyframe_mask = torch.ones(B, num_frames)
    elif random_keyframes:
        keyframe_mask = camgeo.random_keyframe_mask(B, num_frames, ratio, generator)
    else:
        keyframe_mask = torch.zeros(B, num_frames)
        keyframe_mask[:, camgeo.keyframe_indices(num_frames, ratio)] = 1
    keyframe_mask = keyframe_mask.to(w2c.device)
    conditioning_mask = keyframe_mask
    if method in ("linear", "slerp"):
        w2c = camgeo.fill_missing_poses(w2c, keyframe_mask, method)
        conditioning_mask = torch.ones_like(keyframe_mask)  # interpolated poses are given as if known
    K_frames = camgeo.intrinsics_vector(K)[:, None].expand(B, num_frames, 4)
    camera = camgeo.camera_conditioning(w2c, K_frames, conditioning_mask, height, width)
    return camera, keyframe_mask, w2c


# -----------------------------------------------------------------------------
# data


def collate(items):
    return {"video": torch.stack([item["video"] for item in items]),
            "w2c": torch.stack([item["w2c"] for item in items]),
            "K": torch.stack([item["K"] for item in items]),
            "prompt": [item["prompt"] for item in items]}


def make_dataset(args, config):
    size = config.image_size
    if args.data:
        return data.RE10KClips(args.data, config.num_frames, size, size)
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


def save_checkpoint(out_dir, model, ema, optimizer, config, args, step):
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    metadata = {"config": camgeo.config_to_json(config), "method": args.method, "step": str(step),
                "options": json.dumps({"sparse": args.sparse, "random_keyframes": args.random_keyframes,
                                       "preset": args.preset, "seed": args.seed, "data": args.data})}
    atomic_write(os.path.join(out_dir, CKPT_NAME), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(os.path.join(out_dir, OPTIMIZER_NAME), lambda tmp: torch.save(optimizer.state_dict(), tmp))


# -----------------------------------------------------------------------------
# the loop


def train(args):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = camgeo.PRESETS[args.preset]
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)

    model = camgeo.CamGeo(config).to(device)
    ema = camgeo.CamGeo(config).to(device)
    ema.load_state_dict(model.state_dict())
    requires_grad(ema, False)
    ema.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    print(f"{args.preset} preset: {model.num_params() / 1e6:.2f}M parameters, method {args.method}, "
          f"keyframe ratio {args.sparse}, {args.steps} steps of batch {args.batch_size}")

    stream = batches(args, config, generator)
    log = open(os.path.join(args.out, LOG_NAME), "w")
    start = time.time()
    model.train()
    progress = tqdm(range(args.steps), desc=f"train {args.method}")
    for step in progress:
        lr = learning_rate(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(stream)
        video = batch["video"].to(device)
        camera, keyframe_mask, _ = camera_inputs(batch["w2c"].to(device), batch["K"].to(device), args.method,
                                                 args.sparse, args.random_keyframes, generator,
                                                 config.image_size, config.image_size)
        out = camgeo.training_losses(model, video, batch["prompt"], camera, generator)
        loss = out["loss"]
        # --method camgeo (next issue) adds the teacher's distillation losses on out["x0_pred"] here
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        update_ema(ema, model, args.ema_decay)

        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                  "time": round(time.time() - start, 2)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.1e}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_checkpoint(args.out, model, ema, optimizer, config, args, step + 1)
    log.close()
    print(f"done in {time.time() - start:.0f} s -> {os.path.join(args.out, CKPT_NAME)}")
    return model, ema


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.export:
        export_ema(*arguments.export)
    else:
        train(arguments)
