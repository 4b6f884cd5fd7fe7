package inference

import (
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// TestWireCompatible pins the names and field numbers of the Open
// Inference Protocol (KServe v2) that clients depend on: a change here
// breaks every OIP client on the wire.
func TestWireCompatible(t *testing.T) {
	fields := map[string]map[string]protoreflect.FieldNumber{
		"inference.ServerLiveResponse":                   {"live": 1},
		"inference.ServerReadyResponse":                  {"ready": 1},
		"inference.ModelReadyRequest":                    {"name": 1, "version": 2},
		"inference.ModelReadyResponse":                   {"ready": 1},
		"inference.ServerMetadataResponse":               {"name": 1, "version": 2, "extensions": 3},
		"inference.ModelMetadataRequest":                 {"name": 1, "version": 2},
		"inference.ModelMetadataResponse":                {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
		"inference.ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
		"inference.ModelInferRequest": {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
			"outputs": 6, "raw_input_contents": 7},
		"inference.ModelInferRequest.InferInputTensor":           {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
		"inference.ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
		"inference.ModelInferResponse":                           {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5, "raw_output_contents": 6},
		"inference.ModelInferResponse.InferOutputTensor":         {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
		"inference.InferParameter":                               {"bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5},
		"inference.InferTensorContents": {"bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4,
			"uint64_contents": 5, "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8},
	}
	for msg, want := range fields {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(msg))
		if err != nil {
			t.Errorf("%s: %v", msg, err)
			continue
		}
		md := d.(protoreflect.MessageDescriptor)
		if md.Fields().Len() != len(want) {
			t.Errorf("%s has %d fields, want %d", msg, md.Fields().Len(), len(want))
		}
		for name, num := range want {
			f := md.Fields().ByName(protoreflect.Name(name))
			if f == nil || f.Number() != num {
				t.Errorf("%s.%s: got %v, want field %d", msg, name, f, num)
			}
		}
	}
	sd, err := protoregistry.GlobalFiles.FindDescriptorByName("inference.GRPCInferenceService")
	if err != nil {
		t.Fatal(err)
	}
	methods := sd.(protoreflect.ServiceDescriptor).Methods()
	for _, m := range []string{"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} {
		if methods.ByName(protoreflect.Name(m)) == nil {
			t.Errorf("GRPCInferenceService lacks %s", m)
		}
	}
}
