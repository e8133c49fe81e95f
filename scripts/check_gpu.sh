#!/usr/bin/env bash
# GPU readiness check (issue 16), about 2-4 minutes on one CUDA GPU:
#   1. executor time vs the same N bare network forwards (ratio), digits teacher, batch 4096, NFE 10
#   2. float32 samples on GPU vs CPU from the same seeds (max |difference|), digits teacher and a diffusers UNet2DModel
#   3. a short DDSS fit on CUDA (Lightning, accelerator=gpu) and an IIA fit on CUDA
#   4. `samplers generate` under torchrun with the NCCL backend (one rank per GPU, at most 2), byte-compared with a
#      single-process run
#   5. text-to-image: the stock StableDiffusionPipeline with TableScheduler vs samplers.sample on the latent denoiser,
#      guidance 7.5 (checkpoints/sd-tiny, else a random tiny pipeline), generate --prompt, optimize evaluate and a short
#      LD3 fit on the pipeline
# Usage: bash scripts/check_gpu.sh [OUT_DIR]     (PYTHON=... to pick the interpreter; default .venv/bin/python)
# Without a CUDA device it stops at once with one error line and exit code 2.
# CHECK_GPU_DRY_RUN=1 runs the same steps on the CPU (gloo, small batch) to test this script on a machine without GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEV=cuda; ACC=gpu; T=240; BATCH=4096; REPS=7; DDSS="steps=40 batch_size=256 val_every=20 n_val=500"; NFIT=512; NGEN=4096
if [ "${CHECK_GPU_DRY_RUN:-0}" = 1 ]; then
    DEV=cpu; ACC=cpu; BATCH=64; REPS=2; DDSS="steps=4 batch_size=16 val_every=2 n_val=32"; NFIT=32; NGEN=256; T=900
    echo "check_gpu: DRY RUN on the CPU (gloo instead of NCCL): tests the script, measures nothing about a GPU"
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
    echo "error: no CUDA device: scripts/check_gpu.sh needs a machine with an NVIDIA GPU and a CUDA build of torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo 'torch not importable'))." >&2
    exit 2
fi
OUT=${1:-$(mktemp -d /tmp/check_gpu.XXXXXX)}
mkdir -p "$OUT"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC=$(( NGPU >= 2 ? 2 : 1 ))
[ "$DEV" = cpu ] && NPROC=2
START=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - START )) s)"; }
echo "check_gpu: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "| torch", torch.__version__, "| cuda", torch.version.cuda)'), $NGPU GPU(s); output in $OUT"

step "1-2. executor vs bare forwards; float32 GPU vs CPU"
timeout $T "$PY" - "$OUT" "$DEV" "$BATCH" "$REPS" <<'EOF'
import os, sys, tempfile, time, warnings
import torch
warnings.filterwarnings("ignore")
from samplers import baselines, make_noise, sample
from samplers.nets import load_denoiser

out, dev, batch, reps = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
den = load_denoiser("checkpoints/edm-digits.safetensors", device=dev)
table = baselines.build("dpmpp_2m", 10, sigma_min=0.002, sigma_max=80.0)
noise = make_noise(table, (1, 8, 8), range(batch), device=dev)
sig = table.sigmas.to(dev, torch.float32)

def timed(fn):
    ts = []
    for _ in range(reps):
        sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]

with torch.no_grad():
    xs = []  # the real inputs of a solve, replayed for the bare forwards
    sample(table, den, noise, callback=lambda i, x, d, s: xs.append((x.clone(), s.clone())))
    sample(table, den, noise)  # warm-up
    bare = timed(lambda: [den(x, s) for x, s in xs])
    ex = timed(lambda: sample(table, den, noise))
print(f"executor vs bare forwards ({dev.type}, digits teacher, dpmpp_2m NFE 10, batch {batch}): sample {ex * 1e3:.2f} ms, "
      f"10 bare forwards {bare * 1e3:.2f} ms, ratio {ex / bare:.4f}")

with torch.no_grad():
    seeds = range(min(512, batch))
    n_cpu = make_noise(table, (1, 8, 8), seeds)
    den_cpu = load_denoiser("checkpoints/edm-digits.safetensors", device="cpu")
    a = sample(table, den_cpu, n_cpu)
    b = sample(table, den, n_cpu.to(dev)).cpu()
print(f"float32 {dev.type} vs CPU, digits teacher, {len(seeds)} samples: max |diff| {float((a - b).abs().max()):.3g} "
      f"(max |x| {float(a.abs().max()):.3g})")
try:
    from diffusers import DDPMScheduler, UNet2DModel
    from samplers.models import load_diffusers
    folder = "checkpoints/diffusers-digits"
    if not os.path.isdir(folder):
        folder = tempfile.mkdtemp()
        torch.manual_seed(0)
        UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(folder + "/unet")
        DDPMScheduler().save_pretrained(folder + "/scheduler")
    dc, dg = load_diffusers(folder, device="cpu"), load_diffusers(folder, device=dev)
    t2 = baselines.build("dpmpp_2m", 6, sigma_min=dc.sigma_min, sigma_max=dc.sigma_max)
    nz = make_noise(t2, (1, 8, 8), seeds)
    with torch.no_grad():
        a, b = sample(t2, dc, nz), sample(t2, dg, nz.to(dev)).cpu()
    print(f"float32 {dev.type} vs CPU, diffusers UNet2DModel ({folder}), {len(seeds)} samples: max |diff| {float((a - b).abs().max()):.3g} "
          f"(max |x| {float(a.abs().max()):.3g})")
except ImportError:
    print("diffusers not installed: skipped the UNet2DModel GPU/CPU comparison")
EOF

step "3a. DDSS on $DEV ($DDSS, NFE 4)"
timeout $T "$PY" -m optimize ddss model=edm nfe=4 $DDSS device=$DEV accelerator=$ACC \
    devices=1 evaluate_at_end=false progress_bar=false max_minutes=3 "hydra.run.dir=$OUT/ddss" 2>&1 | grep -E "^ddss|error" || { echo "error: DDSS on CUDA failed (log above)" >&2; exit 1; }

step "3b. IIA on $DEV (NFE 5, $NFIT noises)"
timeout $T "$PY" -m optimize iia model=edm nfe=5 n_fit=$NFIT device=$DEV evaluate=false "hydra.run.dir=$OUT/iia" 2>&1 | grep -E "^iia|^wrote|error" || { echo "error: IIA on CUDA failed" >&2; exit 1; }

step "4. generate under torchrun ($([ "$DEV" = cuda ] && echo NCCL || echo gloo)), $NPROC rank(s)"
timeout $T "$PY" -m samplers generate --solver dpmpp_2m --nfe 8 --model edm --n $NGEN --batch-size 512 --device $DEV \
    --no-progress --out "$OUT/gen1" > "$OUT/gen1.log" 2>&1 || { cat "$OUT/gen1.log"; echo "error: generate on CUDA failed" >&2; exit 1; }
TORCHRUN=$(dirname "$PY")/torchrun
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
timeout $T "$TORCHRUN" --standalone --nproc_per_node=$NPROC -m samplers generate --solver dpmpp_2m --nfe 8 --model edm \
    --num-samples $NGEN --batch-size 512 --device $DEV --no-progress --out "$OUT/genN" > "$OUT/genN.log" 2>&1 \
    || { cat "$OUT/genN.log"; echo "error: generate under torchrun (NCCL) failed" >&2; exit 1; }
"$PY" - "$OUT" "$NPROC" "$DEV" <<'EOF'
import sys
import numpy as np
out, nproc, dev = sys.argv[1], sys.argv[2], sys.argv[3]
a, b = np.load(f"{out}/gen1/samples.npz"), np.load(f"{out}/genN/samples.npz")
same = all(np.array_equal(a[k], b[k]) for k in ("samples", "seeds"))
print(f"generate: torchrun {'NCCL' if dev == 'cuda' else 'gloo'} with {nproc} rank(s) vs one process, {len(a['samples'])} "
      f"samples: {'byte-identical' if same else 'DIFFERENT'} (max |diff| {float(np.abs(a['samples'] - b['samples']).max()):.3g})")
sys.exit(0 if same else 1)
EOF
[ "$DEV" = cuda ] && echo "(samplers generate initialises torch.distributed with the NCCL backend on CUDA devices)"

step "5. text-to-image on $DEV: stock pipeline + TableScheduler vs the executor; generate --prompt; optimize evaluate"
SD=checkpoints/sd-tiny
if [ ! -f "$SD/model_index.json" ]; then
    SD="$OUT/sd-random"
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from tiny_t2i import save_tiny_sd; save_tiny_sd('$SD')" \
        || { echo "error: building a tiny text-to-image pipeline failed (diffusers and transformers installed?)" >&2; exit 1; }
fi
timeout $T "$PY" - "$SD" "$DEV" <<'EOF'
import sys, warnings
import torch
warnings.filterwarnings("ignore")
from diffusers import DiffusionPipeline
from samplers import baselines, sample
from samplers.diffusers_scheduler import TableScheduler
from samplers.t2i import load_t2i, prompt_indices

folder, dev = sys.argv[1], torch.device(sys.argv[2])
prompts = ["a red seven on a black background", "a blue two on a grass background"] * 4
den = load_t2i(folder, prompts, guidance=7.5, device=dev)
table = baselines.build("dpmpp_2m", 6, sigma_min=den.sigma_min, sigma_max=min(80.0, den.sigma_max))
e0 = torch.randn(len(prompts), *den.shape, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours = sample(table, den, e0[None].to(dev), prompt_indices(range(len(prompts)), len(prompts)).to(dev))
pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True).to(dev)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = TableScheduler.from_table(table, pipe.scheduler.config)
with torch.no_grad():
    stock = pipe(prompts, num_inference_steps=table.nfe, guidance_scale=7.5, latents=e0.to(dev), output_type="latent").images
rel = float((ours - stock).abs().max() / stock.abs().max())
print(f"text-to-image ({folder}, {dev.type}): stock StableDiffusionPipeline + TableScheduler vs samplers.sample, "
      f"guidance 7.5, dpmpp_2m NFE 6, {len(prompts)} prompts: max relative difference {rel:.3g}")
sys.exit(0 if rel < 1e-3 else 1)
EOF
timeout $T "$PY" -m samplers generate --solver dpmpp_2m --nfe 6 --model "diffusers:$SD" --prompt "a red seven on a black background" \
    --prompt "a blue two on a grass background" --guidance 7.5 --n 64 --device $DEV --no-progress --out "$OUT/gen-t2i" \
    > "$OUT/gen-t2i.log" 2>&1 || { cat "$OUT/gen-t2i.log"; echo "error: text-to-image generate on $DEV failed" >&2; exit 1; }
echo "generate --prompt on $DEV: $(ls "$OUT/gen-t2i/images" | wc -l) decoded PNGs in $OUT/gen-t2i"
timeout $T "$PY" -m optimize evaluate model=diffusers "model.path=$SD" "model.prompts=[a red seven on a black background]" \
    model.guidance=7.5 solver=dpmpp_2m nfe=6 n=64 ref_nfe=21 device=$DEV "hydra.run.dir=$OUT/eval-t2i" > "$OUT/eval-t2i.log" 2>&1 \
    || { cat "$OUT/eval-t2i.log"; echo "error: optimize evaluate of a text-to-image pipeline on $DEV failed" >&2; exit 1; }
tail -2 "$OUT/eval-t2i.log"
timeout $T "$PY" -m optimize ld3 model=diffusers "model.path=$SD" "model.prompts=[a red seven on a black background,a blue two on a grass background]" \
    model.guidance=7.5 nfe=4 n_train=16 n_valid=16 rounds_v1=1 rounds_v2=1 evaluate=false device=$DEV "hydra.run.dir=$OUT/ld3-t2i" \
    > "$OUT/ld3-t2i.log" 2>&1 || { cat "$OUT/ld3-t2i.log"; echo "error: LD3 on a text-to-image pipeline on $DEV failed" >&2; exit 1; }
grep -E "^wrote" "$OUT/ld3-t2i.log"

echo
echo "check_gpu: all checks ran in $(( $(date +%s) - START )) s"
