// Package ortlib finds the ONNX Runtime shared library. The CPU engine
// (onnxruntime_go) and the GPU engine (the C API through cgo) both load it,
// and must load the same file so that they share one runtime environment;
// this package is the one place that decides which file that is. It has no
// cgo, so packages that must stay free of OpenCV can import it.
package ortlib

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// EnvLibPath names the environment variable that points at the library
// when no path is given.
const EnvLibPath = "VISIONSERVE_ORT_LIB"

// DefaultLibPath is where scripts/setup.sh installs ONNX Runtime, relative
// to the repository root.
const DefaultLibPath = ".deps/onnxruntime-1.29.0/libonnxruntime.so.1.29.0"

// Resolve returns the library to load: libPath when given, else
// $VISIONSERVE_ORT_LIB, else DefaultLibPath looked up from the working
// directory and its parents (so tests in package folders find the
// repository's copy). The error says how to get the library.
func Resolve(libPath string) (string, error) {
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
