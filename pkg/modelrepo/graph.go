package modelrepo

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// GraphIO is what the repository reads from an ONNX graph: its real inputs
// (initializers excluded) and outputs. Dimensions that are symbolic or
// unknown are -1.
type GraphIO struct {
	Inputs  []TensorInfo
	Outputs []TensorInfo
	// Metadata is the model's metadata_props (an Ultralytics export keeps
	// its task, class names and input size there).
	Metadata map[string]string
	// OutputOps maps each graph output to the operator that produces it
	// ("Softmax" tells a classifier that already outputs probabilities).
	OutputOps map[string]string
}

// TensorInfo names a graph input or output and its shape.
type TensorInfo struct {
	Name     string
	ElemType int32 // onnx.TensorProto_DataType
	Shape    []int64
}

// Field numbers of onnx.proto used to skim a model without decoding its
// weights: a 100 MB model is read in one pass, no tensor is copied.
const (
	fieldModelGraph       = 7  // ModelProto.graph
	fieldModelMetadata    = 14 // ModelProto.metadata_props
	fieldEntryKey         = 1  // StringStringEntryProto.key
	fieldEntryValue       = 2  // StringStringEntryProto.value
	fieldGraphNode        = 1  // GraphProto.node
	fieldNodeOutput       = 2  // NodeProto.output
	fieldNodeOpType       = 4  // NodeProto.op_type
	fieldGraphInitializer = 5  // GraphProto.initializer
	fieldGraphInput       = 11 // GraphProto.input
	fieldGraphOutput      = 12 // GraphProto.output
	fieldTensorName       = 8  // TensorProto.name
)

// ReadGraphIO reads the inputs and outputs of the ONNX model at path.
func ReadGraphIO(path string) (*GraphIO, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var graph []byte
	meta := map[string]string{}
	err = eachField(raw, func(num protowire.Number, v []byte) error {
		switch num {
		case fieldModelGraph:
			graph = v
		case fieldModelMetadata:
			var k, val []byte
			err := eachField(v, func(n protowire.Number, b []byte) error {
				switch n {
				case fieldEntryKey:
					k = b
				case fieldEntryValue:
					val = b
				}
				return nil
			})
			if err != nil {
				return err
			}
			meta[string(k)] = string(val)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	if graph == nil {
		return nil, fmt.Errorf("parsing %s: not an ONNX model (no graph)", path)
	}
	var inputs, outputs []TensorInfo
	initializers := map[string]bool{}
	producers := map[string]string{}
	err = eachField(graph, func(num protowire.Number, v []byte) error {
		switch num {
		case fieldGraphNode:
			var op string
			var outs []string
			err := eachField(v, func(n protowire.Number, b []byte) error {
				switch n {
				case fieldNodeOpType:
					op = string(b)
				case fieldNodeOutput:
					outs = append(outs, string(b))
				}
				return nil
			})
			if err != nil {
				return err
			}
			for _, o := range outs {
				producers[o] = op
			}
		case fieldGraphInitializer:
			name, err := findField(v, fieldTensorName)
			if err != nil {
				return err
			}
			initializers[string(name)] = true
		case fieldGraphInput, fieldGraphOutput:
			var vi onnx.ValueInfoProto
			if err := proto.Unmarshal(v, &vi); err != nil {
				return err
			}
			ti := TensorInfo{
				Name:     vi.GetName(),
				ElemType: vi.GetType().GetTensorType().GetElemType(),
				Shape:    onnx.Shape(&vi),
			}
			if num == fieldGraphInput {
				inputs = append(inputs, ti)
			} else {
				outputs = append(outputs, ti)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	// Old exporters list initializers among the inputs too.
	inputs = slices.DeleteFunc(inputs, func(t TensorInfo) bool { return initializers[t.Name] })
	ops := make(map[string]string, len(outputs))
	for _, o := range outputs {
		ops[o.Name] = producers[o.Name]
	}
	return &GraphIO{Inputs: inputs, Outputs: outputs, Metadata: meta, OutputOps: ops}, nil
}

// eachField calls fn with every length-delimited field of a message and
// skips the others.
func eachField(b []byte, fn func(protowire.Number, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protowire.ParseError(n)
			}
			if err := fn(num, v); err != nil {
				return err
			}
			b = b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
	}
	return nil
}

var errFound = errors.New("found")

// findField returns the last length-delimited field num of a message, or
// nil when it has none.
func findField(b []byte, num protowire.Number) ([]byte, error) {
	var found []byte
	err := eachField(b, func(n protowire.Number, v []byte) error {
		if n == num {
			found = v
		}
		return nil
	})
	return found, err
}

// readGraph reads the graph at path, naming the fix when it is missing.
func readGraph(path string) (*GraphIO, error) {
	io, err := ReadGraphIO(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("model file %s is missing (for the generated models run `make models`)", path)
		}
		return nil, err
	}
	return io, nil
}

func fillFromIO(cfg *Config, io *GraphIO) error {
	if len(io.Inputs) != 1 {
		return fmt.Errorf("graph has %d inputs; an image model has exactly one", len(io.Inputs))
	}
	if len(io.Outputs) < 1 {
		return fmt.Errorf("graph has no output")
	}
	in := io.Inputs[0]
	if cfg.Input.Name == "" {
		cfg.Input.Name = in.Name
	} else if cfg.Input.Name != in.Name {
		return fmt.Errorf("input.name %q: the graph's input is %q", cfg.Input.Name, in.Name)
	}
	if in.ElemType != int32(onnx.TensorProto_FLOAT) {
		return fmt.Errorf("input %q has element type %s; only float32 inputs are served",
			in.Name, onnx.TensorProto_DataType(in.ElemType))
	}
	if len(in.Shape) != 4 {
		return fmt.Errorf("input %q has shape %v; want [N,3,H,W]", in.Name, in.Shape)
	}
	if c := in.Shape[1]; c != 3 && c != -1 {
		return fmt.Errorf("input %q has %d channels; want 3", in.Name, c)
	}
	if err := fillSide("input.height", &cfg.Input.Height, in.Shape[2]); err != nil {
		return err
	}
	if err := fillSide("input.width", &cfg.Input.Width, in.Shape[3]); err != nil {
		return err
	}
	out := io.Outputs[0]
	if cfg.Output.Name == "" {
		cfg.Output.Name = out.Name
	} else if !slices.ContainsFunc(io.Outputs, func(t TensorInfo) bool { return t.Name == cfg.Output.Name }) {
		return fmt.Errorf("output.name %q is not an output of the graph (it has %q)", cfg.Output.Name, out.Name)
	}
	return nil
}

// fillSide takes a side from the graph where the config leaves it out, and
// checks that both agree where both give it.
func fillSide(field string, side *int, dim int64) error {
	switch {
	case dim <= 0: // dynamic: the config must say
	case *side == 0:
		*side = int(dim)
	case int64(*side) != dim:
		return fmt.Errorf("%s %d: the graph fixes it to %d", field, *side, dim)
	}
	return nil
}
