"""The command line end to end: outputs, refusals, predict-only, resume after signals."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, SCRIPT, cli_args, om, run_cli


def test_help_lists_every_constant_with_default():
    result = run_cli(["--help"])
    assert result.returncode == 0
    for name in om.CONFIG_HELP:
        assert "--" + name.lower().replace("_", "-") in result.stdout
    assert "(default: 16)" in result.stdout.replace("\n", " ") or "default: 16" in result.stdout


def test_flags_follow_edited_constants(monkeypatch):
    monkeypatch.setattr(om, "EPOCHS", 7)
    monkeypatch.setattr(om, "CPU_BF16", False)
    cfg, _ = om.parse_args([])
    assert cfg.epochs == 7
    assert cfg.cpu_bf16 is False
    cfg, _ = om.parse_args(["--epochs", "3", "--cpu-bf16", "--submission", "x.csv"])
    assert (cfg.epochs, cfg.cpu_bf16, cfg.submission_path) == (3, True, "x.csv")


@pytest.mark.parametrize("args,message", [
    (["--epochs", "zero"], "--epochs"),
    (["--epochs", "0"], "invalid --epochs 0"),
    (["--val-fraction", "1.5"], "invalid --val-fraction 1.5"),
    (["--device", "tpu"], "invalid --device"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flag_exits_2(args, message):
    result = run_cli(args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import os, torch, random, numpy\n"
        "threads = torch.get_num_threads(); state = torch.get_rng_state(); py = random.getstate()\n"
        "np_state = numpy.random.get_state()[1].copy()\n"
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import ObsCure_MNIST\n"
        "assert torch.get_num_threads() == threads\n"
        "assert torch.equal(torch.get_rng_state(), state)\n"
        "assert random.getstate() == py\n"
        "assert (numpy.random.get_state()[1] == np_state).all()\n"
        "print(sorted(os.listdir('.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    result = run_cli(cli_args(tiny_data, out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_end_to_end_writes_every_output(finished_run):
    out, result = finished_run
    results = out / "results"
    names = {p.name for p in results.iterdir()}
    prefix = "mnist_seed42"
    for suffix in ("last.pth", "history.json", "summary.json", "train_loss.png", "acc.png", "lr.png",
                   "confusion.png", "misclassified.png", "test_least_confident.png", "swa_epoch3.pth"):
        assert f"{prefix}_{suffix}" in names
    assert len([n for n in names if "_ckpt_epoch" in n]) == 2
    assert not [n for n in names if n.startswith(".")]

    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["ImageId", "Label"]
    assert len(submission) == 200
    assert submission["ImageId"].tolist() == list(range(1, 201))
    assert submission["Label"].dtype == np.int64
    assert submission["Label"].between(0, 9).all()

    history = json.loads((results / f"{prefix}_history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for record in history:
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"):
            assert isinstance(record[key], float)

    summary = json.loads((results / f"{prefix}_summary.json").read_text())
    assert summary["ensemble_val_acc"] > 50.0
    low, high = summary["ensemble_val_ci95"]
    assert low <= summary["ensemble_val_acc"] <= high
    assert summary["config"]["width"] == 8
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["duplicates"] == {"test_in_train": 0, "val_in_train": 0}
    assert [m["label"] for m in summary["members"]][-1] == "SWA"
    for member in summary["members"]:
        member_low, member_high = member["val_ci95"]
        assert member_low <= member["val_acc"] <= member_high
    assert summary["swa_val_ci95"] == summary["members"][-1]["val_ci95"]
    assert "ensemble: validation" in result.stdout
    # Not a terminal: no progress bar, one table row per epoch instead.
    assert "\r" not in result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines() if "/3 " in line] == ["1/3", "2/3", "3/3"]


def test_last_checkpoint_records_schedule_and_no_scaler(finished_run):
    out, _ = finished_run
    last = torch.load(out / "results" / "mnist_seed42_last.pth", weights_only=True)
    steps = om.steps_per_epoch(540, 32)  # 600 training rows less 10 % validation
    # Cosine covers epochs 1-2 and is not stepped in the SWA epoch 3.
    assert last["cosine"]["last_epoch"] == steps * 2
    assert last["swalr"] is not None
    assert last["scaler"] is None
    assert last["optimizer"]["fast_steps"] == steps * 3
    assert int(last["swa_model"]["n_averaged"]) == 2
    assert isinstance(last["top_k"][0]["val_acc"], float)


def test_existing_outputs_are_not_overwritten(finished_run, tiny_data):
    out, _ = finished_run
    before = (out / "submission.csv").read_bytes()
    last_before = (out / "results" / "mnist_seed42_last.pth").read_bytes()
    result = run_cli(cli_args(tiny_data, out))
    assert result.returncode == 2
    assert "--resume" in result.stderr
    assert "--overwrite" in result.stderr
    assert "mnist_seed42_" in result.stderr
    assert (out / "submission.csv").read_bytes() == before
    assert (out / "results" / "mnist_seed42_last.pth").read_bytes() == last_before


def test_predict_only_rebuilds_identical_submission(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    result = run_cli(cli_args(tiny_data, out, "--predict-only", "--submission", str(tmp_path / "again.csv")))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_predict_only_uses_saved_settings(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    summary_before = (out / "results" / "mnist_seed42_summary.json").read_bytes()
    args = ["--data-dir", str(tiny_data), "--results-dir", str(out / "results"), "--threads", "1",
            "--submission", str(tmp_path / "again.csv"), "--predict-only"]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    assert "width=16 (kept 8)" in result.stderr
    assert "540 training, 60 validation" in result.stdout
    assert (tmp_path / "again.csv").read_bytes() == (out / "submission.csv").read_bytes()
    assert (out / "results" / "mnist_seed42_summary.json").read_bytes() == summary_before
    predict_summary = json.loads((out / "results" / "mnist_seed42_predict_summary.json").read_text())
    assert predict_summary["config"]["width"] == 8


def test_existing_submission_alone_needs_overwrite(finished_run, tiny_data):
    out, _ = finished_run
    result = run_cli(cli_args(tiny_data, out, "--save-prefix", "other"))
    assert result.returncode == 2
    assert "submission.csv exists already" in result.stderr
    assert "--resume" not in result.stderr


def test_predict_only_without_checkpoints_fails_clearly(tiny_data, tmp_path):
    result = run_cli(cli_args(tiny_data, tmp_path, "--predict-only"))
    assert result.returncode == 2
    assert "no checkpoints" in result.stderr
    assert not (tmp_path / "submission.csv").exists()


def test_resume_with_other_width_stops(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = run_cli(cli_args(tiny_data, copy, "--resume", "--width", "16"))
    assert result.returncode == 2
    assert "--width 16 (saved: 8)" in result.stderr


def test_resume_from_truncated_checkpoint_fails_clearly(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    last = copy / "results" / "mnist_seed42_last.pth"
    last.write_bytes(last.read_bytes()[:4096])
    result = run_cli(cli_args(tiny_data, copy, "--resume"))
    assert result.returncode == 2
    assert "truncated" in result.stderr
    assert "mnist_seed42_last.pth" in result.stderr


def test_non_finite_loss_stops_with_message(tiny_data, tmp_path):
    result = run_cli(cli_args(tiny_data, tmp_path, "--base-lr", "1e30", "--momentum", "0", "--lookahead-k", "1"))
    assert result.returncode == 1
    assert "epoch 1, step" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "submission.csv").exists()


def run_until_epoch_then_signal(args, signum, second_signal=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if line.strip().startswith("1/3"):
            process.send_signal(signum)
            if second_signal:
                process.send_signal(signum)
            break
    process.stdout.read()
    stderr = process.stderr.read()
    return process.wait(timeout=300), stderr


def comparable_history(path):
    history = json.loads(path.read_text())["history"]
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)],
                         ids=["sigint", "sigterm", "kill-9"])
def test_interrupted_run_resumes_exactly(finished_run, tiny_data, tmp_path, signum, code):
    reference, _ = finished_run
    args = cli_args(tiny_data, tmp_path)
    returncode, stderr = run_until_epoch_then_signal(args, signum)
    assert returncode == code, stderr
    if signum != signal.SIGKILL:
        assert "--resume" in stderr
    assert not (tmp_path / "submission.csv").exists()

    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    prefix = "mnist_seed42"
    assert comparable_history(tmp_path / "results" / f"{prefix}_history.json") == \
        comparable_history(reference / "results" / f"{prefix}_history.json")
    ours = torch.load(tmp_path / "results" / f"{prefix}_last.pth", weights_only=True)
    theirs = torch.load(reference / "results" / f"{prefix}_last.pth", weights_only=True)
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), key
    assert (tmp_path / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()
    checkpoints = sorted(p.name for p in (tmp_path / "results").glob("*_ckpt_epoch*.pth"))
    assert checkpoints == sorted(p.name for p in (reference / "results").glob("*_ckpt_epoch*.pth"))


def test_second_sigint_keeps_files_whole(tiny_data, tmp_path):
    args = cli_args(tiny_data, tmp_path)
    returncode, _ = run_until_epoch_then_signal(args, signal.SIGINT, second_signal=True)
    assert returncode == 130
    last = tmp_path / "results" / "mnist_seed42_last.pth"
    assert torch.load(last, weights_only=True)["epoch"] >= 1


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "history.json"
    target.write_text("old")

    def failing_write(temp):
        temp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        om.atomic_write(target, failing_write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


@pytest.mark.parametrize("overrides,message", [
    ({"save_prefix": ".hidden"}, "invalid --save-prefix"),
    ({"save_prefix": "m*"}, "invalid --save-prefix"),
    ({"save_prefix": "run[1]"}, "invalid --save-prefix"),
    ({"save_prefix": "{seed.real}"}, "invalid --save-prefix"),
    ({"seed": -1}, "invalid --seed -1"),
    ({"eta_min": float("nan")}, "must be a finite number"),
    ({"base_lr": float("inf")}, "invalid --base-lr inf"),
    ({"eta_min": 1.0}, "must not exceed --base-lr"),
    ({"warmup_frac": 1.0}, "invalid --warmup-frac 1.0"),
    ({"scale_frac": 0.6}, "invalid --scale-frac 0.6"),
    ({"light_scale_frac": -0.1}, "invalid --light-scale-frac -0.1"),
])
def test_config_rejects_unsafe_values(overrides, message):
    with pytest.raises(om.InputError, match=message):
        om.default_config(**overrides)


def test_seed_placeholder_in_prefix():
    assert om.save_prefix(om.default_config(save_prefix="run_{seed}_a", seed=7)) == "run_7_a"


def test_unwritable_locations_fail_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(cli_args(tiny_data, tmp_path, "--results-dir", str(blocker)))
    assert result.returncode == 2
    assert "is a file" in result.stderr
    folder = tmp_path / "as_dir.csv"
    folder.mkdir()
    result = run_cli(cli_args(tiny_data, tmp_path, "--submission", str(folder)))
    assert result.returncode == 2
    assert "is a folder" in result.stderr
    assert "Training" not in result.stdout


def test_stray_checkpoint_names_are_ignored(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    results = copy / "results"
    first = sorted(results.glob("mnist_seed42_ckpt_epoch*.pth"))[0]
    backup = results / (first.stem + ".bak.pth")
    shutil.copy(first, backup)
    shutil.copy(first, results / "mnist_seed42_swa_epoch3_old.pth")
    result = run_cli(cli_args(tiny_data, copy, "--predict-only", "--submission", str(tmp_path / "again.csv")))
    assert result.returncode == 0, result.stderr
    assert "Ensemble of 3 checkpoints" in result.stdout
    assert (tmp_path / "again.csv").read_bytes() == (out / "submission.csv").read_bytes()
    resumed = run_cli(cli_args(tiny_data, copy, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert backup.exists()


def test_resume_with_changed_data_stops(finished_run, tiny_data, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    frame = pd.read_csv(data / "train.csv")
    frame.loc[5, "pixel300"] = (frame.loc[5, "pixel300"] + 1) % 256
    frame.to_csv(data / "train.csv", index=False)
    result = run_cli(cli_args(data, copy, "--resume"))
    assert result.returncode == 2
    assert "differ from the data of the saved run" in result.stderr


def test_resume_of_older_run_keeps_its_schedule(tmp_path, capsys):
    cfg = om.default_config(results_dir=str(tmp_path))
    older = {key: value for key, value in om.config_dict(cfg).items() if key not in om.ADDED_KEYS_OLD_VALUES}
    resumed = om.check_resume_config(older, cfg, tmp_path / "run_last.pth")
    assert cfg.warmup_frac > 0
    assert resumed.warmup_frac == 0.0
    assert resumed.scale_frac == 0.0
    assert resumed.light_scale_frac == 0.0
    assert "warmup_frac=0.15 (kept 0.0)" in capsys.readouterr().err

    newer = dict(om.config_dict(cfg), warmup_frac=0.3)
    assert om.check_resume_config(newer, cfg, tmp_path / "run_last.pth").warmup_frac == 0.3
