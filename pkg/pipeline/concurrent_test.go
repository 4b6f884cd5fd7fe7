package pipeline

import (
	"image"
	"image/color"
	"reflect"
	"sync"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
)

// TestConcurrentUse runs one Preprocessor and one Postprocessor from
// several goroutines at once (as the batcher's workers do) and checks that
// every goroutine gets the same results as a serial run. Run with -race.
func TestConcurrentUse(t *testing.T) {
	checkMats(t)
	m := testModel("detect", "letterbox", 96, 64, 6)
	pre, err := NewPreprocessor(m, PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pp, err := NewPostprocessor(m)
	if err != nil {
		t.Fatal(err)
	}
	images := make([][]byte, 4)
	for k := range images {
		images[k] = encodePNG(t, rectImage(40+30*k, 50, image.Rect(5, 5, 20+k, 30), color.NRGBA{9, 99, 199, 255}, color.NRGBA{200, 10, 10, 255}))
	}
	outs := make([]engine.Tensor, 4)
	for k := range outs {
		var boxes []yoloBox
		for j := range 10 + 5*k {
			boxes = append(boxes, yoloBox{float32(5 * j), float32(3 * j), 20, 20, j % 6, 0.3 + float32(j%7)/10})
		}
		outs[k] = yoloOutput(1, 0, 6, 64, boxes)
	}
	run := func(k int) ([]float32, Result, error) {
		p, err := pre.Prepare(images[k])
		if err != nil {
			return nil, Result{}, err
		}
		defer p.Close()
		slot := make([]float32, 3*96*64)
		if err := p.Fill(slot); err != nil {
			return nil, Result{}, err
		}
		res, err := pp.Decode(outs[k:k+1], 0, p, Options{IoU: 0.5})
		res.Timings = StageTimings{}
		return slot, res, err
	}
	wantSlots := make([][]float32, 4)
	wantRes := make([]Result, 4)
	for k := range 4 {
		if wantSlots[k], wantRes[k], err = run(k); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 8 {
		wg.Go(func() {
			for it := range 10 {
				k := (g + it) % 4
				slot, res, err := run(k)
				if err != nil {
					errs <- err
					return
				}
				if !reflect.DeepEqual(slot, wantSlots[k]) || !reflect.DeepEqual(res, wantRes[k]) {
					t.Errorf("goroutine %d image %d: result differs from the serial run", g, k)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
