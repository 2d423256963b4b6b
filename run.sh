#!/usr/bin/env bash
# The project's two commands (see README):
#   bash run.sh         set up, then run the main job (its report lands in build/)
#   bash run.sh test    set up, then run the test suite
#   bash run.sh lab     set up, then open the notebooks in JupyterLab
# Set-up: Debian packages (when root or passwordless sudo is there), a .venv
# with the project and its extras. Re-running skips what is done. Nothing
# here edits a tracked file.
set -euo pipefail
cd "$(dirname "$0")"

# setup_apt LIST WHAT: install the Debian packages named in LIST (one file,
# whitespace-separated) that are missing; WHAT says what they are for.
setup_apt() {
  local missing=()
  for p in $(cat "$1"); do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "note: not root; install $2 with: sudo apt-get install ${missing[*]}" >&2; return 0; fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "note: no apt-get here; $2 (${missing[*]}) are Debian packages" >&2; return 0
  fi
  echo "== apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "note: apt-get could not install ${missing[*]} ($2)" >&2
}

# setup_venv EXTRAS: the project with those extras ("all"; the tests add "ray").
setup_venv() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || { echo "== creating .venv"; "$py" -m venv .venv; }
  # Reinstall only when the dependency list or the extras changed.
  local stamp=".venv/.asif-installed-$1" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== pip install -e .[$1] (first time: several minutes, torch is large)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$1]"
    echo "$want" > "$stamp"
  fi
  # numba compiles its kernels on first use (~10-20 s): here, so that the first run does not; again
  # whenever a module with kernels changed (numba's disk cache is keyed on the source files)
  local kstamp=".venv/.asif-kernels" kwant
  kwant=$(cat $(grep -l "compiled_kernels(" asif/*.py) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$kstamp" 2>/dev/null)" != "$kwant" ]; then
    echo "== compiling the kernels"
    .venv/bin/python -c "from asif.environment import compile_kernels; compile_kernels()"
    echo "$kwant" > "$kstamp"
  fi
}

# the offline data: the same list the notebooks install in Colab
setup_apt asif/data/apt-packages.txt "the offline data"
# the browser test's Chromium: tests only, never installed in Colab
if [ "${1:-main}" = test ]; then setup_apt tests/apt-packages.txt "the browser for tests/test_browser.py"; fi
# Ray is an optional extra (asif.distributed): the tests install it, the main job does without
if [ "${1:-main}" = test ]; then setup_venv all,ray; else setup_venv all; fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

case "${1:-main}" in
  test)
    shift || true
    # Unit tests, then the notebooks under nbval in smoke mode (small data,
    # a cache of their own so a user's choice and full embeddings stay as
    # they are).
    # Absolute paths: the notebooks' kernels run in notebooks/.
    # ASIF_REQUIRE_RAY: the Ray tests fail, not skip, if the extra is missing
    export ASIF_REQUIRE_RAY=1 ASIF_SMOKE=1 ASIF_CACHE=${ASIF_TEST_CACHE:-$PWD/.cache/smoke} ASIF_BUILD=${ASIF_TEST_BUILD:-$PWD/.cache/smoke-build}
    exec .venv/bin/python -m pytest tests notebooks --nbval-lax "$@"
    ;;
  main)
    # The embedded default end to end on this machine: embeddings, the five
    # notebooks in full mode (executed copies and offline HTML), the
    # in-domain curve, and the report build/report.md. Putting the results
    # into the README is a maintainer's separate step (see README, Results).
    start=$(date +%s)
    .venv/bin/asif data build
    built=$(date +%s)
    .venv/bin/asif notebooks --out build/notebooks
    # Zero-shot curves: the default general anchors on the three test sets, the in-domain reference,
    # and the previous default (clipart+tuxpaint) beside them for comparison.
    for ds in tuxpaint-photos fashion-mnist clipart-objects; do
      .venv/bin/asif eval --quiet --dataset "$ds" --anchors iconify+clipart+tuxpaint --exponents 8 3 1 \
        --out "build/zero_shot_${ds}_general.json" --plot "build/fig5_${ds}_general.png"
      .venv/bin/asif eval --quiet --dataset "$ds" --anchors clipart+tuxpaint --exponents 8 \
        --out "build/zero_shot_${ds}_clipart-tuxpaint.json"
    done
    .venv/bin/asif eval --quiet --dataset fashion-mnist --anchors fashion-mnist-train --anchor-limit 16384 \
      --exponents 8 3 1 --out build/zero_shot_fashion-mnist_in-domain.json --plot build/fig5_fashion-mnist_in-domain.png
    .venv/bin/asif report --build build --seconds $(( $(date +%s) - start )) --build-seconds $(( built - start ))
    ;;
  lab)
    shift || true
    exec .venv/bin/jupyter lab notebooks "$@"
    ;;
  *)
    echo "usage: bash run.sh [main|test [pytest args]|lab [jupyter lab args]]" >&2; exit 2 ;;
esac
