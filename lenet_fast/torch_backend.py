"""The "torch" backend: stock torch.nn.functional, the reference every other backend is tested against."""

import torch
import torch.nn.functional as F


def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return F.relu(F.conv2d(x, weight, bias, padding=padding))


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def conv3x3_relu_maxpool2x2(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
) -> torch.Tensor:
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y


def mlp_cross_entropy(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.flatten(x, 1)  # (N, *) -> (N, features); x itself when already 2-D
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = F.relu(F.linear(x, weight, bias))
    logits = F.linear(x, weights[-1], biases[-1])
    return F.cross_entropy(logits, target), logits
