"""lenet_fast.optim.FusedSGD against torch.optim.SGD(fused=True): same numbers, same state."""

import pytest
import torch
import torch.nn.functional as F

from lenet_fast.model import TorchLeNet
from lenet_fast.optim import FusedSGD, make_optimizer


def _pair(**hyper):
    torch.manual_seed(0)
    ours, stock = TorchLeNet(), TorchLeNet()
    stock.load_state_dict(ours.state_dict())
    return (ours, FusedSGD(ours.parameters(), **hyper)), (stock, torch.optim.SGD(stock.parameters(), fused=True, **hyper))


def _train(model, optimizer, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("hyper", [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.1, momentum=0.9, dampening=0.1),
    dict(lr=0.1, momentum=0.0, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.5, maximize=True),
    dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True),
], ids=["nesterov-wd", "dampening", "no-momentum", "maximize", "tensor-lr"])
def test_bitwise_equal_to_torch_fused_sgd(hyper):
    (ours, ours_opt), (stock, stock_opt) = _pair(**hyper)
    _train(ours, ours_opt, 4)
    _train(stock, stock_opt, 4)
    assert _same(ours, stock)


def test_state_dict_moves_both_ways():
    (ours, ours_opt), (stock, stock_opt) = _pair(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    _train(ours, ours_opt, 3)
    _train(stock, stock_opt, 3)
    assert ours_opt.state_dict()["param_groups"] == stock_opt.state_dict()["param_groups"]
    # Swap the optimizer states, then keep training: still bitwise equal.
    stock_state, ours_state = stock_opt.state_dict(), ours_opt.state_dict()
    ours_opt.load_state_dict(stock_state)
    stock_opt.load_state_dict(ours_state)
    _train(ours, ours_opt, 3, seed=2)
    _train(stock, stock_opt, 3, seed=2)
    assert _same(ours, stock)


def test_parameters_without_grads_are_skipped_and_start_later():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    ref_a, ref_b = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    ours = FusedSGD([a, b], lr=0.1, momentum=0.9, nesterov=True)
    stock = torch.optim.SGD([ref_a, ref_b], lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    for step in range(4):
        for (p, q), opt in (((a, b), ours), ((ref_a, ref_b), stock)):
            opt.zero_grad()
            loss = (p ** 2).sum() + (((q ** 3).sum()) if step >= 2 else 0.0)  # b gets grads from step 2 on
            loss.backward()
            opt.step()
    torch.testing.assert_close(a, ref_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, ref_b, rtol=1e-6, atol=1e-7)


def test_step_hooks_and_closure_still_work():
    model = TorchLeNet()
    opt = make_optimizer(model.parameters(), "sgd", 0.05)
    assert isinstance(opt, FusedSGD)
    calls = []
    handle = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and loss.ndim == 0
    handle.remove()
    opt.step(closure)
    assert calls == ["pre", "post", "post"]


def test_zero_grad_keeps_torch_semantics():
    model = TorchLeNet()
    opt = make_optimizer(model.parameters(), "sgd", 0.05)
    F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 1])).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_rejects_what_it_does_not_support():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = FusedSGD(emb.parameters(), lr=0.1, momentum=0.9)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    opt.zero_grad()
    opt.grad_scale = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()
