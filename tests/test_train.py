"""The training script (train.py): smoke runs per method, what they write, EMA and learning rate, a CamGeo run's log,
exact resume after a kill, the NaN guard, DistributedDataParallel under torchrun.

A kill and a NaN are injected by wrapping training.step_losses (the loop calls it through the module), so train.py
carries no option for tests."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import camgeo
import data
import distill
import re10k
import teacher
import train
import training

SMOKE = camgeo.PRESETS["smoke"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A small teacher with random weights (the runs below test plumbing, not what the teacher knows)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    teacher.save_teacher(teacher.VGGT(teacher.SMALL_TEACHER), path)
    return path


def smoke_args(tmp_path, method, steps=3, extra=(), name=None, teacher_file=None):
    out = str(tmp_path / (name or method))
    distillation = ["--teacher", teacher_file, "--no-compile"] if method == "camgeo" else []
    return training.parse_args(["--preset", "smoke", "--method", method, "--steps", str(steps), "--out", out,
                                "--num-workers", "0", "--num-clips", "4", *distillation, *extra])


def smoke_run(tmp_path, method, steps=3, extra=(), name=None, teacher_file=None):
    args = smoke_args(tmp_path, method, steps, extra, name, teacher_file)
    train.train(args)
    return args.out


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, training.LOG_NAME))]


def checkpoint_tensors(out):
    with safe_open(os.path.join(out, training.CKPT_NAME), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("method", training.METHODS)
def test_smoke_run_writes_loadable_checkpoint_and_log(tmp_path, method, teacher_path):
    out = smoke_run(tmp_path, method, teacher_file=teacher_path)
    model, info = camgeo.load_checkpoint(os.path.join(out, training.CKPT_NAME))
    assert info["method"] == method and info["step"] == 3 and info["config"] == SMOKE
    assert isinstance(model, camgeo.CamGeo)
    train_state = torch.load(os.path.join(out, training.TRAIN_STATE_NAME), weights_only=True)
    assert train_state["step"] == 3 and len(train_state["optimizer"]["state"]) == len(list(model.parameters()))
    records = read_log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["lr"] > 0 for r in records)


def test_checkpoint_holds_model_and_ema_weights_under_prefixes(tmp_path):
    out = smoke_run(tmp_path, "sparse", steps=2)
    with safe_open(os.path.join(out, training.CKPT_NAME), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    names = set(camgeo.CamGeo(SMOKE).state_dict())
    assert keys == {"model." + k for k in names} | {"ema." + k for k in names}
    assert json.loads(metadata["config"]) == json.loads(camgeo.config_to_json(SMOKE))
    assert json.loads(metadata["options"])["sparse"] == 0.5


def test_ema_weights_differ_from_model_weights_after_training(tmp_path):
    out = smoke_run(tmp_path, "sparse", steps=3)
    ema, _ = camgeo.load_checkpoint(os.path.join(out, training.CKPT_NAME), weights="ema")
    model, _ = camgeo.load_checkpoint(os.path.join(out, training.CKPT_NAME), weights="model")
    differs = [not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters())]
    assert any(differs)


def test_checkpoint_writing_leaves_no_temporary_files(tmp_path):
    out = smoke_run(tmp_path, "full", steps=2)
    assert sorted(os.listdir(out)) == sorted([training.CKPT_NAME, training.TRAIN_STATE_NAME, training.LOG_NAME])


def test_update_ema_moves_ema_towards_model():
    model, ema = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = (ema.weight - model.weight).abs().sum().item()
    train.update_ema(ema, model, decay=0.5)
    assert (ema.weight - model.weight).abs().sum().item() == pytest.approx(0.5 * before, rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [train.learning_rate(step, 1000, 1e-3) for step in range(1000)]
    peak = lrs.index(max(lrs))
    assert lrs[0] < max(lrs) and 0 < peak < 100
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(train.MIN_LR_FRACTION * 1e-3, rel=0.01)


def test_smoke_run_trains_on_a_realestate10k_folder(tmp_path):
    for seed in range(3):
        re10k.write_re10k_clip(data.render_clip(seed, SMOKE.num_frames, 24, 24), str(tmp_path / "re10k"), f"c{seed}")
    out = smoke_run(tmp_path, "sparse", steps=2, extra=("--data", str(tmp_path / "re10k")))
    _, info = camgeo.load_checkpoint(os.path.join(out, training.CKPT_NAME))
    assert info["step"] == 2 and read_log(out)[0]["loss"] > 0


# -----------------------------------------------------------------------------
# CamGeo distillation in the loop


def test_camgeo_run_logs_every_loss_term_and_the_curriculum_and_minimises_l_total(tmp_path, teacher_path):
    # against the true poses, so that both terms are non-zero even for a teacher with random weights
    out = smoke_run(tmp_path, "camgeo", steps=3, teacher_file=teacher_path,
                    extra=("--no-warmup", "--distill-target", "truth"))
    records = read_log(out)
    for r in records:
        assert {"loss", "loss_diff", "loss_traj", "loss_geo", "loss_geo_depth", "loss_geo_smooth", "alpha", "beta",
                "teacher_clips", "teacher_factor"} <= r.keys()
        weights = [r["teacher_factor"] * w for w in (distill.DEFAULTS.traj_weight, distill.DEFAULTS.geo_weight)]
        expected = distill.total_loss(r["loss_diff"], r["loss_traj"], r["loss_geo"], r["alpha"], r["beta"], "beta",
                                      *weights)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert any(r["teacher_clips"] > 0 and r["loss_traj"] > 0 and r["loss_geo"] > 0 for r in records)


def test_camgeo_checkpoint_holds_the_student_only_and_its_distillation_options(tmp_path, teacher_path):
    out = smoke_run(tmp_path, "camgeo", steps=2, extra=("--no-warmup",), teacher_file=teacher_path)
    with safe_open(os.path.join(out, training.CKPT_NAME), "pt") as f:
        keys = set(f.keys())
        options = json.loads(f.metadata()["options"])
    names = set(camgeo.CamGeo(SMOKE).state_dict())
    assert keys == {"model." + k for k in names} | {"ema." + k for k in names}
    assert options["teacher"] == teacher_path and options["warmup"] is False


def test_missing_teacher_stops_the_run_with_a_clear_error(tmp_path):
    args = smoke_args(tmp_path, "camgeo", teacher_file=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="teacher checkpoint .* not found"):
        train.train(args)


# -----------------------------------------------------------------------------
# runs that survive: resume, NaN guard, DDP


class Killed(Exception):
    """Stands in for the process being killed."""


def kill_at(monkeypatch, step_number):
    """The run dies while computing step step_number (1-based): the steps before it are logged, the checkpoint
    is the last one saved."""
    step_losses = training.step_losses

    def dying(args, model, teacher_model, geometry_pairs, batch, step, *rest):
        if step + 1 == step_number:
            raise Killed
        return step_losses(args, model, teacher_model, geometry_pairs, batch, step, *rest)

    monkeypatch.setattr(training, "step_losses", dying)


def nan_at(monkeypatch, step_number):
    """The loss of step step_number (1-based) is NaN."""
    step_losses = training.step_losses

    def poisoned(args, model, teacher_model, geometry_pairs, batch, step, *rest):
        loss, terms = step_losses(args, model, teacher_model, geometry_pairs, batch, step, *rest)
        return (loss * float("nan") if step + 1 == step_number else loss), terms

    monkeypatch.setattr(training, "step_losses", poisoned)


def test_killed_and_resumed_run_ends_with_the_same_weights_and_log_as_an_uninterrupted_run(tmp_path, teacher_path,
                                                                                            monkeypatch):
    extra = ("--no-warmup", "--ckpt-every", "3")
    whole = smoke_run(tmp_path, "camgeo", steps=6, extra=extra, name="whole", teacher_file=teacher_path)
    kill_at(monkeypatch, 5)
    with pytest.raises(Killed):
        smoke_run(tmp_path, "camgeo", steps=6, extra=extra, name="pieces", teacher_file=teacher_path)
    monkeypatch.undo()
    pieces = str(tmp_path / "pieces")
    assert len(read_log(pieces)) == 4  # step 4 was logged after the checkpoint of step 3
    smoke_run(tmp_path, "camgeo", steps=6, extra=(*extra, "--resume"), name="pieces", teacher_file=teacher_path)
    a, b = checkpoint_tensors(whole), checkpoint_tensors(pieces)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(os.path.join(whole, training.TRAIN_STATE_NAME), weights_only=True)
    state_b = torch.load(os.path.join(pieces, training.TRAIN_STATE_NAME), weights_only=True)
    for key, moments in state_a["optimizer"]["state"].items():
        assert all(torch.equal(moments[name], state_b["optimizer"]["state"][key][name]) for name in moments)
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in read_log(whole)]
    assert drop_time == [{k: v for k, v in r.items() if k != "time"} for r in read_log(pieces)]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--resume: no"):
        train.train(smoke_args(tmp_path, "sparse", extra=("--resume",)))


def test_nan_loss_stops_the_run_and_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    kill_at(monkeypatch, 5)
    with pytest.raises(Killed):  # the same run, stopped by a kill at the same step
        smoke_run(tmp_path, "sparse", steps=6, extra=("--ckpt-every", "2"), name="reference")
    monkeypatch.undo()
    nan_at(monkeypatch, 5)
    args = smoke_args(tmp_path, "sparse", steps=6, extra=("--ckpt-every", "2"))
    with pytest.raises(train.NonFiniteLoss, match="step 5"):
        train.train(args)
    assert sorted(os.listdir(args.out)) == sorted([training.CKPT_NAME, training.TRAIN_STATE_NAME, training.LOG_NAME])
    _, info = camgeo.load_checkpoint(os.path.join(args.out, training.CKPT_NAME))
    assert info["step"] == 4
    a, b = checkpoint_tensors(str(tmp_path / "reference")), checkpoint_tensors(args.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# train.py's command line in a process whose step 2 has a NaN loss
NAN_AT_STEP_2 = """import sys, train, training
step_losses = training.step_losses
def poisoned(*args):
    loss, terms = step_losses(*args)
    return (loss * float("nan") if args[5] == 1 else loss), terms
training.step_losses = poisoned
train.main(sys.argv[1:])
"""


def test_nan_loss_ends_the_command_with_a_one_line_message(tmp_path):
    command = [sys.executable, "-c", NAN_AT_STEP_2, "--preset", "smoke", "--method", "sparse", "--steps", "3",
               "--num-workers", "0", "--num-clips", "4", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: loss is nan at step 2")


def test_torchrun_with_two_processes_trains_with_ddp_and_rank_zero_saves(tmp_path, teacher_path):
    out = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--preset", "smoke", "--steps", "2", "--num-workers", "0", "--num-clips", "4", "--out", out,
               "--teacher", teacher_path, "--no-compile", "--no-warmup", "--threads", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("done in") == 1
    assert [r["step"] for r in read_log(out)] == [1, 2]
    _, info = camgeo.load_checkpoint(os.path.join(out, training.CKPT_NAME))
    assert info["method"] == "camgeo" and info["step"] == 2
    assert len(torch.load(os.path.join(out, training.TRAIN_STATE_NAME), weights_only=True)["rng"]) == 2
