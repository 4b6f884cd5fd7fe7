// Package onnxrttest is the one ONNX Runtime initialisation of tests:
// Init loads the library tests use (internal/testenv finds it) into the
// process-wide environment, or skips the test naming what is missing.
package onnxrttest

import (
	"testing"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
)

// Init initialises ONNX Runtime for tb's process once, skipping tb when
// the library is not installed and failing it when it will not load.
func Init(tb testing.TB) {
	tb.Helper()
	if err := onnxrt.Init(testenv.ORTLib(tb)); err != nil {
		tb.Fatal(err)
	}
}
