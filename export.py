"""
The trained policy at one preference as a Hugging Face model directory, which transformers loads with
no custom code:

    python export.py --pref 0.2,0.8 --to panacea-0.2-0.8
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('panacea-0.2-0.8')"

--pref gives one weight per objective, as for sample.py. Panacea writes lambda into the singular values
and Delta W(lambda) is folded into the weights (merge); a DPS model's adapter is folded in the same way,
and a Rewarded Soups model is one set of weights already. What is written depends on the base model:
    a Hugging Face directory (--init_from DIR)   its architecture (Llama, Qwen2, Mistral), its tokenizer files
    a GGUF file (SmolLM2)                        LlamaForCausalLM, tokenizer.json from the GGUF vocabulary, ChatML
    the world's GPT from scratch                 GPT2LMHeadModel, GPT-2's BPE on the model's dense ids,
                                                 the chat template "User: {prompt}\\nAssistant:"
The directory is written as DIR.tmp and renamed to DIR when complete.
"""
import os

import torch

import hf
from build import load_trained, policy_at
from cli import Parser, fail
from panacea import parse_pref
from svd_lora import merge
from tokenizer import load as load_tokenizer

p = Parser(__doc__.split("\n")[1])
p.add_argument("--out_dir", default="out")
p.add_argument("--pref", required=True, help="one weight per objective, e.g. 0.2,0.8 (normalised to sum to 1)")
p.add_argument("--to", required=True, help="the directory to write")
p.add_argument("--force", action="store_true", help="replace --to if it exists and is not empty")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="of the written weights")
args = p.parse_args()

to = os.path.normpath(args.to)
if os.path.exists(to) and not (os.path.isdir(to) and (args.force or not os.listdir(to))):
    fail(f"{to} exists and is not " + ("empty (--force replaces it)" if os.path.isdir(to) else "a directory"))
try:
    ck = load_trained(args.out_dir, "cpu")
    model_args, spec = ck["base"]["model_args"], ck["base"]["tokenizer"]
    pref = parse_pref(args.pref, ck["objectives"])
    model, _ = policy_at(ck["base"], ck, pref.tolist(), "cpu")
    merge(model)  # W0 + Delta W(lambda); the adapters' own factors are then left out
    sd = {k.replace(".base.", "."): v.to(getattr(torch, args.dtype))
          for k, v in model.state_dict().items() if ".lora_" not in k}
    tok = load_tokenizer(spec)
    if "hf" in spec:
        config, files = hf.source_files(spec["hf"], model_args)
    elif "gguf" in spec:
        config, files = hf.gguf_files(tok, model_args)
    else:
        config, files = hf.gpt2_files(tok, model_args)
    files.setdefault("generation_config.json", dict(eos_token_id=tok.eot, pad_token_id=tok.eot))
    config["dtype"] = config["torch_dtype"] = args.dtype  # (transformers 5 reads dtype, 4 torch_dtype)
    hf.write_dir(to, config, hf.hf_weights(sd, model_args), files, args.force)
except (ValueError, ImportError, OSError) as e:
    fail(e)
print(f"wrote {to}: {config['architectures'][0]} at preference " +
      ", ".join(f"{o} {x:.3f}" for o, x in zip(ck["objectives"], pref.tolist())))
