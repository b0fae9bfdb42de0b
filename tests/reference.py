"""Native-autograd reference for fusedgrad, written the way a user would write it
(F.linear, torch.sigmoid or another activation, F.linear, squared error), so every
fused result has an independent counterpart computed by plain torch ops."""
import torch
import torch.nn.functional as F

LOSS_ARGS = ("x", "w1", "b1", "w2", "b2", "target")

# Each activation fusedgrad offers (fusedgrad.ACTIVATIONS), as torch computes it.
REF_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "identity": lambda h: h,
}
# The torch.nn module of each (FusedMLP.from_module's input).
REF_MODULES = {
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "silu": torch.nn.SiLU,
    "gelu": torch.nn.GELU,
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "identity": torch.nn.Identity,
}


def ref_mlp(x, w1, b1=None, w2=None, b2=None, *, activation="sigmoid"):
    # x @ w1ᵀ then "+ b1" so any broadcastable bias shape works (F.linear wants (H,)).
    h = torch.matmul(x, w1.t())
    if b1 is not None:
        h = h + b1
    s = REF_ACTIVATIONS[activation](h)
    if w2 is None:
        return s
    p = torch.matmul(s, w2.t())
    if b2 is not None:
        p = p + b2
    return p


def ref_mlp_loss(x, w1, b1=None, w2=None, b2=None, target=None, *, reduction="mean", activation="sigmoid"):
    p = ref_mlp(x, w1, b1, w2, b2, activation=activation)
    r = p if target is None else p - target
    sq = r * r
    return sq.sum() if reduction == "sum" else sq.mean()


def grads_of(fn, tensors):
    """Calls fn() → scalar, backpropagates, returns (value, [grad or None per tensor]), leaving .grad clean."""
    for t in tensors:
        if t is not None:
            t.grad = None
    out = fn()
    out.backward()
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out.detach(), grads


def assert_close_rel(actual, expected, rtol, name=""):
    """max|a − e| ≤ rtol · max(max|e|, tiny): a relative bound on the whole tensor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300), f"{name}: max abs err {err:.3e} > {rtol:.0e} × scale {scale:.3e}"
    return err / scale if scale else 0.0


def ref_deep_mlp(x, weights, biases, activation):
    """Linear → act → … → Linear over lists (a bias may be None), as native torch ops."""
    a = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        a = F.linear(a, w, b)
        if l < len(weights) - 1:
            a = REF_ACTIVATIONS[activation](a)
    return a


def deep_net(widths, bias, gen, dtype=torch.float64):
    """Weights (n_{l+1}, n_l) scaled by 1/√n_l and biases (or None), each a leaf that requires grad."""
    weights = [(torch.randn(widths[l + 1], widths[l], dtype=dtype, generator=gen) / widths[l] ** 0.5)
               .requires_grad_() for l in range(len(widths) - 1)]
    biases = [torch.randn(widths[l + 1], dtype=dtype, generator=gen).requires_grad_() if bias else None
              for l in range(len(widths) - 1)]
    return weights, biases


def rel_err(actual, expected):
    """max|a − e| / max(max|e|, 1): one number for a whole tensor (0 for empty ones)."""
    if not expected.numel():
        return 0.0
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
