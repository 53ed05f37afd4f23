"""
The plumbing train.py's loops share, none of it Panacea: the processes (one, or several under
torchrun with DDP), logging from rank 0, atomic checkpoints that carry the RNG stream of every
process (so a resumed run draws what an unbroken one would), progress bars and the lr schedule.
Everything reads the process group from torch.distributed, so there is no state here.
"""
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


def init(device):
    """Processes and device: under torchrun one process per device (NCCL on GPUs, gloo on CPUs), each
    on cuda:LOCAL_RANK or the CPU. Returns rank, local rank, world size, the device and its type."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else \
        (0, 0, 1)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    device = f"cuda:{local_rank}" if ddp and device_type == "cuda" else device
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores among a machine's processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device_type == "cuda":
        torch.cuda.set_device(torch.device(device).index or 0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, local_rank, world_size, device, device_type


def distributed():
    return dist.is_available() and dist.is_initialized()


def print0(*a):
    """print on rank 0 only (through tqdm, so that a progress bar stays below the lines)."""
    if not distributed() or dist.get_rank() == 0:
        tqdm.write(" ".join(str(x) for x in a))


def all_reduce(x, device, op="mean"):
    """The mean (or max) of a float or tensor over processes, as a float32 tensor on device."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device).clone()
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        t = t / dist.get_world_size() if op == "mean" else t
    return t


def gather_rows(x):
    """x (N, ...) with N per process concatenated over processes in rank order (x itself when not distributed)."""
    if not distributed():
        return x
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, x.cpu())
    return torch.cat(gathered).to(x.device)


def wrap(model, compile=False):
    """A training model, compiled if asked and DDP-wrapped under torchrun. Buffers are not broadcast:
    lambda (a buffer) differs from process to process."""
    model = torch.compile(model) if compile else model
    if not distributed():
        return model
    cuda = next(model.parameters()).device.type == "cuda"
    return DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None, broadcast_buffers=False)


def in_sync(model):
    """Whether every process holds rank 0's weights (after a stage they must: a divergence is a bug)."""
    flat = torch.cat([q.detach().float().flatten() for q in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return not all_reduce(float(not torch.equal(flat, ref)), flat.device, "max").item()


def save(path, ck):
    """Atomic: rank 0 writes a temp file, then renames it over the checkpoint; the others wait."""
    if not distributed() or dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(ck, path + ".tmp")
        os.replace(path + ".tmp", path)
    if distributed():
        dist.barrier()


def check_sync(name, model):
    """Under DDP every process must hold rank 0's weights after a stage: a divergence is a bug."""
    if distributed():
        if not in_sync(model):
            raise RuntimeError(f"ddp: {name} parameters differ between ranks")
        print0(f"ddp: {name} parameters identical on {dist.get_world_size()} ranks")


def snapshot(nets, opt, **progress):
    """A checkpoint of a stage in progress: the nets' weights, the optimizer, every process's RNG state."""
    return dict(progress, **{k: net.state_dict() for k, net in nets.items()}, optimizer=opt.state_dict(),
                rng=rng_states(), finished=False)


def restore(nets, opt, ck, seed, label):
    """Resume from snapshot ck: weights, optimizer and RNG streams; returns the iteration to continue at."""
    for k, net in nets.items():
        net.load_state_dict(ck[k])
    opt.load_state_dict(ck["optimizer"])
    set_rng(ck["rng"], seed)
    print0(f"{label}: resuming at iteration {ck['iter_num']}")
    return ck["iter_num"]


def rng_states():
    """The RNG state of every process, [per rank {"cpu", "cuda"?}], for a checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if not distributed():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng(states, seed):
    """Continue this process's RNG stream from a checkpoint; resumed with another number of processes,
    fresh streams from seed, still distinct per rank."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    if len(states) == world_size:
        torch.set_rng_state(states[rank]["cpu"].cpu())
        if "cuda" in states[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu())
    else:
        torch.manual_seed(seed + 1000 * rank + len(states))


def steps(start, iters, label):
    """range(start, iters), with a progress bar on rank 0 when stderr is a terminal."""
    quiet = (distributed() and dist.get_rank() > 0) or not sys.stderr.isatty()
    return tqdm(range(start, iters), initial=start, total=iters, desc=label, leave=False, disable=quiet)


def cosine_lr(it, total, lr, warmup):
    """Linear warm-up, then cosine decay to lr / 10."""
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr / 10 + 0.45 * lr * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
