"""
Trains Panacea stage by stage (--stage all = sft,rm,panacea,eval); each stage's loop is written out below.
    sft      a language model on the SFT corpus, loss on response tokens   -> BASE_DIR/sft/ckpt.pt
             (a GPT from scratch, or --init_from a pretrained model: a Hugging Face directory or a GGUF file)
    rm       SFT trunk + one scalar head per objective, Bradley-Terry loss -> BASE_DIR/rm/ckpt.pt
    panacea  SFT model + SVD-LoRA conditioned on lambda, by PPO or DPO     -> OUT_DIR/panacea/ckpt.pt
             (--method rs|dps trains the paper's baselines with the same algorithm and budget)
    eval     the Pareto front on held-out prompts over a lambda grid       -> OUT_DIR/front.json, pareto.png
The data is the embedded world's (in BASE_DIR/data, with ground-truth judges) or your own pairs with
--data_dir (data.py; the front is then measured with the reward models). Runs sharing one --base_dir
share their SFT and reward models. A finished stage whose checkpoint matches the flags is reused; an
unfinished one resumes from its last checkpoint (written atomically every --ckpt_interval iterations).

    python train.py                                           # the whole default pipeline
    python train.py --init_from smollm2-135m-instruct         # the same from a pretrained model
    torchrun --standalone --nproc_per_node=2 train.py         # with DDP (gloo on CPU, NCCL on GPU)
"""
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist

import build
import common
import data
import evaluate
from cli import Parser, checked, fail, natural_int, nonnegative, positive, positive_int, probability, subset
from cli import device as device_flag
from model import GPT, GPTConfig
from panacea import fixed_prefs, pref_grid, sample_prefs
from rlhf import (DPOConfig, PPOConfig, advantages, collect, dpo_update, finished_scores, optimizer_step,
                  response_mask, reward_model_loss, update)
from common import all_reduce, cosine_lr, print0, set_lr, steps, wrap
from svd_lora import lora_state_dict
from tokenizer import load as load_tokenizer

# ---------------------------------------------------------------------------------------------- config
STAGES = ("sft", "rm", "panacea", "eval")
p = Parser(__doc__.split("\n")[1])
g = p.add_argument_group("run")
g.add_argument("--out_dir", default="out")
g.add_argument("--base_dir", default=None, help="where the sft and rm stages live (default: out_dir)")
g.add_argument("--data_dir", default=None, help="your own pairs.jsonl (+ pairs_eval.jsonl, sft.jsonl; see data.py)")
g.add_argument("--stage", type=subset(STAGES), default="all", help="all, or a comma list of sft,rm,panacea,eval")
g.add_argument("--device", type=device_flag, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bfloat16 on cuda")
g.add_argument("--compile", action="store_true", help="torch.compile the training passes and the rollouts' decoding")
g.add_argument("--log_interval", type=positive_int, default=10, help="Panacea iterations between log lines")
g.add_argument("--eval_interval", type=positive_int, default=250, help="SFT / reward-model iterations a log line")
g.add_argument("--ckpt_interval", type=positive_int, default=20, help="iterations between checkpoints (every stage)")
g = p.add_argument_group("sft")
g.add_argument("--seed", type=int, default=1337)
g.add_argument("--init_from", default=None, help="a Hugging Face model directory (Llama, Qwen2, Mistral), "
               "a Llama-style .gguf path or smollm2-135m-instruct")
g.add_argument("--n_layer", type=positive_int, default=4)
g.add_argument("--n_head", type=positive_int, default=4)
g.add_argument("--n_embd", type=positive_int, default=128)
g.add_argument("--block_size", type=positive_int, default=96, help="longest sequence; longer samples are left out")
g.add_argument("--dropout", type=probability, default=0.0)
g.add_argument("--sft_iters", type=positive_int, default=500)
g.add_argument("--batch_size", type=positive_int, default=32)
g.add_argument("--learning_rate", type=positive, default=2e-3)
g.add_argument("--warmup_iters", type=natural_int, default=50)
g.add_argument("--weight_decay", type=nonnegative, default=0.1)
g.add_argument("--grad_clip", type=positive, default=PPOConfig.grad_clip)
g.add_argument("--n_sft", type=positive_int, default=20000, help="world: SFT corpus size")
g = p.add_argument_group("rm")
g.add_argument("--rm_iters", type=positive_int, default=600)
g.add_argument("--rm_batch_size", type=positive_int, default=16, help="pairs per step")
g.add_argument("--rm_lr", type=positive, default=5e-4)
g.add_argument("--rm_members", type=positive_int, default=1, help="reward models trained side by side; "
               "a response's score is their mean")
g.add_argument("--n_pairs", type=positive_int, default=20000, help="world: preference pairs")
g.add_argument("--label_temperature", type=nonnegative, default=0.1, help="world: Bradley-Terry noise of the labels")
g.add_argument("--n_stat_samples", type=positive_int, default=512, help="SFT samples for the score statistics")
g.add_argument("--max_new_tokens", type=positive_int, default=PPOConfig.max_new_tokens,
               help="response length cap (statistics, rollouts, evaluation)")
g = p.add_argument_group("panacea")
g.add_argument("--objectives", default=None, help="2 or more the data labels (world: helpful,harmless; else all)")
g.add_argument("--method", default="panacea", choices=["panacea", "rs", "dps"])
g.add_argument("--algo", default="ppo", choices=["ppo", "dpo"])
g.add_argument("--agg", default=PPOConfig.agg, choices=["ls", "tche"])
g.add_argument("--tche_mu", type=nonnegative, default=None, help="Tchebycheff's smoothing temperature, 0: the hard "
               f"min (unset: PPO {PPOConfig.tche_mu}, DPO {DPOConfig.tche_mu})")
g.add_argument("--rl_iters", type=positive_int, default=80)
g.add_argument("--lora_rank", type=positive_int, default=8, help="k, the preference-agnostic singular values")
g.add_argument("--lora_alpha", type=positive, default=16.0)
g.add_argument("--rl_lr", type=positive, default=2e-3)
g.add_argument("--vertex_prob", type=probability, default=0.3, help="share of lambda draws on a simplex vertex")
g.add_argument("--rollout_batch", type=positive_int, default=64, help="prompts per iteration per process (DPO: pairs)")
g.add_argument("--pref_group", type=positive_int, default=8, help="sequences (DPO: pairs) that share one lambda draw")
g.add_argument("--minibatch_size", type=positive_int, default=PPOConfig.minibatch_size)
g.add_argument("--epochs", type=positive_int, default=None,
               help=f"passes over each iteration's batch (unset: PPO {PPOConfig.epochs}, DPO {DPOConfig.epochs})")
g.add_argument("--dps_points", type=checked(int, 2, name="a whole number >= 2"), default=5,
               help="DPS grid size (m >= 3: the smallest simplex lattice that large)")
g = p.add_argument_group("ppo")
g.add_argument("--kl_coef", type=nonnegative, default=PPOConfig.kl_coef)
g.add_argument("--clip", type=positive, default=PPOConfig.clip)
g.add_argument("--clip_value", type=positive, default=PPOConfig.clip_value)
g.add_argument("--vf_coef", type=nonnegative, default=PPOConfig.vf_coef)
g.add_argument("--gae_lambda", type=probability, default=PPOConfig.gae_lambda)
g.add_argument("--temperature", type=positive, default=PPOConfig.temperature, help="rollout sampling temperature")
g = p.add_argument_group("dpo")
g.add_argument("--dpo_beta", type=positive, default=DPOConfig.dpo_beta)
g = p.add_argument_group("eval")
g.add_argument("--eval_divisions", type=positive_int, default=None, help="lambda grid step 1/d (m = 2: 10, else 4)")
g.add_argument("--eval_temperature", type=nonnegative, default=0.0, help="0 = greedy")
g.add_argument("--eval_prompts", type=positive_int, default=100, help="your data: held-out prompts measured on")
# --init_from changes the defaults to a fine-tuning recipe for a pretrained model (sized for one GPU)
PRETRAINED = dict(block_size=512, learning_rate=1e-4, warmup_iters=10, sft_iters=200, batch_size=16, rm_lr=1e-4,
                  rm_iters=200, n_stat_samples=256, rl_lr=5e-4, minibatch_size=16)
if p.parse_known_args()[0].init_from:
    p.set_defaults(**PRETRAINED)
args = p.parse_args()
if args.rollout_batch % args.pref_group:
    p.error(f"--rollout_batch ({args.rollout_batch}) must be a multiple of --pref_group ({args.pref_group})")
defaults = PPOConfig if args.algo == "ppo" else DPOConfig  # --epochs and --tche_mu resolve per algorithm
args.epochs = args.epochs or defaults.epochs
args.tche_mu = defaults.tche_mu if args.tche_mu is None and args.agg == "tche" else args.tche_mu or 0.0  # LS: 0
config = vars(args)
base_dir = args.base_dir or args.out_dir
# The flags each stage's result depends on: its checkpoint records them, and a finished stage is
# reused only when they match (a changed flag never reuses a stale result).
SFT_KEYS = ["sft_data", "seed", "init_from", "n_layer", "n_head", "n_embd", "block_size", "dropout", "sft_iters",
            "batch_size", "learning_rate", "warmup_iters", "weight_decay", "grad_clip", "n_sft"]
RM_KEYS = SFT_KEYS + ["data", "rm_iters", "rm_batch_size", "rm_lr", "rm_members", "n_pairs", "label_temperature",
                      "n_stat_samples", "max_new_tokens"]
PANACEA_KEYS = RM_KEYS + ["objectives", "method", "algo", "agg", "tche_mu", "rl_iters", "lora_rank", "lora_alpha",
                          "rl_lr", "vertex_prob", "rollout_batch", "pref_group", "minibatch_size", "epochs"]
PANACEA_KEYS += ["kl_coef", "clip", "clip_value", "vf_coef", "gae_lambda", "temperature"] if args.algo == "ppo" else \
    ["dpo_beta"]
PANACEA_KEYS += ["dps_points"] if args.method == "dps" else []
STAGE_KEYS = {"sft": SFT_KEYS, "rm": RM_KEYS, "panacea": PANACEA_KEYS}

# ---------------------------------------------------------------------------------------------- processes, checkpoints
rank, local_rank, world_size, device, device_type = common.init(args.device)
dtype = ("bfloat16" if device_type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def ckpt_path(stage):
    return os.path.join(base_dir if stage in ("sft", "rm") else args.out_dir, stage, "ckpt.pt")


def save_ckpt(stage, ck):
    common.save(ckpt_path(stage), dict(ck, config={k: config[k] for k in STAGE_KEYS[stage]}))


def load_ckpt(stage):
    """The stage's checkpoint (finished or not) if it exists and was trained with the current flags."""
    path = ckpt_path(stage)
    if not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to train the stage again")
    diff = [f"{k}={ck['config'].get(k)!r} (now {config[k]!r})" for k in STAGE_KEYS[stage]
            if ck["config"].get(k) != config[k]]
    if diff:
        fail(f"{path} was trained with {', '.join(diff)}; use the same flags, another --out_dir/--base_dir, "
             "or delete it")
    return ck


def finished(stage):
    """The finished result of a stage that a later stage builds on."""
    ck = load_ckpt(stage)
    if ck is None or not ck["finished"]:
        fail(f"{ckpt_path(stage)} {'is unfinished' if ck else 'does not exist'}: run --stage {stage} first")
    return ck


def encoded(what, *rest):
    """data.sft_tensors or data.pair_tensors at --block_size, errors as one line."""
    try:
        out, dropped = what(*rest, args.block_size)
    except ValueError as e:
        fail(e)
    if dropped:
        print0(f"{dropped} samples longer than --block_size {args.block_size} tokens are left out")
    return out


# ---------------------------------------------------------------------------------------------- sft
def train_sft(source, tok, resume):
    """The language model: loss on the response tokens of the SFT corpus, warm-up + cosine lr."""
    tokens, plen, slen = encoded(data.sft_tensors, source, tok)
    targets = torch.where(response_mask(plen, slen, tokens.size(1)).bool(), tokens[:, 1:], -1)  # (N, T-1)
    torch.manual_seed(args.seed + rank)
    try:
        scratch = GPTConfig(args.block_size, tok.vocab_size, args.n_layer, args.n_head, args.n_embd, args.dropout)
        model = GPT.from_pretrained(args.init_from, block_size=args.block_size, dropout=args.dropout) \
            if args.init_from else GPT(scratch)
        model = model.to(device)
    except (ImportError, ValueError) as e:
        fail(e)
    opt = model.configure_optimizers(args.weight_decay, args.learning_rate, (0.9, 0.95), device_type)
    print0(f"sft: {model.num_params() / 1e6:.2f}M parameters ({args.init_from or 'from scratch'}), {len(tokens)} "
           f"samples of {source.describe}, vocabulary {tok.vocab_size}")
    start = common.restore({"model": model}, opt, resume, args.seed, "sft") if resume else 0
    seconds, t0, train_model = resume["seconds"] if resume else 0.0, time.time(), wrap(model.train(), args.compile)
    for it in steps(start, args.sft_iters, "sft"):
        set_lr(opt, lr := cosine_lr(it, args.sft_iters, args.learning_rate, args.warmup_iters))
        ix = torch.randint(len(tokens), (args.batch_size,))
        T, first = int(slen[ix].max()), int(plen[ix].min()) - 1  # logits from the first response position on
        with autocast:
            loss = train_model(tokens[ix, : T - 1].to(device), targets[ix, : T - 1].to(device), from_pos=first)[1]
        optimizer_step(opt, loss, args.grad_clip)
        if (it + 1) % args.eval_interval == 0 or it == 0 or it + 1 == args.sft_iters:
            print0(f"sft iter {it + 1}: loss {all_reduce(loss.item(), device).item():.4f}, lr {lr:.2e}")
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.sft_iters:
            seconds, t0 = seconds + time.time() - t0, time.time()
            save_ckpt("sft", common.snapshot({"model": model}, opt, iter_num=it + 1, seconds=seconds))
    common.check_sync("sft model", model)
    model_args = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "n_heads_out"}
    ck = dict(model=model.eval().state_dict(), model_args=model_args, tokenizer=tok.spec, iter_num=args.sft_iters,
              seconds=seconds + time.time() - t0, finished=True)
    save_ckpt("sft", ck)
    torch.manual_seed(args.seed)
    for name, temp in (("sampled", 1.0), ("greedy", 0.0)) if source.well_formed else ():  # on the held-out prompts
        with autocast:
            share = evaluate.well_formed(model, tok, source, temp, args.max_new_tokens, device, rank, world_size)
        print0(f"sft: well-formed {name} responses on held-out prompts: {share:.3f}")
    return ck


# ---------------------------------------------------------------------------------------------- reward models
def train_rm(source, tok, sft, resume):
    """--rm_members reward models side by side, each the SFT trunk with one Bradley-Terry head per labelled
    objective, trained on batches of its own (build.RewardEnsemble scores with their mean); then the
    ensemble's statistics on the SFT model's samples (PPO standardises every score with them)."""
    heads = source.objectives
    pairs = encoded(data.pair_tensors, source, tok, "train", heads)
    torch.manual_seed(args.seed + 1 + rank)
    model = build.RewardEnsemble([build.load_gpt(sft, device, n_heads_out=len(heads))
                                  for _ in range(args.rm_members)])
    opt = model.configure_optimizers(args.weight_decay, args.rm_lr, (0.9, 0.95), device_type)
    start = common.restore({"model": model}, opt, resume, args.seed, "rm") if resume else 0
    seconds, t0 = resume["seconds"] if resume else 0.0, time.time()
    members = [wrap(member.train(), args.compile) for member in model.members]
    for it in steps(start, args.rm_iters, "rm"):
        set_lr(opt, lr := cosine_lr(it, args.rm_iters, args.rm_lr, args.warmup_iters))
        loss = 0.0
        for member in members:  # the sum: each member's gradient is that of its own loss
            batch = data.pair_batch(pairs, torch.randint(len(pairs[3]), (args.rm_batch_size,)), device)
            with autocast:
                loss = loss + reward_model_loss(member, batch)
        optimizer_step(opt, loss, args.grad_clip)
        if (it + 1) % args.eval_interval == 0 or it == 0 or it + 1 == args.rm_iters:  # the members' mean loss
            print0(f"rm iter {it + 1}: loss {all_reduce(loss.item() / len(members), device).item():.4f}, lr {lr:.2e}")
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rm_iters:
            seconds, t0 = seconds + time.time() - t0, time.time()
            save_ckpt("rm", common.snapshot({"model": model}, opt, iter_num=it + 1, seconds=seconds))
    common.check_sync("rm model", model)
    eval_pairs = encoded(data.pair_tensors, source, tok, "eval", heads)  # the world's: against noiseless judges
    with autocast:
        acc = evaluate.pair_accuracy(model.eval(), eval_pairs, device, rank, world_size)
    print0("rm: held-out pair accuracy " + ", ".join(f"{o} {a:.3f}" for o, a in zip(heads, acc)))
    torch.manual_seed(args.seed + rank)  # the statistics: every head on the SFT policy's samples (train prompts)
    sft_model, ps = build.load_gpt(sft, device).eval(), source.prompts("train")
    prompts = [tok.chat(ps[i]) for i in torch.randint(len(ps), (args.n_stat_samples // world_size,)).tolist()]
    with autocast:  # ranks may hold different numbers of finished samples
        s = common.gather_rows(finished_scores(model, sft_model, tok, prompts, args.max_new_tokens))
    if len(s) < 2:
        fail(f"rm: {len(s)} of the SFT model's samples ended within --max_new_tokens {args.max_new_tokens}; raise it")
    ck = dict(model=model.state_dict(), members=args.rm_members, model_args=sft["model_args"], objectives=heads,
              accuracy=acc, finished=True,
              stats=dict(mean=s.mean(0), std=s.std(0).clamp_min(1e-3), max=s.max(0).values, min=s.min(0).values),
              iter_num=args.rm_iters, seconds=seconds + time.time() - t0)
    save_ckpt("rm", ck)
    if source.judge is not None and rank == 0:  # the world: the best these reward models let PPO do (world.kl_optimum)
        grid = pref_grid(len(config["objectives"]), args.eval_divisions)
        with autocast:
            ratio = evaluate.rm_ceiling(sft, ck, source, config["objectives"], grid, args.kl_coef, device)
        print0(f"rm: the KL optimum with these reward models (beta {args.kl_coef}) reaches {ratio:.3f} of the "
               f"attainable front's hypervolume (the RM ceiling)")
    return ck


# ---------------------------------------------------------------------------------------------- panacea and baselines
def draw_prefs(fixed, m):
    """(rollout_batch, m) preferences of one iteration. Algorithm 1: Panacea draws one lambda per group of
    pref_group sequences (DPO: pairs), kept for everything the batch touches; a baseline: its fixed lambda."""
    if fixed is None:
        return sample_prefs(args.rollout_batch, m, args.vertex_prob, group=args.pref_group)
    return torch.tensor(fixed).expand(args.rollout_batch, m)


def train_ppo(policy, critic, opt, tok, prompts, judge, reward_model, stats, fixed, done, label):
    """rl_iters PPO iterations of one model (Panacea's, or a baseline's at its fixed lambda)."""
    cfg = PPOConfig(**{f.name: config[f.name] for f in dataclasses.fields(PPOConfig)})
    start = common.restore({"policy": policy, "critic": critic}, opt, done, args.seed, label) if done["iter_num"] else 0
    ideal = done["ideal"] if start else torch.zeros_like(stats["mean"])  # Tche's z: the SFT policy's J to begin with
    seconds, t0 = done["seconds"], time.time()
    train_policy, train_critic = wrap(policy, args.compile), wrap(critic, args.compile)
    for it in steps(start, args.rl_iters, label):
        prefs = draw_prefs(fixed, len(stats["mean"])).to(device)  # (B, m)
        questions = [prompts[i] for i in torch.randint(len(prompts), (args.rollout_batch,)).tolist()]
        with autocast:
            batch = collect(policy, critic, reward_model, tok, [tok.chat(q) for q in questions], prefs, cfg, stats)
            batch = advantages(batch, cfg, ideal)
            logs = update(train_policy, train_critic, opt, batch, cfg)
        # the ideal point of Tchebycheff: the best J_i(lambda) seen, a running max of the groups' estimates
        ideal = torch.maximum(ideal, all_reduce(batch["J"].max(0).values, device, "max"))
        if (it + 1) % args.log_interval == 0 or it == 0 or it + 1 == args.rl_iters:
            kl = ((batch["logp"] - batch["ref_logp"]) * batch["mask"]).sum(-1).mean().item()
            msg = f"kl {kl:.3f} pg {logs['pg_loss']:.4f} vf {logs['vf_loss']:.4f} clip {logs['clipfrac']:.3f} rm "
            msg += " ".join(f"{x:+.2f}" for x in all_reduce(batch["scores"].mean(0), device).tolist())
            if judge is not None:
                judged = judge(questions, batch["texts"], config["objectives"]).mean(0)
                msg += " judge " + " ".join(f"{x:.3f}" for x in all_reduce(judged, device).tolist())
            print0(f"{label} iter {it + 1}: {msg}")
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rl_iters:
            seconds, t0 = seconds + time.time() - t0, time.time()
            save_ckpt("panacea", common.snapshot({"policy": policy, "critic": critic}, opt,
                                                 **dict(done, iter_num=it + 1, seconds=seconds, ideal=ideal)))
    common.check_sync(f"{label} policy", policy)
    common.check_sync(f"{label} critic", critic)
    return seconds + time.time() - t0


def train_dpo(policy, opt, pairs, fixed, m, done, label):
    """rl_iters Panacea-DPO iterations of one model (Panacea's, or a baseline's at its fixed lambda)."""
    cfg = DPOConfig(**{f.name: config[f.name] for f in dataclasses.fields(DPOConfig)})
    start = common.restore({"policy": policy}, opt, done, args.seed, label) if done["iter_num"] else 0
    seconds, t0, train_policy = done["seconds"], time.time(), wrap(policy, args.compile)
    for it in steps(start, args.rl_iters, label):
        prefs = draw_prefs(fixed, m).to(device)  # (B, m), one per pair
        batch = data.pair_batch(pairs, torch.randint(len(pairs[3]), (args.rollout_batch,)), device)
        with autocast:
            logs = dpo_update(train_policy, opt, batch, prefs, cfg)
        if (it + 1) % args.log_interval == 0 or it == 0 or it + 1 == args.rl_iters:
            print0(f"{label} iter {it + 1}: loss {logs['loss']:.4f} margin {logs['margin']:.3f} dpo "
                   + " ".join(f"{x:.3f}" for x in logs["dpo"]))
        if (it + 1) % args.ckpt_interval == 0 and it + 1 < args.rl_iters:
            seconds, t0 = seconds + time.time() - t0, time.time()
            save_ckpt("panacea", common.snapshot({"policy": policy}, opt,
                                                 **dict(done, iter_num=it + 1, seconds=seconds)))
    common.check_sync(f"{label} policy", policy)
    return seconds + time.time() - t0


def train_panacea(source, tok, sft, rm, resume):
    """One lambda-conditioned model (Panacea) or one model per fixed lambda (a baseline), by PPO or DPO.
    Every model is an independent run from the same seed: a baseline's model at lambda is exactly
    what plain LS training at that lambda gives (under DDP, DDP broadcasts rank 0's init)."""
    objectives, conditioned, ppo = config["objectives"], args.method == "panacea", args.algo == "ppo"
    m, lora = len(objectives), (args.lora_rank, args.lora_alpha)
    fixed = fixed_prefs(args.method, m, args.dps_points)
    frozen = torch.bfloat16 if dtype == "bfloat16" else None  # the weights no step changes: half the memory
    reward_model, stats = build.load_reward_model(rm, sft, objectives, device, frozen)
    pairs = None if ppo else encoded(data.pair_tensors, source, tok, "train", objectives)
    done = resume or dict(adapters=[], run=0, iter_num=0, update_steps=0, seconds=0.0)  # the models trained so far
    for j in range(done["run"], len(fixed)):
        torch.manual_seed(args.seed + 2 + rank)
        policy = build.adapted_policy(sft, m, conditioned, *lora, device, frozen)
        critic = build.critic_model(sft, rm, m, conditioned, *lora, device, frozen) if ppo else None
        params = [q for net in (policy, critic) if net is not None for q in net.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.rl_lr, weight_decay=0.0)  # the adapters (and the critic's value heads)
        label = "panacea" if conditioned else f"{args.method} model {j + 1}/{len(fixed)} lambda={fixed[j]}"
        if ppo:
            seconds = train_ppo(policy, critic, opt, tok, source.prompts("train"), source.judge, reward_model, stats,
                                fixed[j], done, label)
        else:
            seconds = train_dpo(policy, opt, pairs, fixed[j], m, done, label)
        steps_per_iter = args.epochs * math.ceil(args.rollout_batch / args.minibatch_size)
        done = dict(adapters=done["adapters"] + [lora_state_dict(policy)], run=j + 1, iter_num=0, seconds=seconds,
                    update_steps=(j + 1) * args.rl_iters * steps_per_iter)
        if j + 1 < len(fixed):
            save_ckpt("panacea", dict(done, finished=False))
    base = {k: sft[k] for k in ("model", "model_args", "tokenizer")}  # self-contained for sample.py
    ck = dict(done, method=args.method, objectives=objectives, fixed_prefs=fixed, lora_rank=args.lora_rank,
              lora_alpha=args.lora_alpha, base=base, world=source.judge is not None,
              held_out=source.prompts("eval")[: args.eval_prompts], finished=True)
    save_ckpt("panacea", ck)
    return ck


def evaluate_front(source, sft, rm, pol):
    """The trained policy's front on the held-out prompts over the lambda grid: front.json, pareto.png, the table."""
    m = len(pol["objectives"])
    standard = pref_grid(m, args.eval_divisions)
    grid = pol["fixed_prefs"] if pol["method"] == "dps" else standard
    prompts = source.prompts("eval")[: None if source.judge else args.eval_prompts]  # the world's: all, as its limits
    with autocast:
        sums = evaluate.measure(sft, rm, pol, grid, prompts, source.judge, args.eval_temperature,
                                args.max_new_tokens, args.seed, device, rank, world_size)
        reward = evaluate.rm_reward(sft, rm, pol["objectives"], device) if args.algo == "ppo" else None
        limits = source.limits(pol["objectives"], grid, standard, args.kl_coef if reward else None, reward,
                               None if reward else args.dpo_beta)
    front = evaluate.record(sums, grid, pol, limits, len(prompts))
    if rank == 0:
        evaluate.write_front(front, args.out_dir, f"{args.method} {args.algo} {args.agg}")
        evaluate.print_front(front)


# ---------------------------------------------------------------------------------------------- main
def main():
    try:  # the data, and a pretrained model's file and packages, are checked before any work
        if args.data_dir:
            source = data.own_data(args.data_dir)
        else:  # rank 0 writes the world's files, the others read them
            source = data.World(os.path.join(base_dir, "data"), args.seed, args.n_sft, args.n_pairs,
                                args.label_temperature, write=rank == 0)
        if world_size > 1:
            dist.barrier()
        pretrained = {"hf": os.path.abspath(args.init_from)} if os.path.isdir(str(args.init_from)) else \
            {"gguf": args.init_from}
        tok = load_tokenizer(pretrained if args.init_from else source.tokenizer_spec())
    except (ImportError, ValueError) as e:
        fail(e)
    objectives = args.objectives.split(",") if args.objectives else source.default_objectives
    if len(objectives) < 2 or len(set(objectives)) < len(objectives) or not set(objectives) <= set(source.objectives):
        fail(f"--objectives takes 2 or more distinct names of {', '.join(source.objectives)} ({source.describe}); "
             f"got {','.join(objectives)}")
    config.update(objectives=objectives, sft_data=source.digest("sft"), data=source.digest())
    done = {}  # the stages' finished checkpoints
    for stage in [s for s in ("sft", "rm", "panacea") if s in args.stage]:
        prev, t0 = load_ckpt(stage), time.time()
        if prev is not None and prev["finished"]:
            print0(f"{stage}: reusing the finished checkpoint {ckpt_path(stage)}")
            done[stage] = prev
            continue
        try:  # prev: an unfinished checkpoint to resume from, or None
            if stage == "sft":
                done[stage] = train_sft(source, tok, prev)
            elif stage == "rm":
                done[stage] = train_rm(source, tok, done.get("sft") or finished("sft"), prev)
            else:
                sft, rm = (done.get(s) or finished(s) for s in ("sft", "rm"))
                done[stage] = train_panacea(source, tok, sft, rm, prev)
        except FloatingPointError:  # raised before the step: the weights and the last checkpoint are still good
            fail(f"{stage}: the loss or gradient is not finite; training stopped before the bad step, the last good "
                 f"checkpoint is {ckpt_path(stage)} (try a lower learning rate)")
        print0(f"{stage}: done in {time.time() - t0:.0f} s")
    if "eval" in args.stage:
        evaluate_front(source, *(done.get(s) or finished(s) for s in ("sft", "rm", "panacea")))
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
