"""lenet_fast: fused Triton and C++/CUDA kernels for the seed's LeNet on MNIST.

    import lenet_fast
    model = lenet_fast.LeNet(backend="auto")      # "torch", "triton", "ext"
    lenet_fast.available_backends()               # what runs here, and why not
    lenet_fast.ops.conv3x3_relu_maxpool2x2(x, w, b)
"""

from . import ops
from .backends import BackendUnavailableError, available_backends, backend_names
from .model import LeNet, TorchLeNet

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LeNet",
    "TorchLeNet",
    "available_backends",
    "backend_names",
    "ops",
    "__version__",
]
