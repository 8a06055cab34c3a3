#!/usr/bin/env bash
# Prepares device-bundle/ (git-ignored, about 42 MB) so a GPU machine with no Node and no npm can
# run the library and CLI end to end (scripts/device-e2e.mjs, called by scripts/device-check.sh):
# the Node binary (xz -9), the built library (dist/), the CPU addon and the CUDA module built here,
# the runtime dependencies and the e2e script, laid out like the package, and lima_cuda_selftest.
#   scripts/device-bundle.sh            then carry `device-bundle` to the GPU machine
# The CUDA module is built for 80/86/89/90 + PTX by `npm run build:cuda`; LIMA_CUDA_ARCHS=90 narrows it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=device-bundle
rm -rf "$out"
mkdir -p "$out/build/Release" "$out/build-cuda/Release" "$out/scripts"
npm run --silent build:ts
# Built afresh from this checkout, so the bundle never carries a stale module or self-test.
npm run build:native
npm run build:cuda
cp -r dist package.json "$out/"
cp build/Release/lima.node "$out/build/Release/"
cp build-cuda/Release/lima_cuda.node "$out/build-cuda/Release/"
# The self-test too, so the GPU machine spends no device time compiling (device-check.sh uses it).
cp build-cuda/lima_cuda_selftest "$out/"
cp scripts/device-e2e.mjs "$out/scripts/"
# Which sources this was built from: device-check.sh ignores a bundle from other sources.
scripts/source-stamp.sh > "$out/SOURCES"
# Runtime dependencies only (npm's own list, so transitive ones come along).
npm ls --omit=dev --all --parseable 2> /dev/null | tail -n +2 | while read -r dir; do
  rel=${dir#"$PWD"/}
  mkdir -p "$out/$(dirname "$rel")"
  cp -r "$dir" "$out/$rel"
done
xz -9 -T0 -c "$(command -v node)" > "$out/node.xz"
# A device call carries at most 64 MiB: the tracked files plus this bundle.
bundle=$(du -sb "$out" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb 2> /dev/null | tail -1 | cut -f1)
echo "device-bundle: $((bundle / 1048576)) MiB, with the repository $(((bundle + tracked) / 1048576)) MiB of the 64 MiB a device call carries"
if (( bundle + tracked > 64 * 1048576 )); then
  echo "device-bundle: too large to carry; build the CUDA module for the GPU's architecture only (LIMA_CUDA_ARCHS=90)" >&2
  exit 1
fi
