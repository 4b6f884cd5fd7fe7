#!/usr/bin/env bash
# gpu-check.sh: the one prepared run of the GPU issue, for a lent GPU
# machine (device tool), in about 8 minutes, every figure under OUT with
# the device, the driver and the command that made it.
#
#   scripts/gpu-check.sh build          here: builds .gpubin/ (gpu.test with
#                                       -tags gpu, infer-server, infer-client,
#                                       modelgen) and copies the OpenCV 4.6
#                                       libraries the server links into
#                                       .gpubin/lib; then stage .gpubin and the
#                                       ONNX Runtime GPU build
#                                       (../shared/gpu/ort-gpu.sh, stage.sh)
#   scripts/gpu-check.sh run OUT        there (repository root): runs it all
#
# Rehearse it on the CPU twin before spending device time:
#   GPU_CHECK_BACKEND=ort-cpu GPU_CHECK_SECONDS=2 scripts/gpu-check.sh run /tmp/gpu-check
# (the gpu.test benchmarks then skip, naming the missing GPU; every other
# step runs and writes its file).
#
# Environment: ORT_GPU_DIR (the ONNX Runtime GPU libraries; default
# .gpubin/ort), GPU_CHECK_BACKEND (default ort-cuda), GPU_CHECK_SECONDS
# (per load level, default 10), GPU_CHECK_CONC (default "1 16 64 256").
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.gpubin

build() {
	set -e
	mkdir -p "$bin/lib"
	go test -c -tags gpu -o "$bin/gpu.test" ./pkg/gpu
	go build -o "$bin/infer-server" ./cmd/infer-server
	go build -o "$bin/infer-client" ./cmd/infer-client
	CGO_ENABLED=0 go build -o "$bin/modelgen" ./cmd/modelgen
	# The shared libraries infer-server links (OpenCV 4.6 and its closure,
	# about 300 MB, about 90 MB once staged with xz), but for glibc and
	# the C++ runtime, which the GPU machine has.
	ldd "$bin/infer-server" | awk '/=> \// {print $3}' | grep -vE '/lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so|ld-linux' |
		xargs -r -I{} cp -L {} "$bin/lib/"
	git rev-parse --short=12 HEAD > "$bin/COMMIT"
	echo "built $bin; stage it with ../shared/gpu/stage.sh $bin <ORT GPU dir>" >&2
}

run() {
	local out=${1:?usage: $0 run OUT}
	mkdir -p "$out"
	local backend=${GPU_CHECK_BACKEND:-ort-cuda} secs=${GPU_CHECK_SECONDS:-10} conc=${GPU_CHECK_CONC:-1 16 64 256}
	local ort=${ORT_GPU_DIR:-$bin/ort}
	# CUDA and ONNX Runtime for everything; the carried OpenCV closure last
	# and only for the gocv binaries (its libcurl breaks the machine's curl).
	local gpu_ld="$PWD/$ort:$(find / -path '*nvidia*' -name lib -type d 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
	export LD_LIBRARY_PATH=$gpu_ld
	cv() { LD_LIBRARY_PATH="$gpu_ld:$PWD/$bin/lib" "$@"; }
	local ortlib
	ortlib=$(ls "$ort"/libonnxruntime.so.1* 2>/dev/null | head -1)
	[ -n "$ortlib" ] || ortlib=${VISIONSERVE_ORT_LIB:-}
	export VISIONSERVE_ORT_LIB=$ortlib
	local photo=../shared/testdata/images/dog.jpg
	[ -f "$photo" ] || photo=$(ls "$bin"/*.jpg 2>/dev/null | head -1)
	local start=$SECONDS
	log() { echo "[$((SECONDS - start))s] $*" | tee -a "$out/steps.txt" >&2; }

	{
		echo "date: $(date -u '+%F %T UTC')"
		echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null || cat "$bin/COMMIT" 2>/dev/null || echo unknown)"
		echo "command: $0 run $out (backend $backend, $secs s per level, concurrency $conc)"
		echo "host: $(uname -srm), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1048576) " GiB"}' /proc/meminfo)"
		echo "onnxruntime: $ortlib"
		nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: no NVIDIA GPU here"
	} > "$out/device.txt"
	log "device: $(tail -1 "$out/device.txt")"

	# 1. Models, generated here rather than carried.
	[ -f models/resnet50/model.onnx ] || "$bin/modelgen" -out models > "$out/modelgen.txt" 2>&1
	log "models ready"

	# 2. The engine: best batch, fp16 against fp32, mixed batch sizes.
	(cd pkg/gpu && timeout 220 "../../$bin/gpu.test" -test.v -test.run 'GPUFP16MatchesFP32|GPUCUDAMatchesCPU' \
		-test.bench 'GPU$/.*/pinned/batch=(1|64)$|GPUPrecision|GPUMixedBatches/(mobilenetv3_large|resnet50)/search=HEURISTIC/pad=(none|max)$' \
		-test.benchtime 30x) > "$out/engine.txt" 2>&1
	log "engine benchmarks: exit $? ($(grep -c '^Benchmark' "$out/engine.txt") results)"

	# 3. Served: closed-loop load per model and concurrency, stage timings
	# at one client from the server's own metrics.
	serve() { # serve NAME ARGS...: starts infer-server, waits for /readyz
		local name=$1
		shift
		# exec: $server is the server itself, so that stop's TERM reaches it.
		(LD_LIBRARY_PATH="$gpu_ld:$PWD/$bin/lib" exec "$bin/infer-server" --model-repo models --backend "$backend" \
			--grpc-addr 127.0.0.1:18001 --http-addr 127.0.0.1:18002 "$@") > "$out/server-$name.log" 2>&1 &
		server=$!
		for _ in $(seq 240); do
			kill -0 "$server" 2> /dev/null || return 1
			curl -sf 127.0.0.1:18002/readyz > /dev/null && return 0
			sleep 0.5
		done
		return 1
	}
	stop() { kill -TERM "$server" 2> /dev/null && wait "$server"; }
	stages() { curl -s 127.0.0.1:18002/metrics | grep -E '^visionserve_stage_duration_seconds_(sum|count)\{' | grep "model=\"$1\""; }
	if serve fp32 --gpu-batch-padding max; then
		log "server up ($backend, fp32)"
		for model in mobilenetv3_large resnet50 yolov8s; do
			img=$photo
			[ "$model" = yolov8s ] && [ -f ../shared/testdata/images/bus.jpg ] && img=../shared/testdata/images/bus.jpg
			task=classify
			[ "$model" = yolov8s ] && task=detect
			for c in $conc; do
				[ "$c" = 1 ] && stages "$model" > "$out/stages-$model-before.txt"
				cv "$bin/infer-client" load --addr 127.0.0.1:18001 --model "$model" --concurrency "$c" --duration "${secs}s" "$img" 2> /dev/null |
					tail -3 | sed "s/^/$model c=$c: /" >> "$out/served.txt"
				[ "$c" = 1 ] && stages "$model" > "$out/stages-$model-after.txt"
			done
			[ "$task" = classify ] && cv "$bin/infer-client" classify --addr 127.0.0.1:18001 --model "$model" --json ../shared/testdata/images/*.jpg > "$out/classify-$model-fp32.json" 2>&1
			log "served $model"
		done
		stop
	else
		log "server did not come up: see server-fp32.log"
	fi

	# 4. fp16 served: the same photos, top-1 against fp32.
	if serve fp16 --precision fp16 --gpu-batch-padding max; then
		for model in mobilenetv3_large resnet50; do
			cv "$bin/infer-client" classify --addr 127.0.0.1:18001 --model "$model" --json ../shared/testdata/images/*.jpg > "$out/classify-$model-fp16.json" 2>&1
			cv "$bin/infer-client" load --addr 127.0.0.1:18001 --model "$model" --concurrency 64 --duration "${secs}s" "$photo" 2> /dev/null |
				tail -1 | sed "s/^/$model fp16 c=64: /" >> "$out/served.txt"
		done
		stop
		log "fp16 served"
	else
		log "fp16 server did not come up: see server-fp16.log"
	fi

	summarize "$out"
	log "done"
}

# summarize writes summary.md from the files of a run.
summarize() {
	local out=$1
	{
		echo "# gpu-check $(date -u '+%F %T UTC')"
		echo
		echo '```'
		cat "$out/device.txt"
		echo '```'
		echo
		echo "## Engine (gpu.test)"
		echo
		echo '```'
		grep -E '^(Benchmark|--- |    gpu_test)|fp16 vs fp32|SKIP' "$out/engine.txt" | head -80
		echo '```'
		echo
		echo "## Served (closed loop, infer-client load)"
		echo
		echo '```'
		cat "$out/served.txt" 2> /dev/null
		echo '```'
		echo
		echo "## Stage means at one client (ms, from visionserve_stage_duration_seconds)"
		echo
		for before in "$out"/stages-*-before.txt; do
			[ -f "$before" ] || continue
			model=${before#"$out"/stages-}
			model=${model%-before.txt}
			python3 - "$before" "${before%-before.txt}-after.txt" "$model" << 'PY'
import re, sys
def read(p):
    d = {}
    for line in open(p):
        m = re.match(r'visionserve_stage_duration_seconds_(sum|count)\{.*stage="([^"]+)".*\} (\S+)', line)
        if m:
            d[(m.group(1), m.group(2))] = float(m.group(3))
    return d
a, b = read(sys.argv[1]), read(sys.argv[2])
parts = []
for stage in ["queue", "decode", "preprocess", "inference", "postprocess", "total"]:
    n = b.get(("count", stage), 0) - a.get(("count", stage), 0)
    s = b.get(("sum", stage), 0) - a.get(("sum", stage), 0)
    if n > 0:
        parts.append(f"{stage} {1000 * s / n:.2f}")
print(f"- {sys.argv[3]}: " + ", ".join(parts))
PY
		done
		echo
		echo "## fp16 against fp32 on the photos (top-1)"
		echo
		for f32 in "$out"/classify-*-fp32.json; do
			[ -f "$f32" ] || continue
			python3 - "$f32" "${f32%-fp32.json}-fp16.json" << 'PY'
import json, sys
def tops(p):
    out = []
    try:
        for line in open(p):
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                out.append((r["image"], r["classes"][0]["index"], r["classes"][0]["score"]))
    except OSError:
        pass
    return out
a, b = tops(sys.argv[1]), tops(sys.argv[2])
agree = sum(1 for x, y in zip(a, b) if x[1] == y[1])
diff = max((abs(x[2] - y[2]) for x, y in zip(a, b)), default=float("nan"))
print(f"- {sys.argv[1].split('classify-')[1][:-10]}: top-1 agrees on {agree} of {min(len(a), len(b))} photos; largest top-1 probability difference {diff:.4f}")
PY
		done
	} > "$out/summary.md"
}

case "${1:-}" in
build) build ;;
run) shift; run "$@" ;;
summarize) summarize "${2:?usage: $0 summarize OUT}" ;;
*) echo "usage: $0 build | run OUT | summarize OUT" >&2; exit 2 ;;
esac
