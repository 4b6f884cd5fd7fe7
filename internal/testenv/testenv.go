// Package testenv is what tests across the project share to find the
// native pieces of their environment: the repository root, the ONNX
// Runtime library and the shared test data. Production code never
// searches for files; it is given paths by the config.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/visionserve/visionserve/pkg/ortlib"
)

// EnvORTLib names the variable that points tests at the ONNX Runtime
// library (the Makefile sets it).
const EnvORTLib = "VISIONSERVE_ORT_LIB"

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

// FindORTLib returns the ONNX Runtime library for tests:
// $VISIONSERVE_ORT_LIB when set, else the copy scripts/setup.sh put in the
// repository. The error says how to get one.
func FindORTLib() (string, error) {
	if p := os.Getenv(EnvORTLib); p != "" {
		return ortlib.Check(p)
	}
	root, err := RepoRoot()
	if err != nil {
		return "", fmt.Errorf("finding ONNX Runtime library: %w", err)
	}
	return ortlib.Check(filepath.Join(root, ortlib.DefaultLibPath))
}

// ORTLib is FindORTLib for one test: it skips the test, naming what is
// missing, when there is no library.
func ORTLib(tb testing.TB) string {
	tb.Helper()
	p, err := FindORTLib()
	if err != nil {
		tb.Skipf("ONNX Runtime not available: %v", err)
	}
	return p
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
