#!/usr/bin/env bash
# An offline bundle of Ray for a Python 3.12 x86_64 GPU node that has torch, torchvision,
# numpy, pandas, pyarrow and pillow but no Ray and no network (the project's H200 machine:
# docs/BENCHMARKS.md, "The GPU run").
#
#   bench/gpu_bundle.sh build [DIR]     here, with the package registry: DIR (default
#                                       .gpu-bundle, git-ignored) gets ray-<v>-stripped.tar.xz
#                                       and wheels/ (what Ray needs that the node lacks);
#                                       fails when DIR is 50 MiB or more
#   bench/gpu_bundle.sh install [DIR] [SITE]
#                                       on the node: unpacks into SITE (default /tmp/site),
#                                       installs the wheels there and checks
#                                       `import ray, ray.data, ray.train.torch` with
#                                       PYTHONPATH=SITE; prints the PYTHONPATH to export
#
# Ray 2.60.0's wheel for CPython 3.12 is 79.3 MB. Dropped from it, none of which the jobs import
# (checked by the install's import line and by bench/gpu_run.sh running them): ray/jars (Java
# workers), ray/rllib (reinforcement learning), ray/serve (model serving), ray/dashboard/client
# (the dashboard's web pages: the GPU run starts Ray without the dashboard). The rest is packed
# with xz.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_VERSION=2.60.0
# What `import ray, ray.data, ray.train.torch` needs beyond the node's image (KINDS.md's package
# list of the nvidia-h200 image, 2026-11-17): jsonschema and its three, pydantic and its three.
# tensorboardX is in ray[train]'s requirements but is imported only by Tune's logger callbacks.
EXTRA_WHEELS=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
              rpds-py==2026.9.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
              typing-inspection==0.4.5)
LIMIT_MIB=50
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

download() {  # download() DEST SPEC...: wheels for CPython 3.12 on x86_64 Linux, no deps
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$dest" "$@"
}

build() {
  local out=${1:-.gpu-bundle}
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  rm -rf "$out" && mkdir -p "$out/wheels"
  echo "downloading ray==$RAY_VERSION (CPython 3.12, x86_64)"
  download "$tmp" "ray==$RAY_VERSION"
  mkdir "$tmp/site"
  unzip -q "$tmp"/ray-"$RAY_VERSION"-*.whl -d "$tmp/site"
  rm -rf "$tmp/site/ray/jars" "$tmp/site/ray/rllib" "$tmp/site/ray/serve" \
         "$tmp/site/ray/dashboard/client"
  find "$tmp/site" -name __pycache__ -prune -exec rm -rf {} +
  echo "packing $(du -sm "$tmp/site" | cut -f1) MiB of Ray with xz"
  tar -C "$tmp/site" -cf - . | xz -6 -T0 > "$out/ray-$RAY_VERSION-cp312-stripped.tar.xz"
  download "$out/wheels" "${EXTRA_WHEELS[@]}"
  local mib
  mib=$(du -sm "$out" | cut -f1)
  ls -l "$out" "$out/wheels"
  echo "bundle: $out, $mib MiB (limit $LIMIT_MIB)"
  if [ "$mib" -ge "$LIMIT_MIB" ]; then
    echo "error: the bundle is $mib MiB, not under $LIMIT_MIB MiB" >&2
    return 1
  fi
}

install() {
  local dir=${1:-.gpu-bundle} site=${2:-/tmp/site}
  if [ ! -f "$dir/ray-$RAY_VERSION-cp312-stripped.tar.xz" ]; then
    echo "error: no bundle in $dir (bench/gpu_bundle.sh build, on a machine with the registry)" >&2
    return 2
  fi
  mkdir -p "$site"
  # Python's tarfile (lzma is in the standard library), not tar -J: the node may lack xz.
  # The "tar" filter keeps the executables' modes (raylet, gcs_server) and refuses paths
  # outside SITE.
  python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' \
    "$dir/ray-$RAY_VERSION-cp312-stripped.tar.xz" "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$dir"/wheels/*.whl
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    "import ray, ray.data, ray.train.torch; print('ray', ray.__version__, 'imports: ok')"
  echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  install) shift; install "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
