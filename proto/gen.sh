#!/usr/bin/env bash
# Regenerates the Go code of proto/ with protoc, protoc-gen-go and
# protoc-gen-go-grpc (found on PATH or in $(go env GOPATH)/bin).
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:$(go env GOPATH)/bin"
protoc -I . \
	--go_out=. --go_opt=paths=source_relative \
	--go-grpc_out=. --go-grpc_opt=paths=source_relative \
	visionserve/v1/vision.proto inference/grpc_service.proto inference/model_config.proto
