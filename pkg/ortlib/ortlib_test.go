package ortlib_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/ortlib"
)

func TestCheck(t *testing.T) {
	if _, err := ortlib.Check("/nonexistent/libonnxruntime.so"); err == nil ||
		!strings.Contains(err.Error(), "/nonexistent/libonnxruntime.so") || !strings.Contains(err.Error(), "setup.sh") {
		t.Errorf("missing library: %v", err)
	}
	if _, err := ortlib.Check(""); err == nil || !strings.Contains(err.Error(), "--ort-lib") {
		t.Errorf("no library: %v", err)
	}
}

// A Loader loads once, retries after a failure, and refuses a second
// library once one is loaded in the process.
func TestLoader(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.so"), filepath.Join(dir, "b.so")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var loads []string
	fail := true
	l := ortlib.NewLoader(func(path string) error {
		loads = append(loads, path)
		if fail {
			return errors.New("dlopen failed")
		}
		return nil
	})
	if err := l.Init(a); err == nil {
		t.Fatal("failed load reported success")
	}
	if _, ok := l.Initialized(); ok {
		t.Fatal("initialized after a failure")
	}
	fail = false
	if err := l.Init(a); err != nil {
		t.Fatal(err)
	}
	if err := l.Init(b); err != nil || len(loads) != 2 {
		t.Errorf("second Init: %v, %d loads; want nil and no new load", err, len(loads))
	}
	other := ortlib.NewLoader(func(string) error { return nil })
	if err := other.Init(b); err == nil || !strings.Contains(err.Error(), "already loaded") {
		t.Errorf("a second library in one process: %v", err)
	}
	if err := other.Init(a); err != nil {
		t.Errorf("the same library for a second binding: %v", err)
	}
}
