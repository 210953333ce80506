#!/usr/bin/python3
"""worker.py -- the Python twin of rdmaps-train-worker (tools/train/worker.c).

Trains the same 784-H-10 MLP on Fashion-MNIST against the same rdmaps server,
with the same tensor names, flat parameter layout (tools/train/mlp.h),
initialisation, input standardisation, data slicing, learning-rate rule and
output lines, so C and Python workers can train one model together:

    build/client/python/rdmaps-python tools/train/worker.py \\
        --server 198.18.0.1 --src 198.18.0.1 --token T --rank 2 --workers 3

The model is computed densely with numpy; parameters and gradients travel
through the `rdmaps` module, zero-copy: the flat parameter and gradient
buffers come from rdmaps.zeros() and are registered once, and w1/b1/w2/b2 are
numpy views into them.

--fork-loader prepares minibatches in a forked child process (as data
loaders do) after the connection and registrations exist: the parent keeps
pulling and pushing while the child works (see "fork" in docs/training.md).
"""
import argparse
import gzip
import multiprocessing
import os
import sys
import time

import numpy as np

import rdmaps
import finish

MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_MEAN = np.float32(0.2860)  # Fashion-MNIST training-set pixel mean / std,
MNIST_STD = np.float32(0.3530)   # as in tools/train/mnist.h
IN, OUT = 784, 10
GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def load_idx(directory, prefix, limit):
    """(x, y): x float32 [n, 784] = pixel / 255, y uint8 [n] (mnist.c's loader)."""
    with gzip.open(os.path.join(directory, prefix + "-images-idx3-ubyte.gz"), "rb") as f:
        hdr = np.frombuffer(f.read(16), ">u4")
        if hdr[0] != 0x803:
            raise SystemExit(f"worker.py: {prefix} images: bad IDX magic {hdr[0]:#x}")
        n, rows, cols = (int(v) for v in hdr[1:])
        n = min(n, limit) if limit else n
        pix = np.frombuffer(f.read(n * rows * cols), np.uint8)
    with gzip.open(os.path.join(directory, prefix + "-labels-idx1-ubyte.gz"), "rb") as f:
        hdr = np.frombuffer(f.read(8), ">u4")
        if hdr[0] != 0x801 or hdr[1] < n:
            raise SystemExit(f"worker.py: {prefix} labels do not match the images")
        y = np.frombuffer(f.read(n), np.uint8)
    if pix.size != n * rows * cols or y.size != n:
        raise SystemExit(f"worker.py: {prefix}: files shorter than their headers say")
    x = pix.reshape(n, rows * cols).astype(np.float32) * np.float32(1.0 / 255.0)
    return x, y


class SplitMix64:
    """The splitmix64 stream of mlp.c/worker.c, vectorised."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self, n):
        k = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(self.state) + k * np.uint64(GOLDEN)  # wraps mod 2^64, like C
        self.state = (self.state + n * GOLDEN) & MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def uniform(self, n):
        """n floats in [0,1) from 24 random bits each (exact in float32)."""
        return (self.next(n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


class MLP:
    """Views w1, b1, w2, b2 into one flat float32 array (layout of mlp.h)."""

    def __init__(self, hidden):
        self.hidden = hidden
        self.sizes = [IN * hidden, hidden, hidden * OUT, OUT]
        self.n_params = sum(self.sizes)

    def views(self, flat):
        h, o = self.hidden, np.cumsum([0] + self.sizes)
        return (flat[o[0]:o[1]].reshape(IN, h), flat[o[1]:o[2]],
                flat[o[2]:o[3]].reshape(h, OUT), flat[o[3]:o[4]])

    def init_params(self, seed):
        """mlp_init_params(): He-uniform w1, Glorot-uniform w2, zero biases."""
        p = np.zeros(self.n_params, np.float32)
        w1, _, w2, _ = self.views(p)
        rng = SplitMix64(seed)
        lim1 = np.sqrt(np.float32(6.0) / np.float32(IN))
        lim2 = np.sqrt(np.float32(6.0) / np.float32(self.hidden + OUT))
        w1[...] = ((np.float32(2.0) * rng.uniform(w1.size) - np.float32(1.0)) * lim1).reshape(w1.shape)
        w2[...] = ((np.float32(2.0) * rng.uniform(w2.size) - np.float32(1.0)) * lim2).reshape(w2.shape)
        return p

    @staticmethod
    def standardise(x):
        return (x - MNIST_MEAN) / MNIST_STD

    def gradient(self, params, u, y, grad):
        """Mean-loss gradient of the batch (u standardised) into grad; returns the loss."""
        w1, b1, w2, b2 = self.views(params)
        g1, gb1, g2, gb2 = self.views(grad)
        b = len(y)
        h = np.maximum(u @ w1 + b1, np.float32(0))
        z = h @ w2 + b2
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        rows = np.arange(b)
        loss = float(-np.log(np.maximum(p[rows, y], np.float32(1e-30))).mean())
        p[rows, y] -= np.float32(1.0)
        dz = p / np.float32(b)
        np.matmul(h.T, dz, out=g2)
        gb2[...] = dz.sum(axis=0)
        dh = (dz @ w2.T) * (h > 0)
        np.matmul(u.T, dh, out=g1)
        gb1[...] = dh.sum(axis=0)
        return loss

    def accuracy(self, params, x, y, chunk=2000):
        w1, b1, w2, b2 = self.views(params)
        ok = 0
        for i in range(0, len(y), chunk):
            u = self.standardise(x[i:i + chunk])
            z = np.maximum(u @ w1 + b1, np.float32(0)) @ w2 + b2
            ok += int((z.argmax(axis=1) == y[i:i + chunk]).sum())
        return ok / len(y)


def server_lr(lr, workers):
    """worker.c's rule: asynchronous pushes are not summed, so no linear
    scaling; damp by sqrt(2 / W) from three workers on, against staleness."""
    return lr if workers <= 2 else float(np.float32(lr) * np.sqrt(np.float32(2.0) / np.float32(workers)))


def shuffled(idx, seed):
    """Fisher-Yates with splitmix64, the same permutation as worker.c."""
    idx = idx.copy()
    rng = SplitMix64(seed)
    r = rng.next(len(idx) - 1) if len(idx) > 1 else []
    for step, i in enumerate(range(len(idx), 1, -1)):
        j = int(r[step]) % i
        idx[i - 1], idx[j] = idx[j], idx[i - 1]
    return idx


def loader(conn, x, y, batches):
    """Forked data-loader child: standardise each minibatch and send it."""
    for ix in batches:
        conn.send((MLP.standardise(x[ix]), y[ix]))
    conn.close()


def connect_retry(args):
    if not args.server:  # a cluster: rdmaps_connect_cluster retries by itself
        return rdmaps.Client(servers=args.servers, config=args.config, token=args.token,
                             src=args.src, timeout_ms=args.timeout_ms)
    give_up = time.monotonic() + args.timeout_ms / 1000
    while True:
        try:
            return rdmaps.Client(args.server, port=args.port, token=args.token, src=args.src,
                                 timeout_ms=args.timeout_ms)
        except rdmaps.Error as e:
            if e.code not in (rdmaps.ECONNECT, rdmaps.ETIMEDOUT) or time.monotonic() > give_up:
                raise
            time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", help="one rdmaps-server")
    ap.add_argument("--port", default="7471")
    ap.add_argument("--servers", help="several shards: host[:port],host[:port]...")
    ap.add_argument("--config", help="cluster description (INI, docs/cluster.md)")
    ap.add_argument("--src")
    ap.add_argument("--token", default=os.environ.get("RDMAPS_TOKEN"))
    ap.add_argument("--rank", type=int, help="default: the launcher's, else 0")
    ap.add_argument("--workers", type=int, help="default: the launcher's, else 1")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lr-end", type=float, default=0.1)
    ap.add_argument("--subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--data", default=MNIST_DEFAULT_DIR)
    ap.add_argument("--name", default="fmnist")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--target", type=float, default=0.0)
    ap.add_argument("--timeout-ms", type=int, default=20000)
    ap.add_argument("--wait", type=int, default=1800)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--wire", default="f32", type=rdmaps.parse_wire,
                    help="format of gradient pushes: f32 (default), bf16, fp16, sign, "
                         "topk:FRACTION (docs/protocol.md)")
    ap.add_argument("--fork-loader", action="store_true",
                    help="prepare minibatches in a forked child process")
    args = ap.parse_args()
    if args.server and (args.servers or args.config):
        ap.error("--server or --servers/--config, not both")
    if not (args.server or args.servers or args.config or os.environ.get("RDMAPS_SERVERS")
            or os.environ.get("RDMAPS_CONFIG")):
        args.server = os.environ.get("RDMAPS_RXE_ADDR")
        if not args.server:
            ap.error("no server: --server, --servers or --config")
    lrank, lsize = rdmaps.launch_info()  # Slurm, MPI, torchrun... when not given
    if args.workers is None:
        args.workers = lsize if lsize > 0 else 1
    if args.rank is None:
        args.rank = lrank if lrank >= 0 else 0
    if not 0 <= args.rank < args.workers:
        ap.error("--rank must be below --workers")
    tag = f"[w{args.rank}/py]"
    say = (lambda *a: None) if args.quiet else print

    x, y = load_idx(args.data, "train", args.subset)
    if args.rank == 0:
        tx, ty = load_idx(args.data, "t10k", args.test_subset)
    n = len(y)
    lo, hi = n * args.rank // args.workers, n * (args.rank + 1) // args.workers
    if hi - lo < args.batch:
        raise SystemExit(f"worker.py: slice of {hi - lo} samples is smaller than a batch")

    m = MLP(args.hidden)
    client = connect_retry(args)
    # every worker declares the same tensor with the same initial values (the
    # first declaration wins); registered, so even that initial push is zero-copy
    init = client.register(rdmaps.zeros(m.n_params))
    init[:] = m.init_params(args.seed)
    tp = client.declare(f"{args.name}.mlp784x{args.hidden}x10", m.n_params, init=init,
                        optimizer="sgd", lr=server_lr(args.lr, args.workers))
    client.deregister(init)
    del init
    client.set_push_format(tp, *args.wire)
    tdone = finish.counter(client, args.name)
    # page-aligned buffers of their own, registered once: every pull and push
    # below is zero-copy (client.stats()['bounce_copies'] stays 0)
    params = client.register(rdmaps.zeros(m.n_params))
    grad = client.register(rdmaps.zeros(m.n_params))
    aux = client.register(rdmaps.zeros(1))
    if not args.quiet or args.rank == 0:
        print(f"{tag} {hi - lo} train samples (slice {lo}..{hi}), {m.n_params} params, "
              f"batch {args.batch}, server lr {server_lr(args.lr, args.workers):.4g}, "
              f"{args.epochs} epochs, {client.num_servers} server{'s' * (client.num_servers != 1)}, "
              f"fork mode {rdmaps.fork_mode()}", flush=True)

    steps = (hi - lo) // args.batch
    lat = np.empty(steps, np.float64)  # pull latencies, preallocated
    idx = np.arange(lo, hi)
    t_start = time.monotonic()
    for ep in range(args.epochs):
        t0, loss = time.monotonic(), 0.0
        order = shuffled(idx, (args.seed * 1000003 + args.rank * 7919 + ep) & MASK64)
        batches = [order[s * args.batch:(s + 1) * args.batch] for s in range(steps)]
        if args.fork_loader:
            # forked after connect + register: the situation fork safety is about
            ctx = multiprocessing.get_context("fork")
            rx, tx_ = ctx.Pipe(duplex=False)
            child = ctx.Process(target=loader, args=(tx_, x, y, batches), daemon=True)
            child.start()
            tx_.close()
            source = (rx.recv() for _ in range(steps))
        else:
            source = ((MLP.standardise(x[ix]), y[ix]) for ix in batches)
        for s, (u, yb) in enumerate(source):
            p0 = time.perf_counter_ns()
            client.pull(tp, params)
            lat[s] = time.perf_counter_ns() - p0
            loss += m.gradient(params, u, yb, grad)
            # learning-rate schedule by scaling the push (server SGD is linear)
            grad *= np.float32(1.0 - (1.0 - args.lr_end) * (ep * steps + s) / (args.epochs * steps))
            client.push(tp, grad)
        if args.fork_loader:
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"{tag} data-loader child failed ({child.exitcode})")
        dt = time.monotonic() - t0
        acc = ""
        if args.rank == 0:
            client.pull(tp, params)
            acc = f"  test_acc {m.accuracy(params, tx, ty):.4f}"
        p50, p99 = np.percentile(lat, [50, 99], method="higher") / 1e6
        say(f"{tag} epoch {ep + 1}/{args.epochs}  loss {loss / steps:.4f}{acc}  "
            f"pulls/s {steps / dt:.1f}  pull p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({dt:.1f} s)",
            flush=True)

    finish.count_me(client, tdone, aux)
    client.flush(args.timeout_ms)
    st = client.stats()
    if not args.quiet or args.rank == 0:
        print(f"{tag} done in {time.monotonic() - t_start:.1f} s: {st['pulls']} pulls, "
              f"{st['pushes']} pushes, {st['pull_retries']} torn-read retries, "
              f"{st['bounce_copies']} bounce copies, {st['push_bytes'] / 1e6:.1f} MB pushed",
              flush=True)
    status = 0
    if args.rank == 0:
        if not finish.wait_all(client, tdone, aux, args.workers, args.wait, tag):
            return 1
        client.pull(tp, params)
        a = m.accuracy(params, tx, ty)
        ss = client.server_stats()
        print(f"{tag} server: {ss['folds']} folds, {ss['dropped']} dropped, {ss['tensors']} tensors")
        status = finish.report(tag, a, args.workers, t_start, args.target)
    client.close()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except rdmaps.Error as e:
        print(f"worker.py: {e}", file=sys.stderr)
        sys.exit(1)
