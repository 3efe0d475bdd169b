"""The NN pool is a FIFO queue and its loss sends gradient only through the views."""

import torch
import torch.nn.functional as F

from clipguard.defenses.nn_pool import NNPool, nn_contrastive_loss, nn_self_loss, nn_target_loss
from clipguard.training.losses import info_nce


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_pool_is_fifo_and_wraps():
    pool = NNPool(size=5, dim=2)
    for i in range(7):  # push scalars i as vectors [i, 0]; the oldest must be displaced first
        pool.push(torch.tensor([[float(i), 0.0]]))
    assert len(pool) == 5
    assert pool.entries()[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    pool.push(torch.tensor([[7.0, 0.0], [8.0, 0.0], [9.0, 0.0]]))
    assert pool.entries()[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    big = torch.arange(12, dtype=torch.float).view(-1, 1).repeat(1, 2)
    pool.push(big)  # more than the pool holds: only the newest 5 survive, oldest first
    assert pool.entries()[:, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]


def test_nearest_uses_only_filled_entries_and_payload_follows():
    pool = NNPool(size=8, dim=3, payload_shape=(2,))
    e = torch.eye(3)
    pool.push(e[:2], payload=torch.tensor([[10, 11], [20, 21]]))
    q = F.normalize(torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.2, 0.9]]), dim=1)
    idx = pool.nearest_index(q)
    assert idx.tolist() == [1, 0]  # e3 (the unfilled zero rows) is never returned
    assert pool.payload[idx].tolist() == [[20, 21], [10, 11]]
    assert torch.equal(pool.nearest(q), e[[1, 0]])


def test_empty_pool_falls_back_to_self_and_state_roundtrip():
    pool = NNPool(size=4, dim=3)
    z = _unit(2, 3, 0)
    assert torch.equal(pool.nearest(z), z)
    pool.push(_unit(6, 3, 1))
    other = NNPool(size=4, dim=3)
    other.load_state(pool.state_tensors("p"), "p")
    assert torch.equal(other.entries(), pool.entries()) and int(other.ptr) == int(pool.ptr)


def test_masked_nce_ignores_masked_rows_and_neighbours_get_no_gradient():
    q, k = _unit(6, 4, 2), _unit(6, 4, 3)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    full = info_nce(q, k, 0.1, mask=mask)
    ref = F.cross_entropy(q[mask] @ k[mask].t() / 0.1, torch.arange(4))
    assert torch.allclose(full, ref)
    # changing masked-out rows changes nothing
    k2 = k.clone()
    k2[1] = -k2[1]
    assert torch.allclose(info_nce(q, k2, 0.1, mask=mask), full)
    assert float(info_nce(q, k, 0.1, mask=torch.zeros(6, dtype=torch.bool))) == 0.0

    pool = NNPool(size=16, dim=4)
    pool.push(_unit(16, 4, 4))
    z1 = _unit(6, 4, 5).requires_grad_(True)
    z2 = _unit(6, 4, 6).requires_grad_(True)
    loss = nn_contrastive_loss(z1, z2, pool, mask, 0.1)
    loss.backward()
    assert z1.grad is not None and z2.grad is not None
    assert torch.all(z1.grad[~mask] == 0) and torch.all(z2.grad[~mask] == 0)
    assert not pool.bank.requires_grad


def test_target_loss_sends_gradient_to_the_first_view_only():
    mask = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)
    pool = NNPool(size=16, dim=4)
    pool.push(_unit(16, 4, 4))
    z1 = _unit(6, 4, 5).requires_grad_(True)
    z2 = _unit(6, 4, 6).requires_grad_(True)
    loss = nn_target_loss(z1, z2, pool, mask, 0.1)
    loss.backward()
    assert z2.grad is None  # the second view is a constant target: no backward pass needed for it
    assert z1.grad is not None and float(z1.grad[mask].abs().sum()) > 0
    assert torch.all(z1.grad[~mask] == 0)
    # the target is the second view's pool neighbour, the keys the first views
    ref = F.cross_entropy(pool.nearest(z2)[mask] @ z1[mask].t() / 0.1, torch.arange(4))
    assert torch.allclose(loss, ref)


def test_one_view_loss_takes_the_views_own_neighbour_as_its_positive():
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    pool = NNPool(size=16, dim=4)
    pool.push(_unit(16, 4, 4))
    z = _unit(6, 4, 5).requires_grad_(True)
    loss = nn_self_loss(z, pool, mask, 0.1)
    loss.backward()
    assert float(z.grad[mask].abs().sum()) > 0 and torch.all(z.grad[~mask] == 0)
    assert not pool.bank.requires_grad
    ref = F.cross_entropy(pool.nearest(z)[mask] @ z[mask].t() / 0.1, torch.arange(4))
    assert torch.allclose(loss, ref)
    # a view with an exact copy in the pool is matched to that copy
    pool.push(z.detach()[:1])
    assert torch.allclose(pool.nearest(z[:1]), z[:1].detach())
