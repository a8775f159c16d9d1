"""GhostBatchNorm2d and WideSmallResNet."""

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from conftest import om


def grouped_input(groups_sizes, channels=3, size=5, seed=0):
    """Concatenate groups whose means and scales differ, so per-group and whole-batch statistics differ."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, channels, size, size, generator=generator) * (1 + i) + 3 * i
             for i, n in enumerate(groups_sizes)]
    return torch.cat(parts)


def reference_ghost(x, ghost, weight, bias, eps=1e-5):
    """Normalize each chunk of `ghost` images with its own mean and biased variance, by plain arithmetic."""
    chunks = []
    for chunk in x.split(ghost):
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        scaled = (chunk - mean) / torch.sqrt(var + eps)
        chunks.append(scaled * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    return torch.cat(chunks)


def test_ghost_bn_normalizes_each_group_separately():
    bn = om.GhostBatchNorm2d(3, ghost_batch=32)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = grouped_input([32, 32, 32])
    out = bn.train()(x)
    expected = reference_ghost(x, 32, bn.weight, bn.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    whole_batch = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, 1e-5)
    assert (out - whole_batch).abs().max() > 0.1


def test_ghost_bn_uneven_batch_uses_real_remainder():
    bn = om.GhostBatchNorm2d(3, ghost_batch=32).train()
    x = grouped_input([32, 32, 6])
    out = bn(x)
    torch.testing.assert_close(out, reference_ghost(x, 32, bn.weight, bn.bias), rtol=1e-5, atol=1e-5)
    chunks = x.split(32)
    sizes = torch.tensor([len(c) for c in chunks], dtype=torch.float32)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks])
    variances = torch.stack([c.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for c in chunks])
    weights = (sizes / sizes.sum()).view(-1, 1)
    torch.testing.assert_close(bn.running_mean, 0.1 * (means * weights).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * (variances * weights).sum(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_ghost_bn_gradients_match_reference():
    bn = om.GhostBatchNorm2d(3, ghost_batch=32).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = grouped_input([32, 32, 6]).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (bn(x) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    (reference_ghost(x_ref, 32, weight, bias) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


def test_ghost_bn_eval_uses_running_stats():
    bn = om.GhostBatchNorm2d(3, ghost_batch=8)
    bn.train()(grouped_input([8, 8]))
    x = grouped_input([40], seed=1)
    out = bn.eval()(x)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(out, expected)


def test_ghost_bn_channels_last_same_values():
    bn = om.GhostBatchNorm2d(3, ghost_batch=16).train()
    x = grouped_input([16, 16, 16])
    out_plain = bn(x)
    bn_cl = om.GhostBatchNorm2d(3, ghost_batch=16).train()
    out_cl = bn_cl(x.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_cl.running_var, bn.running_var)


def test_update_bn_gives_cumulative_average():
    model = torch.nn.Sequential(om.GhostBatchNorm2d(3, ghost_batch=8))
    batches = [grouped_input([8, 8], seed=s) for s in (1, 2)]
    update_bn(batches, model)
    bn = model[0]
    per_batch = [torch.stack([c.mean(dim=(0, 2, 3)) for c in b.split(8)]).mean(0) for b in batches]
    torch.testing.assert_close(bn.running_mean, (per_batch[0] + per_batch[1]) / 2, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1


def test_ghost_bn_state_dict_matches_batchnorm():
    ghost = om.GhostBatchNorm2d(4, ghost_batch=8)
    assert set(ghost.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())


def test_model_width32_matches_original_size():
    model = om.WideSmallResNet(width=32)
    assert sum(p.numel() for p in model.parameters()) == 1_084_010
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, om.GhostBatchNorm2d) and m.ghost_batch == 32 for m in norms)


def test_model_output_shape_and_widths():
    model = om.WideSmallResNet(width=8, num_classes=10, ghost_batch=4).eval()
    logits = model(torch.zeros(5, 1, 28, 28))
    assert logits.shape == (5, 10)
    assert model.head.in_features == 32
