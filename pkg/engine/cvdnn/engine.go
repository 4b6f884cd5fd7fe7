// Package cvdnn runs models on OpenCV's DNN module (gocv v0.31 over OpenCV
// 4.6, OpenCV backend, CPU target).
//
// OpenCV 4.6 throws C++ exceptions that gocv does not catch, so a graph it
// cannot import aborts the process. New therefore probes every model in a
// short-lived child process first (Probe), which re-executes the current
// binary: every binary that loads models through this package must call
// RunProbeIfRequested first thing in main(), and its tests in TestMain.
//
// OpenCV 4.6 cannot import the tail of a YOLOv8 export (the DFL decode;
// the generated yolov8s fails in its Reshape/Concat shape inference), so
// for a detector the engine cuts the graph at the per-level Detect head
// tensors (FindDetectHead, CutModelFile), runs that on OpenCV and computes
// the tail on the host (DecodeYOLOv8), giving the same [N,4+nc,anchors]
// output ONNX Runtime gives for the full graph.
//
// Two more OpenCV 4.6 limits are handled rather than served as crashes: a
// model whose zero-valued attributes carry no value on the wire (written
// by a proto3 tool) is rewritten with the values, and a model OpenCV runs
// at batch 1 but not at the configured maximum batch is run image by image
// (Engine.PerImage). For speed, SiLU written as x·Sigmoid(x) is fused into
// one Swish node, which OpenCV folds into the convolution before it (the
// YOLOv8s head graph: 0.71 s to 0.51 s per image in OpenCV's own layer
// profile). Rewritten and cut models live in Options.CacheDir,
// named by a hash of the source model. Probe outcomes are cached per
// process, so further instances of a model start without a child.
package cvdnn

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"gocv.io/x/gocv"
	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/onnx"
)

// Backend is what Engine.Backend reports.
const Backend = engine.OpenCV

// Options configure an Engine. The zero value reads names and shapes from
// the graph, cuts YOLOv8 heads and probes the model first.
type Options struct {
	// InputName is the image input; "" takes the graph's only input.
	InputName string
	// OutputNames are the outputs Run returns; nil takes the graph's
	// outputs.
	OutputNames []string
	// FullGraph runs the graph as it is even when it has a YOLOv8 head
	// (for OpenCV versions that import the DFL).
	FullGraph bool
	// CacheDir holds cut YOLOv8 models; "" means a visionserve folder in
	// the user cache directory (or the temp directory).
	CacheDir string
	// MaxBatch, when above 1, is also probed and bounds Run's batch size.
	MaxBatch int
	// SkipProbe loads the model in-process without probing it first, when
	// this process has not probed it already. Probe results are cached per
	// process (by file, size, modification time, input, outputs and batch
	// sizes), so further instances of a model never need this; a cached
	// result, failure included, always applies.
	SkipProbe bool
	// ProbeTimeout bounds the probe (default DefaultProbeTimeout).
	ProbeTimeout time.Duration
}

// Engine runs one ONNX model on OpenCV DNN. It implements engine.Engine;
// like every Engine it is used by one goroutine at a time.
type Engine struct {
	path  string // the file OpenCV runs (the cut model for a detector)
	input string
	shape [3]int // C, H, W
	batch int    // the graph's fixed batch size, 0 when dynamic
	// netOutputs are the tensors OpenCV computes; outputs are the names
	// Run returns (the decoded output for a detector).
	netOutputs []string
	outputs    []string
	head       *DetectHead // nil unless the graph was cut
	maxBatch   int
	// perImage is set when OpenCV runs the graph at batch 1 but not at
	// MaxBatch (OpenCV 4.6 mis-broadcasts some [N,C,1,1]×[N,C,H,W]
	// products, as in MobileNetV3's squeeze-excite): Run then runs the
	// images of a batch one by one.
	perImage bool

	gate engine.Gate // guards the fields below
	net  gocv.Net
	// bufs holds the Go copies of the net outputs and the tensors Run
	// returns; one set serves every batch size, as a Run's outputs are
	// only valid until the next Run.
	bufs runBuffers
}

type runBuffers struct {
	net     [][]float32
	shapes  [][]int
	result  []engine.Tensor
	scratch []float32 // the host decode's
}

// NewForModel loads a repository model; names set in its config win over
// the graph's.
func NewForModel(ctx context.Context, m *modelrepo.Model, opts Options) (*Engine, error) {
	if opts.InputName == "" {
		opts.InputName = m.Config.Input.Name
	}
	if opts.OutputNames == nil && m.Config.Output.Name != "" {
		opts.OutputNames = []string{m.Config.Output.Name}
	}
	if opts.MaxBatch == 0 {
		opts.MaxBatch = m.Batching.MaxBatchSize
	}
	e, err := New(ctx, m.Path, opts)
	if err != nil {
		return nil, fmt.Errorf("loading model %q: %w", m.Name, err)
	}
	return e, nil
}

// New loads the ONNX model at path on OpenCV: it reads the graph, cuts a
// YOLOv8 head, probes the result in a child process and only then loads it
// in this one. ctx bounds the probe.
func New(ctx context.Context, path string, opts Options) (*Engine, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading onnx model: %w", err)
	}
	m := &onnx.ModelProto{}
	if err := proto.Unmarshal(raw, m); err != nil {
		return nil, fmt.Errorf("parsing onnx model %s: %w", path, err)
	}
	io, err := graphIO(m)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", path, err)
	}
	if opts.InputName != "" && opts.InputName != io.input {
		return nil, fmt.Errorf("model %s: no input named %q (graph input: %s)", path, opts.InputName, io.input)
	}
	for _, s := range io.shape {
		if s < 1 {
			return nil, fmt.Errorf("model %s: input %q has shape %v; OpenCV needs fixed C, H and W", path, io.input, io.shape)
		}
	}
	e := &Engine{path: path, input: io.input, shape: io.shape, batch: io.batch, outputs: io.outputs, maxBatch: opts.MaxBatch}
	if opts.OutputNames != nil {
		for _, o := range opts.OutputNames {
			if !slices.Contains(io.outputs, o) {
				return nil, fmt.Errorf("model %s: no output named %q (graph outputs: %v)", path, o, io.outputs)
			}
		}
		e.outputs = slices.Clone(opts.OutputNames)
	}
	if len(e.outputs) == 0 {
		return nil, fmt.Errorf("model %s: no outputs to compute", path)
	}
	e.netOutputs = e.outputs
	dir := opts.CacheDir
	if dir == "" {
		dir = defaultCacheDir()
	}
	cut := false
	if !opts.FullGraph && len(e.outputs) == 1 {
		_, err := FindDetectHead(m, e.outputs[0])
		cut = err == nil
	}
	runPath, head, err := prepareForOpenCV(path, raw, m, cut, e.outputs[0], dir)
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", path, err)
	}
	e.path = runPath
	if head != nil {
		e.head, e.netOutputs = head, head.Outputs()
	}
	if opts.ProbeTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.ProbeTimeout)
		defer cancel()
	}
	if err := e.probeCached(ctx, opts.MaxBatch, opts.SkipProbe); err != nil {
		if e.head != nil {
			return nil, fmt.Errorf("model %s (cut at its detect head): %w", path, err)
		}
		if e.path != path {
			return nil, fmt.Errorf("model %s (rewritten for OpenCV): %w", path, err)
		}
		return nil, err
	}
	if e.batch == 1 {
		// An export with a fixed batch of 1 serves batches image by image.
		e.perImage = true
	}
	e.net, err = readNet(e.path)
	if err != nil {
		return nil, err
	}
	return e, nil
}

// probeCache remembers probe outcomes for the life of the process: a
// second instance of a model neither spawns a child nor skips what the
// first one learnt (that it must run image by image).
var probeCache struct {
	mu sync.Mutex // guards m
	m  map[string]probeOutcome
}

type probeOutcome struct {
	perImage bool
	err      error
}

func (e *Engine) probeKey(maxBatch int) (string, error) {
	fi, err := os.Stat(e.path)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s|%d|%d|%s|%v|%v|%d|%d", e.path, fi.Size(), fi.ModTime().UnixNano(), e.input, e.shape, e.netOutputs, e.batch, maxBatch), nil
}

// probeCached applies a cached probe outcome, or probes (unless skip) and
// caches the outcome.
func (e *Engine) probeCached(ctx context.Context, maxBatch int, skip bool) error {
	key, err := e.probeKey(maxBatch)
	if err != nil {
		return err
	}
	probeCache.mu.Lock()
	out, ok := probeCache.m[key]
	probeCache.mu.Unlock()
	if !ok {
		if skip {
			return nil
		}
		err := e.probe(ctx, maxBatch)
		if ctx.Err() != nil {
			return err // a cut-short probe says nothing about the model
		}
		out = probeOutcome{perImage: e.perImage, err: err}
		probeCache.mu.Lock()
		if probeCache.m == nil {
			probeCache.m = map[string]probeOutcome{}
		}
		probeCache.m[key] = out
		probeCache.mu.Unlock()
	}
	e.perImage = out.perImage
	return out.err
}

// probe runs the model in a child process at batch 1 and maxBatch. When
// only batch 1 works the engine runs images one by one.
func (e *Engine) probe(ctx context.Context, maxBatch int) error {
	spec := ProbeSpec{Model: e.path, Input: e.input, Shape: e.shape, Outputs: e.netOutputs, Batches: []int{1}}
	switch {
	case e.batch > 0:
		spec.Batches = []int{e.batch}
	case maxBatch > 1:
		spec.Batches = []int{1, maxBatch}
	}
	_, err := probeChild(ctx, spec)
	if err == nil || len(spec.Batches) < 2 {
		return err
	}
	spec.Batches = []int{1}
	if _, err1 := probeChild(ctx, spec); err1 != nil {
		return err1
	}
	e.perImage = true
	return nil
}

// PerImage reports whether the engine runs a batch image by image: the
// graph fixes its batch at 1, or OpenCV failed it at the maximum batch
// size.
func (e *Engine) PerImage() bool { return e.perImage }

func defaultCacheDir() string { return onnx.CacheDir("cvdnn") }

// Backend reports "opencv".
func (e *Engine) Backend() string { return Backend }

// Head returns where a detector's graph was cut, or nil when OpenCV runs
// the whole graph.
func (e *Engine) Head() *DetectHead { return e.head }

// CheckBatch returns an error when b does not fit the model input.
func (e *Engine) CheckBatch(b *engine.Batch) error {
	if b == nil {
		return errors.New("nil batch")
	}
	if b.N < 1 || b.N > b.Cap {
		return fmt.Errorf("batch holds %d images, want 1..%d", b.N, b.Cap)
	}
	if [3]int{b.C, b.H, b.W} != e.shape {
		return fmt.Errorf("batch images are %dx%dx%d (CxHxW), model input is %dx%dx%d", b.C, b.H, b.W, e.shape[0], e.shape[1], e.shape[2])
	}
	if len(b.Data) < b.N*b.SlotSize() {
		return fmt.Errorf("batch buffer holds %d floats, %d images of %dx%dx%d need %d", len(b.Data), b.N, b.C, b.H, b.W, b.N*b.SlotSize())
	}
	if e.batch > 1 && b.N != e.batch {
		return fmt.Errorf("model has a fixed batch of %d, got %d images", e.batch, b.N)
	}
	if !e.perImage && e.maxBatch > 1 && b.N > e.maxBatch {
		return fmt.Errorf("batch of %d images exceeds the probed maximum %d", b.N, e.maxBatch)
	}
	return nil
}

// Run executes the model on the first b.N images of b. The returned
// tensors are reused by the next Run. OpenCV cannot interrupt a forward
// pass, so ctx is only checked before it starts.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if err := e.CheckBatch(b); err != nil {
		return nil, fmt.Errorf("opencv: %w", err)
	}
	if err := e.gate.Enter(ctx); err != nil {
		return nil, fmt.Errorf("opencv: %w", err)
	}
	defer e.gate.Unlock()
	bufs := &e.bufs
	if bufs.net == nil {
		bufs.net = make([][]float32, len(e.netOutputs))
		bufs.shapes = make([][]int, len(e.netOutputs))
	}
	chunk := b.N
	if e.perImage {
		chunk = 1
	}
	slot := b.SlotSize()
	for first := 0; first < b.N; first += chunk {
		shape := [4]int{chunk, b.C, b.H, b.W}
		err := forward(&e.net, e.input, b.Data[first*slot:(first+chunk)*slot], shape, e.netOutputs, func(i int, s []int, v []float32) error {
			if len(s) == 0 || s[0] != chunk {
				return fmt.Errorf("opencv: output %q has shape %v, want batch %d first", e.netOutputs[i], s, chunk)
			}
			if first == 0 {
				bufs.net[i] = bufs.net[i][:0]
				bufs.shapes[i] = append(bufs.shapes[i][:0], s...)
				bufs.shapes[i][0] = b.N
			} else if !slices.Equal(s[1:], bufs.shapes[i][1:]) {
				return fmt.Errorf("opencv: output %q has shape %v for image %d, %v before", e.netOutputs[i], s, first, bufs.shapes[i])
			}
			bufs.net[i] = append(bufs.net[i], v...)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("running %s: %w", e.path, err)
		}
	}
	if e.head == nil {
		if bufs.result == nil {
			bufs.result = make([]engine.Tensor, len(e.outputs))
		}
		for i, name := range e.outputs {
			bufs.result[i] = engine.Tensor{Name: name, Shape: int64s(bufs.result[i].Shape[:0], bufs.shapes[i]), Data: bufs.net[i]}
		}
		return bufs.result, nil
	}
	return e.decodeLocked(b, bufs)
}

func (e *Engine) decodeLocked(b *engine.Batch, bufs *runBuffers) ([]engine.Tensor, error) {
	levels, err := e.head.levels(bufs.net, bufs.shapes)
	if err != nil {
		return nil, fmt.Errorf("opencv: model %s: %w", e.path, err)
	}
	anchors := anchorCount(levels)
	rows := 4 + e.head.NumClasses
	if bufs.result == nil {
		bufs.result = []engine.Tensor{{Name: e.head.Output}}
	}
	out := &bufs.result[0]
	out.Shape = append(out.Shape[:0], int64(b.N), int64(rows), int64(anchors))
	if n := b.N * rows * anchors; cap(out.Data) < n {
		out.Data = make([]float32, n)
	} else {
		out.Data = out.Data[:n]
	}
	if err := decodeYOLOv8(out.Data, b.N, levels, e.head.RegMax, e.head.NumClasses, b.H, b.W, &bufs.scratch); err != nil {
		return nil, fmt.Errorf("opencv: %w", err)
	}
	return bufs.result, nil
}

func int64s(dst []int64, s []int) []int64 {
	for _, v := range s {
		dst = append(dst, int64(v))
	}
	return dst
}

// Close frees the net. Run after Close returns an error; a second Close
// does nothing.
func (e *Engine) Close() error {
	return e.gate.Close(func() error {
		e.bufs = runBuffers{}
		return e.net.Close()
	})
}

var _ engine.Engine = (*Engine)(nil)

// Factory is the opencv backend. The first instance of a model probes it
// in a child process (OpenCV 4.6 aborts the process on a graph it cannot
// import); the others load what that probe proved.
func Factory(opts Options) engine.Factory {
	return engine.Factory{New: func(ctx context.Context, m *modelrepo.Model, instance int) (engine.Engine, error) {
		o := opts
		o.SkipProbe = instance > 0
		return NewForModel(ctx, m, o)
	}}
}
