package gpu

import (
	"fmt"
	"syscall"

	ort "github.com/yalue/onnxruntime_go"

	"github.com/visionserve/visionserve/pkg/gpu/internal/sigstate"
)

// ORTGoConfigure returns a hook that appends the execution providers of
// opts (TensorRT with CUDA behind it, or CUDA) to onnxruntime_go session
// options, through its NewCUDAProviderOptions/NewTensorRTProviderOptions.
// It is for the CPU engine's onnxrt.Options.Configure: a session made that
// way runs on the GPU without IoBinding (pageable input copied on every
// run), which Engine avoids. Create such sessions inside WithGoSignals.
func ORTGoConfigure(opts SessionOptions) func(*ort.SessionOptions) error {
	return func(so *ort.SessionOptions) error {
		appendCUDA := func() error {
			keys, values, err := opts.cudaKeyValues()
			if err != nil {
				return err
			}
			co, err := ort.NewCUDAProviderOptions()
			if err != nil {
				return fmt.Errorf("creating CUDA provider options: %w", err)
			}
			defer co.Destroy()
			if err := co.Update(pairs(keys, values)); err != nil {
				return fmt.Errorf("setting CUDA provider options: %w", err)
			}
			if err := so.AppendExecutionProviderCUDA(co); err != nil {
				return fmt.Errorf("adding the CUDA execution provider: %w", err)
			}
			return nil
		}
		switch opts.Provider {
		case ProviderCPU, "":
			return nil
		case ProviderCUDA:
			return appendCUDA()
		case ProviderTensorRT:
			to, err := ort.NewTensorRTProviderOptions()
			if err != nil {
				return fmt.Errorf("creating TensorRT provider options: %w", err)
			}
			defer to.Destroy()
			if err := to.Update(pairs(opts.tensorRTKeyValues())); err != nil {
				return fmt.Errorf("setting TensorRT provider options: %w", err)
			}
			if err := so.AppendExecutionProviderTensorRT(to); err != nil {
				return fmt.Errorf("adding the TensorRT execution provider: %w", err)
			}
			return appendCUDA()
		}
		return fmt.Errorf("unknown execution provider %q (want cpu, cuda or tensorrt)", opts.Provider)
	}
}

func pairs(keys, values []string) map[string]string {
	m := make(map[string]string, len(keys))
	for i := range keys {
		m[keys[i]] = values[i]
	}
	return m
}

// WithGoSignals runs create, which may load a native library that installs
// signal handlers of its own (creating a CUDA or TensorRT session does),
// and then puts back every handler it replaced, so SIGTERM and SIGINT still
// reach signal.Notify. It returns the signals it restored and create's
// error.
func WithGoSignals(create func() error) ([]syscall.Signal, error) {
	saved := sigstate.Save()
	err := create()
	restored, rerr := saved.Restore()
	if err != nil {
		return restored, err
	}
	if rerr != nil {
		return restored, fmt.Errorf("restoring Go's signal handlers: %w", rerr)
	}
	return restored, nil
}
