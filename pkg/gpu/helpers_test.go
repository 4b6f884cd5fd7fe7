package gpu

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/onnx"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// initRuntime loads ONNX Runtime or skips the test, naming what is missing.
func initRuntime(t testing.TB) string {
	t.Helper()
	path := testenv.ORTLib(t)
	if err := Init(path); err != nil {
		t.Fatalf("Init(%s): %v", path, err)
	}
	return path
}

// probeModelFile loads ONNX Runtime (or skips) and writes the one-node
// probe model (y = x + x, batch fixed at 1) to a file, returning its path.
func probeModelFile(t testing.TB) string {
	t.Helper()
	initRuntime(t)
	model, err := ProbeModel()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "probe.onnx")
	if err := os.WriteFile(path, model, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// convModel writes a small convolutional model with a dynamic batch and
// two outputs, features [N,4,8,8] and logits [N,10], and returns its path.
func convModel(t testing.TB) string {
	t.Helper()
	r := rand.New(rand.NewPCG(1, 2))
	rnd := func(n int) []float32 {
		out := make([]float32, n)
		for i := range out {
			out[i] = float32(r.NormFloat64() * 0.3)
		}
		return out
	}
	ints := func(name string, v ...int64) *onnx.AttributeProto {
		return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_INTS, Ints: v}
	}
	g := &onnx.GraphProto{
		Name: "tinyconv",
		Initializer: []*onnx.TensorProto{
			tinyFloats("w", []int64{4, 3, 3, 3}, rnd(4*3*3*3)),
			tinyFloats("b", []int64{4}, rnd(4)),
			tinyFloats("fc_w", []int64{10, 4}, rnd(40)),
			tinyFloats("fc_b", []int64{10}, rnd(10)),
		},
		Node: []*onnx.NodeProto{
			{OpType: "Conv", Name: "conv", Input: []string{"images", "w", "b"}, Output: []string{"conv_out"},
				Attribute: []*onnx.AttributeProto{ints("pads", 1, 1, 1, 1), ints("kernel_shape", 3, 3)}},
			{OpType: "Relu", Name: "relu", Input: []string{"conv_out"}, Output: []string{"features"}},
			{OpType: "GlobalAveragePool", Name: "gap", Input: []string{"features"}, Output: []string{"pooled"}},
			{OpType: "Flatten", Name: "flat", Input: []string{"pooled"}, Output: []string{"flat"}},
			{OpType: "Gemm", Name: "fc", Input: []string{"flat", "fc_w", "fc_b"}, Output: []string{"logits"},
				Attribute: []*onnx.AttributeProto{{Name: "transB", Type: onnx.AttributeProto_INT, I: proto.Int64(1)}}},
		},
		Input:  []*onnx.ValueInfoProto{tinyValue("images", -1, 3, 8, 8)},
		Output: []*onnx.ValueInfoProto{tinyValue("features", -1, 4, 8, 8), tinyValue("logits", -1, 10)},
	}
	data, err := tinyModel(g)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "tinyconv.onnx")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// repoModel returns models/<name>/model.onnx or skips naming it.
func repoModel(t testing.TB, name string) string {
	t.Helper()
	path := filepath.Join("..", "..", "models", name, "model.onnx")
	if _, err := os.Stat(path); err != nil {
		t.Skipf("%s missing: run `go run ./cmd/modelgen -out models -models %s`", path, name)
	}
	return path
}

func randomInput(seed uint64, n int) []float32 {
	r := rand.New(rand.NewPCG(seed, 7))
	out := make([]float32, n)
	for i := range out {
		out[i] = r.Float32()*2 - 1
	}
	return out
}
