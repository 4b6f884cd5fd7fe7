// Package onnxrt runs models on ONNX Runtime (CPU by default) through
// github.com/yalue/onnxruntime_go. It owns the process-wide runtime
// initialisation and the session plumbing: the batch buffer is handed to
// ONNX Runtime as its input memory (no copy), and output tensors are
// allocated once per batch size and reused. Execution providers other than
// the CPU one (CUDA, TensorRT) plug in through Options.Configure.
package onnxrt

import (
	"fmt"
	"sync"

	"github.com/visionserve/visionserve/internal/ortlib"
	ort "github.com/yalue/onnxruntime_go"
)

// EnvLibPath names the environment variable that points at the ONNX Runtime
// shared library when no path is given.
const EnvLibPath = ortlib.EnvLibPath

// DefaultLibPath is where scripts/setup.sh installs ONNX Runtime, relative to
// the repository root.
const DefaultLibPath = ortlib.DefaultLibPath

var (
	initMu sync.Mutex // guards the fields below
	// initLib is the library the environment was initialised with; "" until
	// an Init succeeded. Only success is remembered, so a failed Init (a
	// missing library) can be retried with a better path.
	initLib string
)

// Init loads the ONNX Runtime shared library and creates the process-wide
// environment. It is idempotent and safe for concurrent use: after one call
// succeeded, later calls return nil and ignore libPath, because a process
// can hold only one ONNX Runtime environment.
//
// The library is libPath when given, else $VISIONSERVE_ORT_LIB, else
// DefaultLibPath looked up from the working directory and its parents (so
// tests in package folders find the repository's copy).
func Init(libPath string) error {
	initMu.Lock()
	defer initMu.Unlock()
	if initLib != "" {
		return nil
	}
	path, err := ResolveLibPath(libPath)
	if err != nil {
		return err
	}
	if ort.IsInitialized() {
		// Someone initialised the environment without Init (a test helper
		// or another package): use it rather than failing.
		initLib = path
		return nil
	}
	ort.SetSharedLibraryPath(path)
	if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
		return fmt.Errorf("initialising ONNX Runtime from %s: %w", path, err)
	}
	initLib = path
	return nil
}

// Initialized reports whether Init succeeded, and with which library.
func Initialized() (libPath string, ok bool) {
	initMu.Lock()
	defer initMu.Unlock()
	return initLib, initLib != ""
}

// ResolveLibPath returns the ONNX Runtime library Init would load for
// libPath, or an error that says how to get one.
func ResolveLibPath(libPath string) (string, error) {
	return ortlib.Resolve(libPath)
}
