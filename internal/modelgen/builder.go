package modelgen

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// value is a graph value together with its activation on the calibration
// batch (nil for the parts of a graph that carry no weights to calibrate,
// such as the YOLO box decode).
type value struct {
	name string
	act  *tensor
}

// builder accumulates nodes and initializers in emission order, which is a
// valid topological order because every op is emitted after its inputs.
// Nothing here iterates over a map, so the same seed gives the same graph.
type builder struct {
	seed  uint64
	input string // graph input name
	graph *onnx.GraphProto
	taken map[string]bool // value names already produced (lookups only)
}

func newBuilder(name, input string, seed uint64) *builder {
	return &builder{seed: seed, input: input, graph: &onnx.GraphProto{Name: name}, taken: map[string]bool{}}
}

// rng returns a generator whose stream depends only on the seed and the
// parameter name, so weights do not shift when layers are added elsewhere.
// PCG is a specified algorithm, and we only draw raw Uint64s from it, so
// the stream is stable across Go releases.
func (b *builder) rng(name string) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(name))
	return rand.New(rand.NewPCG(b.seed, h.Sum64()))
}

// uniform draws from U(lo, hi) using the top 53 bits of one Uint64.
func uniform(r *rand.Rand, lo, hi float64) float64 {
	u := float64(r.Uint64()>>11) / (1 << 53)
	return lo + (hi-lo)*u
}

// attrInt and friends build typed node attributes.
func attrInt(name string, v int64) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_INT, I: &v}
}

func attrInts(name string, v ...int64) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_INTS, Ints: v}
}

func attrFloat(name string, v float32) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_FLOAT, F: &v}
}

func attrString(name, v string) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_STRING, S: []byte(v)}
}

func attrTensor(name string, t *onnx.TensorProto) *onnx.AttributeProto {
	return &onnx.AttributeProto{Name: name, Type: onnx.AttributeProto_TENSOR, T: t}
}

// op emits a single-output node named name whose output is
// name+"_output_0", the naming PyTorch's exporter uses.
func (b *builder) op(opType, name string, inputs []string, attrs ...*onnx.AttributeProto) string {
	return b.opN(opType, name, inputs, 1, attrs...)[0]
}

// opN emits a node with n outputs named name+"_output_<i>".
func (b *builder) opN(opType, name string, inputs []string, n int, attrs ...*onnx.AttributeProto) []string {
	outs := make([]string, n)
	for i := range outs {
		outs[i] = fmt.Sprintf("%s_output_%d", name, i)
		if b.taken[outs[i]] {
			// A duplicate is a bug in a model definition, not an input
			// error, so fail loudly while developing.
			panic("modelgen: duplicate value name " + outs[i])
		}
		b.taken[outs[i]] = true
	}
	b.graph.Node = append(b.graph.Node, &onnx.NodeProto{
		OpType: opType, Name: name, Input: inputs, Output: outs, Attribute: attrs,
	})
	return outs
}

// floatTensor encodes float32 data little-endian into raw_data, as
// exporters do.
func floatTensor(name string, dims []int64, data []float32) *onnx.TensorProto {
	raw := make([]byte, 4*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	return &onnx.TensorProto{Name: name, Dims: dims, DataType: int32(onnx.TensorProto_FLOAT), RawData: raw}
}

func int64Tensor(name string, dims []int64, data []int64) *onnx.TensorProto {
	raw := make([]byte, 8*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint64(raw[8*i:], uint64(v))
	}
	return &onnx.TensorProto{Name: name, Dims: dims, DataType: int32(onnx.TensorProto_INT64), RawData: raw}
}

// param adds a float initializer (a learned parameter).
func (b *builder) param(name string, dims []int64, data []float32) string {
	b.graph.Initializer = append(b.graph.Initializer, floatTensor(name, dims, data))
	return name
}

// int64s adds an int64 initializer (shapes, split sizes, slice bounds).
// These are not parameters and do not count as float initializers.
func (b *builder) int64s(name string, data ...int64) string {
	b.graph.Initializer = append(b.graph.Initializer, int64Tensor(name, []int64{int64(len(data))}, data))
	return name
}

// constant emits a Constant node holding a float tensor. Fixed float
// values that are not parameters (anchors, strides, resize scales) live in
// Constant nodes so that the float initializers are exactly the network's
// parameters.
func (b *builder) constant(name string, dims []int64, data []float32) string {
	return b.op("Constant", name, nil, attrTensor("value", floatTensor("", dims, data)))
}

// norm says how a layer's output distribution is set on the calibration
// batch. It stands in for the BatchNorm statistics and affine parameters
// of a trained network: the raw output is centred per channel, divided by
// the layer's pooled RMS (within-channel variance plus squared channel
// means, over all channels), multiplied by a random per-channel gamma and
// shifted by a random per-channel beta; that affine map is folded into the
// exported weight and bias.
//
// The scale is one per layer rather than per channel on purpose: true
// per-channel normalisation blows up channels that happen to respond weakly
// to the calibration images, and on other inputs (white noise, flat
// images) those channels then dominate and activations grow layer after
// layer. Including the channel means in the RMS does the same for channels
// whose response is mostly a constant offset.
type norm struct {
	gamma [2]float64 // range of the per-channel gain
	beta  [2]float64 // range of the per-channel target mean
	// betaOf, if set, adds a channel-dependent offset to beta (the DFL
	// distance prior of the YOLO box branch).
	betaOf func(c int) float64
}

// Typical settings. bnAct is a BatchNorm before an activation; bnResidual
// damps the last BatchNorm of a residual branch so the identity path
// dominates and activations grow slowly with depth (like zero-gamma
// initialisation, but keeping the branch alive); bnLinear is a BatchNorm
// with no activation after it.
var (
	bnAct      = norm{gamma: [2]float64{0.6, 1.4}, beta: [2]float64{-0.4, 0.3}}
	bnResidual = norm{gamma: [2]float64{0.15, 0.45}, beta: [2]float64{-0.1, 0.1}}
	bnLinear   = norm{gamma: [2]float64{0.8, 1.2}, beta: [2]float64{-0.1, 0.1}}
)

// conv emits a Conv with bias (BatchNorm folded in). k is square, padding
// is k/2 as in all three networks. The weight is drawn He-uniform from
// the parameter's own stream and then calibrated with nm.
func (b *builder) conv(x value, name, param string, cout, k, stride, groups int, nm norm) value {
	cin := x.act.c
	fanIn := cin / groups * k * k
	r := b.rng(param)
	w := make([]float32, cout*fanIn)
	a := math.Sqrt(6 / float64(fanIn))
	for i := range w {
		w[i] = float32(uniform(r, -a, a))
	}
	if k > 1 && groups == 1 && x.name != b.input {
		meanFree(w, x.act, cout, k)
	}
	y := conv2d(x.act, w, cout, k, stride, k/2, groups)
	scale, bias := nm.fit(y, r)
	y.affine(scale, bias)
	for oc := 0; oc < cout; oc++ {
		for i := oc * fanIn; i < (oc+1)*fanIn; i++ {
			w[i] = float32(w[i] * scale[oc])
		}
	}
	wName := b.param(param+".weight", []int64{int64(cout), int64(cin / groups), int64(k), int64(k)}, w)
	bName := b.param(param+".bias", []int64{int64(cout)}, bias)
	p := int64(k / 2)
	out := b.op("Conv", name, []string{x.name, wName, bName},
		attrInts("dilations", 1, 1),
		attrInt("group", int64(groups)),
		attrInts("kernel_shape", int64(k), int64(k)),
		attrInts("pads", p, p, p, p),
		attrInts("strides", int64(stride), int64(stride)))
	return value{out, y}
}

// meanFree removes from every kernel tap's weight vector (over input
// channels) its component along the input's mean activation vector, so
// that w·mean = 0 per tap. Exported convolutions zero-pad, and activations
// have non-zero channel means (after ReLU/SiLU markedly so); with mean-free
// taps a padded zero contributes what an average interior activation
// would, so border positions do not drift away from the interior
// statistics the weights were fitted to. The input layer is left alone:
// there the padding is plausible black image content, and projecting out
// the mean colour would make the network blind to brightness.
func meanFree(w []float32, x *tensor, cout, k int) {
	mean, _ := channelStats(x)
	var mm float64
	for _, m := range mean {
		mm += m * m
	}
	if mm < 1e-12 {
		return
	}
	cin, kk := x.c, k*k
	for oc := 0; oc < cout; oc++ {
		for tap := 0; tap < kk; tap++ {
			var dot float64
			for ic := 0; ic < cin; ic++ {
				dot += float64(w[(oc*cin+ic)*kk+tap]) * mean[ic]
			}
			f := dot / mm
			for ic := 0; ic < cin; ic++ {
				i := (oc*cin+ic)*kk + tap
				w[i] = float32(float64(w[i]) - f*mean[ic])
			}
		}
	}
}

// gemm emits a fully connected layer (Gemm with transB=1, weight
// [cout, cin]) on a [N, C] value whose activation is stored as [N, C, 1, 1].
func (b *builder) gemm(x value, name, param string, cout int, nm norm) value {
	cin := x.act.c
	r := b.rng(param)
	w := make([]float32, cout*cin)
	a := math.Sqrt(6 / float64(cin))
	for i := range w {
		w[i] = float32(uniform(r, -a, a))
	}
	y := conv2d(x.act, w, cout, 1, 1, 0, 1)
	scale, bias := nm.fit(y, r)
	y.affine(scale, bias)
	for oc := 0; oc < cout; oc++ {
		for i := oc * cin; i < (oc+1)*cin; i++ {
			w[i] = float32(w[i] * scale[oc])
		}
	}
	wName := b.param(param+".weight", []int64{int64(cout), int64(cin)}, w)
	bName := b.param(param+".bias", []int64{int64(cout)}, bias)
	out := b.op("Gemm", name, []string{x.name, wName, bName},
		attrFloat("alpha", 1), attrFloat("beta", 1), attrInt("transB", 1))
	return value{out, y}
}

// fit returns the per-channel scale and bias that give y the target
// distribution.
func (nm norm) fit(y *tensor, r *rand.Rand) (scale, bias []float32) {
	mean, std := channelStats(y)
	var rms float64
	for c, s := range std {
		rms += s*s + mean[c]*mean[c]
	}
	rms = math.Sqrt(rms/float64(len(std))) + 1e-12
	scale = make([]float32, y.c)
	bias = make([]float32, y.c)
	for c := range scale {
		g := uniform(r, nm.gamma[0], nm.gamma[1])
		be := uniform(r, nm.beta[0], nm.beta[1])
		if nm.betaOf != nil {
			be += nm.betaOf(c)
		}
		sc := g / rms
		scale[c] = float32(sc)
		bias[c] = float32(be - mean[c]*sc)
	}
	return scale, bias
}

// unary emits a single-input elementwise op and applies f to the
// calibration activation.
func (b *builder) unary(x value, opType, name string, f func(float32) float32, attrs ...*onnx.AttributeProto) value {
	out := b.op(opType, name, []string{x.name}, attrs...)
	if x.act == nil {
		return value{out, nil}
	}
	y := &tensor{n: x.act.n, c: x.act.c, h: x.act.h, w: x.act.w, data: append([]float32(nil), x.act.data...)}
	y.apply(f)
	return value{out, y}
}

func (b *builder) relu(x value, name string) value {
	return b.unary(x, "Relu", name, relu)
}

func (b *builder) hardSwish(x value, name string) value {
	return b.unary(x, "HardSwish", name, hardSwish)
}

func (b *builder) hardSigmoid(x value, name string) value {
	return b.unary(x, "HardSigmoid", name, hardSigmoid, attrFloat("alpha", 1.0/6), attrFloat("beta", 0.5))
}

// silu emits SiLU the way Ultralytics exports it at opset < 22:
// Mul(x, Sigmoid(x)) under the module's act scope.
func (b *builder) silu(x value, scope string) value {
	s := b.op("Sigmoid", scope+"/Sigmoid", []string{x.name})
	out := b.op("Mul", scope+"/Mul", []string{x.name, s})
	if x.act == nil {
		return value{out, nil}
	}
	y := &tensor{n: x.act.n, c: x.act.c, h: x.act.h, w: x.act.w, data: append([]float32(nil), x.act.data...)}
	y.apply(silu)
	return value{out, y}
}

func (b *builder) add(x, y value, name string) value {
	return value{b.op("Add", name, []string{x.name, y.name}), add(x.act, y.act)}
}

func (b *builder) concat(name string, axis int64, xs ...value) value {
	names := make([]string, len(xs))
	acts := make([]*tensor, len(xs))
	for i, x := range xs {
		names[i] = x.name
		acts[i] = x.act
	}
	out := b.op("Concat", name, names, attrInt("axis", axis))
	if axis != 1 || acts[0] == nil {
		return value{out, nil}
	}
	return value{out, concat(acts...)}
}

func (b *builder) maxPool(x value, name string, k, stride, pad int) value {
	out := b.op("MaxPool", name, []string{x.name},
		attrInt("ceil_mode", 0),
		attrInts("dilations", 1, 1),
		attrInts("kernel_shape", int64(k), int64(k)),
		attrInts("pads", int64(pad), int64(pad), int64(pad), int64(pad)),
		attrInts("strides", int64(stride), int64(stride)))
	return value{out, maxPool(x.act, k, stride, pad)}
}

// tensorType declares a float tensor value with the given dims; a negative
// dim is the symbolic batch dimension.
func tensorType(name string, dims ...int64) *onnx.ValueInfoProto {
	shape := &onnx.TensorShapeProto{}
	for _, d := range dims {
		dim := &onnx.TensorShapeProto_Dimension{}
		if d < 0 {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: BatchDim}
		} else {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimValue{DimValue: d}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnx.ValueInfoProto{Name: name, Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{
		TensorType: &onnx.TypeProto_Tensor{ElemType: int32(onnx.TensorProto_FLOAT), Shape: shape},
	}}}
}
