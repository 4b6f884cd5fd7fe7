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
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/engine/ortgpu"
	"github.com/visionserve/visionserve/pkg/gpu"
)

// gpuOptions turns the GPU settings into the GPU backends' options.
func gpuOptions(cfg config.Config) ortgpu.RegisterOptions {
	o := ortgpu.RegisterOptions{
		ORTLib: cfg.ORTLib,
		Session: gpu.SessionOptions{
			IntraOpThreads: cfg.ORTThreads,
			TensorRT:       gpu.TensorRTOptions{FP16: cfg.TensorRTFP16, CacheDir: cfg.TensorRTCacheDir},
		},
		Budget:       gpu.Budget{Bytes: uint64(cfg.GPUMemoryBudget)},
		BatchPadding: cfg.GPUBatchPadding,
	}
	switch cfg.GPUFailover {
	case "fail":
		o.Failover = &failover.Options{}
	case "retry":
		o.Failover = &failover.Options{RetryOnFallback: true}
	}
	return o
}

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
	// The GPU backends replace the "no GPU" placeholders; on a machine
	// without an NVIDIA driver their availability check answers at once.
	gpuReg := ortgpu.Register(gpuOptions(cfg))
	gpus, reason := nvmlsource.Open(nil, gpuReg.Ledger())
	if err := metrics.RegisterGPU(reg, gpus.GPUSource(), reason, log); err != nil {
		return nil, errors.Join(err, gpus.Close(), shutdownTracing(ctx))
	}
	return &observability{
		run: server.ObservedRunOptions(log, reg, m),
		close: func(ctx context.Context) error {
			return errors.Join(shutdownTracing(ctx), gpus.Close())
		},
	}, nil
}
