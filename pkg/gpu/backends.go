package gpu

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/onnx"
)

// BackendOptions configure the GPU backends (ort-cuda and ort-tensorrt).
type BackendOptions struct {
	// ORTLib is the ONNX Runtime library the probes and sessions load;
	// use the GPU build, which serves the CPU engines too.
	ORTLib string
	// CUDARuntime is the CUDA runtime library (libcudart) pinned host
	// memory comes from; "" looks for it on the loader's path.
	CUDARuntime string
	// Prober answers discovery and provider probes; nil means
	// SystemProber over ORTLib and Session.
	Prober Prober
	// Session tunes the providers (CUDA options, TensorRT cache folder);
	// Provider and Device are set per backend and device.
	Session SessionOptions
	// Budget refuses models that would not fit in GPU memory.
	Budget Budget
	// BatchPadding is how batches are padded before they run: PadMax (the
	// default) runs every batch at max_batch_size, PadWarmed at the
	// smallest of the model's warmed-up sizes (preferred sizes and max)
	// that holds it, PadNone at its own size. The CUDA provider re-plans
	// its convolutions whenever the input shape differs from the last
	// run's, which on an H100 costs far more than the padding (see
	// pkg/gpu/README.md), so one shape is the default.
	BatchPadding string
	// Ledger receives every model's GPU memory; nil means a new one,
	// returned by Registration.Ledger.
	Ledger *MemoryLedger
	// Memory reads GPU memory use; nil means NVML when it loads.
	Memory MemoryReader
	// Precision is "fp32" (the model as written; the default) or "fp16":
	// the model is converted at load (onnx.ToFP16: float16 weights and
	// compute, float32 inputs and outputs, the operators that need it in
	// float32) into CacheDir, and that file is served.
	Precision string
	// CacheDir keeps the converted models; empty means the user cache
	// folder.
	CacheDir string
	// Failover, when set, wraps each GPU engine with a CPU fallback behind
	// a circuit breaker shared by the model's engines on one device.
	Failover *failover.Options
	// Fallback builds the CPU engine of one instance for failover; it is
	// needed when Failover is set (the server passes ort-cpu's factory).
	Fallback func(ctx context.Context, m *modelrepo.Model) (engine.Engine, error)
}

// Backends is the state behind the GPU backends' factories: which GPUs
// each provider runs on, and the models loaded on them.
type Backends struct {
	o BackendOptions
	// providers maps each backend name to its provider; tests map a name
	// to the CPU provider to run the whole path without a GPU.
	providers map[string]Provider

	mu     sync.Mutex // guards the fields below
	avail  map[Provider]*availability
	models map[*modelrepo.Model]*loaded
	memory MemoryReader
	memErr error // why there is no memory reader; nil until tried
}

type availability struct {
	devices []int
	err     error
}

// loaded is one model on one backend, shared by its instances.
type loaded struct {
	model     *Model
	devices   []int
	perDevice int
	open      int // engines handed out and not yet closed
	breakers  map[int]*failover.Breaker
}

// NewBackends returns the GPU backends of o. Nothing is probed until a
// factory is asked.
func NewBackends(o BackendOptions) *Backends {
	if o.Prober == nil {
		o.Prober = SystemProber{LibPath: o.ORTLib, Options: o.Session}
	}
	if o.Ledger == nil {
		o.Ledger = NewMemoryLedger()
	}
	return &Backends{
		o:         o,
		providers: map[string]Provider{engine.ORTCUDA: ProviderCUDA, engine.ORTTensorRT: ProviderTensorRT},
		avail:     map[Provider]*availability{},
		models:    map[*modelrepo.Model]*loaded{},
		memory:    o.Memory,
	}
}

// Factories are ort-cuda and ort-tensorrt, for the server's
// engine.Registry: Available probes the provider with a real run on every
// GPU (once, cached), New loads the model once per backend with one
// session per usable GPU and hands out its engines instance by instance,
// round-robin over the GPUs.
func (r *Backends) Factories() map[string]engine.Factory {
	fs := map[string]engine.Factory{}
	for name := range r.providers {
		fs[name] = engine.Factory{
			Available: func() error { _, err := r.available(name); return err },
			New: func(ctx context.Context, m *modelrepo.Model, instance int) (engine.Engine, error) {
				return r.newEngine(ctx, name, m, instance)
			},
		}
	}
	return fs
}

// Ledger is the GPU memory of the models loaded through these backends,
// for metrics and model info.
func (r *Backends) Ledger() *MemoryLedger { return r.o.Ledger }

// available probes the provider behind name on every GPU, once.
func (r *Backends) available(name string) ([]int, error) {
	p := r.providers[name]
	r.mu.Lock()
	defer r.mu.Unlock()
	if a, ok := r.avail[p]; ok {
		return a.devices, a.err
	}
	a := &availability{}
	rep := r.o.Prober.Discover()
	if !rep.Available {
		a.err = fmt.Errorf("%w: no usable GPU: %s", engine.ErrNotAvailable, rep.Reason)
	} else {
		var why []error
		for _, d := range rep.Devices {
			if err := r.o.Prober.Probe(context.Background(), p, d.Index); err != nil {
				why = append(why, fmt.Errorf("GPU %d: %w", d.Index, err))
				continue
			}
			a.devices = append(a.devices, d.Index)
		}
		if len(a.devices) == 0 {
			a.err = fmt.Errorf("%w: no usable GPU: %w", engine.ErrNotAvailable, errors.Join(why...))
		}
	}
	r.avail[p] = a
	return a.devices, a.err
}

func (r *Backends) newEngine(ctx context.Context, name string, m *modelrepo.Model, instance int) (engine.Engine, error) {
	devices, err := r.available(name)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	l, ok := r.models[m]
	r.mu.Unlock()
	if !ok {
		if instance != 0 {
			return nil, fmt.Errorf("%s: instance %d of model %q asked for before instance 0", name, instance, m.Name)
		}
		if l, err = r.load(ctx, name, m, devices); err != nil {
			return nil, err
		}
	}
	// Round-robin over the GPUs: instance i runs on device i mod len.
	d := instance % len(l.devices)
	k := instance / len(l.devices)
	if k >= l.perDevice {
		return nil, fmt.Errorf("%s: model %q has %d instances, not %d", name, m.Name, l.perDevice*len(l.devices), instance+1)
	}
	ge := l.model.Engines[d*l.perDevice+k]
	var e engine.Engine = &instanceEngine{Engine: ge, release: func() { r.release(m) },
		memory: func() (uint64, error) { return r.memoryOf(m.Name, l.devices[d]) }}
	r.mu.Lock()
	l.open++
	r.mu.Unlock()
	if r.o.Failover == nil {
		return e, nil
	}
	if r.o.Fallback == nil {
		e.Close()
		return nil, fmt.Errorf("%s: model %q: failover configured without a fallback backend", name, m.Name)
	}
	fb, err := r.o.Fallback(ctx, m)
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("%s: fallback engine for model %q: %w", name, m.Name, err)
	}
	r.mu.Lock()
	br, ok := l.breakers[l.devices[d]]
	if !ok {
		br = failover.NewBreaker(e.Backend(), *r.o.Failover)
		l.breakers[l.devices[d]] = br
	}
	r.mu.Unlock()
	return failover.New(e, fb, br, *r.o.Failover), nil
}

// load loads m with enough engines for its configured instances.
func (r *Backends) load(ctx context.Context, name string, m *modelrepo.Model, devices []int) (*loaded, error) {
	if err := Init(r.o.ORTLib); err != nil {
		return nil, err
	}
	instances := max(m.Batching.Instances, 1)
	perDevice := (instances + len(devices) - 1) / len(devices)
	lo := LoadOptions{
		Name:               m.Name,
		Session:            r.o.Session,
		CUDARuntime:        r.o.CUDARuntime,
		Devices:            devices,
		InstancesPerDevice: perDevice,
		WarmUpBatchSizes:   warmUpSizes(m.Batching),
		Budget:             r.o.Budget,
		Memory:             r.memoryReader(),
		Ledger:             r.o.Ledger,
	}
	lo.Session.Provider = r.providers[name]
	pad, err := padSizes(r.o.BatchPadding, m.Batching)
	if err != nil {
		return nil, err
	}
	lo.PadBatchSizes = pad
	if m.Config.Output.Name != "" {
		lo.OutputNames = []string{m.Config.Output.Name}
	}
	path := m.Path
	if r.o.Precision == "fp16" {
		dir := r.o.CacheDir
		if dir == "" {
			dir = onnx.CacheDir("fp16")
		}
		if path, err = onnx.ConvertFileFP16(m.Path, dir); err != nil {
			return nil, fmt.Errorf("loading model %q: %w", m.Name, err)
		}
	}
	gm, err := LoadModel(ctx, path, lo)
	if err != nil {
		return nil, err
	}
	if in := gm.Engines[0].Input(); m.Config.Input.Name != "" && in.Name != m.Config.Input.Name {
		gm.Close()
		return nil, fmt.Errorf("loading model %q: config input %q, graph input %q", m.Name, m.Config.Input.Name, in.Name)
	}
	l := &loaded{model: gm, devices: devices, perDevice: perDevice, breakers: map[int]*failover.Breaker{}}
	r.mu.Lock()
	r.models[m] = l
	r.mu.Unlock()
	return l, nil
}

// memoryReader returns the NVML reader, opened on first use; nil when NVML
// is absent (the model's memory is then estimated, not measured).
func (r *Backends) memoryReader() MemoryReader {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.memory == nil && r.memErr == nil {
		// The reader stays open for the process's life, like the models.
		r.memory, _, r.memErr = NewNVMLMemoryReader(nil)
	}
	return r.memory
}

// memoryOf is the GPU memory the ledger holds for model on device: the
// measured peak, or the estimate where nothing could be measured.
func (r *Backends) memoryOf(model string, device int) (uint64, error) {
	for _, mm := range r.o.Ledger.Snapshot() {
		if mm.Model == model && mm.Device == device {
			return mm.Footprint(), nil
		}
	}
	return 0, fmt.Errorf("no GPU memory record of model %q on GPU %d", model, device)
}

// release drops one instance of m and unloads the model with the last.
func (r *Backends) release(m *modelrepo.Model) {
	r.mu.Lock()
	l, ok := r.models[m]
	if ok {
		l.open--
		if l.open > 0 {
			ok = false
		} else {
			delete(r.models, m)
		}
	}
	r.mu.Unlock()
	if ok {
		l.model.Close()
	}
}

// Batch padding policies of BackendOptions.BatchPadding.
const (
	PadWarmed = "warmed"
	PadMax    = "max"
	PadNone   = "none"
)

// padSizes are the batch sizes a model's batches are padded to under
// policy.
func padSizes(policy string, b modelrepo.BatchingConfig) ([]int, error) {
	switch policy {
	case PadWarmed:
		return warmUpSizes(b), nil
	case "", PadMax:
		return []int{max(b.MaxBatchSize, 1)}, nil
	case PadNone:
		return nil, nil
	}
	return nil, fmt.Errorf("gpu batch padding %q unknown (want %s, %s or %s)", policy, PadWarmed, PadMax, PadNone)
}

// warmUpSizes are the batch sizes a model warms up at: its preferred sizes
// and its largest.
func warmUpSizes(b modelrepo.BatchingConfig) []int {
	sizes := append(slices.Clone(b.PreferredBatchSizes), max(b.MaxBatchSize, 1))
	slices.Sort(sizes)
	return slices.Compact(sizes)
}

// instanceEngine is one instance handed to the server; closing it releases
// its share of the model.
type instanceEngine struct {
	*Engine
	once    sync.Once
	release func()
	memory  func() (uint64, error)
}

// GPUMemoryBytes is the GPU memory of the engine's model on its device, as
// the ledger has it (shared by the model's instances on that device).
func (e *instanceEngine) GPUMemoryBytes() (uint64, error) { return e.memory() }

func (e *instanceEngine) Close() error {
	var err error
	e.once.Do(func() {
		err = e.Engine.Close()
		e.release()
	})
	return err
}
