// Command infer-server serves the models of a model repository over gRPC:
// the visionserve vision API, the KServe v2 / Open Inference Protocol,
// health checking and reflection, with /healthz and /readyz over HTTP.
// Settings come from flags, VISIONSERVE_* variables and an optional YAML
// file (see internal/config); SIGTERM or SIGINT drains it and exits 0.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
)

func main() {
	// A probe child of the OpenCV backend runs here instead of main; it
	// must come before anything else.
	cvdnn.RunProbeIfRequested()

	cfg, err := config.Load(os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, config.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "infer-server: %v\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// Metrics and tracing plug in through RunOptions (interceptors, batch
	// observer, HTTP handlers).
	if err := server.Run(context.Background(), cfg, server.RunOptions{Logger: log, Stop: stop}); err != nil {
		log.Error("infer-server failed", "err", err)
		os.Exit(1)
	}
}

func newLogger(cfg config.Config) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}
