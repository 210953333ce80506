"""rdmaps.torch -- train a PyTorch model through rdmaps parameter servers.

A few calls wrap a model's parameters and its optimizer; the training loop
stays the user's own::

    import torch
    import rdmaps.torch as rt

    client = rt.init()                      # the cluster description: RDMAPS_* / INI
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = rt.DistributedOptimizer(opt, model.named_parameters(), client=client,
                                  model=model)
    for x, y in loader:                     # DataLoader(num_workers > 0) works
        opt.zero_grad()
        loss_fn(model(x), y).backward()     # each gradient is pushed as soon as
        opt.step()                          # backward makes it; step() waits for
                                            # the pushes and pulls the parameters

What happens:

* Each parameter becomes one rdmaps tensor, named after it (``prefix`` +
  its name in ``named_parameters()``), declared idempotently by every
  worker. The first worker's values win: every worker pulls them before
  the first step, so all start from one model (Horovod's and BytePS's
  ``broadcast_parameters``).
* The optimizer runs on the servers. The wrapped ``torch.optim`` optimizer
  only names it: SGD (with momentum, Nesterov, weight decay), Adagrad, Adam
  and AdamW become the server's own, with each parameter group's
  hyper-parameters; anything else (another class, dampening, amsgrad,
  maximize, lr_decay, an initial accumulator) is refused with an error
  naming it. Hyper-parameters are fixed at declaration: a learning-rate
  scheduler changing the wrapped optimizer has no effect on the servers.
* Zero-copy: at wrap time the parameters and their gradients are moved into
  two flat buffers registered with the NIC (the tensors keep their shapes;
  ``p.data`` and ``p.grad`` are views), so pulls land in the parameters and
  pushes leave from the gradients with no copy. A gradient that autograd put
  elsewhere (``zero_grad(set_to_none=True)``, a hook replacing it) is copied
  back, and counted in ``stats()['bounce_copies']``.
* Overlap: a hook on each parameter's gradient accumulator pushes the
  gradient as soon as backward has it, asynchronously, so pushes overlap
  the rest of backward. ``step()`` waits for the pushes, then starts the
  pulls in the order the model's forward uses the parameters (first layers
  first) and returns; a forward pre-hook on each module waits for its own
  parameters' pulls only, so the next forward starts before the last pull
  lands. Read the parameters outside a forward only after
  ``synchronize()``.
* Consistency as declared: ASP (default), BSP (``workers`` of them push a
  clock each step; their gradients are averaged by default, so with equal
  batches the step equals one worker stepping on the combined batch at the
  same learning rate: ``aggregate='mean'``; ``'sum'`` adds them) and SSP
  (``staleness``).
* Only float32 CPU tensors, dense gradients: a float64, CUDA or sparse
  parameter or gradient, or a parameter whose size or shape differs from
  the first worker's (the servers keep sizes; the shapes travel in one more
  tensor, ``<prefix>~shapes``), is an error naming the parameter; nothing
  is converted silently. One backward per step.

Rank and size come from the launcher as the C library reads them (torchrun,
Slurm, Open MPI, PMI, ``DMLC_*``, ``RDMAPS_RANK``/``RDMAPS_SIZE``):
``rank()``, ``size()``.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

import rdmaps

__all__ = ["init", "rank", "size", "DistributedOptimizer", "server_optimizer"]

_NAME_MAX = 63


def rank() -> int:
    """This process's rank as its launcher set it, or -1."""
    return rdmaps.launch_info()[0]


def size() -> int:
    """The number of processes as the launcher set it, or -1."""
    return rdmaps.launch_info()[1]


def init(servers: Optional[str] = None, *, config: Optional[str] = None,
         token: Optional[str] = None, src: Optional[str] = None,
         timeout_ms: int = 0) -> "rdmaps.Client":
    """Connect to every server of the cluster description and return the Client.

    Arguments left out come from ``RDMAPS_*`` variables, else from the INI
    file (``config``, else ``$RDMAPS_CONFIG``): docs/cluster.md.
    """
    kw = {}
    for key, value in (("servers", servers), ("config", config), ("token", token),
                       ("src", src)):
        if value is not None:
            kw[key] = value
    if timeout_ms:
        kw["timeout_ms"] = timeout_ms
    # no host: a cluster, from these or RDMAPS_SERVERS / the INI file
    return rdmaps.Client(**kw)


def server_optimizer(optimizer: torch.optim.Optimizer, group: dict) -> Dict[str, object]:
    """The server-side optimizer and hyper-parameters for one parameter group
    of a torch optimizer, as keyword arguments of Client.declare.

    Raises ValueError naming what the servers cannot do.
    """
    name = type(optimizer).__name__

    def refuse(why: str) -> None:
        raise ValueError(f"rdmaps.torch: torch.optim.{name} with {why} has no server-side "
                         "equivalent (servers run SGD with momentum/Nesterov/weight decay, "
                         "Adagrad, Adam, AdamW)")

    if group.get("maximize", False):
        refuse("maximize=True")
    if group.get("differentiable", False):
        refuse("differentiable=True")
    lr = float(group["lr"])
    wd = float(group.get("weight_decay", 0.0))
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(group.get("momentum", 0.0))
        if group.get("dampening", 0.0):
            refuse(f"dampening={group['dampening']}")
        if momentum == 0.0:
            return dict(optimizer="sgd", lr=lr, weight_decay=wd)
        return dict(optimizer="nesterov" if group.get("nesterov", False) else "momentum",
                    lr=lr, momentum=momentum, weight_decay=wd)
    if isinstance(optimizer, torch.optim.Adagrad):
        if group.get("lr_decay", 0.0):
            refuse(f"lr_decay={group['lr_decay']}")
        if group.get("initial_accumulator_value", 0.0):
            refuse(f"initial_accumulator_value={group['initial_accumulator_value']}")
        eps = float(group.get("eps", 1e-10))
        if eps <= 0.0:
            refuse(f"eps={eps}")  # 0 means "the default" to the server
        return dict(optimizer="adagrad", lr=lr, eps=eps, weight_decay=wd)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if group.get("amsgrad", False):
            refuse("amsgrad=True")
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        if beta1 <= 0.0 or beta2 <= 0.0 or eps <= 0.0:
            refuse(f"betas=({beta1}, {beta2}), eps={eps}")  # 0 means "the default"
        return dict(optimizer="adamw" if isinstance(optimizer, torch.optim.AdamW) else "adam",
                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
    raise ValueError(f"rdmaps.torch: torch.optim.{name} has no server-side equivalent "
                     "(servers run SGD with momentum/Nesterov/weight decay, Adagrad, Adam, "
                     "AdamW)")


def _tensor_name(prefix: str, name: str) -> str:
    full = prefix + name
    if len(full) <= _NAME_MAX and full.isprintable():
        return full
    # long names keep their end (the most specific part) and a hash of the whole
    digest = hashlib.sha1(full.encode()).hexdigest()[:12]
    return f"{digest}~{full[-(_NAME_MAX - 13):]}"


class DistributedOptimizer:
    """A model's parameters kept on rdmaps servers, trained there by the
    server-side twin of ``optimizer``.

    Arguments:
        optimizer: the torch.optim optimizer whose class and hyper-parameters
            (per parameter group) the servers use. Its own ``step`` is never
            called.
        named_parameters: ``model.named_parameters()``; every parameter of
            ``optimizer`` must be among them.
        client: an ``rdmaps.Client``; default ``init()``.
        model: the module being trained: each of its modules' forward then
            waits for its own parameters' pulls only (without it ``step()``
            waits for every pull).
        consistency: ``'asp'``, ``'bsp'`` or ``'ssp'``.
        workers: BSP/SSP members each clock waits for (default ``size()``).
        staleness: SSP bound.
        aggregate: BSP: ``'mean'`` (default) or ``'sum'`` of the workers'
            gradients.
        clip_norm: > 0: each push is scaled to this L2 norm at most.
        prefix: put before every tensor name (several models on one server).
        overlap: push from backward hooks and pull behind forward (default);
            False pushes everything in ``step()`` and waits for the pulls.
        wire: the format gradients travel in: ``'f32'`` (default), ``'bf16'``
            or ``'fp16'`` (half the bytes), ``'sign'`` (a bit per value) or
            ``'topk:FRACTION'``; sign and top-k keep error feedback on the
            worker (``Client.set_push_format``, docs/protocol.md).
        pull: the format parameters are pulled in: ``'f32'`` (default), or
            ``'bf16'`` / ``'fp16'``: half the bytes, from a 16-bit copy the
            servers keep beside their float32 master (the optimizer runs on
            the master); the worker's parameters are then that copy, widened
            to float32. Part of each tensor's declaration: every worker of a
            model must give the same.

    Thread-safety: use it from the thread that runs forward and backward.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], *,
                 client: Optional["rdmaps.Client"] = None,
                 model: Optional[torch.nn.Module] = None,
                 consistency: str = "asp", workers: Optional[int] = None,
                 staleness: int = 0, aggregate: str = "mean", clip_norm: float = 0.0,
                 prefix: str = "", overlap: bool = True, wire: str = "f32",
                 pull: str = "f32") -> None:
        if consistency not in ("asp", "bsp", "ssp"):
            raise ValueError(f"rdmaps.torch: consistency '{consistency}' (asp, bsp, ssp)")
        if aggregate not in ("mean", "sum"):
            raise ValueError(f"rdmaps.torch: aggregate '{aggregate}' (mean, sum)")
        wire_fmt, wire_frac = rdmaps.parse_wire(wire)
        if pull not in ("f32", "bf16", "fp16"):
            raise ValueError(f"rdmaps.torch: pull '{pull}' (f32, bf16, fp16)")
        self.optimizer = optimizer
        self.client = client if client is not None else init()
        self._overlap = overlap
        named = list(named_parameters)
        by_param = {id(p): (n, p) for n, p in named}
        group_of = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in by_param:
                    raise ValueError("rdmaps.torch: the optimizer has a parameter that is not "
                                     "in named_parameters")
                group_of[id(p)] = g
        # forward order: the order of named_parameters(), which follows the
        # modules' registration, the usual forward order
        self._params: List[Tuple[str, torch.nn.Parameter]] = [
            (n, p) for n, p in named if id(p) in group_of and p.requires_grad]
        for n, p in self._params:
            self._check(n, p)
        total = sum(p.numel() for _, p in self._params)
        if total == 0:
            raise ValueError("rdmaps.torch: no parameters to train")
        # the flat, registered homes of the parameters and their gradients
        self._pflat = self.client.register(rdmaps.zeros(total))
        self._gflat = self.client.register(rdmaps.zeros(total))
        members = workers if workers is not None else max(size(), 1)
        self._entries = []
        off = 0
        with torch.no_grad():
            for n, p in self._params:
                k = p.numel()
                pv, gv = self._pflat[off:off + k], self._gflat[off:off + k]
                pv[:] = p.detach().reshape(-1).numpy()
                kw = server_optimizer(optimizer, group_of[id(p)])
                if consistency != "asp":
                    kw.update(consistency=consistency, workers=members)
                if consistency == "ssp":
                    kw.update(staleness=staleness)
                if consistency == "bsp" and aggregate == "mean":
                    kw.update(aggregate_mean=True)
                if clip_norm > 0.0:
                    kw.update(clip_norm=clip_norm)
                if pull != "f32":
                    kw.update(pull_format=pull)
                tname = _tensor_name(prefix, n)
                try:
                    t = self.client.declare(tname, k, init=pv, **kw)
                except rdmaps.Error as e:
                    if e.code == rdmaps.EEXIST:
                        raise ValueError(
                            f"rdmaps.torch: parameter '{n}' ({k} elements): the server's "
                            f"tensor '{tname}' was declared with another size or other "
                            "optimizer settings") from e
                    raise
                self.client.set_push_format(t, wire_fmt, wire_frac)
                p.data = torch.from_numpy(pv).view(p.shape)
                p.grad = torch.from_numpy(gv).view(p.shape)
                self._entries.append(_Entry(n, p, t, pv, gv))
                off += k
        self._check_shapes(prefix)
        self._by_param = {id(e.param): e for e in self._entries}
        self._hooks = []
        self._accumulators = []
        self._pushed = set()
        self._bounce = 0
        # seconds spent waiting: for pushes in step(), for pulls before
        # forward; and each step's push span, from the first push posted to
        # the last one folded, of which push_wait_s is the part not hidden
        self._waited = {"push_wait_s": 0.0, "push_span_s": 0.0, "pull_wait_s": 0.0, "steps": 0}
        self._first_push = 0.0
        if overlap:
            for e in self._entries:
                acc = e.param.expand_as(e.param).grad_fn.next_functions[0][0]
                self._hooks.append(acc.register_hook(self._grad_ready(e)))
                self._accumulators.append(acc)  # the hook lives as long as it does
        self._module_entries: Dict[int, List[_Entry]] = {}
        if model is not None and overlap:
            self._hook_modules(model)
        # every worker starts from the values the first declarer staged
        for e in self._entries:
            e.pull = self.client.pull_async(e.tensor, e.pview)
        self._finish()

    # ---- checks --------------------------------------------------------

    @staticmethod
    def _check(name: str, p: torch.Tensor) -> None:
        if p.dtype != torch.float32:
            raise TypeError(f"rdmaps.torch: parameter '{name}' is {p.dtype}; rdmaps tensors "
                            "are float32 (convert the model with model.float())")
        if p.device.type != "cpu":
            raise TypeError(f"rdmaps.torch: parameter '{name}' is on {p.device}; rdmaps "
                            "pulls and pushes CPU memory")
        if p.is_sparse:
            raise TypeError(f"rdmaps.torch: parameter '{name}' is sparse; rdmaps.torch "
                            "trains dense parameters")

    _SHAPE_SLOTS = 8  # per parameter: ndim, then up to 7 dims

    @staticmethod
    def _shape_row(shape: torch.Size) -> List[float]:
        # dims past the 7th fold into the 7th (a product): what matters is
        # that equal shapes give equal rows; dims are exact in float32 to 2^24
        dims = list(shape)
        if len(dims) > 7:
            dims = dims[:6] + [math.prod(dims[6:])]
        return [float(len(shape))] + [float(d) for d in dims] + [0.0] * (7 - len(dims))

    def _check_shapes(self, prefix: str) -> None:
        """Refuse a model whose parameter shapes are not the first worker's.
        The servers keep sizes only, so a transposed weight of the same size
        would train silently wrong; the shapes go in one more tensor, the
        first declarer's values winning as for the parameters."""
        m = self._SHAPE_SLOTS
        mine = self.client.register(rdmaps.zeros(m * len(self._entries)))
        theirs = self.client.register(rdmaps.zeros(m * len(self._entries)))
        try:
            for i, e in enumerate(self._entries):
                mine[i * m:(i + 1) * m] = self._shape_row(e.param.shape)
            name = _tensor_name(prefix, "~shapes")
            try:
                t = self.client.declare(name, len(mine), init=mine, lr=0.0)
            except rdmaps.Error as ex:
                if ex.code == rdmaps.EEXIST:
                    raise ValueError(
                        f"rdmaps.torch: this model has {len(self._entries)} parameters, the "
                        f"first worker's a different number (tensor '{name}')") from ex
                raise
            self.client.pull(t, theirs)
            for i, e in enumerate(self._entries):
                a, b = mine[i * m:(i + 1) * m], theirs[i * m:(i + 1) * m]
                if not np.array_equal(a, b):
                    def show(row):
                        return "[" + ", ".join(str(int(d)) for d in row[1:1 + min(int(row[0]), 7)]) + "]"
                    raise ValueError(
                        f"rdmaps.torch: parameter '{e.name}' has shape {show(a)}, the first "
                        f"worker's {show(b)} (same size; the model differs)")
        finally:
            self.client.deregister(mine)
            self.client.deregister(theirs)

    def _hook_modules(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            mine = [self._by_param[id(p)] for p in module.parameters(recurse=False)
                    if id(p) in self._by_param]
            if mine:
                self._module_entries[id(module)] = mine
                self._hooks.append(module.register_forward_pre_hook(self._before_forward))

    # ---- push --------------------------------------------------------

    def _grad_ready(self, e: "_Entry"):
        def hook(*_):
            self._push(e)
        return hook

    def _own_grad(self, e: "_Entry") -> None:
        """Make p.grad the registered view again, copying what autograd put
        elsewhere; refuse what rdmaps cannot push."""
        g = e.param.grad
        if g is None:
            e.gview.fill(0.0)  # no gradient this step: push zeros, keep the clocks
        elif g.data_ptr() != e.gview.ctypes.data:
            if g.is_sparse:
                raise TypeError(f"rdmaps.torch: the gradient of '{e.name}' is sparse")
            if g.dtype != torch.float32 or g.device.type != "cpu":
                raise TypeError(f"rdmaps.torch: the gradient of '{e.name}' is {g.dtype} on "
                                f"{g.device}; rdmaps pushes float32 CPU memory")
            e.gview[:] = g.detach().reshape(-1).numpy()
            self._bounce += 1
        e.param.grad = torch.from_numpy(e.gview).view(e.param.shape)

    def _push(self, e: "_Entry") -> None:
        if id(e) in self._pushed:
            raise RuntimeError(f"rdmaps.torch: '{e.name}' got a second gradient before "
                               "step(): one backward per step")
        if not self._pushed:
            self._first_push = time.perf_counter()
        self._own_grad(e)
        # folded, not only staged: the pull after it must see it (a worker
        # reads its own writes, as with a local optimizer)
        e.push = self._submit(lambda: self.client.push_async(e.tensor, e.gview, folded=True))
        self._pushed.add(id(e))

    def _submit(self, post):
        """Post an op; past the library's ops in flight, finish older ones first."""
        while True:
            try:
                return post()
            except rdmaps.Error as err:
                if err.code != rdmaps.EBUSY or not self._wait_one():
                    raise

    def _in_flight(self):
        """(entry, 'push' | 'pull') of every op in flight, oldest parameter first."""
        return [(e, attr) for e in self._entries for attr in ("push", "pull")
                if getattr(e, attr) is not None]

    @staticmethod
    def _complete(e: "_Entry", attr: str) -> None:
        getattr(e, attr).wait()
        setattr(e, attr, None)

    def _wait_one(self) -> bool:
        ops = self._in_flight()
        if ops:
            self._complete(*ops[0])
        return bool(ops)

    # ---- step --------------------------------------------------------

    def step(self, closure=None):
        """Push what backward has not pushed, wait for every push to be folded,
        and start pulling the parameters back (first layers first). Returns
        the closure's loss when given one (it runs first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for e in self._entries:
            if id(e) not in self._pushed:
                self._push(e)
        t0 = time.perf_counter()
        for e, attr in self._in_flight():
            if attr == "push":
                self._complete(e, attr)
        t1 = time.perf_counter()
        self._waited["push_wait_s"] += t1 - t0
        self._waited["push_span_s"] += t1 - self._first_push
        self._waited["steps"] += 1
        self._pushed.clear()
        for e in self._entries:
            e.pull = self._submit(lambda e=e: self.client.pull_async(e.tensor, e.pview))
        if not (self._overlap and self._module_entries):
            self.synchronize()
        return loss

    def _before_forward(self, module, _inputs) -> None:
        t0 = time.perf_counter()
        for e in self._module_entries.get(id(module), ()):
            if e.pull is not None:
                self._complete(e, "pull")
        self._waited["pull_wait_s"] += time.perf_counter() - t0

    def synchronize(self) -> None:
        """Wait until every pull and push in flight is done: the parameters
        hold the pulled values."""
        t0 = time.perf_counter()
        self._finish()
        self._waited["pull_wait_s"] += time.perf_counter() - t0

    def _finish(self) -> None:
        for e, attr in self._in_flight():
            self._complete(e, attr)

    def refresh(self) -> None:
        """Pull every parameter now and wait: the model as the servers hold
        it (e.g. at the end, once the other workers are done)."""
        self._finish()
        for e in self._entries:
            e.pull = self._submit(lambda e=e: self.client.pull_async(e.tensor, e.pview))
        self._finish()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients in place (they stay in registered memory;
        set_to_none is accepted and ignored for that reason)."""
        del set_to_none
        self._gflat.fill(0.0)
        for e in self._entries:
            if e.param.grad is None or e.param.grad.data_ptr() != e.gview.ctypes.data:
                e.param.grad = torch.from_numpy(e.gview).view(e.param.shape)

    @property
    def param_groups(self):
        """The wrapped optimizer's groups (their hyper-parameters were read at
        wrap time; changing them later does not reach the servers)."""
        return self.optimizer.param_groups

    def stats(self) -> Dict[str, int]:
        """The client's counters (rdmaps.Client.stats()), with bounce_copies
        including gradients this wrapper had to copy into registered memory."""
        s = dict(self.client.stats())
        s["bounce_copies"] += self._bounce
        return s

    def timings(self) -> Dict[str, float]:
        """Time spent waiting for the servers since wrap time: push_wait_s
        (step() waiting for pushes backward did not finish), push_span_s
        (summed over steps: from the first push posted to the last one
        folded; 1 - push_wait_s / push_span_s is the share of the push time
        hidden behind backward), pull_wait_s (forwards and synchronize()
        waiting for pulls), and steps."""
        return dict(self._waited)

    def tensor_names(self) -> Dict[str, str]:
        """Parameter name -> rdmaps tensor name."""
        return {e.name: e.tensor.name for e in self._entries}

    def close(self) -> None:
        """Finish what is in flight and remove the hooks (the Client stays open)."""
        self._finish()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._accumulators.clear()


class _Entry:
    """One parameter: its rdmaps tensor, its views in the flat buffers, and
    the ops in flight for it."""
    __slots__ = ("name", "param", "tensor", "pview", "gview", "push", "pull")

    def __init__(self, name: str, param: torch.nn.Parameter, tensor, pview: np.ndarray,
                 gview: np.ndarray) -> None:
        self.name = name
        self.param = param
        self.tensor = tensor
        self.pview = pview
        self.gview = gview
        self.push = None
        self.pull = None
