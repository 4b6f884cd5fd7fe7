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
	"time"

	"github.com/oklog/run"
	"google.golang.org/grpc"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/ops"
	"github.com/visionserve/visionserve/internal/telemetry"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// RunOptions are what Run needs besides the config.
type RunOptions struct {
	// Logger gets the server's log lines.
	Logger *slog.Logger
	// Stop ends the server gracefully when it receives (SIGTERM, SIGINT).
	Stop <-chan os.Signal
	// OnListen, when set, is told the bound addresses (useful with port 0).
	OnListen func(grpcAddr, httpAddr net.Addr)
	// OnRESTListen, when set, is told the REST API's address.
	OnRESTListen func(net.Addr)
	// OnMetricsListen, when set, is told the metrics address when
	// cfg.MetricsAddr gives /metrics a listener of its own.
	OnMetricsListen func(net.Addr)
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
	// ServerOptions are added to the gRPC server's (the OpenTelemetry
	// stats handler).
	ServerOptions []grpc.ServerOption
	// Engines are the backends models load on; nil means Backends(cfg).
	Engines *engine.Registry
	// Repo, when set, is served instead of the repository at
	// cfg.ModelRepo (benchmarks serve one model of it).
	Repo *modelrepo.Repo
	// OnRegistry, when set, is given the model registry before the
	// models load (tests and benchmarks that run a model in process).
	OnRegistry func(*model.Registry)
	// Runner adds to each model's runner options (traces); MaxPixels,
	// Observer and TuneObserver are set from cfg and the fields above.
	Runner model.RunnerOptions
	// Metrics, when set, keeps each model's state, backend, load and
	// warm-up times, queue and self-tuning series.
	Metrics *metrics.Metrics
}

// Run serves cfg until a signal arrives on opts.Stop or ctx ends, then
// shuts down in the documented order and returns nil when every accepted
// request was answered.
//
// Run is a group of actors, each declared with its start and its stop
// side by side. When any actor returns, every actor is stopped, in the
// order they are declared: the stop signal; the models (a warm-up in
// progress is cancelled); the gRPC server (readiness drains, calls in
// flight finish within the grace period, then the batchers drain and the
// engines are freed); last the HTTP server, so that /readyz reports the
// drain while it lasts.
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
	engines := opts.Engines
	if engines == nil {
		if engines, _, err = Backends(cfg); err != nil {
			return err
		}
	}
	reg := model.NewRegistry(model.RegistryOptions{StrictReadiness: cfg.StrictReadiness, Observer: opts.Metrics.ModelObserver()})
	loadOpts, err := modelLoadOptions(cfg, engines, opts, log)
	if err != nil {
		return err
	}
	// The models come from the repository through the controller, or,
	// for benchmarks, from a fixed opts.Repo (no model control then).
	var ctl *model.Controller
	if opts.Repo == nil {
		ctl = model.NewController(reg, model.Repository{Root: cfg.ModelRepo, Files: cfg.Models}, loadOpts)
	}
	srv, err := New(Options{
		Control:     ctl,
		ControlMode: cfg.ModelControlMode,
		Registry:    reg,
		Limits: Limits{
			MaxPixels: cfg.MaxPixels, MaxImagesPerRequest: cfg.MaxImagesPerRequest, MaxStreams: cfg.MaxStreams,
			MaxStreamsPerClient: cfg.MaxStreamsPerClient, StreamIdleTimeout: cfg.StreamIdleTimeout,
		},
		MaxMessageBytes:    cfg.MaxMessageBytes,
		AuthToken:          cfg.AuthToken,
		MaxConcurrentCalls: cfg.MaxConcurrentCalls,
		TLS:                tlsConfig,
		Logger:             log,
		UnaryInterceptors:  opts.UnaryInterceptors,
		StreamInterceptors: opts.StreamInterceptors,
		ServerOptions:      opts.ServerOptions,
	})
	if err != nil {
		return err
	}
	if opts.OnRegistry != nil {
		opts.OnRegistry(reg)
	}
	// Both ports are bound before the models load: a port taken fails at
	// once, and liveness and readiness ("loading") answer during a long
	// load, while gRPC health says NOT_SERVING.
	grpcLis, err := net.Listen("tcp", cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("listening for gRPC on %s: %w", cfg.GRPCAddr, err)
	}
	var httpLis, metricsLis, restLis net.Listener
	if cfg.HTTPAddr != "" {
		if httpLis, err = net.Listen("tcp", cfg.HTTPAddr); err != nil {
			_ = grpcLis.Close()
			return fmt.Errorf("listening for HTTP on %s: %w", cfg.HTTPAddr, err)
		}
	}
	if cfg.RESTAddr != "" {
		if restLis, err = net.Listen("tcp", cfg.RESTAddr); err != nil {
			_ = grpcLis.Close()
			if httpLis != nil {
				_ = httpLis.Close()
			}
			return fmt.Errorf("listening for REST on %s: %w", cfg.RESTAddr, err)
		}
	}
	// With --metrics-addr, /metrics has a listener of its own (loopback,
	// say) and leaves the probe port.
	httpHandlers := opts.HTTPHandlers
	var metricsHandlers map[string]http.Handler
	if cfg.MetricsAddr != "" {
		if metricsLis, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			_ = grpcLis.Close()
			if httpLis != nil {
				_ = httpLis.Close()
			}
			return fmt.Errorf("listening for metrics on %s: %w", cfg.MetricsAddr, err)
		}
		httpHandlers, metricsHandlers = map[string]http.Handler{}, map[string]http.Handler{}
		for path, h := range opts.HTTPHandlers {
			if path == ops.MetricsPath {
				metricsHandlers[path] = h
			} else {
				httpHandlers[path] = h
			}
		}
	}
	if opts.OnListen != nil {
		var ha net.Addr
		if httpLis != nil {
			ha = httpLis.Addr()
		}
		opts.OnListen(grpcLis.Addr(), ha)
	}
	if opts.OnRESTListen != nil && restLis != nil {
		opts.OnRESTListen(restLis.Addr())
	}
	if opts.OnMetricsListen != nil && metricsLis != nil {
		opts.OnMetricsListen(metricsLis.Addr())
	}

	var (
		g           run.Group
		shutdownErr error // what the stops reported; read after g.Run
	)
	// shutdownCtx bounds the whole shutdown; its clock starts with the
	// first stop, the signal actor's.
	shutdownCtx, cancelShutdown := context.WithCancel(context.Background())
	defer cancelShutdown()

	// Actor: the stop signal and the caller's context.
	stopped := make(chan struct{})
	g.Add(func() error {
		select {
		case sig := <-opts.Stop:
			log.Info("shutting down", "signal", sig.String(), "grace", cfg.GracePeriod)
		case <-ctx.Done():
			log.Info("shutting down", "reason", ctx.Err(), "grace", cfg.GracePeriod)
		case <-stopped:
		}
		return nil
	}, func(error) {
		close(stopped)
		time.AfterFunc(cfg.GracePeriod+time.Minute, cancelShutdown)
	})

	// Actor: the models. They load and warm up, then serve until stopped;
	// the gRPC server's stop closes them.
	modelsCtx, cancelModels := context.WithCancel(ctx)
	defer cancelModels()
	g.Add(func() error {
		if err := serveModels(modelsCtx, cfg, reg, ctl, loadOpts, opts.Repo, log); err != nil {
			return err
		}
		if ctl != nil && cfg.ModelControlMode == modelrepo.ControlPoll {
			return ctl.Poll(modelsCtx, cfg.RepositoryPollInterval)
		}
		<-modelsCtx.Done()
		return nil
	}, func(error) { cancelModels() })

	// Actor: the REST API, stopped before the gRPC server so that its
	// calls in flight finish while the models still serve them.
	if restLis != nil {
		addHTTPActor(&g, "REST", restLis, srv.RESTHandler(), log, shutdownCtx, &shutdownErr)
	}

	// Actor: the gRPC server.
	g.Add(func() error {
		log.Info("gRPC listening", "addr", grpcLis.Addr().String(), "tls", cfg.TLS(), "mtls", cfg.TLSClientCA != "", "auth", cfg.AuthToken != "")
		if err := srv.Serve(grpcLis); err != nil {
			return fmt.Errorf("gRPC server: %w", err)
		}
		return nil
	}, func(error) {
		// See Server.Shutdown: readiness drains, streams are told to
		// finish, GracefulStop bounded by the grace period, then the
		// batchers drain and the sessions are freed.
		if err := srv.Shutdown(shutdownCtx, cfg.GracePeriod); err != nil {
			shutdownErr = errors.Join(shutdownErr, fmt.Errorf("shutting down: %w", err))
		}
	})

	// Actors: the HTTP servers (health, readiness, metrics), stopped last.
	if httpLis != nil {
		addHTTPActor(&g, "HTTP", httpLis, httpMux(reg, httpHandlers), log, shutdownCtx, &shutdownErr)
	}
	if metricsLis != nil {
		mux := http.NewServeMux()
		for path, h := range metricsHandlers {
			mux.Handle(path, h)
		}
		addHTTPActor(&g, "metrics", metricsLis, mux, log, shutdownCtx, &shutdownErr)
	}

	err = g.Run()
	log.Info("stopped")
	return errors.Join(err, shutdownErr)
}

// addHTTPActor adds to g an actor serving h on lis, whose stop shuts it
// down gracefully until shutdownCtx ends and records what failed in
// errs. Probes and scrapes are small: a client that trickles its request
// or never reads the answer is cut off, and idle keep-alive connections
// are closed.
func addHTTPActor(g *run.Group, name string, lis net.Listener, h http.Handler, log *slog.Logger, shutdownCtx context.Context, errs *error) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	g.Add(func() error {
		log.Info(name+" listening", "addr", lis.Addr().String())
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("%s server: %w", name, err)
		}
		return nil
	}, func(error) {
		if err := srv.Shutdown(shutdownCtx); err != nil {
			_ = srv.Close()
			*errs = errors.Join(*errs, fmt.Errorf("%s shutdown: %w", name, err))
		}
	})
}

// modelLoadOptions are how every model loads: the backend, the engines,
// and the runner options (one decode budget for every model: it bounds
// the memory of images being decoded across the whole server).
func modelLoadOptions(cfg config.Config, engines *engine.Registry, opts RunOptions, log *slog.Logger) (model.LoadOptions, error) {
	budget, err := pipeline.NewDecodeBudget(int64(cfg.DecodeMemoryBudget))
	if err != nil {
		return model.LoadOptions{}, err
	}
	ro := opts.Runner
	ro.MaxPixels, ro.Observer, ro.TuneObserver = cfg.MaxPixels, opts.Observer, opts.Metrics.TuneObserver()
	ro.DecodeBudget = budget
	return model.LoadOptions{Backend: cfg.Backend, Engines: engines, Runner: ro, Logger: log}, nil
}

// serveModels loads the models at startup and warms them up: through the
// controller, every model of the repository (the ones --load-model names
// in explicit mode), or the fixed repo. Models that fail stay
// Unavailable, unless cfg.ExitOnError; it fails when no model can be
// served (explicit mode may start with none).
func serveModels(ctx context.Context, cfg config.Config, reg *model.Registry, ctl *model.Controller, loadOpts model.LoadOptions, repo *modelrepo.Repo, log *slog.Logger) error {
	if ctl != nil {
		var names []string // every model
		if cfg.ModelControlMode == modelrepo.ControlExplicit {
			names = append([]string{}, cfg.LoadModels...)
		}
		if err := ctl.Start(ctx, names); err != nil {
			return fmt.Errorf("loading model repository %s: %w", cfg.ModelRepo, err)
		}
	} else {
		if err := model.Load(ctx, repo, reg, loadOpts); err != nil {
			return err
		}
		if err := model.WarmUp(ctx, reg, log); err != nil {
			return err
		}
		reg.Started()
	}
	var failed []error
	for _, m := range reg.Models() {
		if st, why := m.State(); st == model.Unavailable {
			failed = append(failed, fmt.Errorf("model %q: %w", m.Name, why))
		}
	}
	if len(failed) > 0 && cfg.ExitOnError {
		return fmt.Errorf("--exit-on-error: %w", errors.Join(failed...))
	}
	ready, why := reg.Ready()
	log.Info("serving", "models", len(reg.Models()), "unavailable", len(failed), "ready", ready, "readiness", why)
	return nil
}

// httpMux serves /healthz (the process answers) and /readyz (the
// registry's readiness, with the reason when not ready), plus extra
// handlers.
func httpMux(reg *model.Registry, extra map[string]http.Handler) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc(ops.HealthzPath, func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle(ops.ReadyzPath, ops.ReadyzHandler(reg))
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
		// Each engine run is an inference span under its batch's span,
		// and each request's stages are spans under the request's.
		Runner: model.RunnerOptions{WrapEngines: telemetry.TraceEngines, Results: telemetry.RecordResults},
		// Request ids first, so that the metrics interceptor and the
		// handlers log with them.
		UnaryInterceptors:  []grpc.UnaryServerInterceptor{telemetry.UnaryServerInterceptor(log), m.UnaryServerInterceptor()},
		StreamInterceptors: []grpc.StreamServerInterceptor{telemetry.StreamServerInterceptor(log), m.StreamServerInterceptor()},
		ServerOptions:      []grpc.ServerOption{telemetry.GRPCServerOption()},
		HTTPHandlers:       map[string]http.Handler{ops.MetricsPath: ops.MetricsHandler(reg, log)},
		Metrics:            m,
	}
}
