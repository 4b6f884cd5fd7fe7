package enginetest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// torchExports returns the folder of the torch exports that
// scripts/torch-exports.py writes (into .deps/torch-exports, once), or
// skips naming what is missing: a Python with torch and torchvision
// (Debian's python3-torch and python3-torchvision, as `make
// torch-exports` installs them, or PyPI's torch and torchvision).
func torchExports(t *testing.T) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, ".deps", "torch-exports")
	if d := os.Getenv("VISIONSERVE_TORCH_EXPORTS"); d != "" {
		dir = d
	}
	want := []string{"resnet50.onnx", "mobilenetv3_large.onnx", "yolov8s.onnx", "yolov8s_chunk.onnx"}
	have := func() bool {
		for _, f := range want {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				return false
			}
		}
		return true
	}
	if have() {
		return dir
	}
	var tried []string
	for _, py := range []string{"/usr/bin/python3", "python3"} {
		if err := exec.Command(py, "-c", "import torch, torchvision").Run(); err != nil {
			tried = append(tried, py)
			continue
		}
		out, err := exec.Command(py, filepath.Join(root, "scripts", "torch-exports.py"), dir).CombinedOutput()
		if err != nil {
			t.Fatalf("scripts/torch-exports.py: %v\n%s", err, out)
		}
		t.Logf("%s", strings.TrimSpace(string(out)))
		if have() {
			return dir
		}
	}
	t.Skipf("torch exports missing: no Python with torch and torchvision among %v; `make torch-exports` installs Debian's python3-torch and python3-torchvision", tried)
	return ""
}

// TestTorchExportsOnOpenCV: torchvision ResNet-50 and MobileNetV3-Large,
// exported by torch.onnx.export as it writes them (Identity nodes on
// initializers included) and configured by the ImageNet preset alone,
// load on OpenCV with no fallback and agree with ONNX Runtime on the
// photos: the same top-1, probabilities within 1e-4.
func TestTorchExportsOnOpenCV(t *testing.T) {
	dir := torchExports(t)
	for _, name := range []string{"resnet50", "mobilenetv3_large"} {
		t.Run(name, func(t *testing.T) {
			m, err := modelrepo.LoadFile(filepath.Join(dir, name+".onnx"))
			if err != nil {
				t.Fatal(err)
			}
			if m.Sources["task"] != modelrepo.SourcePreset {
				t.Fatalf("%s not configured by the preset: %s", name, m.SettingSources())
			}
			ort, cv, _, _ := runners(t, m)
			crossCheckClasses(t, ort, cv, testImages(t), 1e-4)
		})
	}
}

// TestTorchYOLOv8sOnOpenCV: the torch exports of a YOLOv8s in Ultralytics'
// layout, configured by their Ultralytics metadata alone, are cut at their
// detect head and served on OpenCV with no fallback, and their boxes agree
// with ONNX Runtime's on the photos (IoU ≥ 0.99): as Ultralytics' exporter
// writes it (C2f with a static Split), and with C2f's chunk, whose shape
// arithmetic the rewrite computes (foldChannelArithmetic).
func TestTorchYOLOv8sOnOpenCV(t *testing.T) {
	dir := torchExports(t)
	for _, name := range []string{"yolov8s", "yolov8s_chunk"} {
		t.Run(name, func(t *testing.T) {
			m, err := modelrepo.LoadFile(filepath.Join(dir, name+".onnx"))
			if err != nil {
				t.Fatal(err)
			}
			if m.Task != modelrepo.TaskDetect || m.Sources["labels"] != modelrepo.SourceMetadata || m.NumClasses != 80 {
				t.Fatalf("not configured from its metadata: %s %d classes (%s)", m.Task, m.NumClasses, m.SettingSources())
			}
			ort, cv, _, cvE := runners(t, m)
			if cvE.Head() == nil {
				t.Error("OpenCV runs the full graph; want it cut at the detect head")
			}
			crossCheckDetections(t, ort, cv, testImages(t))
		})
	}
}
