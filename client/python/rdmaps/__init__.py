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
