#!/usr/bin/env bash
# The version matrix: builds (or reuses) two environments outside the repo, one with the lowest dependency
# versions pyproject.toml allows and one with the newest releases, runs the tests marked `matrix` (loading,
# freezing, the training loop's schedule and resume, saving, plan + train from the CLI, chat data, the
# labelled-positions projection) on each, and prints one row per environment.
#
#   scripts/version_matrix.sh              both environments
#   scripts/version_matrix.sh low          one of them (low | high)
#   SALF_MATRIX_DIR=/somewhere scripts/version_matrix.sh     where the environments live
#                                          (default: ~/.cache/salf-matrix; reused on later runs)
#
# Every environment gets torch 2.13.0 (the CPU wheel this project is tested with): lower torch versions
# are not tested here. The low pins must match pyproject.toml's floors: raise both together.
# The default suite (./dev test, CI) does not use these environments.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
DIR=${SALF_MATRIX_DIR:-$HOME/.cache/salf-matrix}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The test tools the matrix needs (not the whole test extra: trl>=1.16 needs accelerate>=1.10.1 and
# datasets>=4.7, above the datasets floor, and its test is not in the matrix).
TOOLS=(pytest hypothesis)
LOW=(transformers==5.12.0 tokenizers==0.22.1 accelerate==1.10.1 peft==0.12.0 datasets==2.20.0)
HIGH=(--upgrade transformers tokenizers accelerate peft datasets)

envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(low high)

build() {  # build NAME PINS...: a venv at $DIR/matrix-NAME with torch first, then salf[lora] and the pins
  local name=$1; shift
  local venv="$DIR/matrix-$name"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv" || return 1
  # torch first and pinned: any other torch pulls a multi-GB CUDA build
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC" || return 1
  "$venv/bin/python" -m pip install -q -e "$REPO[lora]" "${TOOLS[@]}" "$@" || return 1
}

versions() {
  "$1/bin/python" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}={m.version(p)}" for p in
               ("torch", "transformers", "tokenizers", "accelerate", "peft", "datasets")))
EOF
}

mkdir -p "$DIR"
rows=()
status=0
for name in "${envs[@]}"; do
  case "$name" in
    low) pins=("${LOW[@]}") ;;
    high) pins=("${HIGH[@]}") ;;
    *) echo "unknown environment $name (low | high)"; exit 2 ;;
  esac
  venv="$DIR/matrix-$name"
  log="$DIR/matrix-$name.log"
  echo "== $name: building $venv"
  if ! build "$name" "${pins[@]}" >"$log" 2>&1; then
    rows+=("$name|(build failed, see $log)|build failed"); status=1; continue
  fi
  vers=$(versions "$venv")
  echo "== $name: $vers"
  "$venv/bin/python" -m pytest -q -m matrix -p no:cacheprovider >>"$log" 2>&1
  rc=$?
  result=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  [ $rc -eq 0 ] || status=1
  rows+=("$name|$vers|${result:-pytest exit $rc} (log: $log)")
done

echo
printf '%-5s | %-s | %s\n' env versions result
for row in "${rows[@]}"; do
  IFS='|' read -r env vers result <<<"$row"
  printf '%-5s | %-s | %s\n' "$env" "$vers" "$result"
done
exit $status
