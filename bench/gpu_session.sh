#!/bin/bash
# One call on a lent GPU machine (the device tool): bench/gpu_check.py, then the demo v2 data + dit
# stages on the GPU until DEADLINE seconds, the dit checkpoint split into <=16 MB pieces under $OUT.
# The trainer's options are those of the current run (TRAIN_OPTS below: build/demo_v2h, README); a
# resumed run refuses other options, so change them here and in the README together.
# Prepare here first (the machine has torch/transformers/onnx but no modelopt and no network); the vae
# and encoder stages run on the CPU here first (the README command, or the kept
# qwen_image2_ref/demo/train_state/demo_v2h copied to build/demo_v2h; move that folder out of the tree for the call):
#   mkdir -p .carry/whl .carry/demo_v2 && echo /.carry/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .carry/whl nvidia-modelopt pydantic pydantic_core annotated-types \
#     typing-inspection PuLP omegaconf onnx-graphsurgeon      # strip pulp's 35 MB solverdir/cbc: 64 MiB limit
#   cp build/demo_v2h/{vae,encoder}.{safetensors,json} .carry/demo_v2/ && cp -r build/demo_v2h/tokenizer .carry/demo_v2/
#   cp bench/gpu_session.sh .carry/run.sh
# Then: device run, carry [".carry"], command "DEADLINE=530 bash .carry/run.sh". Every call re-sends the
# repo, so the namespace links below are made again in each one. Back here: cat ckpt_dit.part* >
# build/demo_v2h/ckpt_dit.safetensors and resume with the README's command (measured on an H200: data
# stage 230 s, then 32 ms per MMDiT step).
# A dit checkpoint (64 MB) cannot travel to continue a run: with the tracked tree (about 39 MB) it is over
# the 64 MiB a call carries. So a GPU sitting trains the dit stage from step 0 on the carried vae and
# encoder (about 16,000 steps in a 530 s call); its checkpoint comes back in four pieces and continues
# here on the CPU (a dit checkpoint resumes on any device, the numbers differing in the last bits).
set -u
TRAIN_OPTS=${TRAIN_OPTS:---vae-steps 2500 --encoder-steps 8000 --encoder-token-loss 1 --encoder-edit-loss 1 --encoder-lr 2e-3 --dit-steps 40000 --edit-weight recolor/2=8 --edit-weight remove_object/2=2 --guidance 4}
PY=${PY:-python3}; DEADLINE=${DEADLINE:-540}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || echo "wheel install failed"
for d in runtime export calib distill; do [ -e qwen_image_edge/$d ] || ln -s "$PWD/$d" qwen_image_edge/$d; done
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
C=$OUT/gpu_check.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > $C 2>&1
$PY -c "import torch, transformers, onnxruntime, modelopt; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ort', onnxruntime.__version__, 'modelopt', modelopt.__version__)" >> $C 2>&1
echo "[t=$(el)] step part alone" >> $C
timeout 150 $PY bench/gpu_check.py --parts step ${GPU_ARGS:-} >> $C 2>&1
echo "[t=$(el)] training starts (data, dit) in the background" >> $C
rm -rf /tmp/dv2 && mkdir -p /tmp/dv2 && cp -r .carry/demo_v2/* /tmp/dv2/
RESUME=""; [ -f /tmp/dv2/ckpt_dit.safetensors ] && RESUME=--resume
$PY -m qwen_image2_ref.demo.train --out /tmp/dv2 --stages data,dit --device ${TRAIN_DEVICE:-cuda} --threads 4 \
  $TRAIN_OPTS --checkpoint-minutes 2 --no-progress $RESUME > $OUT/train.log 2>&1 &
TP=$!
echo "[t=$(el)] calibrate + generate parts (while the trainer runs)" >> $C
timeout 240 $PY bench/gpu_check.py --parts calibrate generate ${GPU_ARGS:-} >> $C 2>&1
echo "[t=$(el)] gpu_check done" >> $C
while kill -0 $TP 2>/dev/null && [ $(el) -lt $DEADLINE ]; do sleep 2; done
if kill -0 $TP 2>/dev/null; then kill -TERM $TP; fi
for i in $(seq 60); do kill -0 $TP 2>/dev/null || break; sleep 1; done
wait $TP; echo "[t=$(el)] trainer exit $?" >> $C
nvidia-smi --query-gpu=memory.used --format=csv >> $C 2>&1
cp /tmp/dv2/data.json $OUT/ 2>/dev/null
[ -f /tmp/dv2/ckpt_dit.safetensors ] && split -b 16000000 -d /tmp/dv2/ckpt_dit.safetensors $OUT/ckpt_dit.part && sha256sum /tmp/dv2/ckpt_dit.safetensors >> $C
ls -la $OUT >> $C
echo "[t=$(el)] end" >> $C
