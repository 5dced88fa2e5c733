#!/usr/bin/env bash
# A separate virtual environment in which OpenFlamingo 2.0.1 itself runs (for make_fixture.py).
#
# OpenFlamingo does not run on transformers 5 (FlamingoLMMixin.forward fails with "missing 1 required
# positional argument: 'attention_mask'") and pins torch 2.0.1, which is no longer installable. It runs
# with the versions below; open-flamingo itself is installed with --no-deps so its pins are ignored.
#
# usage: scripts/openflamingo/make_env.sh [ENV_DIR]   (default: .venv-openflamingo)
set -euo pipefail
env_dir="${1:-.venv-openflamingo}"
python3 -m venv "$env_dir"
pip="$env_dir/bin/pip"
"$pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$pip" install -q "transformers<4.47" open_clip_torch einops einops-exts sentencepiece safetensors
"$pip" install -q --no-deps "open-flamingo==2.0.1"
"$env_dir/bin/python" -c "import open_flamingo, open_clip, transformers, torch; print('OpenFlamingo env ready:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'open_clip', open_clip.__version__)"
