package onnxrt

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"

	"github.com/visionserve/visionserve/pkg/engine"
	ort "github.com/yalue/onnxruntime_go"
)

// Backend is what Engine.Backend reports unless Options.Backend says else.
const Backend = engine.ORTCPU

// OptLevel is ONNX Runtime's graph optimisation level. The zero value means
// all optimisations, the runtime's own default.
type OptLevel int

// Graph optimisation levels.
const (
	OptAll OptLevel = iota
	OptExtended
	OptBasic
	OptDisabled
)

func (l OptLevel) ort() (ort.GraphOptimizationLevel, error) {
	switch l {
	case OptAll:
		return ort.GraphOptimizationLevelEnableAll, nil
	case OptExtended:
		return ort.GraphOptimizationLevelEnableExtended, nil
	case OptBasic:
		return ort.GraphOptimizationLevelEnableBasic, nil
	case OptDisabled:
		return ort.GraphOptimizationLevelDisableAll, nil
	}
	return 0, fmt.Errorf("unknown graph optimisation level %d", l)
}

// Options configure an Engine. The zero value is a CPU engine that reads
// the input and output names from the graph.
type Options struct {
	// IntraOpThreads is the thread count inside one operator; 0 means
	// runtime.NumCPU().
	IntraOpThreads int
	// InterOpThreads is the thread count across independent operators; 0
	// means 1 (sequential execution, which suits convolutional nets).
	InterOpThreads int
	// Optimization is the graph optimisation level (default all).
	Optimization OptLevel
	// InputName is the model's image input; "" takes the graph's only
	// input.
	InputName string
	// OutputNames are the outputs Run returns, in order; nil takes all of
	// the graph's outputs.
	OutputNames []string
	// Backend is what Engine.Backend reports; "" means "ort-cpu".
	Backend string
	// Configure, when set, is called with the session options after the
	// fields above are applied and before the session is created: the hook
	// through which a GPU engine appends the CUDA or TensorRT provider.
	Configure func(*ort.SessionOptions) error
}

// Engine runs one ONNX model on ONNX Runtime. It implements
// engine.Engine; like every Engine it is used by one goroutine at a time.
type Engine struct {
	path    string
	backend string
	input   ort.InputOutputInfo
	outputs []ort.InputOutputInfo
	// fixedBatch is the model's batch size when the graph fixes it (a
	// [1,3,640,640] export); Run then runs bigger batches in chunks of it.
	// 0 when the batch dimension is dynamic.
	fixedBatch int
	// staticOut reports whether every output shape is known but for the
	// batch dimension, so output tensors can be preallocated.
	staticOut bool

	gate    engine.Gate // guards the fields below
	session *ort.DynamicAdvancedSession
	runOpts *ort.RunOptions
	// outs caches the output tensors per batch size; their Go slices are
	// what Run returns.
	outs map[int]*outputSet
}

// outputSet is the outputs of one batch size: the Go tensors handed out and
// the ORT tensors over their memory (chunked when the batch is fixed).
type outputSet struct {
	result []engine.Tensor
	// values[c][o] is output o of chunk c.
	values [][]ort.Value
}

// Info describes a loaded model's input and outputs as ONNX Runtime sees
// them; -1 marks a dynamic dimension.
type Info struct {
	InputName    string
	InputShape   []int64
	OutputNames  []string
	OutputShapes [][]int64
}

// New loads the ONNX model at path. Init must have succeeded; otherwise
// New fails saying so.
func New(path string, opts Options) (*Engine, error) {
	if err := Init(""); err != nil {
		return nil, err
	}
	ins, outs, err := ort.GetInputOutputInfo(path)
	if err != nil {
		return nil, fmt.Errorf("reading model %s: %w", path, err)
	}
	e := &Engine{path: path, backend: opts.Backend, outs: map[int]*outputSet{}}
	if e.backend == "" {
		e.backend = Backend
	}
	if e.input, err = pickInput(ins, opts.InputName); err != nil {
		return nil, fmt.Errorf("model %s: %w", path, err)
	}
	if e.outputs, err = pickOutputs(outs, opts.OutputNames); err != nil {
		return nil, fmt.Errorf("model %s: %w", path, err)
	}
	if d := e.input.Dimensions[0]; d > 0 {
		e.fixedBatch = int(d)
	}
	e.staticOut = true
	for _, o := range e.outputs {
		if len(o.Dimensions) == 0 || slices.Contains(o.Dimensions[1:], -1) {
			e.staticOut = false
		}
		if d := o.Dimensions; len(d) > 0 && e.fixedBatch > 0 && d[0] > 0 && int(d[0]) != e.fixedBatch {
			e.staticOut = false
		}
	}

	so, err := ort.NewSessionOptions()
	if err != nil {
		return nil, fmt.Errorf("creating ONNX Runtime session options: %w", err)
	}
	defer so.Destroy()
	if err := applyOptions(so, opts); err != nil {
		return nil, fmt.Errorf("model %s: %w", path, err)
	}
	names := make([]string, len(e.outputs))
	for i, o := range e.outputs {
		names[i] = o.Name
	}
	e.session, err = ort.NewDynamicAdvancedSession(path, []string{e.input.Name}, names, so)
	if err != nil {
		return nil, fmt.Errorf("creating ONNX Runtime session for %s: %w", path, err)
	}
	e.runOpts, err = ort.NewRunOptions()
	if err != nil {
		e.session.Destroy()
		return nil, fmt.Errorf("creating ONNX Runtime run options: %w", err)
	}
	return e, nil
}

func applyOptions(so *ort.SessionOptions, opts Options) error {
	intra := opts.IntraOpThreads
	if intra <= 0 {
		intra = runtime.NumCPU()
	}
	inter := opts.InterOpThreads
	if inter <= 0 {
		inter = 1
	}
	if err := so.SetIntraOpNumThreads(intra); err != nil {
		return fmt.Errorf("setting intra-op threads to %d: %w", intra, err)
	}
	if err := so.SetInterOpNumThreads(inter); err != nil {
		return fmt.Errorf("setting inter-op threads to %d: %w", inter, err)
	}
	lvl, err := opts.Optimization.ort()
	if err != nil {
		return err
	}
	if err := so.SetGraphOptimizationLevel(lvl); err != nil {
		return fmt.Errorf("setting graph optimisation level: %w", err)
	}
	if opts.Configure != nil {
		if err := opts.Configure(so); err != nil {
			return fmt.Errorf("configuring session: %w", err)
		}
	}
	return nil
}

func pickInput(ins []ort.InputOutputInfo, name string) (ort.InputOutputInfo, error) {
	var in ort.InputOutputInfo
	switch {
	case name != "":
		i := slices.IndexFunc(ins, func(x ort.InputOutputInfo) bool { return x.Name == name })
		if i < 0 {
			return in, fmt.Errorf("no input named %q (graph inputs: %s)", name, infoNames(ins))
		}
		in = ins[i]
	case len(ins) == 1:
		in = ins[0]
	default:
		return in, fmt.Errorf("graph has %d inputs (%s); name the image input", len(ins), infoNames(ins))
	}
	if in.OrtValueType != ort.ONNXTypeTensor || in.DataType != ort.TensorElementDataTypeFloat {
		return in, fmt.Errorf("input %q is %s, want a float32 tensor", in.Name, in.String())
	}
	if len(in.Dimensions) != 4 {
		return in, fmt.Errorf("input %q has shape %v, want NCHW (4 dimensions)", in.Name, in.Dimensions)
	}
	return in, nil
}

func pickOutputs(outs []ort.InputOutputInfo, names []string) ([]ort.InputOutputInfo, error) {
	var picked []ort.InputOutputInfo
	if len(names) == 0 {
		picked = outs
	}
	for _, n := range names {
		i := slices.IndexFunc(outs, func(x ort.InputOutputInfo) bool { return x.Name == n })
		if i < 0 {
			return nil, fmt.Errorf("no output named %q (graph outputs: %s)", n, infoNames(outs))
		}
		picked = append(picked, outs[i])
	}
	if len(picked) == 0 {
		return nil, errors.New("graph has no outputs")
	}
	for _, o := range picked {
		if o.OrtValueType != ort.ONNXTypeTensor || o.DataType != ort.TensorElementDataTypeFloat {
			return nil, fmt.Errorf("output %q is %s, want a float32 tensor", o.Name, o.String())
		}
	}
	return picked, nil
}

func infoNames(l []ort.InputOutputInfo) string {
	s := ""
	for i, x := range l {
		if i > 0 {
			s += ", "
		}
		s += x.Name
	}
	return s
}

// Info returns the model's input and outputs.
func (e *Engine) Info() Info {
	in := Info{InputName: e.input.Name, InputShape: slices.Clone(e.input.Dimensions)}
	for _, o := range e.outputs {
		in.OutputNames = append(in.OutputNames, o.Name)
		in.OutputShapes = append(in.OutputShapes, slices.Clone(o.Dimensions))
	}
	return in
}

// Backend names the runtime, "ort-cpu" unless Options.Backend said else.
func (e *Engine) Backend() string { return e.backend }

// CheckBatch returns an error when b does not fit the model input.
func (e *Engine) CheckBatch(b *engine.Batch) error {
	return checkBatch(b, e.input.Dimensions)
}

func checkBatch(b *engine.Batch, dims []int64) error {
	if b == nil {
		return errors.New("nil batch")
	}
	if b.N < 1 || b.N > b.Cap {
		return fmt.Errorf("batch holds %d images, want 1..%d", b.N, b.Cap)
	}
	if b.C < 1 || b.H < 1 || b.W < 1 {
		return fmt.Errorf("batch image shape %dx%dx%d is empty", b.C, b.H, b.W)
	}
	if len(b.Data) < b.N*b.SlotSize() {
		return fmt.Errorf("batch buffer holds %d floats, %d images of %dx%dx%d need %d", len(b.Data), b.N, b.C, b.H, b.W, b.N*b.SlotSize())
	}
	want := [3]int64{dims[1], dims[2], dims[3]}
	got := [3]int64{int64(b.C), int64(b.H), int64(b.W)}
	for i := range want {
		if want[i] > 0 && want[i] != got[i] {
			return fmt.Errorf("batch images are %dx%dx%d (CxHxW), model input is %v", b.C, b.H, b.W, dims)
		}
	}
	return nil
}

// Run executes the model on the first b.N images of b. The batch buffer is
// ONNX Runtime's input memory; the returned tensors are reused by the next
// Run of the same batch size. Cancelling ctx terminates a running batch.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if err := checkBatch(b, e.input.Dimensions); err != nil {
		return nil, fmt.Errorf("onnxrt: %w", err)
	}
	if err := e.gate.Enter(ctx); err != nil {
		return nil, fmt.Errorf("onnxrt: %w", err)
	}
	defer e.gate.Unlock()
	chunk := b.N
	if e.fixedBatch > 0 {
		chunk = e.fixedBatch
		if b.N%chunk != 0 {
			return nil, fmt.Errorf("onnxrt: model %s has a fixed batch of %d, cannot run %d images", e.path, chunk, b.N)
		}
	}
	stop := e.terminateOnCancelLocked(ctx)
	defer stop()
	if e.staticOut {
		return e.runStaticLocked(ctx, b, chunk)
	}
	return e.runDynamicLocked(ctx, b, chunk)
}

// terminateOnCancelLocked makes a cancelled ctx terminate the ORT run in
// flight; the returned func waits for that to settle and re-arms the run
// options, so no callback outlives Run.
func (e *Engine) terminateOnCancelLocked(ctx context.Context) func() {
	if ctx.Done() == nil {
		return func() {}
	}
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		defer close(fired)
		e.runOpts.Terminate()
	})
	return func() {
		if !stopAfter() {
			<-fired
			e.runOpts.UnsetTerminate()
		}
	}
}

func (e *Engine) runErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("onnxrt: running %s: %w (%v)", e.path, ctx.Err(), err)
	}
	return fmt.Errorf("onnxrt: running %s: %w", e.path, err)
}

func (e *Engine) runStaticLocked(ctx context.Context, b *engine.Batch, chunk int) ([]engine.Tensor, error) {
	set, err := e.outputSetLocked(b.N, chunk)
	if err != nil {
		return nil, err
	}
	slot := b.SlotSize()
	for c := range b.N / chunk {
		in, err := inputTensor(b.Data[c*chunk*slot:(c+1)*chunk*slot], chunk, b)
		if err != nil {
			return nil, err
		}
		err = e.session.RunWithOptions([]ort.Value{in}, set.values[c], e.runOpts)
		in.Destroy()
		if err != nil {
			return nil, e.runErr(ctx, err)
		}
	}
	return set.result, nil
}

// runDynamicLocked serves models whose output shapes depend on more than
// the batch size: ONNX Runtime allocates the outputs and Run copies them.
func (e *Engine) runDynamicLocked(ctx context.Context, b *engine.Batch, chunk int) ([]engine.Tensor, error) {
	slot := b.SlotSize()
	result := make([]engine.Tensor, len(e.outputs))
	for c := range b.N / chunk {
		in, err := inputTensor(b.Data[c*chunk*slot:(c+1)*chunk*slot], chunk, b)
		if err != nil {
			return nil, err
		}
		outs := make([]ort.Value, len(e.outputs))
		err = e.session.RunWithOptions([]ort.Value{in}, outs, e.runOpts)
		in.Destroy()
		for i, v := range outs {
			if v == nil {
				continue
			}
			if err == nil {
				t, ok := v.(*ort.Tensor[float32])
				if !ok {
					err = fmt.Errorf("output %q is %T, want a float32 tensor", e.outputs[i].Name, v)
				} else {
					shape := []int64(t.GetShape())
					if len(shape) == 0 || shape[0] != int64(chunk) {
						err = fmt.Errorf("output %q has shape %v, want batch %d first", e.outputs[i].Name, shape, chunk)
					} else {
						if c == 0 {
							result[i] = engine.Tensor{Name: e.outputs[i].Name, Shape: slices.Clone(shape)}
							result[i].Shape[0] = int64(b.N)
						}
						result[i].Data = append(result[i].Data, t.GetData()...)
					}
				}
			}
			v.Destroy()
		}
		if err != nil {
			return nil, e.runErr(ctx, err)
		}
	}
	return result, nil
}

// inputTensor returns an ORT tensor over data, the batch's own memory: a
// header, no copy. It is made per run rather than cached per buffer, which
// costs a few small allocations but never keeps a dropped batch buffer
// alive.
func inputTensor(data []float32, n int, b *engine.Batch) (*ort.Tensor[float32], error) {
	t, err := ort.NewTensor(ort.NewShape(int64(n), int64(b.C), int64(b.H), int64(b.W)), data)
	if err != nil {
		return nil, fmt.Errorf("onnxrt: wrapping batch buffer: %w", err)
	}
	return t, nil
}

// outputSetLocked returns the cached outputs for batch size n, creating
// them on first use: one Go slice per output, with ORT tensors over each
// chunk of it.
func (e *Engine) outputSetLocked(n, chunk int) (*outputSet, error) {
	if s, ok := e.outs[n]; ok {
		return s, nil
	}
	set := &outputSet{values: make([][]ort.Value, n/chunk)}
	for _, o := range e.outputs {
		shape := slices.Clone(o.Dimensions)
		shape[0] = int64(n)
		data := make([]float32, ort.Shape(shape).FlattenedSize())
		set.result = append(set.result, engine.Tensor{Name: o.Name, Shape: shape, Data: data})
		per := len(data) / (n / chunk)
		cshape := slices.Clone(shape)
		cshape[0] = int64(chunk)
		for c := range n / chunk {
			t, err := ort.NewTensor(ort.Shape(cshape), data[c*per:(c+1)*per])
			if err != nil {
				destroyValues(set)
				return nil, fmt.Errorf("onnxrt: allocating output %q %v: %w", o.Name, cshape, err)
			}
			set.values[c] = append(set.values[c], t)
		}
	}
	e.outs[n] = set
	return set, nil
}

func destroyValues(s *outputSet) {
	for _, vs := range s.values {
		for _, v := range vs {
			v.Destroy()
		}
	}
}

// Close frees the session and the tensors. Run after Close returns an
// error; a second Close does nothing.
func (e *Engine) Close() error {
	return e.gate.Close(e.free)
}

func (e *Engine) free() error {
	for n, s := range e.outs {
		destroyValues(s)
		delete(e.outs, n)
	}
	var errs []error
	if e.runOpts != nil {
		errs = append(errs, e.runOpts.Destroy())
	}
	if e.session != nil {
		errs = append(errs, e.session.Destroy())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("onnxrt: closing %s: %w", e.path, err)
	}
	return nil
}

var _ engine.Engine = (*Engine)(nil)
