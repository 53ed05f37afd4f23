"""
Trains Panacea on the embedded world, stage by stage (--stage all = sft,rm,panacea,eval):
    sft      a GPT on the world's SFT corpus, loss on response tokens      -> BASE_DIR/sft/ckpt.pt
    rm       SFT trunk + one scalar head per objective, Bradley-Terry loss -> BASE_DIR/rm/ckpt.pt
    panacea  SFT model + SVD-LoRA conditioned on lambda, by PPO or DPO     -> OUT_DIR/panacea/ckpt.pt
             (--method rs|dps trains the paper's baselines with the same algorithm and budget)
    eval     the Pareto front on held-out prompts over a lambda grid       -> OUT_DIR/front.json, pareto.png
BASE_DIR defaults to OUT_DIR; pointing several runs at one --base_dir shares their SFT and reward models.
A finished stage whose checkpoint matches the config is reused; an unfinished one resumes.

    python train.py                                           # the whole default pipeline
    torchrun --standalone --nproc_per_node=2 train.py         # the same with DDP (gloo on CPU, NCCL on GPU)
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import evaluate
import world
from model import GPT, GPTConfig
from panacea import pref_grid, sample_prefs
from rlhf import (dpo_iteration, encode_pairs, encode_samples, last_token_values, optimizer_step, pair_accuracy, pair_batch,
                  ppo_iteration, response_mask, reward_model_loss, rollout)
from svd_lora import lora_state_dict

# ---------------------------------------------------------------------------------------------- config
# Flags come in groups: a stage's checkpoint records every flag of its own group and of the groups
# of the stages it builds on (STAGE_KEYS below), so a changed flag never reuses a stale result.
p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.error = lambda msg: p.exit(2, f"error: {msg} (see --help)\n")  # one line, no usage dump
run = p.add_argument_group("run")
run.add_argument("--out_dir", default="out")
run.add_argument("--base_dir", default=None, help="where the sft and rm stages live (default: out_dir)")
run.add_argument("--data_dir", default=None, help="your own sft.jsonl, pairs.jsonl, pairs_eval.jsonl (default: the world's, in base_dir/data)")
run.add_argument("--stage", default="all", help="all, or a comma list of sft,rm,panacea,eval")
run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
run.add_argument("--dtype", default="auto", help="auto (bfloat16 autocast on cuda), float32, bfloat16")
run.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
run.add_argument("--log_interval", type=int, default=10)
run.add_argument("--eval_interval", type=int, default=250, help="SFT / reward-model iterations between loss lines")
run.add_argument("--ckpt_interval", type=int, default=20, help="iterations between checkpoints (every stage)")
sft_group = p.add_argument_group("sft")  # the GPT and its training; every later stage inherits them
sft_group.add_argument("--seed", type=int, default=1337)
sft_group.add_argument("--n_layer", type=int, default=4)
sft_group.add_argument("--n_head", type=int, default=4)
sft_group.add_argument("--n_embd", type=int, default=128)
sft_group.add_argument("--block_size", type=int, default=96)
sft_group.add_argument("--dropout", type=float, default=0.0)
sft_group.add_argument("--sft_iters", type=int, default=500)
sft_group.add_argument("--batch_size", type=int, default=32)
sft_group.add_argument("--learning_rate", type=float, default=2e-3)
sft_group.add_argument("--warmup_iters", type=int, default=50)
sft_group.add_argument("--weight_decay", type=float, default=0.1)
sft_group.add_argument("--grad_clip", type=float, default=1.0)
sft_group.add_argument("--n_sft", type=int, default=20000, help="SFT corpus size")
rm_group = p.add_argument_group("rm")
rm_group.add_argument("--rm_iters", type=int, default=600)
rm_group.add_argument("--rm_batch_size", type=int, default=16, help="pairs per step")
rm_group.add_argument("--rm_lr", type=float, default=5e-4)
rm_group.add_argument("--n_pairs", type=int, default=20000)
rm_group.add_argument("--label_temperature", type=float, default=0.1, help="Bradley-Terry noise of the world's labels")
rm_group.add_argument("--n_stat_samples", type=int, default=512, help="SFT samples for the score standardisation")
rm_group.add_argument("--max_new_tokens", type=int, default=60, help="response length cap (statistics, rollouts, evaluation)")
rl_group = p.add_argument_group("panacea")  # Panacea and the baselines, PPO or DPO
rl_group.add_argument("--objectives", default="helpful,harmless", help=f"2 or more of {','.join(world.OBJECTIVES)}")
rl_group.add_argument("--method", default="panacea", choices=["panacea", "rs", "dps"])
rl_group.add_argument("--algo", default="ppo", choices=["ppo", "dpo"])
rl_group.add_argument("--agg", default="ls", choices=["ls", "tche"])
rl_group.add_argument("--tche_mu", type=float, default=0.0, help="> 0: smooth Tchebycheff with this temperature")
rl_group.add_argument("--rl_iters", type=int, default=40)
rl_group.add_argument("--lora_rank", type=int, default=8, help="k, the preference-agnostic singular values")
rl_group.add_argument("--lora_alpha", type=float, default=16.0)
rl_group.add_argument("--rl_lr", type=float, default=2e-3)
rl_group.add_argument("--rl_schedule", default="constant", choices=["constant", "cosine"], help="adapter lr: constant, or cosine decay to rl_lr / 10")
rl_group.add_argument("--vertex_prob", type=float, default=0.3, help="share of lambda draws on a simplex vertex")
rl_group.add_argument("--rollout_batch", type=int, default=64, help="prompts per iteration per process (DPO: pairs)")
rl_group.add_argument("--pref_group", type=int, default=8, help="sequences (DPO: pairs) that share one lambda draw")
rl_group.add_argument("--minibatch_size", type=int, default=32)
rl_group.add_argument("--epochs", type=int, default=2, help="passes over each iteration's batch (PPO and DPO)")
ppo_group = p.add_argument_group("ppo")
ppo_group.add_argument("--kl_coef", type=float, default=0.05)
ppo_group.add_argument("--clip", type=float, default=0.2)
ppo_group.add_argument("--clip_value", type=float, default=0.2)
ppo_group.add_argument("--vf_coef", type=float, default=0.5)
ppo_group.add_argument("--gae_lambda", type=float, default=0.95)
ppo_group.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
dpo_group = p.add_argument_group("dpo")
dpo_group.add_argument("--dpo_beta", type=float, default=0.5)
dps_group = p.add_argument_group("dps")
dps_group.add_argument("--dps_points", type=int, default=5, help="DPS grid size (m >= 3: the smallest simplex lattice that large)")
eval_group = p.add_argument_group("eval")
eval_group.add_argument("--eval_divisions", type=int, default=None, help="lambda grid step 1/d (default: 10 for m = 2, 4 for m >= 3)")
eval_group.add_argument("--eval_temperature", type=float, default=0.0, help="0 = greedy")
args = p.parse_args()
config = vars(args)
config["objectives"] = args.objectives.split(",")
stages = ["sft", "rm", "panacea", "eval"] if args.stage == "all" else args.stage.split(",")


def fail(msg):
    """User errors end in one line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


try:
    world.check_objectives(config["objectives"])
except ValueError as e:
    fail(e)
if any(s not in ("sft", "rm", "panacea", "eval") for s in stages):
    fail(f"--stage takes all or a comma list of sft,rm,panacea,eval; got {args.stage}")
if args.rollout_batch % args.pref_group:
    fail(f"--rollout_batch ({args.rollout_batch}) must be a multiple of --pref_group ({args.pref_group})")
base_dir = args.base_dir or args.out_dir
m = len(config["objectives"])

# ---------------------------------------------------------------------------------------------- DDP
ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
if ddp:
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
else:
    device = ("cuda" if use_cuda else "cpu") if args.device == "auto" else args.device
if not use_cuda and "OMP_NUM_THREADS" not in os.environ:  # share the cores among the processes of a machine
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
master = rank == 0
device_type = "cuda" if use_cuda else "cpu"
dtype = ("bfloat16" if use_cuda else "float32") if args.dtype == "auto" else args.dtype
autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
if use_cuda:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def print0(*a):
    if master:
        tqdm.write(" ".join(str(x) for x in a))


def progress(total, start, desc):
    return tqdm(range(start, total), initial=start, total=total, desc=desc, disable=not master or not sys.stderr.isatty(), leave=False)


def all_mean(x):
    """Mean of a float or tensor over processes."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device).clone()
    if ddp:
        dist.all_reduce(t)
        t /= world_size
    return t


# ---------------------------------------------------------------------------------------------- checkpoints
# A stage's checkpoint records the config keys its result depends on; reuse requires them to match.
def group_keys(group):
    return [a.dest for a in group._group_actions]


STAGE_KEYS = {"sft": group_keys(sft_group) + ["sft_data"]}
STAGE_KEYS["rm"] = STAGE_KEYS["sft"] + group_keys(rm_group) + ["pairs_data"]
STAGE_KEYS["panacea"] = (STAGE_KEYS["rm"] + group_keys(rl_group) + group_keys(ppo_group if args.algo == "ppo" else dpo_group)
                         + (group_keys(dps_group) if args.method == "dps" else []))


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


def all_max(t):
    t = t.clone()
    if ddp:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def rng_states():
    states = [None] * world_size
    s = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if use_cuda else {})}
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
        ref = flat.clone()
        dist.broadcast(ref, 0)
        if all_max(torch.tensor(float(not torch.equal(flat, ref)), device=device)).item():
            fail(f"ddp: {stage} parameters differ between ranks")
        print0(f"ddp: {stage} parameters identical on {world_size} ranks")


@contextlib.contextmanager
def finite_steps(stage, it):
    """optimizer_step raises before a non-finite step: the weights and the last checkpoint are still good."""
    try:
        yield
    except FloatingPointError:
        fail(f"{stage}: loss or gradient is not finite at iteration {it}; the last good checkpoint is {ckpt_path(stage)} "
             f"(try a lower learning rate)")


def cosine_lr(it, total, lr, warmup):
    """Linear warm-up, then cosine decay to lr / 10."""
    if it < warmup:
        return lr * (it + 1) / warmup
    return lr / 10 + 0.45 * lr * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


def wrap(model):
    """DDP around a training model; buffers (lambda differs per process) are not broadcast."""
    model = torch.compile(model) if args.compile else model
    return DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False) if ddp else model


def data_path(name):
    """sft, pairs or pairs_eval as JSONL: from --data_dir as they are (your own data), or else
    generated from the world once (by rank 0), named by what generated them."""
    if args.data_dir:
        return os.path.join(args.data_dir, name + ".jsonl")
    n_eval = max(200, args.n_pairs // 10)
    tag = {"sft": f"n{args.n_sft}", "pairs": f"n{args.n_pairs}-T{args.label_temperature}", "pairs_eval": f"n{n_eval}"}[name]
    path = os.path.join(base_dir, "data", f"{name}-{tag}-seed{args.seed}.jsonl")
    if master and not os.path.exists(path):
        if name == "sft":
            world.write_jsonl(path, world.sft_corpus(args.n_sft, args.seed))
        else:
            split, temp, n = ("train", args.label_temperature, args.n_pairs) if name == "pairs" else ("eval", 0.0, n_eval)
            world.write_jsonl(path, world.preference_pairs(n, split, temp, seed=args.seed))
    if ddp:
        dist.barrier()
    return path


def data(name, tok, objectives=None):
    """A data set, tokenised: SFT (tokens, prompt_len, seq_len) or pairs (+ winners per objective)."""
    path = data_path(name)
    try:
        if name == "sft":
            recs = world.read_jsonl(path, ["prompt", "response"])
            return encode_samples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs])
        recs = world.read_jsonl(path, ["prompt", "response_0", "response_1"])
        objectives = objectives or [o for o in world.OBJECTIVES if f"{o}_winner" in recs[0]]  # the labelled ones
        return objectives, encode_pairs(tok, recs, objectives)
    except ValueError as e:
        fail(f"{path}: {e}")


def digest(name):
    """The data a stage learns from belongs to its config: other data, another model."""
    with open(data_path(name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def train(stage, model, opt, iters, lr, batch_loss, resume, keep):
    """The SFT and reward-model loop: warm-up + cosine schedule, clipped steps, a log line per
    eval_interval, atomic checkpoints, resume. batch_loss(train_model) draws a batch and returns
    its loss; `keep` is what the checkpoint holds besides the weights."""
    start = 0
    if resume:
        model.load_state_dict(resume["model"]), opt.load_state_dict(resume["optimizer"]), set_rng(resume["rng"])
        start = resume["iter_num"]
        print0(f"{stage}: resuming from iteration {start}")
    train_model = wrap(model)
    model.train()
    for it in progress(iters, start, stage):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, iters, lr, args.warmup_iters)
        with finite_steps(stage, it):
            with autocast:
                loss = batch_loss(train_model)
            optimizer_step(opt, loss, args.grad_clip)
        if (it + 1) % args.eval_interval == 0 or it + 1 == iters:
            print0(f"{stage} iter {it + 1}: loss {all_mean(loss.item()).item():.4f}, lr {opt.param_groups[0]['lr']:.2e}")
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < iters:
            save_ckpt(stage, dict(keep, model=model.state_dict(), optimizer=opt.state_dict(), iter_num=it + 1,
                                  rng=rng_states(), finished=False))
    check_ddp_sync(stage, model)
    model.eval()
    return dict(keep, model=model.state_dict(), iter_num=iters, finished=True)


# ---------------------------------------------------------------------------------------------- sft
def stage_sft(resume):
    tok = world.Tokenizer()
    tokens, plen, slen = data("sft", tok)
    if tokens.size(1) > args.block_size:
        fail(f"SFT samples have {tokens.size(1)} tokens but --block_size is {args.block_size}")
    targets = torch.where(response_mask(plen, slen, tokens.size(1)).bool(), tokens[:, 1:], -1)  # loss on the response only
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      dropout=args.dropout, vocab_size=tok.vocab_size)
    torch.manual_seed(args.seed + rank)
    model = GPT(GPTConfig(**model_args)).to(device)
    opt = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95), device_type)
    print0(f"sft: {model.num_params() / 1e6:.2f}M parameters, {len(tokens)} samples, vocabulary {tok.vocab_size}")

    def batch_loss(train_model):
        ix = torch.randint(len(tokens), (args.batch_size,))
        T = int(slen[ix].max())
        return train_model(tokens[ix, : T - 1].to(device), targets[ix, : T - 1].to(device))[1]

    ck = train("sft", model, opt, args.sft_iters, args.learning_rate, batch_loss, resume, dict(model_args=model_args, vocab=tok.gpt2_ids))
    save_ckpt("sft", ck)
    torch.manual_seed(args.seed)  # well-formedness of sampled and greedy responses on the held-out prompts
    ps = world.prompts("eval", args.seed)[rank::world_size]
    for name, temp, reps in (("sampled", 1.0, 4), ("greedy", 0.0, 1)):
        texts = rollout(model, tok, [p for _, p in ps] * reps, None, args.max_new_tokens, temp)[3]
        ok = all_mean(sum(t is not None and world.parse(t) is not None for t in texts) / len(texts)).item()
        print0(f"sft: well-formed {name} responses on held-out prompts: {ok:.3f}")
    return ck


# ---------------------------------------------------------------------------------------------- reward models
def stage_rm(resume, sft):
    tok = world.Tokenizer(sft["vocab"])
    heads, pairs = data("pairs", tok)  # one head per labelled objective
    torch.manual_seed(args.seed + 1 + rank)
    model = evaluate.load_gpt(sft, device, n_heads_out=len(heads))
    opt = model.configure_optimizers(args.weight_decay, args.rm_lr, (0.9, 0.95), device_type)

    def batch_loss(train_model):
        return reward_model_loss(train_model, pair_batch(pairs, torch.randint(len(pairs[3]), (args.rm_batch_size,)), device))

    ck = train("rm", model, opt, args.rm_iters, args.rm_lr, batch_loss, resume, dict(model_args=sft["model_args"], objectives=heads))
    # held-out pair accuracy against the noiseless judges (held-out prompts)
    _, eval_pairs = data("pairs_eval", tok, heads)
    correct, count = pair_accuracy(model, eval_pairs, torch.arange(len(eval_pairs[3]))[rank::world_size], device)
    acc = (all_mean(correct) / all_mean(count)).tolist()
    print0("rm: held-out pair accuracy " + ", ".join(f"{o} {a:.3f}" for o, a in zip(heads, acc)))
    # standardisation statistics of every head on the SFT policy's samples (train prompts)
    torch.manual_seed(args.seed + rank)
    ps = world.prompts("train", args.seed)
    pick = torch.randint(len(ps), (args.n_stat_samples // world_size,)).tolist()
    toks, _, sl, texts = rollout(evaluate.load_gpt(sft, device).eval(), tok, [ps[i][1] for i in pick], None, args.max_new_tokens, 1.0)
    with torch.no_grad():  # finished samples only: the reward model scores a response at its <|endoftext|>
        s = last_token_values(model, toks, sl).float()[[t is not None for t in texts]]
    if ddp:  # ranks may hold different numbers of finished samples
        gathered = [None] * world_size
        dist.all_gather_object(gathered, s.cpu())
        s = torch.cat(gathered).to(device)
    ck.update(stats={"mean": s.mean(0), "std": s.std(0).clamp_min(1e-3), "max": s.max(0).values, "min": s.min(0).values},
              accuracy=acc)
    save_ckpt("rm", ck)
    return ck


# ---------------------------------------------------------------------------------------------- panacea and baselines
def run_prefs():
    """The fixed lambda of each model a method trains: Panacea one conditioned model (None), RS one
    per objective (one-hot), DPS one per point of a grid."""
    if args.method == "panacea":
        return [None]
    if args.method == "rs":
        return torch.eye(m).tolist()
    d = args.dps_points - 1 if m == 2 else next(d for d in range(1, 100) if len(pref_grid(m, d)) >= args.dps_points)
    return pref_grid(m, d)


def stage_panacea(resume, sft, rm):
    tok = world.Tokenizer(sft["vocab"])
    missing = [o for o in config["objectives"] if o not in rm["objectives"]]
    if missing:
        fail(f"the reward model has no head for {', '.join(missing)} (it has {', '.join(rm['objectives'])})")
    reward_model, stats = evaluate.load_reward_model(rm, sft, config["objectives"], device)
    pairs = data("pairs", tok, config["objectives"])[1] if args.algo == "dpo" else None
    prompts, fixed = world.prompts("train", args.seed), run_prefs()
    state = resume or dict(adapters=[], run=0, iter_num=0, update_steps=0, seconds=0.0)
    if resume:
        print0(f"panacea: resuming model {state['run'] + 1}/{len(fixed)} at iteration {state['iter_num']}")
    for j in range(state["run"], len(fixed)):
        # every model is an independent run from the same seed: a baseline's model at lambda is
        # exactly what plain LS training at that lambda gives (DDP then broadcasts rank 0's init)
        torch.manual_seed(args.seed + 2 + rank)
        conditioned = fixed[j] is None
        policy = evaluate.adapted_policy(sft, m, conditioned, args.lora_rank, args.lora_alpha, device)
        critic = evaluate.critic_model(sft, rm, m, conditioned, args.lora_rank, args.lora_alpha, device) if args.algo == "ppo" else None
        params = [q for net in (policy, critic) if net is not None for q in net.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.rl_lr, weight_decay=0.0)
        ideal = (stats["max"] - stats["mean"]) / stats["std"]  # Tche ideal point z, then a running max of scores
        if state["iter_num"] > 0:  # resuming inside this model's run
            policy.load_state_dict(state["policy"]), opt.load_state_dict(state["optimizer"]), set_rng(state["rng"])
            critic is not None and critic.load_state_dict(state["critic"])
            ideal = state["ideal"].to(device)
        train_policy, train_critic = wrap(policy), critic and wrap(critic)
        label = "panacea" if conditioned else f"{args.method} model {j + 1}/{len(fixed)} lambda={fixed[j]}"
        t0 = time.time()
        for it in progress(args.rl_iters, state["iter_num"], label):
            if args.rl_schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(it, args.rl_iters, args.rl_lr, 0)
            if conditioned:  # one lambda per group of pref_group sequences (PPO) or pairs (DPO)
                prefs = sample_prefs(args.rollout_batch // args.pref_group, m, args.vertex_prob)
                prefs = prefs.repeat_interleave(args.pref_group, 0).to(device)
            else:
                prefs = torch.tensor(fixed[j], device=device).expand(args.rollout_batch, m)
            if args.algo == "ppo":
                batch = [prompts[i] for i in torch.randint(len(prompts), (args.rollout_batch,)).tolist()]
                with autocast, finite_steps("panacea", it):
                    s, texts = ppo_iteration(train_policy, train_critic, reward_model, opt, tok, [q for _, q in batch], prefs, config,
                                             stats, ideal)
                ideal = torch.maximum(ideal, all_max(s.pop("max_score")))
                s["judge"] = evaluate.judge_scores([t for t, _ in batch], texts, config["objectives"]).mean(0)
                msg = (f"kl {s['kl']:.3f} pg {s['pg_loss']:.4f} vf {s['vf_loss']:.4f} clip {s['clipfrac']:.3f} rm " +
                       " ".join(f"{x:+.2f}" for x in all_mean(s["rm"]).tolist()) + " judge " +
                       " ".join(f"{x:.3f}" for x in all_mean(s["judge"]).tolist()))
            else:
                batch = pair_batch(pairs, torch.randint(len(pairs[3]), (args.rollout_batch,)), device)
                with autocast, finite_steps("panacea", it):
                    s = dpo_iteration(train_policy, opt, batch, prefs, config)
                msg = f"loss {s['loss']:.4f} margin {s['margin']:.3f} dpo " + " ".join(f"{x:.3f}" for x in s["dpo"])
            state["update_steps"] += args.epochs * math.ceil(args.rollout_batch / args.minibatch_size)
            if (it + 1) % args.log_interval == 0 or it == 0:
                print0(f"{label} iter {it + 1}: {msg}")
            state["iter_num"] = it + 1
            if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rl_iters:
                state["seconds"] += time.time() - t0
                t0 = time.time()
                save_ckpt("panacea", dict(state, policy=policy.state_dict(), critic=critic.state_dict() if critic else None,
                                          optimizer=opt.state_dict(), rng=rng_states(), ideal=ideal, finished=False))
        state["seconds"] += time.time() - t0
        check_ddp_sync("panacea", policy)
        for k in ("policy", "critic", "optimizer", "rng", "ideal"):
            state.pop(k, None)
        state["adapters"].append(lora_state_dict(policy))
        state.update(run=j + 1, iter_num=0)
        if j + 1 < len(fixed):
            save_ckpt("panacea", dict(state, finished=False))
    base = {k: sft[k] for k in ("model", "model_args", "vocab")}  # self-contained for sample.py
    ck = dict(state, method=args.method, objectives=config["objectives"], fixed_prefs=fixed, lora_rank=args.lora_rank,
              lora_alpha=args.lora_alpha, base=base, finished=True)
    save_ckpt("panacea", ck)
    return ck


# ---------------------------------------------------------------------------------------------- main
def main():
    config["sft_data"], config["pairs_data"] = digest("sft"), digest("pairs")
    ck = {}
    for stage in ["sft", "rm", "panacea"]:
        if stage not in stages:
            continue
        prev = load_ckpt(stage)
        if prev is not None and prev["finished"]:
            print0(f"{stage}: reusing the finished checkpoint {ckpt_path(stage)}")
            ck[stage] = prev
            continue
        t0 = time.time()
        if stage == "sft":
            ck[stage] = stage_sft(prev)
        elif stage == "rm":
            ck[stage] = stage_rm(prev, ck.get("sft") or load_ckpt("sft", required=True))
        else:
            ck[stage] = stage_panacea(prev, ck.get("sft") or load_ckpt("sft", required=True), ck.get("rm") or load_ckpt("rm", required=True))
        print0(f"{stage}: done in {time.time() - t0:.0f} s")
    if "eval" in stages:
        sft = ck.get("sft") or load_ckpt("sft", required=True)
        rm = ck.get("rm") or load_ckpt("rm", required=True)
        pol = ck.get("panacea") or load_ckpt("panacea", required=True)
        if not pol["finished"]:
            fail(f"{ckpt_path('panacea')} is unfinished: run --stage panacea to complete it")
        front = evaluate.evaluate(sft, rm, pol, config, device, rank, world_size, autocast)
        if master:
            evaluate.write_front(front, args.out_dir, f"{args.method} {args.algo} {args.agg}")
            evaluate.print_front(front)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
