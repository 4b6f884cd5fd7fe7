package pipeline

import "github.com/visionserve/visionserve/pkg/modelrepo"

// reduction returns the largest libjpeg DCT scaling denominator r of 8, 4
// and 2 for which an upright w×h image decoded at ceil(w/r)×ceil(h/r) is
// still at least as large, along every axis fit resamples, as what fit
// resizes it to; 1 when none is. fit then only ever scales down after the
// reduction, so detail is lost no earlier than in a full decode:
//
//   - letterbox: both reduced sides at least the letterboxed sides;
//   - shorter_crop: the reduced shorter side at least resize_shorter (the
//     crop is then at least the model input);
//   - stretch: both reduced sides at least the model input.
//
// Each reduced pixel stands for r original ones (libjpeg pads the last
// block). fit's Transform maps through the exact ratio of the sizes, so it
// is exact when r divides a side and otherwise off by at most r-1
// original pixels at the far edge: less than one reduced pixel, and so
// less than one model-input pixel, since the model input is no larger.
func (p *Preprocessor) reduction(w, h int) int {
	for _, r := range [...]int{8, 4, 2} {
		rw, rh := ceilDiv(w, r), ceilDiv(h, r)
		var ok bool
		switch p.mode {
		case modelrepo.ResizeLetterbox:
			nw, nh := p.letterboxSize(w, h)
			ok = rw >= nw && rh >= nh
		case modelrepo.ResizeShorterCrop:
			ok = min(rw, rh) >= p.shorter
		case modelrepo.ResizeStretch:
			ok = rw >= p.w && rh >= p.h
		}
		if ok {
			return r
		}
	}
	return 1
}
