package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/nvmlsource"
	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/internal/telemetry"
)

// observability is what the server reports through: the logger (request
// ids and trace ids on every line of a request), the Prometheus registry
// behind /metrics, the GPU series, and tracing from the OTEL_* variables.
type observability struct {
	// run holds the RunOptions fields observability fills in.
	run   server.RunOptions
	close func(context.Context) error
}

// setupObservability builds it from cfg; close flushes the traces and
// releases NVML once the server has stopped.
func setupObservability(ctx context.Context, cfg config.Config) (*observability, error) {
	level, err := telemetry.ParseLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	log, err := telemetry.NewLogger(os.Stderr, cfg.LogFormat, level)
	if err != nil {
		return nil, err
	}
	shutdownTracing, err := telemetry.Setup(ctx, telemetry.Options{Logger: log})
	if err != nil {
		return nil, fmt.Errorf("setting up tracing: %w", err)
	}
	reg := metrics.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		return nil, errors.Join(err, shutdownTracing(ctx))
	}
	// The backends are built here, once, and passed down: the GPU
	// series read the GPU backends' memory ledger.
	engines, gpuBackends, err := server.Backends(cfg)
	if err != nil {
		return nil, errors.Join(err, shutdownTracing(ctx))
	}
	gpus, reason := nvmlsource.Open(nil, gpuBackends.Ledger())
	if err := metrics.RegisterGPU(reg, gpus.GPUSource(), reason, log); err != nil {
		return nil, errors.Join(err, gpus.Close(), shutdownTracing(ctx))
	}
	run := server.ObservedRunOptions(log, reg, m)
	run.Engines = engines
	return &observability{
		run: run,
		close: func(ctx context.Context) error {
			return errors.Join(shutdownTracing(ctx), gpus.Close())
		},
	}, nil
}
