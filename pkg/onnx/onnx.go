// Package onnx holds Go bindings for a wire-compatible subset of the ONNX
// protobuf schema (onnx.proto, generated into onnx.pb.go) plus small helpers
// for reading models and decoding tensors.
//
// No ONNX Go module exists on the module proxy, so the schema is vendored
// here: the field numbers are the published ones, which is all that wire
// compatibility with ONNX Runtime, OpenCV and PyTorch exports depends on.
package onnx

//go:generate protoc --go_out=. --go_opt=paths=source_relative onnx.proto

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"

	"google.golang.org/protobuf/proto"
)

// ReadModel reads and parses an .onnx file. Models with external data are
// returned as is: the tensors keep their external_data references.
func ReadModel(path string) (*ModelProto, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading onnx model: %w", err)
	}
	m := &ModelProto{}
	if err := proto.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("parsing onnx model %s: %w", path, err)
	}
	return m, nil
}

// OpsetVersion returns the version of the operator set imported for domain,
// treating "" and "ai.onnx" as the same default domain, or 0 if the model
// does not import it.
func OpsetVersion(m *ModelProto, domain string) int64 {
	if domain == "ai.onnx" {
		domain = ""
	}
	for _, o := range m.GetOpsetImport() {
		d := o.GetDomain()
		if d == "ai.onnx" {
			d = ""
		}
		if d == domain {
			return o.GetVersion()
		}
	}
	return 0
}

// NumElements is the element count of a tensor: the product of its dims
// (1 for a scalar).
func NumElements(t *TensorProto) int64 {
	n := int64(1)
	for _, d := range t.GetDims() {
		n *= d
	}
	return n
}

// FloatInitializerCount sums the element counts of the graph's float32
// initializers. With BatchNorm folded into convolutions this equals a
// network's fused parameter count, which is how the model generator checks
// that a topology is the published one.
func FloatInitializerCount(g *GraphProto) int64 {
	var n int64
	for _, t := range g.GetInitializer() {
		if t.GetDataType() == int32(TensorProto_FLOAT) {
			n += NumElements(t)
		}
	}
	return n
}

// Floats decodes a float32 tensor stored either in raw_data (little endian,
// as exporters write it) or in float_data.
func Floats(t *TensorProto) ([]float32, error) {
	if t.GetDataType() != int32(TensorProto_FLOAT) {
		return nil, fmt.Errorf("tensor %q: data type %s, want FLOAT", t.GetName(), TensorProto_DataType(t.GetDataType()))
	}
	n := NumElements(t)
	if raw := t.GetRawData(); raw != nil {
		if int64(len(raw)) != 4*n {
			return nil, fmt.Errorf("tensor %q: %d raw bytes for %d floats", t.GetName(), len(raw), n)
		}
		out := make([]float32, n)
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
		return out, nil
	}
	if int64(len(t.GetFloatData())) != n {
		return nil, fmt.Errorf("tensor %q: %d float_data values for %d elements", t.GetName(), len(t.GetFloatData()), n)
	}
	return append([]float32(nil), t.GetFloatData()...), nil
}

// Int64s decodes an int64 tensor stored either in raw_data or in int64_data.
func Int64s(t *TensorProto) ([]int64, error) {
	if t.GetDataType() != int32(TensorProto_INT64) {
		return nil, fmt.Errorf("tensor %q: data type %s, want INT64", t.GetName(), TensorProto_DataType(t.GetDataType()))
	}
	n := NumElements(t)
	if raw := t.GetRawData(); raw != nil {
		if int64(len(raw)) != 8*n {
			return nil, fmt.Errorf("tensor %q: %d raw bytes for %d int64s", t.GetName(), len(raw), n)
		}
		out := make([]int64, n)
		for i := range out {
			out[i] = int64(binary.LittleEndian.Uint64(raw[8*i:]))
		}
		return out, nil
	}
	if int64(len(t.GetInt64Data())) != n {
		return nil, fmt.Errorf("tensor %q: %d int64_data values for %d elements", t.GetName(), len(t.GetInt64Data()), n)
	}
	return append([]int64(nil), t.GetInt64Data()...), nil
}

// Shape returns the dims of a tensor-typed value. A symbolic or unknown
// dimension is reported as -1; use DimParams for the symbolic names.
func Shape(vi *ValueInfoProto) []int64 {
	dims := vi.GetType().GetTensorType().GetShape().GetDim()
	out := make([]int64, len(dims))
	for i, d := range dims {
		if v, ok := d.GetValue().(*TensorShapeProto_Dimension_DimValue); ok {
			out[i] = v.DimValue
		} else {
			out[i] = -1
		}
	}
	return out
}

// DimParams returns the symbolic dimension names of a tensor-typed value,
// "" where a dimension is fixed or unknown.
func DimParams(vi *ValueInfoProto) []string {
	dims := vi.GetType().GetTensorType().GetShape().GetDim()
	out := make([]string, len(dims))
	for i, d := range dims {
		out[i] = d.GetDimParam()
	}
	return out
}

// Producer returns the node that outputs the named value, or nil if it is a
// graph input, an initializer or absent.
func Producer(g *GraphProto, value string) *NodeProto {
	for _, n := range g.GetNode() {
		for _, o := range n.GetOutput() {
			if o == value {
				return n
			}
		}
	}
	return nil
}

// Consumers returns the nodes that read the named value, in graph order.
func Consumers(g *GraphProto, value string) []*NodeProto {
	var out []*NodeProto
	for _, n := range g.GetNode() {
		for _, in := range n.GetInput() {
			if in == value {
				out = append(out, n)
				break
			}
		}
	}
	return out
}

// Attr returns the node attribute with the given name, or nil.
func Attr(n *NodeProto, name string) *AttributeProto {
	for _, a := range n.GetAttribute() {
		if a.GetName() == name {
			return a
		}
	}
	return nil
}
