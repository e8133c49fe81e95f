#!/usr/bin/env bash
# Reproduce every shipped checkpoint on CPU with fixed seeds (about 20 minutes on 2 cores):
#   bash scripts/train_teachers.sh [edm|toy2d|classifiers ...]     (default: all three)
#   bash scripts/train_teachers.sh patch-features patches          (the patches testbed: its two feature nets, then
#                                                                   its teacher, 15,000 steps at about 0.2 s each on
#                                                                   2 uncontended cores: about 50 min)
#   bash scripts/train_teachers.sh patches8                        (PaGoDA's 8x8 teacher on the same patches, 4x4 means)
#   bash scripts/train_teachers.sh t2i                             (the text-to-image teachers: t2i-vae, then sd-tiny and
#                                                                   sd3-tiny on its latents; optimize.methods.t2i_teacher;
#                                                                   times in checkpoints/*-tiny/training.json)
# The t2i targets continue a killed run from its last checkpoint (resume=<run folder>) when one is there.
# A killed teacher run resumes with: python -m optimize teacher model=edm resume=outputs/teacher/edm
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
resume_of() { if [ -f "$1/lightning/last.ckpt" ]; then echo "resume=$1"; fi; }
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
      # captioned digits: the VAE (outputs/t2i_teacher/vae/vae), then the two pipelines that share it
      t2i) bash "$0" t2i-vae sd-tiny sd3-tiny ;;
      t2i-vae) $PY -m optimize t2i_teacher stage=vae hydra.run.dir=outputs/t2i_teacher/vae $(resume_of outputs/t2i_teacher/vae) ;;
      sd-tiny) $PY -m optimize t2i_teacher stage=sd export_dir=checkpoints/sd-tiny hydra.run.dir=outputs/t2i_teacher/sd $(resume_of outputs/t2i_teacher/sd) ;;
      sd3-tiny) $PY -m optimize t2i_teacher stage=sd3 export_dir=checkpoints/sd3-tiny hydra.run.dir=outputs/t2i_teacher/sd3 $(resume_of outputs/t2i_teacher/sd3) ;;
      *) echo "error: unknown target '$w'; valid: classifiers edm toy2d shapes patches patches8 patch-features t2i t2i-vae sd-tiny sd3-tiny." >&2; exit 2 ;;
    esac
  done
done
