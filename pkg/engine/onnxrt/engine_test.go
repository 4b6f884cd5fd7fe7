package onnxrt

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine"
	ort "github.com/yalue/onnxruntime_go"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testdata returns a file of the shared real test data, skipping the test
// when the folder is absent.
func testdata(t testing.TB, rel string) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = parent
	}
	p := filepath.Join(dir, "..", "shared", "testdata", rel)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("real test data missing: ../shared/testdata/%s (%v)", rel, err)
	}
	return p
}

func initORT(t testing.TB) {
	t.Helper()
	if err := Init(testenv.ORTLib(t)); err != nil {
		t.Fatal(err)
	}
}

// fill writes a deterministic pattern in [0,1) into data.
func fill(data []float32, seed uint32) {
	x := seed*2654435761 + 1
	for i := range data {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		data[i] = float32(x%1000) / 1000
	}
}

func maxDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var d float64
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func TestInitIdempotent(t *testing.T) {
	initORT(t)
	for range 3 {
		if err := Init("/ignored/after/success.so"); err != nil {
			t.Fatalf("second Init: %v", err)
		}
	}
	if p, ok := Initialized(); !ok || p == "" {
		t.Fatalf("Initialized() = %q, %v", p, ok)
	}
}

func TestBatchValidation(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/mobilenetv2-12-int8.onnx"), Options{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ok := func() *engine.Batch { b := engine.NewBatch(2, 3, 224, 224); b.N = 1; return b }
	tests := []struct {
		name  string
		batch func() *engine.Batch
		want  string
	}{
		{"nil", func() *engine.Batch { return nil }, "nil batch"},
		{"zero images", func() *engine.Batch { b := ok(); b.N = 0; return b }, "want 1..2"},
		{"more than cap", func() *engine.Batch { b := ok(); b.N = 3; return b }, "want 1..2"},
		{"wrong size", func() *engine.Batch { b := engine.NewBatch(1, 3, 640, 640); b.N = 1; return b }, "model input is"},
		{"wrong channels", func() *engine.Batch { b := engine.NewBatch(1, 1, 224, 224); b.N = 1; return b }, "model input is"},
		{"short buffer", func() *engine.Batch { b := ok(); b.N = 2; b.Data = b.Data[:100]; return b }, "need"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Run(context.Background(), tc.batch())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run: got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestModelErrors(t *testing.T) {
	initORT(t)
	model := testdata(t, "models/mobilenetv2-12-int8.onnx")
	garbage := filepath.Join(t.TempDir(), "garbage.onnx")
	if err := os.WriteFile(garbage, []byte("not an onnx model"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		opts Options
		want string
	}{
		{"missing file", filepath.Join(t.TempDir(), "none.onnx"), Options{}, "none.onnx"},
		{"not onnx", garbage, Options{}, "garbage.onnx"},
		{"unknown input", model, Options{InputName: "pixels"}, `no input named "pixels"`},
		{"unknown output", model, Options{OutputNames: []string{"probs"}}, `no output named "probs"`},
		{"bad opt level", model, Options{Optimization: 42}, "optimisation level"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := New(tc.path, tc.opts)
			if err == nil {
				e.Close()
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// A dynamic-batch model gives each image the same output whether it runs
// alone or inside a batch: the batch slicing and output reuse are right.
func TestDynamicBatchMatchesSingles(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/mobilenetv2-12-int8.onnx"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if got := e.Info(); got.InputName != "input" || got.OutputNames[0] != "output" {
		t.Fatalf("Info() = %+v, want input %q output %q", got, "input", "output")
	}
	const n = 3
	b := engine.NewBatch(4, 3, 224, 224)
	for i := range n {
		fill(b.Slot(i), uint32(i))
	}
	b.N = n
	outs, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	if len(outs) != 1 || outs[0].Name != "output" || len(outs[0].Shape) != 2 || outs[0].Shape[0] != n || outs[0].Shape[1] != 1000 {
		t.Fatalf("outputs %v, want one [3,1000] tensor named output", outs)
	}
	batched := append([]float32(nil), outs[0].Data...)
	single := engine.NewBatch(1, 3, 224, 224)
	single.N = 1
	for i := range n {
		copy(single.Data, b.Slot(i))
		outs, err := e.Run(context.Background(), single)
		if err != nil {
			t.Fatal(err)
		}
		if d := maxDiff(outs[0].Data, batched[i*1000:(i+1)*1000]); d > 1e-4 {
			t.Errorf("image %d: batched and single outputs differ by %g", i, d)
		}
	}
	if d := maxDiff(batched[:1000], batched[1000:2000]); d == 0 {
		t.Error("different images gave identical outputs")
	}
}

// A model exported with a fixed batch of 1 still serves batches: the engine
// runs it image by image into the one output tensor.
func TestFixedBatchRunsInChunks(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/yolov8n_int8.onnx"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	b := engine.NewBatch(2, 3, 640, 640)
	fill(b.Slot(0), 7)
	fill(b.Slot(1), 8)
	b.N = 2
	outs, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	if got := outs[0].Shape; len(got) != 3 || got[0] != 2 || got[1] != 84 || got[2] != 8400 {
		t.Fatalf("output shape %v, want [2 84 8400]", got)
	}
	batched := append([]float32(nil), outs[0].Data...)
	per := 84 * 8400
	single := &engine.Batch{N: 1, Cap: 1, C: 3, H: 640, W: 640, Data: b.Slot(1)}
	outs, err = e.Run(context.Background(), single)
	if err != nil {
		t.Fatal(err)
	}
	if d := maxDiff(outs[0].Data, batched[per:]); d != 0 {
		t.Errorf("second image: chunked and single outputs differ by %g", d)
	}
}

func TestCloseAndContext(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/mobilenetv2-12-int8.onnx"), Options{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	b := engine.NewBatch(1, 3, 224, 224)
	b.N = 1
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Run(ctx, b); err == nil {
		t.Error("Run with a cancelled context succeeded")
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := e.Run(ctx, b); err != nil {
		t.Fatalf("Run with a live context: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := e.Run(context.Background(), b); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Run after Close: %v, want a closed error", err)
	}
}

// Steady-state runs allocate nothing that grows with the batch: the input
// tensor wraps the batch buffer and the output tensors are reused.
func TestRunDoesNotAllocatePerBatch(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/mobilenetv2-12-int8.onnx"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	b := engine.NewBatch(4, 3, 224, 224)
	b.N = 4
	ctx := context.Background()
	if _, err := e.Run(ctx, b); err != nil { // allocates the outputs once
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	const runs = 3
	runtime.ReadMemStats(&before)
	for range runs {
		if _, err := e.Run(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	// A copy of the input would be 2.4 MB, of the output 16 KB.
	perRun := (after.TotalAlloc - before.TotalAlloc) / runs
	t.Logf("%d bytes allocated per run of a batch of 4", perRun)
	if perRun > 2048 {
		t.Errorf("Run allocates %d bytes per batch, want under 2 KB", perRun)
	}
}

// Cancelling the context while ONNX Runtime runs terminates the run with
// an error, and the next run works: the terminate flag is re-armed.
func TestCancelTerminatesRun(t *testing.T) {
	initORT(t)
	e, err := New(testdata(t, "models/yolov8n_int8.onnx"), Options{IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	b := engine.NewBatch(1, 3, 640, 640)
	b.N = 1
	fill(b.Data, 3)
	ctx, cancel := context.WithCancel(context.Background())
	// A single-threaded yolov8n run takes hundreds of milliseconds.
	timer := time.AfterFunc(20*time.Millisecond, cancel)
	defer timer.Stop()
	start := time.Now()
	_, err = e.Run(ctx, b)
	if err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Run cancelled after 20ms: %v (took %v), want a context.Canceled error", err, time.Since(start))
	}
	t.Logf("cancelled run returned after %v: %v", time.Since(start), err)
	if _, err := e.Run(context.Background(), b); err != nil {
		t.Fatalf("Run after a cancelled run: %v", err)
	}
}

func TestInitConcurrent(t *testing.T) {
	initORT(t)
	errs := make(chan error, 8)
	for range 8 {
		go func() { errs <- Init(testenv.ORTLib(t)) }()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// The Configure hook is how a GPU engine adds its execution provider: it
// sees the session options before the session exists, and its error fails
// New.
func TestConfigureHook(t *testing.T) {
	initORT(t)
	model := testdata(t, "models/mobilenetv2-12-int8.onnx")
	called := false
	e, err := New(model, Options{Backend: "ort-test", Configure: func(so *ort.SessionOptions) error {
		called = true
		return so.AddSessionConfigEntry("session.disable_prepacking", "1")
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if !called || e.Backend() != "ort-test" {
		t.Fatalf("hook called %v, backend %q", called, e.Backend())
	}
	_, err = New(model, Options{Configure: func(*ort.SessionOptions) error { return errors.New("no such provider") }})
	if err == nil || !strings.Contains(err.Error(), "no such provider") {
		t.Fatalf("New with a failing hook: %v", err)
	}
}
