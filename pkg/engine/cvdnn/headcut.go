package cvdnn

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// DetectHead is where a YOLOv8 graph is cut for OpenCV: the per-level head
// tensors before the DFL decode, in anchor order (stride 8, 16, 32 in an
// Ultralytics export).
//
// Exports come in two shapes. Older ones concatenate the box and class
// convolutions per level (Combined: one [N,4*RegMax+NumClasses,H,W] tensor
// a level); newer ones (Ultralytics 8.1+) flatten them separately (Box
// [N,4*RegMax,H,W] and Cls [N,NumClasses,H,W] a level).
type DetectHead struct {
	// Output is the graph output the head decodes into ([N,4+nc,anchors]).
	Output     string
	Levels     []HeadTensors
	RegMax     int
	NumClasses int
}

// HeadTensors names one level's head tensors: Combined, or Box and Cls.
type HeadTensors struct {
	Combined string
	Box, Cls string
}

// Outputs lists the tensors the cut graph outputs: the combined level
// tensors, or all box tensors followed by all class tensors.
func (h *DetectHead) Outputs() []string {
	var out []string
	for _, l := range h.Levels {
		if l.Combined != "" {
			out = append(out, l.Combined)
		}
	}
	if len(out) > 0 {
		return out
	}
	for _, l := range h.Levels {
		out = append(out, l.Box)
	}
	for _, l := range h.Levels {
		out = append(out, l.Cls)
	}
	return out
}

// Combined reports whether each level is one tensor holding box and class
// channels.
func (h *DetectHead) Combined() bool { return len(h.Levels) > 0 && h.Levels[0].Combined != "" }

// graphIndex answers structural questions about a graph.
type graphIndex struct {
	g         *onnx.GraphProto
	producer  map[string]*onnx.NodeProto
	consumers map[string][]*onnx.NodeProto
	inits     map[string]*onnx.TensorProto
	channels  map[string]int
}

func newGraphIndex(g *onnx.GraphProto) *graphIndex {
	ix := &graphIndex{g: g, producer: map[string]*onnx.NodeProto{}, consumers: map[string][]*onnx.NodeProto{},
		inits: map[string]*onnx.TensorProto{}, channels: map[string]int{}}
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			ix.producer[o] = n
		}
		for _, in := range n.GetInput() {
			ix.consumers[in] = append(ix.consumers[in], n)
		}
		// Constant nodes are initializers in all but name.
		if n.GetOpType() == "Constant" && len(n.GetOutput()) == 1 {
			if a := onnx.Attr(n, "value"); a != nil && a.GetT() != nil {
				ix.inits[n.GetOutput()[0]] = a.GetT()
			}
		}
	}
	for _, t := range g.GetInitializer() {
		ix.inits[t.GetName()] = t
	}
	return ix
}

// elementwise ops keep the channel count of their (first non-constant)
// input; quantised exports wrap every convolution in a few of them.
var elementwise = map[string]bool{
	"Add": true, "Sub": true, "Mul": true, "Div": true, "Sigmoid": true, "Relu": true, "LeakyRelu": true,
	"HardSigmoid": true, "HardSwish": true, "Tanh": true, "Clip": true, "Cast": true, "Identity": true,
	"QuantizeLinear": true, "DequantizeLinear": true, "BatchNormalization": true, "Silu": true,
}

// channelsOf infers the channel count of a 4-D NCHW value from the
// operators that produce it; -1 when it cannot tell (or the value is not a
// feature map).
func (ix *graphIndex) channelsOf(v string) int {
	if c, ok := ix.channels[v]; ok {
		return c
	}
	ix.channels[v] = -1 // breaks cycles in malformed graphs
	c := -1
	n := ix.producer[v]
	switch {
	case n == nil:
	case n.GetOpType() == "Conv" || n.GetOpType() == "ConvInteger":
		c = ix.weightOutChannels(n, 1)
	case n.GetOpType() == "QLinearConv":
		c = ix.weightOutChannels(n, 3)
	case n.GetOpType() == "Concat" && (axisOf(n) == 1 || axisOf(n) == -3):
		c = 0
		for _, in := range n.GetInput() {
			ci := ix.channelsOf(in)
			if ci < 0 {
				c = -1
				break
			}
			c += ci
		}
	case elementwise[n.GetOpType()]:
		for _, in := range n.GetInput() {
			if _, isConst := ix.inits[in]; isConst || in == "" {
				continue
			}
			if c = ix.channelsOf(in); c > 0 {
				break
			}
		}
	}
	ix.channels[v] = c
	return c
}

func (ix *graphIndex) weightOutChannels(n *onnx.NodeProto, idx int) int {
	if len(n.GetInput()) <= idx {
		return -1
	}
	w := ix.inits[n.GetInput()[idx]]
	if w == nil || len(w.GetDims()) != 4 {
		return -1
	}
	return int(w.GetDims()[0])
}

// ancestors returns every node the value depends on.
func (ix *graphIndex) ancestors(v string) map[*onnx.NodeProto]bool {
	seen := map[*onnx.NodeProto]bool{}
	stack := []string{v}
	for len(stack) > 0 {
		v := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		n := ix.producer[v]
		if n == nil || seen[n] {
			continue
		}
		seen[n] = true
		stack = append(stack, n.GetInput()...)
	}
	return seen
}

func axisOf(n *onnx.NodeProto) int64 {
	if a := onnx.Attr(n, "axis"); a != nil {
		return a.GetI()
	}
	return 0
}

// levelConcat is a Concat along the anchor axis whose inputs are all
// feature maps flattened by a Reshape to [N,C,H*W].
type levelConcat struct {
	node     *onnx.NodeProto
	maps     []string // the 4-D feature maps, in anchor order
	channels int
}

// FindDetectHead locates the YOLOv8 Detect head feeding the graph output
// named output ("" for the first output). It matches the structure, not
// node names: walking back from the output it finds the Concats along the
// anchor axis whose inputs are Reshapes of 4-D feature maps, infers the
// maps' channel counts from the convolutions producing them, and tells the
// box branch (4*reg_max channels, decoded by the DFL Softmax) from the
// class branch (a Sigmoid). It fails on graphs without such a head.
func FindDetectHead(m *onnx.ModelProto, output string) (*DetectHead, error) {
	g := m.GetGraph()
	if output == "" {
		if len(g.GetOutput()) == 0 {
			return nil, errors.New("finding detect head: graph has no outputs")
		}
		output = g.GetOutput()[0].GetName()
	}
	ix := newGraphIndex(g)
	if ix.producer[output] == nil {
		return nil, fmt.Errorf("finding detect head: no node produces output %q", output)
	}
	anc := ix.ancestors(output)
	var cats []levelConcat
	for _, n := range g.GetNode() {
		if !anc[n] || n.GetOpType() != "Concat" || len(n.GetInput()) < 2 || len(n.GetOutput()) == 0 {
			continue
		}
		if ax := axisOf(n); ax != -1 && ax != 2 {
			continue
		}
		lc := levelConcat{node: n, channels: -1}
		for _, in := range n.GetInput() {
			rs := ix.producer[in]
			if rs == nil || rs.GetOpType() != "Reshape" || len(rs.GetInput()) < 2 {
				lc.maps = nil
				break
			}
			if shp := ix.inits[rs.GetInput()[1]]; shp != nil && onnx.NumElements(shp) != 3 {
				lc.maps = nil // not a flatten to [N,C,H*W]
				break
			}
			c := ix.channelsOf(rs.GetInput()[0])
			if c <= 0 || (lc.channels > 0 && c != lc.channels) {
				lc.maps = nil
				break
			}
			lc.channels = c
			lc.maps = append(lc.maps, rs.GetInput()[0])
		}
		if len(lc.maps) >= 2 {
			cats = append(cats, lc)
		}
	}
	outCh := int64(-1)
	for _, o := range g.GetOutput() {
		if o.GetName() == output {
			if s := onnx.Shape(o); len(s) == 3 {
				outCh = s[1]
			}
		}
	}
	head := &DetectHead{Output: output}
	switch len(cats) {
	case 1:
		c := cats[0]
		nc := 0
		if outCh > 4 {
			nc = int(outCh) - 4
		} else if nc = splitClasses(ix, c.node); nc <= 0 {
			nc = c.channels - 4*16 // Ultralytics' reg_max
		}
		if nc <= 0 || c.channels-nc < 4 || (c.channels-nc)%4 != 0 {
			return nil, fmt.Errorf("finding detect head: level tensors have %d channels, which is not 4*reg_max + %d classes", c.channels, nc)
		}
		head.NumClasses, head.RegMax = nc, (c.channels-nc)/4
		for _, m := range c.maps {
			head.Levels = append(head.Levels, HeadTensors{Combined: m})
		}
	case 2:
		box, cls := cats[0], cats[1]
		if feedsSigmoid(ix, box.node) && !feedsSigmoid(ix, cls.node) {
			box, cls = cls, box
		} else if !feedsSigmoid(ix, cls.node) {
			return nil, errors.New("finding detect head: two level Concats but neither feeds a Sigmoid (class scores)")
		}
		if len(box.maps) != len(cls.maps) {
			return nil, fmt.Errorf("finding detect head: %d box levels but %d class levels", len(box.maps), len(cls.maps))
		}
		if box.channels%4 != 0 {
			return nil, fmt.Errorf("finding detect head: box tensors have %d channels, not 4*reg_max", box.channels)
		}
		if outCh > 0 && int(outCh) != 4+cls.channels {
			return nil, fmt.Errorf("finding detect head: %d class channels but output %q has %d rows", cls.channels, output, outCh)
		}
		head.NumClasses, head.RegMax = cls.channels, box.channels/4
		if head.RegMax < 1 {
			return nil, fmt.Errorf("finding detect head: box tensors have %d channels, not 4*reg_max", box.channels)
		}
		for i := range box.maps {
			head.Levels = append(head.Levels, HeadTensors{Box: box.maps[i], Cls: cls.maps[i]})
		}
	case 0:
		return nil, fmt.Errorf("finding detect head: no Concat of flattened feature maps feeds %q; not a YOLOv8 export", output)
	default:
		return nil, fmt.Errorf("finding detect head: %d candidate level Concats feed %q, want 1 or 2", len(cats), output)
	}
	return head, nil
}

// feedsSigmoid reports whether a Concat's output goes into a Sigmoid,
// possibly through a Split or Slice (older exports split box from class
// channels after concatenating).
func feedsSigmoid(ix *graphIndex, n *onnx.NodeProto) bool {
	for _, c := range ix.consumers[n.GetOutput()[0]] {
		if c.GetOpType() == "Sigmoid" {
			return true
		}
	}
	return false
}

// splitClasses returns the class channel count from a Split of the level
// Concat's output into [4*reg_max, nc], or 0.
func splitClasses(ix *graphIndex, cat *onnx.NodeProto) int {
	for _, c := range ix.consumers[cat.GetOutput()[0]] {
		if c.GetOpType() != "Split" {
			continue
		}
		var sizes []int64
		if a := onnx.Attr(c, "split"); a != nil {
			sizes = a.GetInts()
		} else if len(c.GetInput()) > 1 {
			if t := ix.inits[c.GetInput()[1]]; t != nil {
				sizes, _ = onnx.Int64s(t)
			}
		}
		if len(sizes) == 2 {
			return int(sizes[1])
		}
	}
	return 0
}

// CutDetectHead returns m cut at its detect head: a graph whose outputs are
// head.Outputs(), every node and initializer they do not need pruned.
func CutDetectHead(m *onnx.ModelProto, head *DetectHead) (*onnx.ModelProto, error) {
	cut, err := onnx.Extract(m, head.Outputs())
	if err != nil {
		return nil, fmt.Errorf("cutting detect head: %w", err)
	}
	cut.Graph.Name = m.GetGraph().GetName() + "_detect_head"
	// OpenCV's importer insists that every graph output declares a shape.
	// The head tensors are [N,C,H,W]: the channel count is known, the rest
	// is left symbolic (dims are fixed by the input at run time).
	ix := newGraphIndex(m.GetGraph())
	for i, vi := range cut.Graph.Output {
		if vi.GetType().GetTensorType().GetShape() != nil {
			continue
		}
		shape := &onnx.TensorShapeProto{}
		for d, param := range []string{"batch", "", "height", "width"} {
			dim := &onnx.TensorShapeProto_Dimension{}
			if param == "" {
				dim.Value = &onnx.TensorShapeProto_Dimension_DimValue{DimValue: int64(ix.channelsOf(vi.GetName()))}
			} else {
				dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: fmt.Sprintf("%s_%d", param, i)}
				if d == 0 {
					dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: param}
				}
			}
			shape.Dim = append(shape.Dim, dim)
		}
		// A new message: the cut shares its nodes and weights with m.
		cut.Graph.Output[i] = &onnx.ValueInfoProto{Name: vi.GetName(), Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{
			TensorType: &onnx.TypeProto_Tensor{ElemType: int32(onnx.TensorProto_FLOAT), Shape: shape}}}}
	}
	return cut, nil
}

// CutModelFile finds the detect head of the ONNX model at path, writes the
// cut model into cacheDir (named by a hash of the model, so it is written
// once and never mixed up) and returns its path and the head. The cut
// model is standard ONNX (any runtime runs it); the engine's own copy for
// OpenCV also fuses SiLU into an operator only OpenCV knows.
func CutModelFile(path, output, cacheDir string) (string, *DetectHead, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return "", nil, err
	}
	m := &onnx.ModelProto{}
	if err := proto.Unmarshal(raw, m); err != nil {
		return "", nil, fmt.Errorf("parsing onnx model %s: %w", path, err)
	}
	p, head, err := rewriteModel(path, raw, m, true, false, output, cacheDir)
	if err == nil && head == nil {
		err = fmt.Errorf("model %s has no detect head", path)
	}
	return p, head, err
}

// rewriteVersion names the rewrite rules below; it is part of the cache
// file's hash, so a changed rule never reuses a file the old one wrote.
const rewriteVersion = "cvdnn-rewrite-4"

// prepareForOpenCV returns the file OpenCV should load for the model at
// path (raw its bytes, m parsed from them; m is modified): the model cut
// at its detect head when cut is set, with zero-valued attributes made
// explicit (explicitZeroAttributes), Identity nodes on initializers
// folded (foldIdentityInitializers), the channel arithmetic of chunk and
// split computed (foldChannelArithmetic) and SiLU products fused
// (fuseSiLU).
// It returns path itself when nothing needs changing.
func prepareForOpenCV(path string, raw []byte, m *onnx.ModelProto, cut bool, output, cacheDir string) (string, *DetectHead, error) {
	return rewriteModel(path, raw, m, cut, true, output, cacheDir)
}

// rewriteModel writes the rewritten model into cacheDir, named by a hash
// of the source and the rules, so each is written once. forOpenCV adds
// the rewrites that leave standard ONNX (fuseSiLU).
func rewriteModel(path string, raw []byte, m *onnx.ModelProto, cut, forOpenCV bool, output, cacheDir string) (string, *DetectHead, error) {
	var err error
	h := sha256.New()
	kind := "opencv"
	var head *DetectHead
	if cut {
		if head, err = FindDetectHead(m, output); err != nil {
			return "", nil, err
		}
		if m, err = CutDetectHead(m, head); err != nil {
			return "", nil, err
		}
		kind = "head"
		if forOpenCV {
			kind = "head-opencv"
		}
		h.Write([]byte(fmt.Sprint(head.Outputs())))
	}
	zeros := explicitZeroAttributes(m.GetGraph())
	fused := 0
	if forOpenCV {
		fused = foldIdentityInitializers(m.GetGraph()) + foldChannelArithmetic(m.GetGraph()) + fuseSiLU(m.GetGraph())
	}
	if !zeros && fused == 0 && head == nil {
		return path, nil, nil
	}
	h.Write([]byte(rewriteVersion + kind))
	h.Write(raw)
	name := fmt.Sprintf("%s.%s-%s.onnx", trimExt(filepath.Base(path)), kind, hex.EncodeToString(h.Sum(nil))[:16])
	dst := filepath.Join(cacheDir, name)
	if _, err := os.Stat(dst); err == nil {
		return dst, head, nil
	}
	out, err := proto.Marshal(m)
	if err != nil {
		return "", nil, fmt.Errorf("encoding model for OpenCV: %w", err)
	}
	if err := onnx.WriteAtomic(dst, out); err != nil {
		return "", nil, err
	}
	return dst, head, nil
}

func trimExt(s string) string {
	if i := slices.Index([]byte(s), '.'); i > 0 {
		return s[:i]
	}
	return s
}
