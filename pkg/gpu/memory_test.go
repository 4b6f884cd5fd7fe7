package gpu

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
)

// fakeMemory reports memory use that grows by step on every read, as a
// loading model's would.
type fakeMemory struct {
	mu    sync.Mutex
	used  uint64
	step  uint64
	reads int
}

func (f *fakeMemory) UsedBytes(device int) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	u := f.used
	f.used += f.step
	return u, nil
}

func TestLoadModelRecordsMemory(t *testing.T) {
	initRuntime(t)
	path := convModel(t)
	weights, err := WeightBytes(path)
	if err != nil {
		t.Fatal(err)
	}
	// Conv 4x3x3x3 + 4, Gemm 10x4 + 10, all float32.
	if want := uint64(4 * (108 + 4 + 40 + 10)); weights != want {
		t.Fatalf("WeightBytes = %d, want %d", weights, want)
	}
	ledger := NewMemoryLedger()
	mem := &fakeMemory{used: 1 << 30, step: 10 << 20}
	m, err := LoadModel(context.Background(), path, LoadOptions{
		Name:               "tiny",
		Session:            SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1},
		InstancesPerDevice: 2,
		WarmUpBatchSizes:   []int{4, 1},
		Memory:             mem,
		Ledger:             ledger,
		Budget:             Budget{Bytes: 1 << 30},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Engines) != 2 || len(m.Sessions) != 1 {
		t.Errorf("%d engines on %d sessions, want 2 on 1", len(m.Engines), len(m.Sessions))
	}
	snap := ledger.Snapshot()
	if len(snap) != 1 {
		t.Fatalf("ledger holds %d records, want 1", len(snap))
	}
	r := snap[0]
	// Reads: before, after session, after batch 1, after batch 4.
	if !r.Measured || r.SessionBytes != 10<<20 || r.PeakBytes[1] != 20<<20 || r.PeakBytes[4] != 30<<20 {
		t.Errorf("record %+v, want session 10 MiB, peaks 20 MiB at 1 and 30 MiB at 4", r)
	}
	if r.Footprint() != 30<<20 || ledger.Committed(0, "") != 30<<20 {
		t.Errorf("footprint %d, committed %d, want 30 MiB", r.Footprint(), ledger.Committed(0, ""))
	}
	if r.WeightsBytes != weights || r.EstimateBytes != uint64(float64(weights)*DefaultBudgetFactor) {
		t.Errorf("weights %d estimate %d", r.WeightsBytes, r.EstimateBytes)
	}
	// Both engines run.
	for i, e := range m.Engines {
		buf, free, err := e.AllocBatch(1, 3, 8, 8)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.RunData(context.Background(), buf, 1, 3, 8, 8); err != nil {
			t.Errorf("engine %d: %v", i, err)
		}
		free()
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if n := len(ledger.Snapshot()); n != 0 {
		t.Errorf("ledger holds %d records after Close", n)
	}
}

func TestLoadModelRefusesOverBudget(t *testing.T) {
	initRuntime(t)
	path := convModel(t)
	weights, err := WeightBytes(path)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		budget   Budget
		mem      *fakeMemory
		existing uint64 // footprint of a model already loaded
		want     string
		reads    int // memory reads expected: 0 means refused before loading
	}{
		{"estimate over budget", Budget{Bytes: weights}, nil, 0, "needs about", 0},
		{"estimate over what is left", Budget{Bytes: 1 << 20, Factor: 2}, nil, 1<<20 - weights, "needs about", 0},
		{"measured over budget", Budget{Bytes: 64 << 20, Factor: 1}, &fakeMemory{step: 40 << 20}, 0, "took 80 MiB once loaded", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ledger := NewMemoryLedger()
			if tt.existing > 0 {
				ledger.Record(ModelMemory{Model: "other", Device: 0, EstimateBytes: tt.existing})
			}
			opts := LoadOptions{Name: "tiny", Session: SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1},
				WarmUpBatchSizes: []int{1}, Budget: tt.budget, Ledger: ledger}
			if tt.mem != nil {
				opts.Memory = tt.mem
			}
			m, err := LoadModel(context.Background(), path, opts)
			if err == nil {
				m.Close()
				t.Fatal("LoadModel succeeded over budget")
			}
			if !errors.Is(err, ErrOverBudget) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), `"tiny"`) {
				t.Errorf("error %q, want ErrOverBudget naming the model and containing %q", err, tt.want)
			}
			if tt.mem != nil && tt.mem.reads != tt.reads {
				t.Errorf("%d memory reads, want %d", tt.mem.reads, tt.reads)
			}
			if got := ledger.Snapshot(); len(got) != 1 && tt.existing > 0 || len(got) > 1 {
				t.Errorf("ledger after refusal: %+v", got)
			}
		})
	}
}

func TestLoadModelErrors(t *testing.T) {
	initRuntime(t)
	if _, err := LoadModel(context.Background(), "/nonexistent/model.onnx", LoadOptions{Name: "gone"}); err == nil || !strings.Contains(err.Error(), `"gone"`) {
		t.Errorf("missing model: %v", err)
	}
	if _, err := LoadModel(context.Background(), convModel(t), LoadOptions{Name: "x", WarmUpBatchSizes: []int{0}}); err == nil {
		t.Error("warm-up batch size 0 accepted")
	}
}
