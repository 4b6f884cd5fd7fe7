// Package onnxrt runs models on ONNX Runtime (CPU by default) through
// github.com/yalue/onnxruntime_go. It owns the process-wide runtime
// initialisation and the session plumbing: the batch buffer is handed to
// ONNX Runtime as its input memory (no copy), and output tensors are
// allocated once per batch size and reused. Execution providers other than
// the CPU one (CUDA, TensorRT) plug in through Options.Configure.
package onnxrt

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	ort "github.com/yalue/onnxruntime_go"
)

// EnvLibPath names the environment variable that points at the ONNX Runtime
// shared library when no path is passed to Init.
const EnvLibPath = "VISIONSERVE_ORT_LIB"

// DefaultLibPath is where scripts/setup.sh installs ONNX Runtime, relative to
// the repository root.
const DefaultLibPath = ".deps/onnxruntime-1.29.0/libonnxruntime.so.1.29.0"

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
	from := "--ort-lib"
	if libPath == "" {
		libPath, from = os.Getenv(EnvLibPath), "$"+EnvLibPath
	}
	if libPath != "" {
		if _, err := os.Stat(libPath); err != nil {
			return "", fmt.Errorf("ONNX Runtime library %s (from %s): %w; run scripts/setup.sh or pass --ort-lib", libPath, from, err)
		}
		return libPath, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding ONNX Runtime library: %w", err)
	}
	for {
		p := filepath.Join(dir, DefaultLibPath)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("ONNX Runtime library %s: %w", p, err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	return "", fmt.Errorf("ONNX Runtime library not found: no %s in the working directory or its parents and $%s is unset; run scripts/setup.sh or pass --ort-lib", DefaultLibPath, EnvLibPath)
}
