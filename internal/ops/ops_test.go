package ops_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/visionserve/visionserve/internal/ops"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixed struct {
	ok     bool
	reason string
}

func (f fixed) Ready() (bool, string) { return f.ok, f.reason }

func get(t *testing.T, h http.Handler, path string) (int, string, http.Header) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	b, err := io.ReadAll(rec.Result().Body)
	if err != nil {
		t.Fatal(err)
	}
	return rec.Code, string(b), rec.Result().Header
}

func TestReadyzAnswersWithTheReason(t *testing.T) {
	code, body, hdr := get(t, ops.ReadyzHandler(fixed{true, "ready"}), ops.ReadyzPath)
	if code != 200 || body != "ready\n" || hdr.Get("Cache-Control") != "no-store" {
		t.Errorf("ready: %d %q %v", code, body, hdr)
	}
	code, body, _ = get(t, ops.ReadyzHandler(fixed{false, "loading: 1 of 2 models not ready yet: yolov8s"}), ops.ReadyzPath)
	if code != 503 || !strings.Contains(body, "yolov8s") {
		t.Errorf("not ready: %d %q", code, body)
	}
}

// A model's load error may be long; a probe's answer stays short.
func TestReadyzBodyIsBounded(t *testing.T) {
	_, body, _ := get(t, ops.ReadyzHandler(fixed{false, "unavailable: yolov8s (session: " + strings.Repeat("x", 5000) + ")"}), ops.ReadyzPath)
	if len(body) > 600 || !strings.HasPrefix(body, "unavailable: yolov8s") {
		t.Errorf("/readyz body is %d bytes: %.80q", len(body), body)
	}
}

func TestMetricsHandlerServesTheRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "visionserve_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Add(3)
	code, body, _ := get(t, ops.MetricsHandler(reg, nil), ops.MetricsPath)
	if code != 200 || !strings.Contains(body, "visionserve_test_total 3") {
		t.Errorf("/metrics = %d %q", code, body)
	}
}
