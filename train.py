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
from rlhf import bradley_terry_loss, dpo_iteration, encode_samples, last_token_values, ppo_iteration, response_mask, rollout
from svd_lora import inject_svd_lora, lora_state_dict

# ---------------------------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--out_dir", default="out")
p.add_argument("--base_dir", default=None, help="where the sft and rm stages live (default: out_dir)")
p.add_argument("--data_dir", default=None, help="JSONL data; written from the world if missing (default: base_dir/data)")
p.add_argument("--stage", default="all", help="all, or a comma list of sft,rm,panacea,eval")
p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
p.add_argument("--dtype", default="auto", help="auto (bfloat16 autocast on cuda), float32, bfloat16")
p.add_argument("--compile", action="store_true", help="torch.compile the training forward passes")
p.add_argument("--seed", type=int, default=1337)
p.add_argument("--objectives", default="helpful,harmless", help=f"2 or more of {','.join(world.OBJECTIVES)}")
p.add_argument("--method", default="panacea", choices=["panacea", "rs", "dps"])
p.add_argument("--algo", default="ppo", choices=["ppo", "dpo"])
p.add_argument("--agg", default="ls", choices=["ls", "tche"])
p.add_argument("--tche_mu", type=float, default=0.0, help="> 0: smooth Tchebycheff with this temperature")
# model (the sft stage's GPT; everything else inherits it)
p.add_argument("--n_layer", type=int, default=4)
p.add_argument("--n_head", type=int, default=4)
p.add_argument("--n_embd", type=int, default=128)
p.add_argument("--block_size", type=int, default=96)
p.add_argument("--dropout", type=float, default=0.0)
# sft
p.add_argument("--sft_iters", type=int, default=1000)
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--learning_rate", type=float, default=2e-3)
p.add_argument("--min_lr", type=float, default=1e-4)
p.add_argument("--warmup_iters", type=int, default=50)
p.add_argument("--weight_decay", type=float, default=0.1)
p.add_argument("--grad_clip", type=float, default=1.0)
p.add_argument("--n_sft", type=int, default=20000, help="SFT corpus size")
# reward models
p.add_argument("--rm_iters", type=int, default=500)
p.add_argument("--rm_batch_size", type=int, default=32, help="pairs per step")
p.add_argument("--rm_lr", type=float, default=5e-4)
p.add_argument("--n_pairs", type=int, default=20000)
p.add_argument("--label_temperature", type=float, default=0.1, help="Bradley-Terry noise of the world's labels")
p.add_argument("--n_stat_samples", type=int, default=512, help="SFT samples for the score standardisation")
# panacea / baselines
p.add_argument("--rl_iters", type=int, default=60)
p.add_argument("--lora_rank", type=int, default=8, help="k, the preference-agnostic singular values")
p.add_argument("--lora_alpha", type=float, default=16.0)
p.add_argument("--rl_lr", type=float, default=2e-3)
p.add_argument("--vertex_prob", type=float, default=0.3, help="share of lambda draws on a simplex vertex")
p.add_argument("--rollout_batch", type=int, default=64, help="prompts per iteration per process (DPO: pairs)")
p.add_argument("--minibatch_size", type=int, default=32)
p.add_argument("--ppo_epochs", type=int, default=2)
p.add_argument("--kl_coef", type=float, default=0.1)
p.add_argument("--clip", type=float, default=0.2)
p.add_argument("--clip_value", type=float, default=0.2)
p.add_argument("--vf_coef", type=float, default=0.5)
p.add_argument("--gae_lambda", type=float, default=0.95)
p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
p.add_argument("--max_new_tokens", type=int, default=60)
p.add_argument("--dpo_beta", type=float, default=0.1)
p.add_argument("--dps_points", type=int, default=5, help="DPS grid size (m >= 3: the smallest simplex lattice that large)")
# evaluation, logging, checkpoints
p.add_argument("--eval_divisions", type=int, default=None, help="lambda grid step 1/d (default: 10 for m = 2, 4 for m >= 3)")
p.add_argument("--eval_temperature", type=float, default=0.0, help="0 = greedy")
p.add_argument("--eval_interval", type=int, default=250)
p.add_argument("--log_interval", type=int, default=10)
p.add_argument("--ckpt_interval", type=int, default=100)
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
base_dir = args.base_dir or args.out_dir
data_dir = args.data_dir or os.path.join(base_dir, "data")
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
if not use_cuda:
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
STAGE_KEYS = {"sft": ["seed", "n_layer", "n_head", "n_embd", "block_size", "dropout", "sft_iters", "batch_size",
                      "learning_rate", "min_lr", "warmup_iters", "weight_decay", "n_sft"]}
STAGE_KEYS["rm"] = STAGE_KEYS["sft"] + ["rm_iters", "rm_batch_size", "rm_lr", "n_pairs", "label_temperature", "n_stat_samples"]
STAGE_KEYS["panacea"] = STAGE_KEYS["rm"] + ["objectives", "method", "algo", "agg", "tche_mu", "rl_iters", "lora_rank",
                                            "lora_alpha", "rl_lr", "vertex_prob", "rollout_batch", "minibatch_size", "ppo_epochs",
                                            "kl_coef", "clip", "clip_value", "vf_coef", "gae_lambda", "temperature",
                                            "max_new_tokens", "dpo_beta", "dps_points"]


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


def check_finite(x, stage, it):
    if not math.isfinite(x):
        fail(f"{stage}: loss or gradient is not finite at iteration {it}; the last good checkpoint is {ckpt_path(stage)} "
             f"(try a lower learning rate)")


def cosine_lr(it, total, lr, min_lr, warmup):
    if it < warmup:
        return lr * (it + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, total - warmup))))


def wrap(model):
    """DDP around a training model; buffers (lambda differs per process) are not broadcast."""
    model = torch.compile(model) if args.compile else model
    return DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False) if ddp else model


def data(name):
    """The world's data sets as JSONL in data_dir (written once by rank 0, deterministic in the seed)."""
    path = os.path.join(data_dir, name + ".jsonl")
    if master and not os.path.exists(path):
        if name == "sft":
            world.write_jsonl(path, world.sft_corpus(args.n_sft, args.seed))
        else:
            split, temp = ("train", args.label_temperature) if name == "pairs" else ("eval", 0.0)
            world.write_jsonl(path, world.preference_pairs(args.n_pairs if split == "train" else 2000, split, temp, seed=args.seed))
    if ddp:
        dist.barrier()
    keys = ["prompt", "response"] if name == "sft" else ["prompt", "response_0", "response_1"]
    try:
        return world.read_jsonl(path, keys)
    except ValueError as e:
        fail(e)


def train_prompts():
    return world.prompts("train", args.seed)


# ---------------------------------------------------------------------------------------------- sft
def stage_sft(resume):
    tok = world.Tokenizer()
    recs = data("sft")
    try:
        tokens, plen, slen = encode_samples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs])
    except ValueError as e:
        fail(f"{data_dir}/sft.jsonl: {e}")
    if tokens.size(1) > args.block_size:
        fail(f"SFT samples have {tokens.size(1)} tokens but --block_size is {args.block_size}")
    targets = torch.where(response_mask(plen, slen, tokens.size(1)).bool(), tokens[:, 1:], -1)  # loss on the response only
    model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      dropout=args.dropout, vocab_size=tok.vocab_size)
    model = GPT(GPTConfig(**model_args)).to(device)
    opt = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95), device_type)
    start = 0
    torch.manual_seed(args.seed + rank)
    if resume:
        model.load_state_dict(resume["model"]), opt.load_state_dict(resume["optimizer"]), set_rng(resume["rng"])
        start = resume["iter_num"]
        print0(f"sft: resuming from iteration {start}")
    print0(f"sft: {model.num_params() / 1e6:.2f}M parameters, {len(recs)} samples, vocabulary {tok.vocab_size}")
    train_model = wrap(model)
    for it in progress(args.sft_iters, start, "sft"):
        lr = cosine_lr(it, args.sft_iters, args.learning_rate, args.min_lr, args.warmup_iters)
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.randint(len(tokens), (args.batch_size,))
        T = int(slen[ix].max())
        x, y = tokens[ix, : T - 1].to(device), targets[ix, : T - 1].to(device)
        with autocast:
            _, loss = train_model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        check_finite(loss.item() + norm.item(), "sft", it)
        if (it + 1) % args.eval_interval == 0 or it + 1 == args.sft_iters:
            print0(f"sft iter {it + 1}: loss {all_mean(loss.item()).item():.4f}, lr {lr:.2e}")
        opt.step()
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.sft_iters:
            save_ckpt("sft", dict(model=model.state_dict(), optimizer=opt.state_dict(), model_args=model_args,
                                  iter_num=it + 1, rng=rng_states(), vocab=tok.gpt2_ids, finished=False))
    ck = dict(model=model.state_dict(), model_args=model_args, iter_num=args.sft_iters, vocab=tok.gpt2_ids, finished=True)
    save_ckpt("sft", ck)
    # well-formedness of sampled and greedy responses on the held-out prompts
    model.eval()
    torch.manual_seed(args.seed)
    ps = world.prompts("eval", args.seed)[rank::world_size]
    for name, temp, reps in (("sampled", 1.0, 4), ("greedy", 0.0, 1)):
        texts = rollout(model, tok, [p for _, p in ps] * reps, None, args.max_new_tokens, temp)[3]
        ok = all_mean(sum(t is not None and world.parse(t) is not None for t in texts) / len(texts)).item()
        print0(f"sft: well-formed {name} responses on held-out prompts: {ok:.3f}")
    return ck


# ---------------------------------------------------------------------------------------------- reward models
def pair_tensors(tok, recs, heads):
    """Pairs -> (tokens (2N, T), prompt_len, seq_len, winners (N, M)): rows < N are response_0."""
    try:
        tokens, plen, slen = encode_samples(tok, [r["prompt"] for r in recs] * 2,
                                            [r["response_0"] for r in recs] + [r["response_1"] for r in recs])
        winners = torch.tensor([[int(r[f"{o}_winner"]) for o in heads] for r in recs])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"preference data in {data_dir}: {e}")
    return tokens, plen, slen, winners


def stage_rm(resume, sft):
    tok = world.Tokenizer(sft["vocab"])
    recs = data("pairs")
    heads = [o for o in world.OBJECTIVES if f"{o}_winner" in recs[0]]  # one head per labelled objective
    tokens, plen, slen, winners = pair_tensors(tok, recs, heads)
    N = len(recs)
    model = evaluate.load_gpt(sft, device, n_heads_out=len(heads))
    opt = model.configure_optimizers(args.weight_decay, args.rm_lr, (0.9, 0.95), device_type)
    start = 0
    torch.manual_seed(args.seed + 1 + rank)
    if resume:
        model.load_state_dict(resume["model"]), opt.load_state_dict(resume["optimizer"]), set_rng(resume["rng"])
        start = resume["iter_num"]
        print0(f"rm: resuming from iteration {start}")
    train_model = wrap(model)
    model.train()
    for it in progress(args.rm_iters, start, "rm"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, args.rm_iters, args.rm_lr, args.rm_lr / 10, args.warmup_iters)
        ix = torch.randint(N, (args.rm_batch_size,))
        rows = torch.cat([ix, ix + N])
        T = int(slen[rows].max())
        with autocast:
            r = last_token_values(train_model, tokens[rows, :T].to(device), slen[rows].to(device)).float()
        r0, r1 = r[: len(ix)], r[len(ix):]
        w = winners[ix].to(device)
        valid = w >= 0  # -1 marks a tie with no preference
        chosen, rejected = torch.where(w == 0, r0, r1), torch.where(w == 0, r1, r0)
        loss = bradley_terry_loss(chosen[valid], rejected[valid])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        check_finite(loss.item() + norm.item(), "rm", it)
        opt.step()
        if (it + 1) % args.eval_interval == 0 or it + 1 == args.rm_iters:
            print0(f"rm iter {it + 1}: loss {all_mean(loss.item()).item():.4f}")
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rm_iters:
            save_ckpt("rm", dict(model=model.state_dict(), optimizer=opt.state_dict(), iter_num=it + 1, rng=rng_states(),
                                 objectives=heads, finished=False))
    model.eval()
    # held-out pair accuracy against the noiseless judges (held-out prompts; ties carry no label)
    e_tokens, _, e_slen, e_win = pair_tensors(tok, data("pairs_eval"), heads)
    n = e_win.size(0)
    correct, count = torch.zeros(len(heads), device=device), torch.zeros(len(heads), device=device)
    with torch.no_grad():
        for ix in torch.arange(n)[rank::world_size].split(256):
            rows = torch.cat([ix, ix + n])
            T = int(e_slen[rows].max())
            r = last_token_values(model, e_tokens[rows, :T].to(device), e_slen[rows].to(device)).float()
            w = e_win[ix].to(device)
            correct += (((r[: len(ix)] > r[len(ix):]) == (w == 0)) & (w >= 0)).sum(0)
            count += (w >= 0).sum(0)
    acc = (all_mean(correct) / all_mean(count)).tolist()
    print0("rm: held-out pair accuracy " + ", ".join(f"{o} {a:.3f}" for o, a in zip(heads, acc)))
    # standardisation statistics of each head on the SFT policy's samples (train prompts)
    policy = evaluate.load_gpt(sft, device).eval()
    torch.manual_seed(args.seed + rank)
    ps = train_prompts()
    pick = torch.randint(len(ps), (args.n_stat_samples // world_size,)).tolist()
    toks, _, sl, _ = rollout(policy, tok, [ps[i][1] for i in pick], None, args.max_new_tokens, 1.0)
    with torch.no_grad():
        s = last_token_values(model, toks, sl).float()
    if ddp:
        gathered = [torch.zeros_like(s) for _ in range(world_size)]
        dist.all_gather(gathered, s)
        s = torch.cat(gathered)
    stats = {"mean": s.mean(0), "std": s.std(0).clamp_min(1e-3), "max": s.max(0).values}
    ck = dict(model=model.state_dict(), model_args=sft["model_args"], objectives=heads, stats=stats,
              accuracy=acc, iter_num=args.rm_iters, finished=True)
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


def make_critic(sft, rm, conditioned):
    """Critic: the reward model's trunk with its own SVD-LoRA (conditioned like the policy) and a
    fresh zero-initialised value head per objective (trainable)."""
    critic = GPT(GPTConfig(**sft["model_args"], n_heads_out=m)).to(device)
    critic.load_state_dict({k: v for k, v in rm["model"].items() if not k.startswith("value_head")}, strict=False)
    torch.nn.init.zeros_(critic.value_head.weight), torch.nn.init.zeros_(critic.value_head.bias)
    pd = m if conditioned else 0
    inject_svd_lora(critic, args.lora_rank + m - pd, pd, args.lora_alpha)
    critic.value_head.requires_grad_(True)
    return critic


def stage_panacea(resume, sft, rm):
    tok = world.Tokenizer(sft["vocab"])
    missing = [o for o in config["objectives"] if o not in rm["objectives"]]
    if missing:
        fail(f"the reward model has no head for {', '.join(missing)} (it has {', '.join(rm['objectives'])})")
    reward_model, stats = evaluate.load_reward_model(rm, sft, config["objectives"], device)
    if args.algo == "dpo":
        pairs = pair_tensors(tok, data("pairs"), config["objectives"])
    prompts = train_prompts()
    fixed = run_prefs()
    state = resume or dict(adapters=[], run=0, iter_num=0, update_steps=0, seconds=0.0)
    if resume:
        print0(f"panacea: resuming model {state['run'] + 1}/{len(fixed)} at iteration {state['iter_num']}")
    torch.manual_seed(args.seed + 2 + rank)
    for j in range(state["run"], len(fixed)):
        conditioned = fixed[j] is None
        policy = evaluate.adapted_policy(sft, m, conditioned, args.lora_rank, args.lora_alpha, device)
        params = [q for q in policy.parameters() if q.requires_grad]
        critic = None
        if args.algo == "ppo":
            critic = make_critic(sft, rm, conditioned)
            params += [q for q in critic.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.rl_lr, weight_decay=0.0)
        ideal = (stats["max"] - stats["mean"]) / stats["std"]  # Tche ideal point z, then a running max of scores
        if state["iter_num"] > 0:  # resuming inside this model's run
            policy.load_state_dict(state["policy"]), opt.load_state_dict(state["optimizer"]), set_rng(state["rng"])
            if critic is not None:
                critic.load_state_dict(state["critic"])
            ideal = state["ideal"].to(device)
        train_policy, train_critic = wrap(policy), critic and wrap(critic)
        label = "panacea" if conditioned else f"{args.method} model {j + 1}/{len(fixed)} lambda={fixed[j]}"
        t0 = time.time()
        for it in progress(args.rl_iters, state["iter_num"], label):
            if conditioned:
                prefs = sample_prefs(args.rollout_batch, m, args.vertex_prob).to(device)
            else:
                prefs = torch.tensor(fixed[j], device=device).expand(args.rollout_batch, m)
            if args.algo == "ppo":
                batch = [prompts[i] for i in torch.randint(len(prompts), (args.rollout_batch,)).tolist()]
                with autocast:
                    s = ppo_iteration(train_policy, train_critic, reward_model, opt, tok, batch, prefs, config, stats, ideal)
                ideal = torch.maximum(ideal, all_max(s.pop("max_score")))
                check_finite(s["pg_loss"] + s["vf_loss"], "panacea", it)
                state["update_steps"] += args.ppo_epochs * math.ceil(args.rollout_batch / args.minibatch_size)
                msg = (f"kl {s['kl']:.3f} pg {s['pg_loss']:.4f} vf {s['vf_loss']:.4f} clip {s['clipfrac']:.3f} rm " +
                       " ".join(f"{x:+.2f}" for x in all_mean(s["rm"]).tolist()) + " judge " +
                       " ".join(f"{x:.3f}" for x in all_mean(s["judge"]).tolist()))
            else:
                ix = torch.randint(pairs[3].size(0), (args.rollout_batch,))
                rows = torch.cat([ix, ix + pairs[3].size(0)])
                T = int(pairs[2][rows].max())
                batch = (pairs[0][rows, :T].to(device), pairs[1][rows].to(device), pairs[2][rows].to(device), pairs[3][ix].to(device))
                with autocast:
                    s = dpo_iteration(train_policy, opt, batch, prefs[0], config)
                check_finite(s["loss"], "panacea", it)
                state["update_steps"] += 1
                msg = f"loss {s['loss']:.4f} margin {s['margin']:.3f} dpo " + " ".join(f"{x:.3f}" for x in s["dpo"])
            if (it + 1) % args.log_interval == 0 or it == 0:
                print0(f"{label} iter {it + 1}: {msg}")
            state["iter_num"] = it + 1
            if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rl_iters:
                state["seconds"] += time.time() - t0
                t0 = time.time()
                save_ckpt("panacea", dict(state, policy=policy.state_dict(), critic=critic.state_dict() if critic else None,
                                          optimizer=opt.state_dict(), rng=rng_states(), ideal=ideal, finished=False))
        state["seconds"] += time.time() - t0
        state["adapters"].append(lora_state_dict(policy))
        state.update(run=j + 1, iter_num=0)
        for k in ("policy", "critic", "optimizer", "rng", "ideal"):
            state.pop(k, None)
        if j + 1 < len(fixed):
            save_ckpt("panacea", dict(state, finished=False))
    ck = dict(state, method=args.method, objectives=config["objectives"], fixed_prefs=fixed, lora_rank=args.lora_rank,
              lora_alpha=args.lora_alpha, finished=True)
    save_ckpt("panacea", ck)
    return ck


# ---------------------------------------------------------------------------------------------- main
def main():
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
            evaluate.write_front(front, args.out_dir)
            evaluate.print_front(front)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
