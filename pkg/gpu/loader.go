package gpu

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// LoadOptions configure LoadModel.
type LoadOptions struct {
	// Name is the model's name in errors and memory records.
	Name string
	// Session configures each device's session; its Device is set per
	// device from Devices.
	Session SessionOptions
	// Devices are the CUDA device ids to load on; nil means device 0.
	// Each gets one session, shared by its engines.
	Devices []int
	// InstancesPerDevice is the number of engines per device (batches run
	// at once on it); 0 means 1.
	InstancesPerDevice int
	// InputMemory is MemoryPinned (default) or MemoryPageable.
	InputMemory MemoryKind
	// CUDARuntime is the CUDA runtime library for pinned memory (see
	// EngineOptions.CUDARuntime).
	CUDARuntime string
	// OutputNames are the outputs the engines return; nil means all.
	OutputNames []string
	// PadBatchSizes are the sizes batches are padded up to (see
	// EngineOptions.PadBatchSizes); nil runs every batch at its size.
	PadBatchSizes []int
	// WarmUpBatchSizes are run once each with zeros after loading, in
	// increasing order, so the first requests do not pay for cuDNN's
	// algorithm search and arena growth, and so the memory peak of each
	// size can be measured.
	WarmUpBatchSizes []int
	// Budget, when its Bytes is set, refuses models that would not fit.
	Budget Budget
	// Memory reads GPU memory use; nil leaves the records unmeasured (the
	// CPU twin and machines without NVML).
	Memory MemoryReader
	// Ledger receives the model's memory records; nil means a private one.
	Ledger *MemoryLedger
}

// Model is a model loaded on one or more devices.
type Model struct {
	Name     string
	Sessions []*Session
	// Engines holds InstancesPerDevice engines per device, device by device.
	Engines []*Engine
	// Memory is the model's record on each device.
	Memory []ModelMemory

	ledger *MemoryLedger
}

// loadMu serialises loads: memory is attributed by reading the device's
// use before and after, which another load in between would corrupt.
var loadMu sync.Mutex

// LoadModel loads the ONNX model at path on every device of o, checks it
// against the memory budget (estimated before, measured after), creates
// its engines and warms them up. On any error nothing stays loaded.
func LoadModel(ctx context.Context, path string, o LoadOptions) (*Model, error) {
	if o.Name == "" {
		o.Name = path
	}
	devices := o.Devices
	if len(devices) == 0 {
		devices = []int{0}
	}
	instances := max(o.InstancesPerDevice, 1)
	if o.Ledger == nil {
		o.Ledger = NewMemoryLedger()
	}
	sizes := slices.Clone(o.WarmUpBatchSizes)
	slices.Sort(sizes)
	if len(sizes) > 0 && sizes[0] < 1 {
		return nil, fmt.Errorf("loading model %q: warm-up batch size %d must be positive", o.Name, sizes[0])
	}
	weights, err := WeightBytes(path)
	if err != nil {
		return nil, fmt.Errorf("loading model %q: %w", o.Name, err)
	}

	loadMu.Lock()
	defer loadMu.Unlock()
	m := &Model{Name: o.Name, ledger: o.Ledger}
	fail := func(err error) (*Model, error) {
		m.Close()
		return nil, err
	}
	for _, dev := range devices {
		rec := ModelMemory{Model: o.Name, Device: dev, Backend: o.Session.Provider.Backend(),
			WeightsBytes: weights, EstimateBytes: o.Budget.Estimate(weights)}
		committed := o.Ledger.Committed(dev, o.Name)
		if err := o.Budget.CheckEstimate(o.Name, dev, weights, committed); err != nil {
			return fail(err)
		}
		var before uint64
		if o.Memory != nil {
			if before, err = o.Memory.UsedBytes(dev); err != nil {
				return fail(fmt.Errorf("loading model %q: %w", o.Name, err))
			}
		}
		so := o.Session
		so.Device = dev
		s, err := OpenSession(path, so)
		if err != nil {
			return fail(fmt.Errorf("loading model %q: %w", o.Name, err))
		}
		m.Sessions = append(m.Sessions, s)
		if o.Memory != nil {
			after, err := o.Memory.UsedBytes(dev)
			if err != nil {
				return fail(fmt.Errorf("loading model %q: %w", o.Name, err))
			}
			rec.Measured, rec.SessionBytes = true, sub(after, before)
		}
		first := len(m.Engines)
		for range instances {
			e, err := NewEngine(s, EngineOptions{InputMemory: o.InputMemory, CUDARuntime: o.CUDARuntime, OutputNames: o.OutputNames, PadBatchSizes: o.PadBatchSizes})
			if err != nil {
				return fail(fmt.Errorf("loading model %q: %w", o.Name, err))
			}
			m.Engines = append(m.Engines, e)
		}
		if rec.PeakBytes, err = warmUp(ctx, m.Engines[first], sizes, o.Memory, dev, before); err != nil {
			return fail(fmt.Errorf("loading model %q: warming up on device %d: %w", o.Name, dev, err))
		}
		if rec.Measured {
			if err := o.Budget.CheckMeasured(o.Name, dev, rec.Footprint(), committed); err != nil {
				return fail(err)
			}
		}
		m.Memory = append(m.Memory, rec)
	}
	for _, rec := range m.Memory {
		o.Ledger.Record(rec)
	}
	return m, nil
}

// warmUp runs each batch size once with zeros and returns the memory use
// each reached, counted from base. It checks that outputs are written into
// the bound buffers, not copied out of memory of ONNX Runtime's own.
func warmUp(ctx context.Context, e *Engine, sizes []int, mem MemoryReader, dev int, base uint64) (map[int]uint64, error) {
	if len(sizes) == 0 {
		return nil, nil
	}
	in := e.Input()
	c, h, w := int(in.Shape[1]), int(in.Shape[2]), int(in.Shape[3])
	if c < 1 || h < 1 || w < 1 {
		return nil, fmt.Errorf("input %q has dynamic image dimensions %v; cannot warm up", in.Name, in.Shape)
	}
	data, free, err := e.AllocBatch(sizes[len(sizes)-1], c, h, w)
	if err != nil {
		return nil, err
	}
	defer free()
	peaks := map[int]uint64{}
	for _, n := range sizes {
		if _, err := e.RunData(ctx, data, n, c, h, w); err != nil {
			return nil, fmt.Errorf("batch %d: %w", n, err)
		}
		if err := e.CheckBoundOutputs(n); err != nil {
			return nil, err
		}
		if mem != nil {
			used, err := mem.UsedBytes(dev)
			if err != nil {
				return nil, err
			}
			peaks[n] = sub(used, base)
		}
	}
	return peaks, nil
}

// Close frees the engines and sessions and forgets the memory records.
func (m *Model) Close() error {
	var errs []error
	for _, e := range m.Engines {
		errs = append(errs, e.Close())
	}
	for _, s := range m.Sessions {
		errs = append(errs, s.Close())
	}
	for _, rec := range m.Memory {
		m.ledger.Remove(rec.Model, rec.Device)
	}
	m.Engines, m.Sessions = nil, nil
	return errors.Join(errs...)
}
