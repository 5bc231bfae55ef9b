#!/usr/bin/env bash
# Run the whole test suite (unit, kernels, integration with the real default models).
# Needs scripts/install.sh to have run once. Extra arguments go to pytest (e.g. -m "not slow").
#   bash scripts/test.sh --extended [pytest args]   the extended set instead: long whole-system runs
#       (fault injection, chaos, flood, soak, the Node client and omnistream watch end to end; ~8 min),
#       which the default run (the README's and CI's) leaves out to stay under 15 minutes.
#   bash scripts/test.sh --latest [pytest args]   drift check before refreshing the lock: build a
#       throwaway environment from the newest releases within pyproject.toml's ranges, print which
#       packages differ from requirements/lock.txt, run the fast suite (-m "not slow") in it.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=.venv/bin/python
MARK=(-m "not extended")
if [ "${1:-}" = "--extended" ]; then
  shift
  MARK=(-m extended)
elif [ "${1:-}" = "--latest" ]; then
  shift
  VENV=${OMNISTREAM_LATEST_VENV:-/tmp/omnistream-latest}
  rm -rf "$VENV" && python3.11 -m venv "$VENV"
  PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
  echo "== drift check: the newest releases within pyproject.toml's ranges, in $VENV"
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[llm,dev,detectors,demo]"
  "${PIP[@]}" --upgrade --no-deps "rapidocr-onnxruntime>=1.4"
  echo "== packages that differ from requirements/lock.txt (locked -> newest)"
  "$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import distributions

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = {}
for line in open("requirements/lock.txt"):
    if "==" in line and not line.startswith("#"):
        name, version = line.split(";")[0].strip().split("==")
        locked[norm(name)] = version
now = {norm(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}
now.pop("omnistream", None)
rows = [(n, locked.get(n, "-"), now.get(n, "-")) for n in sorted(set(locked) | set(now))
        if locked.get(n) != now.get(n) and n not in ("pip", "setuptools", "wheel")]
for name, old, new in rows:
    print(f"   {name:32} {old:>16} -> {new}")
print(f"   {len(rows)} of {len(locked)} locked packages differ" if rows else "   none: the lock is current")
PY
  PY=$VENV/bin/python
  MARK=(-m "not slow and not extended")
fi
# -P: the repository root (the omnistream package's own folder, which holds kernels/, a name the
# Hugging Face package transformers imports also has) is not put on sys.path; the tests import the
# installed omnistream and their helpers by relative imports.
exec "$PY" -P -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 "${MARK[@]}" tests "$@"
