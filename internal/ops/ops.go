// Package ops holds what the operations endpoint serves on --http-addr
// besides the APIs: its ports and paths, the Prometheus metrics handler
// (/metrics) and the readiness probe handler (/readyz). Readiness itself
// is the model registry's (package model), which also drives gRPC health
// checking, so that the two never disagree.
package ops

import (
	"log/slog"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Ports and paths the server listens on by default. The Kubernetes
// manifests' tests check their probes and container ports against these.
const (
	DefaultGRPCPort = 8001
	DefaultHTTPPort = 8002

	MetricsPath = "/metrics"
	HealthzPath = "/healthz"
	ReadyzPath  = "/readyz"
)

// DefaultHTTPAddr is the default --http-addr.
var DefaultHTTPAddr = ":" + strconv.Itoa(DefaultHTTPPort)

// ReadinessChecker answers readiness probes; the model registry is the
// server's one.
type ReadinessChecker interface {
	Ready() (bool, string)
}

// MetricsHandler serves g in the Prometheus exposition formats. A
// collector that fails leaves its series out of the scrape instead of
// failing the whole scrape; the failure is logged to log.
func MetricsHandler(g prometheus.Gatherer, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandling:     promhttp.ContinueOnError,
		EnableOpenMetrics: true,
	})
}

// ReadyzHandler answers readiness probes from ready: 200 with "ready", or
// 503 with the reason.
func ReadyzHandler(ready ReadinessChecker) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		ok, reason := ready.Ready()
		code := http.StatusOK
		if !ok {
			code = http.StatusServiceUnavailable
		}
		writeText(w, code, reason)
	})
}

// maxReasonLen keeps a probe's body short even when a model's load error
// is long.
const maxReasonLen = 512

func writeText(w http.ResponseWriter, code int, body string) {
	if len(body) > maxReasonLen {
		body = body[:maxReasonLen] + "..."
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(body + "\n"))
}
