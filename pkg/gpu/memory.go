package gpu

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// MemoryReader reads the GPU memory in use, so it can be attributed to the
// model loaded in between two reads.
type MemoryReader interface {
	// UsedBytes is the memory in use on device.
	UsedBytes(device int) (uint64, error)
}

// nvmlMemory reads memory through NVML.
type nvmlMemory struct {
	n NVML
}

// NewNVMLMemoryReader returns a MemoryReader over n (nil: RealNVML), or an
// error when NVML cannot be initialised (no GPU). Close releases it.
func NewNVMLMemoryReader(n NVML) (MemoryReader, func() error, error) {
	if n == nil {
		n = RealNVML()
	}
	if err := n.Init(); err != nil {
		return nil, nil, err
	}
	return nvmlMemory{n: n}, n.Shutdown, nil
}

// UsedBytes reads the device's whole memory use. Per-process figures would
// exclude other processes, but NVML lists host PIDs, which inside a
// container never match ours, and a process appears only once it holds a
// CUDA context: mixing the two would corrupt the before/after difference.
// Loads are serialised in this process; another process allocating on the
// same GPU during a load is counted against the model.
func (m nvmlMemory) UsedBytes(device int) (uint64, error) {
	d, err := m.n.Device(device)
	if err != nil && d.MemoryTotal == 0 {
		return 0, fmt.Errorf("reading memory of GPU %d: %w", device, err)
	}
	return d.MemoryUsed, nil
}

// ModelMemory is the GPU memory one model takes on one device, for metrics
// and model info.
type ModelMemory struct {
	Model   string
	Device  int
	Backend string
	// WeightsBytes is the size of the model's initializers.
	WeightsBytes uint64
	// EstimateBytes is WeightsBytes times the budget factor: what the
	// budget was checked against before loading.
	EstimateBytes uint64
	// Measured says whether the figures below were read from the device;
	// without a MemoryReader (no GPU) they are zero.
	Measured bool
	// SessionBytes is the memory use that session creation added.
	SessionBytes uint64
	// PeakBytes maps each warm-up batch size to the memory use it reached,
	// counted from before session creation.
	PeakBytes map[int]uint64
}

// Footprint is what the model is counted for against a budget: the largest
// measured figure, or the estimate when nothing was measured.
func (m ModelMemory) Footprint() uint64 {
	if !m.Measured {
		return m.EstimateBytes
	}
	f := m.SessionBytes
	for _, p := range m.PeakBytes {
		f = max(f, p)
	}
	return f
}

// MemoryLedger records the GPU memory of loaded models. It is safe for
// concurrent use; the server reads it for metrics and model info.
type MemoryLedger struct {
	mu     sync.Mutex // guards the fields below
	models map[ledgerKey]ModelMemory
}

type ledgerKey struct {
	model  string
	device int
}

// NewMemoryLedger returns an empty ledger.
func NewMemoryLedger() *MemoryLedger {
	return &MemoryLedger{models: map[ledgerKey]ModelMemory{}}
}

// Record stores m, replacing an earlier record of the same model and device.
func (l *MemoryLedger) Record(m ModelMemory) {
	l.mu.Lock()
	defer l.mu.Unlock()
	m.PeakBytes = cloneMap(m.PeakBytes)
	l.models[ledgerKey{m.Model, m.Device}] = m
}

// Remove forgets the model's record on device.
func (l *MemoryLedger) Remove(model string, device int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.models, ledgerKey{model, device})
}

// Snapshot returns every record, ordered by model and device.
func (l *MemoryLedger) Snapshot() []ModelMemory {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]ModelMemory, 0, len(l.models))
	for _, m := range l.models {
		m.PeakBytes = cloneMap(m.PeakBytes)
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b ModelMemory) int {
		return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.Device, b.Device))
	})
	return out
}

// Committed is the footprint of every model on device but except.
func (l *MemoryLedger) Committed(device int, except string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var sum uint64
	for k, m := range l.models {
		if k.device == device && k.model != except {
			sum += m.Footprint()
		}
	}
	return sum
}

func cloneMap(m map[int]uint64) map[int]uint64 {
	if m == nil {
		return nil
	}
	out := make(map[int]uint64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Budget caps the GPU memory models may take on each device.
type Budget struct {
	// Bytes is the memory models may take per device; 0 means no budget.
	Bytes uint64
	// Factor multiplies a model's weight bytes into the estimate checked
	// before loading (activations, workspace, arena rounding); 0 means
	// DefaultBudgetFactor.
	Factor float64
}

// DefaultBudgetFactor is the estimate's multiple of the weights: ResNet-50
// at batch 64 under the CUDA provider peaks near this (weights ~100 MB,
// activations and cuDNN workspace several times that grow with the batch),
// so it errs on the side of refusing.
const DefaultBudgetFactor = 4.0

// ErrOverBudget is wrapped by the errors that refuse a model for memory.
var ErrOverBudget = errors.New("GPU memory budget exceeded")

func (b Budget) factor() float64 {
	if b.Factor > 0 {
		return b.Factor
	}
	return DefaultBudgetFactor
}

// Estimate is the bytes a model of weights bytes is expected to take.
func (b Budget) Estimate(weights uint64) uint64 { return uint64(float64(weights) * b.factor()) }

// CheckEstimate refuses a model whose estimate does not fit next to the
// committed memory.
func (b Budget) CheckEstimate(model string, device int, weights, committed uint64) error {
	if b.Bytes == 0 {
		return nil
	}
	est := b.Estimate(weights)
	if committed+est > b.Bytes {
		return fmt.Errorf("loading model %q on GPU %d: needs about %s (weights %s × %.1f) but %s of the %s budget is left: %w",
			model, device, mib(est), mib(weights), b.factor(), mib(sub(b.Bytes, committed)), mib(b.Bytes), ErrOverBudget)
	}
	return nil
}

// CheckMeasured refuses a loaded model whose measured footprint does not
// fit next to the committed memory.
func (b Budget) CheckMeasured(model string, device int, measured, committed uint64) error {
	if b.Bytes == 0 {
		return nil
	}
	if committed+measured > b.Bytes {
		return fmt.Errorf("loading model %q on GPU %d: it took %s once loaded and warmed up, but %s of the %s budget is left: %w",
			model, device, mib(measured), mib(sub(b.Bytes, committed)), mib(b.Bytes), ErrOverBudget)
	}
	return nil
}

func sub(a, b uint64) uint64 {
	if b > a {
		return 0
	}
	return a - b
}

func mib(b uint64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// elemSize is the byte size of an ONNX tensor element type; 0 if unknown.
func elemSize(t int32) uint64 {
	switch onnx.TensorProto_DataType(t) {
	case onnx.TensorProto_FLOAT, onnx.TensorProto_INT32, onnx.TensorProto_UINT32:
		return 4
	case onnx.TensorProto_DOUBLE, onnx.TensorProto_INT64, onnx.TensorProto_UINT64:
		return 8
	case onnx.TensorProto_FLOAT16, onnx.TensorProto_BFLOAT16, onnx.TensorProto_INT16, onnx.TensorProto_UINT16:
		return 2
	case onnx.TensorProto_INT8, onnx.TensorProto_UINT8, onnx.TensorProto_BOOL:
		return 1
	}
	return 0
}

// WeightBytes sums the sizes of the initializers of the ONNX model at path:
// the part of its GPU memory known before loading it.
func WeightBytes(path string) (uint64, error) {
	m, err := onnx.ReadModel(path)
	if err != nil {
		return 0, err
	}
	var sum uint64
	for _, t := range m.GetGraph().GetInitializer() {
		if raw := t.GetRawData(); raw != nil {
			sum += uint64(len(raw))
			continue
		}
		n := onnx.NumElements(t)
		if n < 0 {
			return 0, fmt.Errorf("initializer %q has a negative dimension", t.GetName())
		}
		sum += uint64(n) * elemSize(t.GetDataType())
	}
	return sum, nil
}
