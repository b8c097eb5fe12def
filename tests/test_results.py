"""results.py: parts of a study combined into one table, two scorings compared, and cached runs scored again with
invisible noise (smoke_study: conftest.py)."""
import os

import pytest
import torch

import results
from test_report import write_old_per_clip, write_per_clip


def test_combine_writes_one_table_from_several_parts(tmp_path):
    for seed in (0, 1):
        write_per_clip(tmp_path / f"p{seed}.csv", [(m, "1/2", seed, c, 0.5) for m in ("Sparse", "CamGeo")
                                                   for c in range(3)])
    results.main(["combine", str(tmp_path / "p0.csv"), str(tmp_path / "p1.csv"), "--out", str(tmp_path / "all")])
    table = open(tmp_path / "all" / "table.md").read()
    assert "| CamGeo | 1/2 |" in table and "CamGeo − Sparse" in table


def test_combine_reads_a_part_written_before_the_covisible_column(tmp_path):
    write_old_per_clip(tmp_path / "old.csv", [(m, "1/2", 0, c, 0.5) for m in ("Sparse", "CamGeo") for c in range(3)])
    text = results.combine([str(tmp_path / "old.csv")], str(tmp_path / "out"))
    assert "| CamGeo | 1/2 |" in text and text.count("| — |") >= 2  # the missing column, in table and differences


def test_combine_rejects_a_file_that_is_not_per_clip_results(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a per-clip results file"):
        results.main(["combine", str(tmp_path / "other.csv"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="no results file at"):
        results.main(["compare", str(tmp_path / "other.csv"), str(tmp_path / "missing.csv")])


def test_compare_prints_the_second_scoring_minus_the_first(tmp_path, capsys):
    write_per_clip(tmp_path / "a.csv", [("Sparse", "1/2", 0, c, 0.1 * c) for c in range(5)])
    write_per_clip(tmp_path / "b.csv", [("Sparse", "1/2", 0, c, 0.1 * c + 0.25) for c in range(5)])
    results.main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| Sparse, scored again − Sparse |")
    assert lines[2].split(" | ")[3].startswith("+0.250 [+0.250, +0.250]")


def test_rescore_reproduces_a_cached_run_without_noise_and_moves_it_with_noise(smoke_study, capsys):
    cache = os.path.join(smoke_study, "runs", "sparse_0.5_0.pt")
    results.main(["rescore", cache, "--preset", "smoke", "--noise", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| sparse_0.5_0, noise 0 − sparse_0.5_0, as cached |")
    assert all(cell.startswith("+0.000 [+0.000, +0.000]") for cell in lines[2].strip(" |").split(" | ")[3:])
    results.main(["rescore", cache, "--preset", "smoke", "--noise", "0.05"])
    cells = capsys.readouterr().out.splitlines()[2].split(" | ")
    psnr, covisible = cells[6], cells[8]
    assert psnr.startswith("-") and covisible.startswith("-")  # the noise itself lowers PSNR
    with pytest.raises(ValueError, match="another estimator configuration"):
        results.main(["rescore", cache, "--preset", "cpu"])


def test_rescore_of_two_runs_pairs_their_draw_averaged_scores(smoke_study, tmp_path, capsys):
    cache = os.path.join(smoke_study, "runs", "sparse_0.5_0.pt")
    again = tmp_path / "again.pt"
    stored = torch.load(cache, weights_only=True)
    torch.save({**stored, "videos": stored["videos"] * 0.5}, again)  # darker videos of the same clips
    results.main(["rescore", cache, str(again), "--preset", "smoke", "--noise", "0.01", "--draws", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert "mean of 2 draws" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith(f"| {again} − {cache} |"))
    assert lines[header + 2].split(" | ")[6].startswith("-")  # darker: lower PSNR
    with pytest.raises(ValueError, match="one or two runs"):
        results.main(["rescore", cache, cache, cache, "--preset", "smoke"])
    with pytest.raises(ValueError, match="no cached run at"):
        results.main(["rescore", str(tmp_path / "missing.pt"), "--preset", "smoke"])
