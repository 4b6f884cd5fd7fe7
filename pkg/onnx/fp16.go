package onnx

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"
)

// KeepFP32 are the operators ToFP16 runs in fp32 (their float inputs are
// cast up and their float outputs down): ones whose fp16 kernels are
// missing or whose results fp16 would change, as in onnxconverter-common's
// block list, plus Softmax (the DFL head of YOLOv8 sums 16 of them) and
// the reductions.
var KeepFP32 = []string{
	"Resize", "Upsample", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "CumSum",
	"Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceL2", "Min", "Max",
}

// ToFP16 returns a copy of m that computes in half precision: every
// float32 initializer and constant becomes float16, a Cast after each
// float32 graph input and before each float32 graph output keeps the
// model's interface in float32 (so callers feed and read float32 as
// before), Cast nodes to float32 inside the graph cast to float16, and
// the operators of keep (KeepFP32 when nil) run in float32 between casts.
// Values beyond the float16 range are clamped to ±65504. It refuses
// graphs with subgraphs (If, Loop, Scan) and graphs already in float16.
func ToFP16(m *ModelProto, keep []string) (*ModelProto, error) {
	if keep == nil {
		keep = KeepFP32
	}
	out := proto.Clone(m).(*ModelProto)
	g := out.GetGraph()
	if g == nil {
		return nil, errors.New("fp16: model has no graph")
	}
	for _, n := range g.GetNode() {
		for _, a := range n.GetAttribute() {
			if a.GetG() != nil || len(a.GetGraphs()) > 0 {
				return nil, fmt.Errorf("fp16: node %q (%s) has a subgraph; not converted", n.GetName(), n.GetOpType())
			}
		}
	}
	types, err := elemTypes(g)
	if err != nil {
		return nil, err
	}
	for _, t := range types {
		if t == int32(TensorProto_FLOAT16) {
			return nil, errors.New("fp16: the model already computes in float16")
		}
	}
	const (
		f32 = int32(TensorProto_FLOAT)
		f16 = int32(TensorProto_FLOAT16)
	)
	uniq := map[string]bool{}
	for name := range types {
		uniq[name] = true
	}
	fresh := func(base string) string {
		name := base
		for i := 1; uniq[name]; i++ {
			name = fmt.Sprintf("%s_%d", base, i)
		}
		uniq[name] = true
		return name
	}
	cast := func(in, outName string, to int32) *NodeProto {
		return &NodeProto{OpType: "Cast", Name: fresh("fp16_cast/" + outName), Input: []string{in}, Output: []string{outName},
			Attribute: []*AttributeProto{{Name: "to", Type: AttributeProto_INT, I: proto.Int64(int64(to))}}}
	}

	// Initializers and constants to float16.
	for _, t := range g.GetInitializer() {
		if t.GetDataType() == f32 {
			if err := tensorToFP16(t); err != nil {
				return nil, err
			}
		}
	}
	var nodes []*NodeProto
	// A cast after every float32 input; the graph reads the cast.
	rename := map[string]string{}
	for _, in := range g.GetInput() {
		if isInitializer(g, in.GetName()) || in.GetType().GetTensorType().GetElemType() != f32 {
			continue
		}
		half := fresh(in.GetName() + "_fp16")
		rename[in.GetName()] = half
		types[half] = f32 // the type it had; the keep-op casts read it
		nodes = append(nodes, cast(in.GetName(), half, f16))
	}
	// Outputs: the producer writes a float16 value that a cast turns back.
	outputs := map[string]bool{}
	for _, o := range g.GetOutput() {
		if o.GetType().GetTensorType().GetElemType() == f32 {
			outputs[o.GetName()] = true
		}
	}
	outRename := map[string]string{}
	for name := range outputs {
		outRename[name] = fresh(name + "_fp16")
		types[outRename[name]] = types[name]
	}
	keepOp := map[string]bool{}
	for _, op := range keep {
		keepOp[op] = true
	}
	for _, n := range g.GetNode() {
		for i, in := range n.GetInput() {
			if to, ok := rename[in]; ok {
				n.Input[i] = to
			} else if to, ok := outRename[in]; ok {
				n.Input[i] = to
			}
		}
		if n.GetDomain() == "" {
			switch n.GetOpType() {
			case "Constant", "ConstantOfShape":
				for _, a := range n.GetAttribute() {
					if t := a.GetT(); t != nil && t.GetDataType() == f32 {
						if err := tensorToFP16(t); err != nil {
							return nil, err
						}
					}
				}
			case "Cast":
				if a := Attr(n, "to"); a != nil && a.GetI() == int64(f32) {
					a.I = proto.Int64(int64(f16))
				}
			}
		}
		if !keepOp[n.GetOpType()] || n.GetDomain() != "" {
			for i, o := range n.GetOutput() {
				if to, ok := outRename[o]; ok {
					n.Output[i] = to
				}
			}
			nodes = append(nodes, n)
			continue
		}
		// A float32 island: float inputs cast up, float outputs cast down.
		for i, in := range n.GetInput() {
			if in == "" || types[in] != f32 {
				continue
			}
			up := fresh(in + "_fp32")
			nodes = append(nodes, cast(in, up, f32))
			n.Input[i] = up
		}
		var after []*NodeProto
		for i, o := range n.GetOutput() {
			if types[o] != f32 {
				continue
			}
			full := fresh(o + "_fp32")
			target := o
			if to, ok := outRename[o]; ok {
				target = to
			}
			n.Output[i] = full
			after = append(after, cast(full, target, f16))
		}
		nodes = append(nodes, n)
		nodes = append(nodes, after...)
	}
	for _, o := range g.GetOutput() {
		if half, ok := outRename[o.GetName()]; ok {
			nodes = append(nodes, cast(half, o.GetName(), f32))
		}
	}
	g.Node = nodes
	// Intermediate types changed; ONNX Runtime infers them again.
	g.ValueInfo = nil
	return out, nil
}

func isInitializer(g *GraphProto, name string) bool {
	return slices.ContainsFunc(g.GetInitializer(), func(t *TensorProto) bool { return t.GetName() == name })
}

// elemTypes infers the element type of every value of g from its inputs,
// initializers and constants, operator by operator: enough for the
// operators of vision models, where an output has the type of the first
// typed input unless the operator says otherwise.
func elemTypes(g *GraphProto) (map[string]int32, error) {
	types := map[string]int32{}
	for _, in := range g.GetInput() {
		types[in.GetName()] = in.GetType().GetTensorType().GetElemType()
	}
	for _, t := range g.GetInitializer() {
		types[t.GetName()] = t.GetDataType()
	}
	const (
		i64   = int32(TensorProto_INT64)
		bool_ = int32(TensorProto_BOOL)
		f32   = int32(TensorProto_FLOAT)
	)
	for _, n := range g.GetNode() {
		first := int32(0)
		for _, in := range n.GetInput() {
			if t, ok := types[in]; ok && in != "" {
				first = t
				break
			}
		}
		var t int32
		switch n.GetOpType() {
		case "Shape", "Size", "NonZero", "ArgMax", "ArgMin":
			t = i64
		case "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf":
			t = bool_
		case "Cast":
			t = int32(Attr(n, "to").GetI())
		case "Constant":
			if a := Attr(n, "value"); a != nil && a.GetT() != nil {
				t = a.GetT().GetDataType()
			} else if Attr(n, "value_ints") != nil || Attr(n, "value_int") != nil {
				t = i64
			} else {
				t = f32
			}
		case "ConstantOfShape":
			t = f32
			if a := Attr(n, "value"); a != nil && a.GetT() != nil {
				t = a.GetT().GetDataType()
			}
		case "Where":
			if len(n.GetInput()) > 1 {
				t = types[n.GetInput()[1]]
			}
		default:
			t = first
		}
		for i, o := range n.GetOutput() {
			types[o] = t
			if n.GetOpType() == "TopK" && i == 1 {
				types[o] = i64
			}
		}
	}
	return types, nil
}

// tensorToFP16 rewrites a float32 tensor as float16, in raw_data.
func tensorToFP16(t *TensorProto) error {
	vals, err := Floats(t)
	if err != nil {
		return err
	}
	raw := make([]byte, 2*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint16(raw[2*i:], Float16Bits(v))
	}
	t.DataType = int32(TensorProto_FLOAT16)
	t.RawData, t.FloatData = raw, nil
	return nil
}

// Float16Bits rounds f to the nearest IEEE 754 half (ties to even) and
// returns its bits; values beyond the half range are clamped to ±65504,
// NaN stays NaN.
func Float16Bits(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff && mant != 0:
		return sign | 0x7e00 // NaN
	case exp == 0xff || f > 65504 || f < -65504:
		return sign | 0x7bff // clamp to the largest half
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7bff
	}
	if e <= 0 {
		// Subnormal half (or zero): shift the mantissa with its leading 1.
		if e < -10 {
			return sign
		}
		m := mant | 0x800000
		shift := uint32(14 - e)
		half := m >> shift
		rem := m & (1<<shift - 1)
		mid := uint32(1) << (shift - 1)
		if rem > mid || (rem == mid && half&1 == 1) {
			half++
		}
		return sign | uint16(half)
	}
	half := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && half&1 == 1) {
		half++ // may carry into the exponent, which is still right
	}
	if half >= 0x7c00 {
		return sign | 0x7bff
	}
	return sign | uint16(half)
}

// Float16Value is the float32 value of half bits h.
func Float16Value(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0 && mant == 0:
		return math.Float32frombits(sign)
	case exp == 0:
		// Subnormal: normalise.
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	case exp == 0x1f:
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	}
	return math.Float32frombits(sign | (exp-15+127)<<23 | mant<<13)
}

// RoundToFP16 returns a copy of m whose float32 initializers and constants
// hold values rounded to float16 but stay float32: the model computes what
// the weights of ToFP16 hold, on any float32 runtime. Tests use it to
// check fp16 numerics without a GPU.
func RoundToFP16(m *ModelProto) (*ModelProto, error) {
	out := proto.Clone(m).(*ModelProto)
	round := func(t *TensorProto) error {
		if t.GetDataType() != int32(TensorProto_FLOAT) {
			return nil
		}
		vals, err := Floats(t)
		if err != nil {
			return err
		}
		raw := make([]byte, 4*len(vals))
		for i, v := range vals {
			binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(Float16Value(Float16Bits(v))))
		}
		t.RawData, t.FloatData = raw, nil
		return nil
	}
	for _, t := range out.GetGraph().GetInitializer() {
		if err := round(t); err != nil {
			return nil, err
		}
	}
	for _, n := range out.GetGraph().GetNode() {
		if n.GetOpType() == "Constant" || n.GetOpType() == "ConstantOfShape" {
			for _, a := range n.GetAttribute() {
				if a.GetT() != nil {
					if err := round(a.GetT()); err != nil {
						return nil, err
					}
				}
			}
		}
	}
	return out, nil
}

// fp16Rules names the conversion rules; it is part of the cache file's
// hash, so a changed rule never reuses a file the old one wrote.
const fp16Rules = "fp16-1"

// ConvertFileFP16 writes ToFP16 of the model at path into cacheDir, once
// per model content, and returns the written file's path.
func ConvertFileFP16(path, cacheDir string) (string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("fp16: %w", err)
	}
	sum := sha256.Sum256(append([]byte(fp16Rules+strings.Join(KeepFP32, ",")), raw...))
	base := strings.TrimSuffix(filepath.Base(path), ".onnx")
	dst := filepath.Join(cacheDir, fmt.Sprintf("%s.fp16-%s.onnx", base, hex.EncodeToString(sum[:8])))
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	m := &ModelProto{}
	if err := proto.Unmarshal(raw, m); err != nil {
		return "", fmt.Errorf("fp16: parsing %s: %w", path, err)
	}
	h, err := ToFP16(m, nil)
	if err != nil {
		return "", fmt.Errorf("fp16: %s: %w", path, err)
	}
	out, err := proto.Marshal(h)
	if err != nil {
		return "", fmt.Errorf("fp16: %w", err)
	}
	if err := WriteAtomic(dst, out); err != nil {
		return "", fmt.Errorf("fp16: %w", err)
	}
	return dst, nil
}

// WriteAtomic writes data to dst through a temporary file in its folder
// and a rename, so a concurrent reader never sees half a file (the model
// caches of the OpenCV rewrites and of the fp16 conversion).
func WriteAtomic(dst string, data []byte) error {
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("model cache: %w", err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(dst)+".tmp*")
	if err != nil {
		return fmt.Errorf("model cache: %w", err)
	}
	_, err = tmp.Write(data)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("writing %s: %w", dst, err)
	}
	return nil
}

// CacheDir is the folder for the rewritten models of kind sub: the
// user's cache folder when it can be created (~/.cache/visionserve/sub),
// else the temporary folder. A container user often has no home (the
// image's uid 10001 has /nonexistent) and a read-only root, where only
// the temporary folder is writable.
func CacheDir(sub string) string {
	if d, err := os.UserCacheDir(); err == nil {
		dir := filepath.Join(d, "visionserve", sub)
		if os.MkdirAll(dir, 0o755) == nil {
			return dir
		}
	}
	return filepath.Join(os.TempDir(), "visionserve-"+sub)
}
