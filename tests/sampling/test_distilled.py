import pytest
import torch
import torch.nn.functional as F

from mmgen.sampling.distilled import flow_map


def _codebook(k=5, d=8, seed=0):
    return F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_flow_map_is_deterministic_and_one_hot_returns_that_token():
    cb = _codebook(16)
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    probs = torch.full((300, 16), 1 / 16)
    a, b = flow_map(probs, cb, noise), flow_map(probs, cb, noise.clone())
    assert torch.equal(a, b)
    onehot = torch.zeros(300, 16)
    target = torch.randint(0, 16, (300,), generator=torch.Generator().manual_seed(2))
    onehot[torch.arange(300), target] = 1
    assert torch.equal(flow_map(onehot, cb, noise), target)


def test_flow_map_pushes_noise_to_the_teacher_distribution():
    cb = _codebook(5)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    n = 20000
    noise = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
    ids = flow_map(p.expand(n, 5), cb, noise)
    freq = torch.bincount(ids, minlength=5).float() / n
    # binomial standard error at n = 20000 is at most 0.0036; allow 4 of them plus integration error
    assert torch.allclose(freq, p, atol=0.015), freq


def test_flow_map_close_codes_and_zero_probability():
    cb = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    p = torch.zeros(64)
    p[[3, 7, 11]] = torch.tensor([0.6, 0.3, 0.1])
    n = 20000
    ids = flow_map(p.expand(n, 64), cb, torch.randn(n, 8, generator=torch.Generator().manual_seed(5)))
    freq = torch.bincount(ids, minlength=64).float() / n
    assert set(ids.unique().tolist()) <= {3, 7, 11}
    assert torch.allclose(freq[[3, 7, 11]], p[[3, 7, 11]], atol=0.015), freq[[3, 7, 11]]


def test_flow_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        flow_map(torch.ones(4, 5) / 5, _codebook(6), torch.randn(4, 8))
