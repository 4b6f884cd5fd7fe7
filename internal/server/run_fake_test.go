package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// fakeRun runs Run on fake engines: the models of repo load on a
// backend that builds a modeltest.Engine, except that a model named
// "broken" fails to load. It returns the HTTP and metrics base URLs and
// the stop function, which returns Run's error.
// fakeEnginesBuilt counts the engines startFakeRun's backend built.
var fakeEnginesBuilt atomic.Int64

type fakeRun struct {
	grpc          string
	http, metrics string
	stop          func() error
	done          chan error // Run's error, when it ends by itself
}

func startFakeRun(t *testing.T, cfg config.Config, repo *modelrepo.Repo) (*fakeRun, error) {
	t.Helper()
	engines, err := engine.NewRegistry(map[string]engine.Factory{
		engine.ORTCPU: {New: func(_ context.Context, m *modelrepo.Model, _ int) (engine.Engine, error) {
			if m.Name == "broken" {
				return nil, errors.New("graph cannot be imported")
			}
			fakeEnginesBuilt.Add(1)
			return &modeltest.Engine{Classes: m.NumClasses, Delay: time.Millisecond}, nil
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Backend = engine.ORTCPU
	cfg.GRPCAddr, cfg.HTTPAddr = "127.0.0.1:0", "127.0.0.1:0"
	if cfg.RESTAddr == config.Default().RESTAddr {
		cfg.RESTAddr = ""
	}
	prom := prometheus.NewRegistry()
	m, err := metrics.New(prom)
	if err != nil {
		t.Fatal(err)
	}
	opts := ObservedRunOptions(slog.New(slog.NewTextHandler(io.Discard, nil)), prom, m)
	opts.Engines, opts.Repo = engines, repo
	addrs := make(chan string, 2)
	grpcAddr := make(chan string, 1)
	opts.OnListen = func(g, h net.Addr) { grpcAddr <- g.String(); addrs <- "http://" + h.String() }
	opts.OnMetricsListen = func(a net.Addr) { addrs <- "http://" + a.String() }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, opts) }()
	r := &fakeRun{stop: func() error { cancel(); return <-done }, done: done}
	select {
	case r.grpc = <-grpcAddr:
	case err := <-done:
		cancel()
		return nil, err
	}
	want := 1
	if cfg.MetricsAddr != "" {
		want = 2
	}
	for i := 0; i < want; i++ {
		select {
		case a := <-addrs:
			if i == 0 {
				r.http = a
			} else {
				r.metrics = a
			}
		case err := <-done:
			cancel()
			return nil, err
		}
	}
	return r, nil
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitReady polls /readyz until it answers want (200 or 503 with a
// reason that is not "loading").
func waitReady(t *testing.T, base string) (int, string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body := get(t, base+"/readyz")
		if code == 200 || !strings.HasPrefix(body, "loading") && !strings.HasPrefix(body, "starting") {
			return code, body
		}
		if time.Now().After(deadline) {
			t.Fatalf("still %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fakeRepo(names ...string) *modelrepo.Repo {
	repo := &modelrepo.Repo{}
	for _, n := range names {
		repo.Models = append(repo.Models, modeltest.Model(n, modelrepo.TaskClassify, 10))
	}
	return repo
}

// TestMetricsOnTheirOwnAddress: with --metrics-addr, /metrics leaves the
// probe port for a listener of its own.
func TestMetricsOnTheirOwnAddress(t *testing.T) {
	cfg := config.Default()
	cfg.MetricsAddr = "127.0.0.1:0"
	r, err := startFakeRun(t, cfg, fakeRepo("cls"))
	if err != nil {
		t.Fatal(err)
	}
	if code, body := waitReady(t, r.http); code != 200 {
		t.Fatalf("/readyz %d %q", code, body)
	}
	if code, _ := get(t, r.http+"/metrics"); code != http.StatusNotFound {
		t.Errorf("/metrics on the probe port: %d, want 404", code)
	}
	if code, body := get(t, r.metrics+"/metrics"); code != 200 || !strings.Contains(body, `visionserve_model_state{model="cls",state="READY"} 1`) {
		t.Errorf("/metrics on the metrics port: %d %.200q", code, body)
	}
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
}

// TestOneBadModelDoesNotStopTheOthers: a model no backend loads is
// UNAVAILABLE; the server starts and serves the good one. Readiness
// follows --strict-readiness, and --exit-on-error makes startup fail.
func TestOneBadModelDoesNotStopTheOthers(t *testing.T) {
	for _, c := range []struct {
		name          string
		strict, exit  bool
		wantCode      int
		wantRunFailed bool
	}{
		{"strict", true, false, 503, false},
		{"not strict", false, false, 200, false},
		{"exit on error", true, true, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.StrictReadiness, cfg.ExitOnError = c.strict, c.exit
			repo := fakeRepo("broken", "cls")
			// A folder the repository could not read (a truncated
			// model.onnx, say) is known and unavailable too.
			repo.Failed = []modelrepo.FailedModel{{Name: "truncated", Err: errors.New("model.onnx: unexpected EOF")}}
			r, err := startFakeRun(t, cfg, repo)
			if err != nil {
				t.Fatal(err)
			}
			if c.wantRunFailed {
				select {
				case err := <-r.done:
					if err == nil || !strings.Contains(err.Error(), "cannot be imported") {
						t.Errorf("Run: %v, want the model's failure", err)
					}
				case <-time.After(20 * time.Second):
					t.Error("Run did not fail")
					_ = r.stop()
				}
				return
			}
			code, body := waitReady(t, r.http)
			if code != c.wantCode || !strings.Contains(body, "broken (") {
				t.Errorf("/readyz %d %q, want %d naming the broken model", code, body, c.wantCode)
			}
			_, metricsBody := get(t, r.http+"/metrics")
			for _, want := range []string{`visionserve_model_state{model="broken",state="UNAVAILABLE"} 1`, `visionserve_model_state{model="cls",state="READY"} 1`,
				`visionserve_model_state{model="truncated",state="UNAVAILABLE"} 1`} {
				if !strings.Contains(metricsBody, want) {
					t.Errorf("/metrics lacks %s", want)
				}
			}
			checkUnavailableOverGRPC(t, r.grpc)
			if err := r.stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// checkUnavailableOverGRPC: the APIs describe unavailable models, with
// the reason, and answer ModelReady false rather than NotFound.
func checkUnavailableOverGRPC(t *testing.T, addr string) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	list, err := visionv1.NewVisionServiceClient(conn).ListModels(ctxT(t), &visionv1.ListModelsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, m := range list.GetModels() {
		states[m.GetName()] = m.GetState().String() + " " + m.GetStateReason()
	}
	if !strings.HasPrefix(states["truncated"], "MODEL_STATE_UNAVAILABLE model.onnx") || !strings.HasPrefix(states["broken"], "MODEL_STATE_UNAVAILABLE") || states["cls"] != "MODEL_STATE_READY " {
		t.Errorf("ListModels states %v", states)
	}
	oip := inference.NewGRPCInferenceServiceClient(conn)
	for _, name := range []string{"truncated", "broken"} {
		r, err := oip.ModelReady(ctxT(t), &inference.ModelReadyRequest{Name: name})
		if err != nil || r.GetReady() {
			t.Errorf("ModelReady(%s) = %v, %v; want false", name, r.GetReady(), err)
		}
		if _, err := oip.ModelMetadata(ctxT(t), &inference.ModelMetadataRequest{Name: name}); err != nil {
			t.Errorf("ModelMetadata(%s): %v", name, err)
		}
		_, err = visionv1.NewVisionServiceClient(conn).Classify(ctxT(t), &visionv1.ClassifyRequest{Model: name, Images: []*visionv1.Image{encoded([]byte("x"))}})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("Classify on %s: %v, want Unavailable", name, err)
		}
	}
}
