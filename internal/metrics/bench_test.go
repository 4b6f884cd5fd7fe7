package metrics_test

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/visionserve/visionserve/internal/metrics"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// BenchmarkUnaryInterceptor measures what the metrics cost one Classify
// call of 8 images: the in-flight gauge, the counters and 5 stage
// observations per image.
func BenchmarkUnaryInterceptor(b *testing.B) {
	m, err := metrics.New(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	m.ModelLoaded("resnet50", "ort-cpu", 0, 0)
	const images = 8
	req := &visionv1.ClassifyRequest{Model: "resnet50", Images: make([]*visionv1.Image, images)}
	resp := &visionv1.ClassifyResponse{}
	for range images {
		resp.Results = append(resp.Results, &visionv1.ImageResult{Timings: fakeTimings})
	}
	handler := func(context.Context, any) (any, error) { return resp, nil }
	icpt := m.UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: "/visionserve.v1.VisionService/Classify"}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := icpt(ctx, req, info, handler); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*images), "ns/image")
}
