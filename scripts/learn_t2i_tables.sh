#!/usr/bin/env bash
# The learned peers' tables behind docs/results-t2i.md, for one tiny text-to-image teacher (default sd-tiny):
# OSS (one search gives every NFE) and LD3 per NFE, on the TRAINING prompts at guidance 7.5, copied to
# docs/results/t2i/tables/<teacher>-<method>-nfe<N>.safetensors. Both are deterministic: a rerun gives the same tables.
#   bash scripts/learn_t2i_tables.sh [sd-tiny|sd3-tiny] [NFE ...]
# (sd3-tiny's OSS tables at NFE 3 and 10 came from `python -m optimize oss model=sd3-tiny nfe=[3,10] evaluate=false`;
#  the committed sd-tiny tables were made with model=diffusers model.path=checkpoints/sd-tiny
#  model.prompts=conf/prompts/captioned-train.txt model.guidance=7.5, the same model as model=sd-tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
teacher=${1:-sd-tiny}; shift || true
nfes=("${@:-4 5 6 8}"); nfes=(${nfes[@]})
py=${PYTHON:-.venv/bin/python}
runs=outputs/learn-t2i/$teacher; dest=docs/results/t2i/tables; mkdir -p "$dest"
list=$(IFS=,; echo "${nfes[*]}")
teacher_args=()  # the flow teacher's LD3 matches the stock 50-step FlowMatchEuler solve (docs/methods/best.md)
[ "$teacher" = sd3-tiny ] && teacher_args=(teacher_solver=euler teacher_nfe=50 teacher_grid=native)
"$py" -m optimize oss model="$teacher" "nfe=[$list]" evaluate=false hydra.run.dir="$runs/oss"
for n in "${nfes[@]}"; do
  cp "$runs/oss/oss-$teacher-nfe$n.safetensors" "$dest/$teacher-oss-nfe$n.safetensors"
  "$py" -m optimize ld3 model="$teacher" nfe="$n" "${teacher_args[@]}" evaluate=false hydra.run.dir="$runs/ld3-nfe$n"
  cp "$runs/ld3-nfe$n/ld3-unipc-$teacher-nfe$n.safetensors" "$dest/$teacher-ld3-nfe$n.safetensors"
done
