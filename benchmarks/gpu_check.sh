#!/usr/bin/env bash
# The CUDA checks, as one script for a session lent a GPU machine (the device tool's `run`).
#
#   1. the machine: nvidia-smi, the versions of python, torch, transformers, peft,
#      bitsandbytes and tensorly;
#   2. wheels in .whl (bitsandbytes: the GPU machine has none) installed to /tmp/site;
#   3. tests/test_cuda.py (every check on the GPU);
#   4. benchmarks/layer_vs_lora.py --device cuda (the full grid, 3 rounds a case);
#   5. benchmarks/model_step.py (a 4-layer LLaMA's training step: DoTA, LoRA, frozen),
#      on CUDA also with 8 x 2048 tokens a step;
#   6. the device-independent adapt tests (the machine's own torch and transformers);
#   7. benchmarks/quant_error.py on the GPU (QLoRA/QPiSSA/QDoTA errors and memory on the
#      demo's model), if bitsandbytes imports;
#   8. benchmarks/model_step.py --compile on CUDA (every model torch.compile'd);
#   9. benchmarks/decompose_vs_tensorly.py --quick, a CPU benchmark, if tensorly imports.
#
# Every step has its own time limit, cut to what is left of GPU_CHECK_BUDGET seconds
# (default 540, inside the device tool's 10 minutes a command), and the steps after a
# failed one still run. Everything printed goes to $OUT/gpu_check.log, the benchmarks'
# results to $OUT/*.json (8 files in all, the device tool's limit; the tensorly benchmark's
# tables are in the log only); $OUT is the device tool's output folder, gpu_out/ in the
# repository elsewhere. Without CUDA layer_vs_lora.py is skipped and test_cuda.py skips
# itself, so the script can be tried on any machine; MPO_TEST_DEVICE=cpu then runs
# test_cuda.py's checks on the cpu.
#
# bitsandbytes travels as a wheel: download its manylinux x86-64 wheel for Python 3.12
# into .whl (0.50.2's, py3-none-manylinux_2_24_x86_64, is 43 MB; .gitignore keeps .whl
# out of git) and name .whl in the run's carry.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   PYTHON=.venv/bin/python LAYER_ARGS="--quick" bash benchmarks/gpu_check.sh
#
# PYTHON (default python3), LAYER_ARGS (default "--repeats 3") and DECOMPOSE_ARGS
# (default "--quick") override the interpreter and the benchmarks' arguments.

set -uo pipefail
export PYTHONUNBUFFERED=1

PYTHON=${PYTHON:-python3}
[[ -n ${OUT:-} ]] && OUT=$(realpath -m "$OUT")  # a relative one names a folder from here
BUDGET=${GPU_CHECK_BUDGET:-540}
LAYER_ARGS=${LAYER_ARGS:---repeats 3}
DECOMPOSE_ARGS=${DECOMPOSE_ARGS:---quick}
FAILED=()

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT" || exit 1

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget
# is nearly spent); a failure or a timeout is recorded and the script goes on.
step() {
    local name=$1 limit=$2 left rc start=$SECONDS
    shift 2
    left=$((BUDGET - SECONDS))
    if ((left < 10)); then
        echo "== $name: SKIPPED, the budget of ${BUDGET} s is spent"
        FAILED+=("$name (no time left)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo  # a killed command may leave its last line unfinished
        echo "== $name: TIMED OUT after ${limit} s"
        FAILED+=("$name (timed out)")
    elif ((rc != 0)); then
        echo "== $name: FAILED (exit status $rc, $((SECONDS - start)) s)"
        FAILED+=("$name (exit status $rc)")
    else
        echo "== $name: ok ($((SECONDS - start)) s)"
    fi
    echo
}

imports() {
    "$PYTHON" -c "import $1" >/dev/null 2>&1
}

main() {
    echo "== gpu_check.sh in $(pwd) at $(date -u +%FT%TZ); output in $OUT"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
    fi

    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing the wheels in .whl to /tmp/site: $(ls .whl)"
        if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "== installing the wheels FAILED; going on without them"
            FAILED+=("wheels")
        fi
    fi
    export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

    "$PYTHON" - <<'EOF'
import importlib
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
else:
    print("device: no CUDA device visible to torch")
for name in ("transformers", "peft", "bitsandbytes", "tensorly"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # a broken install must not stop the check
        print(f"{name}: not importable ({type(err).__name__}: {err})")
EOF
    echo

    step "tests/test_cuda.py" 180 \
        "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py

    local device=cpu
    "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && device=cuda
    if [[ $device == cuda ]]; then
        # shellcheck disable=SC2086  # LAYER_ARGS holds several arguments
        step "benchmarks/layer_vs_lora.py" 300 \
            "$PYTHON" benchmarks/layer_vs_lora.py --device cuda $LAYER_ARGS \
            --out "$OUT/layer_vs_lora.json"
    else
        echo "== benchmarks/layer_vs_lora.py: SKIPPED, torch sees no CUDA device"
        echo
    fi

    step "benchmarks/model_step.py" 150 \
        "$PYTHON" benchmarks/model_step.py --device "$device" --out "$OUT/model_step.json"
    if [[ $device == cuda ]]; then  # how much of the host's time a larger batch hides
        step "benchmarks/model_step.py --batch 8 2048" 150 \
            "$PYTHON" benchmarks/model_step.py --device cuda --batch 8 2048 \
            --out "$OUT/model_step_8x2048.json"
    fi

    step "device-independent adapt tests" 150 \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_adapt_layer.py \
        tests/test_adapt_training.py

    if imports bitsandbytes; then
        step "benchmarks/quant_error.py" 120 \
            "$PYTHON" benchmarks/quant_error.py --device "$device" --out "$OUT/quant_error"
    else
        echo "== benchmarks/quant_error.py: SKIPPED, bitsandbytes does not import"
        echo
    fi

    if [[ $device == cuda ]]; then  # inductor: does compiling hide the host's time?
        step "benchmarks/model_step.py --compile" 200 \
            "$PYTHON" benchmarks/model_step.py --device cuda --compile \
            --out "$OUT/model_step_compiled.json"
    fi

    if imports tensorly; then
        # shellcheck disable=SC2086  # DECOMPOSE_ARGS holds several arguments
        step "benchmarks/decompose_vs_tensorly.py" 240 \
            "$PYTHON" benchmarks/decompose_vs_tensorly.py $DECOMPOSE_ARGS
    else
        echo "== benchmarks/decompose_vs_tensorly.py: SKIPPED, tensorly does not import" \
            "(carry its wheel in .whl to run it)"
        echo
    fi

    echo "== done in ${SECONDS} s"
    if ((${#FAILED[@]})); then
        printf '== FAILED: %s\n' "${FAILED[@]}"
        return 1
    fi
    echo "== every step passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
