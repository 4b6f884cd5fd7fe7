package gpu

import (
	"context"
	"fmt"
)

// Prober answers the questions the GPU backends ask before they load a
// model; SystemProber asks the machine, tests a fake.
type Prober interface {
	// Discover lists the GPUs (NVML).
	Discover() Report
	// Probe loads a one-node model on provider and device and runs it
	// once; nil means the provider works there.
	Probe(ctx context.Context, p Provider, device int) error
}

// SystemProber probes this machine: NVML for discovery, ONNX Runtime for
// the provider runs.
type SystemProber struct {
	// NVML is the library discovery uses; nil means RealNVML.
	NVML NVML
	// LibPath is the ONNX Runtime library (see Init).
	LibPath string
	// Options are applied to probe sessions (TensorRT cache folder, CUDA
	// options); Provider and Device are set per probe.
	Options SessionOptions
}

// Discover lists the GPUs through NVML.
func (s SystemProber) Discover() Report { return Discover(s.NVML) }

// Probe runs a one-node model on provider p and device with CPU fallback
// disabled, so success means the GPU ran it, and checks the result.
func (s SystemProber) Probe(ctx context.Context, p Provider, device int) error {
	if err := Init(s.LibPath); err != nil {
		return err
	}
	return ProbeProvider(ctx, p, device, s.Options)
}

// ProbeProvider loads the one-node probe model on provider p and device
// and runs it once through the same IoBinding path the engines use; it
// returns why the provider cannot run there, or nil. Init must have
// succeeded.
func ProbeProvider(ctx context.Context, p Provider, device int, opts SessionOptions) error {
	model, err := probeModel()
	if err != nil {
		return fmt.Errorf("building the probe model: %w", err)
	}
	opts.Provider, opts.Device = p, device
	opts.DisableCPUFallback = p != ProviderCPU
	opts.IntraOpThreads = 1
	s, err := openSessionBytes(model, opts)
	if err != nil {
		return err
	}
	defer s.Close()
	e, err := NewEngine(s, EngineOptions{})
	if err != nil {
		return err
	}
	defer e.Close()
	data, free, err := e.AllocBatch(1, 1, 2, 2)
	if err != nil {
		return err
	}
	defer free()
	copy(data, []float32{1, 2, 3, 4})
	out, err := e.RunData(ctx, data, 1, 1, 2, 2)
	if err != nil {
		return err
	}
	for i, want := range []float32{2, 4, 6, 8} {
		if got := out[0].Data[i]; got != want {
			return fmt.Errorf("probe computed %v, want [2 4 6 8]", out[0].Data[:4])
		}
	}
	return nil
}
