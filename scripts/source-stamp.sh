#!/usr/bin/env bash
# Prints one hash of the sources a device bundle is built from (native code, library, build files,
# the e2e script), so scripts/device-check.sh can tell a bundle built from this tree from a stale one.
# Needs no git: the device machine gets the working tree without it.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc lib cmake CMakeLists.txt binding.gyp package.json scripts/device-e2e.mjs -type f -print0 |
  LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-40
