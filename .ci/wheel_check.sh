#!/usr/bin/env bash
# The installed package, not the source tree: build a wheel as a user would (isolated build),
# install it into a fresh venv that has only the pinned CPU torch, then run the quick demo and a
# smoke subset of the tests from a folder outside the checkout.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
TORCH=${TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
$PYTHON -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$TORCH"
(cd "$repo" && "$py" -m pip wheel -q --no-deps -w "$work/dist" .)
wheel=$(ls "$work"/dist/fastds-*.whl)
echo "wheel-check: built $(basename "$wheel") ($(( $(date +%s) - start )) s)"
# the wheel carries the extension(s) and the runtime CUDA sources CuPy compiles
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["fastds/_C.", "fastds/_csrc/stitch.h", "fastds/_csrc/stitch_cuda.cu", "fastds/_csrc/step.h",
        "fastds/configs/tiny.toml", "fastds/configs/protocol_quick.toml",
        "fastds/configs/protocol_full.toml", "fastds/configs/protocol_species.toml",
        "fastds/kernels/sampler_step.py"]
missing = [n for n in need if not any(x.startswith(n) for x in names)]
assert not missing, f"the wheel lacks {missing}"
print("wheel-check: wheel holds", len(names), "files; CUDA extension:",
      any(x.startswith("fastds/_C_cuda.") for x in names))
PY
"$py" -m pip install -q "$wheel[test]"
cd "$work"  # outside the checkout: only the installed package can be imported
"$py" -c "import fastds, sys; assert 'site-packages' in fastds.__file__, fastds.__file__; print('wheel-check: fastds', fastds.__version__, 'from', fastds.__file__)"
"$work/venv/bin/fastds" --version
"$work/venv/bin/fastds" doctor
OMP_NUM_THREADS=2 "$work/venv/bin/fastds" demo --quick --out "$work/demo" --quiet
OMP_NUM_THREADS=2 "$py" -m pytest -q -p no:cacheprovider \
    "$repo/tests/test_stitch.py" "$repo/tests/test_anchor.py" "$repo/tests/test_proper_scores.py" \
    "$repo/tests/test_cli.py::test_dry_run_prints_resolved_config"
echo "wheel-check: finished in $(( $(date +%s) - start )) s"
