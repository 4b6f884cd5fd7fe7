package server

import (
	"context"
	"fmt"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/gpu"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// Backends builds the engine registry cfg asks for: ort-cpu (ONNX Runtime
// from cfg.ORTLib), opencv (probed in a child process), and ort-cuda and
// ort-tensorrt, whose availability is probed on the GPUs the first time a
// model asks (on a machine without an NVIDIA driver they answer at once).
// The GPU backends are returned too, for their memory ledger.
func Backends(cfg config.Config) (*engine.Registry, *gpu.Backends, error) {
	cpu := onnxrt.Factory(cfg.ORTLib, onnxrt.Options{IntraOpThreads: cfg.ORTThreads})
	gpus := gpu.NewBackends(gpuOptions(cfg, cpu))
	factories := gpus.Factories()
	factories[engine.ORTCPU] = cpu
	factories[engine.OpenCV] = cvdnn.Factory(cvdnn.Options{})
	reg, err := engine.NewRegistry(factories)
	if err != nil {
		return nil, nil, fmt.Errorf("building the backends: %w", err)
	}
	return reg, gpus, nil
}

// gpuOptions turns the GPU settings into the GPU backends' options; a
// failing GPU batch falls back to cpu.
func gpuOptions(cfg config.Config, cpu engine.Factory) gpu.BackendOptions {
	o := gpu.BackendOptions{
		ORTLib:      cfg.ORTLib,
		CUDARuntime: cfg.CUDARuntimeLib,
		Session: gpu.SessionOptions{
			IntraOpThreads: cfg.ORTThreads,
			TensorRT:       gpu.TensorRTOptions{FP16: cfg.TensorRTFP16, CacheDir: cfg.TensorRTCacheDir},
		},
		Budget:       gpu.Budget{Bytes: uint64(cfg.GPUMemoryBudget)},
		BatchPadding: cfg.GPUBatchPadding,
		Precision:    cfg.Precision,
		Fallback: func(ctx context.Context, m *modelrepo.Model) (engine.Engine, error) {
			return cpu.New(ctx, m, 0)
		},
	}
	switch cfg.GPUFailover {
	case "fail":
		o.Failover = &failover.Options{}
	case "retry":
		o.Failover = &failover.Options{RetryOnFallback: true}
	}
	return o
}
