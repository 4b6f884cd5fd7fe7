package backend

import (
	"context"
	"fmt"

	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

func init() {
	Register(ORTCPU, Factory{New: newORTCPU})
	Register(OpenCV, Factory{New: newOpenCV})
	gpuMissing := func() error {
		return fmt.Errorf("%w: no GPU support in this server build (needs pkg/gpu and a CUDA machine)", ErrNotAvailable)
	}
	noGPU := Factory{Available: gpuMissing, New: func(context.Context, *modelrepo.Model, Options, int) (pipeline.Engine, error) {
		return nil, gpuMissing()
	}}
	Register(ORTCUDA, noGPU)
	Register(ORTTensorRT, noGPU)
}

// newORTCPU loads m on ONNX Runtime's CPU provider, initialising the
// runtime on first use.
func newORTCPU(_ context.Context, m *modelrepo.Model, opts Options, _ int) (pipeline.Engine, error) {
	if err := onnxrt.Init(opts.ORTLib); err != nil {
		return nil, err
	}
	return onnxrt.NewForModel(m, onnxrt.Options{IntraOpThreads: opts.ORTThreads})
}

// newOpenCV loads m on OpenCV DNN. The first instance probes the model in
// a child process (OpenCV 4.6 aborts the process on a graph it cannot
// import); the others load what that probe proved.
func newOpenCV(ctx context.Context, m *modelrepo.Model, _ Options, instance int) (pipeline.Engine, error) {
	return cvdnn.NewForModel(ctx, m, cvdnn.Options{SkipProbe: instance > 0})
}
