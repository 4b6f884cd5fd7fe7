package backend

import (
	"fmt"

	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

func init() {
	Register(ORTCPU, Factory{New: newORTCPU})
	gpuMissing := func() error {
		return fmt.Errorf("%w: no GPU support in this server build (needs pkg/gpu and a CUDA machine)", ErrNotAvailable)
	}
	Register(ORTCUDA, Factory{Available: gpuMissing, New: func(*modelrepo.Model, Options) (pipeline.Engine, error) { return nil, gpuMissing() }})
	Register(ORTTensorRT, Factory{Available: gpuMissing, New: func(*modelrepo.Model, Options) (pipeline.Engine, error) { return nil, gpuMissing() }})
}

// newORTCPU loads m on ONNX Runtime's CPU provider, initialising the
// runtime on first use.
func newORTCPU(m *modelrepo.Model, opts Options) (pipeline.Engine, error) {
	if err := onnxrt.Init(opts.ORTLib); err != nil {
		return nil, err
	}
	return onnxrt.NewForModel(m, onnxrt.Options{IntraOpThreads: opts.ORTThreads})
}
