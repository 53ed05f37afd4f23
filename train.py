"""
Trains Panacea stage by stage (--stage all = sft,rm,panacea,eval):
    sft      a language model on the SFT corpus, loss on response tokens   -> BASE_DIR/sft/ckpt.pt
             (a GPT from scratch, or --init_from a pretrained model: smollm2-135m-instruct or a .gguf file)
    rm       SFT trunk + one scalar head per objective, Bradley-Terry loss -> BASE_DIR/rm/ckpt.pt
    panacea  SFT model + SVD-LoRA conditioned on lambda, by PPO or DPO     -> OUT_DIR/panacea/ckpt.pt
             (--method rs|dps trains the paper's baselines with the same algorithm and budget)
    eval     the Pareto front on held-out prompts over a lambda grid       -> OUT_DIR/front.json, pareto.png
The data is the embedded world's (in BASE_DIR/data, with ground-truth judges) or your own pairs with
--data_dir (data.py; the front is then measured with the reward models). Runs sharing one --base_dir
share their SFT and reward models. A finished stage whose checkpoint matches the flags is reused; an unfinished one resumes.

    python train.py                                           # the whole default pipeline
    python train.py --init_from smollm2-135m-instruct         # the same from a pretrained model
    torchrun --standalone --nproc_per_node=2 train.py         # with DDP (gloo on CPU, NCCL on GPU)
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import build
import data
import evaluate
import world
from model import GPT, GPTConfig
from panacea import fixed_prefs, sample_prefs
from rlhf import (dpo_iteration, finished_scores, optimizer_step, pair_accuracy, pair_batch,
                  ppo_iteration, response_mask, reward_model_loss, rollout)
from svd_lora import lora_state_dict

# ---------------------------------------------------------------------------------------------- config
# Flags come in groups: a stage's checkpoint records every flag of its own group and of the groups
# of the stages it builds on (STAGE_KEYS below), so a changed flag never reuses a stale result.
p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.error = lambda msg: p.exit(2, f"error: {msg} (see --help)\n")  # one line, no usage dump
GROUPS = {}


def group(name, **flags):
    """An argument group of --flag=default, or --flag=(default, help[, choices or a type])."""
    g = GROUPS[name] = p.add_argument_group(name)
    for k, v in flags.items():
        default, help, extra = (*v, None)[:3] if isinstance(v, tuple) else (v, None, None)
        if isinstance(default, bool):
            g.add_argument("--" + k, action="store_true", help=help)
        else:
            kind = extra if isinstance(extra, type) else str if default is None else type(default)
            g.add_argument("--" + k, type=kind, default=default, help=help, choices=extra if isinstance(extra, list) else None)


group("run", out_dir="out", base_dir=(None, "where the sft and rm stages live (default: out_dir)"),
      data_dir=(None, "your own pairs.jsonl (+ pairs_eval.jsonl, sft.jsonl; see data.py); default: the world"),
      stage=("all", "all, or a comma list of sft,rm,panacea,eval"), device=("auto", "auto (cuda if available), cpu, cuda:1, ..."),
      dtype=("auto", "auto (bfloat16 autocast on cuda), float32, bfloat16"), compile=(False, "torch.compile the training passes"),
      log_interval=(10, "Panacea iterations between log lines"), eval_interval=(250, "SFT / reward-model iterations between log lines"),
      ckpt_interval=(20, "iterations between checkpoints (every stage)"))
group("sft", seed=1337, init_from=(None, "smollm2-135m-instruct or a Llama-style .gguf path (the model flags are then the file's)"),
      n_layer=4, n_head=4, n_embd=128, block_size=(96, "longest sequence; longer samples are left out"), dropout=0.0, sft_iters=500,
      batch_size=32, learning_rate=2e-3, warmup_iters=50, weight_decay=0.1, grad_clip=1.0, n_sft=(20000, "world: SFT corpus size"))
group("rm", rm_iters=600, rm_batch_size=(16, "pairs per step"), rm_lr=5e-4, n_pairs=(20000, "world: preference pairs"),
      label_temperature=(0.1, "world: Bradley-Terry noise of the labels"), n_stat_samples=(512, "SFT samples for the score statistics"),
      max_new_tokens=(60, "response length cap (statistics, rollouts, evaluation)"))
group("panacea", objectives=(None, "2 or more that the data labels (default: world helpful,harmless; your data: all)"),
      method=("panacea", None, ["panacea", "rs", "dps"]), algo=("ppo", None, ["ppo", "dpo"]), agg=("ls", None, ["ls", "tche"]),
      tche_mu=(0.0, "> 0: smooth Tchebycheff with this temperature"), rl_iters=40, lora_rank=(8, "k, the preference-agnostic singular values"),
      lora_alpha=16.0, rl_lr=2e-3, rl_schedule=("constant", "adapter lr: constant, or cosine decay to rl_lr / 10", ["constant", "cosine"]),
      vertex_prob=(0.3, "share of lambda draws on a simplex vertex"), rollout_batch=(64, "prompts per iteration per process (DPO: pairs)"),
      pref_group=(8, "sequences (DPO: pairs) that share one lambda draw"), minibatch_size=32,
      epochs=(2, "passes over each iteration's batch (PPO and DPO)"))
group("ppo", kl_coef=0.05, clip=0.2, clip_value=0.2, vf_coef=0.5, gae_lambda=0.95, temperature=(1.0, "rollout sampling temperature"))
group("dpo", dpo_beta=0.5)
group("dps", dps_points=(5, "DPS grid size (m >= 3: the smallest simplex lattice that large)"))
group("eval", eval_divisions=(None, "lambda grid step 1/d (default: 10 for m = 2, 4 for m >= 3)", int),
      eval_temperature=(0.0, "0 = greedy"), eval_prompts=(100, "your data: held-out prompts the front is measured on (at most)"))
# --init_from changes the defaults to a fine-tuning recipe for a pretrained model (sized for one GPU)
PRETRAINED = dict(block_size=512, learning_rate=1e-4, warmup_iters=10, sft_iters=200, batch_size=16, rm_lr=1e-4, rm_iters=200,
                  n_stat_samples=256, rl_lr=5e-4, minibatch_size=16)
if p.parse_known_args()[0].init_from:
    p.set_defaults(**PRETRAINED)
args = p.parse_args()
config = vars(args)
stages = ["sft", "rm", "panacea", "eval"] if args.stage == "all" else args.stage.split(",")


def fail(msg):
    """User errors end in one line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


if any(s not in ("sft", "rm", "panacea", "eval") for s in stages):
    fail(f"--stage takes all or a comma list of sft,rm,panacea,eval; got {args.stage}")
if args.rollout_batch % args.pref_group:
    fail(f"--rollout_batch ({args.rollout_batch}) must be a multiple of --pref_group ({args.pref_group})")
base_dir = args.base_dir or args.out_dir

# ---------------------------------------------------------------------------------------------- DDP
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
device = args.device if args.device != "auto" and not ddp else f"cuda:{local_rank}" if use_cuda else "cpu"
if ddp:
    dist.init_process_group("nccl" if use_cuda else "gloo")
if not use_cuda and "OMP_NUM_THREADS" not in os.environ:  # share the cores among the processes of a machine
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
master = rank == 0
device_type = "cuda" if use_cuda else "cpu"
dtype = ("bfloat16" if use_cuda else "float32") if args.dtype == "auto" else args.dtype
autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
if use_cuda:
    torch.cuda.set_device(torch.device(device).index or 0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def print0(*a):
    if master:
        tqdm.write(" ".join(str(x) for x in a))


def all_mean(x, op="mean"):
    """Mean (or max) of a float or tensor over processes."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device).clone()
    if ddp:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t / world_size if op == "mean" else t


# ---------------------------------------------------------------------------------------------- checkpoints
# A stage's checkpoint records the config keys its result depends on; reuse requires them to match.
STAGE_KEYS = {"sft": [a.dest for a in GROUPS["sft"]._group_actions] + ["data"]}
for stage, before, groups in (("rm", "sft", ["rm"]), ("panacea", "rm", ["panacea", args.algo] + ["dps"] * (args.method == "dps"))):
    STAGE_KEYS[stage] = STAGE_KEYS[before] + [a.dest for g in groups for a in GROUPS[g]._group_actions]


def ckpt_path(stage):
    return os.path.join(base_dir if stage in ("sft", "rm") else args.out_dir, stage, "ckpt.pt")


def save_ckpt(stage, obj):
    """Atomic: write a temp file, then rename it over the checkpoint. Rank 0 writes."""
    if master:
        path = ckpt_path(stage)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        obj["config"] = {k: config[k] for k in STAGE_KEYS[stage]}
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    if ddp:
        dist.barrier()


def load_ckpt(stage, required=False):
    path = ckpt_path(stage)
    if not os.path.exists(path):
        if required:
            fail(f"{path} does not exist: run --stage {stage} first")
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to train the stage again")
    diff = [f"{k}={ck['config'].get(k)!r} (now {config[k]!r})" for k in STAGE_KEYS[stage] if ck["config"].get(k) != config[k]]
    if diff:
        fail(f"{path} was trained with {', '.join(diff)}; use the same flags, another --out_dir/--base_dir, or delete it")
    return ck


def rng_states():
    states, s = [None] * world_size, {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if use_cuda else {})}
    dist.all_gather_object(states, s) if ddp else states.__setitem__(0, s)
    return states


def set_rng(states):
    if len(states) == world_size:
        torch.set_rng_state(states[rank]["cpu"].cpu())
        if use_cuda and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu())
    else:  # resumed with another number of processes: fresh streams, still distinct per rank
        torch.manual_seed(args.seed + 1000 * rank + len(states))


def check_ddp_sync(stage, model):
    """Under DDP every rank must hold the same weights after a stage; a divergence is a bug."""
    if ddp:
        flat = torch.cat([q.detach().float().flatten() for q in model.parameters()])
        dist.broadcast(ref := flat.clone(), 0)
        if all_mean(op="max", x=torch.tensor(float(not torch.equal(flat, ref)), device=device)).item():
            fail(f"ddp: {stage} parameters differ between ranks")
        print0(f"ddp: {stage} parameters identical on {world_size} ranks")


def cosine_lr(it, total, lr, warmup):
    """Linear warm-up, then cosine decay to lr / 10."""
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr / 10 + 0.45 * lr * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


def wrap(model):
    """DDP around a training model; buffers (lambda differs per process) are not broadcast."""
    model = torch.compile(model) if args.compile else model
    return DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False) if ddp else model


# ---------------------------------------------------------------------------------------------- data
def open_source():
    """The data source (data.py): your --data_dir, or the world's files, written once by rank 0."""
    try:
        if args.data_dir:
            return data.own_data(args.data_dir)
        world_data = data.World(os.path.join(base_dir, "data"), args.seed, args.n_sft, args.n_pairs, args.label_temperature, write=master)
        if ddp:  # the other ranks read what rank 0 wrote
            dist.barrier()
        return world_data
    except ValueError as e:
        fail(e)


def encoded(what, *rest):
    """data.sft_tensors or data.pair_tensors at --block_size, errors as one line."""
    try:
        out, dropped = what(source, *rest, args.block_size)
    except ValueError as e:
        fail(e)
    if dropped:
        print0(f"{dropped} samples longer than --block_size {args.block_size} tokens are left out")
    return out


# ---------------------------------------------------------------------------------------------- the training loop
def train(stage, nets, opt, iters, step, state, label, log_interval, lr=None):
    """The one loop of every stage: lr schedule, step(it) -> log line (a clipped, finite optimizer
    step inside), atomic checkpoints of nets {name: module}, the optimizer, the RNG streams and
    `state` every ckpt_interval, and resume from such a checkpoint (state["iter_num"] > 0)."""
    start = state.get("iter_num", 0)
    if start:
        for k, net in nets.items():
            net.load_state_dict(state[k])
        opt.load_state_dict(state["optimizer"]), set_rng(state["rng"])
        print0(f"{label}: resuming at iteration {start}")
    t0 = time.time()
    for it in tqdm(range(start, iters), initial=start, total=iters, desc=label, disable=not master or not sys.stderr.isatty(), leave=False):
        for g in opt.param_groups:
            g["lr"] = lr(it) if lr else g["lr"]
        try:
            msg = step(it)
        except FloatingPointError:  # raised before the step: the weights and the last checkpoint are still good
            fail(f"{stage}: loss or gradient is not finite at iteration {it}; the last good checkpoint is {ckpt_path(stage)} "
                 f"(try a lower learning rate)")
        if (it + 1) % log_interval == 0 or it == 0 or it + 1 == iters:
            print0(f"{label} iter {it + 1}: {msg}")
        state["iter_num"] = it + 1
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < iters:
            state["seconds"], t0 = state.get("seconds", 0.0) + time.time() - t0, time.time()
            save_ckpt(stage, dict(state, **{k: n.state_dict() for k, n in nets.items()}, optimizer=opt.state_dict(),
                                  rng=rng_states(), finished=False))
    state["seconds"] = state.get("seconds", 0.0) + time.time() - t0
    for k, net in nets.items():
        check_ddp_sync(f"{stage} {k}", net)
    return state


def supervised(stage, model, opt, iters, lr, batch_loss, resume, keep):
    """SFT and reward models: warm-up + cosine lr, batch_loss(train_model) -> loss of a fresh batch."""
    train_model = wrap(model.train())

    def step(it):
        with autocast:
            loss = batch_loss(train_model)
        optimizer_step(opt, loss, args.grad_clip)
        return f"loss {all_mean(loss.item()).item():.4f}, lr {opt.param_groups[0]['lr']:.2e}"

    train(stage, {"model": model}, opt, iters, step, resume or {}, stage, args.eval_interval,
          lambda it: cosine_lr(it, iters, lr, args.warmup_iters))
    return dict(keep, model=model.eval().state_dict(), iter_num=iters, finished=True)


# ---------------------------------------------------------------------------------------------- sft
def stage_sft(resume):
    tok = data.tokenizer(TOKENIZER)
    tokens, plen, slen = encoded(data.sft_tensors, tok)
    targets = torch.where(response_mask(plen, slen, tokens.size(1)).bool(), tokens[:, 1:], -1)  # loss on the response only
    torch.manual_seed(args.seed + rank)
    try:
        model = (GPT.from_pretrained(args.init_from, block_size=args.block_size, dropout=args.dropout) if args.init_from else
                 GPT(GPTConfig(args.block_size, tok.vocab_size, args.n_layer, args.n_head, args.n_embd, args.dropout))).to(device)
    except (ImportError, ValueError) as e:
        fail(e)
    model_args = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "n_heads_out"}
    opt = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95), device_type)
    print0(f"sft: {model.num_params() / 1e6:.2f}M parameters ({args.init_from or 'from scratch'}), {len(tokens)} samples "
           f"of {source.describe}, vocabulary {tok.vocab_size}")

    def batch_loss(train_model):
        ix = torch.randint(len(tokens), (args.batch_size,))
        T, start = int(slen[ix].max()), int(plen[ix].min()) - 1  # logits from the first response position on
        return train_model(tokens[ix, : T - 1].to(device), targets[ix, : T - 1].to(device), from_pos=start)[1]

    ck = supervised("sft", model, opt, args.sft_iters, args.learning_rate, batch_loss, resume, dict(model_args=model_args,
                    tokenizer=TOKENIZER))
    save_ckpt("sft", ck)
    torch.manual_seed(args.seed)
    for name, temp in (("sampled", 1.0), ("greedy", 0.0)) if isinstance(source, data.World) else ():  # on the held-out prompts
        with autocast:
            texts = rollout(model, tok, [tok.chat(q) for q in source.prompts("eval")[rank::world_size]], None, args.max_new_tokens, temp)[3]
        print0(f"sft: well-formed {name} responses on held-out prompts: "
               f"{all_mean(sum(t is not None and world.parse(t) is not None for t in texts) / len(texts)).item():.3f}")
    return ck


# ---------------------------------------------------------------------------------------------- reward models
def stage_rm(resume, sft):
    tok, heads = data.tokenizer(sft["tokenizer"]), source.objectives  # one head per labelled objective
    pairs = encoded(data.pair_tensors, tok, "train", heads)
    torch.manual_seed(args.seed + 1 + rank)
    model = build.load_gpt(sft, device, n_heads_out=len(heads))
    opt = model.configure_optimizers(args.weight_decay, args.rm_lr, (0.9, 0.95), device_type)

    def batch_loss(train_model):
        return reward_model_loss(train_model, pair_batch(pairs, torch.randint(len(pairs[3]), (args.rm_batch_size,)), device))

    ck = supervised("rm", model, opt, args.rm_iters, args.rm_lr, batch_loss, resume, dict(model_args=sft["model_args"], objectives=heads))
    eval_pairs = encoded(data.pair_tensors, tok, "eval", heads)  # held-out pair accuracy (the world's: against noiseless judges)
    with autocast:
        correct, count = pair_accuracy(model, eval_pairs, torch.arange(len(eval_pairs[3]))[rank::world_size], device)
    acc = (all_mean(correct) / all_mean(count)).tolist()
    print0("rm: held-out pair accuracy " + ", ".join(f"{o} {a:.3f}" for o, a in zip(heads, acc)))
    # standardisation statistics of every head on the SFT policy's samples (train prompts)
    torch.manual_seed(args.seed + rank)
    ps = source.prompts("train")
    with autocast:
        s = finished_scores(model, build.load_gpt(sft, device).eval(), tok, [tok.chat(ps[i]) for i in torch.randint(
            len(ps), (args.n_stat_samples // world_size,)).tolist()], args.max_new_tokens)
    if ddp:  # ranks may hold different numbers of finished samples
        dist.all_gather_object(gathered := [None] * world_size, s.cpu())
        s = torch.cat(gathered).to(device)
    if len(s) < 2:
        fail(f"rm: {len(s)} of the SFT model's samples ended within --max_new_tokens {args.max_new_tokens}; raise it")
    ck.update(accuracy=acc, stats={"mean": s.mean(0), "std": s.std(0).clamp_min(1e-3), "max": s.max(0).values, "min": s.min(0).values})
    save_ckpt("rm", ck)
    return ck


# ---------------------------------------------------------------------------------------------- panacea and baselines
def stage_panacea(resume, sft, rm):
    tok, objectives = data.tokenizer(sft["tokenizer"]), config["objectives"]
    m = len(objectives)
    reward_model, stats = build.load_reward_model(rm, sft, objectives, device)
    pairs = encoded(data.pair_tensors, tok, "train", objectives) if args.algo == "dpo" else None
    prompts, fixed = source.prompts("train"), fixed_prefs(args.method, m, args.dps_points)
    state = resume or dict(adapters=[], run=0, iter_num=0, update_steps=0, seconds=0.0)
    for j in range(state["run"], len(fixed)):
        # every model is an independent run from the same seed: a baseline's model at lambda is
        # exactly what plain LS training at that lambda gives (DDP then broadcasts rank 0's init)
        torch.manual_seed(args.seed + 2 + rank)
        conditioned = fixed[j] is None
        policy = build.adapted_policy(sft, m, conditioned, args.lora_rank, args.lora_alpha, device)
        critic = build.critic_model(sft, rm, m, conditioned, args.lora_rank, args.lora_alpha, device) if args.algo == "ppo" else None
        nets = {"policy": policy, **({"critic": critic} if critic else {})}
        opt = torch.optim.AdamW([q for net in nets.values() for q in net.parameters() if q.requires_grad], lr=args.rl_lr, weight_decay=0.0)
        if state["iter_num"] == 0:
            state["ideal"] = (stats["max"] - stats["mean"]) / stats["std"]  # Tche ideal point z, then a running max of scores
        train_policy, train_critic = wrap(policy), critic and wrap(critic)

        def step(it):
            # Panacea: one lambda per group of pref_group sequences (PPO) or pairs (DPO); a baseline: its fixed lambda
            prefs = (sample_prefs(args.rollout_batch // args.pref_group, m, args.vertex_prob).repeat_interleave(args.pref_group, 0)
                     if conditioned else torch.tensor(fixed[j]).expand(args.rollout_batch, m)).to(device)
            state["update_steps"] += args.epochs * math.ceil(args.rollout_batch / args.minibatch_size)
            if args.algo == "dpo":
                with autocast:
                    s = dpo_iteration(train_policy, opt, pair_batch(pairs, torch.randint(len(pairs[3]), (args.rollout_batch,)), device),
                                      prefs, config)
                return f"loss {s['loss']:.4f} margin {s['margin']:.3f} dpo " + " ".join(f"{x:.3f}" for x in s["dpo"])
            batch = [prompts[i] for i in torch.randint(len(prompts), (args.rollout_batch,)).tolist()]
            with autocast:
                s, b = ppo_iteration(train_policy, train_critic, reward_model, opt, tok, [tok.chat(q) for q in batch], prefs, config,
                                     stats, state["ideal"])
            state["ideal"] = torch.maximum(state["ideal"], all_mean(op="max", x=s["max_score"]))
            msg = (f"kl {s['kl']:.3f} pg {s['pg_loss']:.4f} vf {s['vf_loss']:.4f} clip {s['clipfrac']:.3f} rm " +
                   " ".join(f"{x:+.2f}" for x in all_mean(s["rm"]).tolist()))
            if source.judge is not None:
                msg += " judge " + " ".join(f"{x:.3f}" for x in all_mean(source.judge(batch, b["texts"], objectives).mean(0)).tolist())
            return msg

        label = "panacea" if conditioned else f"{args.method} model {j + 1}/{len(fixed)} lambda={fixed[j]}"
        lr = (lambda it: cosine_lr(it, args.rl_iters, args.rl_lr, 0)) if args.rl_schedule == "cosine" else None
        train("panacea", nets, opt, args.rl_iters, step, state, label, args.log_interval, lr)
        state = dict({k: v for k, v in state.items() if k not in ("policy", "critic", "optimizer", "rng", "ideal")},
                     adapters=state["adapters"] + [lora_state_dict(policy)], run=j + 1, iter_num=0)
        if j + 1 < len(fixed):
            save_ckpt("panacea", dict(state, finished=False))
    base = {k: sft[k] for k in ("model", "model_args", "tokenizer")}  # self-contained for sample.py
    ck = dict(state, method=args.method, objectives=objectives, fixed_prefs=fixed, lora_rank=args.lora_rank,
              lora_alpha=args.lora_alpha, base=base, world=isinstance(source, data.World),
              held_out=source.prompts("eval")[: args.eval_prompts], finished=True)
    save_ckpt("panacea", ck)
    return ck


# ---------------------------------------------------------------------------------------------- main
source = open_source()
default = ["helpful", "harmless"] if isinstance(source, data.World) else source.objectives
objs = config["objectives"] = args.objectives.split(",") if args.objectives else default
if len(objs) < 2 or len(set(objs)) != len(objs) or any(o not in source.objectives for o in objs):
    fail(f"--objectives takes 2 or more distinct names of {', '.join(source.objectives)} ({source.describe}); got {','.join(objs)}")
TOKENIZER = {"gguf": args.init_from} if args.init_from else {"gpt2_ids": "all" if args.data_dir else world.Tokenizer().gpt2_ids}
try:  # a pretrained model's file and packages are checked before any work
    data.tokenizer(TOKENIZER)
except (ImportError, ValueError) as e:
    fail(e)


def main():
    config["data"] = source.digest()
    ck = {}

    def done(stage):  # the stage's finished result: from this run, or from its checkpoint
        ck[stage] = ck.get(stage) or load_ckpt(stage, required=True)
        if not ck[stage]["finished"]:
            fail(f"{ckpt_path(stage)} is unfinished: run --stage {stage} to complete it")
        return ck[stage]

    run = {"sft": stage_sft, "rm": lambda prev: stage_rm(prev, done("sft")), "panacea": lambda prev: stage_panacea(prev, done("sft"), done("rm"))}
    for stage in [s for s in run if s in stages]:
        prev, t0 = load_ckpt(stage), time.time()
        if prev is not None and prev["finished"]:
            print0(f"{stage}: reusing the finished checkpoint {ckpt_path(stage)}")
        ck[stage] = prev if prev is not None and prev["finished"] else run[stage](prev)
        print0(f"{stage}: done in {time.time() - t0:.0f} s")
    if "eval" in stages:
        with torch.no_grad():
            front = evaluate.evaluate(done("sft"), done("rm"), done("panacea"), config, device, source, rank, world_size, autocast)
        if master:
            evaluate.write_front(front, args.out_dir, f"{args.method} {args.algo} {args.agg}")
            evaluate.print_front(front)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
