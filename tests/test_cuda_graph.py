"""The CUDA-graph training step: warm-up leaves no trace, and replayed steps equal eager ones.

Without a GPU the same step runs eagerly on the static buffers, which checks the
warm-up/restore logic, the one-graph-per-batch-size routing and the
fused-optimizer/tensor-learning-rate setup; with a GPU the captured graphs are
checked against eager steps.
"""

import pytest
import torch

from lenet_fast import LeNet, backends, data
from lenet_fast.optim import make_optimizer
from lenet_fast.training import TrainingStep, epoch_batch_sizes, learning_rate, lr_holder, train_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model_and_optimizer(device, optimizer, backend="torch", cuda_graph=True):
    torch.manual_seed(0)
    model = LeNet(backend=backend).to(device)
    lr = lr_holder(0.05 if optimizer == "sgd" else 2e-3, device, cuda_graph)
    return model, make_optimizer(model.parameters(), optimizer, lr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_graphed_steps_equal_eager_steps(device, optimizer):
    graphed_model, graphed_opt = _model_and_optimizer(device, optimizer)
    eager_model, eager_opt = _model_and_optimizer(device, optimizer, cuda_graph=False)
    initial = [p.detach().clone() for p in graphed_model.parameters()]
    graphed = TrainingStep(graphed_model, graphed_opt, cuda_graph=True, batch_sizes=[16, 5])
    eager = TrainingStep(eager_model, eager_opt)
    # the warm-up steps (of both batch sizes) were undone
    assert all(torch.equal(p, q) for p, q in zip(graphed_model.parameters(), initial))
    assert graphed.graphed.batch_sizes == [16, 5]

    g = torch.Generator().manual_seed(1)
    for i, n in enumerate([16, 5, 16, 16, 5]):
        x = torch.randn(n, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        for step in (graphed, eager):
            step.set_lr((0.05 if optimizer == "sgd" else 2e-3) / (i + 1))
        loss_g, correct_g = graphed.step(x, y)
        loss_e, correct_e = eager.step(x, y)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)
        assert int(correct_g) == int(correct_e)
    for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_graphed_epoch_with_a_remainder_batch_is_bitwise_eager_training(backend):
    """The graphed training loop's logic (static buffers, one step per batch size, the lr
    read from a tensor) over two shuffled epochs of 100 samples in batches of 32 (the last
    batch has 4) gives bitwise the parameters, losses and counts of plain eager training
    with a float learning rate (on the CPU with ext: the one-op step)."""
    if backends.unavailable_reason(backend, "cpu"):
        pytest.skip(f"{backend} is not available")
    g = torch.Generator().manual_seed(2)
    split = data.DeviceData(torch.randn(100, 1, 28, 28, generator=g), torch.randint(0, 10, (100,), generator=g))
    batch, epochs = 32, 2
    sizes = epoch_batch_sizes(len(split), batch)
    assert sizes == [32, 4]
    results = []
    for cuda_graph in (True, False):
        model, optimizer = _model_and_optimizer("cpu", "sgd", backend, cuda_graph)
        step = TrainingStep(model, optimizer, cuda_graph=cuda_graph, batch_sizes=sizes)
        assert (step.graphed is not None) == cuda_graph
        total = split.num_batches(batch) * epochs
        history = []
        for epoch in range(epochs):
            for i, (x, y) in enumerate(split.batches(batch, order=data.shuffle_order(len(split), 0, epoch))):
                step.set_lr(learning_rate(0.05, epoch * split.num_batches(batch) + i, total))
                loss, correct = step.step(x, y)
                history.append((loss.item(), int(correct), y.shape[0]))
        results.append((history, [p.detach().clone() for p in model.parameters()]))
    (graphed_history, graphed_params), (eager_history, eager_params) = results
    assert [n for _, _, n in graphed_history] == [32, 32, 32, 4] * epochs
    assert graphed_history == eager_history
    assert all(torch.equal(p, q) for p, q in zip(graphed_params, eager_params))


def test_graphed_step_takes_only_its_batch_sizes():
    model, optimizer = _model_and_optimizer("cpu", "sgd")
    step = TrainingStep(model, optimizer, cuda_graph=True, batch_sizes=[8, 3])
    with pytest.raises(ValueError, match=r"captured for batches of \[8, 3\] rows, got 5"):
        step.step(torch.zeros(5, 1, 28, 28), torch.zeros(5, dtype=torch.long))


def test_graphed_step_needs_a_tensor_learning_rate():
    model, optimizer = _model_and_optimizer("cpu", "sgd", cuda_graph=False)
    with pytest.raises(ValueError, match="learning rate from one tensor"):
        TrainingStep(model, optimizer, cuda_graph=True, batch_sizes=[8])


@pytest.mark.parametrize("n, batch, sizes", [(100, 32, [32, 4]), (96, 32, [32]), (5, 32, [5]), (1, 1, [1])])
def test_epoch_batch_sizes(n, batch, sizes):
    assert epoch_batch_sizes(n, batch) == sizes


def test_stock_model_graphs_too():
    """The benchmark's 'stock + CUDA graph' row captures the stock model's step the same way."""
    from lenet_fast import TorchLeNet

    torch.manual_seed(0)
    model = TorchLeNet()
    optimizer = make_optimizer(model.parameters(), "sgd", lr_holder(0.05, "cpu", True))
    step = TrainingStep(model, optimizer, cuda_graph=True, batch_sizes=[8])
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    reference = TorchLeNet()
    reference_opt = make_optimizer(reference.parameters(), "sgd", 0.05)
    assert torch.equal(step.step(x, y)[0], train_step(reference, reference_opt, x, y)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
