"""report.py: per-clip files read back and combined, paired differences and their bootstrap intervals."""
import csv
import math

import pytest
import torch

import report


def write_per_clip(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(report.PER_CLIP_COLUMNS)
        for method, keyframes, seed, clip, rot, *images in rows:  # images: PSNR, co-visible PSNR if given
            psnr, covisible = (*images, 20.0, 18.0)[:2]
            writer.writerow([f"{method}_{keyframes}_{seed}", method, keyframes, seed, clip, rot, 1.0, 1.0,
                             psnr, 0.5, covisible, 0.1])


def write_old_per_clip(path, rows):
    """A per_clip.csv as written before the co-visible PSNR column existed."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c for c in report.PER_CLIP_COLUMNS if c != "PSNR_covisible"])
        for method, keyframes, seed, clip, rot in rows:
            writer.writerow([f"{method}_{keyframes}_{seed}", method, keyframes, seed, clip, rot, 1.0, 1.0, 20.0,
                             0.5, 0.1])


def test_paired_difference_pairs_clips_and_seeds_and_its_interval_covers_a_known_shift(tmp_path):
    rng = torch.Generator().manual_seed(0)
    parts = []
    for seed in (0, 1):  # one file per part of the study
        sparse = torch.rand(20, generator=rng)
        rows = [("Sparse", "1/2", seed, c, sparse[c].item()) for c in range(20)]
        rows += [("CamGeo", "1/2", seed, c, sparse[c].item() - 0.1) for c in range(20)]  # exactly 0.1 better
        parts.append(tmp_path / f"part{seed}.csv")
        write_per_clip(parts[-1], rows)
    records = report.read_per_clip(parts)
    line = report.paired_differences(records)[-1]
    assert "| 1/2 | 40 |" in line
    rot = line.split(" | ")[3]
    assert rot.startswith("-0.100 [-0.100, -0.100]")  # a constant shift: no spread to resample
    rows = {(r["method"], r["keyframes"]): r for r in report.table_rows(records)}
    assert rows[("CamGeo", "1/2")]["seeds"] == 2 and rows[("CamGeo", "1/2")]["clips"] == 20


def test_paired_difference_interval_contains_zero_for_noise_alone(tmp_path):
    rng = torch.Generator().manual_seed(1)
    rows = [(m, "1/4", 0, c, torch.rand(1, generator=rng).item()) for m in ("Sparse", "CamGeo") for c in range(30)]
    write_per_clip(tmp_path / "part.csv", rows)
    rot = report.paired_differences(report.read_per_clip([tmp_path / "part.csv"]))[-1].split(" | ")[3]
    low, high = (float(x) for x in rot.split("[")[1].rstrip("]").split(", "))
    assert low < 0 < high


def test_combine_keeps_a_video_shared_by_two_parts_once_and_rejects_another_video_in_its_place(tmp_path):
    # two parts of one seed: different methods, the same ground-truth floor in both
    write_per_clip(tmp_path / "a.csv", [("Sparse", "1/2", 0, c, 0.5) for c in range(3)]
                   + [("Floor", "all", 0, c, 0.1) for c in range(3)])
    write_per_clip(tmp_path / "b.csv", [("CamGeo", "1/2", 0, c, 0.4) for c in range(3)]
                   + [("Floor", "all", 0, c, 0.1) for c in range(3)])
    notes = []
    records = report.read_per_clip([tmp_path / "a.csv", tmp_path / "b.csv"], notes)
    assert sorted((r["method"], r["clip_seed"]) for r in records if r["method"] == "Floor") == [
        ("Floor", 0), ("Floor", 1), ("Floor", 2)]
    assert len(records) == 9
    assert notes[0].startswith("3 videos were scored in two parts") and "camera scores agree too" in notes[0]
    # the same video (same image scores), its camera estimated on another machine: the first kept, the spread noted
    write_per_clip(tmp_path / "c.csv", [("Floor", "all", 0, 1, 0.13)])
    notes = []
    records = report.read_per_clip([tmp_path / "a.csv", tmp_path / "c.csv"], notes)
    assert [r["RotErr"] for r in records if r["method"] == "Floor"] == [0.1, 0.1, 0.1]
    assert "differ for 1 of them, by at most RotErr 0.03," in notes[0]
    # another video in its place (other image scores): an error, not a silent choice
    write_per_clip(tmp_path / "d.csv", [("Floor", "all", 0, 1, 0.1, 21.0)])
    with pytest.raises(ValueError, match="clip 1 is in .*a.csv and in .*d.csv with different scores"):
        report.read_per_clip([tmp_path / "a.csv", tmp_path / "d.csv"])


def test_compare_pairs_the_same_run_scored_twice(tmp_path):
    write_per_clip(tmp_path / "a.csv", [("Sparse", "1/2", 0, c, 0.1 * c) for c in range(5)])
    write_per_clip(tmp_path / "b.csv", [("Sparse", "1/2", 0, c, 0.1 * c + 0.25) for c in range(5)])
    lines = report.compare_scorings(tmp_path / "a.csv", tmp_path / "b.csv")
    assert lines[0].startswith("| Sparse, scored again − Sparse |")
    assert lines[2].split(" | ")[3].startswith("+0.250 [+0.250, +0.250]")
    write_per_clip(tmp_path / "c.csv", [("CamGeo", "1/2", 0, c, 0.1) for c in range(5)])
    with pytest.raises(ValueError, match="no student run in common"):
        report.compare_scorings(tmp_path / "a.csv", tmp_path / "c.csv")


def test_table_rows_go_ratio_by_ratio_in_the_given_method_order_with_other_rows_last(tmp_path):
    rows = [(method, keyframes, 0, c, 0.5) for method, keyframes in
            [("Floor", "all"), ("CamGeo", "1/4"), ("Sparse", "1/2"), ("CamGeo", "1/2"), ("Full", "all")]
            for c in range(2)]
    write_per_clip(tmp_path / "part.csv", rows)
    table = report.table_rows(report.read_per_clip([tmp_path / "part.csv"]), ["Full", "Sparse", "CamGeo"])
    assert [(row["method"], row["keyframes"]) for row in table] == [
        ("Full", "all"), ("Sparse", "1/2"), ("CamGeo", "1/2"), ("CamGeo", "1/4"), ("Floor", "all")]


def test_a_per_clip_file_without_the_covisible_column_reads_as_missing_and_combines_with_a_newer_one(tmp_path):
    write_old_per_clip(tmp_path / "old.csv", [(m, "1/2", 0, c, 0.5) for m in ("Sparse", "Floor") for c in range(3)])
    write_per_clip(tmp_path / "new.csv", [("CamGeo", "1/2", 0, c, 0.4, 20.0, 17.0 + c) for c in range(3)]
                   + [("Floor", "1/2", 0, c, 0.5, 20.0, 30.0) for c in range(3)])
    records = report.read_per_clip([tmp_path / "old.csv", tmp_path / "new.csv"])
    by_method = {m: [r["PSNR_covisible"] for r in records if r["method"] == m] for m in ("Sparse", "CamGeo", "Floor")}
    assert all(math.isnan(x) for x in by_method["Sparse"]) and by_method["CamGeo"] == [17.0, 18.0, 19.0]
    assert by_method["Floor"] == [30.0] * 3  # kept as the old file scores it, the missing score from the new one
    rows = {row["method"]: row for row in report.table_rows(records)}
    assert math.isnan(rows["Sparse"]["PSNR_covisible"]) and rows["CamGeo"]["PSNR_covisible"] == pytest.approx(18.0)
    report.write_tables(report.table_rows(records), tmp_path, ["notes"])
    sparse_line = next(line for line in open(tmp_path / "table.md") if line.startswith("| Sparse |"))
    assert sparse_line.split(" | ")[7] == "—"  # the co-visible cell: missing, not nan
    # a difference is taken over the clips where both have the score: none here, so no number
    line = report.paired_differences(records)[-1]
    assert line.split(" | ")[3].startswith("-0.100 [-0.100, -0.100]") and line.split(" | ")[-1] == "— |"
