package metrics_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/metricstest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeVision answers Classify with fixed stage timings, fails for images
// marked bad, and answers every stream frame, dropping odd frame ids.
type fakeVision struct {
	visionv1.UnimplementedVisionServiceServer
}

var fakeTimings = &visionv1.Timings{
	Queue:       durationpb.New(3 * time.Millisecond),
	Decode:      durationpb.New(2 * time.Millisecond),
	Preprocess:  durationpb.New(1 * time.Millisecond),
	Inference:   durationpb.New(20 * time.Millisecond),
	Postprocess: durationpb.New(500 * time.Microsecond),
}

func (fakeVision) Classify(_ context.Context, req *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	if req.GetModel() != "resnet50" {
		return nil, status.Errorf(codes.NotFound, "unknown model %q", req.GetModel())
	}
	resp := &visionv1.ClassifyResponse{Model: req.GetModel()}
	for _, img := range req.GetImages() {
		if string(img.GetEncoded()) == "bad" {
			return nil, status.Error(codes.InvalidArgument, "image 0: not an image")
		}
		resp.Results = append(resp.Results, &visionv1.ImageResult{Backend: "ort-cpu", BatchSize: 2, Timings: fakeTimings})
	}
	return resp, nil
}

func (fakeVision) StreamClassify(s grpc.BidiStreamingServer[visionv1.StreamRequest, visionv1.StreamResponse]) error {
	var skipped uint64
	for {
		req, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if string(req.GetImage().GetEncoded()) == "abort" {
			return status.Error(codes.InvalidArgument, "bad frame")
		}
		// Even frames are replaced by the next one (newest frame wins)
		// and counted in its response.
		if req.GetFrameId()%2 == 0 {
			skipped++
			continue
		}
		resp := &visionv1.StreamResponse{FrameId: req.GetFrameId(), DroppedFrames: skipped,
			Result: &visionv1.ImageResult{Backend: "ort-cpu", BatchSize: 1, Timings: fakeTimings}}
		skipped = 0
		if err := s.Send(resp); err != nil {
			return err
		}
	}
}

// serve starts a gRPC server with the metrics interceptors over an
// in-memory listener and returns a client; the server stops at cleanup.
func serve(t *testing.T, m *metrics.Metrics) visionv1.VisionServiceClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(m.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(m.StreamServerInterceptor()),
	)
	visionv1.RegisterVisionServiceServer(srv, fakeVision{})
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-done
	})
	return visionv1.NewVisionServiceClient(conn)
}

// scrape fetches /metrics from reg over HTTP, as Prometheus would, and
// parses the exposition text.
func scrape(t *testing.T, reg prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	ts := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer ts.Close()
	resp, err := ts.Client().Get(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: HTTP %d", resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing exposition: %v", err)
	}
	return families
}

// find returns the sample of family name whose labels include want, or nil.
func find(families map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
	if ms := metricstest.Matching(families[name], want); len(ms) > 0 {
		return ms[0]
	}
	return nil
}

func value(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	m := find(families, name, labels)
	if m == nil {
		t.Fatalf("%s%v: no such series", name, labels)
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	t.Fatalf("%s%v: unexpected type", name, labels)
	return 0
}

func TestMetricsAfterTraffic(t *testing.T) {
	reg := metrics.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("resnet50", "ort-cpu", 1500*time.Millisecond, 250*time.Millisecond)
	client := serve(t, m)
	ctx := context.Background()

	img := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: []byte("jpeg")}}
	bad := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: []byte("bad")}}
	for range 3 {
		if _, err := client.Classify(ctx, &visionv1.ClassifyRequest{Model: "resnet50", Images: []*visionv1.Image{img, img}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.Classify(ctx, &visionv1.ClassifyRequest{Model: "resnet50", Images: []*visionv1.Image{bad}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad image: got %v, want InvalidArgument", err)
	}
	if _, err := client.Classify(ctx, &visionv1.ClassifyRequest{Model: "no-such-model-" + strings.Repeat("x", 10), Images: []*visionv1.Image{img}}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown model: got %v, want NotFound", err)
	}

	// A stream of four frames: 1 and 3 served, each response counting
	// the frame before it as dropped.
	stream, err := client.StreamClassify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for id := range uint64(4) {
		req := &visionv1.StreamRequest{FrameId: id, Image: img}
		if id == 0 {
			req.Model = "resnet50"
		}
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	stream.CloseSend()
	for n := 0; ; n++ {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			if n != 2 {
				t.Fatalf("%d responses, want 2", n)
			}
			break
		}
		if err != nil || r.GetDroppedFrames() != 1 {
			t.Fatalf("response %d: %v dropped %d", n, err, r.GetDroppedFrames())
		}
	}

	f := scrape(t, reg)
	ok := map[string]string{"model": "resnet50", "backend": "ort-cpu", "code": "OK"}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{metrics.RequestsTotal, ok, 3 + 2}, // 3 calls + 2 served frames
		{metrics.ImagesTotal, ok, 6 + 2},
		{metrics.RequestsTotal, map[string]string{"model": "resnet50", "code": "InvalidArgument"}, 1},
		{metrics.ImagesTotal, map[string]string{"model": "resnet50", "code": "InvalidArgument"}, 1},
		// The unknown name must not become a label value.
		{metrics.RequestsTotal, map[string]string{"model": metrics.UnknownModel, "backend": "", "code": "NotFound"}, 1},
		{metrics.StreamFramesDropped, map[string]string{"model": "resnet50", "backend": "ort-cpu"}, 2},
		{metrics.InflightRequests, map[string]string{"model": "resnet50"}, 0},
		{metrics.ModelBackendInfo, map[string]string{"model": "resnet50", "backend": "ort-cpu"}, 1},
		{metrics.ModelLoadSeconds, map[string]string{"model": "resnet50", "backend": "ort-cpu"}, 1.5},
		{metrics.ModelWarmupSeconds, map[string]string{"model": "resnet50", "backend": "ort-cpu"}, 0.25},
		// Per image: 6 unary images + 2 served frames.
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "backend": "ort-cpu", "stage": metrics.StageInference}, 8},
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StageQueue}, 8},
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StageDecode}, 8},
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StagePreprocess}, 8},
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StagePostprocess}, 8},
		// Total: 3 successful calls + 2 served frames.
		{metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StageTotal}, 5},
	} {
		if got := value(t, f, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	inf := find(f, metrics.StageDurationSeconds, map[string]string{"stage": metrics.StageInference}).GetHistogram()
	if got, want := inf.GetSampleSum(), 8*0.020; got < want*0.999 || got > want*1.001 {
		t.Errorf("inference histogram sum = %v s, want %v s", got, want)
	}
	if find(f, "go_goroutines", nil) == nil || find(f, "process_cpu_seconds_total", nil) == nil {
		t.Error("Go and process collectors missing")
	}
	if strings.Contains(f[metrics.RequestsTotal].String(), "no-such-model") {
		t.Error("a client-chosen model name became a label value")
	}
}

func TestStreamEndingInErrorSettlesInflight(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("resnet50", "opencv", time.Second, time.Second)
	client := serve(t, m)
	stream, err := client.StreamClassify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	abort := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: []byte("abort")}}
	if err := stream.Send(&visionv1.StreamRequest{Model: "resnet50", Image: abort}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("got %v, want InvalidArgument", err)
	}
	f := scrape(t, reg)
	if got := value(t, f, metrics.InflightRequests, map[string]string{"model": "resnet50"}); got != 0 {
		t.Errorf("in flight after the stream ended = %v, want 0", got)
	}
	if got := value(t, f, metrics.RequestsTotal, map[string]string{"model": "resnet50", "backend": "opencv", "code": "InvalidArgument"}); got != 1 {
		t.Errorf("requests with InvalidArgument = %v, want 1", got)
	}
}

func TestBatchesAndQueue(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("yolov8s", "ort-cuda", time.Second, time.Second)
	m.ObserveBatch("yolov8s", "ort-cuda", 8, metrics.ReasonFull)
	m.ObserveBatch("yolov8s", "ort-cuda", 3, metrics.ReasonDelay)
	m.ObserveBatch("yolov8s", "ort-cuda", 3, metrics.ReasonDelay)
	depth := 5
	m.TrackQueue("yolov8s", func() metrics.QueueStats {
		return metrics.QueueStats{Depth: depth, OldestAge: 40 * time.Millisecond}
	})
	f := scrape(t, reg)
	yolo := map[string]string{"model": "yolov8s", "backend": "ort-cuda"}
	if got := value(t, f, metrics.BatchSize, yolo); got != 3 {
		t.Errorf("batch size observations = %v, want 3", got)
	}
	if got := find(f, metrics.BatchSize, yolo).GetHistogram().GetSampleSum(); got != 14 {
		t.Errorf("batch size sum = %v, want 14", got)
	}
	for reason, want := range map[string]float64{metrics.ReasonFull: 1, metrics.ReasonDelay: 2} {
		if got := value(t, f, metrics.BatchesTotal, map[string]string{"model": "yolov8s", "reason": reason}); got != want {
			t.Errorf("batches released for %s = %v, want %v", reason, got, want)
		}
	}
	if got := value(t, f, metrics.QueueDepth, map[string]string{"model": "yolov8s"}); got != 5 {
		t.Errorf("queue depth = %v, want 5", got)
	}
	if got := value(t, f, metrics.QueueOldestAgeSeconds, map[string]string{"model": "yolov8s"}); got != 0.04 {
		t.Errorf("oldest age = %v, want 0.04", got)
	}
	// The depth is read at scrape time, not remembered.
	depth = 0
	if got := value(t, scrape(t, reg), metrics.QueueDepth, map[string]string{"model": "yolov8s"}); got != 0 {
		t.Errorf("queue depth after draining = %v, want 0", got)
	}
	m.ModelUnloaded("yolov8s")
	f = scrape(t, reg)
	if f[metrics.QueueDepth] != nil || f[metrics.ModelBackendInfo] != nil {
		t.Error("queue and backend series remain after unloading the model")
	}
}

// TestIdleModelReportsZeroInflight: the HPA's metric must be there, at
// 0, before the first request (found missing by make test-k8s: the
// adapter answered "metric not found" for idle pods).
func TestIdleModelReportsZeroInflight(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	if find(scrape(t, reg), metrics.InflightRequests, map[string]string{"model": "resnet50"}) != nil {
		t.Fatal("in-flight series before the model loaded")
	}
	m.ModelLoaded("resnet50", "ort-cpu", time.Second, time.Second)
	if v := value(t, scrape(t, reg), metrics.InflightRequests, map[string]string{"model": "resnet50"}); v != 0 {
		t.Fatalf("idle model: %g in flight, want 0", v)
	}
}

func TestModelMovingBackendKeepsOneInfoSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("resnet50", "ort-cuda", time.Second, time.Second)
	m.ModelLoaded("resnet50", "ort-cpu", time.Second, time.Second)
	f := scrape(t, reg)
	if n := len(f[metrics.ModelBackendInfo].GetMetric()); n != 1 {
		t.Fatalf("%d backend info series, want 1", n)
	}
	if find(f, metrics.ModelBackendInfo, map[string]string{"backend": "ort-cpu"}) == nil {
		t.Error("backend info does not name the current backend")
	}
}

func TestNilMetricsRecordsNothing(t *testing.T) {
	var m *metrics.Metrics
	m.ModelLoaded("a", "b", 1, 1)
	m.ObserveRequest("a", "OK", 1, time.Second)
	m.ObserveImage("a", metrics.Timings{Queue: time.Second})
	m.ObserveBatch("a", "b", 1, metrics.ReasonFull)
	m.ObserveDroppedImages("a", 1, "deadline")
	m.InflightAdd("a", 1)
	m.StreamFramesDropped("a", 1)
	m.TrackQueue("a", nil)
	m.ModelUnloaded("a")
}

func TestNewRefusesARegistryThatHasThem(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := metrics.New(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := metrics.New(reg); err == nil {
		t.Fatal("registering twice on one registry succeeded")
	}
}

// recvStream is a grpc.ServerStream whose every RecvMsg yields a frame.
type recvStream struct{ grpc.ServerStream }

func (recvStream) Context() context.Context { return context.Background() }
func (recvStream) RecvMsg(m any) error {
	m.(*visionv1.StreamRequest).Model = "resnet50"
	return nil
}

// TestFrameReadAfterHandlerReturnsIsNotCounted: a stream's receiver
// goroutine may read one more frame after the handler returned (it ends
// only when gRPC ends the stream). That frame must not raise the
// in-flight gauge for good, which would ratchet the autoscaler up.
func TestFrameReadAfterHandlerReturnsIsNotCounted(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("resnet50", "ort-cpu", time.Second, time.Second)
	var late grpc.ServerStream
	err = m.StreamServerInterceptor()(nil, recvStream{}, &grpc.StreamServerInfo{}, func(_ any, ss grpc.ServerStream) error {
		late = ss
		return ss.RecvMsg(&visionv1.StreamRequest{}) // one frame, never answered
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := late.RecvMsg(&visionv1.StreamRequest{}); err != nil {
		t.Fatal(err)
	}
	if got := value(t, scrape(t, reg), metrics.InflightRequests, map[string]string{"model": "resnet50"}); got != 0 {
		t.Errorf("in flight = %v after the stream ended, want 0", got)
	}
}
