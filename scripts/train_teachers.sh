#!/usr/bin/env bash
# Reproduce every shipped checkpoint on CPU with fixed seeds (about 20 minutes on 2 cores):
#   bash scripts/train_teachers.sh [edm|toy2d|classifiers ...]     (default: all three)
#   bash scripts/train_teachers.sh patch-features patches          (the patches testbed: its two feature nets, then
#                                                                   its teacher, 15,000 steps at about 0.2 s each on
#                                                                   2 uncontended cores: about 50 min)
#   bash scripts/train_teachers.sh patches8                        (PaGoDA's 8x8 teacher on the same patches, 4x4 means)
# A killed teacher run resumes with: python -m optimize teacher model=edm resume=outputs/teacher/edm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for what in "${@:-classifiers edm toy2d}"; do
  for w in $what; do
    case "$w" in
      classifiers) $PY scripts/train_classifiers.py ;;
      edm)   $PY -m optimize teacher model=edm export=checkpoints/edm-digits.safetensors hydra.run.dir=outputs/teacher/edm ;;
      toy2d) $PY -m optimize teacher model=toy2d export=checkpoints/edm-toy2d.safetensors hydra.run.dir=outputs/teacher/toy2d ;;
      shapes) $PY -m optimize teacher model=shapes export=checkpoints/edm-shapes.safetensors hydra.run.dir=outputs/teacher/shapes ;;
      # torch's default threads (both cores); on a machine shared with other jobs OMP_NUM_THREADS=1 is faster
      patches) $PY -m optimize teacher model=patches export=checkpoints/edm-patches.safetensors hydra.run.dir=outputs/teacher/patches ;;
      # PaGoDA's 8x8 teacher (8,000 steps, about 14 min on one thread)
      patches8) OMP_NUM_THREADS=1 $PY -m optimize teacher model=patches8 export=checkpoints/edm-patches8.safetensors hydra.run.dir=outputs/teacher/patches8 ;;
      patch-features) OMP_NUM_THREADS=1 $PY scripts/train_classifiers.py patches ;;
      *) echo "error: unknown target '$w'; valid: classifiers edm toy2d shapes patches patches8 patch-features." >&2; exit 2 ;;
    esac
  done
done
