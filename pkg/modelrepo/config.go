// Package modelrepo reads a model repository: one folder per model holding
// model.onnx, config.yaml and a label file. It validates each config,
// fills in what can be read from the ONNX graph itself, and refuses model
// names that could escape the repository.
package modelrepo

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Task is what a model does.
type Task string

// Tasks a model can serve.
const (
	TaskClassify Task = "classify"
	TaskDetect   Task = "detect"
)

// ResizeMode says how an image is fitted to the model input.
type ResizeMode string

// Resize modes.
const (
	// ResizeLetterbox keeps the aspect ratio, scales the image to fit the
	// input and centres it on a pad-coloured canvas (detectors).
	ResizeLetterbox ResizeMode = "letterbox"
	// ResizeShorterCrop scales the shorter side to ResizeShorter and cuts
	// the centre Width×Height out of it (torchvision classifiers).
	ResizeShorterCrop ResizeMode = "shorter_crop"
	// ResizeStretch scales to Width×Height ignoring the aspect ratio.
	ResizeStretch ResizeMode = "stretch"
)

// Decoding says how the model's output tensor is turned into results.
type Decoding string

// Output decodings.
const (
	// DecodeLogits is a [N,classes] tensor of logits; softmax gives scores.
	DecodeLogits Decoding = "logits"
	// DecodeProbabilities is a [N,classes] tensor that already sums to 1.
	DecodeProbabilities Decoding = "probabilities"
	// DecodeYOLOv8 is an Ultralytics [N,4+classes,anchors] tensor: cx, cy,
	// w, h in input pixels followed by per-class probabilities, no NMS.
	DecodeYOLOv8 Decoding = "yolov8"
)

// Config is a model's config.yaml.
type Config struct {
	// Name is the model's name in the API; it defaults to the folder name
	// and must equal it when given.
	Name string `yaml:"name"`
	Task Task   `yaml:"task"`
	// ModelFile is the ONNX file in the model folder (default model.onnx).
	ModelFile string `yaml:"model_file"`
	// Labels is the label file in the model folder, one class name a line.
	Labels string `yaml:"labels"`
	// Preset fills what neither this file nor the model's metadata says:
	// "imagenet" (see PresetImageNet), "none", or empty for automatic
	// (imagenet for a 1000-way classifier without metadata).
	Preset   string         `yaml:"preset"`
	Input    InputConfig    `yaml:"input"`
	Output   OutputConfig   `yaml:"output"`
	Defaults DefaultOptions `yaml:"defaults"`
	Batching BatchingConfig `yaml:"batching"`
}

// InputConfig describes the model input and how images are prepared for it.
type InputConfig struct {
	// Name of the input tensor; read from the ONNX graph when empty.
	Name string `yaml:"name"`
	// Width and Height of the input; read from the graph when it fixes them.
	Width  int `yaml:"width"`
	Height int `yaml:"height"`
	// Layout of the input tensor; only NCHW is supported.
	Layout string `yaml:"layout"`
	// Color is the channel order the model expects: RGB or BGR.
	Color string `yaml:"color"`
	// Scale multiplies each 0-255 pixel value before Mean and Std apply:
	// value = (pixel*Scale - Mean[c]) / Std[c].
	Scale float32    `yaml:"scale"`
	Mean  [3]float32 `yaml:"mean"`
	Std   [3]float32 `yaml:"std"`
	// Resize is letterbox, shorter_crop or stretch.
	Resize ResizeMode `yaml:"resize"`
	// ResizeShorter is the shorter side before the centre crop
	// (shorter_crop only; 256 for a 224 torchvision classifier).
	ResizeShorter int `yaml:"resize_shorter"`
	// PadValue fills the letterbox border (114 for Ultralytics models).
	PadValue uint8 `yaml:"pad_value"`
}

// OutputConfig describes the output tensor and its decoding.
type OutputConfig struct {
	// Name of the output tensor; read from the ONNX graph when empty.
	Name     string   `yaml:"name"`
	Decoding Decoding `yaml:"decoding"`
}

// DefaultOptions are used where a request leaves an option unset.
type DefaultOptions struct {
	TopK          int     `yaml:"top_k"`
	Confidence    float32 `yaml:"confidence"`
	IoU           float32 `yaml:"iou"`
	MaxDetections int     `yaml:"max_detections"`
}

// BatchingConfig sets the model's dynamic batcher.
type BatchingConfig struct {
	// MaxBatchSize is the most images in one engine run.
	MaxBatchSize int `yaml:"max_batch_size"`
	// MaxQueueDelay is how long the first queued image may wait for more.
	MaxQueueDelay time.Duration `yaml:"max_queue_delay"`
	// PreferredBatchSizes release a batch as soon as one of them is reached.
	PreferredBatchSizes []int `yaml:"preferred_batch_sizes"`
	// QueueSize bounds the images waiting; beyond it requests are refused.
	QueueSize int `yaml:"queue_size"`
	// Instances is the number of engine instances running batches at once.
	Instances int `yaml:"instances"`
	// AutoTune measures every candidate batch size (1, 2, 4, ... up to
	// MaxBatchSize) on the model's engine at warm-up and replaces
	// PreferredBatchSizes and MaxBatchSize with the sizes that measured
	// fastest per image (see batcher.ChooseBatchSizes): on a CPU a bigger
	// batch is often not faster.
	AutoTune bool `yaml:"auto_tune"`
	// LatencyTargetP99, when set, is the p99 budget of an image's time in
	// the batcher (queue wait and batch run): the batch size and queue
	// delay are then adapted online to the most throughput that keeps it
	// (see batcher.LatencyController). It implies AutoTune.
	LatencyTargetP99 time.Duration `yaml:"latency_target_p99"`
}

// Limits of what a config may ask for.
const (
	MaxInputSide     = 4096
	MaxBatchSizeAny  = 256
	MaxInstances     = 64
	MaxQueueSizeAny  = 1 << 16
	MaxQueueDelayAny = 10 * time.Second
	MaxLatencyTarget = time.Minute
	MaxDetectionsAny = 10000
	MaxTopKAny       = 1000
)

var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ValidName reports whether name may name a model: letters, digits, '_',
// '-' and '.', not starting with '.', at most 128 characters. Such a name
// never escapes the repository folder.
func ValidName(name string) bool {
	return validName.MatchString(name) && !strings.Contains(name, "..")
}

// applyDefaults fills the fields a config may leave out.
func (c *Config) applyDefaults() {
	if c.ModelFile == "" {
		c.ModelFile = "model.onnx"
	}
	if c.Input.Layout == "" {
		c.Input.Layout = "NCHW"
	}
	if c.Input.Color == "" {
		c.Input.Color = "RGB"
	}
	if c.Input.Scale == 0 {
		c.Input.Scale = 1.0 / 255
	}
	if c.Input.Std == [3]float32{} {
		c.Input.Std = [3]float32{1, 1, 1}
	}
	if c.Input.Resize == "" {
		switch c.Task {
		case TaskDetect:
			c.Input.Resize = ResizeLetterbox
		default:
			c.Input.Resize = ResizeShorterCrop
		}
	}
	if c.Input.Resize == ResizeLetterbox && c.Input.PadValue == 0 {
		c.Input.PadValue = 114
	}
	if c.Output.Decoding == "" {
		switch c.Task {
		case TaskDetect:
			c.Output.Decoding = DecodeYOLOv8
		case TaskClassify:
			c.Output.Decoding = DecodeLogits
		}
	}
	d := &c.Defaults
	if d.TopK == 0 {
		d.TopK = 5
	}
	if d.Confidence == 0 {
		d.Confidence = 0.25
	}
	if d.IoU == 0 {
		d.IoU = 0.45
	}
	if d.MaxDetections == 0 {
		d.MaxDetections = 300
	}
	b := &c.Batching
	if b.MaxBatchSize == 0 {
		b.MaxBatchSize = 8
	}
	if b.MaxQueueDelay == 0 {
		b.MaxQueueDelay = 2 * time.Millisecond
	}
	if b.QueueSize == 0 {
		b.QueueSize = 16 * b.MaxBatchSize
	}
	if b.Instances == 0 {
		b.Instances = 1
	}
}

// validate checks every field and joins all problems into one error, so a
// user fixes a config in one pass.
func (c *Config) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch c.Task {
	case TaskClassify, TaskDetect:
	case "":
		bad("task is missing (want classify or detect)")
	default:
		bad("unknown task %q (want classify or detect)", c.Task)
	}
	if strings.ContainsAny(c.ModelFile, `/\`) || strings.HasPrefix(c.ModelFile, ".") {
		bad("model_file %q must be a plain file name in the model folder", c.ModelFile)
	}
	in := c.Input
	if in.Width <= 0 || in.Height <= 0 || in.Width > MaxInputSide || in.Height > MaxInputSide {
		bad("input size %dx%d out of range (1..%d); set input.width and input.height or fix them in the ONNX graph", in.Width, in.Height, MaxInputSide)
	}
	if in.Layout != "NCHW" {
		bad("input.layout %q not supported (want NCHW)", in.Layout)
	}
	if in.Color != "RGB" && in.Color != "BGR" {
		bad("input.color %q not supported (want RGB or BGR)", in.Color)
	}
	if !finitePositive(in.Scale) {
		bad("input.scale %v must be a positive finite number", in.Scale)
	}
	for i := range 3 {
		if !finitePositive(in.Std[i]) {
			bad("input.std[%d] %v must be a positive finite number", i, in.Std[i])
		}
		if math.IsNaN(float64(in.Mean[i])) || math.IsInf(float64(in.Mean[i]), 0) {
			bad("input.mean[%d] must be finite", i)
		}
	}
	switch in.Resize {
	case ResizeLetterbox, ResizeStretch:
	case ResizeShorterCrop:
		if in.ResizeShorter < max(in.Width, in.Height) || in.ResizeShorter > 2*MaxInputSide {
			bad("input.resize_shorter %d must be at least the input size %dx%d", in.ResizeShorter, in.Width, in.Height)
		}
	default:
		bad("unknown input.resize %q (want letterbox, shorter_crop or stretch)", in.Resize)
	}
	switch {
	case c.Task == TaskDetect && c.Output.Decoding != DecodeYOLOv8:
		bad("output.decoding %q does not fit task detect (want yolov8)", c.Output.Decoding)
	case c.Task == TaskClassify && c.Output.Decoding != DecodeLogits && c.Output.Decoding != DecodeProbabilities:
		bad("output.decoding %q does not fit task classify (want logits or probabilities)", c.Output.Decoding)
	}
	d := c.Defaults
	if d.TopK < 1 || d.TopK > MaxTopKAny {
		bad("defaults.top_k %d out of range (1..%d)", d.TopK, MaxTopKAny)
	}
	if !(d.Confidence > 0 && d.Confidence <= 1) {
		bad("defaults.confidence %v out of range (0..1]", d.Confidence)
	}
	if !(d.IoU > 0 && d.IoU <= 1) {
		bad("defaults.iou %v out of range (0..1]", d.IoU)
	}
	if d.MaxDetections < 1 || d.MaxDetections > MaxDetectionsAny {
		bad("defaults.max_detections %d out of range (1..%d)", d.MaxDetections, MaxDetectionsAny)
	}
	b := c.Batching
	if b.MaxBatchSize < 1 || b.MaxBatchSize > MaxBatchSizeAny {
		bad("batching.max_batch_size %d out of range (1..%d)", b.MaxBatchSize, MaxBatchSizeAny)
	}
	if b.MaxQueueDelay < 0 || b.MaxQueueDelay > MaxQueueDelayAny {
		bad("batching.max_queue_delay %v out of range (0..%v)", b.MaxQueueDelay, MaxQueueDelayAny)
	}
	for _, p := range b.PreferredBatchSizes {
		if p < 1 || p > b.MaxBatchSize {
			bad("batching.preferred_batch_sizes: %d out of range (1..max_batch_size %d)", p, b.MaxBatchSize)
		}
	}
	if !slices.IsSorted(b.PreferredBatchSizes) {
		bad("batching.preferred_batch_sizes must be in increasing order")
	}
	if b.QueueSize < b.MaxBatchSize || b.QueueSize > MaxQueueSizeAny {
		bad("batching.queue_size %d out of range (max_batch_size %d..%d)", b.QueueSize, b.MaxBatchSize, MaxQueueSizeAny)
	}
	if b.LatencyTargetP99 < 0 || b.LatencyTargetP99 > MaxLatencyTarget {
		bad("batching.latency_target_p99 %v out of range (0 for none..%v)", b.LatencyTargetP99, MaxLatencyTarget)
	}
	if b.Instances < 1 || b.Instances > MaxInstances {
		bad("batching.instances %d out of range (1..%d)", b.Instances, MaxInstances)
	}
	return errors.Join(errs...)
}

func finitePositive(f float32) bool {
	return f > 0 && !math.IsInf(float64(f), 0) && !math.IsNaN(float64(f))
}
