package enginetest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
)

// Models OpenCV 4.6 cannot import must fail to load with an error naming
// the model, and this process must live on: each would abort it if loaded
// in-process.
func TestOpenCVRefusesUnsupportedModels(t *testing.T) {
	tests := []struct {
		name string
		path func(t *testing.T) string
		opts cvdnn.Options
		want string // part of OpenCV's own complaint
	}{
		{"generated yolov8s, full graph with DFL", func(t *testing.T) string { return generated(t, "yolov8s").Path }, cvdnn.Options{FullGraph: true}, "cv::Exception"},
		{"real yolov8n int8 (DynamicQuantizeLinear, ConvInteger)", func(t *testing.T) string { return testdata(t, "models/yolov8n_int8.onnx") }, cvdnn.Options{}, "DynamicQuantizeLinear"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.path(t)
			tc.opts.CacheDir = t.TempDir()
			e, err := cvdnn.New(context.Background(), path, tc.opts)
			if err == nil {
				e.Close()
				t.Fatalf("OpenCV loaded %s", path)
			}
			t.Logf("%.600s", err)
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error does not name the model %s and %q: %v", path, tc.want, err)
			}
		})
	}
	// The probe alone says the same about the full yolov8s graph.
	m := generated(t, "yolov8s")
	if err := cvdnn.Probe(context.Background(), m.Path); err == nil || !strings.Contains(err.Error(), m.Path) {
		t.Errorf("Probe of the full yolov8s graph: %v, want an error naming it", err)
	}
}

// A probe still running at its deadline is killed; the error says so and
// names the model.
func TestProbeKilledAtDeadline(t *testing.T) {
	m := generated(t, "resnet50")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	// Loading 100 MB of weights and a batch of 8 takes seconds.
	err := cvdnn.ProbeWith(ctx, cvdnn.ProbeSpec{Model: m.Path, Batches: []int{8}})
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") || !strings.Contains(err.Error(), m.Path) {
		t.Fatalf("probe cut at 300ms: %v (after %v)", err, took)
	}
	if took > 10*time.Second {
		t.Errorf("probe returned %v after its deadline", took)
	}
	t.Logf("after %v: %v", took, err)
}
