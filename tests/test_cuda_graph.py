"""The CUDA-graph training step: warm-up leaves no trace, and replayed steps equal eager ones.

Without a GPU the same step runs eagerly on the static buffers, which checks the
warm-up/restore logic and the fused-optimizer/tensor-learning-rate setup; with a
GPU the captured graph is checked against eager steps.
"""

import pytest
import torch

from lenet_fast import LeNet
from lenet_fast.cuda_graph import GraphedTrainStep
from lenet_fast.optim import make_optimizer
from lenet_fast.train import train_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model_and_optimizer(device, optimizer):
    torch.manual_seed(0)
    model = LeNet(backend="torch").to(device)
    lr = torch.tensor(0.05 if optimizer == "sgd" else 2e-3, device=device)
    return model, make_optimizer(model.parameters(), optimizer, lr), lr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_graphed_steps_equal_eager_steps(device, optimizer):
    graphed_model, graphed_opt, graphed_lr = _model_and_optimizer(device, optimizer)
    eager_model, eager_opt, eager_lr = _model_and_optimizer(device, optimizer)
    initial = [p.detach().clone() for p in graphed_model.parameters()]
    step = GraphedTrainStep(graphed_model, graphed_opt, batch_size=16)
    # the warm-up steps were undone
    assert all(torch.equal(p, q) for p, q in zip(graphed_model.parameters(), initial))

    g = torch.Generator().manual_seed(1)
    for i in range(4):
        x = torch.randn(16, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (16,), generator=g).to(device)
        for lr in (graphed_lr, eager_lr):
            lr.fill_(0.05 / (i + 1) if optimizer == "sgd" else 2e-3 / (i + 1))
        loss_g, correct_g = step.step(x, y)
        loss_e, correct_e = train_step(eager_model, eager_opt, x, y)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)
        assert int(correct_g) == int(correct_e)
    for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_graphed_step_needs_full_batches():
    model, optimizer, _ = _model_and_optimizer("cpu", "sgd")
    step = GraphedTrainStep(model, optimizer, batch_size=8, warmup_steps=1)
    with pytest.raises(ValueError, match="exactly 8, got 5"):
        step.step(torch.zeros(5, 1, 28, 28), torch.zeros(5, dtype=torch.long))
