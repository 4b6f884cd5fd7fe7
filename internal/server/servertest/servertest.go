// Package servertest builds throwaway model repositories around the real
// pretrained models of the shared test data (../shared/testdata beside the
// repository root), for end-to-end tests of the server and its binary.
// Nothing is copied into the repository: the model folders live in a test's
// temporary directory and link to the shared files.
package servertest

import (
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"testing"
)

// TestdataDir returns the shared test data folder, or skips the test with
// a message naming it when it is absent.
func TestdataDir(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	// internal/server/servertest -> repository root -> its parent.
	dir := filepath.Join(filepath.Dir(file), "..", "..", "..", "..", "shared", "testdata")
	if _, err := os.Stat(filepath.Join(dir, "models")); err != nil {
		t.Skipf("real test data missing: %s (../shared/testdata beside the repository root)", dir)
	}
	return dir
}

// Real models of the shared test data and their configs.
const (
	// MobileNetV2 is mobilenetv2-12-int8 (ONNX Runtime only: OpenCV cannot
	// import its QLinear operators).
	MobileNetV2 = "mobilenetv2"
	// YOLOv8n is yolov8n_int8 (ONNX Runtime only: ConvInteger).
	YOLOv8n = "yolov8n"
)

var models = map[string]struct{ file, labels, config string }{
	MobileNetV2: {"mobilenetv2-12-int8.onnx", "imagenet.txt", `task: classify
labels: labels.txt
input:
  color: RGB
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  resize: shorter_crop
  resize_shorter: 256
output:
  decoding: logits
batching:
  max_batch_size: 4
  max_queue_delay: 2ms
  queue_size: 64
`},
	YOLOv8n: {"yolov8n_int8.onnx", "coco80.txt", `task: detect
labels: labels.txt
input:
  color: RGB
  resize: letterbox
  pad_value: 114
output:
  decoding: yolov8
batching:
  max_batch_size: 2
  max_queue_delay: 2ms
  queue_size: 32
`},
}

// Repo writes a model repository in a temporary folder holding the named
// real models (MobileNetV2, YOLOv8n) and returns its path. It skips the
// test when the shared test data is absent.
func Repo(t testing.TB, names ...string) string {
	t.Helper()
	data := TestdataDir(t)
	root := t.TempDir()
	for _, name := range names {
		m, ok := models[name]
		if !ok {
			t.Fatalf("servertest: unknown model %q", name)
		}
		dir := filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(data, "models", m.file), filepath.Join(dir, "model.onnx")); err != nil {
			t.Fatal(err)
		}
		labels, err := os.ReadFile(filepath.Join(data, "labels", m.labels))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "labels.txt"), labels, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(m.config), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// Image returns the bytes of a shared test image (bus.jpg, zidane.jpg,
// dog.jpg).
func Image(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(TestdataDir(t), "images", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// GeneratedRepo writes a model repository in a temporary folder holding
// the named models of the project's own repository (models/<name>, written
// by `make models`), linked, not copied. The configs are the shipped ones
// with batching.auto_tune turned off: its warm-up measurement takes tens
// of seconds for YOLOv8s on a shared CPU, and the tests using this repo
// are about serving (the tuner has its own tests, on fake engines). It
// skips the test when a model file is missing.
func GeneratedRepo(t testing.TB, names ...string) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	src := filepath.Join(filepath.Dir(file), "..", "..", "..", "models")
	root := t.TempDir()
	for _, name := range names {
		from := filepath.Join(src, name)
		if _, err := os.Stat(filepath.Join(from, "model.onnx")); err != nil {
			t.Skipf("generated model %s missing: run make models", filepath.Join(from, "model.onnx"))
		}
		dir := filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"model.onnx", "labels.txt"} {
			abs, err := filepath.Abs(filepath.Join(from, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(abs, filepath.Join(dir, f)); err != nil {
				t.Fatal(err)
			}
		}
		cfg, err := os.ReadFile(filepath.Join(from, "config.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		cfg = autoTuneOn.ReplaceAll(cfg, []byte("${1}false"))
		if err := os.WriteFile(filepath.Join(dir, "config.yaml"), cfg, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// autoTuneOn matches the batching.auto_tune line of a config that turns
// it on; group 1 is all but the value.
var autoTuneOn = regexp.MustCompile(`(?m)^(\s+auto_tune:\s*)true\b`)
