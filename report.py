"""The study read back: per-clip results combined into one table, the paired differences with their bootstrap
intervals, and the pictures a study draws.

evaluate.py runs the study (trains, samples, estimates, scores) and writes each video's scores to
OUT/per_clip.csv; everything here works from those files, or from videos and camera paths already in memory,
so the parts of a study that ran on different days or machines combine into one table without rerunning
anything (python results.py combine PART.csv ... --out OUT). A module, not a program: the study and the check
import it; results.py is the program that reads results back.
"""
import csv
import math
import os
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import geometry

# every video's scores, in per_clip.csv's order; PSNR_covisible: PSNR on the pixels each frame shares with the
# reference (evaluation.covisible_psnr)
METRICS = ("RotErr", "TransErr", "CamMC", "PSNR", "SSIM", "PSNR_covisible")
OPTIONAL_METRICS = ("PSNR_covisible",)  # absent from older per_clip.csv files: read as missing (NaN)

# ----------------------------------------------------------------------------------------------
# Per-clip results and paired differences

PER_CLIP_COLUMNS = ("run", "method", "keyframes", "train_seed", "clip_seed", *METRICS, "sample_s")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def read_per_clip(paths, notes=None):
    """per_clip.csv files (parts of a study: a training seed, or a set of methods, each) -> list of dicts with
    numbers. A video scored in two parts (the reference rows are in every part) is kept once, as the first file
    scores it. Its image scores must agree: otherwise the two lines are different videos, an error, since one of
    them would silently win. Its camera scores may differ a little when the parts ran on different machines (the
    estimator's hundreds of optimisation steps round differently on another CPU); the largest difference of each
    is then appended to notes, as the camera scores' machine-to-machine spread."""
    records, seen, camera_differences = [], {}, []
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                missing = set(PER_CLIP_COLUMNS) - set(OPTIONAL_METRICS) - row.keys()
                if missing:
                    raise ValueError(f"{path}: not a per-clip results file (missing columns {sorted(missing)})")
                key = (row["run"], row["train_seed"], row["clip_seed"])
                values = np.array([float(row.get(name) or "nan") for name in METRICS])
                if key in seen:
                    first_path, first = seen[key]
                    image = slice(3, None)  # PSNR, SSIM, PSNR_covisible: the same video, the same on any machine
                    both = ~np.isnan(first[image]) & ~np.isnan(values[image])  # a column one file lacks: no test
                    if not np.allclose(first[image][both], values[image][both], rtol=1e-5, atol=1e-6):
                        raise ValueError(f"run {key[0]}, training seed {key[1]}, clip {key[2]} is in {first_path} "
                                         f"and in {path} with different scores")
                    camera_differences.append(np.abs(first[:3] - values[:3]))
                    first[np.isnan(first)] = values[np.isnan(first)]  # what the first file lacks, the other gives
                    continue
                record = {**row, "train_seed": int(row["train_seed"]), "clip_seed": int(row["clip_seed"]),
                          "sample_s": float(row["sample_s"])}
                seen[key] = (path, values)
                records.append(record)
    for record, (_, values) in zip(records, seen.values()):  # filled in place above, so read them last
        record.update(zip(METRICS, values.tolist()))
    if notes is not None and camera_differences:
        largest, changed = np.max(camera_differences, axis=0), sum(d.any() for d in camera_differences)
        note = f"{len(camera_differences)} videos were scored in two parts, the same image scores in both; "
        if changed:
            note += (f"the camera scores differ for {changed} of them, by at most "
                     + ", ".join(f"{name} {x:.3g}" for name, x in zip(METRICS, largest))
                     + " (the estimator is deterministic on one machine, but rounds differently on another).")
        else:
            note += "the camera scores agree too."
        notes.append(note)
    return records


def known(values):
    """The values that are not missing (NaN: a score an older per_clip.csv does not have), as an array."""
    values = np.array(values, dtype=np.float64)
    return values[~np.isnan(values)]


def statistic(function, values):
    """function(values) as a float, NaN for no values (instead of numpy's warning)."""
    return float(function(values)) if len(values) else float("nan")


def table_rows(records, method_order=()):
    """One row per (method, keyframes): metrics pooled over clips and seeds. Spread over clips (all videos) and,
    with two or more seeds, the spread of the per-seed means (how much a retrained model moves the number).
    Rows go ratio by ratio (all poses first), methods in method_order, then any method not in it (the reference
    rows) in the order of the records."""
    groups = {}
    for record in records:
        groups.setdefault((record["method"], record["keyframes"]), []).append(record)
    method_order = list(method_order)
    def order(key):
        method, keyframes = key
        fraction = 1.0 if keyframes == "all" else float(Fraction(keyframes))
        return (method not in method_order, -fraction, method_order.index(method) if method in method_order else 0)

    rows = []
    for (method, keyframes), group in sorted(groups.items(), key=lambda item: order(item[0])):
        seeds = sorted({r["train_seed"] for r in group})
        row = {"method": method, "keyframes": keyframes, "clips": len({r["clip_seed"] for r in group}),
               "seeds": len(seeds), "sample_s_per_video": float(np.mean([r["sample_s"] for r in group]))}
        for name in METRICS:
            values = known([r[name] for r in group])
            per_seed = known([statistic(np.mean, known([r[name] for r in group if r["train_seed"] == s]))
                              for s in seeds])
            row[name], row[f"{name}_median"] = statistic(np.mean, values), statistic(np.median, values)
            row[f"{name}_std_clips"] = statistic(np.std, values)
            row[f"{name}_std_seeds"] = statistic(np.std, per_seed) if len(per_seed) > 1 else float("nan")
        rows.append(row)
    return rows


def paired_differences(records, method="CamGeo", baseline="Sparse", metrics=METRICS):
    """method - baseline per (training seed, clip) pair, at every keyframe ratio both were run at, with a
    bootstrap 95% interval of the mean (clips resampled with replacement, all seeds of a clip kept together, so
    the interval covers which clips were drawn), for each of `metrics`, over the clips where both have it ('—'
    where none has). Returns Markdown lines."""
    by_key = {(r["method"], r["keyframes"], r["train_seed"], r["clip_seed"]): r for r in records}
    lines = [f"| {method} − {baseline} | keyframes | pairs | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 3) + "|"]
    for keyframes in sorted({r["keyframes"] for r in records if r["method"] == method}):
        pairs = [(by_key[key], by_key[(baseline, *key[1:])]) for key in by_key
                 if key[0] == method and key[1] == keyframes and (baseline, *key[1:]) in by_key]
        if not pairs:
            continue
        clips = sorted({a["clip_seed"] for a, _ in pairs})
        cells = []
        for name in metrics:
            # per clip: the difference averaged over training seeds; the mean over clips is then bootstrapped
            per_clip = known([statistic(np.mean, known([a[name] - b[name] for a, b in pairs
                                                         if a["clip_seed"] == c])) for c in clips])
            if not len(per_clip):
                cells.append("—")
                continue
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            draws = rng.integers(0, len(per_clip), size=(BOOTSTRAP_RESAMPLES, len(per_clip)))
            low, high = np.percentile(per_clip[draws].mean(axis=1), [2.5, 97.5])
            cells.append(f"{per_clip.mean():+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| | {keyframes} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


def compare_scorings(first_path, second_path):
    """Two per_clip.csv files that score the same student runs (the run retrained, or its videos estimated on
    another machine) -> Markdown lines: second - first, paired by clip, for every student run in both. What a
    study's paired intervals resample is the clips; this is how much the same run moves without any change of
    method, which a difference between methods has to exceed."""
    first, second = read_per_clip([first_path]), read_per_clip([second_path])
    students = lambda records: {r["run"] for r in records if not np.isnan(r["sample_s"])}  # references: no sampling
    runs = sorted(students(first) & students(second))
    if not runs:
        raise ValueError(f"{first_path} and {second_path} score no student run in common")
    lines = []
    for run in runs:
        method = next(r["method"] for r in first if r["run"] == run)
        again = f"{method}, scored again"
        records = [r for r in first if r["run"] == run] + [{**r, "method": again} for r in second if r["run"] == run]
        lines += paired_differences(records, again, method) + [""]
    return lines


# ----------------------------------------------------------------------------------------------
# Tables and pictures


def write_tables(rows, out_dir, notes, differences=()):
    """table_rows -> OUT/table.csv (every statistic) and OUT/table.md (the notes, a cell per metric: mean ± std
    over clips (median), and the paired differences' Markdown lines below)."""
    columns = ["method", "keyframes", "clips", "seeds"] + [
        f"{name}{suffix}" for name in METRICS for suffix in ("", "_median", "_std_clips", "_std_seeds")] + [
        "sample_s_per_video"]
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    arrows = {"RotErr": "↓", "TransErr": "↓", "CamMC": "↓", "PSNR": "↑", "SSIM": "↑", "PSNR_covisible": "↑"}
    lines = ["| method | keyframes | " + " | ".join(f"{m} {arrows[m]}" for m in METRICS) + " | sampling s/video |",
             "|---" * (len(METRICS) + 3) + "|"]
    for row in rows:
        cells = []
        for name in METRICS:
            if math.isnan(row[name]):  # a score the per-clip files do not have
                cells.append("—")
                continue
            cell = f"{row[name]:.3f} ± {row[name + '_std_clips']:.3f} ({row[name + '_median']:.3f})"
            if not math.isnan(row[name + "_std_seeds"]):
                cell += f" (seeds ± {row[name + '_std_seeds']:.3f})"
            cells.append(cell)
        seconds = "—" if math.isnan(row["sample_s_per_video"]) else f"{row['sample_s_per_video']:.3f}"
        lines.append(f"| {row['method']} | {row['keyframes']} | " + " | ".join(cells) + f" | {seconds} |")
    if differences:
        lines += ["", "Paired differences, mean over clips [bootstrap 95% interval]; negative is better for RotErr, "
                  "TransErr and CamMC, positive for the PSNRs and SSIM:", "", *differences]
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(notes + [""] + lines) + "\n")


# Pillow's bitmap font: the default scalable one, hinted at its 10 px, draws single spaces too narrow to see.
LABEL_FONT = ImageFont.load_default_imagefont()
# enough distinct colours for every method and ablation of a study at one ratio (11 paths)
PALETTE = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152),
           (108, 113, 196), (203, 75, 22), (100, 100, 100), (0, 0, 128), (128, 64, 0), (0, 150, 60)]


def draw_trajectories(clips, named_paths, path, keyframes=(), panel=260):
    """Top-down (x right, z forward of camera 0) camera centres: requested path in black with the given keyframes
    ringed, each method's estimated path in colour. named_paths: list of (label, (C, F, 4, 4) c2w)."""
    legend_height = 18 * (len(named_paths) + 1) + 8
    image = Image.new("RGB", (panel * len(clips), panel + legend_height), "white")
    draw = ImageDraw.Draw(image)
    for c, clip in enumerate(clips):
        tracks = [geometry.relative_to_first(clip.c2w)] + [geometry.relative_to_first(p[c]) for _, p in named_paths]
        xz = [t[:, [0, 2], 3].numpy() for t in tracks]  # (F, 2) each
        # fit the requested path (and any estimate within 3x its extent) into the panel
        reach = max(np.abs(xz[0]).max(), 0.05)
        extent = max(reach, min(max(np.abs(p).max() for p in xz), 3 * reach)) * 1.15
        to_pixel = lambda p: (c * panel + panel / 2 + p[0] / extent * panel / 2,
                              panel / 2 - p[1] / extent * panel / 2)  # forward (z) points up
        draw.rectangle([c * panel, 0, (c + 1) * panel - 1, panel - 1], outline=(200, 200, 200))
        for k, track in enumerate(xz):
            colour = (0, 0, 0) if k == 0 else PALETTE[(k - 1) % len(PALETTE)]
            points = [to_pixel(np.clip(p, -extent, extent)) for p in track]
            draw.line(points, fill=colour, width=3 if k == 0 else 2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            if k == 0:
                for f in keyframes:
                    x, y = points[f]
                    draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(0, 0, 0), width=2)
        draw.text((c * panel + 6, 4), f"clip {clip.seed}  (half-width {extent:.2f} m)", fill=(0, 0, 0),
                  font=LABEL_FONT)
    y = panel + 6
    for k, (label, _) in enumerate([("requested (ground truth); rings: keyframes given", None)] + named_paths):
        colour = (0, 0, 0) if k == 0 else PALETTE[(k - 1) % len(PALETTE)]
        draw.line([(8, y + 6), (36, y + 6)], fill=colour, width=3)
        draw.text((44, y), label, fill=(0, 0, 0), font=LABEL_FONT)
        y += 18
    image.save(path)


def draw_frames(clips, named_videos, path, scale=3):
    """Rows: ground truth, then each method's generated video; columns: frames; one block per clip."""
    rows = [("ground truth", torch.stack([c.video for c in clips]))] + named_videos
    texts = [[label + (f" ({clip.seed})" if r == 0 else "") for r, (label, _) in enumerate(rows)] for clip in clips]
    label_width = 12 + max(int(LABEL_FONT.getlength(text)) for clip_texts in texts for text in clip_texts)
    num_frames, _, H, W = clips[0].video.shape
    tile_h, tile_w = H * scale, W * scale
    image = Image.new("RGB", (label_width + num_frames * tile_w, len(clips) * (len(rows) * tile_h + 12)), "white")
    draw = ImageDraw.Draw(image)
    for c in range(len(clips)):
        top = c * (len(rows) * tile_h + 12)
        for r, (_, videos) in enumerate(rows):
            y = top + r * tile_h
            draw.text((4, y + tile_h // 2 - 6), texts[c][r], fill=(0, 0, 0), font=LABEL_FONT)
            frames = data.frames_to_uint8(videos[c])
            for f, frame in enumerate(frames):
                tile = Image.fromarray(frame).resize((tile_w, tile_h), Image.NEAREST)
                image.paste(tile, (label_width + f * tile_w, y))
    image.save(path)
