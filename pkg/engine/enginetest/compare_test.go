package enginetest

import (
	"math"
	"testing"

	"github.com/visionserve/visionserve/pkg/pipeline"
)

func iou(a, b pipeline.Box) float64 {
	ix := math.Max(0, float64(min(a.X2, b.X2)-max(a.X1, b.X1)))
	iy := math.Max(0, float64(min(a.Y2, b.Y2)-max(a.Y1, b.Y1)))
	inter := ix * iy
	union := float64((a.X2-a.X1)*(a.Y2-a.Y1)+(b.X2-b.X1)*(b.Y2-b.Y1)) - inter
	if union <= 0 {
		return 0
	}
	return inter / union
}

// compareDetections matches every detection of want to a distinct one of
// got with the same class and the best IoU, and requires IoU >= minIoU and
// scores within scoreTol. A detection whose score is within scoreTol of
// the confidence threshold conf may be on one side only (two runtimes
// round differently); any other unmatched detection is an error.
func compareDetections(t *testing.T, got, want []pipeline.Detection, conf float32, minIoU, scoreTol float64) {
	t.Helper()
	nearThreshold := func(d pipeline.Detection) bool { return float64(d.Score-conf) <= scoreTol }
	used := make([]bool, len(got))
	defer func() {
		for i, g := range got {
			if !used[i] && !nearThreshold(g) {
				t.Errorf("extra detection %+v", g)
			}
		}
	}()
	worstIoU, worstScore := 1.0, 0.0
	defer func() {
		t.Logf("%d detections matched: worst IoU %.4f, worst score difference %.2g", len(want), worstIoU, worstScore)
	}()
	for _, w := range want {
		best, bestIoU := -1, 0.0
		for i, g := range got {
			if used[i] || g.Index != w.Index {
				continue
			}
			if v := iou(g.Box, w.Box); v > bestIoU {
				best, bestIoU = i, v
			}
		}
		if best < 0 {
			if !nearThreshold(w) {
				t.Errorf("no %s detection matches %+v", w.Label, w)
			}
			continue
		}
		used[best] = true
		g := got[best]
		worstIoU = min(worstIoU, bestIoU)
		worstScore = max(worstScore, math.Abs(float64(g.Score-w.Score)))
		if bestIoU < minIoU {
			t.Errorf("%s: IoU %.4f < %.2f between %+v and %+v", w.Label, bestIoU, minIoU, g.Box, w.Box)
		}
		if d := math.Abs(float64(g.Score - w.Score)); d > scoreTol {
			t.Errorf("%s: scores %.5f and %.5f differ by %.2g > %.0g", w.Label, g.Score, w.Score, d, scoreTol)
		}
	}
}

// compareClasses requires the same top-1 class and every shared class's
// probability within tol.
func compareClasses(t *testing.T, got, want []pipeline.Class, tol float64) {
	t.Helper()
	if len(got) == 0 || len(want) == 0 {
		t.Fatalf("empty classes: got %v want %v", got, want)
	}
	if got[0].Index != want[0].Index {
		t.Errorf("top-1 %d (%s %.4f), want %d (%s %.4f)", got[0].Index, got[0].Label, got[0].Score, want[0].Index, want[0].Label, want[0].Score)
	}
	for _, w := range want {
		for _, g := range got {
			if g.Index == w.Index {
				if d := math.Abs(float64(g.Score - w.Score)); d > tol {
					t.Errorf("class %d: probabilities %.5f and %.5f differ by %.2g", w.Index, g.Score, w.Score, d)
				}
			}
		}
	}
}
