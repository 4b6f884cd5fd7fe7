package gpu

import (
	"context"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkBindingCPU measures the IoBinding path on its CPU twin with the
// small conv model: the overhead the binding adds per batch, not a model
// speed (the GPU benchmarks are behind the gpu build tag).
func BenchmarkBindingCPU(b *testing.B) {
	initRuntime(b)
	path := convModel(b)
	s, err := OpenSession(path, SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	e, err := NewEngine(s, EngineOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	const n, c, h, w = 8, 3, 8, 8
	data, free, err := e.AllocBatch(n, c, h, w)
	if err != nil {
		b.Fatal(err)
	}
	defer free()
	copy(data, randomInput(3, len(data)))
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := e.RunData(ctx, data, n, c, h, w); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	var total time.Duration
	for _, d := range lat {
		total += d
	}
	b.ReportMetric(float64(n*len(lat))/total.Seconds(), "images/s")
	b.ReportMetric(float64(lat[len(lat)/2])/1e6, "p50_ms")
	b.ReportMetric(float64(lat[min(len(lat)-1, len(lat)*99/100)])/1e6, "p99_ms")
}

// TestNoOpenCVDependency keeps package gpu runnable where OpenCV is absent:
// nothing it imports, tests included, may pull in gocv.
func TestNoOpenCVDependency(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not on PATH (a GPU machine runs the prebuilt test binary)")
	}
	out, err := exec.Command(goTool, "list", "-test", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "gocv") || strings.HasSuffix(dep, "/pkg/pipeline") {
			t.Errorf("package gpu depends on %s; GPU binaries must build and run without OpenCV", dep)
		}
	}
}

// BenchmarkMixedBatchesCPU is BenchmarkGPUMixedBatches on the CPU twin
// (the IoBinding engine on ONNX Runtime's CPU provider, the small conv
// model), with each padding policy: it rehearses the GPU benchmark and
// shows what padding costs where a shape change is free.
func BenchmarkMixedBatchesCPU(b *testing.B) {
	initRuntime(b)
	path := convModel(b)
	for _, p := range []struct {
		name string
		pad  []int
	}{{"none", nil}, {"warmed", []int{1, 4, 8}}, {"max", []int{8}}} {
		b.Run("pad="+p.name, func(b *testing.B) {
			s, err := OpenSession(path, SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			e, err := NewEngine(s, EngineOptions{PadBatchSizes: p.pad})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			benchMixed(b, e)
		})
	}
}

func benchMixed(b *testing.B, e *Engine) {
	in := e.Input()
	c, h, w := int(in.Shape[1]), int(in.Shape[2]), int(in.Shape[3])
	buf, free, err := e.AllocBatch(8, c, h, w)
	if err != nil {
		b.Fatal(err)
	}
	defer free()
	copy(buf, randomInput(2, len(buf)))
	sizes := make([]int, b.N)
	rng := rand.New(rand.NewPCG(7, 11))
	images := 0
	for i := range sizes {
		sizes[i] = 1 + rng.IntN(8)
		images += sizes[i]
	}
	lat := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	for _, n := range sizes {
		t0 := time.Now()
		if _, err := e.RunData(ctx, buf, n, c, h, w); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	wall := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / 1e6
	}
	b.ReportMetric(float64(images)/wall.Seconds(), "images/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
	b.ReportMetric(float64(e.Stats().PaddedBatches), "padded")
}
