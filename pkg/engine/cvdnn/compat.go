package cvdnn

import (
	"slices"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// Field numbers of onnx.proto's AttributeProto scalar values.
const (
	attrFieldF = 2
	attrFieldI = 3
)

// explicitZeroAttributes makes every INT and FLOAT attribute of value zero
// carry its value on the wire, and reports whether it changed anything.
//
// ONNX is a proto2 schema: an attribute's value is "present" only when
// written. A proto3 writer without explicit presence (pkg/onnx before
// it made f/i/s optional, and other tools) never writes a zero scalar, so
// its models have attributes such as MaxPool ceil_mode=0 or Concat axis=0
// with no value at all. ONNX Runtime reads those as zero; OpenCV 4.6 asks
// has_i() and throws "unsupported attribute format", which through gocv
// aborts the process. Writing the zero as an unknown field of the same
// number puts it back on the wire. Models that carry their values are left
// alone, so they are not copied.
func explicitZeroAttributes(g *onnx.GraphProto) bool {
	changed := false
	for _, n := range g.GetNode() {
		for _, a := range n.GetAttribute() {
			var field protowire.Number
			var typ protowire.Type
			switch a.GetType() {
			case onnx.AttributeProto_INT:
				field, typ = attrFieldI, protowire.VarintType
			case onnx.AttributeProto_FLOAT:
				field, typ = attrFieldF, protowire.Fixed32Type
			default:
				continue
			}
			r := a.ProtoReflect()
			if r.Has(r.Descriptor().Fields().ByNumber(field)) || hasField(r.GetUnknown(), field) {
				continue // the value is on the wire
			}
			raw := protowire.AppendTag(append([]byte(nil), r.GetUnknown()...), field, typ)
			if typ == protowire.VarintType {
				raw = protowire.AppendVarint(raw, 0)
			} else {
				raw = protowire.AppendFixed32(raw, 0)
			}
			r.SetUnknown(raw)
			changed = true
		}
		for _, a := range n.GetAttribute() {
			if a.GetG() != nil && explicitZeroAttributes(a.GetG()) {
				changed = true
			}
		}
	}
	return changed
}

// hasField reports whether raw (unknown fields) holds field num.
func hasField(raw []byte, num protowire.Number) bool {
	for len(raw) > 0 {
		n, typ, k := protowire.ConsumeTag(raw)
		if k < 0 {
			return false
		}
		if n == num {
			return true
		}
		raw = raw[k:]
		k = protowire.ConsumeFieldValue(n, typ, raw)
		if k < 0 {
			return false
		}
		raw = raw[k:]
	}
	return false
}

// fuseSiLU replaces every x·Sigmoid(x) (SiLU, as exporters write it) by one
// Swish node, which OpenCV's importer creates as its Swish layer and fuses
// into the preceding convolution; as two nodes it runs a Sigmoid and an
// Eltwise product over every feature map (a fifth of YOLOv8s' time on
// OpenCV 4.6). It returns the number of products fused.
func fuseSiLU(g *onnx.GraphProto) int {
	producer := map[string]*onnx.NodeProto{}
	uses := map[string]int{}
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			producer[o] = n
		}
		for _, in := range n.GetInput() {
			uses[in]++
		}
	}
	for _, o := range g.GetOutput() {
		uses[o.GetName()]++
	}
	drop := map[*onnx.NodeProto]bool{}
	fused := 0
	for _, n := range g.GetNode() {
		if n.GetOpType() != "Mul" || len(n.GetInput()) != 2 || len(n.GetOutput()) != 1 {
			continue
		}
		for k := range 2 {
			x, s := n.GetInput()[k], n.GetInput()[1-k]
			sig := producer[s]
			if sig == nil || sig.GetOpType() != "Sigmoid" || len(sig.GetInput()) != 1 || sig.GetInput()[0] != x || uses[s] != 1 || drop[sig] {
				continue
			}
			drop[sig] = true
			n.OpType, n.Domain, n.Input, n.Attribute = "Swish", "", []string{x}, nil
			fused++
			break
		}
	}
	if fused > 0 {
		kept := g.Node[:0]
		for _, n := range g.GetNode() {
			if !drop[n] {
				kept = append(kept, n)
			}
		}
		g.Node = kept
	}
	return fused
}

// foldIdentityInitializers removes Identity nodes whose input is an
// initializer (chains of them too), and returns how many it removed.
//
// torch.onnx.export writes them when one weight is used under two names
// (a shared or tied parameter, or a constant the exporter de-duplicated):
// the second name is Identity(first). OpenCV 4.6 imports an Identity node
// as a layer and then cannot find the "blob" behind a layer output where
// a Conv or Gemm expects a constant weight, and aborts. Every use of the
// Identity's output is renamed to its input, which is exactly what
// Identity computes; an output that is also a graph output gets its own
// copy of the initializer under the output's name instead.
func foldIdentityInitializers(g *onnx.GraphProto) int {
	inits := map[string]*onnx.TensorProto{}
	for _, t := range g.GetInitializer() {
		inits[t.GetName()] = t
	}
	inputs := map[string]bool{}
	for _, in := range g.GetInput() {
		inputs[in.GetName()] = true // an initializer that is also an input may be fed: not a constant
	}
	outputs := map[string]bool{}
	for _, o := range g.GetOutput() {
		outputs[o.GetName()] = true
	}
	folded := 0
	for {
		rename := map[string]string{}
		kept := g.Node[:0]
		for _, n := range g.GetNode() {
			src := ""
			if n.GetOpType() == "Identity" && n.GetDomain() == "" && len(n.GetInput()) == 1 && len(n.GetOutput()) == 1 {
				src = n.GetInput()[0]
			}
			if t, ok := inits[src]; ok && !inputs[src] {
				out := n.GetOutput()[0]
				if outputs[out] {
					c := proto.Clone(t).(*onnx.TensorProto)
					c.Name = out
					g.Initializer = append(g.Initializer, c)
					inits[out] = c
				} else {
					rename[out] = src
				}
				folded++
				continue
			}
			kept = append(kept, n)
		}
		g.Node = kept
		if len(rename) == 0 {
			break
		}
		for _, n := range g.GetNode() {
			for i, in := range n.GetInput() {
				if to, ok := rename[in]; ok {
					n.Input[i] = to
				}
			}
		}
	}
	return folded
}

// foldChannelArithmetic computes, at rewrite time, the shape arithmetic
// torch.onnx.export writes for Tensor.chunk and split by size along the
// channels: Shape(x) → Gather(1) → Add/Sub/Mul/Div with constants →
// (Unsqueeze, Concat) → the starts and ends of Slice. A convolution's
// channel count is fixed by its weights whatever the input size, so the
// values are constants; OpenCV 4.6 cannot import the arithmetic itself
// (it folds Shape into a constant of another rank and aborts in Add). The
// folded values become INT64 initializers and the nodes that made them
// are removed. It returns how many nodes it folded.
func foldChannelArithmetic(g *onnx.GraphProto) int {
	ix := newGraphIndex(g)
	type value struct {
		v      []int64
		scalar bool
	}
	known := map[string]value{}
	constOf := func(name string) (value, bool) {
		if v, ok := known[name]; ok {
			return v, true
		}
		t, ok := ix.inits[name]
		if !ok || t.GetDataType() != int32(onnx.TensorProto_INT64) || onnx.NumElements(t) > 8 {
			return value{}, false
		}
		v, err := onnx.Int64s(t)
		if err != nil {
			return value{}, false
		}
		return value{v, len(t.GetDims()) == 0}, true
	}
	shapeOf := map[string]string{} // Shape output → its input
	folded := map[*onnx.NodeProto]bool{}
	for _, n := range g.GetNode() {
		if n.GetDomain() != "" || len(n.GetOutput()) != 1 {
			continue
		}
		in, out := n.GetInput(), n.GetOutput()[0]
		switch op := n.GetOpType(); op {
		case "Shape":
			if len(in) == 1 && onnx.Attr(n, "start") == nil && onnx.Attr(n, "end") == nil {
				shapeOf[out] = in[0]
			}
		case "Gather":
			x, isShape := shapeOf[in[0]]
			idx, ok := constOf(in[len(in)-1])
			if !isShape || !ok || len(in) != 2 || len(idx.v) != 1 || idx.v[0] != 1 {
				continue
			}
			if c := ix.channelsOf(x); c > 0 {
				known[out] = value{[]int64{int64(c)}, idx.scalar}
				folded[n] = true
			}
		case "Add", "Sub", "Mul", "Div":
			a, okA := constOf(in[0])
			b, okB := constOf(in[1])
			if !okA || !okB || (len(a.v) != len(b.v) && len(a.v) != 1 && len(b.v) != 1) {
				continue
			}
			if _, ka := known[in[0]]; !ka {
				if _, kb := known[in[1]]; !kb {
					continue // constants only: not ours to fold
				}
			}
			r := value{make([]int64, max(len(a.v), len(b.v))), a.scalar && b.scalar}
			ok := true
			for i := range r.v {
				x, y := a.v[min(i, len(a.v)-1)], b.v[min(i, len(b.v)-1)]
				switch op {
				case "Add":
					r.v[i] = x + y
				case "Sub":
					r.v[i] = x - y
				case "Mul":
					r.v[i] = x * y
				case "Div":
					if y == 0 {
						ok = false
					} else {
						r.v[i] = x / y // ONNX integer Div truncates, as Go's
					}
				}
			}
			if ok {
				known[out], folded[n] = r, true
			}
		case "Unsqueeze":
			a, ok := known[in[0]]
			if ok && a.scalar {
				known[out], folded[n] = value{a.v, false}, true
			}
		case "Concat":
			var all []int64
			ok := true
			for _, x := range in {
				v, isKnown := known[x]
				c, isConst := constOf(x)
				switch {
				case isKnown && !v.scalar:
					all = append(all, v.v...)
				case !isKnown && isConst && !c.scalar:
					all = append(all, c.v...)
				default:
					ok = false
				}
			}
			if ok && len(all) > 0 && slices.ContainsFunc(in, func(x string) bool { _, k := known[x]; return k }) {
				known[out], folded[n] = value{all, false}, true
			}
		}
	}
	if len(folded) == 0 {
		return 0
	}
	// Folded values still read by a node that stays become initializers;
	// the folded nodes, and the Shape nodes no one reads any more, go.
	keep := g.Node[:0]
	reads := map[string]bool{}
	for _, n := range g.GetNode() {
		if !folded[n] {
			for _, x := range n.GetInput() {
				reads[x] = true
			}
		}
	}
	for _, o := range g.GetOutput() {
		reads[o.GetName()] = true
	}
	for name, v := range known {
		if !reads[name] {
			continue
		}
		t := &onnx.TensorProto{Name: name, DataType: int32(onnx.TensorProto_INT64), Int64Data: v.v}
		if !v.scalar {
			t.Dims = []int64{int64(len(v.v))}
		}
		g.Initializer = append(g.Initializer, t)
	}
	count := 0
	for _, n := range g.GetNode() {
		switch {
		case folded[n]:
			count++
		case n.GetOpType() == "Shape" && !reads[n.GetOutput()[0]]:
		default:
			keep = append(keep, n)
		}
	}
	g.Node = keep
	return count
}
