#!/bin/bash
# Issue 23's ship checklist for a demo teacher, one step after another with a log (hours on 2 CPU
# threads: run it in the background with no trainer beside it, or the timings are noise):
#   setsid nohup bash bench/ship_demo.sh TEACHER_DIR [STEPS] > build/ship.log 2>&1 < /dev/null &
# TEACHER_DIR: a folder the demo trainer saved (`... --stages save --weights DIR` with the run's own
# options). STEPS (default: all, in this order; any subset, comma separated):
#   quality   bench/demo_quality.py on the teacher, 40 steps (the must-shows, ~10 min)
#   distill   the 4-step student (qwen-image-edge distill, the shipped student's settings, ~30 min)
#   student   bench/demo_quality.py on the student, 4 steps (within 5 points of the teacher?)
#   install   teacher -> qwen_image2_ref/demo/weights, student's transformer, scheduler and
#             model_index.json -> qwen_image2_ref/demo/student (its vae, text_encoder and processor
#             stay links to ../weights: the shared parts are not copied)
#   floors    bench/adherence_floors.py on the shipped teacher and student (test floors)
#   bench     bench/quant.py, bench/distill.py and bench/footprint.py on the shipped folders
#   grid      the 16-prompt grid (8 held-out prompts with and without a background phrase)
# Each step writes build/ship/<step>.txt; a failing step stops the script (set -e). Nothing is
# committed: read the figures, then set the floors and the README by hand.
set -euo pipefail
TEACHER=${1:?usage: bash bench/ship_demo.sh TEACHER_DIR [quality,distill,student,install,floors,bench,grid]}
STEPS=${2:-quality,distill,student,install,floors,bench,grid}
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/qwen-image-edge}
W=build/ship
STUDENT=$W/distill/student
mkdir -p "$W"
[ -f "$TEACHER/model_index.json" ] || { echo "ship: $TEACHER is not a model folder (no model_index.json)" >&2; exit 2; }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
export OMP_NUM_THREADS=2

# reading MODEL STEPS NAME: the must-shows (64 held-out prompts, 160 edits) into $W/NAME.txt
reading() {
  stamp "$3: bench/demo_quality.py at $2 steps"
  $PY bench/demo_quality.py --model "$1" --n 64 --edits 160 --steps "$2" --threads 2 --json "$W/$3.json" | tee "$W/$3.txt"
}

if want quality; then reading "$TEACHER" 40 quality; fi
if want distill; then
  stamp "distill the 4-step student"
  $CLI distill --teacher "$TEACHER" --steps 4,8 --out $W/distill --iters 1500 --pool 512 --edits 128 \
    --threads 2 --no-progress | tee $W/distill.txt
fi
if want student; then reading "$STUDENT" 4 student; fi
if want install; then
  stamp "install teacher and student into the package"
  D=qwen_image2_ref/demo
  for sub in transformer vae text_encoder processor scheduler; do
    rm -rf "$D/weights/$sub" && cp -r "$TEACHER/$sub" "$D/weights/$sub"
  done
  cp "$TEACHER/model_index.json" "$D/weights/model_index.json"
  for sub in transformer scheduler; do rm -rf "$D/student/$sub" && cp -r "$STUDENT/$sub" "$D/student/$sub"; done
  cp "$STUDENT/model_index.json" "$D/student/model_index.json"
  for sub in vae text_encoder processor; do
    [ -L "$D/student/$sub" ] || { echo "ship: $D/student/$sub should be a link to ../weights/$sub" >&2; exit 1; }
  done
  git status --short -- "$D" | tee $W/install.txt
fi
if want floors; then
  stamp "adherence floors"
  { $PY bench/adherence_floors.py --model demo --steps 20 --sets 4 --noise latents --style v2 --threads 2
    $PY bench/adherence_floors.py --model demo-4step --sets 4 --noise seed --style v2 --threads 2; } | tee $W/floors.txt
fi
if want bench; then
  stamp "quant, distill and footprint tables"
  $PY -m bench.quant --threads 2 | tee $W/quant.txt
  $PY bench/distill.py --threads 2 | tee $W/distill_bench.txt
  $PY bench/footprint.py --threads 2 | tee $W/footprint.txt
fi
if want grid; then
  stamp "16-prompt grid"
  $PY bench/demo_quality.py --model demo --n 8 --tasks t2i,t2i-nb --steps 40 --grid $W/grid.png --threads 2 | tee $W/grid.txt
fi
stamp "done: figures in $W"
