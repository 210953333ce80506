"""finish.py -- how a training job ends, for the Python workers (worker.py,
torch_worker.py; worker.c does the same in C): each worker counts itself
done on a one-float tensor NAME.done (SGD with lr 1: a push of -1 adds one),
rank 0 waits until all have, evaluates the model as they left it, and
prints the machine-readable last line "final_accuracy=0.xxxx".
"""
import sys
import time


def counter(client, name):
    """The job's done counter (every worker declares it; 0 to start)."""
    return client.declare(f"{name}.done", 1, init_value=0.0, optimizer="sgd", lr=1.0)


def count_me(client, done, one):
    """This worker is done; `one` is a registered 1-float array."""
    one[0] = -1.0
    client.push(done, one, folded=True)


def wait_all(client, done, one, workers, wait_s, tag):
    """Rank 0: wait until every worker counted itself; False after wait_s."""
    give_up = time.monotonic() + wait_s
    while client.pull(done, one)[0] < workers:
        if time.monotonic() > give_up:
            print(f"{tag} gave up waiting: {one[0]:.0f} of {workers} workers finished",
                  file=sys.stderr)
            return False
        time.sleep(0.05)
    return True


def report(tag, accuracy, workers, t_start, target):
    """The last lines; 1 when the accuracy is below a target, else 0."""
    print(f"{tag} {workers} workers, {time.monotonic() - t_start:.1f} s")
    print(f"final_accuracy={accuracy:.4f}", flush=True)
    if target and accuracy < target:
        print(f"{tag} final accuracy {accuracy:.4f} is below the target {target:.4f}",
              file=sys.stderr)
        return 1
    return 0
