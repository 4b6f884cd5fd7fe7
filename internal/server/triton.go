package server

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"sort"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
)

// Extensions are the Triton protocol extensions this server implements,
// as ServerMetadata lists them.
var Extensions = []string{
	"classification",
	"model_repository",
	"model_repository(unload_dependents)",
	"model_configuration",
	"statistics",
	"system_shared_memory",
}

// ServerMetadata implements GRPCInferenceService.
func (s *oipService) ServerMetadata(context.Context, *inference.ServerMetadataRequest) (*inference.ServerMetadataResponse, error) {
	return &inference.ServerMetadataResponse{Name: "visionserve", Version: Version, Extensions: Extensions}, nil
}

// ModelConfig implements Triton's model configuration extension: a
// model_config.proto view of the model's real configuration.
func (s *oipService) ModelConfig(_ context.Context, req *inference.ModelConfigRequest) (*inference.ModelConfigResponse, error) {
	m, err := s.getModel(req.GetName(), req.GetVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	b := m.EffectiveBatching()
	pref := make([]int32, len(b.PreferredBatchSizes))
	for i, p := range b.PreferredBatchSizes {
		pref[i] = int32(p)
	}
	kind := inference.ModelInstanceGroup_KIND_CPU
	if be := backendOf(m); be == engine.ORTCUDA || be == engine.ORTTensorRT {
		kind = inference.ModelInstanceGroup_KIND_GPU
	}
	outDims := outputShape(m)[1:]
	return &inference.ModelConfigResponse{Config: &inference.ModelConfig{
		Name:         m.Name,
		Platform:     platform(backendOf(m)),
		Backend:      "onnxruntime",
		MaxBatchSize: int32(b.MaxBatchSize),
		Input: []*inference.ModelInput{{
			Name: m.Input.Name, DataType: inference.DataType_TYPE_FP32, Format: inference.ModelInput_FORMAT_NCHW,
			Dims: []int64{3, int64(m.Input.Height), int64(m.Input.Width)},
		}},
		Output: []*inference.ModelOutput{{Name: m.Output().Name, DataType: inference.DataType_TYPE_FP32, Dims: outDims}},
		InstanceGroup: []*inference.ModelInstanceGroup{{
			Name: m.Name, Kind: kind, Count: int32(max(b.Instances, 1)),
		}},
		SchedulingChoice: &inference.ModelConfig_DynamicBatching{DynamicBatching: &inference.ModelDynamicBatching{
			PreferredBatchSize:        pref,
			MaxQueueDelayMicroseconds: uint64(b.MaxQueueDelay / time.Microsecond),
		}},
	}}, nil
}

// ModelStatistics implements Triton's statistics extension, from the
// same measurements as the Prometheus metrics. An empty name is every
// model with a runner.
func (s *oipService) ModelStatistics(_ context.Context, req *inference.ModelStatisticsRequest) (*inference.ModelStatisticsResponse, error) {
	var ms []*model.Model
	if req.GetName() == "" {
		ms = s.reg.Models()
	} else {
		m, err := s.getModel(req.GetName(), req.GetVersion())
		if err != nil {
			return nil, toStatus(err)
		}
		ms = []*model.Model{m}
	}
	resp := &inference.ModelStatisticsResponse{}
	for _, m := range ms {
		sr, ok := m.Runner.(interface{ Statistics() model.Statistics })
		if !ok {
			continue
		}
		st := sr.Statistics()
		dur := func(d model.Duration) *inference.StatisticDuration {
			return &inference.StatisticDuration{Count: uint64(d.Count), Ns: uint64(d.Total.Nanoseconds())}
		}
		ms := &inference.ModelStatistics{
			Name: m.Name, Version: versionOf(m),
			InferenceCount: uint64(st.InferenceCount), ExecutionCount: uint64(st.ExecutionCount),
			InferenceStats: &inference.InferStatistics{
				Success: dur(st.Success), Fail: dur(st.Fail), Queue: dur(st.Queue),
				ComputeInput: dur(st.ComputeInput), ComputeInfer: dur(st.ComputeInfer), ComputeOutput: dur(st.ComputeOutput),
				CacheHit: &inference.StatisticDuration{}, CacheMiss: &inference.StatisticDuration{},
			},
		}
		if !st.LastInference.IsZero() {
			ms.LastInference = uint64(st.LastInference.UnixMilli())
		}
		sizes := make([]int, 0, len(st.Batches))
		for n := range st.Batches {
			sizes = append(sizes, n)
		}
		sort.Ints(sizes)
		for _, n := range sizes {
			b := st.Batches[n]
			ms.BatchStats = append(ms.BatchStats, &inference.InferBatchStatistics{
				BatchSize: uint64(n), ComputeInput: dur(b.ComputeInput), ComputeInfer: dur(b.ComputeInfer), ComputeOutput: dur(b.ComputeOutput),
			})
		}
		resp.ModelStats = append(resp.ModelStats, ms)
	}
	return resp, nil
}

// classification is the top-k of each image's output row in Triton's
// classification extension: BYTES "score:index:label" (the raw output
// value, as Triton reports it), shaped [N, k].
func classification(m *model.Model, t engine.Tensor, n, k int) (*inference.ModelInferResponse_InferOutputTensor, []byte, error) {
	if m.Task != modelrepo.TaskClassify {
		return nil, nil, invalid("classification is for classifiers; model %q is a %s model", m.Name, m.Task)
	}
	if n == 0 || len(t.Data)%n != 0 {
		return nil, nil, errors.New("classification: output rows do not match the batch")
	}
	classes := len(t.Data) / n
	k = min(k, classes)
	var raw []byte
	idx := make([]int, classes)
	for i := range n {
		row := t.Data[i*classes : (i+1)*classes]
		for j := range idx {
			idx[j] = j
		}
		slices.SortStableFunc(idx, func(a, b int) int {
			switch {
			case row[a] > row[b]:
				return -1
			case row[a] < row[b]:
				return 1
			}
			return 0
		})
		for _, j := range idx[:k] {
			label := strconv.Itoa(j)
			if j < len(m.LabelNames) {
				label = m.LabelNames[j]
			}
			s := strconv.FormatFloat(float64(row[j]), 'f', 6, 32) + ":" + strconv.Itoa(j) + ":" + label
			raw = binary.LittleEndian.AppendUint32(raw, uint32(len(s)))
			raw = append(raw, s...)
		}
	}
	return &inference.ModelInferResponse_InferOutputTensor{Name: t.Name, Datatype: "BYTES", Shape: []int64{int64(n), int64(k)}}, raw, nil
}

// ModelStreamInfer implements Triton's bidirectional streaming inference:
// each request is answered in order, and a request that fails is answered
// with its error message while the stream goes on.
func (s *oipService) ModelStreamInfer(st inference.GRPCInferenceService_ModelStreamInferServer) error {
	ctx := st.Context()
	for {
		req, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return streamBroken(ctx, err)
		}
		resp := &inference.ModelStreamInferResponse{}
		out, err := s.ModelInfer(ctx, req)
		if err != nil {
			if ctx.Err() != nil {
				return toStatus(ctx.Err())
			}
			resp.ErrorMessage = status.Convert(err).Message()
			// Identify the failed request, as Triton does.
			resp.InferResponse = &inference.ModelInferResponse{ModelName: req.GetModelName(), ModelVersion: req.GetModelVersion(), Id: req.GetId()}
		} else {
			resp.InferResponse = out
		}
		if err := st.Send(resp); err != nil {
			return streamBroken(ctx, err)
		}
	}
}

// CudaSharedMemoryStatus, CudaSharedMemoryRegister and
// CudaSharedMemoryUnregister answer Unimplemented with the reason.
func (s *oipService) CudaSharedMemoryStatus(context.Context, *inference.CudaSharedMemoryStatusRequest) (*inference.CudaSharedMemoryStatusResponse, error) {
	return nil, errNoCUDASharedMemory
}

func (s *oipService) CudaSharedMemoryRegister(context.Context, *inference.CudaSharedMemoryRegisterRequest) (*inference.CudaSharedMemoryRegisterResponse, error) {
	return nil, errNoCUDASharedMemory
}

func (s *oipService) CudaSharedMemoryUnregister(context.Context, *inference.CudaSharedMemoryUnregisterRequest) (*inference.CudaSharedMemoryUnregisterResponse, error) {
	return nil, errNoCUDASharedMemory
}

var errNoCUDASharedMemory = status.Error(codes.Unimplemented, "CUDA shared memory is not supported: the engines read their input from host memory; use system shared memory (/dev/shm) instead")

// TraceSetting and LogSettings answer Unimplemented with the reason.
func (s *oipService) TraceSetting(context.Context, *inference.TraceSettingRequest) (*inference.TraceSettingResponse, error) {
	return nil, status.Error(codes.Unimplemented, "trace settings are not changed at run time: tracing is OpenTelemetry, configured by the OTEL_* environment at startup (docs/operations.md)")
}

func (s *oipService) LogSettings(context.Context, *inference.LogSettingsRequest) (*inference.LogSettingsResponse, error) {
	return nil, status.Error(codes.Unimplemented, "log settings are not changed at run time: --log-level and --log-format at startup")
}
