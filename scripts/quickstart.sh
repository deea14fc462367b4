#!/usr/bin/env bash
# CPU quickstart on real data (about 10 minutes on 2 cores): the 1,797 handwritten UCI digits
# bundled in datasets/digits/ (CC BY 4.0, via scikit-learn) become 16x16 labelled PNGs; the
# standard scripts then train a small class-conditional diffusion model and a noisy classifier,
# and sample digits without guidance (image_sample.py) and with classifier guidance
# (classifier_sample.py). Everything lands in $OUT (default runs/quickstart):
#
#   $OUT/data/{train,val}/          the digits as {label}_{index}.png
#   $OUT/diffusion/                 model/ema_/opt{step}.pt, args.json, log.txt, progress.csv
#   $OUT/classifier/                model/opt{step}.pt, progress.csv (train/val accuracy)
#   $OUT/samples/samples_100x16x16x3.{npz,png}   class-conditional samples (grid sorted by label)
#   $OUT/guided/samples_100x16x16x3.{npz,png}    the same, guided by the classifier
#
# Run from anywhere: bash scripts/quickstart.sh   (STEPS=..., OUT=..., PYTHON=... override)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-2500}            # diffusion training steps (lr decays linearly to 0 over them)
CLS_STEPS=${CLS_STEPS:-500}     # classifier training steps
NUM_SAMPLES=${NUM_SAMPLES:-100}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One math thread: these tiny convolutions barely speed up with two, and a second spinning thread
# slows everything down badly when the machine is busy; the data loader uses the other core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# One set of flags per network, shared by its training and sampling commands (they must match).
# 16 px U-Net: 32 channels, levels 16/8/4 px, attention at 4 px; labels dropped 10% of the time
# in training (--class_dropout_prob) so the same model also serves classifier-free guidance.
MODEL_FLAGS="--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2
  --attention_resolutions 4 --num_head_channels 32 --class_cond True --num_classes 10
  --class_dropout_prob 0.1"
# The cosine schedule (Nichol & Dhariwal 2021) suits small images better than the linear one.
# The model predicts x_0 (--predict_xstart): after a few minutes of training an eps-predicting
# model still gets x_0 wrong at high noise, where x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
# amplifies its errors, and the samples come out in random colour casts; predicting x_0 directly
# gives clean grey digits in the same time.
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine --predict_xstart True"
CLASSIFIER_FLAGS="--image_size 16 --classifier_width 32 --classifier_depth 1
  --classifier_channel_mult 1,2,2 --classifier_attention_resolutions 4 --num_classes 10"
# 100 respaced DDPM steps instead of 1000 (Nichol & Dhariwal 2021, sec. 4): 10x faster sampling.
SAMPLE_FLAGS="--timestep_respacing 100 --num_samples $NUM_SAMPLES --batch_size $NUM_SAMPLES --seed 0"

step() { echo; echo "== $* ($(date +%T))"; }

if ! "$PYTHON" -c "import torch, PIL, blobfile, guided_diffusion" 2>/dev/null; then
  echo "error: $PYTHON cannot import torch/pillow/blobfile/guided_diffusion: activate the" \
    "environment first (see README), or set PYTHON=path/to/python" >&2
  exit 1
fi

step "1/5 digits -> $OUT/data"
"$PYTHON" datasets/digits.py --out_dir "$OUT/data" --image_size 16

step "2/5 train the diffusion model ($STEPS steps)"
# No random flips: a mirrored 2 or 7 is not a digit.
"$PYTHON" scripts/image_train.py $MODEL_FLAGS $DIFFUSION_FLAGS --data_dir "$OUT/data/train" \
  --batch_size 32 --lr 1e-3 --lr_anneal_steps "$STEPS" --ema_rate 0.995 --random_flip False \
  --save_interval "$STEPS" --log_interval 250 --seed 0 --output_dir "$OUT/diffusion" \
  --resume_checkpoint auto  # a rerun continues (or, finished, does nothing), never overwrites

step "3/5 train the noisy classifier ($CLS_STEPS steps)"
"$PYTHON" scripts/classifier_train.py $CLASSIFIER_FLAGS $DIFFUSION_FLAGS \
  --data_dir "$OUT/data/train" --val_data_dir "$OUT/data/val" --batch_size 64 --lr 1e-3 \
  --anneal_lr True --iterations "$CLS_STEPS" --random_flip False --log_interval 100 \
  --eval_interval 50 --save_interval "$CLS_STEPS" --seed 0 --output_dir "$OUT/classifier" \
  --resume_checkpoint auto

EMA=$(printf "%s/diffusion/ema_0.995_%06d.pt" "$OUT" "$STEPS")
CLASSIFIER=$(printf "%s/classifier/model%06d.pt" "$OUT" "$CLS_STEPS")

step "4/5 sample without guidance"
"$PYTHON" scripts/image_sample.py $MODEL_FLAGS $DIFFUSION_FLAGS $SAMPLE_FLAGS \
  --model_path "$EMA" --output_dir "$OUT/samples"

step "5/5 sample with classifier guidance"
"$PYTHON" scripts/classifier_sample.py $MODEL_FLAGS $DIFFUSION_FLAGS $CLASSIFIER_FLAGS \
  $SAMPLE_FLAGS --classifier_scale 4.0 --model_path "$EMA" --classifier_path "$CLASSIFIER" \
  --output_dir "$OUT/guided"

step "done"
ls -l "$OUT"/samples/samples_* "$OUT"/guided/samples_*
