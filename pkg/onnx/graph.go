package onnx

import (
	"fmt"
)

// Extract returns a model that computes only the named values of m: the
// graph keeps the nodes those values depend on, the initializers and inputs
// those nodes read, and lists the named values as its outputs. It is how
// the OpenCV engine cuts a YOLOv8 graph at the per-level Detect head
// tensors, before the DFL Reshape that OpenCV 4.6 cannot import.
//
// The result shares node and tensor messages with m (the weights are not
// copied), so treat both as read-only afterwards. An output that is not
// declared in m's outputs or value_info, or declared without a shape, gets
// an empty shape (and element type float if it had none): OpenCV 4.6 asserts that every graph output has a shape
// field, and ONNX Runtime accepts it (the real shape is inferred).
func Extract(m *ModelProto, outputs []string) (*ModelProto, error) {
	g := m.GetGraph()
	producer := make(map[string]int, len(g.GetNode()))
	for i, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			producer[o] = i
		}
	}
	inits := make(map[string]bool, len(g.GetInitializer()))
	for _, t := range g.GetInitializer() {
		inits[t.GetName()] = true
	}
	inputs := make(map[string]bool, len(g.GetInput()))
	for _, vi := range g.GetInput() {
		inputs[vi.GetName()] = true
	}

	// Walk back from the requested outputs, marking the nodes and graph
	// inputs/initializers they need.
	needNode := make([]bool, len(g.GetNode()))
	needValue := map[string]bool{}
	stack := append([]string(nil), outputs...)
	for _, o := range outputs {
		if _, ok := producer[o]; !ok && !inputs[o] && !inits[o] {
			return nil, fmt.Errorf("extracting subgraph: no value named %q", o)
		}
	}
	for len(stack) > 0 {
		v := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if v == "" || needValue[v] {
			continue
		}
		needValue[v] = true
		i, ok := producer[v]
		if !ok || needNode[i] {
			continue
		}
		needNode[i] = true
		stack = append(stack, g.GetNode()[i].GetInput()...)
	}

	declared := map[string]*ValueInfoProto{}
	for _, list := range [][]*ValueInfoProto{g.GetValueInfo(), g.GetOutput()} {
		for _, vi := range list {
			declared[vi.GetName()] = vi
		}
	}
	sub := &GraphProto{Name: g.GetName()}
	for i, n := range g.GetNode() {
		if needNode[i] {
			sub.Node = append(sub.Node, n)
		}
	}
	for _, t := range g.GetInitializer() {
		if needValue[t.GetName()] {
			sub.Initializer = append(sub.Initializer, t)
		}
	}
	for _, vi := range g.GetInput() {
		if needValue[vi.GetName()] && !inits[vi.GetName()] {
			sub.Input = append(sub.Input, vi)
		}
	}
	for _, o := range outputs {
		vi, ok := declared[o]
		if !ok || vi.GetType().GetTensorType().GetShape() == nil {
			elem := int32(TensorProto_FLOAT)
			if e := vi.GetType().GetTensorType().GetElemType(); e != 0 {
				elem = e
			}
			vi = &ValueInfoProto{Name: o, Type: &TypeProto{Value: &TypeProto_TensorType{
				TensorType: &TypeProto_Tensor{ElemType: elem, Shape: &TensorShapeProto{}},
			}}}
		}
		sub.Output = append(sub.Output, vi)
	}
	for _, vi := range g.GetValueInfo() {
		if needValue[vi.GetName()] {
			sub.ValueInfo = append(sub.ValueInfo, vi)
		}
	}
	return &ModelProto{
		IrVersion:       m.GetIrVersion(),
		OpsetImport:     m.GetOpsetImport(),
		ProducerName:    m.GetProducerName(),
		ProducerVersion: m.GetProducerVersion(),
		Domain:          m.GetDomain(),
		ModelVersion:    m.GetModelVersion(),
		DocString:       m.GetDocString(),
		Graph:           sub,
		MetadataProps:   m.GetMetadataProps(),
		Functions:       m.GetFunctions(),
	}, nil
}

// DetectHeadOutputs finds the per-level outputs of a YOLOv8 Detect head in
// an Ultralytics-style export: the Concat(cv2[i], cv3[i]) tensors of shape
// [N, 4*reg_max+nc, H, W], ordered by level (stride 8, 16, 32).
//
// It matches the export structure rather than names: each level tensor is
// the output of a channel Concat that is flattened by a Reshape, and the
// three Reshapes feed one Concat whose output is Split into box and class
// channels. It returns an error if the graph has no such pattern (for
// example exports that reshape cv2 and cv3 separately).
func DetectHeadOutputs(g *GraphProto) ([]string, error) {
	producers := map[string]*NodeProto{}
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			producers[o] = n
		}
	}
	var found []string
	for _, split := range g.GetNode() {
		if split.GetOpType() != "Split" || len(split.GetInput()) == 0 {
			continue
		}
		cat := producers[split.GetInput()[0]]
		if cat == nil || cat.GetOpType() != "Concat" {
			continue
		}
		var levels []string
		for _, in := range cat.GetInput() {
			rs := producers[in]
			if rs == nil || rs.GetOpType() != "Reshape" {
				levels = nil
				break
			}
			lvl := producers[rs.GetInput()[0]]
			if lvl == nil || lvl.GetOpType() != "Concat" || axisOf(lvl) != 1 {
				levels = nil
				break
			}
			levels = append(levels, lvl.GetOutput()[0])
		}
		if len(levels) > 0 {
			if found != nil {
				return nil, fmt.Errorf("finding detect head: more than one Split matches the pattern")
			}
			found = levels
		}
	}
	if found == nil {
		return nil, fmt.Errorf("finding detect head: no Concat -> Reshape -> Concat -> Split pattern in graph %q", g.GetName())
	}
	return found, nil
}

// axisOf returns a node's "axis" attribute, or 0 when it has none.
func axisOf(n *NodeProto) int64 {
	if a := Attr(n, "axis"); a != nil {
		return a.GetI()
	}
	return 0
}
