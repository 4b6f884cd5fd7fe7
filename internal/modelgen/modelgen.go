// Package modelgen generates the model repository's ONNX models: ResNet-50,
// MobileNetV3-Large and YOLOv8s graphs with the published architectures
// (BatchNorm folded, as an export does) and deterministic, seeded weights.
//
// The weights are not trained, but they are not raw noise either: every
// layer is run on a small synthetic calibration batch while the graph is
// built, and its folded BatchNorm is set from that batch's statistics with
// random gamma/beta, residual branches damped. That keeps activations
// finite and input-dependent through the whole depth, so classifier logits
// vary across classes and inputs and YOLO scores and boxes are plausible,
// which is what serving, batching and benchmark code needs to exercise.
//
// Notes for engines:
//   - yolov8s's output0 is [N, 84, 8400] as an Ultralytics export writes it
//     (cx, cy, w, h in input pixels, then 80 sigmoid scores). OpenCV 4.6
//     cannot import the Detect head's DFL; cut the graph at
//     YOLOv8sHeadOutputs (onnx.Extract) and decode on the host.
//   - OpenCV 4.6 runs mobilenetv3_large only at batch size 1: it maps the
//     squeeze-excitation's broadcast Mul to a Scale layer that fails for
//     N > 1. ResNet-50 and the cut YOLOv8s run at any batch size there.
//
// The package is pure Go (no cgo), so `CGO_ENABLED=0 go build
// ./cmd/modelgen` works anywhere.
package modelgen

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/visionserve/visionserve/pkg/onnx"
	"google.golang.org/protobuf/proto"
)

// Format constants of the generated files.
const (
	// IRVersion is the ONNX IR version written (ONNX 1.10+ / ORT 1.10+).
	IRVersion = 8
	// Opset is the default-domain operator set version imported.
	Opset = 17
	// BatchDim is the dim_param of the dynamic batch dimension of every
	// model's input and output.
	BatchDim = "batch"
	// FileName is the model file written inside each model's directory.
	FileName = "model.onnx"
)

// spec describes one generated model.
type spec struct {
	input, output string
	inShape       []int64 // -1 is the batch dimension
	outShape      []int64
	// calibSize is the calibration image side. It trades generation time
	// against fidelity: the deepest feature maps (side/32) must stay large
	// enough that statistics measured there carry over to full-size
	// inputs; below about 128 (192 for YOLOv8s, whose SPPF pools 5x5 at
	// P5) activations on full-size inputs drift upwards with depth.
	calibSize int
	imageNet  bool // input normalised with ImageNet mean/std
	doc       string
	build     func(b *builder, x value) value
}

// calibImages is the calibration batch size: one image of each kind.
const calibImages = 4

var specs = map[string]spec{
	"resnet50": {
		input: "images", output: "logits",
		inShape: []int64{-1, 3, 224, 224}, outShape: []int64{-1, 1000},
		calibSize: 128, imageNet: true,
		doc:   "torchvision resnet50 (ImageNet, 1000 classes) topology with BatchNorm folded; synthetic seeded weights. Input: RGB, ImageNet mean/std normalised. Output: logits (no softmax).",
		build: resNet50,
	},
	"mobilenetv3_large": {
		input: "images", output: "logits",
		inShape: []int64{-1, 3, 224, 224}, outShape: []int64{-1, 1000},
		calibSize: 224, imageNet: true,
		doc:   "torchvision mobilenet_v3_large (ImageNet, 1000 classes) topology with BatchNorm folded; synthetic seeded weights. Input: RGB, ImageNet mean/std normalised. Output: logits (no softmax).",
		build: mobileNetV3Large,
	},
	"yolov8s": {
		input: "images", output: "output0",
		inShape: []int64{-1, 3, yoloSize, yoloSize}, outShape: []int64{-1, 4 + yoloClasses, 8400},
		calibSize: 192,
		doc:       "Ultralytics YOLOv8s (COCO, 80 classes) topology with BatchNorm folded; synthetic seeded weights. Input: RGB in [0,1]. Output0: [N, 84, 8400] = cx, cy, w, h in input pixels and 80 sigmoid class scores.",
		build:     yoloV8s,
	},
}

// Names returns the names of the models Build knows, sorted.
func Names() []string {
	names := make([]string, 0, len(specs))
	for n := range specs {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Build generates the named model with weights derived from seed. The same
// name and seed always give the same model (and, through Marshal, the same
// bytes). Building runs each layer on a small calibration batch: about 1,
// 3 and 4 CPU-seconds for mobilenetv3_large, resnet50 and yolov8s, spread
// over GOMAXPROCS (the result does not depend on GOMAXPROCS).
func Build(name string, seed uint64) (*onnx.ModelProto, error) {
	s, ok := specs[name]
	if !ok {
		return nil, fmt.Errorf("building %s: unknown model (known: %s)", name, strings.Join(Names(), ", "))
	}
	b := newBuilder(name, s.input, seed)
	calib := calibBatch(b.rng("calibration"), calibImages, s.calibSize)
	if s.imageNet {
		imageNetNormalize(calib)
	}
	out := s.build(b, value{s.input, calib})
	// The network's final value is the last node's only output; give it
	// the graph output's name.
	last := b.graph.Node[len(b.graph.Node)-1]
	if len(last.Output) != 1 || last.Output[0] != out.name {
		return nil, fmt.Errorf("building %s: final value %s is not the last node's output", name, out.name)
	}
	last.Output[0] = s.output
	b.graph.Input = []*onnx.ValueInfoProto{tensorType(s.input, s.inShape...)}
	b.graph.Output = []*onnx.ValueInfoProto{tensorType(s.output, s.outShape...)}
	meta := []*onnx.StringStringEntryProto{
		{Key: "visionserve.generator", Value: "modelgen"},
		{Key: "visionserve.model", Value: name},
		{Key: "visionserve.seed", Value: strconv.FormatUint(seed, 10)},
	}
	if name == "yolov8s" {
		for i, o := range YOLOv8sHeadOutputs {
			side := int64(yoloSize / yoloStrides[i])
			b.graph.ValueInfo = append(b.graph.ValueInfo, tensorType(o, -1, 4*yoloRegMax+yoloClasses, side, side))
		}
		// The keys an Ultralytics export carries, for loaders that read
		// them.
		meta = append(meta,
			&onnx.StringStringEntryProto{Key: "stride", Value: "32"},
			&onnx.StringStringEntryProto{Key: "task", Value: "detect"},
			&onnx.StringStringEntryProto{Key: "imgsz", Value: "[640, 640]"},
			&onnx.StringStringEntryProto{Key: "names", Value: cocoNamesDict()},
		)
	}
	return &onnx.ModelProto{
		IrVersion:       IRVersion,
		OpsetImport:     []*onnx.OperatorSetIdProto{{Domain: "", Version: Opset}},
		ProducerName:    "visionserve-modelgen",
		ProducerVersion: "1",
		DocString:       s.doc,
		Graph:           b.graph,
		MetadataProps:   meta,
	}, nil
}

// Marshal serialises a model deterministically (stable field and map
// ordering), which is what makes generation reproducible byte for byte.
func Marshal(m *onnx.ModelProto) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("marshaling model: %w", err)
	}
	return b, nil
}

// WriteFile writes m to path atomically: it writes a temporary file in the
// same directory and renames it over path, so an interrupted run never
// leaves a truncated model behind. The directory must exist. If progress is
// non-nil, WriteFile reports bytes written there: carriage-return updates
// when progress is a terminal, a few plain lines otherwise.
func WriteFile(path string, m *onnx.ModelProto, progress io.Writer) error {
	data, err := Marshal(m)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	p := newProgress(progress, filepath.Join(filepath.Base(dir), filepath.Base(path)), int64(len(data)))
	const chunk = 4 << 20
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		if _, err := tmp.Write(data[off:end]); err != nil {
			tmp.Close()
			return fmt.Errorf("writing %s: %w", path, err)
		}
		p.update(int64(end))
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	p.done()
	return nil
}

// progress prints write progress for one file.
type progress struct {
	w        io.Writer
	label    string
	total    int64
	tty      bool
	lastStep int64 // last reported quarter in plain mode
	start    time.Time
}

func newProgress(w io.Writer, label string, total int64) *progress {
	p := &progress{w: w, label: label, total: total, start: time.Now()}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	return p
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func (p *progress) update(written int64) {
	if p.w == nil || p.total == 0 {
		return
	}
	pct := 100 * written / p.total
	if p.tty {
		// \x1b[K clears what is left of a longer previous line.
		fmt.Fprintf(p.w, "\r%s: %.1f / %.1f MiB (%d%%)\x1b[K", p.label, mib(written), mib(p.total), pct)
		return
	}
	// Plain output (logs, CI): one line per quarter.
	if step := pct / 25; step > p.lastStep {
		p.lastStep = step
		fmt.Fprintf(p.w, "%s: %.1f / %.1f MiB (%d%%)\n", p.label, mib(written), mib(p.total), pct)
	}
}

func (p *progress) done() {
	if p.w == nil {
		return
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r%s: %.1f MiB written in %.1fs\x1b[K\n", p.label, mib(p.total), time.Since(p.start).Seconds())
	}
}

// cocoNamesDict renders the COCO class names as the Python dict literal
// Ultralytics stores in its "names" metadata.
func cocoNamesDict() string {
	var sb strings.Builder
	sb.WriteString("{")
	for i, n := range cocoNames {
		if i > 0 {
			sb.WriteString(", ")
		}
		fmt.Fprintf(&sb, "%d: '%s'", i, n)
	}
	sb.WriteString("}")
	return sb.String()
}

// cocoNames are the 80 COCO detection classes in Ultralytics' order.
var cocoNames = []string{
	"person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
	"fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
	"elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
	"skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
	"wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
	"broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
	"dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
	"toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
}
