package ops_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/visionserve/visionserve/internal/ops"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// start runs an ops server on a free port and returns its base URL; it
// shuts down at cleanup.
func start(t *testing.T, g prometheus.Gatherer, r ops.ReadinessChecker) string {
	t.Helper()
	s, err := ops.NewServer(ops.Options{Addr: "127.0.0.1:0", Gatherer: g, Readiness: r})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Error(err)
		}
	})
	return "http://" + s.Addr().String()
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// healthOf asks the gRPC health server about every service and fails
// unless all say want.
func healthOf(t *testing.T, hs *health.Server, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	for _, svc := range ops.HealthServices {
		resp, err := hs.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatalf("health of %q: %v", svc, err)
		}
		if resp.GetStatus() != want {
			t.Errorf("health of %q = %v, want %v", svc, resp.GetStatus(), want)
		}
	}
}

func TestReadinessLifecycle(t *testing.T) {
	hs := health.NewServer()
	ready := ops.NewReadiness(hs)
	reg := prometheus.NewRegistry()
	probes := prometheus.NewCounter(prometheus.CounterOpts{Name: "visionserve_test_total", Help: "test"})
	reg.MustRegister(probes)
	probes.Add(3)
	base := start(t, reg, ready)

	steps := []struct {
		name   string
		do     func()
		code   int
		body   string
		health healthpb.HealthCheckResponse_ServingStatus
	}{
		{"new", func() {}, 503, "starting", healthpb.HealthCheckResponse_NOT_SERVING},
		{"expecting two models", func() { ready.Expect("resnet50", "yolov8s") }, 503, "loading: 2 of 2 models not warmed up: resnet50, yolov8s", healthpb.HealthCheckResponse_NOT_SERVING},
		{"one warm", func() { ready.Warmed("yolov8s") }, 503, "loading: 1 of 2 models not warmed up: resnet50", healthpb.HealthCheckResponse_NOT_SERVING},
		{"both warm", func() { ready.Warmed("resnet50") }, 200, "ready", healthpb.HealthCheckResponse_SERVING},
		{"expect again keeps state", func() { ready.Expect("resnet50") }, 200, "ready", healthpb.HealthCheckResponse_SERVING},
		{"a third model", func() { ready.Expect("mobilenetv3_large") }, 503, "loading: 1 of 3 models not warmed up: mobilenetv3_large", healthpb.HealthCheckResponse_NOT_SERVING},
		{"removed, not waited for", func() { ready.Forget("mobilenetv3_large") }, 200, "ready", healthpb.HealthCheckResponse_SERVING},
		{"draining", ready.Drain, 503, "draining", healthpb.HealthCheckResponse_NOT_SERVING},
		{"warm after drain stays down", func() { ready.Warmed("resnet50") }, 503, "draining", healthpb.HealthCheckResponse_NOT_SERVING},
	}
	for _, s := range steps {
		s.do()
		code, body := get(t, base+ops.ReadyzPath)
		if code != s.code || !strings.Contains(body, s.body) {
			t.Errorf("%s: /readyz = %d %q, want %d containing %q", s.name, code, body, s.code, s.body)
		}
		healthOf(t, hs, s.health)
		// Liveness does not depend on readiness.
		if code, _ := get(t, base+ops.HealthzPath); code != 200 {
			t.Errorf("%s: /healthz = %d", s.name, code)
		}
	}

	code, body := get(t, base+ops.MetricsPath)
	if code != 200 || !strings.Contains(body, "visionserve_test_total 3") {
		t.Errorf("/metrics = %d %q", code, body)
	}
	resp, err := http.Post(base+ops.ReadyzPath, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /readyz = %d, want 405", resp.StatusCode)
	}
	resp, err = http.Head(base + ops.HealthzPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("HEAD /healthz = %d", resp.StatusCode)
	}
}

func TestFailedModelKeepsServerUnready(t *testing.T) {
	ready := ops.NewReadiness(nil)
	ready.Expect("resnet50", "yolov8s")
	ready.Warmed("resnet50")
	ready.Failed("yolov8s", errors.New("session: "+strings.Repeat("x", 2000)))
	base := start(t, prometheus.NewRegistry(), ready)
	code, body := get(t, base+ops.ReadyzPath)
	if code != 503 || !strings.HasPrefix(body, "failed: yolov8s") {
		t.Errorf("/readyz = %d %q", code, body)
	}
	if len(body) > 600 {
		t.Errorf("/readyz body is %d bytes; a probe's body should be short", len(body))
	}
}

// blockingEngine runs a batch only when release is closed.
type blockingEngine struct {
	running chan struct{}
	release chan struct{}
}

func (e *blockingEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	close(e.running)
	<-e.release
	return []engine.Tensor{{Name: "out", Shape: []int64{int64(b.N), 1}, Data: make([]float32, b.N)}}, nil
}
func (*blockingEngine) Backend() string { return "fake" }
func (*blockingEngine) Close() error    { return nil }

type warmItem struct{}

func (warmItem) Fill([]float32) error                                { return nil }
func (warmItem) Postprocess([]engine.Tensor, int, batcher.Run) error { return nil }

// TestReadyOnlyAfterWarmUpBatch warms a model up with a real batch through
// the batcher and checks that the server is not ready while the batch is
// still running and is once it ran.
func TestReadyOnlyAfterWarmUpBatch(t *testing.T) {
	hs := health.NewServer()
	ready := ops.NewReadiness(hs)
	eng := &blockingEngine{running: make(chan struct{}), release: make(chan struct{})}
	b, err := batcher.New(batcher.Config{Model: "resnet50", MaxBatchSize: 2, C: 1, H: 1, W: 1, Engines: []engine.Engine{eng}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())
	ready.Expect("resnet50")

	done := make(chan error, 1)
	go func() {
		done <- ready.WarmUp(context.Background(), "resnet50", func(ctx context.Context) error {
			return b.Submit(ctx, "warmup", []batcher.Item{warmItem{}, warmItem{}})
		})
	}()
	<-eng.running
	if ok, why := ready.Ready(); ok {
		t.Fatal("ready while the warm-up batch is still running")
	} else if !strings.Contains(why, "resnet50") {
		t.Errorf("reason %q does not name the model", why)
	}
	healthOf(t, hs, healthpb.HealthCheckResponse_NOT_SERVING)
	close(eng.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if ok, why := ready.Ready(); !ok {
		t.Fatalf("not ready after warm-up: %s", why)
	}
	healthOf(t, hs, healthpb.HealthCheckResponse_SERVING)

	// A warm-up that fails leaves the server unready.
	err = ready.WarmUp(context.Background(), "yolov8s", func(context.Context) error { return errors.New("engine: bad graph") })
	if err == nil {
		t.Fatal("WarmUp hid the failure")
	}
	if ok, why := ready.Ready(); ok || !strings.Contains(why, "bad graph") {
		t.Errorf("after a failed warm-up: ready=%v %q", ok, why)
	}
	healthOf(t, hs, healthpb.HealthCheckResponse_NOT_SERVING)
}

func TestStartFailsOnBusyPort(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	s, err := ops.NewServer(ops.Options{Addr: lis.Addr().String(), Gatherer: prometheus.NewRegistry(), Readiness: ops.NewReadiness(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err == nil {
		s.Shutdown(context.Background())
		t.Fatal("Start succeeded on a port in use")
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown of a server that never started: %v", err)
	}
}

func TestNewServerNeedsItsParts(t *testing.T) {
	if _, err := ops.NewServer(ops.Options{Readiness: ops.NewReadiness(nil)}); err == nil {
		t.Error("no gatherer accepted")
	}
	if _, err := ops.NewServer(ops.Options{Gatherer: prometheus.NewRegistry()}); err == nil {
		t.Error("no readiness accepted")
	}
}
