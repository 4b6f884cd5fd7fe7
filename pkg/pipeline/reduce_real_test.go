package pipeline_test

import (
	"context"
	"fmt"
	"math"
	"reflect"
	"testing"

	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// inferBoth runs images through m with the reduced and the full decode.
func inferBoth(t *testing.T, m *modelrepo.Model, images [][]byte, opts pipeline.Options) (reduced, full []pipeline.Result) {
	t.Helper()
	var out [2][]pipeline.Result
	for k, fullDecode := range []bool{false, true} {
		r := runnerWith(t, m, pipeline.PreprocessOptions{FullDecode: fullDecode})
		res, err := r.Infer(context.Background(), images, opts)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = res
	}
	return out[0], out[1]
}

func iou(a, b pipeline.Box) float64 {
	iw := math.Min(float64(a.X2), float64(b.X2)) - math.Max(float64(a.X1), float64(b.X1))
	ih := math.Min(float64(a.Y2), float64(b.Y2)) - math.Max(float64(a.Y1), float64(b.Y1))
	if iw <= 0 || ih <= 0 {
		return 0
	}
	area := func(b pipeline.Box) float64 { return float64(b.X2-b.X1) * float64(b.Y2-b.Y1) }
	inter := iw * ih
	return inter / (area(a) + area(b) - inter)
}

// TestRealReducedDecodeYOLO runs the real YOLOv8n on bus.jpg, zidane.jpg
// and dog.jpg with the reduced and the full JPEG decode. bus.jpg is not
// reduced (its 1080 rows letterbox to 640) and must give exactly the same
// detections. Elsewhere every detection scoring 0.7+ in the full decode
// must be found again, same class, IoU 0.97+, each edge within two
// model-input pixels. The letterbox layout and Transform are the same in
// both (TestReducedMatchesFull), so what moves the boxes is the int8
// model's response to the small pixel differences: on zidane.jpg the full
// decode's exact 2×2 area average and libjpeg's 1/2 IDCT differ by 0.16
// levels on average, and the two people's box edges still move by up to
// 3.2 original pixels (1.6 model-input pixels).
func TestRealReducedDecodeYOLO(t *testing.T) {
	f := sharedFiles(t, "models/yolov8n_int8.onnx", "labels/coco80.txt", "images/bus.jpg", "images/zidane.jpg", "images/dog.jpg")
	m := realYOLOv8n(t, f[0], f[1], 3)
	images := readAll(t, f[2:]...)
	reduced, full := inferBoth(t, m, images, pipeline.Options{})
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	compared := 0
	for i, name := range []string{"bus.jpg", "zidane.jpg", "dog.jpg"} {
		red, ful := reduced[i], full[i]
		if red.Width != ful.Width || red.Height != ful.Height {
			t.Errorf("%s: reduced decode gives %dx%d, full %dx%d", name, red.Width, red.Height, ful.Width, ful.Height)
			continue
		}
		r := pre.Reduction(ful.Width, ful.Height)
		if r == 1 {
			if !reflect.DeepEqual(red.Detections, ful.Detections) {
				t.Errorf("%s is not reduced, yet detections differ:\n%+v\n%+v", name, red.Detections, ful.Detections)
			}
			continue
		}
		// One model-input pixel in original pixels.
		modelPixel := float32(max(ful.Width, ful.Height)) / 640
		for _, d := range ful.Detections {
			if d.Score < 0.7 {
				continue
			}
			compared++
			best, bestIoU := pipeline.Detection{}, 0.0
			for _, e := range red.Detections {
				if e.Label == d.Label && iou(d.Box, e.Box) > bestIoU {
					best, bestIoU = e, iou(d.Box, e.Box)
				}
			}
			edge := max(abs32(d.Box.X1-best.Box.X1), abs32(d.Box.Y1-best.Box.Y1), abs32(d.Box.X2-best.Box.X2), abs32(d.Box.Y2-best.Box.Y2))
			t.Logf("%s (1/%d): %s %.3f %s, reduced %.3f %s: IoU %.3f, edges up to %.2f px (%.2f model px) apart",
				name, r, d.Label, d.Score, fmtBox(d.Box), best.Score, fmtBox(best.Box), bestIoU, edge, edge/modelPixel)
			if bestIoU < 0.97 || edge > 2*modelPixel {
				t.Errorf("%s: %s %s of the full decode is %s (IoU %.3f) in the reduced one", name, d.Label, fmtBox(d.Box), fmtBox(best.Box), bestIoU)
			}
		}
	}
	if compared == 0 {
		t.Error("no detection of a reduced image scored 0.7+: nothing compared")
	}
}

func abs32(v float32) float32 { return float32(math.Abs(float64(v))) }

func fmtBox(b pipeline.Box) string {
	return fmt.Sprintf("[%.1f %.1f %.1f %.1f]", b.X1, b.Y1, b.X2, b.Y2)
}

// TestRealReducedDecodeClassify runs the real MobileNetV2 on dog.jpg, which
// decodes at 1/4 for a 256 shorter side, and checks that the reduced
// decode keeps the top-1 class (Samoyed) and its score.
func TestRealReducedDecodeClassify(t *testing.T) {
	f := sharedFiles(t, "models/mobilenetv2-12-int8.onnx", "labels/imagenet.txt", "images/dog.jpg")
	m := realMobileNetV2(t, f[0], f[1])
	reduced, full := inferBoth(t, m, readAll(t, f[2]), pipeline.Options{TopK: 3})
	t.Logf("reduced: %+v", reduced[0].Classes)
	t.Logf("full:    %+v", full[0].Classes)
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r := pre.Reduction(full[0].Width, full[0].Height); r != 4 {
		t.Fatalf("dog.jpg (%dx%d) reduced 1/%d, want 1/4", full[0].Width, full[0].Height, r)
	}
	red, ful := reduced[0].Classes[0], full[0].Classes[0]
	if red.Label != "Samoyed" || ful.Label != "Samoyed" {
		t.Errorf("top-1 %q reduced, %q full, want Samoyed", red.Label, ful.Label)
	}
	// Measured 0.853 against 0.859.
	if d := math.Abs(float64(red.Score - ful.Score)); d > 0.03 {
		t.Errorf("top-1 score %.3f reduced, %.3f full: %.3f apart", red.Score, ful.Score, d)
	}
}
