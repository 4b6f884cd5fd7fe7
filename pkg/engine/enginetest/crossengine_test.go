package enginetest

import (
	"bytes"
	"context"
	"image"
	"image/color"
	"image/png"
	"math"
	"testing"

	"github.com/visionserve/visionserve/internal/testenv/onnxrttest"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	"github.com/visionserve/visionserve/pkg/pipeline/pipelinetest"
)

// testImages are the shared photographs when present, else drawn scenes:
// the cross-engine tests compare two runtimes, which any image does.
func testImages(t testing.TB) [][]byte {
	t.Helper()
	var imgs [][]byte
	for _, name := range []string{"bus.jpg", "zidane.jpg", "dog.jpg"} {
		if p, err := testenv.SharedTestdata("images/" + name); err == nil {
			imgs = append(imgs, readFile(t, p))
		}
	}
	if len(imgs) > 0 {
		return imgs
	}
	for k := range 3 {
		img := image.NewRGBA(image.Rect(0, 0, 640+80*k, 480))
		for y := range 480 {
			for x := range 640 + 80*k {
				c := color.RGBA{uint8(x * 255 / (640 + 80*k)), uint8(y * 255 / 480), uint8(60 * k), 255}
				if (x-200-50*k)*(x-200-50*k)+(y-240)*(y-240) < 90*90 {
					c = color.RGBA{240, 200, 40, 255}
				}
				img.Set(x, y, c)
			}
		}
		var buf bytes.Buffer
		if err := png.Encode(&buf, img); err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, buf.Bytes())
	}
	return imgs
}

// runners builds the model's pipeline on ONNX Runtime and on OpenCV DNN.
func runners(t *testing.T, m *modelrepo.Model) (ort, cv *pipelinetest.Runner, ortE *onnxrt.Engine, cvE *cvdnn.Engine) {
	t.Helper()
	onnxrttest.Init(t)
	var err error
	ortE, err = onnxrt.NewForModel(m, onnxrt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ortE.Close() })
	cvE, err = cvdnn.NewForModel(context.Background(), m, cvdnn.Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cvE.Close() })
	t.Logf("%s on OpenCV: cut at the detect head %v, image by image %v", m.Name, cvE.Head() != nil, cvE.PerImage())
	for _, p := range []struct {
		r **pipelinetest.Runner
		e engine.Engine
	}{{&ort, ortE}, {&cv, cvE}} {
		r, err := pipelinetest.New(m, p.e, pipeline.PreprocessOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		*p.r = r
	}
	return ort, cv, ortE, cvE
}

func TestCrossEngineClassifiers(t *testing.T) {
	for _, name := range []string{"resnet50", "mobilenetv3_large"} {
		t.Run(name, func(t *testing.T) {
			ort, cv, _, _ := runners(t, generated(t, name))
			crossCheckClasses(t, ort, cv, testImages(t), 1e-3)
		})
	}
}

func TestCrossEngineYOLOv8s(t *testing.T) {
	m := generated(t, "yolov8s")
	ort, cv, ortE, cvE := runners(t, m)
	if cvE.Head() == nil {
		t.Fatal("OpenCV engine runs the full yolov8s graph; want it cut at the detect head")
	}
	imgs := testImages(t)
	crossCheckDetections(t, ort, cv, imgs)

	// The raw output0 of both engines, on one preprocessed image: class
	// rows are probabilities (within 1e-3), box rows input pixels.
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := pre.Prepare(imgs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, h, w := pre.InputShape()
	b := engine.NewBatch(1, c, h, w)
	b.N = 1
	if err := p.Fill(b.Slot(0)); err != nil {
		t.Fatal(err)
	}
	a, err := ortE.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	ref := append([]float32(nil), a[0].Data...)
	o, err := cvE.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	if len(o[0].Data) != len(ref) {
		t.Fatalf("output0 has %d floats on opencv, %d on ort (shapes %v, %v)", len(o[0].Data), len(ref), o[0].Shape, a[0].Shape)
	}
	anchors := int(a[0].Shape[2])
	var boxErr, clsErr float64
	for r := range int(a[0].Shape[1]) {
		for k := range anchors {
			d := math.Abs(float64(o[0].Data[r*anchors+k] - ref[r*anchors+k]))
			if r < 4 {
				boxErr = max(boxErr, d)
			} else {
				clsErr = max(clsErr, d)
			}
		}
	}
	t.Logf("raw output0: max box difference %.3g px, max class difference %.3g", boxErr, clsErr)
	if clsErr > 1e-3 {
		t.Errorf("class probabilities differ by %g", clsErr)
	}
	if boxErr > 0.05 {
		t.Errorf("boxes differ by %g input pixels", boxErr)
	}
}

// crossCheckDetections compares the detections of the two runners on
// imgs: every box at IoU ≥ 0.99, scores within 1e-3. Seeded weights are
// not trained: how many boxes pass the default threshold depends on the
// seed, so the threshold is lowered until there are boxes to compare; no
// cap on their number, so no cut-off can differ.
func crossCheckDetections(t *testing.T, ort, cv *pipelinetest.Runner, imgs [][]byte) {
	t.Helper()
	for _, conf := range []float32{0.25, 0.05, 0.01} {
		opts := pipeline.Options{Confidence: conf, MaxDetections: modelrepo.MaxDetectionsAny}
		want, err := ort.Infer(context.Background(), imgs, opts)
		if err != nil {
			t.Fatal(err)
		}
		got, err := cv.Infer(context.Background(), imgs, opts)
		if err != nil {
			t.Fatal(err)
		}
		total := 0
		for i := range imgs {
			total += len(want[i].Detections)
		}
		if total == 0 {
			continue
		}
		for i := range imgs {
			if got[i].Backend != "opencv" {
				t.Fatalf("served on %q", got[i].Backend)
			}
			t.Logf("confidence %.2f, image %d: %d detections on ort, %d on opencv", conf, i, len(want[i].Detections), len(got[i].Detections))
			compareDetections(t, got[i].Detections, want[i].Detections, conf, 0.99, 1e-3)
		}
		return
	}
	t.Error("no detections even at confidence 0.01; the box comparison tested nothing")
}

// crossCheckClasses compares the top-5 classes of the two runners on
// imgs: the same top-1, every shared class's probability within tol.
func crossCheckClasses(t *testing.T, ort, cv *pipelinetest.Runner, imgs [][]byte, tol float64) {
	t.Helper()
	want, err := ort.Infer(context.Background(), imgs, pipeline.Options{TopK: 5})
	if err != nil {
		t.Fatal(err)
	}
	got, err := cv.Infer(context.Background(), imgs, pipeline.Options{TopK: 5})
	if err != nil {
		t.Fatal(err)
	}
	for i := range imgs {
		if got[i].Backend != "opencv" || want[i].Backend != "ort-cpu" {
			t.Fatalf("backends %q and %q", got[i].Backend, want[i].Backend)
		}
		t.Logf("image %d: ort %s %.5f, opencv %s %.5f", i, want[i].Classes[0].Label, want[i].Classes[0].Score, got[i].Classes[0].Label, got[i].Classes[0].Score)
		compareClasses(t, got[i].Classes, want[i].Classes, tol)
	}
}
