package cvdnn

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"time"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// probeEnv carries the probe request to the child process. Its presence is
// what makes RunProbeIfRequested take over the process.
const probeEnv = "VISIONSERVE_CVDNN_PROBE"

// probeOK starts the line a successful probe child prints.
const probeOK = "cvdnn-probe: ok"

// DefaultProbeTimeout bounds one probe when the context has no deadline:
// importing and running a large model once takes seconds, not minutes.
const DefaultProbeTimeout = 2 * time.Minute

// ProbeSpec says what a probe loads and runs. Zero fields are read from
// the graph: its first input, its outputs, batch size 1.
type ProbeSpec struct {
	Model   string   `json:"model"`
	Input   string   `json:"input,omitempty"`
	Shape   [3]int   `json:"shape,omitempty"` // C, H, W
	Outputs []string `json:"outputs,omitempty"`
	// Batches are the batch sizes to run, in order (default [1]).
	Batches []int `json:"batches,omitempty"`
}

// RunProbeIfRequested turns the process into a probe child when the
// parent asked for one, and never returns in that case. Call it first
// thing in main() of every binary that loads models through this package
// (cmd/infer-server) and in TestMain of tests that do: Probe re-executes
// the current binary, and this is what the child runs instead of main.
func RunProbeIfRequested() {
	raw, ok := os.LookupEnv(probeEnv)
	if !ok {
		return
	}
	// The child's abort is expected; the runtime's goroutine dump of it
	// would only bury OpenCV's message.
	debug.SetTraceback("none")
	var spec ProbeSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		fmt.Fprintf(os.Stderr, "cvdnn-probe: bad request: %v\n", err)
		os.Exit(3)
	}
	line, err := runProbe(spec)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cvdnn-probe: %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("%s %s\n", probeOK, line)
	os.Exit(0)
}

// runProbe is the child's work: load the model with OpenCV and run one
// dummy batch per batch size. A C++ exception in here aborts the child,
// which is the point.
func runProbe(spec ProbeSpec) (string, error) {
	n, err := readNet(spec.Model)
	if err != nil {
		return "", err
	}
	defer n.Close()
	var shapes []string
	for _, b := range spec.Batches {
		shape := [4]int{b, spec.Shape[0], spec.Shape[1], spec.Shape[2]}
		data := make([]float32, shape[0]*shape[1]*shape[2]*shape[3])
		for i := range data {
			data[i] = 0.5
		}
		err := forward(&n, spec.Input, data, shape, spec.Outputs, func(i int, s []int, _ []float32) error {
			shapes = append(shapes, fmt.Sprintf("%s%v", spec.Outputs[i], s))
			return nil
		})
		if err != nil {
			return "", fmt.Errorf("batch %d: %w", b, err)
		}
	}
	return strings.Join(shapes, " "), nil
}

// Probe checks, in a short-lived child process, that OpenCV can import the
// ONNX model at modelPath and run it once at batch size 1. OpenCV 4.6
// through gocv aborts the whole process on a graph it cannot import; the
// probe makes that the child's death and this function's error, naming the
// model and what failed. The binary must call RunProbeIfRequested first
// thing in main (or TestMain).
func Probe(ctx context.Context, modelPath string) error {
	return ProbeWith(ctx, ProbeSpec{Model: modelPath})
}

// ProbeWith is Probe with the input, outputs and batch sizes spelled out.
func ProbeWith(ctx context.Context, spec ProbeSpec) error {
	if err := completeSpec(&spec); err != nil {
		return fmt.Errorf("probing model %s with OpenCV: %w", spec.Model, err)
	}
	_, err := probeChild(ctx, spec)
	return err
}

// completeSpec fills what the spec leaves out from the graph.
func completeSpec(spec *ProbeSpec) error {
	if spec.Input != "" && spec.Shape != [3]int{} && len(spec.Outputs) > 0 {
		if len(spec.Batches) == 0 {
			spec.Batches = []int{1}
		}
		return nil
	}
	m, err := onnx.ReadModel(spec.Model)
	if err != nil {
		return err
	}
	io, err := graphIO(m)
	if err != nil {
		return err
	}
	if spec.Input == "" {
		spec.Input = io.input
	}
	if spec.Shape == [3]int{} {
		spec.Shape = io.shape
	}
	if len(spec.Outputs) == 0 {
		spec.Outputs = io.outputs
	}
	if len(spec.Batches) == 0 {
		spec.Batches = []int{1}
	}
	return nil
}

func probeChild(ctx context.Context, spec ProbeSpec) (string, error) {
	if _, err := os.Stat(spec.Model); err != nil {
		return "", fmt.Errorf("probing model %s with OpenCV: %w", spec.Model, err)
	}
	for _, b := range spec.Batches {
		if b < 1 {
			return "", fmt.Errorf("probing model %s with OpenCV: batch size %d", spec.Model, b)
		}
	}
	for _, s := range spec.Shape {
		if s < 1 {
			return "", fmt.Errorf("probing model %s with OpenCV: input shape %v is not fixed; give it", spec.Model, spec.Shape)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("probing model %s with OpenCV: finding own binary: %w", spec.Model, err)
	}
	req, err := json.Marshal(spec)
	if err != nil {
		return "", err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultProbeTimeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, self)
	// GOTRACEBACK=none keeps the Go runtime's goroutine dump of an abort
	// out of the way of OpenCV's message.
	cmd.Env = append(os.Environ(), probeEnv+"="+string(req), "GOTRACEBACK=none")
	var stdout bytes.Buffer
	stderr := &headTailWriter{max: 2048}
	cmd.Stdout, cmd.Stderr = &stdout, stderr
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if err == nil {
		if i := strings.Index(out, probeOK); i >= 0 {
			return strings.TrimSpace(out[i+len(probeOK):]), nil
		}
		// The binary exited cleanly without running the probe: it does
		// not call RunProbeIfRequested.
		return "", fmt.Errorf("probing model %s with OpenCV: %s did not run the probe (call cvdnn.RunProbeIfRequested first in main/TestMain)", spec.Model, self)
	}
	what := err.Error()
	if ctx.Err() != nil {
		what = fmt.Sprintf("%v (%v)", ctx.Err(), err)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ProcessState != nil {
		what = ee.ProcessState.String() // "signal: aborted", "exit status 2"
		if ctx.Err() != nil {
			what += fmt.Sprintf(" (%v)", ctx.Err())
		}
	}
	tail := childMessage(stderr.String())
	if tail == "" {
		tail = "no stderr"
	}
	return "", fmt.Errorf("probing model %s with OpenCV: child process failed: %s: %s", spec.Model, what, tail)
}

// childMessage keeps what explains a child's death: OpenCV's exception
// and the signal, without the Go runtime's goroutine and register dump that
// follows a crash in cgo.
func childMessage(stderr string) string {
	var keep []string
	for _, line := range strings.Split(stderr, "\n") {
		if strings.HasPrefix(line, "goroutine ") {
			break
		}
		if strings.HasPrefix(line, "PC=") || strings.HasPrefix(line, "signal arrived during") {
			continue
		}
		if line = strings.TrimSpace(line); line != "" && line != ">" {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, " | ")
}

// headTailWriter keeps the first and the last max bytes written: a
// crashing child may print a lot; OpenCV's exception text comes first and
// the runtime's verdict last.
type headTailWriter struct {
	max        int
	head, tail []byte
	dropped    int
}

func (w *headTailWriter) Write(p []byte) (int, error) {
	n := len(p)
	if room := w.max - len(w.head); room > 0 {
		k := min(room, len(p))
		w.head = append(w.head, p[:k]...)
		p = p[k:]
	}
	w.tail = append(w.tail, p...)
	if over := len(w.tail) - w.max; over > 0 {
		w.tail = w.tail[over:]
		w.dropped += over
	}
	return n, nil
}

func (w *headTailWriter) String() string {
	if w.dropped > 0 {
		return string(w.head) + fmt.Sprintf("\n[... %d bytes ...]\n", w.dropped) + string(w.tail)
	}
	return string(w.head) + string(w.tail)
}

// modelIO is a graph's image input and outputs.
type modelIO struct {
	input   string
	shape   [3]int // C, H, W; 0 where not fixed
	batch   int    // fixed batch size, 0 when dynamic
	outputs []string
}

func graphIO(m *onnx.ModelProto) (modelIO, error) {
	g := m.GetGraph()
	inits := map[string]bool{}
	for _, t := range g.GetInitializer() {
		inits[t.GetName()] = true
	}
	var io modelIO
	for _, vi := range g.GetInput() {
		if inits[vi.GetName()] {
			continue
		}
		if io.input != "" {
			return io, fmt.Errorf("graph has more than one input (%s, %s)", io.input, vi.GetName())
		}
		s := onnx.Shape(vi)
		if len(s) != 4 {
			return io, fmt.Errorf("input %q has shape %v, want NCHW", vi.GetName(), s)
		}
		io.input = vi.GetName()
		for i := range 3 {
			io.shape[i] = int(max(s[i+1], 0))
		}
		io.batch = int(max(s[0], 0))
	}
	if io.input == "" {
		return io, errors.New("graph has no input")
	}
	for _, o := range g.GetOutput() {
		io.outputs = append(io.outputs, o.GetName())
	}
	if len(io.outputs) == 0 {
		return io, errors.New("graph has no outputs")
	}
	return io, nil
}
