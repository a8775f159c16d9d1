"""Optimizer, schedules, mixing, precision and one real training epoch."""

import io
import math

import numpy as np
import pytest
import torch

from conftest import om, synthetic_digits, tiny_config


def linear_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    return model, x, y


def sgd_step(optimizer, model, x, y):
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_lookahead_syncs_every_k_steps():
    model, x, y = linear_problem()
    start = model.weight.detach().clone()
    lookahead = om.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3, alpha=0.5)
    reference, _, _ = linear_problem()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        sgd_step(lookahead, model, x, y)
        sgd_step(plain, reference, x, y)
    expected = start + 0.5 * (reference.weight.detach() - start)
    torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(lookahead.slow_weights[0][0], expected)
    assert lookahead.fast_steps == 3


def test_lookahead_skipped_scaler_step_moves_nothing():
    model, x, y = linear_problem()
    lookahead = om.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=1, alpha=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    slow_before = lookahead.slow_weights[0][0].clone()
    weight_before = model.weight.detach().clone()
    lookahead.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(lookahead)
    scaler.update()
    assert lookahead.fast_steps == 0
    torch.testing.assert_close(lookahead.slow_weights[0][0], slow_before)
    torch.testing.assert_close(model.weight.detach(), weight_before)
    assert scaler.get_scale() == 1.0


def test_lookahead_state_dict_roundtrip_weights_only():
    model, x, y = linear_problem()
    lookahead = om.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    for _ in range(7):
        sgd_step(lookahead, model, x, y)
    buffer = io.BytesIO()
    torch.save(lookahead.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    copy_model, _, _ = linear_problem()
    copy_model.load_state_dict(model.state_dict())
    copy = om.Lookahead(torch.optim.SGD(copy_model.parameters(), lr=0.1, momentum=0.9), k=5, alpha=0.5)
    copy.load_state_dict(state)
    assert copy.param_groups is copy.base_optimizer.param_groups
    assert copy.fast_steps == 7
    torch.testing.assert_close(copy.slow_weights[0][0], lookahead.slow_weights[0][0])
    for _ in range(4):
        sgd_step(lookahead, model, x, y)
        sgd_step(copy, copy_model, x, y)
    torch.testing.assert_close(copy_model.weight, model.weight)


def test_lookahead_rejects_bad_arguments():
    model, _, _ = linear_problem()
    with pytest.raises(ValueError, match="k 0"):
        om.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=0)


def test_cosine_then_constant_swa_learning_rate(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, epochs=8, swa_start=0.75, base_lr=0.1, eta_min=1e-4, swa_lr=0.01,
                      warmup_frac=0.0)
    model, _, _ = linear_problem()
    optimizer = om.Lookahead(torch.optim.SGD(model.parameters(), lr=cfg.base_lr))
    steps = 10
    cosine = om.make_cosine(optimizer, cfg, steps)
    assert om.swa_first_epoch(cfg) == 7
    rates = []
    for _ in range(steps * 6):
        optimizer.step()
        cosine.step()
        rates.append(om.current_lr(optimizer))
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(1e-4)
    om.make_swalr(optimizer, cfg)
    assert om.current_lr(optimizer) == pytest.approx(0.01)


def test_cutmix_lam_is_unreplaced_area():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 28, 28).clone()
    labels = torch.arange(8)
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, y_a, y_b, lam = om.cutmix_data(images, labels, beta=0.35, rng=np.random.default_rng(seed))
        own = (mixed == images).float().mean(dim=(1, 2, 3))
        replaced_by_self = (y_b == y_a)
        assert torch.equal(y_a, labels)
        for index in range(8):
            if not replaced_by_self[index]:
                assert own[index].item() == pytest.approx(lam)


def test_mixup_blends_with_lam():
    torch.manual_seed(0)
    images, labels = torch.rand(6, 1, 28, 28), torch.arange(6)
    mixed, y_a, y_b, lam = om.mixup_data(images, labels, alpha=0.4, rng=np.random.default_rng(3))
    partner = y_b  # labels equal row indices, so y_b is the permutation
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[partner])
    targets = om.soft_targets(y_a, y_b, lam, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))


def test_cpu_autocast_choice_has_no_scaler():
    cpu = torch.device("cpu")
    assert om.precision_for(cpu, cpu_bf16=True) == (torch.bfloat16, False)
    assert om.precision_for(cpu, cpu_bf16=False) == (None, False)


def test_one_epoch_learns_synthetic_digits(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, epochs=4, base_lr=0.1, width=8, batch_size=32)
    images, labels = synthetic_digits(512, seed=5)
    device = torch.device("cpu")
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    host_rng = om.seed_everything(0)
    model = om.build_model(cfg, device)
    optimizer = om.build_optimizer(model, cfg)
    # The run's own schedule: at a constant high learning rate the running
    # batch-norm statistics lag the weights, and eval-mode accuracy swings.
    schedule = om.make_cosine(optimizer, cfg, om.steps_per_epoch(len(y), cfg.batch_size))
    first = om.train_one_epoch(model, optimizer, schedule, None, x, y, cfg, 1, device, torch.bfloat16, host_rng)
    for epoch in (2, 3):
        last = om.train_one_epoch(model, optimizer, schedule, None, x, y, cfg, epoch, device, torch.bfloat16,
                                  host_rng)
    assert first.train_loss > 1.0
    assert last.train_loss < first.train_loss * 0.7
    probs = om.predict_proba(model, x, device)
    assert om.accuracy_percent(probs, y) > 80.0


def test_non_finite_loss_names_epoch_and_step(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, base_lr=1e30, momentum=0.0, lookahead_k=1)
    images, labels = synthetic_digits(256, seed=5)
    device = torch.device("cpu")
    host_rng = om.seed_everything(0)
    model = om.build_model(cfg, device)
    optimizer = om.build_optimizer(model, cfg)
    with pytest.raises(om.NonFiniteLoss) as caught:
        om.train_one_epoch(model, optimizer, None, None, torch.from_numpy(images).unsqueeze(1),
                           torch.from_numpy(labels), cfg, 2, device, None, host_rng)
    assert caught.value.epoch == 2
    assert 2 <= caught.value.step <= 4
    assert "epoch 2, step" in str(caught.value)


def test_phase_boundaries_for_short_runs(tmp_path):
    two = tiny_config(tmp_path, tmp_path, epochs=2, swa_start=0.75, final_frac=0.25)
    assert om.swa_first_epoch(two) == 2
    assert om.light_first_epoch(two) == 3
    sixteen = tiny_config(tmp_path, tmp_path, epochs=16, swa_start=0.75, final_frac=0.25)
    assert om.swa_first_epoch(sixteen) == 13
    assert om.light_first_epoch(sixteen) == 13
    assert math.ceil(100 / 64) == om.steps_per_epoch(100, 64)


def test_warmup_then_cosine_to_eta_min(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, epochs=8, swa_start=0.75, base_lr=0.1, eta_min=1e-4,
                      warmup_frac=0.25, swa_lr=0.01)
    model, _, _ = linear_problem()
    optimizer = om.Lookahead(torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=0.9))
    steps = 10
    schedule = om.make_cosine(optimizer, cfg, steps)
    rates = [om.current_lr(optimizer)]
    for step in range(steps * 6):
        optimizer.step()
        schedule.step()
        rates.append(om.current_lr(optimizer))
        if step == 20:
            saved = schedule.state_dict()
            saved_rates = len(rates)

    assert rates[0] == pytest.approx(0.1 / 25)
    peak = rates.index(max(rates))
    assert 13 <= peak <= 16
    assert max(rates) == pytest.approx(0.1, rel=1e-2)
    assert all(later > earlier for earlier, later in zip(rates[:peak], rates[1:peak + 1]))
    assert all(later <= earlier for earlier, later in zip(rates[peak:], rates[peak + 1:]))
    assert rates[-1] == pytest.approx(1e-4)
    assert optimizer.param_groups[0]["momentum"] == 0.9

    # A resumed schedule continues with the same rates.
    other = om.Lookahead(torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=0.9))
    resumed = om.make_cosine(other, cfg, steps)
    resumed.load_state_dict(saved)
    other.param_groups[0]["lr"] = rates[saved_rates - 1]
    again = []
    for _ in range(steps * 6 - 21):
        other.step()
        resumed.step()
        again.append(om.current_lr(other))
    assert again == pytest.approx(rates[saved_rates:])

    om.make_swalr(optimizer, cfg)
    assert om.current_lr(optimizer) == pytest.approx(0.01)


def test_warmup_with_zero_eta_min_ends_at_zero(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, epochs=4, swa_start=1.0, eta_min=0.0, warmup_frac=0.5)
    model, _, _ = linear_problem()
    optimizer = om.Lookahead(torch.optim.SGD(model.parameters(), lr=cfg.base_lr))
    schedule = om.make_cosine(optimizer, cfg, 3)
    for _ in range(12):
        optimizer.step()
        schedule.step()
    assert om.current_lr(optimizer) == pytest.approx(0.0, abs=1e-12)


def square_images(count: int) -> torch.Tensor:
    images = torch.zeros(count, 1, 28, 28)
    images[:, :, 10:18, 10:18] = 1.0
    return images


def test_random_affine_zoom_scales_area():
    torch.manual_seed(0)
    unchanged = om.random_affine(square_images(4), 0, 0.0, 0.0)
    assert torch.allclose(unchanged, square_images(4), atol=1e-5)
    zoomed = om.random_affine(square_images(512), 0, 0.0, 0.3)
    ratio = zoomed.sum(dim=(1, 2, 3)) / 64.0
    assert ratio.min() >= 0.7**2 - 0.1
    assert ratio.max() <= 1.3**2 + 0.1
    assert ratio.min() < 0.6
    assert ratio.max() > 1.5
    # The zoom keeps the square centred on the image centre.
    rows = torch.arange(28.0).view(1, 1, 28, 1)
    centre = (zoomed * rows).sum(dim=(1, 2, 3)) / zoomed.sum(dim=(1, 2, 3))
    assert torch.allclose(centre, torch.full_like(centre, 13.5), atol=0.05)


def test_random_affine_shifts_whole_pixels():
    torch.manual_seed(1)
    images = square_images(64)
    images[:, :, 10, 10] = 0.5  # a marked corner, so a flip cannot pass as a shift
    shifted = om.random_affine(images, 2, 0.0, 0.0)
    seen = set()
    for out in shifted:
        matches = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)
                   if torch.allclose(out, om.shift_images(images[:1], dx, dy)[0], atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 15


def test_random_affine_without_zoom_draws_no_zoom():
    # Runs saved before the zoom existed resume with scale 0 and must see
    # the same random numbers as before: one angle and one shift per image.
    images = square_images(8)
    torch.manual_seed(2)
    om.random_affine(images, 2, 10.0, 0.0)
    after_affine = torch.rand(4)
    torch.manual_seed(2)
    torch.rand(8)
    torch.randint(-2, 3, (8, 2))
    after_angle_and_shift = torch.rand(4)
    assert torch.equal(after_affine, after_angle_and_shift)
