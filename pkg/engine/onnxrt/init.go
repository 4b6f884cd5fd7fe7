// Package onnxrt runs models on ONNX Runtime (CPU by default) through
// github.com/yalue/onnxruntime_go. It owns the session plumbing: the batch
// buffer is handed to ONNX Runtime as its input memory (no copy), and
// output tensors are allocated once per batch size and reused. Execution
// providers other than the CPU one (CUDA, TensorRT) plug in through
// Options.Configure.
package onnxrt

import (
	"fmt"

	"github.com/visionserve/visionserve/pkg/ortlib"
	ort "github.com/yalue/onnxruntime_go"
)

// runtime initialises onnxruntime_go's process-wide environment from the
// process's one ONNX Runtime library (see package ortlib).
var ortRuntime = ortlib.NewLoader(func(path string) error {
	if ort.IsInitialized() {
		// Someone initialised the environment without Init: use it
		// rather than failing.
		return nil
	}
	ort.SetSharedLibraryPath(path)
	if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
		return fmt.Errorf("initialising ONNX Runtime from %s: %w", path, err)
	}
	return nil
})

// Init loads the ONNX Runtime shared library at libPath and creates the
// process-wide environment. It is idempotent and safe for concurrent use:
// after one call succeeded, later calls return nil and ignore libPath,
// because a process can hold only one ONNX Runtime environment. A failed
// Init (a missing library) can be retried with a better path.
func Init(libPath string) error { return ortRuntime.Init(libPath) }

// Initialized reports whether Init succeeded, and with which library.
func Initialized() (libPath string, ok bool) { return ortRuntime.Initialized() }
