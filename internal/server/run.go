package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/ops"
	"github.com/visionserve/visionserve/internal/telemetry"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// RunOptions are what Run needs besides the config.
type RunOptions struct {
	// Logger gets the server's log lines.
	Logger *slog.Logger
	// Stop ends the server gracefully when it receives (SIGTERM, SIGINT).
	Stop <-chan os.Signal
	// OnListen, when set, is told the bound addresses (useful with port 0).
	OnListen func(grpcAddr, httpAddr net.Addr)
	// Observer receives every model's batcher events (metrics); nil for
	// none.
	Observer batcher.BatchObserver
	// UnaryInterceptors and StreamInterceptors are added to the gRPC
	// server's (metrics, tracing).
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
	// HTTPHandlers are mounted on the HTTP server next to /healthz and
	// /readyz (metrics, say), by path.
	HTTPHandlers map[string]http.Handler
	// OnLoaded, when set, is called once the models are loaded and before
	// they warm up: the place to track each model's queue (a
	// PipelineRunner's Stats) or GPU memory.
	OnLoaded func(*Registry)
	// ServerOptions are added to the gRPC server's (the OpenTelemetry
	// stats handler).
	ServerOptions []grpc.ServerOption
	// Engines are the backends models load on; nil means Backends(cfg).
	Engines *engine.Registry
	// Metrics, when set, is told each served model's backend, load and
	// warm-up times and what its self-tuner chose, and reads each model's
	// batch queue at scrape time.
	Metrics *metrics.Metrics
}

// Run serves cfg until a signal arrives on opts.Stop or ctx ends, then
// shuts down in the documented order and returns nil when every accepted
// request was answered. The actors, started in order and stopped in
// reverse: the model registry (engines and batchers), the gRPC server, the
// HTTP server (health, readiness and what HTTPHandlers add).
func Run(ctx context.Context, cfg config.Config, opts RunOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	var tlsConfig *tls.Config
	var err error
	if cfg.TLS() {
		if tlsConfig, err = TLSConfig(cfg.TLSCert, cfg.TLSKey, cfg.TLSClientCA); err != nil {
			return err
		}
	}

	// Actor: HTTP server for probes and metrics. It listens before the
	// models load so that liveness answers during a long load; /readyz
	// says "loading" until the readiness state exists.
	var httpLis net.Listener
	httpHandler := &swapHandler{}
	httpHandler.set(loadingMux(opts.HTTPHandlers))
	var httpSrv *http.Server
	httpDone := make(chan error, 1)
	if cfg.HTTPAddr != "" {
		if httpLis, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			return fmt.Errorf("listening for HTTP on %s: %w", cfg.HTTPAddr, err)
		}
		// Probes and scrapes are small: a client that trickles its
		// request or never reads the answer is cut off, and idle
		// keep-alive connections are closed.
		httpSrv = &http.Server{
			Handler:           httpHandler,
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       2 * time.Minute,
		}
		go func() {
			if err := httpSrv.Serve(httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				httpDone <- err
			}
			close(httpDone)
		}()
		log.Info("HTTP listening", "addr", httpLis.Addr().String())
	}
	// stopHTTP ends the HTTP actor on the paths that return before the
	// main loop; the loop's own shutdown stops it last.
	stopHTTP := func() {
		if httpSrv != nil {
			_ = httpSrv.Close()
			<-httpDone
		}
	}

	repo, err := modelrepo.LoadRepo(cfg.ModelRepo)
	if err != nil {
		stopHTTP()
		return fmt.Errorf("loading model repository %s: %w", cfg.ModelRepo, err)
	}
	engines := opts.Engines
	if engines == nil {
		if engines, _, err = Backends(cfg); err != nil {
			stopHTTP()
			return err
		}
	}
	reg := NewRegistry()
	// From here on the registry owns engines: every exit path closes it.
	err = LoadModels(ctx, repo, reg, LoadOptions{
		Backend: cfg.Backend,
		Engines: engines,
		Runner:  RunnerOptions{MaxPixels: cfg.MaxPixels, Observer: opts.Observer, TuneObserver: opts.Metrics.TuneObserver()},
		Logger:  log,
	})
	if err != nil {
		_ = reg.Close(context.Background())
		stopHTTP()
		return err
	}

	if opts.OnLoaded != nil {
		opts.OnLoaded(reg)
	}

	srv, err := New(Options{
		Registry: reg,
		Limits: Limits{
			MaxPixels: cfg.MaxPixels, MaxImagesPerRequest: cfg.MaxImagesPerRequest, MaxStreams: cfg.MaxStreams,
		},
		MaxMessageBytes:    cfg.MaxMessageBytes,
		AuthToken:          cfg.AuthToken,
		TLS:                tlsConfig,
		Logger:             log,
		UnaryInterceptors:  opts.UnaryInterceptors,
		StreamInterceptors: opts.StreamInterceptors,
		ServerOptions:      opts.ServerOptions,
	})
	if err != nil {
		_ = reg.Close(context.Background())
		stopHTTP()
		return err
	}
	// One readiness state answers /readyz and drives gRPC health checking,
	// so the two cannot disagree (see ops.Readiness).
	ready := ops.NewReadiness(srv.health)
	var loaded []string
	for _, m := range reg.Models() {
		loaded = append(loaded, m.Name)
		ready.Expect(m.Name)
		if q, ok := m.Runner.(interface{ Stats() batcher.Stats }); ok {
			opts.Metrics.TrackQueue(m.Name, metrics.QueueStatsOf(q.Stats))
		}
	}
	grpcLis, err := net.Listen("tcp", cfg.GRPCAddr)
	if err != nil {
		_ = reg.Close(context.Background())
		stopHTTP()
		return fmt.Errorf("listening for gRPC on %s: %w", cfg.GRPCAddr, err)
	}
	httpHandler.set(httpMux(ready, opts.HTTPHandlers))
	if opts.OnListen != nil {
		var ha net.Addr
		if httpLis != nil {
			ha = httpLis.Addr()
		}
		opts.OnListen(grpcLis.Addr(), ha)
	}

	// Actor: gRPC server. Serving starts before warm-up so that liveness
	// answers at once; health says NOT_SERVING until the models are warm.
	grpcDone := make(chan error, 1)
	go func() { grpcDone <- srv.Serve(grpcLis) }()
	log.Info("gRPC listening", "addr", grpcLis.Addr().String(), "tls", cfg.TLS(), "mtls", cfg.TLSClientCA != "", "auth", cfg.AuthToken != "")

	warm := make(chan error, 1)
	warmCtx, cancelWarm := context.WithCancel(ctx)
	defer cancelWarm()
	go func() { warm <- WarmUp(warmCtx, reg, log) }()

	var runErr error
	stopping := false
	for !stopping {
		select {
		case err := <-warm:
			warm = nil
			if err != nil {
				runErr = err
				stopping = true
				break
			}
			// WarmUp removed the models that failed; readiness stops
			// waiting for them and turns true with the last warm one.
			served := map[string]bool{}
			for _, m := range reg.Models() {
				served[m.Name] = true
			}
			for _, name := range loaded {
				if !served[name] {
					ready.Forget(name)
					opts.Metrics.ModelUnloaded(name)
				}
			}
			for _, m := range reg.Models() {
				opts.Metrics.ModelLoaded(m.Name, m.Runner.Backend(), m.LoadTime, m.WarmupTime)
				ready.Warmed(m.Name)
			}
			log.Info("serving", "models", len(reg.Models()))
		case sig := <-opts.Stop:
			log.Info("shutting down", "signal", sig.String(), "grace", cfg.GracePeriod)
			stopping = true
		case <-ctx.Done():
			log.Info("shutting down", "reason", ctx.Err(), "grace", cfg.GracePeriod)
			stopping = true
		case err := <-grpcDone:
			runErr = fmt.Errorf("gRPC server: %w", err)
			stopping = true
		case err, ok := <-httpDone:
			if ok {
				runErr = fmt.Errorf("HTTP server: %w", err)
				stopping = true
			}
			httpDone = nil
		}
	}
	cancelWarm()
	if warm != nil {
		<-warm
	}

	// Shutdown, in this order (see Server.Shutdown): health NOT_SERVING,
	// streams told to finish, GracefulStop bounded by the grace period,
	// then the batchers drain and the sessions are freed. The HTTP server
	// goes last so that /readyz reports not ready during the drain.
	ready.Drain()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.GracePeriod+time.Minute)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx, cfg.GracePeriod); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("shutting down: %w", err))
	}
	if httpSrv != nil {
		if err := httpSrv.Shutdown(shutdownCtx); err != nil {
			runErr = errors.Join(runErr, fmt.Errorf("HTTP shutdown: %w", err))
		}
	}
	log.Info("stopped")
	return runErr
}

// swapHandler lets the HTTP server start before the handler it ends with
// can be built.
type swapHandler struct {
	h atomic.Pointer[http.Handler]
}

func (s *swapHandler) set(h http.Handler) { s.h.Store(&h) }

func (s *swapHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	(*s.h.Load()).ServeHTTP(w, r)
}

// loadingMux answers while the models load: alive, not ready.
func loadingMux(extra map[string]http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc(ops.ReadyzPath, func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "not ready: loading the model repository", http.StatusServiceUnavailable)
	})
	for path, h := range extra {
		mux.Handle(path, h)
	}
	return mux
}

// httpMux serves /healthz (the process answers) and /readyz (every model
// warm and not draining, with the reason when not), plus extra handlers.
func httpMux(ready *ops.Readiness, extra map[string]http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle(ops.ReadyzPath, ops.ReadyzHandler(ready))
	for path, h := range extra {
		mux.Handle(path, h)
	}
	return mux
}

// TLSConfig loads the server certificate and, when clientCA is set, the
// CA bundle client certificates must chain to (mTLS: a client without a
// valid certificate is refused during the handshake).
func TLSConfig(certFile, keyFile, clientCA string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading TLS certificate: %w", err)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if clientCA != "" {
		pem, err := os.ReadFile(clientCA)
		if err != nil {
			return nil, fmt.Errorf("reading client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA %s holds no PEM certificate", clientCA)
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return c, nil
}

// ObservedRunOptions are the RunOptions through which the server reports:
// log lines with request ids, batch spans linked to their requests, the
// metrics and tracing interceptors and stats handler, and /metrics served
// from reg. infer-server runs with them; tests that check what operators
// see use the same.
func ObservedRunOptions(log *slog.Logger, reg prometheus.Gatherer, m *metrics.Metrics) RunOptions {
	return RunOptions{
		Logger:   log,
		Observer: telemetry.BatchTracer{Next: m.BatchObserver()},
		// Request ids first, so that the metrics interceptor and the
		// handlers log with them.
		UnaryInterceptors:  []grpc.UnaryServerInterceptor{telemetry.UnaryServerInterceptor(log), m.UnaryServerInterceptor()},
		StreamInterceptors: []grpc.StreamServerInterceptor{telemetry.StreamServerInterceptor(log), m.StreamServerInterceptor()},
		ServerOptions:      []grpc.ServerOption{telemetry.GRPCServerOption()},
		HTTPHandlers:       map[string]http.Handler{ops.MetricsPath: ops.MetricsHandler(reg, log)},
		Metrics:            m,
	}
}
