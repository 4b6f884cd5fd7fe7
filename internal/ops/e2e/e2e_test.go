// Package e2e_test runs the real server (server.Run on the real int8
// models of the shared test data, ONNX Runtime CPU) with the metrics,
// tracing, request-id logging and readiness wired as infer-server wires
// them, sends real traffic, and checks what operations see: /metrics,
// /readyz, gRPC health, logs and traces.
package e2e_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/metricstest"
	"github.com/visionserve/visionserve/internal/metrics/nvmlsource"
	"github.com/visionserve/visionserve/internal/ops"
	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/internal/server/servertest"
	"github.com/visionserve/visionserve/internal/telemetry"
	"github.com/visionserve/visionserve/internal/testenv"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// logBuffer collects the server's JSON log lines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestOperationsOfARealServer(t *testing.T) {
	repo := servertest.Repo(t, servertest.MobileNetV2, servertest.YOLOv8n)
	lib := testenv.ORTLib(t)
	for _, k := range []string{"OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"} {
		t.Setenv(k, "")
	}
	ctx := context.Background()

	// Wiring as cmd/infer-server/observability.go does it, with an
	// in-memory span exporter.
	var logs logBuffer
	log, err := telemetry.NewLogger(&logs, telemetry.LogJSON, slog.LevelDebug)
	if err != nil {
		t.Fatal(err)
	}
	spans := tracetest.NewInMemoryExporter()
	shutdownTracing, err := telemetry.Setup(ctx, telemetry.Options{Exporter: spans, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer shutdownTracing(ctx)
	reg := metrics.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	gpus, reason := nvmlsource.Open(nil, nil)
	defer gpus.Close()
	if err := metrics.RegisterGPU(reg, gpus.GPUSource(), reason, log); err != nil {
		t.Fatal(err)
	}

	cfg := config.Default()
	cfg.ORTLib = lib
	cfg.ModelRepo, cfg.Backend = repo, "ort-cpu"
	cfg.GRPCAddr, cfg.HTTPAddr, cfg.RESTAddr = "127.0.0.1:0", "127.0.0.1:0", ""
	cfg.GracePeriod = 10 * time.Second
	stop := make(chan os.Signal, 1)
	type addrs struct{ grpc, http net.Addr }
	listening := make(chan addrs, 1)
	done := make(chan error, 1)
	go func() {
		opts := server.ObservedRunOptions(log, reg, m)
		opts.Stop = stop
		opts.OnListen = func(g, h net.Addr) { listening <- addrs{g, h} }
		done <- server.Run(ctx, cfg, opts)
	}()
	var a addrs
	select {
	case a = <-listening:
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("server did not listen")
	}
	base := "http://" + a.http.String()
	conn, err := grpc.NewClient(a.grpc.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)

	// Until warm, /readyz and gRPC health agree that it is not ready;
	// then both say ready.
	deadline := time.Now().Add(3 * time.Minute)
	for {
		code, body := get(t, base+ops.ReadyzPath)
		st := healthStatus(t, health, server.VisionServiceName)
		if code == 200 {
			if st != healthpb.HealthCheckResponse_SERVING {
				// Readiness sets health before /readyz can read it.
				t.Fatalf("/readyz 200 but health %v", st)
			}
			break
		}
		if code != 503 || !(strings.HasPrefix(body, "loading") || strings.HasPrefix(body, "starting")) {
			t.Fatalf("/readyz while warming up: %d %q", code, body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready after 3 minutes: %q", body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, svc := range server.HealthServices {
		if st := healthStatus(t, health, svc); st != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q = %v once ready", svc, st)
		}
	}
	if code, _ := get(t, base+ops.HealthzPath); code != 200 {
		t.Errorf("/healthz = %d", code)
	}

	// Traffic: classify twice, detect once, one unknown model, a stream.
	vision := visionv1.NewVisionServiceClient(conn)
	dog := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: servertest.Image(t, "dog.jpg")}}
	bus := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: servertest.Image(t, "bus.jpg")}}
	idCtx := metadata.AppendToOutgoingContext(ctx, telemetry.RequestIDHeader, "e2e-dog-1")
	var header metadata.MD
	cls, err := vision.Classify(idCtx, &visionv1.ClassifyRequest{Model: servertest.MobileNetV2, Images: []*visionv1.Image{dog, dog}}, grpc.Header(&header))
	if err != nil {
		t.Fatal(err)
	}
	if got := header.Get(telemetry.RequestIDHeader); len(got) != 1 || got[0] != "e2e-dog-1" {
		t.Errorf("x-request-id echoed %v", got)
	}
	// Every response says which backend served it and where its time went.
	for _, r := range cls.Results {
		tm := r.GetTimings()
		if r.Backend != "ort-cpu" || tm.GetInference().AsDuration() <= 0 || tm.GetDecode().AsDuration() <= 0 || tm.GetTotal().AsDuration() <= 0 {
			t.Errorf("result backend %q timings %v", r.Backend, tm)
		}
	}
	if _, err := vision.Classify(ctx, &visionv1.ClassifyRequest{Model: servertest.MobileNetV2, Images: []*visionv1.Image{dog}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vision.Detect(ctx, &visionv1.DetectRequest{Model: servertest.YOLOv8n, Images: []*visionv1.Image{bus}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vision.Classify(ctx, &visionv1.ClassifyRequest{Model: "no-such-model", Images: []*visionv1.Image{dog}}); status.Code(err) != codes.NotFound {
		t.Errorf("unknown model: %v", err)
	}
	stream, err := vision.StreamClassify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const frames = 3
	for i := range frames {
		req := &visionv1.StreamRequest{FrameId: uint64(i), Image: dog}
		if i == 0 {
			req.Model = servertest.MobileNetV2
		}
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	stream.CloseSend()
	// Every frame is answered or counted in the next answer's
	// dropped_frames.
	answered := 0
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		answered += 1 + int(r.GetDroppedFrames())
	}
	if answered != frames {
		t.Errorf("%d of %d frames answered or counted dropped", answered, frames)
	}

	// What Prometheus would scrape.
	f := scrape(t, base+ops.MetricsPath)
	mobilenet := map[string]string{"model": servertest.MobileNetV2, "backend": "ort-cpu"}
	with := func(extra map[string]string) map[string]string {
		out := map[string]string{}
		for k, v := range mobilenet {
			out[k] = v
		}
		for k, v := range extra {
			out[k] = v
		}
		return out
	}
	ok := with(map[string]string{"code": "OK"})
	// Frames sent faster than served may be answered as dropped.
	dropped := max(value(f, metrics.StreamFramesDropped, mobilenet), 0)
	served := frames - dropped
	if got := value(f, metrics.RequestsTotal, ok); got != 2+served {
		t.Errorf("OK requests of mobilenetv2 = %v, want %v (2 calls, %v of %d frames served)", got, 2+served, served, frames)
	}
	if got := value(f, metrics.ImagesTotal, ok); got != 3+served {
		t.Errorf("OK images of mobilenetv2 = %v, want %v", got, 3+served)
	}
	if got := value(f, metrics.RequestsTotal, map[string]string{"model": metrics.UnknownModel, "code": "NotFound"}); got != 1 {
		t.Errorf("NotFound requests = %v, want 1", got)
	}
	for _, stage := range []string{metrics.StageQueue, metrics.StageDecode, metrics.StagePreprocess, metrics.StageInference, metrics.StagePostprocess, metrics.StageTotal} {
		if got := value(f, metrics.StageDurationSeconds, with(map[string]string{"stage": stage})); got <= 0 {
			t.Errorf("stage %s: no observations", stage)
		}
	}
	// The warm-up batch counts too: it is a real batch.
	if got := value(f, metrics.BatchSize, mobilenet); got < 2 {
		t.Errorf("mobilenetv2 batches observed = %v", got)
	}
	var released float64
	for _, s := range f[metrics.BatchesTotal].GetMetric() {
		released += s.GetCounter().GetValue()
	}
	if released < 4 {
		t.Errorf("batches released = %v", released)
	}
	for _, name := range []string{servertest.MobileNetV2, servertest.YOLOv8n} {
		labels := map[string]string{"model": name, "backend": "ort-cpu"}
		if value(f, metrics.ModelBackendInfo, labels) != 1 || value(f, metrics.ModelLoadSeconds, labels) <= 0 || value(f, metrics.ModelWarmupSeconds, labels) <= 0 {
			t.Errorf("%s: backend info, load or warm-up series missing", name)
		}
		if find(f, metrics.QueueDepth, map[string]string{"model": name}) == nil {
			t.Errorf("%s: no queue depth", name)
		}
	}
	if value(f, metrics.InflightRequests, map[string]string{"model": servertest.MobileNetV2}) != 0 {
		t.Error("requests still in flight after all were answered")
	}
	if gpus == nil {
		for name := range f {
			if strings.HasPrefix(name, "visionserve_gpu_") {
				t.Errorf("%s present without a GPU (%s)", name, reason)
			}
		}
	}

	// Logs: the request's lines carry its id.
	if !strings.Contains(logs.String(), `"request_id":"e2e-dog-1"`) {
		t.Error("no log line carries the client's request id")
	}

	// Traces: the Classify span carries the request id, has the stage
	// spans as children, and a batch span links to it.
	if tp, ok := otel.GetTracerProvider().(*sdktrace.TracerProvider); ok {
		if err := tp.ForceFlush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	checkTrace(t, spans.GetSpans(), "e2e-dog-1")

	// Draining: readiness goes first, before the server stops.
	stop <- os.Interrupt
	sawDrain := false
	for {
		code, body, err := tryGet(base + ops.ReadyzPath)
		if err != nil {
			break // the HTTP server has gone, last of all
		}
		if code == 503 && strings.HasPrefix(body, "draining") {
			sawDrain = true
		} else if code != 503 {
			// Still ready: the stop has not been seen yet.
			time.Sleep(time.Millisecond)
			continue
		}
		if sawDrain {
			break
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after the stop signal: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Run did not return after the stop signal")
	}
	if !sawDrain {
		t.Log("the drain was too quick to be seen on /readyz")
	}
}

func checkTrace(t *testing.T, spans tracetest.SpanStubs, requestID string) {
	t.Helper()
	var request trace.SpanContext
	for _, s := range spans {
		for _, a := range s.Attributes {
			if string(a.Key) == telemetry.SpanAttrRequestID && a.Value.AsString() == requestID && s.Name == "visionserve.v1.VisionService/Classify" {
				request = s.SpanContext
			}
		}
	}
	if !request.IsValid() {
		t.Fatalf("no Classify span with request id %s among %d spans", requestID, len(spans))
	}
	stages := map[string]bool{}
	batches := map[trace.SpanID]bool{} // batch spans linked to the request
	for _, s := range spans {
		if s.Parent.SpanID() == request.SpanID() {
			stages[s.Name] = true
		}
		if s.Name == telemetry.SpanBatch {
			for _, l := range s.Links {
				if l.SpanContext.SpanID() == request.SpanID() {
					batches[s.SpanContext.SpanID()] = true
				}
			}
		}
	}
	linked := len(batches) > 0
	engineRun := false
	for _, s := range spans {
		engineRun = engineRun || (s.Name == telemetry.SpanInference && batches[s.Parent.SpanID()])
	}
	if linked && !engineRun {
		t.Error("the batch that served the request has no engine run span")
	}
	for _, stage := range []string{telemetry.SpanDecode, telemetry.SpanQueue, telemetry.SpanPreprocess, telemetry.SpanInference, telemetry.SpanPostprocess} {
		if !stages[stage] {
			t.Errorf("Classify span has no %s child (children: %v)", stage, stages)
		}
	}
	if !linked {
		t.Error("no batch span links to the Classify span")
	}
}

func healthStatus(t *testing.T, h healthpb.HealthClient, svc string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	r, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		t.Fatalf("health of %q: %v", svc, err)
	}
	return r.GetStatus()
}

func tryGet(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	code, body, err := tryGet(url)
	if err != nil {
		t.Fatal(err)
	}
	return code, body
}

func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	f, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func find(f map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
	if ms := metricstest.Matching(f[name], want); len(ms) > 0 {
		return ms[0]
	}
	return nil
}

// value is a counter's or gauge's value, or a histogram's count; -1 when
// the series is missing.
func value(f map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	m := find(f, name, want)
	switch {
	case m == nil:
		return -1
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return -1
}

var _ prometheus.Gatherer = (*prometheus.Registry)(nil)
