"""torch_checks.py -- rdmaps.torch against real servers (tests/rdma/checks.d/torch).

usage: rdmaps-python tests/rdma/torch_checks.py ADDR PORT   (token: $RDMAPS_TOKEN)

Checks, each printed as it runs:
 1. exactness: one worker through rdmaps equals local torch.optim with the
    same hyper-parameters after 50 steps of a small model (relative 1e-5),
    for SGD, SGD + momentum, Nesterov (+ weight decay), Adagrad, Adam, AdamW;
    with parameters of several chunks (the server runs --chunk-elems 1024);
 2. BSP: two workers, each on half of every batch, equal one worker
    stepping on the whole batch (gradients averaged: aggregate='mean');
 3. the first worker's initial values win; gradients stay in registered
    memory (no bounce copy) and pushes overlap backward (the hooks push);
 4. refused, with an error naming what: a float64 parameter, an optimizer
    the servers do not have, a parameter whose size or shape differs from the
    server's tensor of that name.
Exit status 0 only when every check passed.
"""
import os
import sys
import time

import numpy as np
import torch

import rdmaps
import rdmaps.torch as rt

ADDR, PORT = sys.argv[1], sys.argv[2]
TOKEN = os.environ["RDMAPS_TOKEN"]
STEPS = 50
failures = 0


def check(what, cond):
    global failures
    print(f"  {'ok  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        failures += 1


def client():
    return rdmaps.Client(ADDR, port=PORT, token=TOKEN, src=ADDR, timeout_ms=30000)


def net(seed):
    torch.manual_seed(seed)
    # 40 * 64 = 2560 weights: three chunks of 1024 on the test server
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))


def batches(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 5, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 40, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def max_rel(a, b):
    """The largest difference between two models' parameters, relative to
    the largest value of that parameter tensor."""
    return max(float((p - q).abs().max() / q.abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


def train_local(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def train_rdmaps(model, dopt, data):
    for x, y in data:
        dopt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        dopt.step()
    dopt.synchronize()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                          weight_decay=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}

print("torch-checks: torch", torch.__version__, "threads", torch.get_num_threads(),
      "ATEN_CPU_CAPABILITY", os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"), flush=True)
c = client()
data = batches(STEPS, 32, 1)

print("-- exactness: one worker through rdmaps vs local torch.optim, 50 steps")
for name, make in OPTIMIZERS.items():
    local, remote = net(7), net(7)
    train_local(local, make(local.parameters()), data)
    t0 = time.time()
    dopt = rt.DistributedOptimizer(make(remote.parameters()), remote.named_parameters(),
                                   client=c, model=remote, prefix=f"ex.{name}.")
    train_rdmaps(remote, dopt, data)
    err = max_rel(remote, local)
    check(f"{name}: max relative difference {err:.2e} <= 1e-5 ({time.time() - t0:.1f} s)",
          err <= 1e-5)
    if name == "sgd":
        s = dopt.stats()
        check(f"zero-copy: {s['bounce_copies']} bounce copies", s["bounce_copies"] == 0)
        check("each parameter is its own tensor, named after it",
              dopt.tensor_names() == {"0.weight": "ex.sgd.0.weight", "0.bias": "ex.sgd.0.bias",
                                      "2.weight": "ex.sgd.2.weight", "2.bias": "ex.sgd.2.bias"})
    dopt.close()

print("-- pushes overlap backward: the hooks push before step()")
m = net(3)
dopt = rt.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(),
                               client=c, model=m, prefix="ov.")
pushes0 = c.stats()["pushes"]
x, y = data[0]
torch.nn.functional.cross_entropy(m(x), y).backward()
check(f"{c.stats()['pushes'] - pushes0} of 4 pushes posted during backward",
      c.stats()["pushes"] - pushes0 == 4)
dopt.step()
dopt.close()

print("-- the first worker's initial values win")
a, b = net(11), net(12)
c2 = client()
da = rt.DistributedOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), a.named_parameters(),
                             client=c, prefix="first.")
db = rt.DistributedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), b.named_parameters(),
                             client=c2, prefix="first.")
check("the second worker starts from the first one's parameters",
      all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())))
da.close()
db.close()

print("-- BSP: two workers on half batches equal one worker on the whole batch")
one = net(5)
whole = batches(20, 64, 2)
train_local(one, torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9), whole)
w0, w1 = net(5), net(5)
d0 = rt.DistributedOptimizer(torch.optim.SGD(w0.parameters(), lr=0.1, momentum=0.9),
                             w0.named_parameters(), client=c, model=w0, prefix="bsp.",
                             consistency="bsp", workers=2)
d1 = rt.DistributedOptimizer(torch.optim.SGD(w1.parameters(), lr=0.1, momentum=0.9),
                             w1.named_parameters(), client=c2, model=w1, prefix="bsp.",
                             consistency="bsp", workers=2)
for x, y in whole:
    for k, (mod, d) in enumerate(((w0, d0), (w1, d1))):
        d.zero_grad()
        half = slice(0, 32) if k == 0 else slice(32, 64)
        torch.nn.functional.cross_entropy(mod(x[half]), y[half]).backward()
    d0.step()
    d1.step()
d0.synchronize()
d1.synchronize()
err = max(max_rel(w0, one), max_rel(w1, one))
check(f"both workers equal one on the combined batch: max relative difference {err:.2e}",
      err <= 1e-5)
d0.close()
d1.close()

print("-- fewer bytes: bf16 pushes and pulls")
local, remote = net(7), net(7)
train_local(local, torch.optim.SGD(local.parameters(), lr=0.1), data)
p0 = c.stats()["push_bytes"]
dopt = rt.DistributedOptimizer(torch.optim.SGD(remote.parameters(), lr=0.1),
                               remote.named_parameters(), client=c, model=remote, prefix="wire.",
                               wire="bf16", pull="bf16")
train_rdmaps(remote, dopt, data)
nparams = sum(p.numel() for p in remote.parameters())
sent = c.stats()["push_bytes"] - p0
check(f"bf16 pushes: {sent} payload bytes for {STEPS} steps of {nparams} parameters "
      f"(2 each, chunks padded to 4; float32 would be {STEPS * 4 * nparams})",
      STEPS * 2 * nparams <= sent <= STEPS * (2 * nparams + 64))
bits = [p.detach().numpy().view(np.uint32) & 0xffff for p in remote.parameters()]
check("parameters pulled from the bf16 copy: every value is a bfloat16",
      all(not b.any() for b in bits))
err = max_rel(remote, local)
check(f"and training follows local float32 SGD: max relative difference {err:.2e} <= 0.05",
      err <= 0.05)
dopt.close()

print("-- refused, naming what")


def raises(what, exc, fn, needle):
    try:
        fn()
    except exc as e:
        check(f"{what} -> {type(e).__name__}: {e}", needle in str(e))
        return
    except Exception as e:  # the wrong one
        check(f"{what} -> expected {exc.__name__}, got {type(e).__name__}: {e}", False)
        return
    check(f"{what} -> expected {exc.__name__}, nothing raised", False)


d64 = net(1).double()
raises("a float64 parameter", TypeError, lambda: rt.DistributedOptimizer(
    torch.optim.SGD(d64.parameters(), lr=0.1), d64.named_parameters(), client=c, prefix="bad."),
    "'0.weight'")
rms = net(1)
raises("torch.optim.RMSprop", ValueError, lambda: rt.DistributedOptimizer(
    torch.optim.RMSprop(rms.parameters()), rms.named_parameters(), client=c, prefix="bad."),
    "RMSprop")
raises("SGD with dampening", ValueError, lambda: rt.DistributedOptimizer(
    torch.optim.SGD(rms.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
    rms.named_parameters(), client=c, prefix="bad."), "dampening")
raises("Adam with amsgrad", ValueError, lambda: rt.DistributedOptimizer(
    torch.optim.Adam(rms.parameters(), amsgrad=True), rms.named_parameters(), client=c,
    prefix="bad."), "amsgrad")
wide = torch.nn.Sequential(torch.nn.Linear(41, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
raises("a parameter of another size than the server's", ValueError,
       lambda: rt.DistributedOptimizer(torch.optim.SGD(wide.parameters(), lr=0.1),
                                       wide.named_parameters(), client=c, prefix="ex.sgd."),
       "'0.weight'")
# the same sizes, another shape: the servers keep sizes only, the shapes
# tensor tells them apart
flipped = net(1)
flipped[0].weight = torch.nn.Parameter(flipped[0].weight.detach().t().contiguous())
raises("a parameter of the server's size but another shape", ValueError,
       lambda: rt.DistributedOptimizer(torch.optim.SGD(flipped.parameters(), lr=0.1),
                                       flipped.named_parameters(), client=c, prefix="ex.sgd."),
       "'0.weight' has shape [40, 64], the first worker's [64, 40]")
fewer = net(1)
fewer[2].bias = None
raises("a model with fewer parameters than the first worker's", ValueError,
       lambda: rt.DistributedOptimizer(torch.optim.SGD(fewer.parameters(), lr=0.1),
                                       fewer.named_parameters(), client=c, prefix="ex.sgd."),
       "3 parameters")
c2.close()
c.close()
print(f"torch-checks: {'all passed' if not failures else f'{failures} FAILED'}")
sys.exit(1 if failures else 0)
