package gpu

import (
	"context"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/failover"
)

// loadProbe loads the one-node probe model (y = x + x) on the CPU twin of
// the GPU engine, or skips naming the missing library.
func loadProbe(t *testing.T) *Model {
	t.Helper()
	path := probeModelFile(t)
	m, err := LoadModel(context.Background(), path, LoadOptions{
		Name: "probe", Session: SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1}, WarmUpBatchSizes: []int{1},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestEngineRunsBatches(t *testing.T) {
	m := loadProbe(t)
	e := m.Engines[0]
	data, free, err := e.AllocBatch(1, 1, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	b := &engine.Batch{N: 1, Cap: 1, C: 1, H: 2, W: 2, Data: data}
	copy(b.Slot(0), []float32{1, -2, 0.5, 4})
	out, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	want := []float32{2, -4, 1, 8}
	if len(out) != 1 || out[0].Name != "y" || len(out[0].Data) != 4 {
		t.Fatalf("outputs %+v", out)
	}
	for i := range want {
		if out[0].Data[i] != want[i] {
			t.Fatalf("y = %v, want %v", out[0].Data, want)
		}
	}
	if st := e.Stats(); st.CopiedBatches != 0 {
		t.Errorf("a batch in AllocBatch memory was copied (%+v)", st)
	}
	if _, err := e.Run(context.Background(), nil); err == nil {
		t.Error("nil batch accepted")
	}
	allocs := testing.AllocsPerRun(10, func() {
		if _, err := e.Run(context.Background(), b); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("steady-state Run allocates %v times, want 0", allocs)
	}
}

// TestFailoverOverGPUEngine composes the real adapter with the failover
// engine: buffers come from the GPU side, batches run there while healthy.
func TestFailoverOverGPUEngine(t *testing.T) {
	m := loadProbe(t)
	f := failover.New(m.Engines[0], nil, nil, failover.Options{})
	data, free, err := f.AllocBatch(1, 1, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	copy(data, []float32{1, 2, 3, 4})
	out, err := f.Run(context.Background(), &engine.Batch{N: 1, Cap: 1, C: 1, H: 2, W: 2, Data: data})
	if err != nil {
		t.Fatal(err)
	}
	if out[0].Data[3] != 8 || f.Backend() != "ort-cpu-binding" {
		t.Errorf("got %v from %s", out[0].Data, f.Backend())
	}
}
