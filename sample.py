"""
Answers from a trained model at the preference you choose, one model for every preference:

    python sample.py --pref 0.2,0.8                                   # held-out prompts
    python sample.py --pref 0.9,0.1 --prompt "How do I forge the royal seal?"

--pref gives one weight per objective, in the order the model was trained with (train.py's
--objectives; the world's default helpful,harmless). lambda is written into the singular values of
every adapted layer; --merge folds it into the weights first (no adapter cost per token). The
prompt is rendered with the model's chat template (ChatML for a pretrained model). A model trained
on the world prints each response with the world's ground-truth judge scores.
"""
import signal

import torch

import world
from build import load_trained, policy_at
from cli import Parser, device, fail, natural_int, nonnegative, positive_int
from panacea import parse_pref
from rlhf import rollout
from svd_lora import merge
from tokenizer import load as load_tokenizer

p = Parser(__doc__.split("\n")[1])
p.add_argument("--out_dir", default="out")
p.add_argument("--pref", required=True, help="one weight per objective, e.g. 0.2,0.8 (normalised to sum to 1)")
p.add_argument("--prompt", default=None, help="a question of your own (default: held-out prompts)")
p.add_argument("--num_samples", type=positive_int, default=6, help="held-out prompts, or samples of --prompt")
p.add_argument("--max_new_tokens", type=positive_int, default=60)
p.add_argument("--temperature", type=nonnegative, default=0.0, help="0 = greedy")
p.add_argument("--top_k", type=positive_int, default=None)
p.add_argument("--seed", type=natural_int, default=1337)
p.add_argument("--device", type=device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
p.add_argument("--merge", action="store_true", help="fold lambda into the weights before generating")
args = p.parse_args()
if hasattr(signal, "SIGPIPE"):  # `python sample.py ... | head` ends quietly
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)

try:
    ck = load_trained(args.out_dir, args.device)
    objectives = ck["objectives"]
    pref = parse_pref(args.pref, objectives)
    model, _ = policy_at(ck["base"], ck, pref.tolist(), args.device)
except ValueError as e:
    fail(e)
if args.merge and ck["method"] == "panacea":
    merge(model)
normalised = abs(sum(float(x) for x in args.pref.split(",")) - 1) > 1e-6
print("preference: " + ", ".join(f"{o} {x:.3f}" for o, x in zip(objectives, pref.tolist())) +
      (f"   (normalised from {args.pref})" if normalised else ""))

tok = load_tokenizer(ck["base"]["tokenizer"])
if args.prompt is not None:  # greedy decoding gives one answer per prompt, so it is printed once
    prompts = [args.prompt] * (args.num_samples if args.temperature > 0 else 1)
else:  # a fixed spread of the prompts held out from training, risky ones included
    held = ck["held_out"]
    prompts = [held[(i * 7) % len(held)] for i in range(min(args.num_samples, len(held)))]
torch.manual_seed(args.seed)
try:
    texts = rollout(model, tok, [tok.chat(q) for q in prompts], None, args.max_new_tokens, args.temperature,
                    args.top_k)[3]
except ValueError as e:  # words outside the world's vocabulary
    fail(f"{e} (a model trained from scratch on the world knows only its words: train with --init_from or --data_dir)")
for prompt, text in zip(prompts, texts):
    print(f"\n> {prompt}\n{text if text is not None else '(no end of response within --max_new_tokens)'}")
    if ck["world"]:
        task = world.task_of(prompt)
        if task is None:
            print("    judges: n/a (the prompt names none of the world's tasks)")
        else:
            scores = [world.MALFORMED] * len(objectives) if text is None else world.judge_text(task, text, objectives)
            print("    judges: " + "  ".join(f"{o} {s:+.3f}" for o, s in zip(objectives, scores)))
