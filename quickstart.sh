#!/usr/bin/env bash
# The quickstart: install what is missing, build the embedded tiny SD1-architecture model and a small
# generated dataset (if absent), train a LoRA on them for 60 steps, write the LoRA, the resolved config
# and sample images to quickstart/output/. About a minute on a 2-core CPU.
#
#   bash quickstart.sh                       # extra arguments go to train_network.py, e.g. --set train.max_train_steps=100
#   QUICKSTART_DIR=/tmp/qs bash quickstart.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DIR=${QUICKSTART_DIR:-quickstart}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install torch==2.13.0
fi
if ! "$PY" -c "import diffusers, transformers, accelerate, peft, bitsandbytes, safetensors, toml, pytest" 2>/dev/null; then
    "$PY" -m pip install -e ".[test]"
fi
[ -d "$DIR/tiny-sd1" ] || "$PY" -m library.tiny sd1 "$DIR/tiny-sd1"
[ -d "$DIR/data" ] || "$PY" -m library.tiny data "$DIR/data"

"$PY" train_network.py --config configs/quickstart.toml \
    --set model.pretrained_model_name_or_path="\"$DIR/tiny-sd1\"" \
    --set dataset.train_data_dir="\"$DIR/data\"" \
    --set train.output_dir="\"$DIR/output\"" "$@"
