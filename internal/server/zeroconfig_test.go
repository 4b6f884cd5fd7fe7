package server

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/server/servertest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// TestZeroConfigServesLikeHandWritten serves the real Ultralytics YOLOv8n
// export (from outside the repository, --model) and the Model Zoo
// MobileNetV2 (a bare NAME.onnx in the repository) with no config file,
// and checks that every answer equals the one served with the
// hand-written configs of servertest.Repo.
func TestZeroConfigServesLikeHandWritten(t *testing.T) {
	if testing.Short() {
		t.Skip("serves real models twice")
	}
	images := []*visionv1.Image{encoded(servertest.Image(t, "bus.jpg")), encoded(servertest.Image(t, "zidane.jpg")), encoded(servertest.Image(t, "dog.jpg"))}
	ask := func(repo string, tweak ...func(*config.Config)) (*visionv1.ClassifyResponse, *visionv1.DetectResponse, map[string]*visionv1.ModelInfoResponse) {
		conn, stop, done := realServer(t, repo, "ort-cpu", tweak...)
		vision := visionv1.NewVisionServiceClient(conn)
		ctx := ctxT(t)
		cls, err := vision.Classify(ctx, &visionv1.ClassifyRequest{Model: servertest.MobileNetV2, Images: images})
		if err != nil {
			t.Fatal(err)
		}
		det, err := vision.Detect(ctx, &visionv1.DetectRequest{Model: servertest.YOLOv8n, Images: images})
		if err != nil {
			t.Fatal(err)
		}
		list, err := vision.ListModels(ctx, &visionv1.ListModelsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		infos := map[string]*visionv1.ModelInfoResponse{}
		for _, m := range list.GetModels() {
			infos[m.GetName()] = m
		}
		stop <- syscall.SIGTERM
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		return cls, det, infos
	}
	wantCls, wantDet, _ := ask(servertest.Repo(t, servertest.MobileNetV2, servertest.YOLOv8n))

	data := servertest.TestdataDir(t)
	repo, outside := t.TempDir(), t.TempDir()
	link := func(file, to string) {
		if err := os.Symlink(filepath.Join(data, "models", file), to); err != nil {
			t.Fatal(err)
		}
	}
	link("mobilenetv2-12-int8.onnx", filepath.Join(repo, servertest.MobileNetV2+".onnx"))
	yolo := filepath.Join(outside, servertest.YOLOv8n+".onnx")
	link("yolov8n_int8.onnx", yolo)
	gotCls, gotDet, infos := ask(repo, func(c *config.Config) { c.Models = []string{yolo} })

	// Time and batching (the hand-written configs set smaller batches)
	// differ; nothing else may.
	for _, r := range append(append(gotCls.Results, wantCls.Results...), append(gotDet.Results, wantDet.Results...)...) {
		r.Timings, r.BatchSize = nil, 0
	}
	if !proto.Equal(gotCls, wantCls) {
		t.Errorf("zero-config classify differs:\n got %v\nwant %v", gotCls, wantCls)
	}
	if !proto.Equal(gotDet, wantDet) {
		t.Errorf("zero-config detect differs:\n got %v\nwant %v", gotDet, wantDet)
	}
	if len(gotDet.Results[0].Detections) == 0 {
		t.Error("no detection on bus.jpg")
	}
	y, m := infos[servertest.YOLOv8n].GetSettingSources(), infos[servertest.MobileNetV2].GetSettingSources()
	if y["task"] != "metadata" || y["labels"] != "metadata" || y["input.pad_value"] != "metadata" || m["task"] != "preset" || m["input.mean"] != "preset" || m["input.width"] != "graph" {
		t.Errorf("setting sources: yolov8n %v, mobilenetv2 %v", y, m)
	}
}
