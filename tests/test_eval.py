"""Test-time augmentation, confidence intervals, top-k choice and safe checkpoint loading."""

import pickle

import pytest
import torch

from conftest import om


def test_shift_fills_zeros_without_wraparound():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 5, 27] = 1.0  # last column
    image[0, 0, 27, 3] = 2.0  # last row
    right = om.shift_images(image, 1, 0)
    assert right.sum() == 2.0  # the pixel in the last column left the image
    assert right[0, 0, 27, 4] == 2.0
    assert right[0, 0, :, 0].abs().sum() == 0
    down = om.shift_images(image, 0, 2)
    assert down[0, 0, 7, 27] == 1.0
    assert down[0, 0, :2].abs().sum() == 0
    left_up = om.shift_images(image, -1, -1)
    assert left_up[0, 0, 4, 26] == 1.0
    assert left_up[0, 0, 26, 2] == 2.0


def test_tta_views_are_fixed_and_distinct():
    assert om.TTA_SHIFTS[0] == (0, 0)
    assert len(set(om.TTA_SHIFTS)) == len(om.TTA_SHIFTS)


def test_tta_prediction_is_repeatable():
    torch.manual_seed(0)
    model = om.WideSmallResNet(width=4, ghost_batch=8)
    model.train()(torch.randn(32, 1, 28, 28))  # give the running statistics real values
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    cpu = torch.device("cpu")
    first = om.predict_proba(model, images, cpu, tta_runs=5, batch_size=16)
    second = om.predict_proba(model, images, cpu, tta_runs=5, batch_size=16)
    assert torch.equal(first, second)
    single = om.predict_proba(model, images, cpu, tta_runs=1, batch_size=16)
    assert not torch.equal(first, single)
    torch.testing.assert_close(first.sum(1), torch.ones(40))


def test_wilson_interval_solves_score_equation():
    # The Wilson bounds are the roots p of (phat - p)^2 = z^2 p (1 - p) / n.
    correct, total, z = 9970, 10000, 1.96
    phat = correct / total
    a = 1 + z * z / total
    b = -(2 * phat + z * z / total)
    c = phat * phat
    root = (b * b - 4 * a * c) ** 0.5
    low, high = om.wilson_interval(correct, total)
    assert low == pytest.approx(100 * (-b - root) / (2 * a), abs=1e-9)
    assert high == pytest.approx(100 * (-b + root) / (2 * a), abs=1e-9)
    assert om.wilson_interval(100, 100)[1] == pytest.approx(100.0)
    assert om.wilson_interval(0, 50)[0] == pytest.approx(0.0)


def save_epoch_checkpoint(folder, prefix, epoch, val_acc, val_loss):
    model = om.WideSmallResNet(width=4, ghost_batch=8)
    torch.save({"model": model.state_dict(), "epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                "config": {"width": 4, "ghost_batch": 8, "num_classes": 10}, "kind": "epoch"},
               folder / f"{prefix}_ckpt_epoch{epoch}.pth")


def test_top_k_chosen_by_validation_accuracy(tmp_path):
    scores = {1: 97.0, 2: 99.1, 3: 98.0, 4: 99.1, 5: 96.0}
    losses = {1: 0.2, 2: 0.05, 3: 0.1, 4: 0.04, 5: 0.3}
    for epoch, acc in scores.items():
        save_epoch_checkpoint(tmp_path, "run", epoch, acc, losses[epoch])
    members = om.ensemble_members(tmp_path, "run", top_k=3)
    assert [label for label, _, _ in members] == ["epoch 4", "epoch 2", "epoch 3"]
    assert all(isinstance(ckpt["val_acc"], float) for _, _, ckpt in members)


def test_update_top_k_drops_worst():
    top = []
    dropped_all = []
    for epoch, acc in enumerate([90.0, 95.0, 93.0, 97.0], start=1):
        top, dropped = om.update_top_k(top, {"epoch": epoch, "val_acc": acc, "val_loss": 0.1, "path": ""}, 2)
        dropped_all += [d["epoch"] for d in dropped]
    assert [entry["epoch"] for entry in top] == [4, 2]
    assert dropped_all == [1, 3]


class WritesFileWhenUnpickled:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_checkpoint_loading_is_weights_only(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": WritesFileWhenUnpickled(marker)}, path, pickle_module=pickle)
    with pytest.raises(om.InputError, match="evil.pth"):
        om.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_clear_error(tmp_path):
    save_epoch_checkpoint(tmp_path, "run", 1, 99.0, 0.1)
    path = tmp_path / "run_ckpt_epoch1.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(om.InputError, match="truncated"):
        om.load_checkpoint(path)


def test_checkpoint_of_other_width_is_clear_error(tmp_path):
    save_epoch_checkpoint(tmp_path, "run", 1, 99.0, 0.1)
    checkpoint = om.load_checkpoint(tmp_path / "run_ckpt_epoch1.pth")
    checkpoint["config"]["width"] = 8
    with pytest.raises(om.InputError, match="do not fit"):
        om.model_from_checkpoint(checkpoint, tmp_path / "run_ckpt_epoch1.pth", torch.device("cpu"))
