// Package enginetest holds the integration tests and benchmarks that run
// real and generated models through both CPU engines (ONNX Runtime and
// OpenCV DNN): cross-engine agreement, real accuracy on the shared test
// images and per-engine benchmarks. The package has no API of its own
// beyond the helpers the tests share.
package enginetest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// RepoRoot returns the repository root: the nearest folder above the
// working directory that holds go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// SharedTestdata returns the path of rel inside ../shared/testdata (beside
// the repository root), or an error naming the missing folder or file.
func SharedTestdata(rel string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	p := filepath.Join(root, "..", "shared", "testdata", rel)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("real test data missing: ../shared/testdata/%s", rel)
	}
	return p, nil
}
