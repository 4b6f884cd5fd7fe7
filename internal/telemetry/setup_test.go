package telemetry_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.uber.org/goleak"

	"github.com/visionserve/visionserve/internal/telemetry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// otelVars are the variables Setup reads; setEnv clears them all and sets
// those in kv for the test. (Tests here do not run in parallel: Setup
// sets process globals.)
var otelVars = []string{
	"OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
	"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
	"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
	"OTEL_TRACES_SAMPLER",
}

func setEnv(t *testing.T, kv map[string]string) {
	t.Helper()
	for _, k := range otelVars {
		t.Setenv(k, kv[k])
	}
}

// flush exports the spans the global provider holds.
func flush(t *testing.T) {
	t.Helper()
	tp, ok := otel.GetTracerProvider().(*sdktrace.TracerProvider)
	if !ok {
		t.Fatalf("tracer provider is %T, not the SDK's", otel.GetTracerProvider())
	}
	if err := tp.ForceFlush(context.Background()); err != nil {
		t.Fatal(err)
	}
}

var quiet = slog.New(slog.DiscardHandler)

func TestSetupWithoutEnvironmentIsNoop(t *testing.T) {
	setEnv(t, nil)
	shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	_, span := telemetry.Tracer().Start(context.Background(), "x")
	if span.IsRecording() || span.SpanContext().IsValid() {
		t.Error("a span was recorded with no exporter configured")
	}
	span.End()
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	// goleak in TestMain checks that no exporter goroutine was started.

	// W3C trace context is passed on even though nothing is exported.
	prop := otel.GetTextMapPropagator()
	carrier := propagation.MapCarrier{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "baggage": "tenant=a"}
	ctx := prop.Extract(context.Background(), carrier)
	out := propagation.MapCarrier{}
	prop.Inject(ctx, out)
	if out["traceparent"] != carrier["traceparent"] || out["baggage"] != "tenant=a" {
		t.Errorf("propagation lost context: injected %v", out)
	}
}

func TestSetupRefusesWhatItCannotDo(t *testing.T) {
	for name, e := range map[string]map[string]string{
		"unknown exporter":   {"OTEL_TRACES_EXPORTER": "zipkin"},
		"contradiction":      {"OTEL_TRACES_EXPORTER": "otlp,none"},
		"unknown protocol":   {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
		"bad resource attrs": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_RESOURCE_ATTRIBUTES": "novalue"},
	} {
		t.Run(name, func(t *testing.T) {
			setEnv(t, e)
			shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Logger: quiet})
			if err == nil {
				t.Error("Setup accepted it")
			}
			if shutdown == nil {
				t.Fatal("nil shutdown")
			}
			_ = shutdown(context.Background())
		})
	}
}

func TestSetupDisabled(t *testing.T) {
	setEnv(t, map[string]string{"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
	shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer shutdown(context.Background())
	if _, span := telemetry.Tracer().Start(context.Background(), "x"); span.IsRecording() {
		t.Error("tracing on with OTEL_SDK_DISABLED=true")
	}
}

// TestSetupExportsOverOTLP points the standard variables at a fake OTLP
// HTTP collector and checks that a span arrives there with the service
// name from OTEL_SERVICE_NAME.
func TestSetupExportsOverOTLP(t *testing.T) {
	var mu sync.Mutex
	var bodies [][]byte
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		if r.URL.Path == "/v1/traces" {
			bodies = append(bodies, b)
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer collector.Close()

	setEnv(t, map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": collector.URL,
		"OTEL_SERVICE_NAME":           "visionserve-test",
		"OTEL_RESOURCE_ATTRIBUTES":    "deployment.environment=ci%20run",
	})
	shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	_, span := telemetry.Tracer().Start(context.Background(), "exported-span")
	span.End()
	if err := shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	all := bytes.Join(bodies, nil)
	for _, want := range []string{"exported-span", "visionserve-test", "ci run"} {
		if !bytes.Contains(all, []byte(want)) {
			t.Errorf("the collector got no %q (%d requests)", want, len(bodies))
		}
	}
}

func TestSetupWithExporter(t *testing.T) {
	setEnv(t, nil)
	exp := tracetest.NewInMemoryExporter()
	shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Exporter: exp, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer shutdown(context.Background())
	_, span := telemetry.Tracer().Start(context.Background(), "s")
	span.End()
	flush(t)
	if got := exp.GetSpans(); len(got) != 1 || got[0].Name != "s" {
		t.Errorf("exported %v", got)
	}
	var svc string
	for _, kv := range exp.GetSpans()[0].Resource.Attributes() {
		if kv.Key == "service.name" {
			svc = kv.Value.AsString()
		}
	}
	if svc != "visionserve" {
		t.Errorf("service.name = %q, want visionserve", svc)
	}
}

func TestNewLogger(t *testing.T) {
	for _, c := range []struct{ format, want string }{
		{"json", `"request_id":"r-1"`},
		{"text", "request_id=r-1"},
	} {
		var buf bytes.Buffer
		log, err := telemetry.NewLogger(&buf, c.format, slog.LevelInfo)
		if err != nil {
			t.Fatal(err)
		}
		log.InfoContext(telemetry.WithRequestID(context.Background(), "r-1"), "hello")
		log.Debug("hidden")
		if !strings.Contains(buf.String(), c.want) || strings.Contains(buf.String(), "hidden") {
			t.Errorf("%s: %q", c.format, buf.String())
		}
	}
	if _, err := telemetry.NewLogger(io.Discard, "xml", slog.LevelInfo); err == nil {
		t.Error("NewLogger accepted format xml")
	}
	if _, err := telemetry.ParseLevel("loud"); err == nil {
		t.Error("ParseLevel accepted loud")
	}
	if l, err := telemetry.ParseLevel("warn"); err != nil || l != slog.LevelWarn {
		t.Errorf("ParseLevel(warn) = %v, %v", l, err)
	}
}
