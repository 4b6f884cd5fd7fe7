#!/usr/bin/env bash
# Installs what visionserve needs on a Debian 12 / Ubuntu 24.04 machine,
# idempotently: OpenCV 4.6 headers (apt) and ONNX Runtime (npm pack, sha256
# checked, unpacked into .deps/). Quick when everything is already present.
#
#   scripts/setup.sh            apt packages + ONNX Runtime CPU library
#   scripts/setup.sh ort        ONNX Runtime only
#   scripts/setup.sh clients    a Python venv in .deps/pyenv with tritonclient and
#                               pytest (hash-checked, tests/triton/requirements.txt)
#                               and perf_analyzer in .deps/perf-analyzer
#   scripts/setup.sh torch      Debian's python3-torch and python3-torchvision
#                               (1.13), then the torch exports of the OpenCV
#                               rewrite tests into .deps/torch-exports
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
. "$root/scripts/versions.env"

ort_dir="$root/.deps/onnxruntime-$ORT_VERSION"
ort_lib="$ort_dir/libonnxruntime.so.$ORT_VERSION"

need_apt() {
	local missing=()
	pkg-config --exists opencv4 2>/dev/null || missing+=(libopencv-dev)
	command -v pkg-config >/dev/null || missing+=(pkg-config)
	command -v npm >/dev/null || missing+=(npm)
	command -v gcc >/dev/null || missing+=(gcc g++)
	if [ ${#missing[@]} -eq 0 ]; then return 0; fi
	echo "setup: installing ${missing[*]} from apt" >&2
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	local have
	have=$(pkg-config --modversion opencv4)
	case "$have" in
	4.6.*) ;;
	*) echo "setup: warning: OpenCV $have found; gocv $GOCV_VERSION is tested with $OPENCV_VERSION" >&2 ;;
	esac
}

need_ort() {
	if [ -f "$ort_lib" ] && echo "$ORT_LIB_SHA256  $ort_lib" | sha256sum -c --status -; then
		return 0
	fi
	echo "setup: fetching ONNX Runtime $ORT_VERSION ($ORT_NPM_PACKAGE) with npm pack" >&2
	local work
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	# npm pack downloads the tarball only: no install scripts run.
	# Its output is kept and shown only when it fails, so that a failed
	# fetch says why (registry, network, package name).
	local out
	if ! out=$(cd "$work" && npm pack "$ORT_NPM_PACKAGE" 2>&1); then
		echo "setup: npm pack $ORT_NPM_PACKAGE failed:" >&2
		echo "$out" >&2
		exit 1
	fi
	local tgz
	tgz=$(ls "$work"/*.tgz)
	echo "$ORT_NPM_SHA256  $tgz" | sha256sum -c --status - || {
		echo "setup: sha256 mismatch for $ORT_NPM_PACKAGE: got $(sha256sum "$tgz" | cut -d' ' -f1)" >&2
		exit 1
	}
	tar -xzf "$tgz" -C "$work" package/bin/napi-v6/linux/x64/libonnxruntime.so.1
	mkdir -p "$ort_dir"
	install -m 0644 "$work/package/bin/napi-v6/linux/x64/libonnxruntime.so.1" "$ort_lib"
	echo "$ORT_LIB_SHA256  $ort_lib" | sha256sum -c --status - || {
		echo "setup: sha256 mismatch for libonnxruntime.so.1 inside $ORT_NPM_PACKAGE" >&2
		rm -f "$ort_lib"
		exit 1
	}
	ln -sf "libonnxruntime.so.$ORT_VERSION" "$ort_dir/libonnxruntime.so.1"
	ln -sf "libonnxruntime.so.$ORT_VERSION" "$ort_dir/libonnxruntime.so"
	echo "setup: ONNX Runtime $ORT_VERSION in $ort_dir" >&2
}

need_torch() {
	local py=/usr/bin/python3 out="$root/.deps/torch-exports"
	if [ -f "$out/resnet50.onnx" ] && [ -f "$out/mobilenetv3_large.onnx" ] && [ -f "$out/yolov8s.onnx" ] && [ -f "$out/yolov8s_chunk.onnx" ]; then
		return 0
	fi
	if ! "$py" -c 'import torch, torchvision' 2>/dev/null; then
		echo "setup: installing python3-torch and python3-torchvision from apt (for the torch exports)" >&2
		local sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		$sudo apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-torch python3-torchvision >/dev/null
	fi
	"$py" "$root/scripts/torch-exports.py" "$out" >&2
}

# pip_wheel NAME==VERSION SHA256 DIR: downloads one wheel, no dependencies,
# and checks it.
pip_wheel() {
	local spec=$1 sum=$2 dir=$3
	python3 -m pip download -q --no-deps -d "$dir" "$spec" >&2
	local whl
	whl=$(ls "$dir"/*.whl)
	echo "$sum  $whl" | sha256sum -c --status - || {
		echo "setup: sha256 mismatch for $spec: got $(sha256sum "$whl" | cut -d' ' -f1)" >&2
		exit 1
	}
	echo "$whl"
}

need_clients() {
	local venv="$root/.deps/pyenv" req="$root/tests/triton/requirements.txt"
	local stamp="$venv/.requirements.sha256"
	if ! [ -f "$stamp" ] || [ "$(cat "$stamp")" != "$(sha256sum "$req" | cut -d' ' -f1)" ]; then
		echo "setup: Python venv for the Triton client tests in $venv" >&2
		rm -rf "$venv"
		python3 -m venv "$venv"
		"$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$req" >&2
		sha256sum "$req" | cut -d' ' -f1 > "$stamp"
	fi
	# The project's own Python client, its stubs generated from proto/ at
	# build time (nothing generated is committed).
	local cstamp="$venv/.client.sha256" csum
	csum=$(cat "$root"/clients/python/pyproject.toml "$root"/clients/python/setup.py "$root"/clients/python/visionserve/*.py "$root"/proto/visionserve/v1/vision.proto | sha256sum | cut -d' ' -f1)
	if ! [ -f "$cstamp" ] || [ "$(cat "$cstamp")" != "$csum" ]; then
		rm -rf "$root/clients/python/build"
		"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "$root/clients/python" >&2
		rm -rf "$root/clients/python/build" "$root"/clients/python/*.egg-info
		echo "$csum" > "$cstamp"
	fi
	local pa="$root/.deps/perf-analyzer"
	if ! [ -x "$pa/perf_analyzer" ] || ! [ -f "$pa/lib/libcudart.so.12" ]; then
		echo "setup: perf_analyzer from $PERF_ANALYZER_WHEEL" >&2
		local work whl
		work=$(mktemp -d)
		trap 'rm -rf "$work"' RETURN
		mkdir -p "$pa/lib" "$work/a" "$work/b"
		whl=$(pip_wheel "$PERF_ANALYZER_WHEEL" "$PERF_ANALYZER_WHEEL_SHA256" "$work/a")
		(cd "$work/a" && python3 -m zipfile -e "$whl" x)
		install -m 0755 "$work"/a/x/*.data/data/bin/perf_analyzer "$pa/perf_analyzer"
		whl=$(pip_wheel "$CUDART_WHEEL" "$CUDART_WHEEL_SHA256" "$work/b")
		(cd "$work/b" && python3 -m zipfile -e "$whl" x)
		install -m 0644 "$work"/b/x/nvidia/cuda_runtime/lib/libcudart.so.12 "$pa/lib/"
	fi
	if ! ldconfig -p | grep 'libb64.so.0d' >/dev/null; then
		echo "setup: installing libb64-0d from apt (perf_analyzer links it)" >&2
		local sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		$sudo apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
	fi
}

case "${1:-all}" in
all) need_apt; need_ort ;;
ort) need_ort ;;
apt) need_apt ;;
torch) need_torch ;;
clients) need_clients ;;
*) echo "usage: $0 [all|apt|ort|torch|clients]" >&2; exit 2 ;;
esac
