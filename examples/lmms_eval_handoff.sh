#!/usr/bin/env bash
# Hand a misp merged export to lmms-eval, offline, end to end (docs/evaluation.md, "Handing off to lmms-eval").
#
#   examples/lmms_eval_handoff.sh [WORK_DIR] [FAMILY] [LIMIT]
#     WORK_DIR  where everything is written (default runs/lmms-handoff)
#     FAMILY    llava15 (lmms-eval model llava_hf) or qwen25vl (lmms-eval model qwen2_5_vl); default llava15
#     LIMIT     questions lmms-eval answers (default 4)
#
# Environment: MISP_PYTHON, the Python with misp installed (default: python);
#              LMMS_EVAL_PYTHON, the Python of a SEPARATE virtualenv with lmms-eval (default /tmp/lmms-venv/bin/python).
# It builds a tiny random-weight model and a LoRA checkpoint of it (examples/lmms_eval_prepare.py), exports it with
# `misp export --merge`, and runs lmms-eval's POPE scoring on a local parquet (docs/lmms_eval/misp_pope_local.yaml).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-runs/lmms-handoff}"
family="${2:-llava15}"
limit="${3:-4}"
misp_python="${MISP_PYTHON:-python}"
lmms_python="${LMMS_EVAL_PYTHON:-/tmp/lmms-venv/bin/python}"
case "$family" in
  llava15) lmms_model=llava_hf; model_args="" ;;
  qwen25vl) lmms_model=qwen2_5_vl; model_args=",attn_implementation=sdpa" ;;
  *) echo "lmms_eval_handoff.sh: FAMILY must be llava15 or qwen25vl, not '$family'" >&2; exit 2 ;;
esac
mkdir -p "$work"
work="$(cd "$work" && pwd)"

"$misp_python" "$here/examples/lmms_eval_prepare.py" --out "$work" --family "$family"
"$misp_python" -m misp.cli export --ckpt_path "$work/last.ckpt" --out "$work/merged" --merge true

# lmms-eval pulls in `kernels`, which fetches kernels from the hub: keep it off; nothing may touch the network.
export USE_HUB_KERNELS=NO HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="$work/hf_home"  # the datasets cache of the parquet task stays inside WORK_DIR
cd "$work"  # the task's data_files (pope/test.parquet) is relative to here
"$lmms_python" -m lmms_eval --model "$lmms_model" \
    --model_args "pretrained=$work/merged,device_map=cpu$model_args" \
    --tasks misp_pope_local --include_path "$here/docs/lmms_eval" \
    --batch_size 1 --limit "$limit" --device cpu --log_samples --output_path "$work/lmms-eval"
