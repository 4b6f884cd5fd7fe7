// Package ortlib decides which ONNX Runtime shared library the process
// loads, once. The CPU engine (onnxruntime_go) and the GPU engine (the C
// API through cgo) both load it and must load the same file, so that they
// share one runtime environment: each builds a Loader around its own way
// of loading, and every Loader checks the path against the one the process
// already chose. It has no cgo, so packages that must stay free of OpenCV
// can import it.
package ortlib

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// DefaultLibPath is where scripts/setup.sh installs ONNX Runtime, relative
// to the repository root; the server's --ort-lib defaults to it.
const DefaultLibPath = ".deps/onnxruntime-1.29.0/libonnxruntime.so.1.29.0"

// Check returns libPath when the file exists, else an error that says how
// to get the library. It does not search: the path comes from the config.
func Check(libPath string) (string, error) {
	if libPath == "" {
		return "", fmt.Errorf("no ONNX Runtime library given; run scripts/setup.sh and pass --ort-lib (default %s)", DefaultLibPath)
	}
	if _, err := os.Stat(libPath); err != nil {
		return "", fmt.Errorf("ONNX Runtime library %s: %w; run scripts/setup.sh or pass --ort-lib", libPath, err)
	}
	return libPath, nil
}

var (
	chosenMu sync.Mutex // guards chosen
	// chosen is the library the first successful Loader.Init loaded; a
	// process holds one ONNX Runtime environment.
	chosen string
)

// Loader initialises one binding of ONNX Runtime (onnxruntime_go, or the C
// API) from the process's library, once.
type Loader struct {
	load func(path string) error

	mu  sync.Mutex // guards lib
	lib string     // "" until Init succeeded; a failed Init can be retried
}

// NewLoader returns a Loader that calls load with the library path on the
// first successful Init.
func NewLoader(load func(path string) error) *Loader { return &Loader{load: load} }

// Init loads the library at libPath unless this Loader already succeeded,
// in which case it returns nil and ignores libPath. A path other than the
// one another Loader already loaded is refused: both bindings must share
// one library.
func (l *Loader) Init(libPath string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lib != "" {
		return nil
	}
	path, err := Check(libPath)
	if err != nil {
		return err
	}
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	chosenMu.Lock()
	defer chosenMu.Unlock()
	if chosen != "" && chosen != path {
		return fmt.Errorf("ONNX Runtime library %s: this process already loaded %s", path, chosen)
	}
	if err := l.load(path); err != nil {
		return err
	}
	l.lib, chosen = path, path
	return nil
}

// Initialized reports whether Init succeeded, and with which library.
func (l *Loader) Initialized() (libPath string, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lib, l.lib != ""
}
