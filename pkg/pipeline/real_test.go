package pipeline_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	"github.com/visionserve/visionserve/pkg/pipeline/pipelinetest"
)

const shared = "../../../shared/testdata"

// sharedFiles returns the paths of files under ../shared/testdata, or
// skips naming the first one missing.
func sharedFiles(t *testing.T, rel ...string) []string {
	t.Helper()
	var out []string
	for _, r := range rel {
		p := filepath.Join(shared, r)
		if _, err := os.Stat(p); err != nil {
			t.Skipf("real test data missing: ../shared/testdata/%s", r)
		}
		out = append(out, p)
	}
	return out
}

// realRunner loads m on ONNX Runtime CPU, skipping when the library is not
// installed (scripts/setup.sh).
func realRunner(t *testing.T, m *modelrepo.Model) *pipelinetest.Runner {
	t.Helper()
	return runnerWith(t, m, pipeline.PreprocessOptions{})
}

// runnerWith is realRunner with preprocess options.
func runnerWith(t *testing.T, m *modelrepo.Model, opts pipeline.PreprocessOptions) *pipelinetest.Runner {
	t.Helper()
	if err := onnxrt.Init(testenv.ORTLib(t)); err != nil {
		t.Fatal(err)
	}
	eng, err := onnxrt.NewForModel(m, onnxrt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eng.Close() })
	r, err := pipelinetest.New(m, eng, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func readAll(t *testing.T, paths ...string) [][]byte {
	var out [][]byte
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

// realYOLOv8n is the shared test data's YOLOv8n export (model and label
// file at the given paths) as the model repository would load it, with
// batches of up to maxBatch images.
func realYOLOv8n(t *testing.T, model, labelFile string, maxBatch int) *modelrepo.Model {
	t.Helper()
	labels, err := modelrepo.ReadLabels(labelFile)
	if err != nil {
		t.Fatal(err)
	}
	return &modelrepo.Model{
		Config: modelrepo.Config{
			Name: "yolov8n", Task: modelrepo.TaskDetect,
			Input: modelrepo.InputConfig{
				Name: "images", Width: 640, Height: 640, Layout: "NCHW", Color: "RGB",
				Scale: 1.0 / 255, Std: [3]float32{1, 1, 1}, Resize: modelrepo.ResizeLetterbox, PadValue: 114,
			},
			Output:   modelrepo.OutputConfig{Name: "output0", Decoding: modelrepo.DecodeYOLOv8},
			Defaults: modelrepo.DefaultOptions{TopK: 5, Confidence: 0.25, IoU: 0.45, MaxDetections: 300},
			Batching: modelrepo.BatchingConfig{MaxBatchSize: maxBatch},
		},
		Path: model, LabelNames: labels, NumClasses: len(labels),
	}
}

// realMobileNetV2 is the shared test data's ONNX zoo MobileNetV2 (model and
// label file at the given paths) as the model repository would load it.
func realMobileNetV2(t *testing.T, model, labelFile string) *modelrepo.Model {
	t.Helper()
	labels, err := modelrepo.ReadLabels(labelFile)
	if err != nil {
		t.Fatal(err)
	}
	return &modelrepo.Model{
		Config: modelrepo.Config{
			Name: "mobilenetv2", Task: modelrepo.TaskClassify,
			Input: modelrepo.InputConfig{
				Name: "input", Width: 224, Height: 224, Layout: "NCHW", Color: "RGB",
				Scale: 1.0 / 255, Mean: [3]float32{0.485, 0.456, 0.406}, Std: [3]float32{0.229, 0.224, 0.225},
				Resize: modelrepo.ResizeShorterCrop, ResizeShorter: 256,
			},
			Output:   modelrepo.OutputConfig{Name: "output", Decoding: modelrepo.DecodeLogits},
			Defaults: modelrepo.DefaultOptions{TopK: 5, Confidence: 0.25, IoU: 0.45, MaxDetections: 300},
			Batching: modelrepo.BatchingConfig{MaxBatchSize: 4},
		},
		Path: model, LabelNames: labels, NumClasses: len(labels),
	}
}

// TestRealYOLOv8n runs the real Ultralytics YOLOv8n export on bus.jpg and
// zidane.jpg in one batch and checks the well-known detections.
func TestRealYOLOv8n(t *testing.T) {
	f := sharedFiles(t, "models/yolov8n_int8.onnx", "labels/coco80.txt", "images/bus.jpg", "images/zidane.jpg")
	m := realYOLOv8n(t, f[0], f[1], 2)
	r := realRunner(t, m)
	res, err := r.Infer(context.Background(), readAll(t, f[2], f[3]), pipeline.Options{})
	if err != nil {
		t.Fatal(err)
	}
	count := func(res pipeline.Result, label string, minScore float32) int {
		n := 0
		for _, d := range res.Detections {
			if d.Label == label && d.Score >= minScore {
				n++
				if d.Box.X1 < 0 || d.Box.Y1 < 0 || d.Box.X2 > float32(res.Width) || d.Box.Y2 > float32(res.Height) || d.Box.X2 <= d.Box.X1 || d.Box.Y2 <= d.Box.Y1 {
					t.Errorf("%s box %+v outside %dx%d", label, d.Box, res.Width, res.Height)
				}
			}
		}
		return n
	}
	bus, zidane := res[0], res[1]
	t.Logf("bus.jpg: %+v", bus.Detections)
	t.Logf("zidane.jpg: %+v", zidane.Detections)
	if bus.Width != 810 || bus.Height != 1080 || zidane.Width != 1280 || zidane.Height != 720 {
		t.Errorf("sizes %dx%d and %dx%d", bus.Width, bus.Height, zidane.Width, zidane.Height)
	}
	if n := count(bus, "bus", 0.7); n != 1 {
		t.Errorf("bus.jpg: %d buses scoring 0.7+, want 1", n)
	}
	if n := count(bus, "person", 0.7); n < 3 {
		t.Errorf("bus.jpg: %d people scoring 0.7+, want at least 3", n)
	}
	if n := count(zidane, "person", 0.7); n != 2 {
		t.Errorf("zidane.jpg: %d people scoring 0.7+, want 2", n)
	}
	// The bus spans most of the image width.
	for _, d := range bus.Detections {
		if d.Label == "bus" && d.Box.X2-d.Box.X1 < 0.7*810 {
			t.Errorf("bus box %+v narrower than expected", d.Box)
		}
	}
}

// TestRealMobileNetV2 runs the ONNX zoo MobileNetV2 on dog.jpg.
func TestRealMobileNetV2(t *testing.T) {
	f := sharedFiles(t, "models/mobilenetv2-12-int8.onnx", "labels/imagenet.txt", "images/dog.jpg")
	m := realMobileNetV2(t, f[0], f[1])
	r := realRunner(t, m)
	res, err := r.Infer(context.Background(), readAll(t, f[2]), pipeline.Options{TopK: 3})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dog.jpg: %+v", res[0].Classes)
	if c := res[0].Classes[0]; c.Label != "Samoyed" || c.Score < 0.7 {
		t.Errorf("top-1 %+v, want Samoyed scoring 0.7+", c)
	}
}

// repoModel loads a model of the repository's models folder, skipping when
// its ONNX file has not been generated (go run ./cmd/modelgen -out models).
func repoModel(t testing.TB, name string) *modelrepo.Model {
	t.Helper()
	if _, err := os.Stat(filepath.Join("../../models", name, "model.onnx")); err != nil {
		t.Skipf("generated model missing: models/%s/model.onnx (run go run ./cmd/modelgen -out models)", name)
	}
	m, err := modelrepo.Load("../../models", name)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestGeneratedModels runs the repository's generated models (seeded, not
// trained, so only the contract is checked: shapes, sizes, score ranges)
// end to end on a real photo.
func TestGeneratedModels(t *testing.T) {
	img := readAll(t, sharedFiles(t, "images/zidane.jpg")...)
	for _, name := range []string{"yolov8s", "resnet50", "mobilenetv3_large"} {
		t.Run(name, func(t *testing.T) {
			m := repoModel(t, name)
			r := realRunner(t, m)
			res, err := r.Infer(context.Background(), [][]byte{img[0], img[0]}, pipeline.Options{TopK: 3, Confidence: 0.01, MaxDetections: 20})
			if err != nil {
				t.Fatal(err)
			}
			for _, re := range res {
				if re.Width != 1280 || re.Height != 720 || re.BatchSize != 2 {
					t.Errorf("result %dx%d batch %d", re.Width, re.Height, re.BatchSize)
				}
				if m.Task == modelrepo.TaskClassify && len(re.Classes) != 3 {
					t.Errorf("%d classes, want 3", len(re.Classes))
				}
				if len(re.Detections) > 20 {
					t.Errorf("%d detections over max 20", len(re.Detections))
				}
			}
		})
	}
}

// BenchmarkInferYOLOv8s is the whole synchronous pipeline (decode,
// letterbox, fill, ONNX Runtime CPU, NMS) on the generated YOLOv8s.
func BenchmarkInferYOLOv8s(b *testing.B) {
	m := repoModel(b, "yolov8s")
	p := filepath.Join(shared, "images/bus.jpg")
	img, err := os.ReadFile(p)
	if err != nil {
		b.Skipf("real test data missing: ../shared/testdata/images/bus.jpg")
	}
	if err := onnxrt.Init(testenv.ORTLib(b)); err != nil {
		b.Fatal(err)
	}
	eng, err := onnxrt.NewForModel(m, onnxrt.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer eng.Close()
	r, err := pipelinetest.New(m, eng, pipeline.PreprocessOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	b.ReportAllocs()
	var res []pipeline.Result
	for b.Loop() {
		if res, err = r.Infer(context.Background(), [][]byte{img}, pipeline.Options{}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "images/s")
	t := res[0].Timings
	b.ReportMetric(float64(t.Decode.Microseconds())/1000, "decode-ms")
	b.ReportMetric(float64(t.Preprocess.Microseconds())/1000, "preprocess-ms")
	b.ReportMetric(float64(t.Inference.Microseconds())/1000, "inference-ms")
	b.ReportMetric(float64(t.Postprocess.Microseconds())/1000, "postprocess-ms")
}
