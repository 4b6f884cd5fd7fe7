package gpu

import (
	"encoding/binary"
	"math"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// tinyValue declares a float tensor value; a negative dimension is dynamic.
func tinyValue(name string, dims ...int64) *onnx.ValueInfoProto {
	shape := &onnx.TensorShapeProto{}
	for i, d := range dims {
		dim := &onnx.TensorShapeProto_Dimension{}
		if d < 0 {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: "d" + string(rune('0'+i))}
		} else {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimValue{DimValue: d}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnx.ValueInfoProto{Name: name, Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{
		TensorType: &onnx.TypeProto_Tensor{ElemType: int32(onnx.TensorProto_FLOAT), Shape: shape},
	}}}
}

// tinyFloats makes a float initializer stored as raw little-endian bytes.
func tinyFloats(name string, dims []int64, data []float32) *onnx.TensorProto {
	raw := make([]byte, 4*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	return &onnx.TensorProto{Name: name, Dims: dims, DataType: int32(onnx.TensorProto_FLOAT), RawData: raw}
}

// tinyModel wraps a graph into an opset 17 model.
func tinyModel(g *onnx.GraphProto) ([]byte, error) {
	m := &onnx.ModelProto{
		IrVersion:    8,
		ProducerName: "visionserve-gpu",
		OpsetImport:  []*onnx.OperatorSetIdProto{{Domain: "", Version: 17}},
		Graph:        g,
	}
	return proto.Marshal(m)
}

// ProbeModel returns the serialized one-node model provider probes run:
// y = x + x with x and y of shape [1,1,2,2]. Other packages' tests load it
// to exercise engines without a model file.
func ProbeModel() ([]byte, error) { return probeModel() }

// probeModel is the one-node model a provider probe runs: y = x + x on a
// [1,1,2,2] input, small enough to load in milliseconds on any provider,
// real enough that a broken driver or missing library fails it.
func probeModel() ([]byte, error) {
	return tinyModel(&onnx.GraphProto{
		Name:   "probe",
		Node:   []*onnx.NodeProto{{OpType: "Add", Name: "double", Input: []string{"x", "x"}, Output: []string{"y"}}},
		Input:  []*onnx.ValueInfoProto{tinyValue("x", 1, 1, 2, 2)},
		Output: []*onnx.ValueInfoProto{tinyValue("y", 1, 1, 2, 2)},
	})
}
