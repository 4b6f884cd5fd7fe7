// Package proto holds the server's gRPC API definitions and their generated
// Go code: visionserve/v1 (the vision API) and inference (KServe v2 / Open
// Inference Protocol). Run `go generate ./proto` after editing a .proto.
package proto

//go:generate ./gen.sh
