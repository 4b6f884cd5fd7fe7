package gpu

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ort "github.com/yalue/onnxruntime_go"
)

// plainRun runs the model through onnxruntime_go's ordinary session (no
// IoBinding, ONNX Runtime allocates the outputs): the reference the bound
// path must match bit for bit.
func plainRun(t *testing.T, lib, path string, input []float32, shape []int64, outputs []string) [][]float32 {
	t.Helper()
	if !ort.IsInitialized() {
		ort.SetSharedLibraryPath(lib)
		if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
			t.Fatalf("initialising onnxruntime_go: %v", err)
		}
	}
	so, err := ort.NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer so.Destroy()
	if err := so.SetIntraOpNumThreads(1); err != nil {
		t.Fatal(err)
	}
	if err := so.SetInterOpNumThreads(1); err != nil {
		t.Fatal(err)
	}
	ins, _, err := ort.GetInputOutputInfo(path)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ort.NewDynamicAdvancedSession(path, []string{ins[0].Name}, outputs, so)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	in, err := ort.NewTensor(ort.Shape(shape), input)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Destroy()
	outs := make([]ort.Value, len(outputs))
	if err := s.Run([]ort.Value{in}, outs); err != nil {
		t.Fatal(err)
	}
	var res [][]float32
	for _, v := range outs {
		res = append(res, append([]float32(nil), v.(*ort.Tensor[float32]).GetData()...))
		v.Destroy()
	}
	return res
}

func newCPUEngine(t *testing.T, path string) (*Session, *Engine) {
	t.Helper()
	s, err := OpenSession(path, SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(s, EngineOptions{})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Error(err)
		}
		s.Close()
	})
	return s, e
}

func sameBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range got {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %v, plain session gives %v (not bit-exact)", what, i, got[i], want[i])
		}
	}
}

// TestBindingMatchesPlainSession runs the pinned-buffer IoBinding path on
// its no-GPU twin (CPU provider, pageable host memory) and checks every
// output bit against a plain onnxruntime_go session, for several batch
// sizes, for buffers from AllocBatch (zero copy) and from the Go heap
// (staged), and for data rewritten in place between runs.
func TestBindingMatchesPlainSession(t *testing.T) {
	lib := initRuntime(t)
	path := convModel(t)
	s, e := newCPUEngine(t, path)
	if got := len(s.Outputs()); got != 2 {
		t.Fatalf("session reports %d outputs, want 2", got)
	}
	const c, h, w = 3, 8, 8
	buf, free, err := e.AllocBatch(4, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	names := []string{"features", "logits"}
	for i, n := range []int{1, 3, 4, 3, 1} {
		input := randomInput(uint64(i), n*c*h*w)
		want := plainRun(t, lib, path, input, []int64{int64(n), c, h, w}, names)

		copy(buf, input)
		got, err := e.RunData(context.Background(), buf, n, c, h, w)
		if err != nil {
			t.Fatalf("batch %d: %v", n, err)
		}
		if got[0].Shape[0] != int64(n) || got[1].Shape[0] != int64(n) {
			t.Fatalf("batch %d: output shapes %v %v", n, got[0].Shape, got[1].Shape)
		}
		for o := range names {
			sameBits(t, names[o], got[o].Data, want[o])
		}
		if err := e.CheckBoundOutputs(n); err != nil {
			t.Error(err)
		}

		// The same images from Go memory take the staging path.
		got, err = e.RunData(context.Background(), input, n, c, h, w)
		if err != nil {
			t.Fatalf("batch %d from Go memory: %v", n, err)
		}
		for o := range names {
			sameBits(t, names[o]+" (staged)", got[o].Data, want[o])
		}
	}
	st := e.Stats()
	if st.Batches != 10 || st.CopiedBatches != 5 {
		t.Errorf("stats %+v, want 10 batches of which 5 copied", st)
	}
	// The CPU twin binds its buffers as CPU memory; they are pinned where
	// the CUDA runtime is present (a GPU machine), else pageable.
	if st.BindPinned {
		t.Errorf("the CPU twin binds its buffers as CUDA-pinned memory: %+v", st)
	}
	if err := loadCUDARuntime(""); err != nil && st.Memory != MemoryPageable {
		t.Errorf("without the CUDA runtime (%v) memory is %s, want pageable", err, st.Memory)
	}
}

// TestGeneratedModelsBindingMatchesPlainSession repeats the check on the
// real networks the model generator writes (the ones the GPU benchmarks
// run), skipping those not generated yet.
func TestGeneratedModelsBindingMatchesPlainSession(t *testing.T) {
	lib := initRuntime(t)
	tests := []struct {
		model      string
		n, c, h, w int
	}{
		{"mobilenetv3_large", 2, 3, 224, 224},
		{"resnet50", 1, 3, 224, 224},
		{"yolov8s", 1, 3, 640, 640},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			if testing.Short() && tt.model != "mobilenetv3_large" {
				t.Skipf("-short: %s takes seconds on one CPU thread", tt.model)
			}
			path := repoModel(t, tt.model)
			_, e := newCPUEngine(t, path)
			buf, free, err := e.AllocBatch(tt.n, tt.c, tt.h, tt.w)
			if err != nil {
				t.Fatal(err)
			}
			defer free()
			input := randomInput(9, tt.n*tt.c*tt.h*tt.w)
			copy(buf, input)
			got, err := e.RunData(context.Background(), buf, tt.n, tt.c, tt.h, tt.w)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, o := range e.Outputs() {
				names = append(names, o.Name)
			}
			want := plainRun(t, lib, path, input, []int64{int64(tt.n), int64(tt.c), int64(tt.h), int64(tt.w)}, names)
			for i := range names {
				sameBits(t, names[i], got[i].Data, want[i])
			}
		})
	}
}

func TestRunSteadyStateAllocatesNothing(t *testing.T) {
	initRuntime(t)
	_, e := newCPUEngine(t, convModel(t))
	buf, free, err := e.AllocBatch(2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	ctx := context.Background()
	if _, err := e.RunData(ctx, buf, 2, 3, 8, 8); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := e.RunData(ctx, buf, 2, 3, 8, 8); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("steady-state Run allocates %v times, want 0", allocs)
	}
}

// TestPaddedBatchesMatchUnpadded runs batches padded up to the engine's
// pad sizes and checks that the first n results are those of an unpadded
// run, that the returned shapes say n, that sizes above the largest pad
// size run as they are, and that a padded run allocates nothing.
func TestPaddedBatchesMatchUnpadded(t *testing.T) {
	initRuntime(t)
	path := convModel(t)
	_, plain := newCPUEngine(t, path)
	s, err := OpenSession(path, SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	padded, err := NewEngine(s, EngineOptions{PadBatchSizes: []int{4, 2, 4}})
	if err != nil {
		t.Fatal(err)
	}
	defer padded.Close()
	const c, h, w = 3, 8, 8
	buf, free, err := padded.AllocBatch(6, c, h, w)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	ctx := context.Background()
	runs := []struct{ n, at int }{{1, 2}, {3, 4}, {2, 2}, {4, 4}, {5, 5}, {3, 4}}
	for i, r := range runs {
		input := randomInput(uint64(i+20), r.n*c*h*w)
		want, err := plain.RunData(ctx, input, r.n, c, h, w)
		if err != nil {
			t.Fatal(err)
		}
		before := padded.Stats().PaddedBatches
		copy(buf, input)
		got, err := padded.RunData(ctx, buf, r.n, c, h, w)
		if err != nil {
			t.Fatalf("batch %d: %v", r.n, err)
		}
		if pads := padded.Stats().PaddedBatches - before; (pads == 1) != (r.at != r.n) {
			t.Errorf("batch %d: %d padded runs, want it run at %d", r.n, pads, r.at)
		}
		for o := range want {
			if got[o].Shape[0] != int64(r.n) || len(got[o].Data) != len(want[o].Data) {
				t.Fatalf("batch %d output %s: shape %v, %d values; want %v, %d", r.n, want[o].Name, got[o].Shape, len(got[o].Data), want[o].Shape, len(want[o].Data))
			}
			sameBits(t, want[o].Name, got[o].Data, want[o].Data)
		}
		// Images staged from Go memory are padded the same way.
		got, err = padded.RunData(ctx, input, r.n, c, h, w)
		if err != nil {
			t.Fatalf("batch %d from Go memory: %v", r.n, err)
		}
		for o := range want {
			sameBits(t, want[o].Name+" (staged)", got[o].Data, want[o].Data)
		}
	}
	if allocs := testing.AllocsPerRun(20, func() {
		if _, err := padded.RunData(ctx, buf, 3, c, h, w); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Errorf("steady-state padded Run allocates %v times, want 0", allocs)
	}
	if err := padded.CheckBoundOutputs(3); err != nil {
		t.Errorf("bound outputs of a padded batch: %v", err)
	}
	if _, err := NewEngine(s, EngineOptions{PadBatchSizes: []int{0}}); err == nil {
		t.Error("pad batch size 0 accepted")
	}
	// A model loaded with padding to its largest size warms up at every
	// size it is asked to (each run padded).
	m, err := LoadModel(ctx, path, LoadOptions{
		Session:          SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1},
		WarmUpBatchSizes: []int{1, 2, 8},
		PadBatchSizes:    []int{8},
	})
	if err != nil {
		t.Fatalf("loading with padding to 8: %v", err)
	}
	defer m.Close()
	if st := m.Engines[0].Stats(); st.Batches != 3 || st.PaddedBatches != 2 {
		t.Errorf("warm-up stats %+v, want 3 batches of which 2 padded", st)
	}
}

func TestEngineRejectsBadBatches(t *testing.T) {
	initRuntime(t)
	_, e := newCPUEngine(t, convModel(t))
	buf, free, err := e.AllocBatch(2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name       string
		ctx        context.Context
		data       []float32
		n, c, h, w int
		want       string
	}{
		{"zero images", context.Background(), buf, 0, 3, 8, 8, "empty dimension"},
		{"wrong channels", context.Background(), buf, 1, 1, 8, 8, "model input is"},
		{"wrong size", context.Background(), buf, 1, 3, 16, 16, "model input is"},
		{"buffer too small", context.Background(), buf, 3, 3, 8, 8, "need"},
		{"cancelled", cancelled, buf, 1, 3, 8, 8, "context canceled"},
		{"overflowing batch", context.Background(), buf, 1 << 62, 3, 8, 8, "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.RunData(tt.ctx, tt.data, tt.n, tt.c, tt.h, tt.w)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Run: %v, want an error containing %q", err, tt.want)
			}
		})
	}
	if _, _, err := e.AllocBatch(1<<62, 3, 8, 8); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Errorf("AllocBatch of 2^62 images: %v", err)
	}
	if _, _, err := e.AllocBatch(1, 3, 9, 9); err == nil {
		t.Error("AllocBatch accepted images the model does not take")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.RunData(context.Background(), buf, 1, 3, 8, 8); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Run after Close: %v, want a closed error", err)
	}
}

func TestOpenSessionErrors(t *testing.T) {
	initRuntime(t)
	tests := []struct {
		name string
		path string
		opts SessionOptions
		want string
	}{
		{"missing file", "/nonexistent/model.onnx", SessionOptions{Provider: ProviderCPU}, "/nonexistent/model.onnx"},
		{"unknown provider", convModel(t), SessionOptions{Provider: "rocm"}, "unknown execution provider"},
		{"bad conv search", convModel(t), SessionOptions{Provider: ProviderCUDA, CUDA: CUDAOptions{ConvAlgoSearch: "FASTEST"}}, "conv algorithm search"},
		{"bad arena strategy", convModel(t), SessionOptions{Provider: ProviderCUDA, CUDA: CUDAOptions{ArenaExtendStrategy: "grow"}}, "arena extend strategy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := OpenSession(tt.path, tt.opts)
			if err == nil {
				s.Close()
				t.Fatal("OpenSession succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

func TestProbeCPUProviderRunsThroughBinding(t *testing.T) {
	initRuntime(t)
	if err := ProbeProvider(context.Background(), ProviderCPU, 0, SessionOptions{}); err != nil {
		t.Fatalf("probing the CPU provider: %v", err)
	}
}

// TestProbeGPUProvidersWithoutGPU checks that asking for CUDA or TensorRT
// where there is none is an error, not a crash.
func TestProbeGPUProvidersWithoutGPU(t *testing.T) {
	initRuntime(t)
	if Discover(nil).Available {
		t.Skip("an NVIDIA GPU is present; see the gpu-tagged tests")
	}
	for _, p := range []Provider{ProviderCUDA, ProviderTensorRT} {
		err := ProbeProvider(context.Background(), p, 0, SessionOptions{})
		if err == nil {
			t.Errorf("probing %s without a GPU succeeded", p)
			continue
		}
		t.Logf("%s: %v", p, err)
	}
}

func TestHostAllocator(t *testing.T) {
	a := NewHostAllocator(MemoryPageable, "")
	if a.Kind() != MemoryPageable || a.Reason() == "" {
		t.Errorf("pageable allocator: kind %s reason %q", a.Kind(), a.Reason())
	}
	p := NewHostAllocator(MemoryPinned, "")
	if p.Kind() == MemoryPageable && !strings.Contains(p.Reason(), "CUDA") {
		t.Errorf("pinned allocator fell back to pageable with reason %q, want it to name CUDA", p.Reason())
	}
	for _, alloc := range []*HostAllocator{a, p} {
		b, err := alloc.Alloc(1000)
		if err != nil {
			t.Fatal(err)
		}
		f := b.Floats()
		if len(f) != 1000 || f[0] != 0 || f[999] != 0 {
			t.Errorf("%s buffer: len %d, not zeroed", alloc.Kind(), len(f))
		}
		f[999] = 1
		if err := b.Free(); err != nil {
			t.Error(err)
		}
		if err := b.Free(); err != nil {
			t.Errorf("second Free: %v", err)
		}
	}
	for _, n := range []int{0, -1, maxHostFloats + 1} {
		if _, err := a.Alloc(n); err == nil {
			t.Errorf("Alloc(%d) succeeded", n)
		}
	}
}

// TestRealModelsBindingMatchesPlainSession repeats the bit-exact check on
// the real int8 exports of the shared test data (Ultralytics YOLOv8n with a
// fixed batch of 1, ONNX zoo MobileNetV2 with a dynamic batch).
func TestRealModelsBindingMatchesPlainSession(t *testing.T) {
	lib := initRuntime(t)
	dir := filepath.Join("..", "..", "..", "shared", "testdata", "models")
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("../shared/testdata/models missing: %v", err)
	}
	tests := []struct {
		file       string
		n, c, h, w int
	}{
		{"yolov8n_int8.onnx", 2, 3, 640, 640}, // fixed batch 1: two chunks
		{"mobilenetv2-12-int8.onnx", 3, 3, 224, 224},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			path := filepath.Join(dir, tt.file)
			_, e := newCPUEngine(t, path)
			buf, free, err := e.AllocBatch(tt.n, tt.c, tt.h, tt.w)
			if err != nil {
				t.Fatal(err)
			}
			defer free()
			input := randomInput(11, tt.n*tt.c*tt.h*tt.w)
			for i := range input {
				input[i] = (input[i] + 1) / 2 // images are in [0,1] after scaling
			}
			copy(buf, input)
			got, err := e.RunData(context.Background(), buf, tt.n, tt.c, tt.h, tt.w)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, o := range e.Outputs() {
				names = append(names, o.Name)
			}
			// The plain session runs the images one by one when the graph
			// fixes the batch at 1.
			per := 1
			if e.Input().Shape[0] < 0 {
				per = tt.n
			}
			want := make([][]float32, len(names))
			slot := tt.c * tt.h * tt.w
			for i := 0; i < tt.n; i += per {
				part := plainRun(t, lib, path, input[i*slot:(i+per)*slot], []int64{int64(per), int64(tt.c), int64(tt.h), int64(tt.w)}, names)
				for o := range names {
					want[o] = append(want[o], part[o]...)
				}
			}
			for i := range names {
				sameBits(t, names[i], got[i].Data, want[i])
			}
		})
	}
}

func TestEngineOutputSelection(t *testing.T) {
	initRuntime(t)
	path := convModel(t)
	s, err := OpenSession(path, SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := NewEngine(s, EngineOptions{OutputNames: []string{"scores"}}); err == nil || !strings.Contains(err.Error(), `no output "scores"`) {
		t.Errorf("unknown output: %v", err)
	}
	e, err := NewEngine(s, EngineOptions{OutputNames: []string{"logits"}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	_, all := newCPUEngine(t, path)
	input := randomInput(4, 2*3*8*8)
	got, err := e.RunData(context.Background(), input, 2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	want, err := all.RunData(context.Background(), input, 2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Name != "logits" {
		t.Fatalf("outputs %v, want logits only", got)
	}
	sameBits(t, "logits", got[0].Data, want[1].Data)
}

// TestFixedBatchGraphRunsInChunks runs batches of 1, 3 and 4 images on the
// probe model, whose graph fixes the batch at 1: each image is its own
// chunk and lands in its own part of the output.
func TestFixedBatchGraphRunsInChunks(t *testing.T) {
	path := probeModelFile(t)
	_, e := newCPUEngine(t, path)
	buf, free, err := e.AllocBatch(4, 1, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	for _, n := range []int{1, 3, 4, 1} {
		for i := range buf {
			buf[i] = float32(i + n)
		}
		out, err := e.RunData(context.Background(), buf, n, 1, 2, 2)
		if err != nil {
			t.Fatalf("batch %d: %v", n, err)
		}
		if out[0].Shape[0] != int64(n) || len(out[0].Data) != n*4 {
			t.Fatalf("batch %d: output shape %v, %d values", n, out[0].Shape, len(out[0].Data))
		}
		for i, v := range out[0].Data {
			if v != 2*buf[i] {
				t.Fatalf("batch %d: y[%d] = %v, want %v", n, i, v, 2*buf[i])
			}
		}
		if err := e.CheckBoundOutputs(n); err != nil {
			t.Error(err)
		}
	}
}
