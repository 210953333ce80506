"""rdmaps: the client of an RDMA parameter server, for Python.

Tensors live on rdmaps-server processes; workers pull them with one-sided
RDMA READs and push gradients with RDMA WRITEs, from numpy float32 arrays,
zero-copy once an array is registered::

    c = rdmaps.Client(host, token=...)            # or Client(servers="h1,h2")
    t = c.declare("w", n, optimizer="adam", lr=1e-3)
    buf = c.register(rdmaps.zeros(n))
    c.pull(t, buf); c.push(t, grad)

Client, Tensor, Op and Error, the E* error codes, zeros(), launch_info() and
fork_mode() come from the extension, rdmaps._rdmaps (help(rdmaps.Client)).
rdmaps.torch trains a PyTorch model through the servers (help(rdmaps.torch));
it is imported on demand, so `import rdmaps` never loads torch.
"""
from ._rdmaps import *  # noqa: F401,F403 -- the extension's names are the package's
from ._rdmaps import __version__, fork_init_status  # noqa: F401


def parse_wire(spec: str):
    """A push format as the trainers' ``--wire`` spells it -> (format, fraction)
    for ``Client.set_push_format``: ``f32``, ``bf16``, ``fp16``, ``sign`` or
    ``topk:FRACTION`` (0 < FRACTION <= 0.5). ValueError otherwise."""
    name, _, frac = spec.partition(":")
    if name == "topk":
        try:
            f = float(frac)
        except ValueError:
            f = 0.0
        if not 0.0 < f <= 0.5:
            raise ValueError(f"rdmaps: wire format '{spec}': topk:FRACTION, 0 < FRACTION <= 0.5")
        return name, f
    if name not in ("f32", "bf16", "fp16", "sign") or frac:
        raise ValueError(f"rdmaps: wire format '{spec}' (f32, bf16, fp16, sign, topk:FRACTION)")
    return name, 0.0
