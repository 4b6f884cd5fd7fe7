package cvdnn

import (
	"fmt"
	"runtime"
	"unsafe"

	"gocv.io/x/gocv"
)

// The helpers here are the only code that touches gocv; the engine and the
// probe child share them, so what the probe proves is what the engine runs.

// readNet loads an ONNX model on OpenCV's own CPU backend. An import
// failure of OpenCV 4.6 is a C++ exception gocv does not catch: callers
// must have probed the model (Probe) first.
func readNet(path string) (gocv.Net, error) {
	n := gocv.ReadNetFromONNX(path)
	if n.Empty() {
		n.Close()
		return gocv.Net{}, fmt.Errorf("opencv: model %s has no layers", path)
	}
	if err := n.SetPreferableBackend(gocv.NetBackendOpenCV); err != nil {
		n.Close()
		return gocv.Net{}, fmt.Errorf("opencv: selecting the OpenCV backend: %w", err)
	}
	if err := n.SetPreferableTarget(gocv.NetTargetCPU); err != nil {
		n.Close()
		return gocv.Net{}, fmt.Errorf("opencv: selecting the CPU target: %w", err)
	}
	return n, nil
}

// forward sets data ([n,c,h,w] floats) as the input and runs the net to
// the named outputs, calling each(i, shape, values) with output i while its
// Mat is alive; values must be copied before each returns. Every Mat made
// here is closed here.
func forward(n *gocv.Net, input string, data []float32, shape [4]int, outputs []string, each func(i int, shape []int, values []float32) error) error {
	if len(data) < shape[0]*shape[1]*shape[2]*shape[3] || len(data) == 0 {
		return fmt.Errorf("opencv: %d floats for an input of %v", len(data), shape)
	}
	// The Mat is a header over the batch buffer: no copy on the Go side.
	// OpenCV copies it once into its own input blob in SetInput, so the
	// header is closed right after and the buffer is only borrowed
	// during these two calls.
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&data[0])), 4*shape[0]*shape[1]*shape[2]*shape[3])
	blob, err := gocv.NewMatWithSizesFromBytes(shape[:], gocv.MatTypeCV32F, raw)
	if err != nil {
		return fmt.Errorf("opencv: wrapping input: %w", err)
	}
	n.SetInput(blob, input)
	blob.Close()
	runtime.KeepAlive(data)

	outs := n.ForwardLayers(outputs)
	defer func() {
		for i := range outs {
			outs[i].Close()
		}
	}()
	if len(outs) != len(outputs) {
		return fmt.Errorf("opencv: forward gave %d outputs, want %d", len(outs), len(outputs))
	}
	for i := range outs {
		m := &outs[i]
		if m.Empty() {
			return fmt.Errorf("opencv: output %q is empty", outputs[i])
		}
		if m.Type() != gocv.MatTypeCV32F {
			return fmt.Errorf("opencv: output %q has Mat type %v, want CV_32F", outputs[i], m.Type())
		}
		vals, err := m.DataPtrFloat32()
		if err != nil {
			return fmt.Errorf("opencv: reading output %q: %w", outputs[i], err)
		}
		if err := each(i, m.Size(), vals); err != nil {
			return err
		}
	}
	return nil
}
