# visionserve: the two commands a newcomer needs are `make run` and
# `make test`; each installs what is missing first (scripts/setup.sh) and is
# quick when everything is present.

SHELL := /bin/bash
include scripts/versions.env

GO          ?= go
ORT_LIB     ?= $(CURDIR)/.deps/onnxruntime-$(ORT_VERSION)/libonnxruntime.so.$(ORT_VERSION)
MODELS      := resnet50 mobilenetv3_large yolov8s
MODEL_FILES := $(MODELS:%=models/%/model.onnx)
MODELGEN_SRC := $(shell find cmd/modelgen internal/modelgen pkg/onnx -name '*.go' ! -name '*_test.go' 2>/dev/null)
ARGS        ?=

export VISIONSERVE_ORT_LIB ?= $(ORT_LIB)

.PHONY: all setup deps models torch-exports run build test test-race test-triton test-container test-k8s vet bench fuzz clean proto

all: build

## setup: install OpenCV 4.6 (apt) and ONNX Runtime (npm pack, sha256-checked) if missing
setup deps: $(ORT_LIB)
	@scripts/setup.sh apt

$(ORT_LIB): scripts/versions.env scripts/setup.sh
	@scripts/setup.sh

## models: generate the benchmark models (seeded, architecture-faithful) if missing
models: $(MODEL_FILES)

bin/modelgen: $(MODELGEN_SRC)
	@mkdir -p bin
	CGO_ENABLED=0 $(GO) build -o $@ ./cmd/modelgen

models/%/model.onnx: bin/modelgen
	bin/modelgen -out models -models $*

## build: compile the server and client
build: setup
	@mkdir -p bin
	$(GO) build -o bin/infer-server ./cmd/infer-server
	$(GO) build -o bin/infer-client ./cmd/infer-client

## run: serve the default model repository (gRPC :8001, HTTP :8002)
run: build models
	bin/infer-server --model-repo models $(ARGS)

## torch-exports: torch exports of torchvision ResNet-50 and MobileNetV3 for
## the OpenCV rewrite tests (Debian's python3-torch); they skip without it
torch-exports:
	@scripts/setup.sh torch || echo "setup: torch exports not made; the tests that need them skip and say why" >&2

## test: the whole test suite
test: setup models torch-exports
	$(GO) test -tags matprofile -count=1 ./...

## test-triton: Triton's own client (tritonclient) and perf_analyzer against the real server
test-triton: build models
	@scripts/setup.sh clients
	cd tests/triton && ../../.deps/pyenv/bin/python -m pytest -q -p no:cacheprovider

## test-container: build the cpu image with podman (local base images) and test it
test-container: build models
	scripts/container.sh all

## test-k8s: a real control plane on loopback (etcd, kube-apiserver, controller manager, scheduler, kwok), the manifests applied to it, and the HPA scaling on real servers through Prometheus and prometheus-adapter
test-k8s: build models
	scripts/k8s.sh all

## test-race: the packages that run goroutines, under the race detector
test-race: setup models
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -E '/(pkg/pipeline|pkg/batcher|pkg/gpu|pkg/engine|pkg/model|internal/server|internal/metrics|internal/ops|internal/telemetry)')

vet: setup
	$(GO) vet ./...
	$(GO) vet -tags gpu ./pkg/gpu/  # the GPU-only tests and benchmarks must keep compiling

## bench: every benchmark (BENCHTIME=1x for a smoke run)
BENCHTIME ?= 1s
bench: setup models
	$(GO) test -run='^$$' -bench=. -benchmem -benchtime=$(BENCHTIME) ./...

## fuzz: each fuzz target for FUZZTIME (default 30s)
FUZZTIME ?= 30s
fuzz: setup
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f"; $(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

proto:
	proto/gen.sh

clean:
	rm -rf bin .gpubin
