package cvdnn

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// graphBuilder makes small ONNX graphs for tests.
type graphBuilder struct {
	g   onnx.GraphProto
	rng *rand.Rand
}

func newGraph(name string) *graphBuilder {
	return &graphBuilder{g: onnx.GraphProto{Name: name}, rng: rand.New(rand.NewPCG(1, 2))}
}

func (b *graphBuilder) node(op, out string, inputs []string, attrs ...*onnx.AttributeProto) string {
	b.g.Node = append(b.g.Node, &onnx.NodeProto{OpType: op, Name: out + "_node", Input: inputs, Output: []string{out}, Attribute: attrs})
	return out
}

func (b *graphBuilder) weights(name string, dims ...int64) string {
	n := int64(1)
	for _, d := range dims {
		n *= d
	}
	data := make([]float32, n)
	for i := range data {
		data[i] = float32(b.rng.NormFloat64() * 0.3)
	}
	b.g.Initializer = append(b.g.Initializer, &onnx.TensorProto{Name: name, Dims: dims, DataType: int32(onnx.TensorProto_FLOAT), FloatData: data})
	return name
}

func (b *graphBuilder) ints(name string, v ...int64) string {
	b.g.Initializer = append(b.g.Initializer, &onnx.TensorProto{Name: name, Dims: []int64{int64(len(v))}, DataType: int32(onnx.TensorProto_INT64), Int64Data: v})
	return name
}

func intAttr(name string, v int64) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_INT, I: proto.Int64(v)}
}

func intsAttr(name string, v ...int64) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_INTS, Ints: v}
}

func valueInfo(name string, dims ...int64) *onnx.ValueInfoProto {
	shape := &onnx.TensorShapeProto{}
	for _, d := range dims {
		dim := &onnx.TensorShapeProto_Dimension{}
		if d < 0 {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: "batch"}
		} else {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimValue{DimValue: d}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnx.ValueInfoProto{Name: name, Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{
		TensorType: &onnx.TypeProto_Tensor{ElemType: int32(onnx.TensorProto_FLOAT), Shape: shape}}}}
}

func (b *graphBuilder) model() *onnx.ModelProto {
	return &onnx.ModelProto{IrVersion: 7, ProducerName: "cvdnn-test",
		OpsetImport: []*onnx.OperatorSetIdProto{{Version: 11}}, Graph: &b.g}
}

func writeModel(t testing.TB, m *onnx.ModelProto, name string) string {
	t.Helper()
	raw, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	tinySize    = 64 // input side
	tinyClasses = 3
	tinyRegMax  = 16
)

// tinyYOLO builds a YOLOv8-shaped graph on a 64x64 input: three levels at
// strides 8, 16 and 32, each a box conv (64 channels) and a class conv
// (3 channels), flattened and concatenated over the anchors as an export
// does. combined selects the older export structure (box and class
// concatenated per level, then split); otherwise the newer one (box and
// class flattened separately). The tail after the head is a stand-in, not
// a DFL: only the head matters to the cut.
func tinyYOLO(combined bool) *onnx.ModelProto {
	b := newGraph("tiny_yolo")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("images", -1, 3, tinySize, tinySize)}
	var boxes, classes, cats []string
	for _, s := range []int64{8, 16, 32} {
		p := "l" + string(rune('0'+s/8))
		box := b.node("Conv", p+"_box", []string{"images", b.weights(p+"_box.w", 4*tinyRegMax, 3, s, s), b.weights(p+"_box.b", 4*tinyRegMax)},
			intsAttr("kernel_shape", s, s), intsAttr("strides", s, s))
		cls := b.node("Conv", p+"_cls", []string{"images", b.weights(p+"_cls.w", tinyClasses, 3, s, s), b.weights(p+"_cls.b", tinyClasses)},
			intsAttr("kernel_shape", s, s), intsAttr("strides", s, s))
		if combined {
			cat := b.node("Concat", p+"_cat", []string{box, cls}, intAttr("axis", 1))
			cats = append(cats, b.node("Reshape", p+"_flat", []string{cat, b.ints(p+"_shape", 0, 4*tinyRegMax+tinyClasses, -1)}))
			continue
		}
		boxes = append(boxes, b.node("Reshape", p+"_boxflat", []string{box, b.ints(p+"_bshape", 0, 4*tinyRegMax, -1)}))
		classes = append(classes, b.node("Reshape", p+"_clsflat", []string{cls, b.ints(p+"_cshape", 0, tinyClasses, -1)}))
	}
	var boxAll, clsAll string
	if combined {
		all := b.node("Concat", "all", cats, intAttr("axis", 2))
		b.g.Node = append(b.g.Node, &onnx.NodeProto{OpType: "Split", Name: "split", Input: []string{all}, Output: []string{"box_all", "cls_all"},
			Attribute: []*onnx.AttributeProto{intAttr("axis", 1), intsAttr("split", 4*tinyRegMax, tinyClasses)}})
		boxAll, clsAll = "box_all", "cls_all"
	} else {
		boxAll = b.node("Concat", "box_all", boxes, intAttr("axis", -1))
		clsAll = b.node("Concat", "cls_all", classes, intAttr("axis", -1))
	}
	sig := b.node("Sigmoid", "cls_sig", []string{clsAll})
	four := b.node("Slice", "box4", []string{boxAll, b.ints("s0", 0), b.ints("s1", 4), b.ints("s2", 1)})
	b.node("Concat", "output0", []string{four, sig}, intAttr("axis", 1))
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("output0", -1, 4+tinyClasses, 84)}
	return b.model()
}

// tinyClassifier is a conv + global pool + flatten net, [N,3,32,32] to
// [N,5] logits.
func tinyClassifier() *onnx.ModelProto { return tinyClassifierBatch(-1) }

// tinyClassifierBatch is tinyClassifier with a fixed batch size (-1 for
// a dynamic one).
func tinyClassifierBatch(batch int64) *onnx.ModelProto {
	b := newGraph("tiny_cls")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("pixels", batch, 3, 32, 32)}
	c := b.node("Conv", "conv", []string{"pixels", b.weights("conv.w", 5, 3, 3, 3), b.weights("conv.b", 5)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	r := b.node("Relu", "relu", []string{c})
	p := b.node("GlobalAveragePool", "pool", []string{r})
	b.node("Flatten", "scores", []string{p}, intAttr("axis", 1))
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("scores", batch, 5)}
	return b.model()
}

// unsupportedModel has an operator OpenCV cannot create: importing it
// throws a C++ exception, which through gocv aborts the process.
func unsupportedModel() *onnx.ModelProto {
	b := newGraph("unsupported")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", 1, 3, 8, 8)}
	b.node("VisionserveNoSuchOp", "y", []string{"x"})
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("y", 1, 3, 8, 8)}
	return b.model()
}

// squeezeExcite is a conv net with a squeeze-excite product, [N,4,1,1] ×
// [N,4,16,16], which OpenCV 4.6 runs at batch 1 but not above.
func squeezeExcite() *onnx.ModelProto {
	b := newGraph("tiny_se")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, 3, 16, 16)}
	c := b.node("Conv", "conv", []string{"x", b.weights("conv.w", 4, 3, 3, 3), b.weights("conv.b", 4)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	sq := b.node("GlobalAveragePool", "squeeze", []string{c})
	fc := b.node("Conv", "fc", []string{sq, b.weights("fc.w", 4, 4, 1, 1), b.weights("fc.b", 4)}, intsAttr("kernel_shape", 1, 1))
	gate := b.node("Sigmoid", "gate", []string{fc})
	ex := b.node("Mul", "excite", []string{gate, c})
	p := b.node("GlobalAveragePool", "pool", []string{ex})
	b.node("Flatten", "out", []string{p}, intAttr("axis", 1))
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("out", -1, 4)}
	return b.model()
}

// withoutPresence drops the value of every zero INT attribute, as a proto3
// writer without explicit presence does.
func withoutPresence(m *onnx.ModelProto) *onnx.ModelProto {
	for _, n := range m.GetGraph().GetNode() {
		for _, a := range n.GetAttribute() {
			if a.GetType() == onnx.AttributeProto_INT && a.GetI() == 0 {
				a.I = nil
			}
		}
	}
	return m
}

// maxPoolNet has a MaxPool with ceil_mode=0: an attribute whose zero value
// a proto3 writer may leave out.
func maxPoolNet() *onnx.ModelProto {
	b := newGraph("tiny_pool")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, 3, 16, 16)}
	c := b.node("Conv", "conv", []string{"x", b.weights("conv.w", 4, 3, 3, 3), b.weights("conv.b", 4)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	p := b.node("MaxPool", "pool", []string{c}, intsAttr("kernel_shape", 2, 2), intsAttr("strides", 2, 2), intAttr("ceil_mode", 0))
	g := b.node("GlobalAveragePool", "gap", []string{p})
	b.node("Flatten", "out", []string{g}, intAttr("axis", 1))
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("out", -1, 4)}
	return b.model()
}

// siluNet has two convolutions with SiLU written as x·Sigmoid(x), in both
// operand orders, and a Sigmoid whose output is used twice (not fusable).
func siluNet() *onnx.ModelProto {
	b := newGraph("tiny_silu")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, 3, 16, 16)}
	c1 := b.node("Conv", "c1", []string{"x", b.weights("c1.w", 4, 3, 3, 3), b.weights("c1.b", 4)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	s1 := b.node("Sigmoid", "s1", []string{c1})
	a1 := b.node("Mul", "a1", []string{c1, s1})
	c2 := b.node("Conv", "c2", []string{a1, b.weights("c2.w", 4, 4, 3, 3), b.weights("c2.b", 4)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	s2 := b.node("Sigmoid", "s2", []string{c2})
	a2 := b.node("Mul", "a2", []string{s2, c2})
	s3 := b.node("Sigmoid", "s3", []string{a2})
	a3 := b.node("Mul", "a3", []string{a2, s3})
	b.node("Add", "y", []string{a3, s3})
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("y", -1, 4, 16, 16)}
	return b.model()
}
