package ops

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

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

// ReadinessChecker answers readiness probes; *Readiness is one.
type ReadinessChecker interface {
	Ready() (bool, string)
}

// Options configure a Server.
type Options struct {
	// Addr is the address to listen on, such as ":8002".
	Addr string
	// Gatherer is the registry /metrics exposes.
	Gatherer prometheus.Gatherer
	// Readiness answers /readyz.
	Readiness ReadinessChecker
	// Logger gets errors of the metrics handler and the server; slog.Default() when nil.
	Logger *slog.Logger
}

// Server is the operations HTTP server. It keeps serving while the gRPC
// server drains, so that probes see the drain and the last metrics can
// be scraped; shut it down last.
type Server struct {
	http *http.Server
	log  *slog.Logger
	addr string

	lis     net.Listener
	stopped chan struct{} // closed when the serving goroutine exited
	err     error         // what Serve returned; read after stopped
}

// NewServer builds the server; Start makes it listen.
func NewServer(opts Options) (*Server, error) {
	if opts.Gatherer == nil {
		return nil, errors.New("ops: no metrics gatherer")
	}
	if opts.Readiness == nil {
		return nil, errors.New("ops: no readiness")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	s := &Server{log: log, addr: opts.Addr}
	s.http = &http.Server{
		Handler: Handler(opts.Gatherer, opts.Readiness, log),
		// Probes and scrapes are small and local; bounded timeouts keep a
		// stuck client from holding a connection.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// Handler returns the mux serving /metrics, /healthz and /readyz.
func Handler(g prometheus.Gatherer, ready ReadinessChecker, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, MetricsHandler(g, log))
	// GET patterns also match HEAD.
	mux.HandleFunc("GET "+HealthzPath, func(w http.ResponseWriter, _ *http.Request) {
		// Alive means the process answers: readiness covers the rest, and
		// a liveness failure restarts the pod, which would not help a
		// model that is still loading.
		writeText(w, http.StatusOK, "ok")
	})
	mux.Handle("GET "+ReadyzPath, ReadyzHandler(ready))
	return mux
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

// Start listens on the configured address and serves in a goroutine that
// Shutdown stops. It fails at once when the address cannot be bound.
func (s *Server) Start() error {
	lis, err := net.Listen("tcp", s.addr)
	if err != nil {
		return fmt.Errorf("ops: listening on %s: %w", s.addr, err)
	}
	s.lis = lis
	s.stopped = make(chan struct{})
	go func() {
		defer close(s.stopped)
		if err := s.http.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.err = err
			s.log.Error("operations HTTP server stopped", "err", err)
		}
	}()
	return nil
}

// Addr is the address the server listens on, once started.
func (s *Server) Addr() net.Addr {
	if s.lis == nil {
		return nil
	}
	return s.lis.Addr()
}

// Shutdown stops the server, letting requests in progress finish until
// ctx ends, and returns once the serving goroutine exited.
func (s *Server) Shutdown(ctx context.Context) error {
	if s.stopped == nil {
		return nil
	}
	err := s.http.Shutdown(ctx)
	if err != nil {
		// Out of time: drop the connections left.
		_ = s.http.Close()
	}
	<-s.stopped
	return errors.Join(err, s.err)
}
