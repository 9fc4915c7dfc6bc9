"""Test helpers shared by the op tests: exact-arithmetic inputs, scaled comparison, grads."""

import torch


def exact_tensor(shape, step, lo=-4, hi=4, *, generator, device="cpu", dtype=torch.float32):
    """Random multiples of `step` in [lo*step, hi*step].

    Sums of products of such values stay exactly representable in fp32 at the
    sizes tested, so every backend must agree with the reference bit for bit,
    whatever its summation order: max-pool winners (and so gradient routing)
    cannot flip on rounding, and exact ties appear often.
    """
    values = torch.randint(lo, hi + 1, shape, generator=generator).to(dtype) * step
    return values.to(device)


def assert_close_scaled(actual, expected, rel, name):
    """|actual - expected| <= rel * max(1, max|expected|) elementwise, NaN where NaN.

    `expected` is computed in float64 from the same inputs; `rel` is the stated
    tolerance relative to the output's scale.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    scale = max(1.0, expected.abs().nan_to_num(0.0).max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale, equal_nan=True, msg=lambda m: f"{name}: {m}")


def head_inputs(batch, n_in, widths, seed=0):
    """An MLP classifier head's inputs: x (batch, n_in), a weight and bias per layer width
    (weights scaled by 1/sqrt(fan_in)), int64 targets among the last width's classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    weights, biases, fan_in = [], [], n_in
    for width in widths:
        weights.append(torch.randn(width, fan_in, generator=g) / fan_in**0.5)
        biases.append(torch.randn(width, generator=g) * 0.1)
        fan_in = width
    target = torch.randint(0, widths[-1], (batch,), generator=g)
    return x, weights, biases, target


def grads_of(out, inputs, grad_out):
    """Gradients of (out * grad_out).sum() w.r.t. every input that requires grad (None otherwise)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def leaf(t, requires_grad=True):
    """A fresh leaf copy of t (None stays None)."""
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


# Stated tolerances, relative to the output's scale (max(1, max|reference|)); the
# reference is the stock op evaluated in float64 on the same inputs.  FWD_REL and
# GRAD_REL are for float32 results; F64_REL for float64 ones (a backend that takes
# float64: there only the summation order differs from stock, ~1e-16 per term).
FWD_REL = 1e-5
GRAD_REL = 5e-5
F64_REL = 1e-10


def skip_unless_dtype(backend, dtype):
    """Skip (with the reason) when `backend` does not take tensors of `dtype`."""
    from lenet_fast import backends

    if dtype not in backends.get_backend(backend).dtypes:
        import pytest

        pytest.skip(f"the {backend} backend takes no {str(dtype).replace('torch.', '')} tensors")


def _strided(t):
    """t's values as every other element of a last dimension twice as long: not dense."""
    return torch.stack([t, torch.zeros_like(t)], -1).select(-1, 0)


def _channels_last(t):
    """t's values in a dense, permuted layout: channels-last (4-D), column-major (2-D)."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 2:
        return t.t().contiguous().t()
    return _strided(t)


def _channels_last_strided(t):
    """t's values as every other column of a channels-last (or column-major) tensor twice
    as wide: permuted and not dense."""
    if t.dim() not in (2, 4):
        return _strided(t)
    wide = torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)
    return _channels_last(wide)[..., ::2]


# Non-contiguous layouts of a tensor with the same shape and values, differentiable (the
# gradient reaches the tensor they were made from); check_op's `layout`.
LAYOUTS = {"strided": _strided, "channels_last": _channels_last, "channels_last_strided": _channels_last_strided}


def check_op(op, reference, inputs, *, device, needs_grad=None, grad_generator=None, fwd_rel=FWD_REL,
             grad_rel=GRAD_REL, layout=None):
    """op(*inputs) on `device` against reference(*inputs) in float64: output and every gradient.

    `inputs` are CPU tensors (or None) of one dtype; `needs_grad[i]` says whether input i
    requires grad (default: all tensors do).  The upstream gradient is an exact-arithmetic
    tensor, so gradient routing is compared without rounding noise.  `layout` (one of
    LAYOUTS) gives the op every input and the upstream gradient in that non-contiguous
    layout (the first input must come out non-contiguous); the reference gets them
    contiguous.
    """
    if needs_grad is None:
        needs_grad = [t is not None for t in inputs]
    generator = grad_generator or torch.Generator().manual_seed(1234)
    ours = [None if t is None else leaf(t.to(device), rg) for t, rg in zip(inputs, needs_grad)]
    refs = [None if t is None else leaf(t.double(), rg) for t, rg in zip(inputs, needs_grad)]
    args = ours if layout is None else [None if t is None else layout(t) for t in ours]
    if layout is not None:
        assert not args[0].is_contiguous(), "the layout left the first input contiguous: choose another shape"
    out = op(*args)
    ref = reference(*refs)
    assert out.device.type == torch.device(device).type, f"output on {out.device}, expected {device}"
    assert out.dtype == inputs[0].dtype, f"output dtype {out.dtype}, expected {inputs[0].dtype}"
    assert_close_scaled(out, ref, fwd_rel, "output")
    if not any(needs_grad):
        return out
    grad_out = exact_tensor(tuple(out.shape), 0.25, generator=generator)
    grad_ours = grad_out.to(device, out.dtype)
    got = grads_of(out, ours, grad_ours if layout is None else layout(grad_ours))
    want = grads_of(ref, refs, grad_out.double())
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            continue
        assert g is not None, f"gradient of input {i} is missing"
        assert_close_scaled(g, w, grad_rel, f"gradient of input {i}")
    return out


def write_idx(path, array):
    """Write a uint8 array as an IDX file (the MNIST format)."""
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_synthetic_mnist(root, n_train=384, n_test=128, seed=0, folder="MNIST"):
    """A small learnable MNIST-format dataset under `root` (a torchvision root):
    class k is a bright 7x7 square at one of ten fixed places, plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    places = [(2 + 8 * (k % 3), 2 + 6 * (k // 3)) for k in range(10)]
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            r, c = places[k]
            images[i, r : r + 7, c : c + 7] = rng.integers(180, 256, (7, 7))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def run_main(main, argv, capsys):
    """(exit code, stdout, stderr) of a tool's main(argv) run in this process: quicker than a
    subprocess, which pays for importing torch again."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def train_args(dataset_root, out, *extra):
    """lenet_fast.train arguments for a quick CPU run on the synthetic data (2 epochs of 2 steps)."""
    return ["--data-dir", dataset_root, "--no-download", "--epochs", 2, "--batch-size", 32, "--limit-train", 64,
            "--limit-test", 32, "--backend", "torch", "--device", "cpu", "--no-progress", "--out", out, *extra]


def assert_one_error_line(code, err, tool, *fragments):
    """Exit code 2 and stderr ending in one `lenet_fast.<tool>: error: ...` line holding every fragment."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith(f"lenet_fast.{tool}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# A backward op's (input_grad, weight_grad) flags, by the case they make (the op tests'
# opcheck_samples).
GRAD_FLAGS = {"all": (True, True), "no-input-grad": (False, True), "no-weight-grad": (True, False)}
