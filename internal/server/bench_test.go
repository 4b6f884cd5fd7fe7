package server

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/visionserve/visionserve/internal/server/servertest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// latencies collects per-call durations from parallel benchmark workers
// and reports images/s and p50/p99 in milliseconds.
type latencies struct {
	mu sync.Mutex // guards d
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *latencies) report(b *testing.B, images int, elapsed time.Duration) {
	slices.Sort(l.d)
	pct := func(p float64) float64 {
		if len(l.d) == 0 {
			return 0
		}
		return float64(l.d[min(len(l.d)-1, int(p*float64(len(l.d))))]) / 1e6
	}
	b.ReportMetric(float64(images)/elapsed.Seconds(), "images/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
}

func benchClassify(b *testing.B, c visionv1.VisionServiceClient, model string, img []byte) {
	req := &visionv1.ClassifyRequest{Model: model, Images: []*visionv1.Image{encoded(img)}}
	var lat latencies
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			t := time.Now()
			if _, err := c.Classify(context.Background(), req); err != nil {
				b.Error(err)
				return
			}
			lat.add(time.Since(t))
		}
	})
	elapsed := time.Since(start)
	b.StopTimer()
	lat.report(b, len(lat.d), elapsed)
}

// BenchmarkClassifyFakeEngine measures the serving layer itself: gRPC,
// decoding a small JPEG, preprocessing, batching and postprocessing, with
// an engine that costs nothing.
func BenchmarkClassifyFakeEngine(b *testing.B) {
	e := newEnv(b)
	benchClassify(b, e.vision, "cls", jpegBytes(b, 320, 240, 128))
}

// BenchmarkClassifyMobileNetV2 serves the real int8 MobileNetV2 on ONNX
// Runtime over loopback TCP and classifies dog.jpg.
func BenchmarkClassifyMobileNetV2(b *testing.B) {
	repo := servertest.Repo(b, servertest.MobileNetV2)
	conn, stop, done := realServer(b, repo, "ort-cpu")
	benchClassify(b, visionv1.NewVisionServiceClient(conn), servertest.MobileNetV2, servertest.Image(b, "dog.jpg"))
	stopServer(b, stop, done)
}
