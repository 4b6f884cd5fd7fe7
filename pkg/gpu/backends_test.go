package gpu

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// fakeProber reports GPUs and probe results without a GPU.
type fakeProber struct {
	report Report
	fail   map[int]error // probe failure per device
	probes int
}

func (f *fakeProber) Discover() Report { return f.report }
func (f *fakeProber) Probe(_ context.Context, _ Provider, device int) error {
	f.probes++
	return f.fail[device]
}

func twoGPUs() Report {
	return Report{Available: true, Devices: []Device{{Index: 0, MemoryTotal: 1}, {Index: 1, MemoryTotal: 1}}}
}

// probeRepoModel writes the probe model as a repository model with the
// given instance count.
func probeRepoModel(t *testing.T, instances int) *modelrepo.Model {
	t.Helper()
	return &modelrepo.Model{
		Config: modelrepo.Config{Name: "probe", Batching: modelrepo.BatchingConfig{Instances: instances, MaxBatchSize: 1}},
		Path:   probeModelFile(t),
	}
}

// cpuBackends returns backends whose ort-cuda runs on the CPU provider,
// so the whole factory path runs without a GPU, and a registry of them.
func cpuBackends(t *testing.T, o BackendOptions) (*Backends, *engine.Registry) {
	t.Helper()
	r := NewBackends(o)
	r.providers = map[string]Provider{engine.ORTCUDA: ProviderCPU}
	reg, err := engine.NewRegistry(r.Factories())
	if err != nil {
		t.Fatal(err)
	}
	return r, reg
}

func TestRegisteredBackendWithoutGPU(t *testing.T) {
	p := &fakeProber{report: Report{Reason: "NVML library not found (no NVIDIA driver)"}}
	_, reg := cpuBackends(t, BackendOptions{Prober: p})
	for range 2 {
		_, err := reg.Resolve(engine.ORTCUDA)
		if !errors.Is(err, engine.ErrNotAvailable) || !strings.Contains(err.Error(), "no usable GPU: NVML library not found") {
			t.Fatalf("ort-cuda without a GPU: %v", err)
		}
	}
}

func TestRegisteredBackendLoadsInstancesAcrossGPUs(t *testing.T) {
	m := probeRepoModel(t, 3)
	p := &fakeProber{report: twoGPUs()}
	r, reg := cpuBackends(t, BackendOptions{Prober: p, Memory: nopMemory{}})
	engines, choice, err := reg.Load(context.Background(), engine.ORTCUDA, m, 3)
	if err != nil {
		t.Fatal(err)
	}
	if choice.Backend != engine.ORTCUDA || len(engines) != 3 {
		t.Fatalf("choice %+v, %d engines", choice, len(engines))
	}
	if p.probes != 2 {
		t.Errorf("%d probes, want one per GPU", p.probes)
	}
	// One session per GPU, two engines each, all recorded in the ledger.
	if recs := r.Ledger().Snapshot(); len(recs) != 2 || recs[0].Device != 0 || recs[1].Device != 1 || !recs[0].Measured {
		t.Errorf("ledger %+v, want measured records on GPUs 0 and 1", recs)
	}
	// Each instance reports its device's record: instance i runs on GPU i mod 2.
	recs := r.Ledger().Snapshot()
	for i, e := range engines {
		got, err := e.(interface{ GPUMemoryBytes() (uint64, error) }).GPUMemoryBytes()
		if want := recs[i%2].Footprint(); err != nil || got != want {
			t.Errorf("instance %d: GPUMemoryBytes = %d, %v; want %d (GPU %d's record)", i, got, err, want, i%2)
		}
	}
	for i, e := range engines {
		out := runProbe(t, e, float32(i))
		if out != 2*float32(i) {
			t.Errorf("instance %d computed %v", i, out)
		}
	}
	for _, e := range engines[:2] {
		e.Close()
	}
	if len(r.Ledger().Snapshot()) != 2 {
		t.Error("model unloaded while an instance is still open")
	}
	engines[2].Close()
	engines[2].Close()
	if n := len(r.Ledger().Snapshot()); n != 0 {
		t.Errorf("ledger holds %d records after every instance closed", n)
	}
	// A second load after unloading works.
	again, _, err := reg.Load(context.Background(), engine.ORTCUDA, m, 1)
	if err != nil {
		t.Fatal(err)
	}
	again[0].Close()
}

func TestRegisteredBackendSkipsFailingGPU(t *testing.T) {
	m := probeRepoModel(t, 2)
	p := &fakeProber{report: twoGPUs(), fail: map[int]error{1: errors.New("CUDA error 999")}}
	r, reg := cpuBackends(t, BackendOptions{Prober: p, Memory: nopMemory{}})
	engines, _, err := reg.Load(context.Background(), engine.ORTCUDA, m, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, e := range engines {
			e.Close()
		}
	}()
	if recs := r.Ledger().Snapshot(); len(recs) != 1 || recs[0].Device != 0 {
		t.Errorf("ledger %+v, want GPU 0 only", recs)
	}
}

func TestRegisteredBackendWithFailover(t *testing.T) {
	m := probeRepoModel(t, 2)
	var fallbacks int
	_, reg := cpuBackends(t, BackendOptions{
		Prober:   &fakeProber{report: twoGPUs()},
		Memory:   nopMemory{},
		Failover: &failover.Options{RetryOnFallback: true},
		Fallback: func(context.Context, *modelrepo.Model) (engine.Engine, error) {
			fallbacks++
			// Never asked to run here.
			return &enginefake.Engine{Name: engine.ORTCPU, Err: errors.New("fallback ran")}, nil
		},
	})
	engines, _, err := reg.Load(context.Background(), engine.ORTCUDA, m, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, e := range engines {
			e.Close()
		}
	}()
	if fallbacks != 2 {
		t.Errorf("%d fallback engines, want one per instance", fallbacks)
	}
	for _, e := range engines {
		f, ok := e.(*failover.Engine)
		if !ok {
			t.Fatalf("engine %T, want a failover engine", e)
		}
		if out := runProbe(t, f, 3); out != 6 || f.Backend() != "ort-cpu-binding" {
			t.Errorf("got %v from %s", out, f.Backend())
		}
	}
}

// runProbe runs the probe model on x in every element and returns y[0].
func runProbe(t *testing.T, e engine.Engine, x float32) float32 {
	t.Helper()
	a, ok := e.(engine.BatchAllocator)
	if !ok {
		t.Fatalf("%T does not allocate batches", e)
	}
	data, free, err := a.AllocBatch(1, 1, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	for i := range data {
		data[i] = x
	}
	out, err := e.Run(context.Background(), &engine.Batch{N: 1, Cap: 1, C: 1, H: 2, W: 2, Data: data})
	if err != nil {
		t.Fatal(err)
	}
	return out[0].Data[0]
}

// nopMemory reports no memory in use, so loads are measured and free.
type nopMemory struct{}

func (nopMemory) UsedBytes(int) (uint64, error) { return 0, nil }

func TestPadSizes(t *testing.T) {
	b := modelrepo.BatchingConfig{MaxBatchSize: 8, PreferredBatchSizes: []int{4, 1}}
	for _, tt := range []struct {
		policy string
		want   []int
	}{
		{"", []int{8}},
		{PadWarmed, []int{1, 4, 8}},
		{PadMax, []int{8}},
		{PadNone, nil},
	} {
		got, err := padSizes(tt.policy, b)
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("padSizes(%q) = %v, %v; want %v", tt.policy, got, err, tt.want)
		}
	}
	if _, err := padSizes("some", b); err == nil || !strings.Contains(err.Error(), `"some" unknown`) {
		t.Errorf("unknown policy: %v", err)
	}
}

// TestForcedCUDAOnThisMachine asks the real machine; without a GPU the
// answer must be the clear error, and auto must not pick a GPU backend.
func TestForcedCUDAOnThisMachine(t *testing.T) {
	lib := initRuntime(t)
	reg, err := engine.NewRegistry(NewBackends(BackendOptions{ORTLib: lib}).Factories())
	if err != nil {
		t.Fatal(err)
	}
	_, err = reg.Resolve(engine.ORTCUDA)
	if Discover(nil).Available {
		if err != nil {
			t.Fatalf("GPU present but ort-cuda refused: %v", err)
		}
		return
	}
	if !errors.Is(err, engine.ErrNotAvailable) || !strings.Contains(err.Error(), "ort-cuda: backend not available: no usable GPU: ") {
		t.Fatalf("forcing ort-cuda without a GPU: %v, want \"ort-cuda: backend not available: no usable GPU: <reason>\"", err)
	}
	if _, err := reg.Resolve(engine.Auto); err == nil || !strings.Contains(err.Error(), "nothing available") {
		t.Errorf("auto with only GPU backends and no GPU: %v", err)
	}
}
