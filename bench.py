"""Performance measurements of CamGeo, side by side in one run (ratios are printed from the same run).

    python bench.py --quick        # a couple of minutes on a CPU
    python bench.py                # more repetitions and a larger L_geo shape
    python bench.py --device cuda  # the same on a GPU (peak memory from the CUDA allocator)

Sections:
  1. memory copy: the bytes/s a plain tensor copy reaches here (the ceiling for a memory-bound kernel).
  2. L_geo (distill.geometry_loss, forward + backward): eager vs torch.compile, time and peak memory, at the
     training shape (the clips the teacher sees in one cpu-preset step) and a larger one; achieved bytes/s
     of the minimum traffic of a fused kernel (see GEO_VALUES_PER_PAIR_PIXEL), against the copy rate.
  3. teacher forward and forward + backward (to the input) at the student's training shape.
  4. training step: CamGeo (diffusion + teacher + L_traj + L_geo) vs Sparse (diffusion only), same batch.
  5. sampling: a CamGeo checkpoint vs a Sparse one (the same network, so the times must match).
Targets: compiled L_geo >= 3x eager; CamGeo step <= 1.5x Sparse step. Tests never time anything; this does.
Peak memory is the largest rise of allocated tensor memory during one call: on CPU from the profiler's
record of every allocation and free (torch.profiler, profile_memory=True), on CUDA torch.cuda.max_memory_allocated.
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch

import camgeo
import conditioning
import distill
import geometry

# Minimum traffic of one fused L_geo forward + backward, in values per (pair, pixel): the forward reads
# D_f, D_{f+k} and the edge weight of frame f (3); the backward reads D_f, D_{f+k} again and writes their
# gradients (4). Everything else (uv, z, residuals, masks) can live in registers; cameras are per pair.
GEO_VALUES_PER_PAIR_PIXEL = 7


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these machines are shared; 0: torch's default)")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped small teacher "
                                                        "if present, else a random SMALL_TEACHER)")
    return parser.parse_args()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_times(*fns, device, repeats):
    """Median time of each function, measured in turn (a, b, a, b, ...) so that a change in the machine's load
    during the run affects all alike: their ratios are what this benchmark reports."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples.append(median_time(fn, device, 1, warmup=0))
    return [statistics.median(samples) for samples in times]


def peak_memory(fn, device):
    """Bytes of the largest rise of allocated tensor memory during one call of fn (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # The profiler reports every allocation and free of the CPU allocator (compiled kernels' buffers too)
    # with the running total since it started; the peak of that total is the answer.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def mib(n):
    return f"{n / 2 ** 20:8.1f} MiB"


# -----------------------------------------------------------------------------
# 1. memory copy


def copy_rate(device, megabytes, repeats):
    """Bytes/s of dst.copy_(src) for a megabytes-sized float32 buffer, counting the read and the write."""
    src = torch.rand(megabytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * 4 / seconds


# -----------------------------------------------------------------------------
# 2. L_geo


def geometry_inputs(clips, num_frames, size, device, seed=0):
    """Plausible teacher outputs: depth 1..3, a camera drifting forward and turning, the cpu preset's FoV."""
    g = torch.Generator().manual_seed(seed)
    depth = 1 + 2 * torch.rand(clips, num_frames, size, size, generator=g)
    frame = torch.arange(num_frames, dtype=torch.float32)
    axis_angle = torch.zeros(clips, num_frames, 3)
    axis_angle[..., 1] = 0.02 * frame
    angle = axis_angle.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    quat = torch.cat([axis_angle / angle * torch.sin(angle / 2), torch.cos(angle / 2)], dim=-1)
    translation = torch.stack([0.01 * frame, 0 * frame, -0.05 * frame], dim=-1).expand(clips, -1, -1)
    w2c = torch.cat([geometry.quat_to_mat(quat), translation[..., None]], dim=-1)  # (B, F, 3, 4)
    focal = size / 2 / math.tan(math.radians(30))
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]]).expand(clips, num_frames, 3, 3)
    frames = torch.rand(clips, num_frames, 3, size, size, generator=g)
    return [x.to(device) for x in (depth, w2c, K, frames)]


def geometry_step(fn, inputs):
    depth, w2c, K, frames = inputs
    depth, w2c = depth.clone().requires_grad_(), w2c.clone().requires_grad_()
    loss, _, _ = fn(depth, w2c, K, frames)
    loss.sum().backward()


def bench_geometry(device, shapes, repeats, copy_bytes_per_s):
    compiled = torch.compile(distill.geometry_loss)
    print("\n## L_geo forward + backward (distill.geometry_loss), eager vs torch.compile")
    print(f"spans {distill.DEFAULTS.spans}; minimum traffic {GEO_VALUES_PER_PAIR_PIXEL} float32 values per "
          "pair-pixel")
    print("| shape (clips x frames x HxW) | pairs | eager | compiled | speed-up | eager peak | compiled peak "
          "| compiled GB/s | of copy rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for clips, num_frames, size in shapes:
        inputs = geometry_inputs(clips, num_frames, size, device)
        num_pairs = distill.span_pairs(num_frames, distill.DEFAULTS.spans)[0].numel()
        started = time.perf_counter()
        geometry_step(compiled, inputs)  # compiles (or loads from the cache)
        compile_seconds = time.perf_counter() - started
        geometry_step(distill.geometry_loss, inputs)
        eager_s, compiled_s = paired_median_times(lambda: geometry_step(distill.geometry_loss, inputs),
                                                  lambda: geometry_step(compiled, inputs), device=device,
                                                  repeats=repeats)
        eager_peak = peak_memory(lambda: geometry_step(distill.geometry_loss, inputs), device)
        compiled_peak = peak_memory(lambda: geometry_step(compiled, inputs), device)
        traffic = GEO_VALUES_PER_PAIR_PIXEL * 4 * clips * num_pairs * size * size
        rate = traffic / compiled_s
        print(f"| {clips} x {num_frames} x {size}x{size} | {num_pairs} | {eager_s * 1e3:.1f} ms | "
              f"{compiled_s * 1e3:.1f} ms | {eager_s / compiled_s:.2f}x | {mib(eager_peak)} | {mib(compiled_peak)} | "
              f"{rate / 1e9:.2f} | {100 * rate / copy_bytes_per_s:.1f}% |")
        results.append((eager_s / compiled_s, compile_seconds))
    print("compile (first call, or cache load): " + ", ".join(f"{c:.0f} s" for _, c in results))
    return results


# -----------------------------------------------------------------------------
# 3. teacher, 4. training step, 5. sampling


def load_bench_teacher(path, device):
    import teacher  # only bench and training load the teacher; sampling never does
    if path is None and os.path.isfile(distill.DEFAULTS.teacher):
        path = distill.DEFAULTS.teacher
    if path is None:
        torch.manual_seed(0)
        return teacher.freeze(teacher.VGGT(teacher.SMALL_TEACHER)).to(device), "random SMALL_TEACHER"
    return teacher.freeze(teacher.load_vggt(path)).to(device), path


def bench_teacher(teacher_model, device, batch_size, config, repeats):
    """The teacher with its camera head only, and with the aligned cameras (alignment.py) on top."""
    import data
    import teacher
    print(f"\n## teacher at the student's training shape ({config.num_frames} frames of "
          f"{config.image_size}x{config.image_size}, resized to its input size "
          f"{teacher.teacher_input_size(teacher_model.config, config.image_size, config.image_size)})")
    print("| clips | cameras | forward | forward + backward to the frames |")
    print("|---|---|---|---|")
    teacher_clips = math.ceil(distill.DEFAULTS.teacher_fraction * batch_size)
    clip = data.render_clip(0, config.num_frames, config.image_size, config.image_size)  # a real clip: the
    for clips in sorted({teacher_clips, batch_size}):  # alignment converges on it as in training
        frames = clip["video"].expand(clips, -1, -1, -1, -1).contiguous().to(device)
        K = clip["K"].expand(clips, 3, 3).to(device)
        for cameras in distill.CAMERA_SOURCES:
            def forward(cameras=cameras):
                with torch.no_grad():
                    distill.teacher_geometry(teacher_model, frames, cameras, intrinsics=K)

            def forward_backward(cameras=cameras):
                x = frames.clone().requires_grad_()
                seen = distill.teacher_geometry(teacher_model, x, cameras, intrinsics=K)
                (seen["depth"].mean() + seen["extrinsics"].mean()).backward()

            print(f"| {clips}{' (distilled per step)' if clips == teacher_clips else ' (whole batch)'} | {cameras} | "
                  f"{median_time(forward, device, repeats) * 1e3:.0f} ms | "
                  f"{median_time(forward_backward, device, repeats) * 1e3:.0f} ms |")


def bench_steps(teacher_model, device, batch_size, config, repeats, use_compile):
    """A full optimisation step (losses, backward, clip, AdamW) of each method on the same batches: Sparse, a
    CamGeo step that runs the teacher, one the teacher skips (--teacher-every N > 1 runs N - 1 of those between two
    teacher steps), and their mean over train.py's default cadence (what a CamGeo run costs per step once the
    warm-up is over). -> that mean / the Sparse step."""
    import data
    import training
    clips = training.collate([data.render_clip(seed, config.num_frames, config.image_size, config.image_size)
                           for seed in range(batch_size)])
    geometry_pairs = training.make_geometry_pairs(use_compile)
    steps = {}
    every = distill.DEFAULTS.teacher_every  # train.py's default cadence
    # about step 60 of 100 (alpha ~ 1, beta ~ 0.97: both distillation losses are computed), on any cadence up to 6;
    # "between" is step 61 at --teacher-every 2: a CamGeo step the teacher skips, what a cadence N > 1 saves
    for name, method, at_step, cadence in (("sparse", "sparse", 60, every), ("camgeo", "camgeo", 60, every),
                                           ("camgeo_between", "camgeo", 61, 2)):
        args = training.parse_args(["--method", method, "--preset", "cpu", "--steps", "100", "--batch-size",
                                 str(batch_size), "--teacher-every", str(cadence)])
        torch.manual_seed(0)
        model = camgeo.CamGeo(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)

        def step(args=args, model=model, optimizer=optimizer, generator=generator, at_step=at_step):
            loss, _ = training.step_losses(args, model, teacher_model, geometry_pairs, clips, at_step, generator,
                                           config, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.GRAD_CLIP)
            optimizer.step()

        for _ in range(2):  # the first CamGeo steps compile L_geo (or load it from the cache): not timed
            step()
        steps[name] = step
    sparse, teacher_step, between = paired_median_times(steps["sparse"], steps["camgeo"], steps["camgeo_between"],
                                                         device=device, repeats=repeats)
    mean = (teacher_step + (every - 1) * between) / every
    print(f"\n## training step, cpu preset, batch {batch_size}: the teacher sees at most "
          f"{math.ceil(distill.DEFAULTS.teacher_fraction * batch_size)} of the {batch_size} clips (gated by noise "
          f"level), on one step in {every}")
    print("| Sparse step | CamGeo step with the teacher (aligned cameras, teacher-consistent target) | CamGeo step "
          f"without | CamGeo, mean over {every} step(s) | teacher step / Sparse | mean / Sparse (target <= 1.5) |")
    print("|---|---|---|---|---|---|")
    print(f"| {sparse * 1e3:.0f} ms | {teacher_step * 1e3:.0f} ms | {between * 1e3:.0f} ms | {mean * 1e3:.0f} ms | "
          f"{teacher_step / sparse:.2f}x | {mean / sparse:.2f}x |")
    return mean / sparse


def bench_sampling(device, config, repeats, num_steps):
    """sample.py's path: load a checkpoint, sample; CamGeo and Sparse checkpoints hold the same network."""
    import data
    import training
    clip = data.render_clip(0, config.num_frames, config.image_size, config.image_size)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in ("sparse", "camgeo"):
            args = training.parse_args(["--method", method, "--preset", "cpu", "--out", folder])
            torch.manual_seed(0)
            model, ema = camgeo.CamGeo(config), camgeo.CamGeo(config)
            optimizer = torch.optim.AdamW(model.parameters())
            training.save_checkpoint(folder, model, ema, optimizer, config, args, 0, [])
            loaded, info = camgeo.load_checkpoint(os.path.join(folder, training.CKPT_NAME), device=device)
            camera, _, _ = conditioning.camera_inputs(clip["w2c"][None], clip["K"][None], method, 0.5,
                                               height=config.image_size, width=config.image_size)
            reference = clip["video"][None, 0].to(device)

            def run(loaded=loaded, camera=camera.to(device), reference=reference):
                camgeo.sample(loaded, reference, [clip["prompt"]], camera, num_steps=num_steps)

            run()
            runs[info["method"]] = run
    times = dict(zip(("sparse", "camgeo"), paired_median_times(runs["sparse"], runs["camgeo"], device=device,
                                                               repeats=repeats)))
    print(f"\n## sampling ({num_steps} Euler steps with guidance, one clip, cpu preset)")
    print("| Sparse checkpoint | CamGeo checkpoint | ratio |")
    print("|---|---|---|")
    print(f"| {times['sparse'] * 1e3:.0f} ms | {times['camgeo'] * 1e3:.0f} ms | "
          f"{times['camgeo'] / times['sparse']:.2f}x |")


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"bench.py{' --quick' if args.quick else ''}: device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    repeats = 3 if args.quick else 10

    rate = copy_rate(device, 64 if args.quick else 256, repeats)
    print(f"\n## memory copy: {rate / 1e9:.2f} GB/s (read + write of a {64 if args.quick else 256} MiB buffer)")

    config = camgeo.PRESETS["cpu"]
    teacher_clips = math.ceil(distill.DEFAULTS.teacher_fraction * 8)
    shapes = [(teacher_clips, config.num_frames, config.image_size),
              (4, 16, 64) if args.quick else (8, 16, 64)]
    speedups = bench_geometry(device, shapes, repeats, rate)

    teacher_model, teacher_name = load_bench_teacher(args.teacher, device)
    print(f"\nteacher: {teacher_name}")
    batch_size = 8  # the cpu preset's
    bench_teacher(teacher_model, device, batch_size, config, max(3, repeats // 2))
    step_ratio = bench_steps(teacher_model, device, batch_size, config, max(3, repeats // 2), use_compile=True)
    bench_sampling(device, config, 3 if args.quick else 5, 10 if args.quick else 25)

    print("\n## summary")
    print(f"L_geo compiled vs eager: {', '.join(f'{s:.2f}x' for s, _ in speedups)} (target >= 3x); "
          f"CamGeo step / Sparse step: {step_ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
