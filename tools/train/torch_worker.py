#!/usr/bin/python3
"""torch_worker.py -- a PyTorch worker: a small CNN on Fashion-MNIST through rdmaps.

The training loop is plain PyTorch (a DataLoader, forward, backward,
optimizer.step()); rdmaps.torch keeps the parameters on the servers:

    build/client/python/rdmaps-python tools/train/torch_worker.py \\
        --server 198.18.0.1 --src 198.18.0.1 --rank 0 --workers 2
    torchrun --nproc_per_node 2 tools/train/torch_worker.py --servers ...   # rank from torchrun

Each worker trains on its own slice of the 60000 training images; rank 0
reports the test accuracy after each epoch and the final one
("final_accuracy=0.xxxx"), after every worker has finished. --measure also
times the same steps without rdmaps (forward + backward + local optimizer
step) and reports the ratio (docs/benchmarks.md).
"""
import argparse
import gzip
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import rdmaps
import rdmaps.torch as rt
import finish

MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def load_idx(directory, prefix, limit=0):
    """(x float32 [n, 1, 28, 28] standardised, y int64 [n]) from the IDX files."""
    with gzip.open(os.path.join(directory, prefix + "-images-idx3-ubyte.gz"), "rb") as f:
        hdr = np.frombuffer(f.read(16), ">u4")
        n = int(hdr[1]) if not limit else min(int(hdr[1]), limit)
        pix = np.frombuffer(f.read(n * 784), np.uint8)
    with gzip.open(os.path.join(directory, prefix + "-labels-idx1-ubyte.gz"), "rb") as f:
        f.read(8)
        y = np.frombuffer(f.read(n), np.uint8)
    if hdr[0] != 0x803 or pix.size != n * 784 or y.size != n:
        raise SystemExit(f"torch_worker.py: {prefix}: not the IDX files expected")
    x = (pix.reshape(n, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


class CNN(torch.nn.Module):
    """conv 5x5 (16) - pool - conv 5x5 (32) - pool - 512 - 64 - 10: 46,730 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 5)
        self.conv2 = torch.nn.Conv2d(16, 32, 5)
        self.fc1 = torch.nn.Linear(512, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def make_optimizer(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise SystemExit(f"torch_worker.py: --optimizer {name}: sgd, momentum or adam")


def accuracy(model, x, y):
    with torch.no_grad():
        return sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                   for i in range(0, len(y), 1000)) / len(y)


def local_step_times(args, x, y, n):
    """The same steps without rdmaps: forward, backward, local optimizer step."""
    torch.manual_seed(args.seed)
    model = CNN()
    opt = make_optimizer(args.optimizer, model.parameters(), args.lr)
    times = []
    for i in range(n):
        xb, yb = x[i * args.batch:(i + 1) * args.batch], y[i * args.batch:(i + 1) * args.batch]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", help="one rdmaps-server")
    ap.add_argument("--port", default="7471")
    ap.add_argument("--servers", help="several shards: host[:port],...")
    ap.add_argument("--config", help="cluster description (INI, docs/cluster.md)")
    ap.add_argument("--src")
    ap.add_argument("--token", default=os.environ.get("RDMAPS_TOKEN"))
    ap.add_argument("--rank", type=int, help="default: the launcher's (torchrun...), else 0")
    ap.add_argument("--workers", type=int, help="default: the launcher's, else 1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="stop each epoch after this many")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    # Adam: SGD with momentum 0.9 (lr 0.05) learned far slower at first with
    # two asynchronous workers (0.10-0.24 after 25 steps each, against
    # 0.62 for Adam; the same in a plain-torch simulation of the interleaving)
    ap.add_argument("--optimizer", default="adam", help="adam (default), sgd, momentum (0.9)")
    ap.add_argument("--consistency", default="asp", help="asp, bsp, ssp")
    ap.add_argument("--loader-workers", type=int, default=1,
                    help="DataLoader processes (forked after the connection exists)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--wire", default="f32",
                    help="format of gradient pushes: f32 (default), bf16, fp16, sign, "
                         "topk:FRACTION (docs/protocol.md)")
    ap.add_argument("--subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--data", default=MNIST_DEFAULT_DIR)
    ap.add_argument("--name", default="cnn", help="tensor name prefix")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--target", type=float, default=0.0)
    ap.add_argument("--measure", type=int, default=0, metavar="N",
                    help="also time N steps without rdmaps and report the ratio")
    ap.add_argument("--timeout-ms", type=int, default=20000)
    ap.add_argument("--wait", type=int, default=3600)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrank, lsize = rt.rank(), rt.size()
    args.workers = args.workers or (lsize if lsize > 0 else 1)
    args.rank = args.rank if args.rank is not None else max(lrank, 0)
    if not 0 <= args.rank < args.workers:
        ap.error("--rank must be below --workers")
    tag = f"[w{args.rank}/torch]"

    x, y = load_idx(args.data, "train", args.subset)
    lo, hi = len(y) * args.rank // args.workers, len(y) * (args.rank + 1) // args.workers
    x, y = x[lo:hi], y[lo:hi]
    if args.rank == 0:
        tx, ty = load_idx(args.data, "t10k", args.test_subset)
    local = local_step_times(args, x, y, args.measure) if args.measure else []

    if args.server:
        client = rdmaps.Client(args.server, port=args.port, token=args.token, src=args.src,
                               timeout_ms=args.timeout_ms)
    else:
        client = rt.init(args.servers, config=args.config, token=args.token, src=args.src,
                         timeout_ms=args.timeout_ms)
    torch.manual_seed(args.seed)  # every worker builds the same model; the first one's wins
    model = CNN()
    opt = rt.DistributedOptimizer(make_optimizer(args.optimizer, model.parameters(), args.lr),
                                  model.named_parameters(), client=client, model=model,
                                  prefix=f"{args.name}.", consistency=args.consistency,
                                  workers=args.workers, wire=args.wire)
    done = finish.counter(client, args.name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{tag} {hi - lo} train samples (slice {lo}..{hi}), {n_params} params, batch "
          f"{args.batch}, {args.optimizer} lr {args.lr}, {args.consistency}, {args.epochs} "
          f"epochs, {args.loader_workers} loader processes, fork mode {rdmaps.fork_mode()}",
          flush=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch, shuffle=True,
        drop_last=True, num_workers=args.loader_workers,
        generator=torch.Generator().manual_seed(args.seed + args.rank))
    step_times = []
    t_start = time.monotonic()
    for ep in range(args.epochs):
        t0, loss, steps = time.monotonic(), 0.0, 0
        for xb, yb in loader:
            s0 = time.perf_counter()
            opt.zero_grad()
            out = F.cross_entropy(model(xb), yb)
            out.backward()
            opt.step()
            step_times.append(time.perf_counter() - s0)
            loss += float(out)
            steps += 1
            if args.steps and steps >= args.steps:
                break
        opt.synchronize()
        acc = f"  test_acc {accuracy(model, tx, ty):.4f}" if args.rank == 0 else ""
        dt = time.monotonic() - t0
        print(f"{tag} epoch {ep + 1}/{args.epochs}  loss {loss / max(steps, 1):.4f}{acc}  "
              f"steps/s {steps / dt:.2f}  ({dt:.1f} s)", flush=True)
    st, tm = opt.stats(), opt.timings()
    print(f"{tag} done in {time.monotonic() - t_start:.1f} s: {st['pulls']} pulls, "
          f"{st['pushes']} pushes, {st['pull_retries']} torn-read retries, "
          f"{st['bounce_copies']} bounce copies; waited {tm['push_wait_s']:.2f} s for pushes, "
          f"{tm['pull_wait_s']:.2f} s for pulls", flush=True)
    if local:
        # the first steps warm up (allocator, caches): medians of the rest
        a, b = statistics.median(step_times[2:]), statistics.median(local[2:])
        print(f"{tag} measure: step through rdmaps {a * 1e3:.1f} ms, compute alone "
              f"{b * 1e3:.1f} ms, ratio {a / b:.3f}; waits per step: pushes "
              f"{tm['push_wait_s'] / max(tm['steps'], 1) * 1e3:.2f} ms, pulls "
              f"{tm['pull_wait_s'] / max(tm['steps'], 1) * 1e3:.2f} ms; push time hidden "
              f"behind backward {100 * (1 - tm['push_wait_s'] / max(tm['push_span_s'], 1e-9)):.1f} %",
              flush=True)
    one = client.register(rdmaps.zeros(1))
    finish.count_me(client, done, one)
    status = 0
    if args.rank == 0:
        if not finish.wait_all(client, done, one, args.workers, args.wait, tag):
            return 1
        opt.refresh()  # the final model, as every worker left it
        status = finish.report(tag, accuracy(model, tx, ty), args.workers, t_start, args.target)
    opt.close()
    client.close()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except rdmaps.Error as e:
        print(f"torch_worker.py: {e}", file=sys.stderr)
        sys.exit(1)
