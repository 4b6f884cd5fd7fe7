//go:build gpu

// Tests and benchmarks that need an NVIDIA GPU, the ONNX Runtime GPU build
// and the CUDA 13 libraries; see README.md for running them on a GPU
// machine. Without a GPU they skip, naming what is missing.
package gpu

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/onnx"
)

// requireGPU skips unless NVML reports a GPU and ONNX Runtime loads.
func requireGPU(t testing.TB) Report {
	t.Helper()
	r := Discover(nil)
	if !r.Available {
		t.Skipf("no NVIDIA GPU: %s", r.Reason)
	}
	initRuntime(t)
	return r
}

func TestGPUDiscoverAndProbe(t *testing.T) {
	r := requireGPU(t)
	t.Logf("driver %s, CUDA %s, %d GPU(s): %+v", r.DriverVersion, r.CUDADriverVersion, len(r.Devices), r.Devices)
	reg, err := engine.NewRegistry(NewBackends(BackendOptions{ORTLib: initRuntime(t)}).Factories())
	if err != nil {
		t.Fatal(err)
	}
	c, err := reg.Resolve(engine.Auto)
	if err != nil {
		t.Fatal(err)
	}
	if c.Backend != engine.ORTCUDA && c.Backend != engine.ORTTensorRT {
		t.Fatalf("auto on a GPU machine chose %s: %s", c.Backend, c.Reason)
	}
	t.Logf("auto: %s (%s)", c.Backend, c.Reason)
}

// TestGPUSignalsSurviveCUDASession checks, with the real CUDA provider,
// that SIGTERM still reaches signal.Notify after a session is created.
func TestGPUSignalsSurviveCUDASession(t *testing.T) {
	requireGPU(t)
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM)
	defer signal.Stop(ch)
	s, err := OpenSession(convModel(t), SessionOptions{Provider: ProviderCUDA})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Logf("signals restored after the CUDA session: %v", s.RestoredSignals())
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("SIGTERM did not reach signal.Notify after creating a CUDA session")
	}
}

// TestGPUCUDAMatchesCPU runs the same batch on CUDA (pinned, bound) and on
// the CPU twin; results agree within float tolerance (cuDNN reorders sums).
func TestGPUCUDAMatchesCPU(t *testing.T) {
	requireGPU(t)
	path := repoModel(t, "mobilenetv3_large")
	_, cpu := newCPUEngine(t, path)
	s, err := OpenSession(path, SessionOptions{Provider: ProviderCUDA, CUDA: CUDAOptions{ConvAlgoSearch: "HEURISTIC"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	gpu, err := NewEngine(s, EngineOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer gpu.Close()
	const n, c, h, w = 4, 3, 224, 224
	buf, free, err := gpu.AllocBatch(n, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	for round := range 3 { // new data in the same buffer each round
		input := randomInput(uint64(round), n*c*h*w)
		copy(buf, input)
		got, err := gpu.RunData(context.Background(), buf, n, c, h, w)
		if err != nil {
			t.Fatal(err)
		}
		want, err := cpu.RunData(context.Background(), input, n, c, h, w)
		if err != nil {
			t.Fatal(err)
		}
		var maxDiff float64
		for i := range want[0].Data {
			maxDiff = math.Max(maxDiff, math.Abs(float64(got[0].Data[i]-want[0].Data[i])))
		}
		if maxDiff > 1e-2 {
			t.Errorf("round %d: CUDA and CPU logits differ by up to %g", round, maxDiff)
		}
	}
	st := gpu.Stats()
	t.Logf("stats %+v", st)
	if st.Memory != MemoryPinned || st.CopiedBatches != 0 {
		t.Errorf("want pinned, zero-copy batches: %+v", st)
	}
}

// BenchmarkGPU runs each model on the CUDA provider at batch 1, 8, 32 and
// 64 with pinned and with pageable input memory. Each model is loaded once
// per memory kind and warmed up at every batch size; gpu_MiB is the memory
// use at that batch size's warm-up peak.
func BenchmarkGPU(b *testing.B) {
	requireGPU(b)
	mem, closeMem, err := NewNVMLMemoryReader(nil)
	if err != nil {
		b.Fatal(err)
	}
	defer closeMem()
	sizes := []int{1, 8, 32, 64}
	for _, model := range []string{"resnet50", "mobilenetv3_large", "yolov8s"} {
		b.Run(model, func(b *testing.B) {
			path := repoModel(b, model)
			for _, kind := range []MemoryKind{MemoryPinned, MemoryPageable} {
				ledger := NewMemoryLedger()
				m, err := LoadModel(context.Background(), path, LoadOptions{
					Name:             model,
					Session:          SessionOptions{Provider: ProviderCUDA, CUDA: CUDAOptions{ConvAlgoSearch: "EXHAUSTIVE"}},
					InputMemory:      kind,
					WarmUpBatchSizes: sizes,
					Memory:           mem,
					Ledger:           ledger,
				})
				if err != nil {
					b.Fatal(err)
				}
				peaks := m.Memory[0].PeakBytes
				for _, n := range sizes {
					b.Run(fmt.Sprintf("%s/batch=%d", kind, n), func(b *testing.B) {
						benchEngine(b, m.Engines[0], kind, n)
						b.ReportMetric(float64(peaks[n])/(1<<20), "gpu_MiB")
					})
				}
				m.Close()
			}
		})
	}
}

func benchEngine(b *testing.B, e *Engine, kind MemoryKind, n int) {
	in := e.Input()
	c, h, w := int(in.Shape[1]), int(in.Shape[2]), int(in.Shape[3])
	var data []float32
	if kind == MemoryPinned {
		buf, free, err := e.AllocBatch(n, c, h, w)
		if err != nil {
			b.Fatal(err)
		}
		defer free()
		data = buf
	} else {
		// Pageable: Go memory, staged by the engine like a pipeline that
		// does not use AllocBatch.
		data = make([]float32, n*c*h*w)
	}
	copy(data, randomInput(1, len(data)))
	lat := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := e.RunData(ctx, data, n, c, h, w); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / 1e6
	}
	var total time.Duration
	for _, d := range lat {
		total += d
	}
	b.ReportMetric(float64(n*len(lat))/total.Seconds(), "images/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
}

// BenchmarkGPUMixedBatches runs batches of sizes drawn from 1 to 8, as a
// dynamic batcher under moderate load forms them, with each cuDNN
// algorithm search and each padding policy: none (every size runs as it
// is, every size warmed up first), warmed (padded to 1, 4 or 8) and max
// (always 8). It measures what a change of input shape costs the CUDA
// provider after warm-up.
func BenchmarkGPUMixedBatches(b *testing.B) {
	requireGPU(b)
	pads := []struct {
		name string
		pad  []int
		warm []int
	}{
		{"none", nil, []int{1, 2, 3, 4, 5, 6, 7, 8}},
		{"warmed", []int{1, 4, 8}, []int{1, 4, 8}},
		{"max", []int{8}, []int{8}},
	}
	for _, model := range []string{"mobilenetv3_large", "resnet50"} {
		b.Run(model, func(b *testing.B) {
			path := repoModel(b, model)
			for _, search := range []string{"EXHAUSTIVE", "HEURISTIC"} {
				for _, p := range pads {
					b.Run(fmt.Sprintf("search=%s/pad=%s", search, p.name), func(b *testing.B) {
						m, err := LoadModel(context.Background(), path, LoadOptions{
							Name:             model,
							Session:          SessionOptions{Provider: ProviderCUDA, CUDA: CUDAOptions{ConvAlgoSearch: search}},
							WarmUpBatchSizes: p.warm,
							PadBatchSizes:    p.pad,
						})
						if err != nil {
							b.Fatal(err)
						}
						defer m.Close()
						benchMixed(b, m.Engines[0])
					})
				}
			}
		})
	}
}

// BenchmarkGPUPrecision compares each model at fp32 and converted to fp16
// (onnx.ConvertFileFP16, what --precision fp16 serves) on the CUDA
// provider, pinned input, at batch 1 and 64.
func BenchmarkGPUPrecision(b *testing.B) {
	requireGPU(b)
	sizes := []int{1, 64}
	for _, model := range []string{"resnet50", "mobilenetv3_large", "yolov8s"} {
		b.Run(model, func(b *testing.B) {
			fp32 := repoModel(b, model)
			fp16, err := onnx.ConvertFileFP16(fp32, b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			for _, p := range []struct{ name, path string }{{"fp32", fp32}, {"fp16", fp16}} {
				m, err := LoadModel(context.Background(), p.path, LoadOptions{
					Name:             model + "-" + p.name,
					Session:          SessionOptions{Provider: ProviderCUDA},
					WarmUpBatchSizes: sizes,
				})
				if err != nil {
					b.Fatal(err)
				}
				for _, n := range sizes {
					b.Run(fmt.Sprintf("%s/batch=%d", p.name, n), func(b *testing.B) {
						benchEngine(b, m.Engines[0], MemoryPinned, n)
					})
				}
				m.Close()
			}
		})
	}
}

// TestGPUFP16MatchesFP32 runs the generated classifiers at fp32 and fp16
// on the CUDA provider over 64 random inputs and reports the top-1
// agreement and the largest logit difference; the photos' agreement is
// measured through the server by scripts/gpu-check.sh.
func TestGPUFP16MatchesFP32(t *testing.T) {
	requireGPU(t)
	for _, model := range []string{"resnet50", "mobilenetv3_large"} {
		t.Run(model, func(t *testing.T) {
			fp32 := repoModel(t, model)
			fp16, err := onnx.ConvertFileFP16(fp32, t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			const n = 64
			outs := make([][]float32, 2)
			for i, path := range []string{fp32, fp16} {
				m, err := LoadModel(context.Background(), path, LoadOptions{Name: model, Session: SessionOptions{Provider: ProviderCUDA}, WarmUpBatchSizes: []int{n}})
				if err != nil {
					t.Fatal(err)
				}
				e := m.Engines[0]
				in := e.Input()
				c, h, w := int(in.Shape[1]), int(in.Shape[2]), int(in.Shape[3])
				res, err := e.RunData(context.Background(), randomInput(5, n*c*h*w), n, c, h, w)
				if err != nil {
					t.Fatal(err)
				}
				outs[i] = append([]float32(nil), res[0].Data...)
				m.Close()
			}
			classes := len(outs[0]) / n
			agree, worst := 0, 0.0
			for i := range n {
				a, b := outs[0][i*classes:(i+1)*classes], outs[1][i*classes:(i+1)*classes]
				if slices.Index(a, slices.Max(a)) == slices.Index(b, slices.Max(b)) {
					agree++
				}
				for j := range a {
					worst = math.Max(worst, math.Abs(float64(a[j]-b[j])))
				}
			}
			t.Logf("%s fp16 vs fp32 on CUDA: top-1 agrees on %d of %d inputs, largest logit difference %.3g", model, agree, n, worst)
			if agree < n*9/10 {
				t.Errorf("top-1 agrees on only %d of %d", agree, n)
			}
		})
	}
}
