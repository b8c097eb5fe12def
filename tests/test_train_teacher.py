"""train_teacher.py: the small teacher's training run writes a loadable teacher; its evaluation scores the head's
and the aligned cameras against trivial baselines on clean and degraded frames."""
import argparse

import torch

import teacher
import train_teacher


def test_a_short_training_run_writes_a_small_teacher_that_loads(tmp_path):
    out = str(tmp_path / "teacher.safetensors")
    args = argparse.Namespace(seed=0, train_clips=2, frames=2, lr=1e-3, steps=2, batch_size=2, camera_weight=5.0,
                              point_weight=1.0, out=out, half=True)
    train_teacher.train_small_teacher(args)
    model = teacher.load_vggt(out)
    assert model.config == teacher.SMALL_TEACHER
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored in float16, run in float32


def test_camera_loss_weighs_the_last_refinement_most():
    target = torch.zeros(1, 2, 9)
    wrong = torch.ones(1, 2, 9)
    first_wrong = train_teacher.camera_loss([wrong, target, target], target)
    last_wrong = train_teacher.camera_loss([target, target, wrong], target)
    assert last_wrong > first_wrong > 0


def test_eval_table_scores_head_and_aligned_cameras_on_clean_and_degraded_frames():
    torch.manual_seed(0)
    model = teacher.VGGT(teacher.SMALL_TEACHER)
    clips = train_teacher.render_split("test", 2, 3, teacher.SMALL_TEACHER.img_size)
    table = train_teacher.eval_table(model, clips)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert {(row[1], row[2]) for row in rows if row[0].startswith("| rotation_deg")} == {
        ("clean", "head"), ("clean", "aligned"), ("degraded", "head"), ("degraded", "aligned")}
    aligned_fov = [row for row in rows if row[0].startswith("| fov_deg") and row[2] == "aligned"]
    assert all(float(row[3]) == 0 for row in aligned_fov)  # the true intrinsics are given to the alignment
