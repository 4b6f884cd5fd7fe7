package gpu

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Backend choices for --backend.
const (
	BackendAuto   = "auto"
	BackendORTCPU = "ort-cpu"
)

// Prober answers the questions ChooseBackend asks; SystemProber asks the
// machine, tests a fake.
type Prober interface {
	// Discover lists the GPUs (NVML).
	Discover() Report
	// Probe loads a one-node model on provider and device and runs it
	// once; nil means the provider works there.
	Probe(ctx context.Context, p Provider, device int) error
}

// Choice is the backend ChooseBackend picked and why.
type Choice struct {
	// Backend is ort-tensorrt, ort-cuda, opencv or ort-cpu.
	Backend string
	// Provider is the execution provider for the ort-* GPU backends.
	Provider Provider
	// Devices are the CUDA devices that passed the probe (GPU backends).
	Devices []int
	// Reason explains the choice, e.g. why no GPU backend was taken.
	Reason string
	// Report is what discovery found.
	Report Report
}

// ErrNoUsableGPU is wrapped by the error of a forced GPU backend that
// cannot run.
var ErrNoUsableGPU = errors.New("no usable GPU")

// ChooseBackend implements --backend: "auto" takes TensorRT, else CUDA,
// on the devices where a real one-node run on that provider succeeds, and
// the OpenCV DNN CPU backend where none does; any other value forces that
// backend, and a forced GPU backend without a usable GPU is an error
// ("ort-cuda: no usable GPU: <reason>").
func ChooseBackend(ctx context.Context, requested string, p Prober) (Choice, error) {
	switch requested {
	case BackendOpenCV, BackendORTCPU:
		return Choice{Backend: requested, Reason: "forced by --backend"}, nil
	case "", BackendAuto, BackendCUDA, BackendTensorRT:
	default:
		return Choice{}, fmt.Errorf("unknown backend %q (want auto, %s, %s, %s or %s)", requested, BackendTensorRT, BackendCUDA, BackendOpenCV, BackendORTCPU)
	}
	rep := p.Discover()
	c := Choice{Report: rep}
	var reason string
	if !rep.Available {
		reason = rep.Reason
	} else {
		providers := []Provider{ProviderTensorRT, ProviderCUDA}
		switch requested {
		case BackendCUDA:
			providers = []Provider{ProviderCUDA}
		case BackendTensorRT:
			providers = []Provider{ProviderTensorRT}
		}
		var why []string
		for _, prov := range providers {
			devs, fails := probeDevices(ctx, p, prov, rep.Devices)
			if len(devs) > 0 {
				c.Backend, c.Provider, c.Devices = prov.Backend(), prov, devs
				c.Reason = fmt.Sprintf("%s runs on GPU %v", prov, devs)
				if len(why) > 0 {
					c.Reason += " (" + strings.Join(why, "; ") + ")"
				}
				return c, nil
			}
			why = append(why, fails...)
		}
		reason = strings.Join(why, "; ")
	}
	if err := ctx.Err(); err != nil {
		return Choice{}, fmt.Errorf("choosing backend: %w", err)
	}
	if requested == BackendCUDA || requested == BackendTensorRT {
		return Choice{}, fmt.Errorf("%s: %w: %s", requested, ErrNoUsableGPU, reason)
	}
	c.Backend = BackendOpenCV
	c.Reason = "no usable GPU: " + reason
	return c, nil
}

func probeDevices(ctx context.Context, p Prober, prov Provider, devices []Device) (ok []int, fails []string) {
	for _, d := range devices {
		if d.Err != "" && d.MemoryTotal == 0 {
			fails = append(fails, fmt.Sprintf("GPU %d: %s", d.Index, d.Err))
			continue
		}
		if err := p.Probe(ctx, prov, d.Index); err != nil {
			fails = append(fails, fmt.Sprintf("%s on GPU %d: %v", prov, d.Index, err))
			continue
		}
		ok = append(ok, d.Index)
	}
	return ok, fails
}

// SystemProber probes this machine: NVML for discovery, ONNX Runtime for
// the provider runs.
type SystemProber struct {
	// NVML is the library discovery uses; nil means RealNVML.
	NVML NVML
	// LibPath is the ONNX Runtime library (see Init); "" uses the default.
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
	out, err := e.Run(ctx, data, 1, 1, 2, 2)
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
