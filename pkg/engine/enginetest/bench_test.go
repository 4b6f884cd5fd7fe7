package enginetest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/visionserve/visionserve/internal/testenv/onnxrttest"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// BenchmarkEngine measures the engine stage alone: a preprocessed batch
// through the session, for the generated models on both CPU engines.
// It reports images/s and per-batch p50/p99 latency. One untimed run warms
// the session first, so -benchtime=1x measures a steady run.
func BenchmarkEngine(b *testing.B) {
	cases := []struct {
		model   string
		batches []int
	}{
		{"resnet50", []int{1, 8}},
		{"mobilenetv3_large", []int{1, 8}},
		{"yolov8s", []int{1}},
	}
	for _, bc := range cases {
		b.Run(bc.model, func(b *testing.B) {
			m := generated(b, bc.model)
			for _, kind := range []string{onnxrt.Backend, cvdnn.Backend} {
				b.Run(kind, func(b *testing.B) {
					e := benchEngine(b, kind, m, slices.Max(bc.batches))
					for _, n := range bc.batches {
						batch := benchBatch(b, m, n)
						b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) { runEngineBench(b, e, batch) })
					}
				})
			}
		})
	}
}

// benchEngine loads the engine once for all batch sizes; sub-benchmarks
// are re-entered as b.N grows, and a model load per entry would dwarf
// the runs.
func benchEngine(b *testing.B, kind string, m *modelrepo.Model, maxBatch int) engine.Engine {
	b.Helper()
	onnxrttest.Init(b)
	var e engine.Engine
	var err error
	switch kind {
	case onnxrt.Backend:
		e, err = onnxrt.NewForModel(m, onnxrt.Options{})
	case cvdnn.Backend:
		e, err = cvdnn.NewForModel(context.Background(), m, cvdnn.Options{MaxBatch: maxBatch})
	}
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return e
}

// benchBatch is a batch of n copies of a preprocessed test image.
func benchBatch(b *testing.B, m *modelrepo.Model, n int) *engine.Batch {
	b.Helper()
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		b.Fatal(err)
	}
	p, err := pre.Prepare(testImages(b)[0])
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	c, h, w := pre.InputShape()
	batch := engine.NewBatch(n, c, h, w)
	batch.N = n
	for i := range n {
		if err := p.Fill(batch.Slot(i)); err != nil {
			b.Fatal(err)
		}
	}
	return batch
}

func runEngineBench(b *testing.B, e engine.Engine, batch *engine.Batch) {
	ctx := context.Background()
	if _, err := e.Run(ctx, batch); err != nil { // warm-up, untimed
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		t := time.Now()
		if _, err := e.Run(ctx, batch); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t))
	}
	b.StopTimer()
	reportLatency(b, lat, batch.N)
}

// reportLatency reports images/s and the p50/p99 batch latency in ms.
func reportLatency(b *testing.B, lat []time.Duration, perRun int) {
	if len(lat) == 0 {
		return
	}
	var total time.Duration
	for _, d := range lat {
		total += d
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		i := min(int(p*float64(len(lat))), len(lat)-1)
		return float64(lat[i].Microseconds()) / 1000
	}
	b.ReportMetric(float64(len(lat)*perRun)/total.Seconds(), "images/s")
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
