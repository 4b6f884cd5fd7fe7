// Package nvmlsource feeds the GPU series of internal/metrics from
// pkg/gpu: device memory and utilisation through NVML, and the memory
// each loaded model holds from the GPU memory ledger. It is apart from
// package metrics so that metrics does not link pkg/gpu's native code.
package nvmlsource

import (
	"errors"
	"fmt"
	"sync"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/pkg/gpu"
)

// Source is a metrics.GPUSource over NVML. NVML stays initialised from
// Open to Close, so a scrape costs a few driver queries rather than a
// library initialisation.
type Source struct {
	nvml   gpu.NVML
	ledger *gpu.MemoryLedger // nil: no per-model series

	mu     sync.Mutex // guards the fields below
	closed bool
}

// Open initialises NVML (nil n: the real library) and returns a Source
// when there is at least one GPU. Without a driver or a GPU it returns a
// nil Source and the reason, which metrics.RegisterGPU logs; that is not
// an error. ledger, which may be nil, supplies the per-model memory.
// Pass the result to RegisterGPU through GPUSource, which turns a nil
// *Source into a nil interface.
func Open(n gpu.NVML, ledger *gpu.MemoryLedger) (*Source, string) {
	if n == nil {
		n = gpu.RealNVML()
	}
	if err := n.Init(); err != nil {
		return nil, err.Error()
	}
	count, err := n.DeviceCount()
	switch {
	case err != nil:
		_ = n.Shutdown()
		return nil, fmt.Sprintf("counting NVIDIA GPUs: %v", err)
	case count == 0:
		_ = n.Shutdown()
		return nil, "no NVIDIA GPU found"
	}
	return &Source{nvml: n, ledger: ledger}, ""
}

// GPUSource returns s as a metrics.GPUSource: nil when s is nil, so that
// RegisterGPU sees no source rather than a typed nil.
func (s *Source) GPUSource() metrics.GPUSource {
	if s == nil {
		return nil
	}
	return s
}

// GPUSnapshot implements metrics.GPUSource. A device NVML cannot describe
// is left out of the snapshot rather than reported as zero.
func (s *Source) GPUSnapshot() (metrics.GPUSnapshot, error) {
	if s == nil {
		return metrics.GPUSnapshot{}, errors.New("no NVML source")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return metrics.GPUSnapshot{}, errors.New("NVML closed")
	}
	count, err := s.nvml.DeviceCount()
	if err != nil {
		return metrics.GPUSnapshot{}, fmt.Errorf("counting NVIDIA GPUs: %w", err)
	}
	var snap metrics.GPUSnapshot
	for i := range count {
		d, err := s.nvml.Device(i)
		if err != nil {
			continue
		}
		snap.Devices = append(snap.Devices, metrics.GPUDevice{
			Index:            i,
			UUID:             d.UUID,
			Name:             d.Name,
			MemoryUsedBytes:  d.MemoryUsed,
			MemoryTotalBytes: d.MemoryTotal,
			Utilization:      float64(d.GPUUtilization) / 100,
		})
	}
	if s.ledger != nil {
		for _, m := range s.ledger.Snapshot() {
			snap.Models = append(snap.Models, metrics.GPUModelMemory{Model: m.Model, DeviceIndex: m.Device, Bytes: m.Footprint()})
		}
	}
	return snap, nil
}

// Close shuts NVML down; later snapshots fail (and the series go absent).
func (s *Source) Close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.nvml.Shutdown()
}
