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
	"os"
	"os/signal"
	"syscall"
	"time"

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
	// Metrics, traces and request-id logging plug in through RunOptions
	// (see observability.go).
	obs, err := setupObservability(context.Background(), cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "infer-server: %v\n", err)
		os.Exit(2)
	}
	log := obs.run.Logger
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	opts := obs.run
	opts.Stop = stop
	err = server.Run(context.Background(), cfg, opts)
	// Flush the last spans after the server stopped.
	flushCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if cerr := obs.close(flushCtx); cerr != nil {
		log.Warn("flushing telemetry", "err", cerr)
	}
	cancel()
	if err != nil {
		log.Error("infer-server failed", "err", err)
		os.Exit(1)
	}
}
